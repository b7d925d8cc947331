"""Turn a user's model spec (and optional weights file) into an eval-mode model.

One entry point, :func:`load_model`, so the CLI, the Python API and the benchmarks
accept the same spellings and fail with the same one-line errors. Weights are read
with ``weights_only=True`` unless the user opts in to unpickling, because a pickled
file can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pickle
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelError
from .readers import SourceGraph, model_file_suffixes, read_model_file
from .zoo import BUILTIN_MODELS

__all__ = ["SPEC_HELP", "load_model", "load_weights", "read_weights_file"]

SPEC_HELP = (
    "use builtin:NAME (" + ", ".join(BUILTIN_MODELS) + "), path/to/file.py:factory, "
    "package.module:factory, torchvision:NAME, a .pt2 file from torch.export.save or a model file ("
    + ", ".join(sorted(model_file_suffixes())) + ")"
)

ModelLike = nn.Module | torch.export.ExportedProgram | SourceGraph


def _one_line(exc: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception's message, with its type, for one-line errors.

    Library messages (torch's in particular) run to paragraphs of advice; the user
    needs what went wrong, and our own fix follows it.
    """
    text = str(exc).strip().splitlines()
    first = text[0].strip() if text else ""
    if len(first) > limit and ". " in first:
        first = first.split(". ", 1)[0]
    if len(first) > limit:
        first = first[: limit - 1] + "…"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _preview(keys: list[str], limit: int = 3) -> str:
    """A few keys, then how many more, so a mismatch message stays one line."""
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


# --------------------------------------------------------------------------- weights


def read_weights_file(path: str | Path, *, allow_pickle: bool = False) -> Any:
    """Read a weights file safely; only unpickle arbitrary objects when allowed."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}; check the --weights path")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        # "Unsupported global" is a real pickle of Python objects; any other
        # weights-only failure (e.g. "Unsupported operand") is bytes that are no pickle.
        if "weights only load failed" in str(exc).lower() and "unsupported global" in str(exc).lower():
            raise ModelError(
                f"{path} is a pickled Python object (e.g. a full module), not a plain state dict; "
                "pass --allow-pickle (allow_pickle=True) to load it, which runs code from the file, "
                "so only for files you trust"
            ) from exc
        raise ModelError(
            f"{path} is corrupt or not a PyTorch file (neither a torch.save archive nor a readable pickle); "
            "re-save or re-download it"
        ) from exc
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise ModelError(
            f"{path} is a pickled module whose class cannot be imported ({_one_line(exc)}); "
            "make the defining module importable or save a state dict instead"
        ) from exc
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as exc:
        raise ModelError(
            f"{path} is truncated, corrupt or not a PyTorch file ({_one_line(exc)}); "
            "re-save or re-download it"
        ) from exc


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensors in the usual checkpoint layouts: plain, state_dict, model."""
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return dict(inner.state_dict())
            if isinstance(inner, Mapping):
                obj = inner
                break
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return {k.removeprefix("module."): v for k, v in tensors.items()}
    raise ModelError(
        f"{path} holds no state dict (found {type(obj).__name__}); "
        "save it with torch.save(model.state_dict(), path)"
    )


def load_weights(model: nn.Module, path: str | Path, *, allow_pickle: bool = False) -> nn.Module:
    """Load a weights file into ``model`` strictly, naming any mismatch in one line."""
    path = Path(path)
    state = _extract_state_dict(read_weights_file(path, allow_pickle=allow_pickle), path)
    expected = model.state_dict()
    # BN step counters carry no information; files saved without them are fine.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_preview(unexpected)}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} shape mismatch(es): {_preview(wrong_shape, 2)}")
        raise ModelError(
            f"weights {path.name} do not fit the model ({'; '.join(parts)}); "
            "pass weights saved from this same architecture"
        )
    model.load_state_dict(state, strict=False)
    return model


# --------------------------------------------------------------------------- spec kinds


def _load_builtin(name: str, weights: str | None, allow_pickle: bool) -> tuple[nn.Module, dict]:
    """A built-in architecture with its default (or the given) weights."""
    entry = BUILTIN_MODELS.get(name)
    if entry is None:
        raise ModelError(f"unknown built-in model {name!r}; use one of {', '.join(BUILTIN_MODELS)}")
    model = entry.factory()
    path = Path(weights) if weights else entry.default_weights()
    if path is not None:
        load_weights(model, path, allow_pickle=allow_pickle)
    elif name.startswith("resnet"):
        raise ModelError(
            f"no weights for {name}: the shared benchmark data was not found; "
            "set EPTQ_DATA_DIR to it or pass --weights FILE"
        )
    hints = {"input_shape": entry.input_shape, "preset": entry.preset, "name": name,
             "weights": f"from {path.name}" if path is not None else "pretrained (built in)"}
    if entry.classes is not None:
        hints["classes"] = entry.classes()
    return model, hints


def _load_torchvision(name: str, weights: str | None, allow_pickle: bool, seed: int) -> tuple[nn.Module, dict]:
    """A torchvision architecture; never downloads, weights come from the user (else random, seeded)."""
    import torchvision

    torch.manual_seed(seed)  # random weights: the same seed, the same model
    try:
        model = torchvision.models.get_model(name, weights=None)
    except (ValueError, KeyError) as exc:
        raise ModelError(
            f"torchvision has no model {name!r}; see torchvision.models.list_models() for names"
        ) from exc
    if weights:
        load_weights(model, weights, allow_pickle=allow_pickle)
        origin = f"from {Path(weights).name}"
    else:
        origin = f"random weights (seed {seed})"
        warnings.warn(
            f"torchvision:{name} has {origin}: nothing is downloaded; "
            "pass --weights FILE for meaningful accuracy",
            stacklevel=3,
        )
    side = 299 if name == "inception_v3" else 224
    return model, {"input_shape": (3, side, side), "preset": "imagenet", "name": name, "weights": origin}


def _import_factory_module(target: str) -> Any:
    """Import a module from a file path or a dotted name, naming the failure in one line."""
    path = Path(target)
    if target.endswith(".py") or path.is_file():
        if not path.is_file():
            raise ModelError(f"model file not found: {target}; check the path before ':'")
        resolved = path.resolve()
        digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
        mod_name = f"eptq_user_{resolved.stem}_{digest}"
        spec = importlib.util.spec_from_file_location(mod_name, resolved)
        if spec is None or spec.loader is None:
            raise ModelError(f"cannot import {target} as Python; give a .py file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        # Let the file import its siblings, as it would when run as a script.
        parent = str(resolved.parent)
        added = parent not in sys.path
        if added:
            sys.path.insert(0, parent)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise ModelError(
                f"importing {target} failed ({_one_line(exc)}); fix the file or its imports"
            ) from exc
        finally:
            if added:
                sys.path.remove(parent)
        return module
    try:
        return importlib.import_module(target)
    except Exception as exc:
        raise ModelError(
            f"cannot import module {target!r} ({_one_line(exc)}); "
            "install it, or give a path/to/file.py:factory instead"
        ) from exc


def _load_factory(spec: str, weights: str | None, allow_pickle: bool, seed: int) -> tuple[nn.Module, dict]:
    """``file.py:factory`` or ``package.module:factory``: call it, then load weights."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ModelError(f"bad model spec {spec!r}; {SPEC_HELP}")
    module = _import_factory_module(target)
    factory = getattr(module, attr, None)
    if factory is None:
        raise ModelError(f"{target} has no attribute {attr!r}; name a function defined in it")
    if not callable(factory):
        raise ModelError(f"{target}:{attr} is not callable; name a function returning an nn.Module")
    torch.manual_seed(seed)  # a factory that initialises randomly gives the same model for the same seed
    try:
        model = factory()
    except Exception as exc:
        raise ModelError(
            f"{target}:{attr}() failed ({_one_line(exc)}); it must build the model with no arguments"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"{target}:{attr}() returned {type(model).__name__}, not an nn.Module; return the model"
        )
    if weights:
        load_weights(model, weights, allow_pickle=allow_pickle)
    hints: dict[str, Any] = {"name": attr, "weights": f"from {Path(weights).name}" if weights
                             else f"as {attr}() builds them (torch seeded with {seed} first)"}
    for key, hint in (("INPUT_SHAPE", "input_shape"), ("PRESET", "preset")):
        if hasattr(module, key):
            hints[hint] = getattr(module, key)
    return model, hints


def _load_exported(path: Path, weights: str | None) -> tuple[torch.export.ExportedProgram, dict]:
    """A program saved by ``torch.export.save``; it carries its own weights."""
    if weights:
        raise ModelError(f"{path} already holds its weights; drop --weights for a .pt2 file")
    if not path.is_file():
        raise ModelError(f"exported program not found: {path}; check the path")
    try:
        program = torch.export.load(path)
    except Exception as exc:
        raise ModelError(
            f"cannot load exported program {path} ({_one_line(exc)}); "
            "re-save it with torch.export.save from this torch version"
        ) from exc
    hints: dict[str, Any] = {"name": path.stem}
    shape = _first_input_shape(program)
    if shape is not None:
        hints["input_shape"] = shape
    return program, hints


def _first_input_shape(program: torch.export.ExportedProgram) -> tuple[int, ...] | None:
    """The static (C, H, W) of the first user input, when the program has one."""
    try:
        name = program.graph_signature.user_inputs[0]
        for node in program.graph.nodes:
            if node.op == "placeholder" and node.name == name:
                shape = tuple(int(d) for d in node.meta["val"].shape)
                return shape[1:] if len(shape) == 4 else None
    except (IndexError, KeyError, TypeError, AttributeError):
        return None
    return None


def _load_pickled_file(path: Path, allow_pickle: bool) -> tuple[nn.Module, dict]:
    """A whole pickled module given as the spec itself (needs ``allow_pickle``)."""
    if not path.is_file():
        raise ModelError(f"model file not found: {path}; check the path")
    obj = read_weights_file(path, allow_pickle=allow_pickle)
    if isinstance(obj, nn.Module):
        return obj, {"name": path.stem}
    raise ModelError(
        f"{path} holds only weights, not an architecture; give the architecture as the model "
        "spec and this file as --weights"
    )


def load_model(
    spec: str, weights: str | None = None, *, allow_pickle: bool = False, seed: int = 0,
    input_shape: tuple[int, ...] | None = None,
) -> tuple[ModelLike, dict]:
    """Load a model from a spec string; returns (eval-mode model, hints).

    Hints may hold ``input_shape`` (C, H, W), ``preset`` (a data preset name), ``name``,
    ``weights`` (where the weights came from) and ``classes`` (class names); callers use
    them as defaults the user can override. ``input_shape`` sizes a model file's dynamic
    input (``readers.resolve_input_shape``). Architectures built without weights
    (``torchvision:NAME``, factories) are built under ``torch.manual_seed(seed)``.
    """
    spec = spec.strip()
    if not spec:
        raise ModelError(f"empty model spec; {SPEC_HELP}")
    weights = str(weights) if weights else None
    model: ModelLike
    if spec.endswith(".pt2"):
        return _load_exported(Path(spec), weights)
    if Path(spec).suffix.lower() in model_file_suffixes():
        if weights:
            raise ModelError(f"{spec} already holds its weights; drop --weights for a model file")
        src = read_model_file(Path(spec), input_shape)
        return src, dict(src.hints)
    if input_shape is not None:
        raise ModelError(f"--input-shape sizes a model file's dynamic input; {spec} is not one (drop it: PyTorch "
                         "models take the data's shape)")
    if spec.startswith("builtin:"):
        model, hints = _load_builtin(spec.removeprefix("builtin:"), weights, allow_pickle)
    elif spec in BUILTIN_MODELS:
        model, hints = _load_builtin(spec, weights, allow_pickle)
    elif spec.startswith("torchvision:"):
        model, hints = _load_torchvision(spec.removeprefix("torchvision:"), weights, allow_pickle, seed)
    elif Path(spec).suffix in {".pt", ".pth", ".th", ".bin"} and ":" not in Path(spec).name:
        if weights:
            raise ModelError(f"{spec} is a weights file, not an architecture; {SPEC_HELP}")
        model, hints = _load_pickled_file(Path(spec), allow_pickle)
    elif ":" in spec:
        model, hints = _load_factory(spec, weights, allow_pickle, seed)
    else:
        raise ModelError(f"cannot tell what model {spec!r} is; {SPEC_HELP}")
    return model.eval(), hints
