"""Keras reader: tiny models built here read from .h5 and .keras and match Keras itself;
Lambda layers and custom classes are refused unrun; bad files fail in one line; the MLPerf
Tiny Keras 2 files match TensorFlow when the shared data is there."""

from __future__ import annotations

import sys
import zipfile
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

if find_spec("tensorflow") is None:
    pytest.skip("reading Keras files needs the keras extra (TensorFlow)", allow_module_level=True)

from eptq_deploy.read_keras import load_tensorflow  # noqa: E402

load_tensorflow()  # as the reader loads it (after torch's triton, which crashes when loaded after TensorFlow)

import keras  # noqa: E402  (after the skip: keras comes with the extra)

import eptq_deploy  # noqa: E402
from eptq_deploy.errors import ModelError  # noqa: E402
from eptq_deploy.float_exec import run_float, unpack  # noqa: E402
from eptq_deploy.model_io import SourceRunner  # noqa: E402
from eptq_deploy.readers import check_against_source, read_source  # noqa: E402
from eptq_deploy.targets import get_target  # noqa: E402
from eptq_deploy.zoo import shared_data_dir  # noqa: E402

L = keras.layers
DATA = shared_data_dir()


def _randomize(model: keras.Model, seed: int = 0) -> keras.Model:
    """Weights away from their initial values (BatchNorm's 1/0 statistics would hide a misread fold)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
    return model


def features() -> keras.Model:
    i = keras.Input((16, 16, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same")(i)))
    x = L.DepthwiseConv2D(3, strides=2, padding="same", activation="relu6")(x)
    x = L.AveragePooling2D(2)(L.MaxPooling2D(2, padding="same")(L.Conv2D(6, 1)(x)))
    x = L.Softmax()(L.Dense(5)(L.Flatten()(x)))
    return _randomize(keras.Model(i, x))


def residual() -> keras.Model:
    i = keras.Input((12, 12, 4))
    y = L.BatchNormalization()(L.Conv2D(4, 3, padding="same", use_bias=False)(i))
    x = L.Activation("relu")(L.Add()([i, y]))
    x = L.Dense(3)(L.GlobalAveragePooling2D()(x))
    return _randomize(keras.Model(i, x))


def upsampled() -> keras.Model:
    """Keras 3 writes a nearest UpSampling2D as RESHAPE -> TILE -> RESHAPE per axis: read as one resize."""
    i = keras.Input((6, 5, 3))
    x = L.Conv2D(4, 3, padding="same")(i)
    return keras.Model(i, L.Conv2D(2, 1)(L.Concatenate()([L.UpSampling2D((2, 3))(x), L.UpSampling2D((2, 3))(i)])))


def concatenated() -> keras.Model:
    i = keras.Input((10, 10, 3))
    a, b = L.Conv2D(4, 1, activation="relu")(i), L.Conv2D(2, 3, padding="same")(i)
    x = L.Conv2D(5, 3, strides=2)(L.Concatenate()([a, b]))
    return keras.Model(i, L.Dense(2)(L.Flatten()(x)))


def _save(model: keras.Model, path: Path) -> Path:
    model.save(path)
    return path


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
@pytest.mark.parametrize("build", [features, residual, concatenated, upsampled])
def test_tiny_models_read_and_match_keras(build: Callable[[], keras.Model], suffix: str, tmp_path: Path) -> None:
    model = build()
    src = read_source(_save(model, tmp_path / f"{build.__name__}{suffix}"))
    assert src.graph.meta["source_layout"] == "NHWC"
    assert src.hints["input_shape"] == (model.input_shape[3], *model.input_shape[1:3])
    check_against_source(src, torch.randn(3, *src.hints["input_shape"]))
    if build is upsampled:  # one resize per UpSampling2D, both axes at once
        resizes = [n for n in src.graph.nodes if n.op == "resize"]
        assert len(resizes) == 2 and all(n.attrs["size"] == [12, 15] for n in resizes)


def test_keras2_h5_reads_through_tf_keras(tmp_path: Path) -> None:
    tf_keras = pytest.importorskip("tf_keras")
    K = tf_keras.layers
    i = tf_keras.Input((8, 8, 3))
    x = K.DepthwiseConv2D(3, padding="same")(K.Conv2D(4, 3)(i))
    model = tf_keras.Model(i, K.Dense(2)(K.GlobalAveragePooling2D()(K.ReLU()(x))))
    model.save(tmp_path / "old.h5")
    src = read_source(tmp_path / "old.h5")
    check_against_source(src, torch.randn(2, 3, 8, 8))


def test_a_misread_op_is_named(tmp_path: Path) -> None:
    src = read_source(_save(features(), tmp_path / "f.keras"))
    conv = next(n for n in src.graph.nodes if n.op == "conv2d")
    w = src.graph.tensors[conv.inputs[1]]
    w.data = (w.data * 1.5).astype(np.float32)
    with pytest.raises(ModelError, match=f"at conv2d {conv.name} "):
        check_against_source(src, torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_lambda_layers_are_refused_without_running_them(suffix: str, tmp_path: Path) -> None:
    marker = str(tmp_path / "ran")
    i = keras.Input((8, 8, 3))
    x = L.Lambda(lambda t: (open(marker, "w").close(), t * 2)[1], name="doubler")(i)
    path = _save(keras.Model(i, L.Conv2D(2, 1)(x)), tmp_path / f"lam{suffix}")
    Path(marker).unlink(missing_ok=True)  # building the model ran it once
    with pytest.raises(ModelError, match=r"layer 'doubler' is a Lambda layer .*replace it") as e:
        read_source(path)
    assert "\n" not in str(e.value) and not Path(marker).exists()


@keras.saving.register_keras_serializable(package="eptq_test")
class Doubler(L.Layer):
    def call(self, x):  # type: ignore[no-untyped-def]
        return x * 2


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_custom_layers_are_refused(suffix: str, tmp_path: Path) -> None:
    i = keras.Input((8, 8, 3))
    path = _save(keras.Model(i, L.Conv2D(2, 1)(Doubler(name="twice")(i))), tmp_path / f"custom{suffix}")
    with pytest.raises(ModelError, match=r"layer 'twice' is of class '(eptq_test>)?Doubler', not a built-in Keras layer"):
        read_source(path)


def _two_inputs() -> keras.Model:
    a, b = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
    return keras.Model([a, b], L.Add()([a, b]))


def _dynamic() -> keras.Model:
    i = keras.Input((None, None, 3))
    return keras.Model(i, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(4, 3)(i))))


@pytest.mark.parametrize(("build", "message"), [
    (_two_inputs, "has 2 inputs and 1 outputs; eptq-deploy reads single-input models with at least one output"),
    (_dynamic, r"has dynamic size\(s\) \(H,W,C without the batch: \?,\?,3\); pass --input-shape"),
])
def test_models_the_graph_cannot_hold_are_refused(build: Callable[[], keras.Model], message: str,
                                                  tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=message) as e:
        read_source(_save(build(), tmp_path / "m.keras"))
    assert "\n" not in str(e.value)


def test_a_dynamic_input_reads_at_the_given_size(tmp_path: Path) -> None:
    src = read_source(_save(_dynamic(), tmp_path / "dyn.keras"), input_shape=(20, 24, 3))
    assert src.hints["input_shape"] == (3, 20, 24)
    check_against_source(src, torch.randn(2, 3, 20, 24))


def test_bad_files_are_refused_in_one_line(tmp_path: Path) -> None:
    good = _save(residual(), tmp_path / "good.h5").read_bytes()
    cases = {"truncated.h5": good[:len(good) // 3], "text.h5": b"not an HDF5 file at all",
             "text.keras": b"not a zip", "empty.h5": b""}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
    with zipfile.ZipFile(tmp_path / "notes.keras", "w") as z:
        z.writestr("notes.txt", "no model here")
    expected = {"truncated.h5": "truncated", "text.h5": "not a readable HDF5 file", "empty.h5": "HDF5",
                "text.keras": "not a Keras model archive", "notes.keras": "zip without config.json"}
    for name, message in expected.items():
        with pytest.raises(ModelError, match=message) as e:
            read_source(tmp_path / name)
        assert "\n" not in str(e.value) and "Traceback" not in str(e.value), name


def test_without_tensorflow_the_fix_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow now raises ImportError
    (tmp_path / "m.h5").write_bytes(b"unused")
    with pytest.raises(ModelError) as e:
        read_source(tmp_path / "m.h5")
    assert str(e.value) == 'reading Keras models needs TensorFlow: pip install "eptq-deploy[keras]"'


MLPERF = [("resnet8_cifar10/pretrainedResnet.h5", 255.0), ("vww_mobilenetv1_96/vww_96.h5", 1.0)]


@pytest.mark.skipif(DATA is None or not (DATA / "mlperf_tiny").is_dir(), reason="MLPerf Tiny files not in EPTQ_DATA_DIR")
@pytest.mark.parametrize(("file", "scale"), MLPERF, ids=["resnet8", "vww96"])
def test_mlperf_tiny_keras_files_match_tensorflow(file: str, scale: float) -> None:
    """ResNet-8 takes 0..255 RGB, VWW x/255: random images in each one's range."""
    path = DATA / "mlperf_tiny" / file
    if not path.is_file():
        pytest.skip(f"{path} not found")
    src = read_source(path)
    torch.manual_seed(0)
    check_against_source(src, torch.rand(4, *src.hints["input_shape"]) * scale)


def _heads_model() -> keras.Model:
    i = keras.Input((12, 12, 3))
    x = L.Conv2D(6, 3, padding="same", activation="relu")(i)
    up = L.Concatenate()([L.UpSampling2D((2, 3))(L.Conv2D(4, 1, strides=(2, 3))(x)), x])
    return keras.Model(i, [_head(up, "z_boxes", 4), _head(up, "a_scores", 4),
                           L.Dense(3, name="m_class")(L.GlobalAveragePooling2D()(x))])


@pytest.mark.parametrize("target", ["onnx-qdq", "tflite-int8"])
def test_a_multi_output_keras_file_goes_through_bit_exact(target: str, tmp_path: Path) -> None:
    """Quantized and written: the runtime's raw outputs are the simulation's, and ``.run(x)`` returns the
    Keras model's outputs in its order and shapes."""
    model = _heads_model()
    path = _save(model, tmp_path / "heads.keras")
    gen = torch.Generator().manual_seed(0)
    calib, x = torch.randn(32, 12, 12, 3, generator=gen), torch.randn(4, 12, 12, 3, generator=gen)  # NHWC, as the file
    qm = eptq_deploy.quantize(path, calib, profile="int8-pot", targets=[target], method="ptq", progress=False)
    t = get_target(target)
    (tmp_path / "out").mkdir()
    t.emit(qm.graph, tmp_path / "out")
    runner = SourceRunner(t.load(tmp_path / "out"), qm.graph.meta)
    raw, sim = unpack(runner.run(x.numpy(), raw=True)), unpack(qm.simulate(x, target, raw=True))
    for r, q in zip(raw, sim, strict=True):
        np.testing.assert_array_equal(r, q.numpy())
    got = unpack(runner.run(x.numpy()))
    want = [np.asarray(v) for v in model(x.numpy())]
    assert [g.shape for g in got] == [w.shape for w in want] == [(4, 12, 12, 4), (4, 12, 12, 4), (4, 3)]


def _head(x: keras.KerasTensor, name: str, channels: int) -> keras.KerasTensor:
    return L.Conv2D(channels, 1, name=name)(x)


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_a_multi_output_model_keeps_keras_order_and_names(suffix: str, tmp_path: Path) -> None:
    """A detector-like model: two heads of the same shape (only their values tell them apart; the converter
    lists them in another order) and a third of another, upsampled (2, 3) nearest on the way."""
    model = _heads_model()
    src = read_source(_save(model, tmp_path / f"heads{suffix}"))
    g = src.graph
    assert [src.source_names[o] for o in g.outputs] == ["keras:z_boxes", "keras:a_scores", "keras:m_class"]
    x_in = torch.randn(2, 3, 12, 12)
    check_against_source(src, x_in)
    ours = unpack(run_float(g, x_in))
    theirs = model(x_in.numpy().transpose(0, 2, 3, 1))
    for o, t in zip(ours, theirs, strict=True):
        t = np.asarray(t)
        np.testing.assert_allclose(o.numpy(), t.transpose(0, 3, 1, 2) if t.ndim == 4 else t, rtol=1e-4, atol=1e-4)
