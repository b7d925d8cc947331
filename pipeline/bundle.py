"""The bundle: what a firmware team takes over.

    BUNDLE/
      manifest.json      target(s), profile, tool version, input/output contract,
                         every tensor's quantization, memory figures, op list,
                         runtime checks, file hashes, the commands
      report.md          the same for a person, with tables
      layer_sqnr.png     per-layer error plot
      graph.json/.npz    the quantized graph (the contract, versioned)
      <target>/          the model file(s) for each target

It is written into a temporary sibling folder and renamed into place, so a failed
run leaves nothing behind and an existing bundle is only replaced with ``force``.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, feeding, model_io, tasks
from .checks import agreement, latency, runtime_checks
from .errors import BundleError, EptqError, UsageError
from .float_exec import pack, unpack
from .fold import input_contract
from .host import cpu_features
from .mixed_precision import plot_widths
from .quantized import QuantizedModel

MANIFEST_VERSION = 2
#: side files of a bundle (hashed like every other file)
QUANTIZATION_FILE = "quantization.json"
WIDTHS_PLOT = "weight_bits.png"
CALIBRATION_FILE = "calibration.json"
CLASSES_FILE = "classes.txt"


def as_numpy(y: Any) -> Any:
    """Packed torch outputs (``float_exec.pack``) as numpy, packed the same way."""
    return pack([v.numpy() for v in unpack(y)])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def peak_activation_bytes(qm: QuantizedModel) -> int:
    """Peak bytes of live activations at batch 1, by liveness over the node order."""
    g = qm.graph

    def size(t: str) -> int:
        info = g.tensors[t]
        bits = info.quant.bits if info.quant is not None else 32
        return int(np.prod(info.shape[1:])) * ((bits + 7) // 8)

    live = {g.inputs[0]: size(g.inputs[0])}
    peak = sum(live.values())
    for n, dead in zip(g.nodes, g.dead_after(), strict=True):
        for o in n.outputs:
            live[o] = size(o)
        peak = max(peak, sum(live.values()))
        for t in dead:
            live.pop(t, None)
    return peak


def memory_section(qm: QuantizedModel) -> dict[str, Any]:
    """Stored weight bytes, peak activations and, where the profile states its chip's memory, the
    margin that weights (packed) and peak activations leave in it: an estimate; a chip compiler's
    own report, where a target runs one, is the verdict."""
    g = qm.graph
    out: dict[str, Any] = {"weight_bytes": g.weight_bytes(), "packed_weight_bytes": qm.weight_bytes,
                           "weight_bits": qm.weight_bits, "peak_activation_bytes_batch1": peak_activation_bytes(qm)}
    if qm.profile.memory_bytes is not None:
        out["chip_memory_bytes"] = qm.profile.memory_bytes
        out["chip_margin_bytes"] = (qm.profile.memory_bytes - out["weight_bytes"]["packed"]
                                    - out["peak_activation_bytes_batch1"])
    return out


def widths_section(plan: dict[str, Any]) -> list[str]:
    """The report's lines on a weight-memory budget: the budget, what the widths pack to, each layer's width."""
    lines = ["", "## Weight widths under the memory budget", "",
             f"Budget {plan['budget_bytes']:,} bytes, packed weights {plan['packed_bytes']:,} bytes: {plan['note']} "
             f"({plan['solver']}).", "", f"![widths against sensitivity]({plan['plot']})", "",
             "| layer | weight bits | expected loss at each width |", "| --- | --- | --- |"]
    for name, bits in plan["weight_bits"].items():
        costs = ", ".join(f"{b}-bit {c:.3g}" for b, c in plan["costs"][name].items())
        lines.append(f"| {name} | {bits} | {costs} |")
    return lines


def _chip_margin(memory: dict[str, Any]) -> str:
    if "chip_memory_bytes" not in memory:
        return ""
    return (f"; chip memory {memory['chip_memory_bytes']:,} bytes (profile), margin after packed weights and peak "
            f"activations {memory['chip_margin_bytes']:,} bytes (estimate)")


def _files(folder: Path, root: Path) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(root)): {"sha256": sha256(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _plot_layers(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hess = [r.get("hessian") for r in rows]
    panels = 2 if any(h is not None for h in hess) else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(6, 0.25 * len(rows)), 3.2 * panels + 0.6), sharex=True, squeeze=False)
    ax = axes[0, 0]
    ax.bar(range(len(rows)), [min(r["sqnr_db"], 80) for r in rows], color="#3a6ea5")
    ax.set_ylabel("SQNR vs float (dB)")
    ax.set_title("Per-layer output error of the integer network (higher is better)")
    if panels == 2:
        hx = axes[1, 0]
        hx.bar(range(len(rows)), [h or 0.0 for h in hess], color="#a55a3a")
        hx.set_yscale("log")
        hx.set_ylabel("mean Hessian score")
        hx.set_title("EPTQ sample-layer attention: mean label-free Hessian score per layer")
    axes[-1, 0].set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_section(qm: QuantizedModel) -> dict[str, Any]:
    """What the model is: its name, where its weights came from, what its output means."""
    g = qm.graph
    outp = g.tensors[g.outputs[0]]
    classes = qm.info.get("classes")
    face = model_io.interface(g.meta)
    return {"name": qm.info.get("model_name", "model"), "weights": qm.info.get("weights", "as given"),
            "float_tail": face["float_tail"],  # run on the host after the model file
            # where the integer model ends, and what the source model returns after the float tail
            "cut": {"outputs": face["outputs"], "chosen_by": face["cut_chosen_by"]} if face["float_tail"] else None,
            "source_outputs": face["source_outputs"] or list(g.outputs),
            # what the outputs mean and how firmware decodes them (tasks.py): strides, anchors, thresholds
            "postprocess": g.meta.get("postprocess"),
            "outputs": [{"name": t, "shape": model_io.source_shape(g.meta, g.tensors[t].shape)} for t in g.outputs],
            "output": {"name": outp.name, "shape": model_io.source_shape(g.meta, outp.shape),
                       "meaning": feeding.output_meaning(g),
                       "classes": len(classes) if classes else None,
                       "classes_file": CLASSES_FILE if classes else None}}


def build_manifest(qm: QuantizedModel, target_entries: dict[str, Any], command: str | None, out: Path,
                   check_command: str | None = None) -> dict[str, Any]:
    """The manifest: the firmware-facing facts first and small; large arrays live in side files
    (every tensor's quantization in ``quantization.json``) hashed under ``files``."""
    g = qm.graph
    inp = g.tensors[g.inputs[0]]
    calib = qm.info.get("calibration") or {}
    return {
        "format": "eptq-deploy bundle",
        "version": MANIFEST_VERSION,
        "tool_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": model_section(qm),
        "input": {"name": inp.name, "shape": model_io.source_shape(g.meta, inp.shape),
                  "layout": model_io.interface(g.meta)["source_layout"],
                  "preprocessing": qm.info.get("preprocessing"), **input_contract(g)},
        "targets": target_entries,
        "memory": memory_section(qm),
        "ops": g.op_list(),
        "profile": qm.profile.to_dict(),
        "method": qm.info.get("method"),
        "seed": qm.info.get("seed"),
        "calibration": {"samples": qm.info.get("samples"),
                        **{k: v for k, v in calib.items() if k not in ("files", "indices")},
                        "record": CALIBRATION_FILE},
        # a weight-memory budget's per-layer widths (mixed_precision.py), with the costs they were chosen on
        "mixed_precision": ({**qm.info["mixed_precision"], "plot": WIDTHS_PLOT} if qm.info.get("mixed_precision")
                            else None),
        # layers whose SiLU channels were rescaled (equalize.py): each has a 1x1 depthwise layer "<name>.rescale"
        "equalized_silu": qm.info.get("equalized_silu", []),
        "quantization_time_s": qm.info.get("timings_s"),
        "quantization_file": QUANTIZATION_FILE,
        "files": _files_at(out, [p.name for p in sorted(out.iterdir()) if p.is_file()]),
        "host": {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
                 "torch": torch.__version__, "cpu_features": cpu_features()},
        "command": command,
        "check_command": check_command,
    }


def _files_at(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"sha256": sha256(root / n), "bytes": (root / n).stat().st_size} for n in names}


def write_side_files(tmp: Path, qm: QuantizedModel) -> None:
    """The bundle's large or optional top-level files, written before the manifest hashes them."""
    qm.graph.save(tmp)
    g = qm.graph
    tensors = {name: t.quant.to_json() for name, t in g.tensors.items() if t.quant is not None}
    (tmp / QUANTIZATION_FILE).write_text(json.dumps(tensors, default=_json_default))
    calib = qm.info.get("calibration") or {}
    (tmp / CALIBRATION_FILE).write_text(json.dumps({"samples": qm.info.get("samples"), **calib}, indent=1,
                                                   default=_json_default))
    if qm.info.get("classes"):
        (tmp / CLASSES_FILE).write_text("".join(f"{c}\n" for c in qm.info["classes"]))
    if qm.info.get("mixed_precision"):
        plot_widths(qm.info["mixed_precision"], tmp / WIDTHS_PLOT)


def calibration_record(data: Path, files: list[str], count: int) -> dict[str, Any]:
    """Which samples of ``data`` calibrated: file names in a folder, indices (and the file's hash)
    in an array file, so that ``check`` can leave them out."""
    source = str(data.resolve())
    if data.is_dir():
        return {"source": source, "kind": "image folder", "files": files}
    return {"source": source, "kind": "array file", "sha256": sha256(data), "indices": list(range(count))}


def calibration_overlap(bundle: Path, data: Path) -> list[str] | list[int]:
    """The samples of ``data`` the bundle was calibrated on (file names or indices); [] if none."""
    try:
        rec = json.loads((Path(bundle) / CALIBRATION_FILE).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(rec, dict):
        return []
    if data.is_dir() and rec.get("kind") == "image folder":
        return [f for f in rec.get("files") or [] if isinstance(f, str) and (data / f).is_file()]
    if data.is_file() and rec.get("kind") == "array file" and rec.get("sha256") == sha256(data):
        return [int(i) for i in rec.get("indices") or [] if isinstance(i, int)]
    return []


def _timings(manifest: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in (manifest["quantization_time_s"] or {}).items())


def write_report(path: Path, qm: QuantizedModel, manifest: dict[str, Any], layers: list[dict[str, Any]]) -> None:
    p = manifest["profile"]
    mdl = manifest["model"]
    check = manifest["check_command"] or (f"eptq-deploy check {path.parent} --data IMAGES (a folder or .npz of your "
                                          "own, preprocessed as below)")
    lines = [
        f"# eptq-deploy bundle: {mdl['name']}",
        "",
        f"- model: {mdl['name']}, weights {mdl['weights']}; output: {mdl['output']['meaning']}",
        f"- profile **{p['name']}** ({p['description']}), weights {p['weights']['default_bits']}-bit, "
        f"activations {p['activations']['bits']}-bit; method **{manifest['method']}**, seed {manifest['seed']}",
        f"- calibration: {manifest['calibration']['samples']} unlabelled samples"
        f"{_calibration_source(manifest['calibration'])}; quantization time {_timings(manifest)}",
        f"- weights: {manifest['memory']['weight_bytes']['container']} bytes as stored "
        f"({manifest['memory']['weight_bytes']['packed']} packed at bit width); peak activations "
        f"{manifest['memory']['peak_activation_bytes_batch1']} bytes at batch 1{_chip_margin(manifest['memory'])}",
        f"- ops: {', '.join(manifest['ops'])}",
        f"- interface (Python runner, `eptq_deploy.load`): {model_io.describe(qm.graph.meta)}",
        f"- made by: `{manifest['command']}`",
        f"- re-check on the runtimes: `{check}`",
    ]
    if qm.info.get("note"):
        lines += ["", qm.info["note"]]
    if manifest.get("mixed_precision"):
        lines += widths_section(manifest["mixed_precision"])
    lines += [
        "",
        "## On the real runtime",
        "",
        "| target | runtime | samples | agreement vs simulation | agreement vs float | max diff (output LSB) "
        "| top-1 float / sim / runtime | int8 ms | float ms | speed-up | threads |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, t in manifest["targets"].items():
        c, lat = t.get("checks"), t.get("latency")
        if c is None:
            lines.append(f"| {name} | {t['runtime']} | not checked (no data given) | | | | | | | | |")
            continue
        top = c.get("top1")
        tops = f"{top['float']:.2%} / {top['simulation']:.2%} / {top['runtime']:.2%}" if top else "no labels"
        lines.append(
            f"| {name} | {t['runtime']} | {c['samples']} | {agreement(c):.2%} | "
            f"{format(c['argmax_agreement_vs_float'], '.2%') if 'argmax_agreement_vs_float' in c else 'n/a'} | "
            f"{c['max_abs_diff_lsb']:.2f} | {tops} | "
            f"{lat['int8_ms'] if lat else ''} | {lat['float_ms'] if lat else ''} | "
            f"{lat['speedup_vs_float'] if lat else ''} | {lat['threads'] if lat else ''} |")
    lines += ["", "Agreement vs float is the share of samples (a segmenter's pixels) whose top class is the float model's; "
              "for several outputs (a detector's heads) agreement is the share of output values exactly the simulation's; "
              "latency is the "
              "median batch-1 time at the thread count shown (`eptq-deploy bench` takes `--threads`).",
              "", "## Feeding this model", ""]
    for name, t in manifest["targets"].items():
        lines += feeding.report_lines(name, t["model_file"], t["feeding"], qm.info.get("classes"))
    lines += ["## What each runtime reports", ""]
    lines += [f"- {name}: {runtime_line(t)}" for name, t in manifest["targets"].items()]
    lines += ["", "## Per layer", "", "![per-layer SQNR](layer_sqnr.png)", "",
              "| layer | op | source | weight bits | SQNR dB | mean Hessian score |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['layer']} | {r['op']} | {r['source']} | {r['weight_bits']} | {r['sqnr_db']} | "
              f"{'' if r.get('hessian') is None else format(r['hessian'], '.3g')} |" for r in layers]
    path.write_text("\n".join(lines) + "\n")


def _calibration_source(calib: dict[str, Any]) -> str:
    src = calib.get("source")
    return f" from {src}" if src else ""


def runtime_line(t: dict[str, Any]) -> str:
    """Output-difference distribution and the runtime's own view of the loaded model, in one line."""
    parts = []
    dist = (t.get("checks") or {}).get("diff_lsb_distribution")
    if dist:
        parts.append("output elements at 0/1/2/>2 LSB from the simulation: "
                     + " / ".join(f"{dist[k]:.2%}" for k in ("0", "1", "2", ">2")))
    ins = t.get("inspect") or {}
    if "int8_layers" in ins:
        kinds = Counter((ins.get("runtime_precisions") or {}).values())
        split = ", ".join(f"{p} {n}" for p, n in sorted(kinds.items()))
        parts.append(f"{ins['int8_layers']} of {ins['total_weighted_layers']} weighted layers run in int8"
                     + (f" ({split}: the plugin picks per layer for this CPU, see host.cpu_features)" if split else "")
                     + (f"; NOT int8: {', '.join(ins['not_int8'])}" if ins.get("not_int8") else ""))
    if ins.get("vnni") is False:
        parts.append("this CPU has no VNNI: the plugin adds u8 x i8 products in pairs in int16 with saturation, so "
                     "layers with large weights may differ from the simulation (exact on VNNI CPUs)")
    if "op_versions" in ins:
        parts.append("ops (version): " + ", ".join(f"{k} ({v})" for k, v in sorted(ins["op_versions"].items())))
    if "arena_bytes" in ins:
        parts.append(f"memory: model {ins['model_bytes']:,} bytes (flash), tensor arena {ins['arena_bytes']:,} bytes "
                     "(RAM, measured by the runtime's allocator)")
    chip = ins.get("vela")
    if chip:
        flash = chip["off_chip_flash_bytes"] or chip["on_chip_flash_bytes"] or chip["dram_bytes"] or 0
        ips = chip["inferences_per_second"]
        parts.append(f"compiled for {chip['accelerator']} ({chip['system_config']}, {chip['memory_mode']}): SRAM "
                     f"{chip['sram_bytes'] or 0:,} bytes, weights store {flash:,} bytes, {chip['npu_cycles'] or 0:,.0f} NPU "
                     f"cycles, {f'{ips:.1f}' if ips else '-'} inferences/s at {(chip['clock_hz'] or 0) / 1e6:.0f} MHz; "
                     + (f"on the CPU: {', '.join(chip['cpu_ops'])}" if chip["cpu_ops"] else "every op on the NPU"))
    sensor = ins.get("imx500")
    if sensor:
        parts.append(f"IMX500 converter {sensor['converter_version']}: {'fits' if sensor['fit'] else 'DOES NOT FIT'}, "
                     f"memory {sensor['memory_used_bytes']:,} of {sensor['memory_total_bytes']:,} bytes (margin "
                     f"{sensor['memory_margin_bytes']:,}; model {sensor['model_memory_bytes']:,}, runtime "
                     f"{sensor['runtime_memory_bytes']:,})"
                     + (f"; converter warnings: {'; '.join(sensor['warnings'])}" if sensor["warnings"] else ""))
    comp = ins.get("weight_compression")
    if isinstance(comp, dict) and "file_bytes_saved" in comp:
        parts.append(f"weights: {comp['tensors']} tensors compressed ({comp['method']}), file "
                     f"{comp['file_bytes_uncompressed']:,} -> {ins['model_bytes']:,} bytes, arena "
                     f"{comp['arena_bytes_uncompressed']:,} -> {ins['arena_bytes']:,} bytes")
    elif isinstance(comp, dict):
        parts.append(f"weights: {comp['note']}")
    if "resolver" in ins:
        parts.append("op resolver: " + ", ".join(ins["resolver"]))
    if "kernels" in ins:
        parts.append(f"kernels: {ins['kernels']}")
    if "runtime_ops" in ins and "op_versions" not in ins:
        parts.append("fused graph: " + ", ".join(f"{k} x{v}" for k, v in sorted(ins["runtime_ops"].items())))
    return "; ".join(parts) or "nothing reported"


def refuse_existing(out: Path, force: bool) -> None:
    """Fail before any work when ``out`` exists and may not be replaced."""
    if Path(out).exists() and not force:
        raise UsageError(f"output folder {Path(out).resolve()} already exists; pass --force (force=True) to replace it "
                         "or choose another --out")


def write_bundle(qm: QuantizedModel, targets: list[Any], out: Path, *, x: torch.Tensor | None = None,
                 labels: np.ndarray | None = None, force: bool = False, command: str | None = None,
                 threads: int = 1, check_command: str | None = None) -> Path:
    """Emit every target, check each on its runtime, and move the finished bundle into ``out``."""
    out = Path(out).resolve()
    refuse_existing(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would survive the rename
    except OSError as e:
        raise _write_error(out, e) from None
    try:
        entries: dict[str, Any] = {}
        sim_cache: dict[str, np.ndarray] = {}
        float_out = as_numpy(qm.forward_float(x, raw=True)) if x is not None else None  # x: the model's own layout
        out_lsb = [float(qm.graph.tensors[o].quant.scale[0]) for o in qm.graph.outputs]
        write_side_files(tmp, qm)
        model = model_section(qm)
        folded = input_contract(qm.graph)["folded"]
        for t in targets:
            folder = tmp / t.name
            folder.mkdir()
            t.emit(qm.graph, folder, quantized=True)
            t.emit(qm.float_graph, folder, quantized=False)
            entry: dict[str, Any] = {"runtime": t.runtime, "runtime_versions": t.runtime_versions(),
                                     "rounding": t.rules.rounding, "model_file": f"{t.name}/{t.model_file}",
                                     "float_model_file": f"{t.name}/{t.float_model_file}",
                                     "io": t.io_contract(qm.graph)}
            entry["feeding"] = feeding.recipe(qm.info.get("preprocessing"), entry["io"], folded, model["output"])
            if x is not None:
                runner = t.load(folder, threads=threads)
                rule = entry["rounding"] = getattr(runner, "rounding", None) or t.rules.rounding  # the kernels that ran
                if rule not in sim_cache:
                    sim_cache[rule] = as_numpy(qm.simulate(x, t.name, rounding=rule, raw=True))
                spec, seen = qm.graph.meta.get("postprocess"), []
                entry["checks"] = runtime_checks(t.name, model_io.SourceRunner(runner, qm.graph.meta, raw=True),
                                                 x.numpy(), sim_cache[rule], float_out, out_lsb,
                                                 None if spec else labels, list(qm.graph.outputs), keep=seen)
                if spec:  # label-free task scores: the file's detections or masks against the float model's
                    entry["checks"].update(tasks.file_scores(qm.graph.meta, None, seen[0], float_out))
                entry["latency"] = latency(runner, t.load(folder, float_model=True, threads=threads),
                                           model_io.to_graph_layout(qm.graph.meta, x[:1].numpy()))
            entry["inspect"] = t.inspect(folder)
            entry["files"] = _files(folder, tmp)
            entries[t.name] = entry
        layers = qm.layer_errors(x[:64] if x is not None else None) if x is not None else []
        if layers:
            _plot_layers(layers, tmp / "layer_sqnr.png")
        manifest = build_manifest(qm, entries, command, tmp, check_command)
        manifest["layers"] = layers
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=_json_default))
        write_report(tmp / "report.md", qm, manifest, layers)
        _replace(tmp, out, force)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(out, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def current_umask() -> int:
    """The process's umask (read by setting it and putting it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(where: Path, e: OSError) -> EptqError:
    """A failed write as one line: the OS's reason and the fix that reason calls for."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space there or choose another --out"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "choose a writable --out (a folder you may write to)"
    else:
        fix = "choose a writable --out with free space"
    return EptqError(f"cannot write the bundle to {where}: {reason}; {fix}; nothing was written")


def _replace(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished bundle into place; a replaced bundle comes back if the move fails."""
    if out.exists() and force:
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)  # nothing lost: the previous bundle is put back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer | np.floating):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _bundle_file(bundle: Path, rel: Any, what: str) -> Path:
    """``bundle / rel`` for a path taken from an untrusted manifest, confined to the bundle."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise BundleError(f"manifest {what} {rel!r} is not a relative path; the manifest was edited, re-export the bundle")
    root = Path(bundle).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise BundleError(f"manifest {what} {rel!r} points outside the bundle; refusing it, re-export the bundle")
    return path


def _check_files(bundle: Path, files: Any, what: str) -> None:
    if not isinstance(files, dict) or not files:
        raise BundleError(f"manifest has no file list for {what}; the manifest was edited, re-export the bundle")
    for rel, meta in files.items():
        path = _bundle_file(bundle, rel, f"{what} file")
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
            raise BundleError(f"manifest entry for {rel} has no sha256; the manifest was edited, re-export the bundle")
        if not path.is_file():
            raise BundleError(f"bundle file {rel} is missing; re-export the bundle")
        if sha256(path) != meta["sha256"]:
            raise BundleError(f"bundle file {rel} does not match its sha256 in manifest.json (changed after export); "
                              "refusing to load it, re-export the bundle")


def verify_bundle(bundle: Path, target: str | None = None) -> dict[str, Any]:
    """The manifest, checked as untrusted input: schema, paths inside the bundle, every hash.

    Nothing of the bundle is loaded before this passes, so a changed model file or an
    edited manifest is refused with the reason instead of being run.
    """
    m = read_manifest(bundle)
    if m.get("version") != MANIFEST_VERSION:
        raise BundleError(f"manifest version {m.get('version')!r} is not {MANIFEST_VERSION}; re-export the bundle "
                          f"with eptq-deploy {__version__}")
    _check_files(bundle, m.get("files"), "bundle")
    for name in ("graph.json", "graph.npz", QUANTIZATION_FILE, CALIBRATION_FILE):
        if name not in m["files"]:
            raise BundleError(f"manifest files list has no {name}; the manifest was edited, re-export the bundle")
    names = [target] if target is not None else list(m["targets"])
    for name in names:
        t = m["targets"].get(name)
        if not isinstance(t, dict):
            raise UsageError(f"bundle {bundle} has no {name!r} model; it holds: {', '.join(m['targets'])}")
        files = t.get("files")
        _check_files(bundle, files, name)
        for key in ("model_file", "float_model_file"):
            if t.get(key) not in files:
                raise BundleError(f"manifest {name}.{key} {t.get(key)!r} is not among the hashed files; the manifest "
                                  "was edited, re-export the bundle")
        if not isinstance(t.get("rounding"), str):
            raise BundleError(f"manifest {name}.rounding is missing; the manifest was edited, re-export the bundle")
    return m


def read_manifest(bundle: Path) -> dict[str, Any]:
    path = Path(bundle) / "manifest.json"
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{bundle} is not a bundle (no manifest.json); pass the folder eptq-deploy quantize wrote") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path}: {e}; re-export the bundle") from None
    if not isinstance(m, dict) or m.get("format") != "eptq-deploy bundle" or not isinstance(m.get("targets"), dict):
        raise UsageError(f"{path} is not an eptq-deploy manifest; re-export the bundle")
    return m
