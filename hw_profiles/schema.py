"""Profile dataclasses and the strict validator behind every way of loading one.

The validator works field by field so that an error can name the exact file and
dotted field (``weights.power_of_two``) together with the values that would be
accepted: profiles are written by hand, often by chip vendors, and a vague error
would send them to read this code.  It runs twice per file when ``extends`` is
used: once on each file's own fields (``complete=False``, so a typo is blamed on
the file that holds it) and once on the merged result (``complete=True``), which
adds the missing-field and cross-field checks.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from eptq_deploy.errors import ProfileError

FUSING_PATTERNS: tuple[str, ...] = (
    "conv+relu",
    "conv+relu6",
    "linear+relu",
    "linear+relu6",
    "add+relu",
    "add+relu6",
)
"""Every fusing pattern a profile may list."""

WEIGHT_BITS_RANGE = (2, 8)
ACTIVATION_BITS_RANGE = (4, 16)
BIAS_BITS = (16, 32)
SIGNEDNESS = ("auto", "signed", "unsigned")
WEIGHT_RANGES = ("narrow", "full")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_TARGET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

_repr = reprlib.Repr()
_repr.maxstring = 40
_repr.maxother = 40
_repr.maxlist = 6
_repr.maxdict = 4


def show_value(value: object) -> str:
    """Short one-line rendering of a user value, so messages stay one line."""
    text = _repr.repr(value)
    return text.replace("\n", "\\n").replace("\r", "\\r")


def _kind(value: object) -> str:
    """YAML-flavoured type name, since users think in YAML, not Python."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, Mapping):
        return "mapping"
    return type(value).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())


def fail(where: str, message: str) -> ProfileError:
    """Build the ProfileError for ``where``; always one line."""
    return ProfileError(_one_line(f"{where}: {message}"))


def _bits_text(bits: tuple[int, ...] | list[int]) -> str:
    return ", ".join(str(b) for b in bits)


# ---------------------------------------------------------------------------
# dataclasses


@dataclass(frozen=True)
class WeightSpec:
    """How the chip stores weights; ``bits`` is the width chosen for this run."""

    bits: int
    allowed_bits: tuple[int, ...]
    per_channel: bool
    symmetric: bool
    power_of_two: bool
    narrow_range: bool

    def qrange(self, bits: int | None = None) -> tuple[int, int]:
        """Signed integer range (qmin, qmax) for ``bits`` (default: the chosen width).

        Narrow range drops the most negative code so that a symmetric grid is
        exactly symmetric (TFLite's ±127 weights).
        """
        b = self.bits if bits is None else bits
        if isinstance(b, bool) or not isinstance(b, int) or b not in self.allowed_bits:
            raise ProfileError(
                f"weight bits {show_value(b)} are not supported by this profile; "
                f"allowed weight bits: {_bits_text(self.allowed_bits)}"
            )
        top = 2 ** (b - 1) - 1
        return (-top if self.narrow_range else -top - 1), top


@dataclass(frozen=True)
class ActivationSpec:
    """How the chip represents activations between layers."""

    bits: int
    symmetric: bool
    power_of_two: bool
    signedness: str

    def qrange(self, signed: bool) -> tuple[int, int]:
        """Full range (qmin, qmax) of a signed or unsigned grid of ``bits``."""
        if signed:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def grid_signed(self, nonnegative: bool) -> bool:
        """Whether a tensor gets a signed grid, given whether it is known to be >= 0.

        ``auto`` spends the sign bit only on tensors that can be negative, which
        doubles the resolution after a ReLU.
        """
        if self.signedness == "signed":
            return True
        if self.signedness == "unsigned":
            return False
        return not nonnegative


@dataclass(frozen=True)
class Profile:
    """Everything the quantization pipeline may assume about one chip."""

    name: str
    description: str
    native_target: str
    weights: WeightSpec
    activations: ActivationSpec
    bias_bits: int
    fusing: tuple[str, ...]
    first_layer_weight_bits: int | None
    last_layer_weight_bits: int | None
    source: str
    #: the chip's memory for weights and activations, in bytes (None: not stated); weights that
    #: cannot fit in it are refused before any work, and the report shows the margin
    memory_bytes: int | None = None

    def with_weight_bits(self, bits: int) -> Profile:
        """Copy with ``weights.bits`` set, refusing widths the chip cannot run."""
        if (
            isinstance(bits, bool)
            or not isinstance(bits, int)
            or bits not in self.weights.allowed_bits
        ):
            raise ProfileError(
                f"profile '{self.name}' ({self.source}) does not support {show_value(bits)}-bit weights; "
                f"allowed weight bits: {_bits_text(self.weights.allowed_bits)}"
            )
        return replace(self, weights=replace(self.weights, bits=bits))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict in the YAML layout, plus ``source``.

        ``weights.default_bits`` holds the width chosen for this run, so that
        ``profile_from_dict(p.to_dict()) == p`` and a bundle manifest loads back
        to the profile it was built with.
        """
        w, a = self.weights, self.activations
        return {
            "name": self.name,
            "description": self.description,
            "native_target": self.native_target,
            "weights": {
                "default_bits": w.bits,
                "allowed_bits": list(w.allowed_bits),
                "per_channel": w.per_channel,
                "symmetric": w.symmetric,
                "power_of_two": w.power_of_two,
                "range": "narrow" if w.narrow_range else "full",
            },
            "activations": {
                "bits": a.bits,
                "symmetric": a.symmetric,
                "power_of_two": a.power_of_two,
                "signedness": a.signedness,
            },
            "bias_bits": self.bias_bits,
            "fusing": list(self.fusing),
            "first_layer_weight_bits": self.first_layer_weight_bits,
            "last_layer_weight_bits": self.last_layer_weight_bits,
            "memory_bytes": self.memory_bytes,
            "source": self.source,
        }


# ---------------------------------------------------------------------------
# field checkers: each returns the normalized value or raises a ProfileError

Checker = Callable[[str, str, Any], Any]


@dataclass(frozen=True)
class _Field:
    check: Checker
    hint: str  # the allowed values, as shown to the user


def _bad(where: str, field: str, value: object, hint: str) -> ProfileError:
    return fail(where, f"field '{field}' is {show_value(value)} ({_kind(value)}); allowed: {hint}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bool_field() -> _Field:
    hint = "true or false (an unquoted YAML bool)"

    def check(where: str, field: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise _bad(where, field, value, hint)
        return value

    return _Field(check, hint)


def _int_field(lo: int, hi: int, hint: str | None = None) -> _Field:
    hint = hint or f"an integer from {lo} to {hi}"

    def check(where: str, field: str, value: Any) -> int:
        if not _is_int(value) or not lo <= value <= hi:
            raise _bad(where, field, value, hint)
        return int(value)

    return _Field(check, hint)


def _choice_field(choices: tuple[Any, ...], hint: str | None = None) -> _Field:
    shown = hint or " or ".join(str(c) for c in choices)

    def check(where: str, field: str, value: Any) -> Any:
        # bools are ints in Python; `true` must not pass for bias_bits: 1
        if isinstance(value, bool) or value not in choices or type(value) is not type(choices[0]):
            raise _bad(where, field, value, shown)
        return value

    return _Field(check, shown)


def _text_field(pattern: re.Pattern[str] | None, hint: str) -> _Field:
    def check(where: str, field: str, value: Any) -> str:
        if not isinstance(value, str):
            raise _bad(where, field, value, hint)
        text = value.strip()
        if not text or "\n" in text or "\r" in text:
            raise _bad(where, field, value, hint)
        if pattern is not None and not pattern.fullmatch(text):
            raise _bad(where, field, value, hint)
        return text

    return _Field(check, hint)


def _allowed_bits_field() -> _Field:
    lo, hi = WEIGHT_BITS_RANGE
    hint = f"a non-empty list of distinct integers from {lo} to {hi}, e.g. [8, 4]"

    def check(where: str, field: str, value: Any) -> tuple[int, ...]:
        if not isinstance(value, list | tuple) or not value:
            raise _bad(where, field, value, hint)
        for item in value:
            if not _is_int(item) or not lo <= item <= hi:
                raise fail(
                    where,
                    f"field '{field}' contains {show_value(item)} ({_kind(item)}); allowed: {hint}",
                )
        if len(set(value)) != len(value):
            raise fail(
                where,
                f"field '{field}' lists a bit width twice ({show_value(list(value))}); allowed: {hint}",
            )
        return tuple(int(v) for v in value)

    return _Field(check, hint)


def _fusing_field() -> _Field:
    hint = "a list drawn from " + ", ".join(FUSING_PATTERNS) + " (may be empty)"

    def check(where: str, field: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list | tuple):
            raise _bad(where, field, value, hint)
        for item in value:
            if not isinstance(item, str) or item not in FUSING_PATTERNS:
                guess = ";"
                if isinstance(item, str):
                    close = difflib.get_close_matches(item, FUSING_PATTERNS, n=1)
                    guess = f"; did you mean '{close[0]}'?" if close else ";"
                raise fail(
                    where,
                    f"field '{field}' has unknown fusing pattern {show_value(item)}{guess} "
                    f"allowed: {', '.join(FUSING_PATTERNS)}",
                )
        if len(set(value)) != len(value):
            raise fail(
                where,
                f"field '{field}' lists a pattern twice ({show_value(list(value))}); allowed: {hint}",
            )
        return tuple(value)

    return _Field(check, hint)


def _layer_bits_field() -> _Field:
    lo, hi = WEIGHT_BITS_RANGE
    hint = f"null (same as weights) or an integer from {lo} to {hi} listed in weights.allowed_bits"

    def check(where: str, field: str, value: Any) -> int | None:
        if value is None:
            return None
        if not _is_int(value) or not lo <= value <= hi:
            raise _bad(where, field, value, hint)
        return int(value)

    return _Field(check, hint)


MEMORY_HINT = "null (not stated) or the chip's memory in bytes, a positive integer such as 8388480"


def _memory_bytes(where: str, field: str, value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise _bad(where, field, value, MEMORY_HINT)
    return int(value)


_WEIGHT_FIELDS: dict[str, _Field] = {
    "default_bits": _int_field(
        *WEIGHT_BITS_RANGE, "an integer from 2 to 8 that is listed in weights.allowed_bits"
    ),
    "allowed_bits": _allowed_bits_field(),
    "per_channel": _bool_field(),
    "symmetric": _bool_field(),
    "power_of_two": _bool_field(),
    "range": _choice_field(WEIGHT_RANGES),
}

_ACTIVATION_FIELDS: dict[str, _Field] = {
    "bits": _int_field(*ACTIVATION_BITS_RANGE),
    "symmetric": _bool_field(),
    "power_of_two": _bool_field(),
    "signedness": _choice_field(SIGNEDNESS, "auto, signed or unsigned"),
}

_SECTIONS: dict[str, dict[str, _Field]] = {
    "weights": _WEIGHT_FIELDS,
    "activations": _ACTIVATION_FIELDS,
}

_TOP_FIELDS: dict[str, _Field] = {
    "name": _text_field(_NAME_RE, "a name of letters, digits, '-' and '_' equal to the file name"),
    "description": _text_field(None, "a non-empty one-line text"),
    "native_target": _text_field(
        _TARGET_RE, "an export target name such as tflite-int8, onnx-qdq or openvino-ir"
    ),
    "weights": _Field(lambda w, f, v: v, "a mapping of " + ", ".join(_WEIGHT_FIELDS)),
    "activations": _Field(lambda w, f, v: v, "a mapping of " + ", ".join(_ACTIVATION_FIELDS)),
    "bias_bits": _choice_field(BIAS_BITS, "16 or 32"),
    "fusing": _fusing_field(),
    "first_layer_weight_bits": _layer_bits_field(),
    "last_layer_weight_bits": _layer_bits_field(),
    "memory_bytes": _Field(_memory_bytes, MEMORY_HINT),
}
#: fields a complete profile may leave out, with the value they then take
OPTIONAL_FIELDS: dict[str, Any] = {"memory_bytes": None}

EXTENDS_HINT = "a profile name or a path to a .yaml file relative to this one"
PROFILE_FIELDS: tuple[str, ...] = (*_TOP_FIELDS, "extends")
"""Top-level fields a profile file may hold."""


def _unknown(where: str, field: str, key: object, allowed: list[str]) -> ProfileError:
    name = str(key)
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
    guess = f"; did you mean '{close[0]}'?" if close else ";"
    shown = f"{field}.{name}" if field else name
    return fail(where, f"unknown field {show_value(shown)}{guess} allowed: {', '.join(allowed)}")


def _check_section(where: str, section: str, value: Any, complete: bool) -> dict[str, Any]:
    fields = _SECTIONS[section]
    if not isinstance(value, Mapping):
        raise _bad(where, section, value, _TOP_FIELDS[section].hint)
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key not in fields:
            raise _unknown(where, section, key, list(fields))
        out[key] = fields[key].check(where, f"{section}.{key}", item)
    if complete:
        for key, spec in fields.items():
            if key not in out:
                raise _missing(where, f"{section}.{key}", spec.hint)
    return out


def _missing(where: str, field: str, hint: str) -> ProfileError:
    return fail(
        where, f"missing field '{field}'; add it (allowed: {hint}) or inherit it with 'extends'"
    )


def check_fields(
    data: object,
    where: str,
    *,
    complete: bool,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Check the fields present in ``data``; with ``complete`` also require all of them.

    ``extra`` names top-level keys the caller handles itself (``extends``,
    ``source``); they pass through unchecked.  Returns the normalized fields.
    """
    if not isinstance(data, Mapping):
        raise fail(
            where,
            f"a profile must be a mapping of fields ({', '.join(_TOP_FIELDS)}), got {_kind(data)}",
        )
    out: dict[str, Any] = {}
    allowed = [*_TOP_FIELDS, *extra]
    for key, value in data.items():
        if key in extra:
            continue
        if key not in _TOP_FIELDS:
            raise _unknown(where, "", key, allowed)
        if key in _SECTIONS:
            out[key] = _check_section(where, key, value, complete)
        else:
            out[key] = _TOP_FIELDS[key].check(where, key, value)
    if complete:
        for key, spec in _TOP_FIELDS.items():
            if key not in out and key in OPTIONAL_FIELDS:
                out[key] = OPTIONAL_FIELDS[key]
            elif key not in out:
                raise _missing(where, key, spec.hint)
    return out


def build_profile(data: object, where: str, source: str) -> Profile:
    """Validate a complete, already merged profile mapping and build the Profile."""
    f = check_fields(data, where, complete=True)
    w, a = f["weights"], f["activations"]
    allowed = w["allowed_bits"]
    if w["default_bits"] not in allowed:
        raise fail(
            where,
            f"field 'weights.default_bits' is {w['default_bits']} but weights.allowed_bits is "
            f"[{_bits_text(allowed)}]; allowed: one of {_bits_text(allowed)}, or add it to allowed_bits",
        )
    for key in ("first_layer_weight_bits", "last_layer_weight_bits"):
        bits = f[key]
        if bits is not None and bits not in allowed:
            raise fail(
                where,
                f"field '{key}' is {bits} but weights.allowed_bits is [{_bits_text(allowed)}]; "
                f"allowed: null or one of {_bits_text(allowed)}",
            )
    for section in ("weights", "activations"):
        sec = f[section]
        if sec["power_of_two"] and not sec["symmetric"]:
            raise fail(
                where,
                f"field '{section}.power_of_two' is true but {section}.symmetric is false; "
                f"power-of-two {section[:-1]} scales need symmetric: true "
                f"(set {section}.symmetric: true or {section}.power_of_two: false)",
            )
    if a["symmetric"] and a["signedness"] == "unsigned":
        raise fail(
            where,
            "field 'activations.signedness' is unsigned but activations.symmetric is true; "
            "a zero point of 0 on an unsigned grid cannot hold negative values "
            "(use signedness: auto or signed, or symmetric: false)",
        )
    return Profile(
        name=f["name"],
        description=f["description"],
        native_target=f["native_target"],
        weights=WeightSpec(
            bits=w["default_bits"],
            allowed_bits=allowed,
            per_channel=w["per_channel"],
            symmetric=w["symmetric"],
            power_of_two=w["power_of_two"],
            narrow_range=w["range"] == "narrow",
        ),
        activations=ActivationSpec(
            bits=a["bits"],
            symmetric=a["symmetric"],
            power_of_two=a["power_of_two"],
            signedness=a["signedness"],
        ),
        bias_bits=f["bias_bits"],
        fusing=f["fusing"],
        first_layer_weight_bits=f["first_layer_weight_bits"],
        last_layer_weight_bits=f["last_layer_weight_bits"],
        source=source,
        memory_bytes=f["memory_bytes"],
    )


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Child-over-parent merge: nested mappings key by key, anything else replaced."""
    out = dict(base)
    for key, value in override.items():
        old = out.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            out[key] = deep_merge(old, value)
        else:
            out[key] = value
    return out


__all__ = [
    "ACTIVATION_BITS_RANGE",
    "BIAS_BITS",
    "FUSING_PATTERNS",
    "PROFILE_FIELDS",
    "SIGNEDNESS",
    "WEIGHT_BITS_RANGE",
    "WEIGHT_RANGES",
    "ActivationSpec",
    "Profile",
    "WeightSpec",
    "build_profile",
    "check_fields",
    "deep_merge",
    "fail",
    "show_value",
]
