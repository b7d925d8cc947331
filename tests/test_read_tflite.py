"""The TFLite reader: float files written by the project's own writer, read back into the canonical
graph and checked against the TFLite interpreter; bad files refused in one line."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import eptq_deploy
from eptq_deploy.errors import EptqError, ModelError
from eptq_deploy.float_exec import run_float
from eptq_deploy.read_tflite import read, read_bytes
from eptq_deploy.readers import check_against_source
from eptq_deploy.targets import get_target


class Net(nn.Module):
    """NHWC traps: a depthwise conv, a channel concat, a channel pad (option-A shortcut), a
    squeeze-excitation multiply, and a fully connected layer on a flattened 2 x 2 map."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.se = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu6(self.a(x))
        y = nn.functional.hardswish(self.b(y))
        y = y * torch.sigmoid(self.se(y.mean((2, 3), keepdim=True)))
        short = nn.functional.pad(y[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        z = torch.relu(self.c(y) + short)
        p = torch.cat([nn.functional.max_pool2d(z, 2), nn.functional.avg_pool2d(z, 2)], 1)
        return self.fc(torch.flatten(nn.functional.avg_pool2d(p, 2), 1))


X = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def float_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    qm = eptq_deploy.quantize(Net().eval(), X, targets=["tflite-int8"], method="ptq", progress=False)
    folder = tmp_path_factory.mktemp("tfl")
    t = get_target("tflite-int8")
    t.emit(qm.float_graph, folder, quantized=False)
    return folder / t.float_model_file


def test_read_graph_computes_the_file_and_the_model(float_file: Path) -> None:
    src = read(float_file)
    check_against_source(src, X[:4])  # against the TFLite interpreter, tensor by tensor where it differs
    with torch.no_grad():
        np.testing.assert_allclose(run_float(src.graph, X).numpy(), Net().eval()(X).numpy(), rtol=1e-4, atol=1e-5)


def test_quantize_from_the_file_equals_quantize_from_the_module(float_file: Path) -> None:
    kw = {"profile": "tflite-int8", "targets": ["tflite-int8"], "method": "ptq", "progress": False}
    nhwc = X.permute(0, 2, 3, 1)  # a TFLite file takes its data as its users feed it: NHWC
    a, b = eptq_deploy.quantize(Net().eval(), X, **kw), eptq_deploy.quantize(float_file, nhwc, **kw)
    torch.testing.assert_close(a.simulate(X), b.simulate(nhwc), rtol=0, atol=0)


def test_bad_files_are_refused_in_one_line(float_file: Path, tmp_path: Path) -> None:
    raw = float_file.read_bytes()
    qm = eptq_deploy.quantize(Net().eval(), X, targets=["tflite-int8"], method="ptq", progress=False)
    get_target("tflite-int8").emit(qm.graph, tmp_path)  # the int8 file
    cases = {"truncated.tflite": (raw[: len(raw) // 3], "truncated or malformed|malformed"),
             "text.tflite": (b"hello, not a model\n", "not a TFLite flatbuffer"),
             "int8.tflite": ((tmp_path / "model.tflite").read_bytes(), "already quantized")}
    for name, (data, pattern) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(EptqError, match=pattern) as err:
            eptq_deploy.quantize(path, X.permute(0, 2, 3, 1), targets=["tflite-int8"], method="ptq", progress=False)
        assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="model file not found"):
        eptq_deploy.quantize(tmp_path / "missing.tflite", X, progress=False)


# ------------------------------------------------- issue 13's missing ops, in files built op by op
class _Flat:
    """A float TFLite flatbuffer written tensor by tensor with the TFLite schema (NHWC)."""

    def __init__(self, shape: tuple[int, ...] = (1, 6, 8, 3)) -> None:
        from ai_edge_litert import schema_py_generated as S

        self.S, self.m = S, S.ModelT()
        self.m.version, self.m.buffers, self.m.operatorCodes = 3, [S.BufferT()], []
        self.sg = S.SubGraphT()
        self.sg.tensors, self.sg.operators = [], []
        self.m.subgraphs = [self.sg]
        self.codes: dict[int, int] = {}
        self.x = self.tensor(shape)

    def tensor(self, shape: tuple[int, ...], data: np.ndarray | None = None) -> int:
        S = self.S
        t = S.TensorT()
        t.name, t.shape, t.buffer = f"t{len(self.sg.tensors)}".encode(), [int(s) for s in shape], 0
        t.type = S.TensorType.INT32 if data is not None and data.dtype == np.int32 else S.TensorType.FLOAT32
        if data is not None:
            b = S.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            self.m.buffers.append(b)
            t.buffer = len(self.m.buffers) - 1
        self.sg.tensors.append(t)
        return len(self.sg.tensors) - 1

    def const(self, data: object, dtype: type = np.float32) -> int:
        arr = np.asarray(data, dtype)
        return self.tensor(arr.shape, arr)

    def op(self, name: str, ins: list[int], out_shapes: list[tuple[int, ...]], options: str = "",
           **fields: object) -> list[int]:
        S = self.S
        code = getattr(S.BuiltinOperator, name)
        if code not in self.codes:
            c = S.OperatorCodeT()
            c.builtinCode, c.deprecatedBuiltinCode, c.version = code, min(code, 127), 1
            self.m.operatorCodes.append(c)
            self.codes[code] = len(self.m.operatorCodes) - 1
        outs = [self.tensor(s) for s in out_shapes]
        o = S.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = self.codes[code], ins, outs
        if options:
            opt = getattr(S, options + "T")()
            for k, v in fields.items():
                setattr(opt, k, v)
            o.builtinOptionsType, o.builtinOptions = getattr(S.BuiltinOptions, options), opt
        self.sg.operators.append(o)
        return outs

    def read(self, out: int) -> set[str]:
        """Read the file ending at ``out``, check it against the interpreter; its canonical ops."""
        import flatbuffers

        from eptq_deploy.read_tflite import read_bytes

        self.sg.inputs, self.sg.outputs = [self.x], [out]
        b = flatbuffers.Builder(1024)
        b.Finish(self.m.Pack(b), file_identifier=b"TFL3")
        src = read_bytes(bytes(b.Output()), "ops.tflite")
        n, h, w, c = self.sg.tensors[self.x].shape
        check_against_source(src, torch.randn(3, c, h, w, generator=torch.Generator().manual_seed(5)))
        return {m.op for m in src.graph.nodes}


@pytest.mark.parametrize("nearest", [False, True])
@pytest.mark.parametrize(("align", "half"), [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("size", [(12, 16), (13, 5), (3, 4)])
def test_resize_every_flag_combination_matches_the_interpreter(nearest: bool, align: bool, half: bool,
                                                              size: tuple[int, int]) -> None:
    f = _Flat()
    name, options = (("RESIZE_NEAREST_NEIGHBOR", "ResizeNearestNeighborOptions") if nearest
                     else ("RESIZE_BILINEAR", "ResizeBilinearOptions"))
    (y,) = f.op(name, [f.x, f.const(size, np.int32)], [(1, *size, 3)], options, alignCorners=align,
                halfPixelCenters=half)
    if align and half and not nearest:  # TFLite's own bilinear kernel refuses the pair
        with pytest.raises(EptqError, match="RESIZE_BILINEAR .*align_corners with half_pixel_centers"):
            f.read(y)
        return
    assert f.read(y) == {"resize"}


@pytest.mark.parametrize(("padding", "out", "bias"), [("SAME", (12, 16), True), ("SAME", (11, 15), False),
                                                      ("VALID", (13, 17), True), ("VALID", (14, 18), False)])
def test_transpose_conv_matches_the_interpreter(padding: str, out: tuple[int, int], bias: bool) -> None:
    f = _Flat()
    w = f.const(np.random.default_rng(0).normal(size=(4, 3, 3, 3)))  # OHWI
    ins = [f.const([1, *out, 4], np.int32), w, f.x] + ([f.const(np.linspace(-1, 1, 4))] if bias else [])
    (y,) = f.op("TRANSPOSE_CONV", ins, [(1, *out, 4)], "TransposeConvOptions",
                padding=getattr(f.S.Padding, padding), strideH=2, strideW=2, fusedActivationFunction=1)
    assert f.read(y) == {"conv_transpose2d"}


def test_sub_div_tanh_prelu_leaky_relu_match_the_interpreter() -> None:
    f = _Flat()
    (r,) = f.op("RELU", [f.x], [(1, 6, 8, 3)])
    (s,) = f.op("SUB", [f.x, r], [(1, 6, 8, 3)], "SubOptions", fusedActivationFunction=0)
    (g,) = f.op("LOGISTIC", [s], [(1, 6, 8, 3)])
    (d,) = f.op("DIV", [s, g], [(1, 6, 8, 3)], "DivOptions", fusedActivationFunction=0)
    (c1,) = f.op("SUB", [d, f.const([0.5, -1.0, 2.0])], [(1, 6, 8, 3)], "SubOptions")  # held: after no layer
    (c2,) = f.op("DIV", [f.const(np.full((1, 1, 8, 1), 2.0)), c1], [(1, 6, 8, 3)], "DivOptions")
    (t,) = f.op("TANH", [c2], [(1, 6, 8, 3)])
    (p,) = f.op("PRELU", [t, f.const(np.array([[[0.1, 0.2, 0.3]]]))], [(1, 6, 8, 3)])
    (p2,) = f.op("PRELU", [p, f.const([0.25])], [(1, 6, 8, 3)])
    (y,) = f.op("LEAKY_RELU", [p2], [(1, 6, 8, 3)], "LeakyReluOptions", alpha=0.2)
    assert f.read(y) == {"relu", "sub", "sigmoid", "div", "tanh", "prelu", "leaky_relu"}


def test_sub_and_div_by_a_per_channel_constant_fold_into_the_conv() -> None:
    for op, options in (("SUB", "SubOptions"), ("DIV", "DivOptions")):
        f = _Flat()
        w, b = f.const(np.random.default_rng(0).normal(size=(4, 3, 3, 3))), f.const(np.zeros(4))
        (h,) = f.op("CONV_2D", [f.x, w, b], [(1, 6, 8, 4)], "Conv2DOptions", padding=f.S.Padding.SAME, strideH=1,
                    strideW=1, dilationHFactor=1, dilationWFactor=1)
        (y,) = f.op(op, [h, f.const([1.0, 2.0, 0.5, 4.0])], [(1, 6, 8, 4)], options, fusedActivationFunction=1)
        assert f.read(y) == {"conv2d"}


def test_split_split_v_and_transpose_match_the_interpreter() -> None:
    f = _Flat()
    a, b, c = f.op("SPLIT", [f.const(3, np.int32), f.x], [(1, 6, 8, 1)] * 3, "SplitOptions", numSplits=3)
    (cat,) = f.op("CONCATENATION", [c, a, b], [(1, 6, 8, 3)], "ConcatenationOptions", axis=3)
    u, v = f.op("SPLIT_V", [cat, f.const([2, 4], np.int32), f.const(1, np.int32)], [(1, 2, 8, 3), (1, 4, 8, 3)],
                "SplitVOptions", numSplits=2)
    (cat2,) = f.op("CONCATENATION", [v, u], [(1, 6, 8, 3)], "ConcatenationOptions", axis=1)
    (t,) = f.op("TRANSPOSE", [cat2, f.const([0, 2, 1, 3], np.int32)], [(1, 8, 6, 3)])
    (t2,) = f.op("TRANSPOSE", [t, f.const([0, 3, 1, 2], np.int32)], [(1, 3, 8, 6)])  # NHWC -> NCHW, not before a flatten
    (y,) = f.op("TANH", [t2], [(1, 3, 8, 6)])
    assert f.read(y) == {"slice", "concat", "transpose", "tanh"}


_GOOD: list[bytes] = []  # the float file's bytes, made once for the property test below


def _good_bytes() -> bytes:
    if not _GOOD:
        qm = eptq_deploy.quantize(Net().eval(), X, targets=["tflite-int8"], method="ptq", progress=False)
        with tempfile.TemporaryDirectory() as d:
            t = get_target("tflite-int8")
            t.emit(qm.float_graph, Path(d), quantized=False)
            _GOOD.append((Path(d) / t.float_model_file).read_bytes())
    return _GOOD[0]


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_corrupted_files_end_in_one_line_errors(data: st.DataObject) -> None:
    """Changed or truncated bytes of a valid float file: read and checked against the interpreter, or
    one of the project's one-line errors, never a library's traceback (the flatbuffer's offsets and
    shapes are untrusted: a changed shape field once reached torch as a 59 GB allocation)."""
    raw = bytearray(_good_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(1, len(raw)))]
    try:
        check_against_source(read_bytes(bytes(raw), "fuzzed.tflite"), X[:2])  # the interpreter runs it too
    except EptqError as e:
        assert "\n" not in str(e)
