"""Keras .h5 and .keras files into the canonical float graph, through TensorFlow (optional extra).

Keras files are read by Keras itself, which knows every layer's semantics, and converted by
TensorFlow's own TFLite converter to a float flatbuffer (no quantization, no optimizations)
that the TFLite reader turns into the NCHW canonical graph: one reader of TensorFlow ops,
not two. Nothing in the file is run: its layer list is checked before Keras sees it, and a
Lambda layer (Python bytecode) or a custom class is refused by name; Keras then loads in safe
mode. Legacy Keras 2 .h5 files (MLPerf Tiny's among them) go through tf-keras, which Keras 3
cannot always load (DepthwiseConv2D configs with ``groups``, for one).

The check against the source runs the Keras model itself for the output, and the converted
flatbuffer on the TFLite interpreter for the tensors inside, so a misread op is still named.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelError
from .read_tflite import read_bytes
from .readers import SourceGraph, close_to, resolve_input_shape

INSTALL = 'pip install "eptq-deploy[keras]"'
#: layers that hold Python code or call TensorFlow functions by name: never deserialised
CODE_LAYERS = ("Lambda", "TFOpLambda", "SlicingOpLambda", "TensorFlowOpLayer")
MODEL_CLASSES = ("Functional", "Sequential", "Model")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """TensorFlow, Keras and the converter write to the process's stdout and stderr from C++ as
    well as Python: both are muted (at the file-descriptor level) only while they run."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved, devnull = [], os.open(os.devnull, os.O_WRONLY)
    loggers = [logging.getLogger(n) for n in ("tensorflow", "absl", "keras")]
    levels = [lg.level for lg in loggers]
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                saved.append((fd, os.dup(fd)))
                os.dup2(devnull, fd)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def load_tensorflow() -> Any:
    """TensorFlow, imported on first use (seconds, and noisy), on the CPU only."""
    unset = "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    if unset:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    with contextlib.suppress(ImportError):  # torch's triton loaded after TensorFlow crashes the process (segfault,
        import triton  # noqa: F401  measured with tensorflow 2.21 and torch 2.14's triton); before it, both work
    try:
        with _quiet():
            import tensorflow as tf
    except ImportError:
        raise ModelError(f"reading Keras models needs TensorFlow: {INSTALL}") from None
    finally:
        if unset:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
    with contextlib.suppress(RuntimeError, ValueError):  # already initialised: the devices stay as they are
        tf.config.set_visible_devices([], "GPU")
    return tf


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _h5_config(path: Path) -> tuple[Any, str]:
    """The model config and Keras version an .h5 file states (read with h5py, nothing built)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            config, version = f.attrs.get("model_config"), f.attrs.get("keras_version", "")
    except (OSError, ValueError) as e:
        raise ModelError(f"{path} is not a readable HDF5 file ({_one_line(e, 80)}); the file is truncated or not "
                         "a Keras .h5 model") from None
    if config is None:
        raise ModelError(f"{path} holds no model config (weights only?); save the whole model with model.save()")
    try:
        return json.loads(_text(config)), _text(version)
    except ValueError:
        raise ModelError(f"{path}'s model config is not JSON; the file is malformed") from None


def _keras_config(path: Path) -> Any:
    """The model config of a .keras archive (a zip with config.json), read without loading anything."""
    try:
        with zipfile.ZipFile(path) as z:
            if "config.json" not in z.namelist():
                raise ModelError(f"{path} is a zip without config.json, not a Keras model archive; save the model "
                                 "with model.save('model.keras')")
            return json.loads(z.read("config.json"))
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ModelError(f"{path} is not a Keras model archive ({_one_line(e, 80)}); the file is truncated or "
                         "not a .keras file") from None
    except ValueError:
        raise ModelError(f"{path}'s config.json is not JSON; the file is malformed") from None


def _check_layers(config: Any, layers_module: Any, where: Path) -> None:
    """Refuse, by layer name, anything Keras would build from code: Lambda layers and classes that
    are not built-in Keras layers (custom objects)."""
    if isinstance(config, list):  # Sequential models of old Keras: the layer list itself
        config = {"class_name": "Sequential", "config": {"layers": config}}
    if not isinstance(config, dict) or config.get("class_name") not in MODEL_CLASSES:
        what = config.get("class_name") if isinstance(config, dict) else type(config).__name__
        raise ModelError(f"{where} holds a {what}, not a Keras Functional or Sequential model; save the model "
                         "itself with model.save()")
    inner = config.get("config")
    layers = inner if isinstance(inner, list) else (inner or {}).get("layers", [])
    for layer in layers:
        if not isinstance(layer, dict):
            raise ModelError(f"{where}'s model config lists a layer that is not an object; the file is malformed")
        cls = str(layer.get("class_name"))
        name = layer.get("name") or (layer.get("config") or {}).get("name") or "?"
        module, registered = str(layer.get("module") or "keras"), str(layer.get("registered_name") or "")
        if cls in CODE_LAYERS:
            raise ModelError(f"{where}: layer {name!r} is a {cls} layer (code stored in the file, which "
                             "eptq-deploy never runs); replace it with built-in Keras layers and save again")
        if cls in MODEL_CLASSES:
            _check_layers(layer, layers_module, where)
            continue
        builtin = isinstance(getattr(layers_module, cls, None), type)
        if not builtin or ">" in registered or not (module == "keras" or module.startswith("keras.")):
            raise ModelError(f"{where}: layer {name!r} is of class {cls!r}, not a built-in Keras layer (custom code, "
                             "which eptq-deploy never loads); replace it with built-in Keras layers and save again")


def _load(path: Path) -> tuple[Any, Any]:
    """The Keras model in ``path`` (its layer list checked first, loaded in safe mode), and the Keras
    that loaded it."""
    if path.suffix.lower() == ".keras":
        config, legacy = _keras_config(path), False
    else:
        config, version = _h5_config(path)
        legacy = not version.startswith("3.")  # Keras 2 files: tf-keras reads them as they were written
    if legacy:
        try:
            with _quiet():
                import tf_keras as keras
        except ImportError:
            raise ModelError(f"reading Keras 2 .h5 files needs tf-keras: {INSTALL}") from None
    else:
        import keras

        if keras.backend.backend() != "tensorflow":
            raise ModelError(f"Keras runs on the {keras.backend.backend()} backend; set KERAS_BACKEND=tensorflow "
                             "to read Keras files")
    _check_layers(config, keras.layers, path)
    try:
        with _quiet():
            return keras, keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as e:
        raise ModelError(f"Keras cannot load {path} ({_one_line(e)}); check it is a complete model saved with "
                         "model.save()") from None


def _io_shape(model: Any, where: Path, given: Sequence[int] | None) -> tuple[int, int, int]:
    """The (H, W, C) the graph is read at: the input's own, ``given`` for its dynamic sizes; models
    the canonical graph cannot hold (several inputs or outputs, no image input) refused."""
    try:
        inputs, outputs = list(model.inputs), list(model.outputs)
    except (AttributeError, ValueError):
        raise ModelError(f"{where} has no defined input; build the model on keras.Input(shape) before saving") from None
    if len(inputs) != 1 or not outputs:
        raise ModelError(f"{where} has {len(inputs)} inputs and {len(outputs)} outputs; eptq-deploy reads "
                         "single-input models with at least one output")
    shape = tuple(None if d is None else int(d) for d in inputs[0].shape)
    if len(shape) != 4:
        raise ModelError(f"{where}'s input has shape {list(shape)}; eptq-deploy reads one image input "
                         "(batch, height, width, channels)")
    return resolve_input_shape(shape[1:], given, str(where), "H,W,C")  # type: ignore[return-value]


def _convert(tf: Any, keras: Any, model: Any, hwc: tuple[int, int, int], where: Path) -> bytes:
    """TensorFlow's own float conversion: no quantization, no optimizations, built-in ops only. A
    Keras 3 model (or one with dynamic sizes) is wrapped at batch 1 and the read size first: with a
    free batch a Keras 3 Flatten becomes SHAPE/PACK arithmetic instead of one static reshape
    (tf-keras reshapes statically already, and at batch 1 the converter would fold that reshape
    into a FULLY_CONNECTED on a 4-D input)."""
    try:
        with _quiet():
            declared = tuple(model.inputs[0].shape[1:])
            if keras.__name__ != "tf_keras" or declared != hwc:
                x = keras.Input(batch_shape=(1, *hwc), dtype=model.inputs[0].dtype)
                model = keras.Model(x, model(x))
            converter = tf.lite.TFLiteConverter.from_keras_model(model)
            converter.optimizations = []
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            return bytes(converter.convert())
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "error:" in ln] or [str(e)]
        raise ModelError(f"TensorFlow cannot convert {where} to TFLite ({_one_line(lines[0])}); the model uses "
                         "an op without a TFLite builtin") from None


def _keras_outputs(tf: Any, model: Any, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The Keras model's outputs on ``x`` (NCHW), as (name, value) in the order the model returns
    them (a dict output keeps its keys), 4-D values in NCHW."""
    with _quiet():
        y = model(tf.constant(np.ascontiguousarray(x.transpose(0, 2, 3, 1), np.float32)), training=False)
    if isinstance(y, dict):
        pairs = list(y.items())
    else:
        ys = list(y) if isinstance(y, list | tuple) else [y]
        names = list(getattr(model, "output_names", None) or [])
        names = names if len(names) == len(ys) else [f"output_{i}" for i in range(len(ys))]
        pairs = list(zip(names, ys, strict=True))
    out = []
    for name, v in pairs:
        v = np.asarray(v.numpy() if hasattr(v, "numpy") else v, np.float32)
        out.append((str(name), v.transpose(0, 3, 1, 2) if v.ndim == 4 else v))
    return out


def _match_outputs(keras_values: list[tuple[str, np.ndarray]], converted: list[np.ndarray], where: Path) -> list[int]:
    """For each Keras output, the converted flatbuffer's output that reproduces it: the converter may
    list a multi-output model's outputs in another order, so they are paired by value on a probe
    input (same shape, within float tolerance, the closest first), never by position."""
    if len(converted) != len(keras_values):
        raise ModelError(f"TensorFlow's TFLite conversion of {where} has {len(converted)} outputs, the Keras model "
                         f"{len(keras_values)}; please report it with the model")
    order: list[int] = []
    for name, theirs in keras_values:
        fits = [j for j, v in enumerate(converted) if j not in order and close_to(v, theirs)]
        if not fits:
            raise ModelError(f"no output of TensorFlow's TFLite conversion of {where} reproduces the Keras output "
                             f"{name!r}; please report it with the model")
        order.append(min(fits, key=lambda j: float(np.abs(converted[j] - theirs).max())))
    return order


def read(source: str | Path, input_shape: Sequence[int] | None = None) -> SourceGraph:
    """The canonical float graph of a Keras .h5/.keras file, and a runner of the Keras model itself;
    ``input_shape`` (H, W, C, as the file's NHWC input) sizes a dynamic input. Several outputs keep
    the Keras model's order and names."""
    path = Path(source)
    tf = load_tensorflow()
    keras, model = _load(path)
    lite = read_bytes(_convert(tf, keras, model, _io_shape(model, path, input_shape), path), str(path))
    g = lite.graph
    if len(g.outputs) > 1:
        probe = np.random.default_rng(0).standard_normal((1, *g.tensors[g.inputs[0]].shape[1:])).astype(np.float32)
        keras_values = _keras_outputs(tf, model, probe)
        order = _match_outputs(keras_values, lite.run_source(probe, list(g.outputs)), path)
        g.outputs = [g.outputs[j] for j in order]
        keys = [f"keras:{name}" for name, _ in keras_values]
    else:
        names = getattr(model, "output_names", None)
        keys = [f"keras:{names[0] if names else 'output'}"]
    key_of = dict(zip(g.outputs, keys, strict=True))

    def run_source(x: np.ndarray, wanted: list[str]) -> list[np.ndarray]:
        """The Keras outputs (``keys``) from Keras; every other name is a tensor of the converted flatbuffer
        (Keras keeps no per-op tensors to compare). Asked for both, the converter's own outputs are checked
        against Keras first, so a conversion difference is not blamed on the reader's last op."""
        theirs = dict(zip(keys, (v for _, v in _keras_outputs(tf, model, x)), strict=True)) if set(wanted) & set(keys) else {}
        inner = [w for w in wanted if w not in keys]
        if not inner:
            return [theirs[w] for w in wanted]
        values = dict(zip(inner + list(g.outputs), lite.run_source(x, inner + list(g.outputs)), strict=True))
        for out, key in key_of.items():
            if key not in wanted:
                continue
            converted = values[out]
            if converted.shape != theirs[key].shape:
                raise ModelError(f"TensorFlow's TFLite conversion of {path} gives shape {list(converted.shape)}, "
                                 f"the Keras model {list(theirs[key].shape)}; please report it with the model")
            if not close_to(converted, theirs[key]):
                raise ModelError(f"TensorFlow's TFLite conversion of {path} differs from the Keras model (max |diff| "
                                 f"{float(np.abs(converted - theirs[key]).max()):.3g}); please report it with the model")
            values[key] = theirs[key]
        return [values[w] for w in wanted]

    names = dict(lite.source_names)
    names.update(key_of)
    return SourceGraph(g, run_source, names, lite.hints)
