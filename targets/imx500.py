"""Target ``imx500``: the ONNX file Sony's IMX500 converter reads, compiled by it for the sensor.

The file is float ONNX with the ``mct_quantizers`` domain's quantizer ops, as the mct-quantizers
package documents them (Sony's toolkit is not used): ``ActivationPOTQuantizer`` after the input and
after every quantized activation (attributes ``threshold`` = the grid's power-of-two range,
``signed``, ``num_bits``, ``mctq_version``) and ``WeightsSymmetricQuantizer`` on every weight (the
float weights, a per-output-channel ``threshold`` input = scale * 2**(bits-1), ``num_bits``,
``per_channel``, ``channel_axis``, ``signed``); biases are float. The ops between are the onnx-qdq
writer's (one emitter, ``onnx_qdq.QdqEmitter``, with the quantizer methods overridden). The
converter checks two things a generic ONNX file lacks: the producer must be "pytorch" (its PyTorch
front end reads only such files) and every intermediate tensor needs its shape in ``value_info``.

Export then runs ``imxconv-pt`` (Sony's ``imx500-converter[pt]``, in its own environment with Java
17: ``eptq-deploy toolchain install imx500``); the bundle's ``imx500/`` folder holds the ONNX file,
``packerOut.zip`` (what the camera's firmware loads), the converter's memory report and
``dnnParams.xml``. A converter error or a model that does not fit in the sensor's memory ends the
export with the converter's own words in one line.

The same ONNX file runs on the CPU: onnxruntime with mct-quantizers' custom ops, in the toolchain's
environment (``imx500_ort_worker.py``). Rounding rule ``mct-quantizers``: each quantizer computes
``round_half_even(clip(x, lo, hi) / scale) * scale`` in float32 on the float32 result of the float
op before it (a conv's float32 sum of products of grid values plus its float bias). The simulation
takes the exact integer accumulator times the float32 multiplier, as ``float-half-even``; the two
differ only where float32 summation moves a value across a rounding tie (measured: see the checks).
"""

from __future__ import annotations

import json
import re
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from eptq_deploy import __version__
from eptq_deploy.errors import TargetError, UnsupportedOpError
from eptq_deploy.float_exec import pack
from eptq_deploy.graph import QParams, QuantGraph, TargetRules
from eptq_deploy.simulate import FloatHalfEvenRule, pad_codes, register_rule
from eptq_deploy.toolchains import Toolchain, run

from . import Runner, Target
from .onnx_qdq import IR_VERSION, OPSET, QdqEmitter

IMX = Toolchain(name="imx500", description="Sony IMX500 converter 3.19.2 (imxconv-pt) with mct-quantizers' "
                "onnxruntime ops", packages=("imx500-converter[pt]==3.19.2",), executable="imxconv-pt",
                system={"java": "Java 17 runs the converter's back end: on Debian, apt install openjdk-17-jre-headless"})
DOMAIN = "mct_quantizers"
#: the mct-quantizers release whose op definitions the file follows (the one the converter pins)
MCTQ_VERSION = "1.6.0"
#: the converter's PyTorch front end reads only files whose producer is PyTorch, with a PyTorch version
#: (the installed torch's is written; ``written_by`` in the metadata names the writer)
PRODUCER = "pytorch"
WORKER = Path(__file__).with_name("imx500_ort_worker.py")
PACKER_FILE, REPORT_FILE, PARAMS_FILE, LOG_FILE = "packerOut.zip", "memory_report.json", "dnnParams.xml", "converter.log"


class MctQuantizersRule(FloatHalfEvenRule):
    """What mct-quantizers' ops compute on onnxruntime (see the module docstring): float32 ops, each
    quantizer rounding half to even; simulated with exact accumulators (``float-half-even``)."""

    name = "mct-quantizers"


register_rule(MctQuantizersRule())


def threshold(qp: QParams) -> float:
    """A power-of-two symmetric activation grid as mct-quantizers states it: the range it spans."""
    if qp.exponent is None or int(qp.zero_point[0]) != 0:
        raise UnsupportedOpError("target imx500 takes power-of-two symmetric activation grids only; quantize with "
                                 "--profile imx500")
    return float(qp.scale[0]) * 2.0 ** (qp.bits - 1 if qp.signed else qp.bits)


class ImxEmitter(QdqEmitter):
    """The onnx-qdq emitter with mct-quantizers' quantizer ops in place of QuantizeLinear/DequantizeLinear:
    every quantized tensor ``t`` is the float tensor ``t.q`` holding grid values."""

    def activation_quantizer(self, src: str, t: str, out: str) -> str:
        qp = self.g.tensors[t].quant
        self.nodes.append(helper.make_node("ActivationPOTQuantizer", [src], [out], name=f"AQ_{out}", domain=DOMAIN,
                                           threshold=threshold(qp), signed=int(qp.signed), num_bits=qp.bits,
                                           mctq_version=MCTQ_VERSION))
        return out

    def quantize(self, src: str, t: str) -> str:
        return self.activation_quantizer(src, t, f"{t}.q")

    def float_in(self, t: str, codes: str | None = None) -> str:
        return codes or f"{t}.q"

    def round_to_grid(self, src: str, t: str, tag: str) -> str:
        return self.activation_quantizer(src, t, f"{tag}.dq")

    def weight(self, n: Any) -> tuple[str, str]:
        wt, bt = self.g.tensors[n.inputs[1]], self.g.tensors[n.inputs[2]]
        scale = wt.quant.scale.astype(np.float64)
        w = self.init(f"{wt.name}.float", (wt.data.astype(np.float64) * scale.reshape((-1,) + (1,) * (wt.data.ndim - 1)))
                      .astype(np.float32))
        thr = self.init(f"{wt.name}.threshold", (scale * 2.0 ** (wt.quant.bits - 1)).astype(np.float32))
        self.nodes.append(helper.make_node("WeightsSymmetricQuantizer", [w, thr], [f"{wt.name}.dq"], name=f"WQ_{wt.name}",
                                           domain=DOMAIN, num_bits=wt.quant.bits, per_channel=1, channel_axis=0,
                                           signed=1, mctq_version=MCTQ_VERSION))
        b = self.init(f"{bt.name}.float", (bt.data.astype(np.float64) * bt.quant.scale.astype(np.float64)).astype(np.float32))
        return f"{wt.name}.dq", b

    def pad_fill(self, t: str) -> np.ndarray:
        return np.array(0.0, np.float32)

    def channel_fills(self, values: list[float], qp: QParams) -> np.ndarray:
        return ((pad_codes(values, qp) - int(qp.zero_point[0])) * float(qp.scale[0])).astype(np.float32)

    def output(self, t: str, name: str) -> None:
        self.node("Identity", [f"{t}.q"], [name], f"Id_{name}")

    def model(self, graph: onnx.GraphProto) -> onnx.ModelProto:
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
                                  producer_name=PRODUCER, producer_version=version("torch").split("+")[0])
        model.ir_version = IR_VERSION
        for k, v in {"mctq_version": MCTQ_VERSION, "written_by": f"eptq-deploy {__version__}"}.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
        with_shapes(model)
        return model


def with_shapes(model: onnx.ModelProto) -> None:
    """Fill ``value_info`` (the converter needs every intermediate shape): shapes inferred on a copy in
    which each quantizer is an Identity (a quantizer keeps its input's shape)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for node in probe.graph.node:
        if node.domain == DOMAIN:
            del node.input[1:]
            node.op_type, node.domain = "Identity", ""
            del node.attribute[:]
    inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=True)
    known = {v.name for v in (*model.graph.input, *model.graph.output)}
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known)


class ImxRunner(Runner):
    """The ONNX file on onnxruntime with mct-quantizers' ops, in the imx500 toolchain's environment."""

    kernels = "onnxruntime CPU with mct-quantizers custom ops"

    def __init__(self, path: Path, threads: int = 1) -> None:
        self.path, self.threads = path, threads

    def run(self, x: np.ndarray) -> Any:
        with tempfile.TemporaryDirectory(prefix="eptq-imx500-") as d:
            np.save(Path(d) / "x.npy", np.ascontiguousarray(x, dtype=np.float32))
            done = run(IMX, "imx500", [str(WORKER), str(self.path), "x.npy", "y.npz", str(self.threads)], cwd=Path(d),
                       timeout=3600, program="python")
            if done.returncode != 0:
                lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
                raise TargetError(f"onnxruntime with mct-quantizers failed on {self.path.name}: "
                                  f"{lines[-1] if lines else f'exit status {done.returncode}'}")
            with np.load(Path(d) / "y.npz") as f:
                return pack([f[f"out{k}"] for k in range(len(f.files))])


def _size(text: str) -> int:
    """A memory report size ("1234B", "9.22KB", "8.00MB") in bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]?B)\s*", str(text))
    if m is None:
        raise TargetError(f"IMX500 converter memory report: unreadable size {text!r}")
    return round(float(m.group(1)) * {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}[m.group(2)])


def converter_report(folder: Path) -> dict[str, Any]:
    """The memory report and the converter's version and warnings, from the files export kept."""
    rep = json.loads((folder / REPORT_FILE).read_text())["Memory Report"]
    log = (folder / LOG_FILE).read_text() if (folder / LOG_FILE).exists() else ""
    ver = re.search(r"Running version (\S+)", log)
    warnings = sorted({re.sub(r"\s*\[/.*\]$", "", ln.split("WARN", 1)[1].lstrip("ING: ").strip())
                       for ln in log.splitlines() if " WARN" in ln})
    used, total = _size(rep["Memory Usage"]), _size(rep["Total Memory Available On Chip"])
    return {"fit": bool(rep["Fit In Chip"]), "memory_used_bytes": used, "memory_total_bytes": total,
            "memory_margin_bytes": total - used, "model_memory_bytes": _size(rep["Model Memory Physical Size"]),
            "runtime_memory_bytes": _size(rep["Runtime Memory Physical Size"]),
            "converter_version": ver.group(1) if ver else None, "converter_package": IMX.packages[0],
            "warnings": warnings}


def _converter_error(text: str) -> str:
    errors = [re.sub(r"\s*\[/.*\]$", "", ln.split("ERROR", 1)[1]).strip(" :") for ln in text.splitlines() if "ERROR" in ln]
    errors = [re.sub(r"^CODE: \[\w+\]\s*", "", e) for e in errors]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return errors[0] if errors else (lines[-1].strip() if lines else "no output")


class Imx500Target(Target):
    name = "imx500"
    description = ("ONNX with mct_quantizers quantizer ops compiled by Sony's IMX500 converter (packerOut.zip, "
                   "memory report); the ONNX run on onnxruntime with mct-quantizers' ops")
    runtime = "onnxruntime + mct-quantizers"
    rules = TargetRules(rounding="mct-quantizers", max_weight_bits=8, activation_bits=(8,),
                        asymmetric_activations=False, power_of_two_activations=True)
    rounding_rules = ("mct-quantizers",)
    model_file = "model.onnx"
    float_model_file = "model_float.onnx"
    toolchain = IMX

    def emit(self, graph: QuantGraph, folder: Path, *, quantized: bool = True) -> list[Path]:
        folder = Path(folder)
        path = folder / (self.model_file if quantized else self.float_model_file)
        onnx.save(ImxEmitter(graph, quantized).build() if quantized else QdqEmitter(graph, False).build(), str(path))
        if not quantized:
            return [path]
        return [path, *convert(folder, self.model_file)]

    def load(self, folder: Path, *, float_model: bool = False, threads: int = 1) -> Runner:
        if float_model:  # the float twin is plain ONNX: run it here
            from .onnx_qdq import OnnxRunner

            return OnnxRunner(Path(folder) / self.float_model_file, threads)
        return ImxRunner(Path(folder) / self.model_file, threads)

    def runtime_versions(self) -> dict[str, str]:
        return {"imx500-converter": IMX.packages[0].split("==")[1], "mct_quantizers_ops": MCTQ_VERSION,
                "onnx": version("onnx")}

    def exact_here(self, graph: QuantGraph) -> bool:
        return False  # float32 sums on onnxruntime may cross a rounding tie the exact accumulator does not

    def inspect(self, folder: Path) -> dict:
        return {"imx500": converter_report(Path(folder))}


def convert(folder: Path, model_file: str) -> list[Path]:
    """Compile ``folder/model_file`` with imxconv-pt; keeps the packer output, the memory report, the
    network parameters and the log. A refusal or a model that does not fit is one line."""
    out = folder / "converter"
    done = run(IMX, Imx500Target.name, ["-i", model_file, "-o", str(out), "--overwrite-output",
                                        "--report-size-unit", "B"], cwd=folder)
    log = done.stdout + done.stderr
    reports = sorted(out.glob("*_MemoryReport.json")) if out.exists() else []
    if done.returncode != 0 or not (out / PACKER_FILE).exists() or not reports:
        if reports:  # a report but no packer output: the converter's verdict on the memory
            rep = json.loads(reports[0].read_text())["Memory Report"]
            if not rep.get("Fit In Chip", True):
                raise TargetError(f"the model does not fit in the IMX500: it needs {_size(rep['Memory Usage']):,} of "
                                  f"{_size(rep['Total Memory Available On Chip']):,} bytes (converter's memory report)")
        raise TargetError(f"the IMX500 converter refused the model: {_converter_error(log)}")
    (out / PACKER_FILE).replace(folder / PACKER_FILE)
    reports[0].replace(folder / REPORT_FILE)
    kept = [folder / PACKER_FILE, folder / REPORT_FILE]
    if (out / PARAMS_FILE).exists():
        (out / PARAMS_FILE).replace(folder / PARAMS_FILE)
        kept.append(folder / PARAMS_FILE)
    (folder / LOG_FILE).write_text(log)
    for p in sorted(out.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    out.rmdir()
    rep = converter_report(folder)
    if not rep["fit"]:
        raise TargetError(f"the model does not fit in the IMX500: it needs {rep['memory_used_bytes']:,} of "
                          f"{rep['memory_total_bytes']:,} bytes (converter's memory report)")
    return [*kept, folder / LOG_FILE]
