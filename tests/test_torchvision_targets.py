"""torchvision's resnet18 and mobilenet_v3_small (random weights, 64x64) on every target.

Next to the single-op tests and the CIFAR ResNets: real architectures bring the ops
in their real neighbourhoods (HARD_SWISH, the hard-sigmoid lowering and MUL of the
squeeze-excitation blocks, MAX_POOL_2D behind a padded stem, MEAN, FULLY_CONNECTED).
Each target's file (every target of ``list_targets()``) must hold the graph's integers and
grids (read back from the file) and compute what the simulation computes: onnxruntime,
TFLite through XNNPACK and its reference kernels, and TFLM to the bit; OpenVINO within its
documented deviation. The
batch-norm statistics come from a forward pass in training mode, so activations are of
order 1 as in a trained network (untrained statistics shrink mobilenet_v3's output to
1e-10, a degenerate grid no deployment meets).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from test_openvino import assert_openvino_matches
from test_tflite import _one_torch_thread  # noqa: F401  (autouse fixture)

import eptq_deploy
from eptq_deploy.quantized import QuantizedModel
from eptq_deploy.targets import get_target, list_targets

TARGETS = [name for name, _ in list_targets(compilers=False)]  # ethos-u: test_ethos_u.py
#: model -> TFLite ops its file must hold
NETS = {
    "resnet18": {"CONV_2D", "MAX_POOL_2D", "ADD", "MEAN", "FULLY_CONNECTED"},
    "mobilenet_v3_small": {"CONV_2D", "DEPTHWISE_CONV_2D", "HARD_SWISH", "MUL", "MEAN", "FULLY_CONNECTED", "ADD"},
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[QuantizedModel, Path, torch.Tensor]]:
    out = {}
    for name in NETS:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None, num_classes=10)
        gen = torch.Generator().manual_seed(1)
        calib, x = torch.randn(16, 3, 64, 64, generator=gen), torch.randn(8, 3, 64, 64, generator=gen)
        with torch.no_grad():  # batch-norm statistics from data, as training leaves them: activations of order 1
            model.train()(torch.randn(32, 3, 64, 64, generator=gen))
        model.eval()
        qm = eptq_deploy.quantize(model, calib, profile="tflite-int8", targets=TARGETS, progress=False)
        out[name] = qm, eptq_deploy.export(qm, out=tmp_path_factory.mktemp(name) / "b"), x
    return out


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("target", TARGETS)
def test_file_holds_graph_and_runs_as_simulated(target: str, name: str, exported) -> None:
    """Every target (``list_targets()``): the file read back holds the graph's integers and grids, and each
    kernel set computes the simulation of its rule, bit for bit where the target says it is exact here."""
    qm, b, x = exported[name]
    t = get_target(target)
    assert t.read_back_mismatches(b / target, qm.graph) in ([], None)
    for kwargs in t.kernel_variants:
        runner = t.load(b / target, **kwargs)
        got, sim = runner.run(x.numpy()), qm.simulate(x, target, rounding=runner.rounding).numpy()
        if t.exact_here(qm.graph):
            np.testing.assert_array_equal(got, sim, err_msg=f"{target} {kwargs}")
        else:  # OpenVINO: resnet18's projection shortcuts (a conv on each side of the add) leave up to 3 LSB
            # at the output (README, known deviations); CPUs without VNNI saturate
            assert_openvino_matches(qm, got, sim, max_lsb=4)


@pytest.mark.parametrize("name", list(NETS))
def test_tflite_files_hold_the_architectures_ops(name: str, exported) -> None:
    _, b, _ = exported[name]
    for target in ("tflite-int8", "tflite-micro"):
        assert NETS[name] <= set(get_target(target).inspect(b / target)["runtime_ops"]), target


@pytest.mark.parametrize("name", list(NETS))
def test_openvino_runs_every_weighted_layer_in_integer(name: str, exported) -> None:
    _, b, _ = exported[name]
    facts = get_target("openvino-ir").inspect(b / "openvino-ir")
    assert facts["int8_layers"] == facts["total_weighted_layers"]
