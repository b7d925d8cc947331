"""onnx-qdq: the two causes of onnxruntime drifting from the simulation on mobilenet_v3_small.

torchvision's mobilenet_v3_small with random weights (untrained batch-norm statistics, so
activations on grids down to 2**-35), PTQ under int8-pot on 16 ImageNet photos, came out of
onnxruntime up to 34 LSB from ``simulate(target="onnx-qdq")`` on 31 of 31 weight seeds
(8 check images). Two causes, each reproduced here by the smallest graph that shows it:

- int16 saturation in onnxruntime's uint8 x int8 GEMM (QLinearConv, QGemm) on x86-64
  without VNNI: VPMADDUBSW adds two adjacent products in int16, so uint8 codes near 255
  times two int8 weights near 127 clip (the stem conv alone was off by up to 5 codes, and
  deeper layers, compounding, by up to 78).
  Only a host with AVX2 and no VNNI shows it at run time; the emitter test holds everywhere.
- HardSwish: onnxruntime runs the ONNX function body ``x * HardSigmoid(x)`` (float32(1/6) * x
  + 0.5, product and sum rounded apart), torch computes ``x * relu6(x + 3) / 6``; the last
  float32 bit decides a QuantizeLinear tie where the output grid is the input grid and
  x / 2 lies on k + 1/2 steps (the last hardswish before the pool, 2**-29 grids: 1 to 4 LSB
  on 8 of 31 seeds once the saturation was gone).

A third, on YOLOX-Nano (tflite-int8 profile, 255 calibration images): up to 61 LSB at the heads.
onnxruntime fuses DQ -> Sigmoid -> Q into QLinearSigmoid, a 256-entry table built with MLAS's
rational approximation of the logistic, not ``1 / (1 + exp(-x))``; on one grid a code's exact
sigmoid is 174.50001 output steps and MLAS's is just under 174.5: one code off, on 1.7 % of one
tensor's values, compounding through 20 SiLUs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import eptq_deploy
from eptq_deploy.graph import QParams
from eptq_deploy.simulate import get_rule, run_integer
from eptq_deploy.targets import get_target
from eptq_deploy.targets.onnx_qdq import OnnxruntimeRule, cvt_f32_to_i32, u8s8_may_saturate


def _export(qm, tmp_path: Path) -> Path:
    return eptq_deploy.export(qm, target="onnx-qdq", out=tmp_path / "b") / "onnx-qdq"


# ------------------------------------------------------- u8 x s8 int16 saturation
def _pair_conv() -> nn.Module:
    """One 1x1 conv summing two channels: both weights 127/128, the int8 code 127 on a 2**-7 grid."""
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(127 / 128)
    return conv.eval()


#: calibration on [-1, 1]; checked at the top of the input grid (uint8 container code 255 on both channels)
PAIR_CALIB = torch.linspace(-1.0, 1.0, 16 * 2 * 2 * 2).reshape(16, 2, 2, 2)
PAIR_X = torch.tensor([0.99, 0.5, -0.99, 0.0]).reshape(1, 1, 2, 2).repeat(1, 2, 1, 1)


def test_u8s8_pair_saturation_conv(tmp_path: Path) -> None:
    qm = eptq_deploy.quantize(_pair_conv(), PAIR_CALIB, profile="int8-pot", targets="onnx-qdq", method="ptq",
                              progress=False)
    g = qm.graph
    (n,) = g.weighted_nodes()
    assert np.array_equal(g.tensors[n.inputs[1]].data.ravel(), [127, 127])
    q_in = g.tensors[g.inputs[0]].quant
    top = int(np.round(0.99 / float(q_in.scale[0]))) + int(q_in.zero_point[0]) + (128 if q_in.signed else 0)
    assert 2 * 127 * top > 2**15 - 1  # the pair sum VPMADDUBSW would clip
    assert u8s8_may_saturate(g, n)

    folder = _export(qm, tmp_path)
    assert "QLinearConv" in get_target("onnx-qdq").inspect(folder)["runtime_ops"]
    got = get_target("onnx-qdq").load(folder).run(PAIR_X.numpy())
    np.testing.assert_array_equal(got, qm.simulate(PAIR_X, "onnx-qdq").numpy())
    # the file holds the same integers as uint8 with zero point 128, which onnxruntime runs without saturation
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(folder / "model.onnx")).graph.initializer}
    w, z = inits[f"{n.inputs[1]}.int"], inits[f"{n.inputs[1]}.zero_point"]
    assert w.dtype == np.uint8 and z.dtype == np.uint8 and np.all(z == 128)
    np.testing.assert_array_equal(w.astype(np.int64) - 128, g.tensors[n.inputs[1]].data)


def test_u8s8_saturation_bound() -> None:
    """uint8 weights only where the bound says a pair could clip: 7-bit weights or fewer, and depthwise
    convs (MLAS widens to int16 there), keep int8 and onnxruntime's faster u8 x s8 kernels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4)).eval()
    calib = torch.randn(8, 3, 6, 6)
    qm8 = eptq_deploy.quantize(model, calib, profile="int8-pot", targets="onnx-qdq", progress=False)
    conv, dw = qm8.graph.weighted_nodes()
    assert dw.op == "depthwise_conv2d"
    assert u8s8_may_saturate(qm8.graph, conv) and not u8s8_may_saturate(qm8.graph, dw)
    qm4 = eptq_deploy.quantize(model, calib, profile="w4a8-pot", targets="onnx-qdq", progress=False)
    assert not any(u8s8_may_saturate(qm4.graph, n) for n in qm4.graph.weighted_nodes())


# ------------------------------------------------------------ HardSwish ties
def test_hardswish_tie_on_equal_grids(tmp_path: Path) -> None:
    """Every int8 code through HardSwish with the input and output on 2**-29 (mobilenet_v3_small's
    hardswish_17 under untrained statistics): onnxruntime and the simulation agree on every code,
    where torch's formula rounds 12 of them the other way."""
    s = 2.0**-29
    x = (torch.arange(-128, 128, dtype=torch.float32) * s).reshape(1, 1, 16, 16)
    qm = eptq_deploy.quantize(nn.Hardswish().eval(), x.repeat(4, 1, 1, 1), profile="int8-pot", targets="onnx-qdq",
                              method="ptq", progress=False)
    g = qm.graph
    grid = QParams(bits=8, signed=True, scale=np.array([s], np.float32), zero_point=np.array([0]),
                   exponent=np.array([-29]))
    g.tensors[g.inputs[0]].quant = grid
    g.tensors[g.outputs[0]].quant = QParams(bits=8, signed=True, scale=grid.scale, zero_point=grid.zero_point,
                                            exponent=grid.exponent)
    folder = _export(qm, tmp_path)
    got = get_target("onnx-qdq").load(folder).run(x.numpy())
    np.testing.assert_array_equal(got, qm.simulate(x, "onnx-qdq").numpy())
    # the case holds ties: torch's float32 hardswish rounds 12 of the 256 codes the other way
    torch_codes = torch.round(F.hardswish(x) / torch.tensor(s, dtype=torch.float32)).clamp(-128, 127)
    assert int((torch_codes.double() != run_integer(g, x, get_rule("onnxruntime"))).sum()) == 12


def _ort_sigmoid_table(sx: np.float32, zx: int, so: np.float32, zo: int) -> np.ndarray:
    """onnxruntime's DQ -> Sigmoid -> Q (fused to QLinearSigmoid) over every uint8 code."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inits = [numpy_helper.from_array(np.array(v, t), n)
             for v, t, n in ((sx, np.float32, "sx"), (zx, np.uint8, "zx"), (so, np.float32, "so"), (zo, np.uint8, "zo"))]
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xf"]), helper.make_node("Sigmoid", ["xf"], ["yf"]),
             helper.make_node("QuantizeLinear", ["yf", "so", "zo"], ["y"])]
    g = helper.make_graph(nodes, "sigmoid", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 256])],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 256])], inits)
    sess = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.arange(256, dtype=np.uint8)[None]})[0][0].astype(np.int64)


def test_qlinear_sigmoid_table_is_mlas_logistic() -> None:
    rng = np.random.default_rng(0)
    grids = [(np.float32(0.02819711), 125, np.float32(1 / 256), 0)]  # YOLOX's: code 152 is the tie
    grids += [(np.float32(rng.uniform(0.001, 0.2)), int(rng.integers(0, 256)), np.float32(1 / 256), 0)
              for _ in range(300)]
    grids += [(np.float32(rng.uniform(0.001, 0.2)), int(rng.integers(0, 256)), np.float32(rng.uniform(0.002, 0.01)),
               int(rng.integers(0, 40))) for _ in range(100)]
    codes = np.arange(256).astype(np.float64)
    exact_misses = 0
    for sx, zx, so, zo in grids:
        ort_table = _ort_sigmoid_table(sx, zx, so, zo)
        rule = np.clip(OnnxruntimeRule._sigmoid(None, [codes], [(sx, zx), (so, zo)]), 0, 255)
        np.testing.assert_array_equal(rule, ort_table)
        x = (sx * (np.arange(256) - zx).astype(np.float32)).astype(np.float64)
        exact = np.clip(cvt_f32_to_i32((1 / (1 + np.exp(-x))).astype(np.float32) / so) + zo, 0, 255)
        exact_misses += int(np.sum(exact != ort_table))
    assert exact_misses > 0  # the exact logistic would miss onnxruntime's ties, YOLOX's among them
