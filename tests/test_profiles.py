"""Hardware profiles: built-ins, extends, plugins, and strict validation messages."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eptq_deploy.errors import ProfileError
from eptq_deploy.hw_profiles import (
    PROFILE_ENTRY_POINT_GROUP,
    ActivationSpec,
    Profile,
    WeightSpec,
    list_profiles,
    load_profile,
    profile_from_dict,
)

BUILTINS = ["imx500", "int8-pot", "openvino-cpu", "tflite-int8", "w4a8-pot"]


def _yaml_dict(name: str) -> dict[str, Any]:
    """A builtin in YAML layout, without provenance: a valid base to mutate."""
    d = load_profile(name).to_dict()
    del d["source"]
    return d


def _write(path: Path, data: object) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------------------
# built-ins


EXPECTED = {
    # name: (target, w bits, allowed, w pow2, narrow, a symmetric, a pow2, signedness)
    "tflite-int8": ("tflite-int8", 8, (8,), False, True, False, False, "signed"),
    "int8-pot": ("onnx-qdq", 8, (8,), True, True, True, True, "auto"),
    "imx500": ("imx500", 8, (8, 4, 2), False, False, True, True, "auto"),
    "openvino-cpu": ("openvino-ir", 8, (8,), False, True, False, False, "unsigned"),
    "w4a8-pot": ("onnx-qdq", 4, (4,), True, False, True, True, "auto"),
}


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_properties(name: str) -> None:
    target, bits, allowed, w_pot, narrow, a_sym, a_pot, signedness = EXPECTED[name]
    p = load_profile(name)
    assert isinstance(p, Profile)
    assert isinstance(p.weights, WeightSpec) and isinstance(p.activations, ActivationSpec)
    assert p.name == name and p.source == "builtin"
    assert p.description and "\n" not in p.description
    assert p.native_target == target
    assert p.weights.bits == bits and p.weights.allowed_bits == allowed
    assert p.weights.per_channel and p.weights.symmetric
    assert p.weights.power_of_two is w_pot and p.weights.narrow_range is narrow
    assert p.activations.bits == 8
    assert p.activations.symmetric is a_sym and p.activations.power_of_two is a_pot
    assert p.activations.signedness == signedness
    assert p.bias_bits == 32
    assert {"conv+relu", "conv+relu6", "linear+relu", "add+relu"} <= set(p.fusing)
    assert p.first_layer_weight_bits is None and p.last_layer_weight_bits is None


def test_qranges() -> None:
    assert load_profile("tflite-int8").weights.qrange() == (-127, 127)
    imx = load_profile("imx500")
    assert imx.weights.qrange() == (-128, 127)
    assert imx.weights.qrange(4) == (-8, 7)
    assert imx.weights.qrange(2) == (-2, 1)
    assert load_profile("w4a8-pot").weights.qrange() == (-8, 7)
    assert imx.activations.qrange(signed=True) == (-128, 127)
    assert imx.activations.qrange(signed=False) == (0, 255)
    with pytest.raises(ProfileError, match="8, 4, 2"):
        imx.weights.qrange(3)


def test_grid_signedness() -> None:
    assert load_profile("imx500").activations.grid_signed(nonnegative=True) is False
    assert load_profile("imx500").activations.grid_signed(nonnegative=False) is True
    assert load_profile("tflite-int8").activations.grid_signed(nonnegative=True) is True
    assert load_profile("openvino-cpu").activations.grid_signed(nonnegative=False) is False


def test_list_profiles() -> None:
    listed = list_profiles()
    assert listed == sorted(listed)
    names = dict(listed)
    for name in BUILTINS:
        assert names[name] == load_profile(name).description


@pytest.mark.parametrize("name", BUILTINS)
def test_to_dict_round_trip(name: str) -> None:
    p = load_profile(name)
    for bits in p.weights.allowed_bits:
        q = p.with_weight_bits(bits)
        d = q.to_dict()
        assert json.loads(json.dumps(d)) == d
        assert profile_from_dict(d) == q
    assert profile_from_dict(_yaml_dict(name)).source == "dict"
    assert profile_from_dict(_yaml_dict(name), source="manifest.json").source == "manifest.json"


# ---------------------------------------------------------------------------
# weight bits


def test_weight_bits_selection() -> None:
    assert load_profile("imx500", weight_bits=2).weights.bits == 2
    assert load_profile("imx500").with_weight_bits(4).weights.bits == 4
    assert load_profile("imx500", weight_bits=4).weights.qrange() == (-8, 7)


@pytest.mark.parametrize("bits", [3, 16, 0, True, "4"])
def test_weight_bits_refused(bits: Any) -> None:
    with pytest.raises(ProfileError) as info:
        load_profile("imx500", weight_bits=bits)
    assert "imx500" in str(info.value) and "8, 4, 2" in str(info.value)


# ---------------------------------------------------------------------------
# extends


def test_extends_override(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "imx500-w3.yaml",
        "extends: imx500\n"
        "description: IMX500 variant with 3-bit weights.\n"
        "weights: {allowed_bits: [8, 4, 3, 2]}\n",
    )
    p = load_profile(path)
    assert p.name == "imx500-w3"
    assert p.description == "IMX500 variant with 3-bit weights."
    assert p.weights.allowed_bits == (8, 4, 3, 2)
    assert p.weights.bits == 8 and p.weights.per_channel and not p.weights.power_of_two
    assert p.activations == load_profile("imx500").activations
    assert p.source == str(path.resolve())
    assert load_profile(str(path), weight_bits=3).weights.qrange() == (-4, 3)


def test_extends_relative_chain(tmp_path: Path) -> None:
    (tmp_path / "vendor").mkdir()
    _write(tmp_path / "vendor" / "base.yaml", "extends: int8-pot\nfusing: [conv+relu]\n")
    child = _write(
        tmp_path / "vendor" / "chip.yaml",
        "extends: base.yaml\nactivations: {bits: 16}\nlast_layer_weight_bits: 8\n",
    )
    p = load_profile(child)
    assert p.name == "chip" and p.fusing == ("conv+relu",)
    assert p.activations.bits == 16 and p.activations.power_of_two
    assert p.last_layer_weight_bits == 8
    assert p.description == load_profile("int8-pot").description


def test_extends_cycle(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "extends: b.yaml\n")
    _write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ProfileError, match="cycle") as info:
        load_profile(tmp_path / "a.yaml")
    assert "a.yaml" in str(info.value) and "b.yaml" in str(info.value)
    _write(tmp_path / "self.yaml", "extends: ./self.yaml\n")
    with pytest.raises(ProfileError, match="cycle"):
        load_profile(tmp_path / "self.yaml")


def test_extends_unknown_parent(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.yaml", "extends: imx501\n")
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    msg = str(info.value)
    assert "x.yaml" in msg and "extends" in msg and "imx500" in msg


def test_extends_child_typo_blamed_on_child(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.yaml", "extends: imx500\nweights: {per_chanel: false}\n")
    with pytest.raises(ProfileError, match=r"x\.yaml.*weights\.per_chanel.*'per_channel'"):
        load_profile(path)


# ---------------------------------------------------------------------------
# validation messages


def _set(path: str, value: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        for p in parents:
            d = d[p]
        d[leaf] = value

    return mutate


def _delete(path: str) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        for p in parents:
            d = d[p]
        del d[leaf]

    return mutate


BAD_CASES = [
    # (id, mutation, substrings the one-line message must hold)
    (
        "unknown-nested",
        _set("weights.per_chanel", True),
        ["weights.per_chanel", "did you mean 'per_channel'", "allowed:"],
    ),
    ("unknown-top", _set("fusin", []), ["'fusin'", "did you mean 'fusing'", "native_target"]),
    ("bool-as-string", _set("weights.symmetric", "true"), ["weights.symmetric", "true or false"]),
    (
        "bool-as-int",
        _set("activations.power_of_two", 1),
        ["activations.power_of_two", "true or false"],
    ),
    ("int-as-float", _set("activations.bits", 8.0), ["activations.bits", "4 to 16"]),
    ("int-as-string", _set("weights.default_bits", "8"), ["weights.default_bits", "2 to 8"]),
    ("int-as-bool", _set("bias_bits", True), ["bias_bits", "16 or 32"]),
    ("bias-bits", _set("bias_bits", 8), ["bias_bits", "16 or 32"]),
    ("weight-bits-high", _set("weights.allowed_bits", [8, 9]), ["weights.allowed_bits", "2 to 8"]),
    ("weight-bits-low", _set("weights.allowed_bits", [1]), ["weights.allowed_bits", "2 to 8"]),
    ("allowed-empty", _set("weights.allowed_bits", []), ["weights.allowed_bits", "non-empty"]),
    ("allowed-dup", _set("weights.allowed_bits", [8, 8]), ["weights.allowed_bits", "twice"]),
    ("act-bits", _set("activations.bits", 3), ["activations.bits", "4 to 16"]),
    ("default-not-allowed", _set("weights.default_bits", 4), ["weights.default_bits", "one of 8"]),
    ("fusing-unknown", _set("fusing", ["conv+gelu"]), ["fusing", "conv+gelu", "add+relu6"]),
    ("fusing-not-list", _set("fusing", "conv+relu"), ["fusing", "a list"]),
    (
        "signedness",
        _set("activations.signedness", "maybe"),
        ["activations.signedness", "auto, signed or unsigned"],
    ),
    ("range", _set("weights.range", "wide"), ["weights.range", "narrow or full"]),
    (
        "pot-asym-act",
        _set("activations.symmetric", False),
        ["activations.power_of_two", "symmetric: true"],
    ),
    ("pot-asym-w", _set("weights.symmetric", False), ["weights.power_of_two", "symmetric: true"]),
    ("missing-top", _delete("native_target"), ["missing field 'native_target'", "onnx-qdq"]),
    (
        "missing-nested",
        _delete("weights.range"),
        ["missing field 'weights.range'", "narrow or full"],
    ),
    ("section-not-mapping", _set("weights", [8]), ["'weights'", "a mapping of"]),
    (
        "first-layer-bits",
        _set("first_layer_weight_bits", 4),
        ["first_layer_weight_bits", "null or one of 8"],
    ),
    ("name-mismatch", _set("name", "other"), ["field 'name'", "'bad'"]),
    ("multiline-description", _set("description", "two\nlines"), ["description", "one-line"]),
    ("target", _set("native_target", "no spaces please"), ["native_target", "tflite-int8"]),
    ("memory-as-text", _set("memory_bytes", "8MB"), ["memory_bytes", "'8MB'", "positive integer"]),
    ("memory-zero", _set("memory_bytes", 0), ["memory_bytes", "positive integer"]),
]


def test_chip_memory_is_optional_and_stated_for_the_imx500(tmp_path: Path) -> None:
    assert load_profile("int8-pot").memory_bytes is None  # not stated: nothing checked against it
    assert load_profile("imx500").memory_bytes == 8388480  # the converter's "Total Memory Available On Chip"
    d = _yaml_dict("int8-pot")
    d["name"], d["memory_bytes"] = "small", 300_000
    p = load_profile(_write(tmp_path / "small.yaml", d))
    assert p.memory_bytes == 300_000 and profile_from_dict(p.to_dict()) == p


@pytest.mark.parametrize(
    ("mutate", "expected"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_bad_file_refused(tmp_path: Path, mutate: Any, expected: list[str]) -> None:
    d = _yaml_dict("int8-pot")
    d["name"] = "bad"
    mutate(d)
    path = _write(tmp_path / "bad.yaml", d)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert "bad.yaml" in msg
    for part in expected:
        assert part in msg, (part, msg)


def test_unsigned_symmetric_activations_refused() -> None:
    d = _yaml_dict("imx500")
    d["activations"].update(power_of_two=False, signedness="unsigned")
    with pytest.raises(ProfileError, match=r"activations\.signedness.*signed"):
        profile_from_dict(d)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "broken.yaml", "name: broken\ndescription: x\nweights: {bits: [8,\n")
    with pytest.raises(ProfileError, match=r"broken\.yaml.*line \d+") as info:
        load_profile(path)
    assert "\n" not in str(info.value)
    path = _write(tmp_path / "tabs.yaml", "name: tabs\nweights:\n\tbits: 8\n")
    with pytest.raises(ProfileError, match=r"tabs\.yaml.*line 3"):
        load_profile(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("- a\n- b\n", "mapping"), ("", "empty"), ("just text\n", "mapping"), ("42\n", "mapping")],
)
def test_not_a_mapping(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path / "odd.yaml", text)
    with pytest.raises(ProfileError, match=expected) as info:
        load_profile(path)
    assert "odd.yaml" in str(info.value)


def test_unknown_name_lists_known() -> None:
    with pytest.raises(ProfileError) as info:
        load_profile("no-such-chip")
    msg = str(info.value)
    assert "no-such-chip" in msg
    for name in BUILTINS:
        assert name in msg


@pytest.mark.parametrize("ref", ["missing.yaml", "sub/dir/chip", "gone.yml"])
def test_missing_path(tmp_path: Path, ref: str) -> None:
    with pytest.raises(ProfileError, match="not found") as info:
        load_profile(str(tmp_path / ref))
    assert "imx500" in str(info.value)


def test_directory_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="not a file"):
        load_profile(tmp_path)
    for bad in ("", "   ", None, 3):
        with pytest.raises(ProfileError):
            load_profile(bad)  # type: ignore[arg-type]
    with pytest.raises(ProfileError, match="mapping"):
        profile_from_dict([1, 2])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# entry-point plugins


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> types.ModuleType:
    """Install a fake plugin module and entry points for it."""
    module = types.ModuleType("fake_npu_profiles")
    yaml_path = _write(tmp_path / "npu-a.yaml", {**_yaml_dict("int8-pot"), "name": "npu-a"})
    module.PATH = str(yaml_path)
    module.as_path = lambda: yaml_path
    module.as_dict = lambda: {**_yaml_dict("imx500"), "name": "npu-b", "description": "NPU B."}
    module.as_child = lambda: {"extends": "imx500", "name": "npu-c", "weights": {"default_bits": 4}}
    module.wrong_name = lambda: {**_yaml_dict("imx500"), "name": "npu-x"}
    module.not_a_profile = 42

    def broken() -> str:
        raise RuntimeError("vendor bug")

    module.broken = broken
    monkeypatch.setitem(sys.modules, module.__name__, module)
    eps = [
        importlib.metadata.EntryPoint(name, f"fake_npu_profiles:{attr}", PROFILE_ENTRY_POINT_GROUP)
        for name, attr in [
            ("npu-a", "PATH"),
            ("npu-a2", "as_path"),
            ("npu-b", "as_dict"),
            ("npu-c", "as_child"),
            ("npu-d", "wrong_name"),
            ("npu-e", "not_a_profile"),
            ("npu-f", "broken"),
            ("npu-g", "missing_attribute"),
            ("imx500", "as_dict"),  # cannot shadow a built-in
        ]
    ]
    real = importlib.metadata.entry_points

    def fake_entry_points(**kwargs: Any) -> Any:
        if kwargs.get("group") == PROFILE_ENTRY_POINT_GROUP:
            return eps
        return real(**kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    return module


def test_plugin_profiles(plugins: types.ModuleType) -> None:
    a = load_profile("npu-a")
    assert a.name == "npu-a" and a.source == "entry-point:fake_npu_profiles:PATH"
    assert a.weights == load_profile("int8-pot").weights
    # a path-valued plugin may name the YAML file differently from the entry point
    with pytest.raises(ProfileError, match="npu-a2"):
        load_profile("npu-a2")
    b = load_profile("npu-b", weight_bits=2)
    assert b.description == "NPU B." and b.weights.bits == 2
    assert b.source.startswith("entry-point:")
    c = load_profile("npu-c")
    assert c.name == "npu-c" and c.weights.bits == 4 and c.weights.allowed_bits == (8, 4, 2)
    assert load_profile("imx500").source == "builtin"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("npu-d", "field 'name'"),
        ("npu-e", "int"),
        ("npu-f", "vendor bug"),
        ("npu-g", "cannot load"),
    ],
)
def test_broken_plugins(plugins: types.ModuleType, name: str, expected: str) -> None:
    with pytest.raises(ProfileError) as info:
        load_profile(name)
    msg = str(info.value)
    assert name in msg and expected in msg and "\n" not in msg


def test_list_profiles_with_plugins(plugins: types.ModuleType) -> None:
    listed = dict(list_profiles())
    assert [n for n, _ in list_profiles()] == sorted(listed)
    assert listed["npu-a"] == load_profile("int8-pot").description
    assert listed["npu-b"] == "NPU B."
    assert "unusable" in listed["npu-f"]
    assert listed["imx500"] == load_profile("imx500").description
    assert set(BUILTINS) <= set(listed)
    with pytest.raises(ProfileError, match="npu-a"):
        load_profile("npu-z")


# ---------------------------------------------------------------------------
# property tests: malformed input never escapes as anything but ProfileError

FIELD_NAMES = [
    "name", "description", "native_target", "weights", "activations", "bias_bits", "fusing",
    "first_layer_weight_bits", "last_layer_weight_bits", "memory_bytes", "extends", "source", "default_bits",
    "allowed_bits", "per_channel", "symmetric", "power_of_two", "range", "bits", "signedness",
]  # fmt: skip
TOKENS = [
    "narrow", "full", "auto", "signed", "unsigned", "conv+relu", "add+relu6", "imx500",
    "../x.yaml", "/", "a\x00b", "",
]  # fmt: skip

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 40),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=10),
    st.sampled_from(TOKENS),
    st.sampled_from([2, 4, 8, 16, 32]),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=6), st.integers()),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=8,
)


@st.composite
def mutated_profiles(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    d = copy.deepcopy(_BASES[draw(st.sampled_from(BUILTINS))])
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from([None, "weights", "activations"]))
        target = d.get(section) if section else d
        if not isinstance(target, dict):
            target = d
        key = draw(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=6)))
        if draw(st.booleans()) and target:
            target.pop(draw(st.sampled_from(sorted(target, key=str))), None)
        else:
            target[key] = draw(values)
    return d


_BASES = {name: _yaml_dict(name) for name in BUILTINS}


@settings(max_examples=200, deadline=None)
@given(mutated_profiles())
def test_validator_only_raises_profile_error(data: Any) -> None:
    try:
        p = profile_from_dict(data)
    except ProfileError as exc:
        assert "\n" not in str(exc)
        return
    assert profile_from_dict(p.to_dict()) == p


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(max_size=80))
def test_yaml_text_only_raises_profile_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_profile(path)
    except ProfileError as exc:
        assert "\n" not in str(exc)
