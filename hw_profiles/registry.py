"""Finding profiles by name or path, reading them, and resolving ``extends``.

Kept apart from :mod:`.schema` so the dataclasses and the validator carry no
file-system or plugin concerns; everything here turns some origin (a file, a
built-in, an entry point, a dict) into a merged mapping for the validator.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from eptq_deploy.errors import ProfileError

from .schema import (
    EXTENDS_HINT,
    Profile,
    build_profile,
    check_fields,
    deep_merge,
    fail,
    show_value,
)

PROFILE_ENTRY_POINT_GROUP = "eptq_deploy.hw_profiles"
"""Entry-point group third-party packages use to ship profiles."""

BUILTIN_DIR = Path(__file__).resolve().parent
_MAX_EXTENDS_DEPTH = 16
_PLUGIN_HINT = "a path to a YAML file, or a callable returning such a path or a profile dict"


@dataclass(frozen=True)
class _Origin:
    """One place a profile mapping comes from."""

    key: str  # identity, for cycle detection
    where: str  # how messages name it
    source: str  # what ends up in Profile.source
    base_dir: Path | None  # where a relative ``extends`` path starts (None: cwd)
    expected_name: str | None  # the name the profile must carry (file stem / entry point)
    read: Callable[[], object]


def _builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def _plugin_entry_points() -> list[importlib.metadata.EntryPoint]:
    """Installed plugin entry points, first one per name, built-in names excluded.

    Looked up through ``importlib.metadata.entry_points`` at call time so that
    newly installed plugins (and tests) are seen without a restart.
    """
    builtins = set(_builtin_names())
    seen: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=PROFILE_ENTRY_POINT_GROUP):
        if ep.name not in builtins and ep.name not in seen:
            seen[ep.name] = ep
    return [seen[name] for name in sorted(seen)]


def _known_names() -> list[str]:
    return sorted({*_builtin_names(), *(ep.name for ep in _plugin_entry_points())})


def _looks_like_path(ref: str) -> bool:
    seps = {os.sep, "/", *([os.altsep] if os.altsep else [])}
    return any(s in ref for s in seps) or ref.lower().endswith((".yaml", ".yml"))


def _read_yaml(path: Path, where: str) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise fail(where, "the file is not UTF-8 text; save the profile as UTF-8 YAML") from None
    except OSError as exc:
        raise fail(
            where, f"cannot read the file ({exc.strerror or exc}); check the path and permissions"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.problem and exc.context and exc.context_mark is not None:
            problem += f" ({exc.context} started at line {exc.context_mark.line + 1})"
        raise fail(where, f"YAML syntax error{at}: {problem}; fix the YAML syntax there") from None
    except yaml.YAMLError as exc:
        raise fail(where, f"YAML error: {exc}; fix the YAML syntax") from None
    if data is None:
        raise fail(
            where, "the file is empty; a profile is a YAML mapping of fields (see imx500.yaml)"
        )
    return data


def _file_origin(
    path: Path,
    *,
    source: str | None = None,
    where: str | None = None,
    expected_name: str | None = None,
) -> _Origin:
    shown = where or str(path)
    if not path.exists():
        raise ProfileError(
            f"profile file not found: {path}; give an existing .yaml file "
            f"or one of the profile names: {', '.join(_known_names())}"
        )
    if not path.is_file():
        raise ProfileError(f"profile path {path} is not a file; give a .yaml file")
    resolved = path.resolve()
    return _Origin(
        key=str(resolved),
        where=shown,
        source=source or str(resolved),
        base_dir=resolved.parent,
        expected_name=expected_name or path.stem,
        read=lambda: _read_yaml(path, shown),
    )


def _plugin_origin(ep: importlib.metadata.EntryPoint) -> _Origin:
    dist = getattr(ep, "dist", None)
    label = dist.name if dist is not None else ep.value
    source = f"entry-point:{label}"
    where = f"entry-point profile '{ep.name}' ({ep.value})"
    try:
        obj: Any = ep.load()
    except Exception as exc:  # a plugin's import can fail in any way; report, never crash
        raise fail(
            where, f"cannot load the plugin ({type(exc).__name__}: {exc}); fix or uninstall {label}"
        ) from None
    if callable(obj) and not isinstance(obj, str | os.PathLike):
        try:
            obj = obj()
        except ProfileError:
            raise
        except Exception as exc:
            raise fail(
                where, f"the plugin's callable failed ({type(exc).__name__}: {exc}); fix {label}"
            ) from None
    if isinstance(obj, str | os.PathLike):
        path = Path(obj)
        if not path.is_file():
            raise fail(where, f"the plugin points to {path}, which is not a file; fix {label}")
        return _file_origin(path, source=source, expected_name=ep.name)
    if isinstance(obj, Mapping):
        return _Origin(
            key=f"entry-point:{ep.name}",
            where=where,
            source=source,
            base_dir=None,
            expected_name=ep.name,
            read=lambda: obj,
        )
    raise fail(where, f"the entry point gave a {type(obj).__name__}; allowed: {_PLUGIN_HINT}")


def _resolve(ref: str | os.PathLike[str], base_dir: Path | None) -> _Origin:
    """Lookup order: a path, then a built-in name, then an entry-point plugin."""
    if isinstance(ref, os.PathLike) or _looks_like_path(ref):
        path = Path(ref).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        return _file_origin(path)
    if ref in _builtin_names():
        return _file_origin(
            BUILTIN_DIR / f"{ref}.yaml", source="builtin", where=f"{ref}.yaml (builtin)"
        )
    for ep in _plugin_entry_points():
        if ep.name == ref:
            return _plugin_origin(ep)
    known = _known_names()
    close = difflib.get_close_matches(ref, known, n=1)
    guess = f"did you mean '{close[0]}'? " if close else ""
    raise ProfileError(
        f"unknown profile {show_value(ref)}; {guess}known profiles: {', '.join(known)} "
        "(or give a path to a .yaml file)"
    )


def _merged(
    origin: _Origin, chain: tuple[_Origin, ...], extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The origin's mapping with its ``extends`` ancestry merged underneath."""
    data = origin.read()
    check_fields(data, origin.where, complete=False, extra=("extends", *extra))
    assert isinstance(data, Mapping)  # check_fields refuses anything else
    own = {k: v for k, v in data.items() if k != "extends" and k not in extra}
    if "extends" not in data:
        return own
    ref = data["extends"]
    if not isinstance(ref, str) or not ref.strip():
        raise fail(origin.where, f"field 'extends' is {show_value(ref)}; allowed: {EXTENDS_HINT}")
    if len(chain) >= _MAX_EXTENDS_DEPTH:
        raise fail(
            origin.where,
            f"field 'extends' nests deeper than {_MAX_EXTENDS_DEPTH} profiles; flatten the chain",
        )
    try:
        parent = _resolve(ref.strip(), origin.base_dir)
    except ProfileError as exc:
        raise fail(origin.where, f"field 'extends': {exc}") from None
    seen = (*chain, origin)
    if any(o.key == parent.key for o in seen):
        loop = " -> ".join([*(o.where for o in seen), parent.where])
        raise fail(
            origin.where, f"field 'extends' forms a cycle {loop}; remove one of these extends"
        )
    base = _merged(parent, seen)
    if "name" not in own:
        if origin.expected_name is None:
            raise fail(
                origin.where,
                "missing field 'name'; a profile that extends another needs its own name",
            )
        own["name"] = origin.expected_name  # the name is never inherited
    return deep_merge(base, own)


def _load(origin: _Origin, extra: tuple[str, ...] = ()) -> Profile:
    data = _merged(origin, (), extra)
    profile = build_profile(data, origin.where, origin.source)
    if origin.expected_name is not None and profile.name != origin.expected_name:
        raise fail(
            origin.where,
            f"field 'name' is '{profile.name}' but must be '{origin.expected_name}' "
            "(the file name or entry-point name); rename one to match",
        )
    return profile


def load_profile(name_or_path: str | os.PathLike[str], weight_bits: int | None = None) -> Profile:
    """Load a profile by path, built-in name or plugin name; optionally pick weight bits."""
    if not isinstance(name_or_path, str | os.PathLike) or not str(name_or_path).strip():
        raise ProfileError(
            f"profile must be a name or a path to a .yaml file, got {show_value(name_or_path)}; "
            f"known profiles: {', '.join(_known_names())}"
        )
    ref = name_or_path.strip() if isinstance(name_or_path, str) else name_or_path
    profile = _load(_resolve(ref, None))
    if weight_bits is not None:
        profile = profile.with_weight_bits(weight_bits)
    return profile


def profile_from_dict(d: Mapping[str, Any], source: str = "dict") -> Profile:
    """Build a profile from a mapping in the YAML layout (e.g. a manifest's copy).

    A ``source`` key in the mapping (as written by :meth:`Profile.to_dict`) wins
    over the argument, so provenance survives the round trip.  ``extends`` is
    allowed; a relative path there starts from the working directory.
    """
    where = f"profile dict ({source})"
    if not isinstance(d, Mapping):
        raise fail(where, f"a profile must be a mapping of fields, got {type(d).__name__}")
    src = d.get("source", source)
    if not isinstance(src, str) or not src.strip() or "\n" in src:
        raise fail(
            where,
            f"field 'source' is {show_value(src)}; allowed: a one-line text such as builtin or a file path",
        )
    origin = _Origin(
        key="dict",
        where=f"profile dict ({src})",
        source=src,
        base_dir=None,
        expected_name=None,
        read=lambda: d,
    )
    return _load(origin, extra=("source",))


def list_profiles() -> list[tuple[str, str]]:
    """(name, description) of every built-in and plugin profile, sorted by name.

    A plugin that fails to load is still listed, with its error as description,
    so one broken package does not hide the others.
    """
    out = [(name, load_profile(name).description) for name in _builtin_names()]
    for ep in _plugin_entry_points():
        try:
            out.append((ep.name, _load(_plugin_origin(ep)).description))
        except ProfileError as exc:
            out.append((ep.name, f"(unusable plugin: {exc})"))
    return sorted(out)
