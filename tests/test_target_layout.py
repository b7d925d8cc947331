"""A backend is one place: each runtime's rounding rule lives with its target, not in pipeline/."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eptq_deploy
from eptq_deploy.errors import UnsupportedOpError
from eptq_deploy.simulate import get_rule
from eptq_deploy.targets import get_target, list_targets

PIPELINE = Path(eptq_deploy.__file__).parent


def test_every_rule_a_target_declares_is_defined_in_its_own_module() -> None:
    for name, _ in list_targets():
        target = get_target(name)
        names = target.rounding_rules or (target.rules.rounding,)
        assert target.rules.rounding == names[0], name
        for rule_name in names:
            rule = get_rule(rule_name)
            # its own module, or the module of the target it builds on (tflite-micro runs TFLite's kernels)
            homes = {c.__module__ for c in type(target).__mro__}
            assert type(rule).__module__ in homes - {"eptq_deploy.targets", "abc", "builtins"}, (name, rule_name)


def test_pipeline_defines_no_runtime_rule() -> None:
    pattern = re.compile(r"class \w*(tflite|xnnpack|onnxruntime|openvino)\w*rule", re.IGNORECASE)
    hits = [f"{p.name}: {m.group(0)}" for p in PIPELINE.glob("*.py") for m in pattern.finditer(p.read_text())]
    assert hits == []


def test_an_op_the_target_cannot_write_is_refused_before_eptq() -> None:
    class StridedAvgPool(nn.Module):  # count_include_pad=False where SAME puts the windows elsewhere
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(self.c(x), 3, 2, 1, count_include_pad=False)

    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    with pytest.raises(UnsupportedOpError, match="count_include_pad") as info:
        eptq_deploy.quantize(StridedAvgPool().eval(), x, targets=["tflite-int8"], profile="tflite-int8",
                             method="eptq", progress=False)
    assert time.perf_counter() - t0 < 10 and "\n" not in str(info.value)


PLUGIN = '''
import numpy as np
import torch

from eptq_deploy.float_exec import run_float
from eptq_deploy.graph import QuantGraph, TargetRules
from eptq_deploy.simulate import FloatHalfEvenRule, dequantize, register_rule, run_integer
from eptq_deploy.targets import Runner, Target


class NpuRule(FloatHalfEvenRule):
    name = "my-npu"

    def round(self, v):
        return torch.sign(v) * torch.floor(v.abs() + 0.5)

    def requantize(self, acc, mult):
        return self.round(acc.float() * mult).double()

    def quantize(self, x, qp):
        q = self.round(x.float() / float(qp.scale[0])) + float(qp.zero_point[0])
        return q.clamp(qp.qmin, qp.qmax).double()


register_rule(NpuRule())


class NpuRunner(Runner):
    """A stand-in for the NPU's simulator: the saved graph run with the NPU's rule."""

    def __init__(self, folder):
        self.g = QuantGraph.load(folder)

    def run(self, x):
        with torch.no_grad():
            if self.g.tensors[self.g.inputs[0]].quant is None:  # the float twin
                return run_float(self.g, torch.from_numpy(np.asarray(x, np.float32))).numpy()
            q = run_integer(self.g, torch.from_numpy(np.asarray(x, np.float32)), NpuRule())
            return dequantize(q, self.g.tensors[self.g.outputs[0]].quant).numpy()


class NpuTarget(Target):
    name, description, runtime = "my-npu", "a plugin NPU", "my-npu-sim"
    rules = TargetRules(rounding="my-npu", max_weight_bits=8, activation_bits=(8,))
    rounding_rules = ("my-npu",)
    model_file, float_model_file = "graph.json", "float/graph.json"

    def emit(self, graph, folder, *, quantized=True):
        out = folder if quantized else folder / "float"
        out.mkdir(parents=True, exist_ok=True)
        graph.save(out)
        return [out / "graph.json", out / "graph.npz"]

    def load(self, folder, *, float_model=False, threads=1):
        return NpuRunner(folder / "float" if float_model else folder)
'''


def test_a_plugin_target_brings_its_own_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    from eptq_deploy import targets

    (tmp_path / "npu_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("npu_plugin")

    class EntryPoint:
        name = "my-npu"

        @staticmethod
        def load() -> type:
            return module.NpuTarget

    monkeypatch.setattr(targets, "entry_points", lambda group: [EntryPoint()])
    try:
        assert "my-npu" in dict(list_targets())
        test_every_rule_a_target_declares_is_defined_in_its_own_module()  # the plugin's rule is its own
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        x = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        qm = eptq_deploy.quantize(net.eval(), x[:16], targets=["my-npu"], method="ptq", progress=False)
        assert qm.rounding == {"my-npu": "my-npu"}
        bundle = eptq_deploy.export(qm, out=tmp_path / "b", data=x[16:])
        checks = eptq_deploy.check(bundle, x[16:])["my-npu"]["checks"]
        assert checks["max_abs_diff_lsb"] == 0 and checks["argmax_agreement_vs_simulation"] == 1.0
    finally:
        sys.modules.pop("npu_plugin", None)
