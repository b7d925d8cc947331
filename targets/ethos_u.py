"""Target ``ethos-u``: the tflite-int8 file compiled by Arm's Vela for an Ethos-U NPU.

The int8 file is written and checked exactly as ``tflite-int8`` does (LiteRT runs it and must agree
with the simulation); Vela then compiles it for the chosen accelerator with an explicit system
configuration and memory mode from Vela's own ``Arm/vela.ini``, and the bundle keeps what Vela
wrote: ``model_vela.tflite`` (the NPU command stream inside an ``ethos-u`` custom op, what the
firmware's TFLM runs with the Ethos-U driver) and Vela's summary CSV. ``inspect`` reports SRAM and
flash used, NPU cycles, inferences per second at the configured clock and the ops left on the CPU,
by name. Vela runs in its own environment (``eptq-deploy toolchain install ethos-u``).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, ClassVar

from ai_edge_litert import schema_py_generated as S

from eptq_deploy.errors import TargetError, UsageError
from eptq_deploy.graph import QuantGraph
from eptq_deploy.toolchains import Toolchain, run

from .tflite_int8 import TfliteInt8Target
from .tflite_micro import op_names

VELA = Toolchain(name="ethos-u", description="Arm Vela 5.2.0, the Ethos-U NPU compiler",
                 packages=("ethos-u-vela==5.2.0",), executable="vela")
#: Vela 5.2.0's accelerator configurations (``vela --help``)
ACCELERATORS = ("ethos-u55-32", "ethos-u55-64", "ethos-u55-128", "ethos-u55-256", "ethos-u65-256", "ethos-u65-512",
                "ethos-u85-128", "ethos-u85-256", "ethos-u85-512", "ethos-u85-1024", "ethos-u85-2048")
#: per NPU family, the system configuration and memory mode of Vela's Arm/vela.ini used by default
#: (a high-end embedded system: SRAM for the tensor arena, weights in off-chip flash on the U55)
SYSTEMS = {"ethos-u55": ("Ethos_U55_High_End_Embedded", "Shared_Sram"),
           "ethos-u65": ("Ethos_U65_High_End", "Dedicated_Sram"),
           "ethos-u85": ("Ethos_U85_SYS_DRAM_High", "Dedicated_Sram")}
VELA_FILE = "model_vela.tflite"
SUMMARY_FILE = "vela_summary.csv"
COMMAND_FILE = "vela_command.txt"
NPU_OP = "ethos-u"  # the custom op holding the compiled command stream


class EthosUTarget(TfliteInt8Target):
    name = "ethos-u"
    description = "TFLite int8 file compiled by Arm Vela for an Ethos-U NPU (the int8 file checked on ai-edge-litert)"
    toolchain = VELA
    options: ClassVar[dict[str, str]] = {
        "accelerator": f"Vela accelerator configuration ({', '.join(ACCELERATORS)}; default ethos-u55-128)",
        "system_config": "system configuration of Vela's Arm/vela.ini (default: per NPU family)",
        "memory_mode": "memory mode of Vela's Arm/vela.ini (default: per NPU family)"}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        out = super().check_options(options)
        acc = out.setdefault("accelerator", "ethos-u55-128")
        if acc not in ACCELERATORS:
            raise UsageError(f"unknown accelerator {acc!r}; Vela knows: {', '.join(ACCELERATORS)}")
        system, memory = SYSTEMS[acc.rsplit("-", 1)[0]]
        out.setdefault("system_config", system)
        out.setdefault("memory_mode", memory)
        return out

    def emit(self, graph: QuantGraph, folder: Path, *, quantized: bool = True) -> list[Path]:
        written = super().emit(graph, folder, quantized=quantized)
        if not quantized:
            return written
        opts = self.check_options(graph.meta.get("target_options", {}).get(self.name, {}))
        return [*written, *compile_tflite(Path(folder), self.model_file, opts)]

    def runtime_versions(self) -> dict[str, str]:
        return {**super().runtime_versions(), "ethos-u-vela": VELA.packages[0].split("==")[1]}

    def inspect(self, folder: Path) -> dict:
        """The int8 file's facts (as tflite-int8) and Vela's: memory, cycles, throughput, CPU ops."""
        return {**super().inspect(folder), "vela": vela_report(Path(folder))}


def compile_tflite(folder: Path, model_file: str, opts: dict[str, Any]) -> list[Path]:
    """Compile ``folder/model_file`` (an int8 .tflite) with Vela under ``opts`` (``check_options``'s);
    writes ``VELA_FILE``, ``SUMMARY_FILE`` and the command used next to it. A refusal is one line."""
    args = ["--config", "Arm/vela.ini", "--accelerator-config", opts["accelerator"],
            "--system-config", opts["system_config"], "--memory-mode", opts["memory_mode"]]
    done = run(VELA, EthosUTarget.name, [*args, "--output-dir", str(folder), model_file], cwd=folder)
    stem = Path(model_file).stem
    compiled, summary = folder / f"{stem}_vela.tflite", folder / f"{stem}_summary_{opts['system_config']}.csv"
    if done.returncode != 0 or not compiled.exists() or not summary.exists():
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "rror" in ln), lines[-1] if lines else f"exit status {done.returncode}")
        raise TargetError(f"Vela refused the model for {opts['accelerator']}: {why.strip()}")
    compiled.replace(folder / VELA_FILE)
    summary.replace(folder / SUMMARY_FILE)
    (folder / COMMAND_FILE).write_text(f"vela {' '.join(args)} {model_file}\n")
    return [folder / VELA_FILE, folder / SUMMARY_FILE, folder / COMMAND_FILE]


def _number(v: str) -> float | None:
    try:
        f = float(v)
    except ValueError:
        return None
    return None if math.isnan(f) else f


def vela_report(folder: Path) -> dict[str, Any]:
    """What Vela's summary CSV and compiled file say: memory used, cycles, inferences per second, and
    which ops stay on the CPU (every op of the compiled file but the NPU's own)."""
    with open(folder / SUMMARY_FILE, newline="") as f:
        row = next(csv.DictReader(f))
    m = S.ModelT.InitFromPackedBuf((folder / VELA_FILE).read_bytes(), 0)
    names = op_names(m)
    ops = [names[o.opcodeIndex] for sg in m.subgraphs for o in sg.operators]
    num = {k: _number(row[k]) for k in ("core_clock", "sram_memory_used", "off_chip_flash_memory_used",
                                        "on_chip_flash_memory_used", "dram_memory_used", "cycles_npu",
                                        "cycles_total", "inferences_per_second", "nn_macs", "inference_time")}

    def kib(key: str) -> int | None:  # Vela's summary states memory in KiB
        return None if num[key] is None else round(num[key] * 1024)

    return {"accelerator": row["accelerator_configuration"], "system_config": row["system_config"],
            "memory_mode": row["memory_mode"], "clock_hz": num["core_clock"], "sram_bytes": kib("sram_memory_used"),
            "off_chip_flash_bytes": kib("off_chip_flash_memory_used"),
            "on_chip_flash_bytes": kib("on_chip_flash_memory_used"), "dram_bytes": kib("dram_memory_used"),
            "npu_cycles": num["cycles_npu"], "total_cycles": num["cycles_total"],
            "inference_time_s": num["inference_time"], "inferences_per_second": num["inferences_per_second"],
            "macs": num["nn_macs"], "npu_ops": ops.count(NPU_OP),
            "cpu_ops": sorted({o for o in ops if o != NPU_OP}),
            "cpu_op_count": sum(o != NPU_OP for o in ops)}
