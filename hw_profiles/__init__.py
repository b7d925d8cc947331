"""Hardware profiles: what a chip can execute, read by the quantization pipeline.

A profile is one YAML file whose stem is the profile name::

    name: int8-pot
    description: Power-of-two scales everywhere, symmetric only, per-channel int8 weights.
    native_target: onnx-qdq
    weights: {default_bits: 8, allowed_bits: [8], per_channel: true, symmetric: true,
              power_of_two: true, range: narrow}          # range: narrow | full
    activations: {bits: 8, symmetric: true, power_of_two: true, signedness: auto}
    bias_bits: 32
    fusing: [conv+relu, conv+relu6, linear+relu, add+relu]
    first_layer_weight_bits: null
    last_layer_weight_bits: null

Every field is required unless inherited through ``extends: <name or path>``: the
parent's fields are taken and the file's own fields merged over them (nested
mappings key by key, lists replaced), so a vendor can describe a variant chip in
a few lines.  A relative ``extends`` path starts at the extending file's folder;
``name`` is never inherited (it defaults to the file stem).  Cycles are refused.

:func:`load_profile` resolves ``name_or_path`` in this order: a path (anything
``os.PathLike``, containing a path separator, or ending in ``.yaml``/``.yml``),
then a built-in profile (the YAML files in this package), then plugins.

Plugins: an installed distribution may declare entry points in the group
``eptq_deploy.hw_profiles`` (:data:`PROFILE_ENTRY_POINT_GROUP`).  The entry point's
name is the profile name; the object it loads is either a path (``str`` or
``os.PathLike``) to a YAML profile, or a callable taking no arguments that
returns such a path or a profile dict in the YAML layout.  For example, in the
plugin's ``pyproject.toml``::

    [project.entry-points."eptq_deploy.hw_profiles"]
    my-npu = "my_npu_pkg.profiles:my_npu_yaml"

Built-in names take precedence over plugins of the same name.  Every problem is
raised as a one-line :class:`eptq_deploy.errors.ProfileError` naming the file,
the dotted field and the allowed values.
"""

from .registry import (
    PROFILE_ENTRY_POINT_GROUP,
    list_profiles,
    load_profile,
    profile_from_dict,
)
from .schema import (
    FUSING_PATTERNS,
    ActivationSpec,
    Profile,
    WeightSpec,
)

__all__ = [
    "FUSING_PATTERNS",
    "PROFILE_ENTRY_POINT_GROUP",
    "ActivationSpec",
    "Profile",
    "WeightSpec",
    "list_profiles",
    "load_profile",
    "profile_from_dict",
]
