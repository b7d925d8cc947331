"""The Python API: one call quantizes, one exports, one loads.

    qm = eptq_deploy.quantize(model, images, profile="int8-pot", targets=["onnx-qdq"])
    bundle = eptq_deploy.export(qm, target="onnx-qdq", out="build/")
    runner = eptq_deploy.load(bundle)

This module and the CLI are the only places in ``pipeline/`` that reach the
targets, and only through the target registry.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, fold, model_io, tasks
from .bundle import as_numpy, read_manifest, verify_bundle, write_bundle
from .capture import capture, fuse_activations
from .checks import latency, run_batches, runtime_checks
from .eptq import GRADIENT_SCOPES, HARDEN_ORDERS, EptqConfig, optimize, optimize_layerwise
from .equalize import equalize as equalize_channels
from .errors import BundleError, DataError, TargetError, UsageError
from .float_exec import pack
from .graph import QuantGraph, TargetRules
from .hessian import averaged_samples, hessian_scores
from .hw_profiles import Profile, load_profile
from .mixed_precision import check_budget, plan_widths
from .preprocess import Preset, get_preset, normalize_pixels, preset_info
from .ptq import collect_stats, layer_weight_bits, packed_weight_bytes, ptq
from .quantized import QuantizedModel, concat_batches
from .readers import check_against_source, read_source
from .sizes import parse_size
from .targets import Runner, Target, get_target, list_targets
from .toolchains import installed

METHODS = ("ptq", "eptq", "adaround")
#: the method when none is named: EPTQ, at least as accurate as PTQ on every benchmark row (README)
DEFAULT_METHOD = "eptq"
#: representative samples taken when the caller does not say (the paper's 1,024)
DEFAULT_SAMPLES = 1024


def resolve_profile(profile: str | os.PathLike | Profile, weight_bits: int | None = None) -> Profile:
    if isinstance(profile, Profile):
        return profile.with_weight_bits(weight_bits) if weight_bits is not None else profile
    return load_profile(profile, weight_bits=weight_bits)


def resolve_targets(targets: str | list[str] | tuple[str, ...] | None, profile: Profile) -> list[Target]:
    """Target objects for ``targets`` ("all", a name, a list; None: the profile's native one)."""
    if targets is None:
        names = [profile.native_target]
    elif isinstance(targets, str):
        names = [n.strip() for n in targets.split(",") if n.strip()]
    else:
        names = list(targets)
    if names == ["all"]:  # every target that can run here: a compiler target only where its toolchain is installed
        every = [get_target(n) for n, _ in list_targets()]
        names = [t.name for t in every if t.toolchain is None or installed(t.toolchain)]
    if not names:
        raise UsageError("no target given; pass one of: " + ", ".join(n for n, _ in list_targets()))
    return [get_target(n) for n in dict.fromkeys(names)]


def resolve_target_options(tgts: list[Target], given: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Each target's options, validated and with its defaults (targets that take none are left out)."""
    given = dict(given or {})
    names = {t.name for t in tgts}
    stray = sorted(set(given) - names)
    if stray:
        raise UsageError(f"options given for {', '.join(stray)}, which is not among the targets "
                         f"({', '.join(sorted(names))}); add it to the targets or drop its options")
    return {t.name: t.check_options(given.get(t.name, {})) for t in tgts if t.options}


def check_pair(profile: Profile, target: Target) -> None:
    """Refuse, before any work, a profile whose grids the target cannot express."""
    r = target.rules
    fix = "pick another profile (eptq-deploy profiles) or another target (eptq-deploy targets)"
    w_bits = {profile.weights.bits, profile.first_layer_weight_bits or 0, profile.last_layer_weight_bits or 0} - {0}
    if max(w_bits) > r.max_weight_bits:
        raise TargetError(f"profile {profile.name} uses {max(w_bits)}-bit weights but target {target.name} stores "
                          f"at most {r.max_weight_bits}-bit weights; {fix}")
    if profile.activations.bits not in r.activation_bits:
        raise TargetError(f"profile {profile.name} uses {profile.activations.bits}-bit activations but target "
                          f"{target.name} runs {'/'.join(map(str, r.activation_bits))}-bit activations only; {fix}")
    if not profile.weights.per_channel and not r.per_tensor_weights:
        raise TargetError(f"target {target.name} needs per-channel weights but profile {profile.name} is per-tensor; {fix}")
    if not profile.activations.symmetric and not r.asymmetric_activations:
        raise TargetError(f"target {target.name} has no zero points for activations but profile {profile.name} is "
                          f"asymmetric; {fix}")
    if r.power_of_two_activations and not profile.activations.power_of_two:
        raise TargetError(f"target {target.name} takes power-of-two activation thresholds only but profile "
                          f"{profile.name} has free scales; {fix}")


def _as_tensor(data: Any, samples: int | None, seed: int, picked: list[int] | None = None) -> torch.Tensor:
    from .data import take_samples

    if samples is None:
        x = take_samples(data, DEFAULT_SAMPLES, seed=seed, at_most=True, picked=picked)
    else:
        x = take_samples(data, samples, seed=seed, picked=picked)
    if x.dim() != 4:
        raise DataError(f"representative data has shape {tuple(x.shape)}; expected a batch of images (N, C, H, W), or (N, H, W, C) for a TFLite or Keras file")
    if not torch.isfinite(x).all():
        raise DataError("representative data contains NaN or Inf values; clean or re-export the images")
    return x


def check_sample_shape(g: QuantGraph, x: Any, what: str) -> Any:
    """``x`` unchanged when its samples have the shape the model takes in its users' layout; else a
    one-line error saying which shape (and layout) the model takes."""
    want = model_io.source_shape(g.meta, g.tensors[g.inputs[0]].shape)[1:]
    if tuple(x.shape[1:]) != tuple(want):
        layout = model_io.interface(g.meta)["source_layout"]
        raise DataError(f"{what} has sample shape {tuple(x.shape[1:])} but the model takes {tuple(want)} "
                        f"({layout}, batch first); pass images shaped as the model's input"
                        + (" (NHWC: channels last, as the file takes them)" if layout == "NHWC" else ""))
    return x


def _check_pixels(x: torch.Tensor) -> None:
    """Folded models take pixels: normalised data (negative values) given to one is a mistake."""
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 255:
        raise DataError(f"with fold_preprocessing the data must be RGB pixels 0..255 (float NCHW), but it holds values "
                        f"in [{lo:.3g}, {hi:.3g}]; pass unnormalised images (eptq_deploy.data.to_pixels converts "
                        "normalised ones back)")


def quantize(model: Any, data: Any, *, profile: str | os.PathLike | Profile = "int8-pot",
             targets: str | list[str] | None = None, method: str | None = None, weight_bits: int | None = None,
             samples: int | None = None, seed: int = 0, calibration_batch_size: int = 64, progress: bool = True,
             fold_preprocessing: str | Preset | None = None, input_shape: tuple[int, ...] | None = None,
             outputs: Sequence[str] | None = None, postprocess: str | dict[str, Any] | None = None,
             equalize: bool = True, target_options: dict[str, dict[str, Any]] | None = None,
             weight_memory: int | str | None = None, **options: Any) -> QuantizedModel:
    """Quantize ``model`` for ``targets`` under ``profile`` from unlabelled ``data``.

    ``data``: a tensor or array (N, C, H, W), an iterable of batches, or a DataLoader,
    preprocessed as the model expects; ``samples`` of them are used (default: up to
    1,024, fewer if fewer are given), ``calibration_batch_size`` at a time for the statistics (EPTQ's
    own ``batch_size`` option is its optimisation step's). ``targets`` (default: the profile's native
    target) are the files this model will be exported to; their rules shape the
    parameters, and an impossible profile/target pair fails here before any work.

    ``fold_preprocessing`` (a preset or its name) folds that preset's normalisation into
    the first layer (see ``fold.py``): the quantized model then takes RGB pixels
    0..255, so ``data`` here, and every input given to it later (simulate, export's
    check data, runners), is raw pixels as float NCHW (``data.to_pixels`` converts
    normalised tensors back).

    A model file (``.onnx``, ``.tflite``, ``.h5``, ``.keras``; see ``readers``) takes ``data``
    in its own layout (NHWC for TFLite and Keras files); ``input_shape`` (C, H, W for ONNX)
    sizes its dynamic input dimensions.

    The integer model ends at ``outputs`` (tensor names) where given (``[]``: where the source model
    ends, every op in the integer model); by default where the
    model's final float work starts (``model_io.cut_graph``: softmax, sigmoid heads, the concat
    merging box and class heads, a segmenter's last upsampling); that tail runs in float on the
    host, and ``QuantizedModel.graph.meta["cut"]`` says where the cut fell.

    ``equalize`` (default on) rescales the channels of every SiLU whose rescale can be made exact
    (``equalize.py``: a 1x1 depthwise layer per SiLU, the float model unchanged) so one per-tensor
    grid serves them all; ``QuantizedModel.info["equalized_silu"]`` lists the layers.

    ``target_options`` (target name -> its options, ``Target.options``; e.g. ``{"ethos-u":
    {"accelerator": "ethos-u65-256"}}``) are checked now and kept in the graph for export. A target
    that calls a chip compiler is refused here if its toolchain is not installed.

    ``weight_memory`` (bytes, or a size such as "300KB" = 300,000 bytes, "300KiB", "1.5MB") makes the
    weight widths per layer: chosen among the profile's allowed widths so the packed weights fit
    it with the least expected loss (``mixed_precision.py``: Hessian sensitivity, an exact integer
    program), then quantized by ``method`` on that configuration. A budget nothing fits is refused
    before any work; ``QuantizedModel.weight_bits`` and ``.weight_bytes`` give the result.

    ``postprocess`` names what the outputs mean (``tasks.FAMILIES``: "yolox", "ssd", "decoded",
    "segment"; or a spec from ``tasks.postprocess_spec``): the bundle's manifest then ships the
    decode parameters and thresholds, and ``check`` scores detections (mAP) or masks (mIoU).
    """
    method = method or DEFAULT_METHOD
    if isinstance(postprocess, str) and postprocess not in tasks.FAMILIES:
        raise UsageError(f"unknown postprocess {postprocess!r}; choose one of {', '.join(tasks.FAMILIES)}")
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    opts = method_options(method, options)
    budget = None if weight_memory is None else parse_size(weight_memory, "weight_memory")
    if budget is not None and weight_bits is not None:
        raise UsageError("weight_bits and weight_memory both given: a budget chooses the widths per layer; "
                         "give one of them")
    prof = resolve_profile(profile, weight_bits)
    tgts = resolve_targets(targets, prof)
    for t in tgts:
        check_pair(prof, t)
        t.ready()
    t_opts = resolve_target_options(tgts, target_options)
    pre = None
    if fold_preprocessing is not None:
        pre = get_preset(fold_preprocessing)
        fold.pixel_grid(prof)  # an impossible input grid fails before any work
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    src = read_source(model, input_shape)  # a model file is read (and a bad one refused) before the data is touched
    if src is None and input_shape is not None:
        raise UsageError("input_shape sizes a model file's dynamic input; a PyTorch model takes the data's shape, "
                         "drop input_shape")
    picked: list[int] = []
    x = _as_tensor(data, samples, seed, picked)
    if src is not None:  # data comes in the file's own layout (NHWC for TFLite and Keras files)
        x = model_io.to_graph_layout(src.graph.meta, check_sample_shape(src.graph, x, "representative data"))
    if pre is not None:
        _check_pixels(x)
    example = x[:8] if pre is None else normalize_pixels(x[:8], pre)
    if src is None:
        fg = capture(model, example[:1], fusing=prof.fusing, profile_name=prof.name)
    else:  # the read graph must compute what the file's own runtime computes, before any work
        check_against_source(src, example)
        fg = fuse_activations(src.graph, prof.fusing)
    # the model's final float work (softmax, sigmoid heads, merging concats, a last upsampling) runs on the host
    fg = model_io.cut_graph(fg, outputs)
    if postprocess is not None:
        hw = fg.tensors[fg.inputs[0]].shape[2:]
        fg.meta["postprocess"] = (tasks.postprocess_spec(postprocess, hw) if isinstance(postprocess, str)
                                  else dict(postprocess))
    if pre is not None:
        fg = fold.fold_preprocessing(fg, pre)
    for t in tgts:  # an op a target cannot write fails now, not after minutes of calibration and EPTQ
        t.validate(fg)
    if budget is None:
        check_chip_memory(fg, prof)
    else:
        check_budget(fg, prof, budget)
    t_capture = time.perf_counter() - t0
    batches = [x[i:i + calibration_batch_size] for i in range(0, len(x), calibration_batch_size)]
    equalized = equalize_channels(fg, batches, prof.activations.bits) if equalize else []
    stats = collect_stats(fg, batches, seed=seed, progress=progress)
    timings = {"capture": round(t_capture, 3), "calibration": round(time.perf_counter() - t0 - t_capture, 3)}
    info: dict[str, Any] = {"method": method, "seed": seed, "samples": int(len(x)), "tool_version": __version__,
                            "options": opts,  # which of the given samples calibrated (the CLI names files instead)
                            "calibration": {"source": "data given to quantize()", "kind": "in-memory data",
                                            "indices": picked},
                            "equalized_silu": equalized}
    if pre is not None:
        info["preprocessing"] = preset_info(pre)
    rules = [t.rules for t in tgts]
    hess, widths = None, None
    if budget is not None:  # the widths first, from the same Hessian pass EPTQ uses
        t = time.perf_counter()
        hess = _hessians(fg, x, opts, seed, progress, info)
        timings["hessian"] = round(time.perf_counter() - t, 3)
        plan = plan_widths(fg, prof, hess[1], budget)
        widths, info["mixed_precision"] = plan.bits, plan.to_dict()
        timings["widths"] = round(time.perf_counter() - t - timings["hessian"], 3)
    if method == "ptq":
        qg = ptq(fg, stats, prof, rules, weight_bits=widths)
    else:
        qg = _eptq(fg, x, stats, prof, rules, opts, seed, progress, timings, info, hess, widths)
    timings["total"] = round(time.perf_counter() - t0, 3)
    info["timings_s"] = timings
    qg.meta.update({"profile": prof.name, "method": method, "targets": [t.name for t in tgts]})
    if t_opts:
        qg.meta["target_options"] = t_opts
    return QuantizedModel(qg, fg, prof, [t.name for t in tgts], {t.name: t.rules.rounding for t in tgts}, info)


def check_chip_memory(g: QuantGraph, prof: Profile) -> None:
    """Refuse, before any work, weights that alone overflow the memory the profile states for its chip
    (packed at the profile's widths). Whether weights and activations together fit is the chip
    compiler's verdict at export, where a target runs one."""
    if prof.memory_bytes is None:
        return
    need = packed_weight_bytes(g, layer_weight_bits(g, prof), prof.bias_bits)
    if need > prof.memory_bytes:
        lower = [b for b in prof.weights.allowed_bits if b < prof.weights.bits]
        fix = f"use fewer weight bits (--weight-bits {max(lower)})" if lower else "use a smaller model"
        raise UsageError(f"the model's weights need {need:,} bytes at {prof.weights.bits}-bit, more than the "
                         f"{prof.memory_bytes:,} bytes of memory profile '{prof.name}' states for its chip; {fix}")


#: the Hessian pass's options (EPTQ's own come from ``EptqConfig``; ``seed`` is quantize's).
#: The attention is off by default: on average it never beat uniform sample weights, at the same
#: cost (README, "What the Hessian buys"); the pass still runs for HMSE.
HESSIAN_OPTIONS: dict[str, Any] = {"hessian": "none", "n_draws": None, "hmse": True}
EPTQ_OPTIONS: dict[str, Any] = {f.name: f.default for f in fields(EptqConfig) if f.name != "seed"}


def method_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Validated options of ``method`` (EPTQ's knobs; PTQ takes none)."""
    known: dict[str, Any] = {**EPTQ_OPTIONS, **HESSIAN_OPTIONS} if method in ("eptq", "adaround") else {}
    unknown = sorted(set(options) - set(known))
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise UsageError(f"unknown option(s) {', '.join(unknown)} for method {method!r}; allowed: {allowed}")
    out = {**known, **options}
    if method in ("eptq", "adaround"):
        if out["hessian"] not in ("eptq", "none"):
            raise UsageError(f"hessian={out['hessian']!r}; choose 'eptq' (label-free Hessian scores) or 'none' (uniform)")
        if out["harden"] not in HARDEN_ORDERS:
            raise UsageError(f"harden={out['harden']!r}; choose one of {', '.join(HARDEN_ORDERS)}")
        if out["scope"] not in GRADIENT_SCOPES:
            raise UsageError(f"scope={out['scope']!r}; choose one of {', '.join(GRADIENT_SCOPES)}")
        for k in ("iters", "batch_size", "n_draws"):
            if (out[k] is not None or k == "iters") and (not isinstance(out[k], int) or out[k] < 1):
                raise UsageError(f"{k}={out[k]!r} must be a positive integer")
        if out["max_memory"] is not None and (not isinstance(out["max_memory"], int) or out["max_memory"] < 1):
            raise UsageError(f"max_memory={out['max_memory']!r} must be a number of bytes, e.g. 4000000000")
        out["resume"] = bool(out["resume"])
    return out


def _hessians(fg: QuantGraph, x: torch.Tensor, opts: dict[str, Any], seed: int, progress: bool, info: dict[str, Any],
              weights: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The label-free Hessian pass: per-sample layer scores and (``weights``) weight Hessian diagonals.

    Without the attention only averages over the samples are used: a random share of a large
    set serves them (``averaged_samples``)."""
    n_draws = opts.get("n_draws", HESSIAN_OPTIONS["n_draws"])
    if opts.get("hessian") != "eptq":  # PTQ under a weight budget has no options
        n = averaged_samples(fg, len(x), n_draws)
        if n < len(x):
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n].sort().values]
    info["hessian_samples"] = int(len(x))
    step = min(64, fg.batch_size())  # backward passes keep every activation: fewer samples at 224x224
    hb = [x[i:i + step] for i in range(0, len(x), step)]
    return hessian_scores(fg, hb, n_draws=n_draws, seed=seed, weights=weights, progress=progress)


def _eptq(fg: QuantGraph, x: torch.Tensor, stats: Any, prof: Profile, rules: list[TargetRules], opts: dict[str, Any],
          seed: int, progress: bool, timings: dict[str, float], info: dict[str, Any],
          hess: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None,
          widths: dict[str, int] | None = None) -> QuantGraph:
    """Hessian scores (``hess`` where the pass already ran), Hessian-weighted thresholds, then
    network-wise rounding optimisation; ``widths``: per-layer weight bits, else the profile's."""
    if not fg.weighted_nodes():  # no rounding to learn: the calibrated grids are the whole result
        info["eptq_log"] = {"skipped": "the model has no weighted layer; its grids come from calibration (PTQ)"}
        return ptq(fg, stats, prof, rules)
    t = time.perf_counter()
    scores = whess = None
    if hess is not None:
        scores, whess = hess
    elif (opts["hessian"] == "eptq" and info["method"] == "eptq") or opts["hmse"]:
        scores, whess = _hessians(fg, x, opts, seed, progress, info, weights=opts["hmse"])
        timings["hessian"] = round(time.perf_counter() - t, 3)
    else:
        timings["hessian"] = 0.0
    if scores is not None:
        info["hessian_scores"] = {n.name: float(np.mean(scores[n.outputs[0]])) for n in fg.weighted_nodes()}
    qg = ptq(fg, stats, prof, rules, hessians=whess if opts["hmse"] else None, weight_bits=widths)
    cfg = EptqConfig(seed=seed, **{k: opts[k] for k in EPTQ_OPTIONS})
    t = time.perf_counter()
    if info["method"] == "adaround":
        qg, log = optimize_layerwise(qg, fg, x, cfg, prof.bias_bits, progress)
    else:
        qg, log = optimize(qg, fg, x, scores if opts["hessian"] == "eptq" else None, cfg, prof.bias_bits, progress)
    timings["optimisation"] = round(time.perf_counter() - t, 3)
    info["eptq_log"] = log
    return qg


def export(qmodel: QuantizedModel, target: str | list[str] | None = None, out: str | os.PathLike = "build/", *,
           data: Any = None, labels: np.ndarray | None = None, force: bool = False, command: str | None = None,
           threads: int = 1, check_samples: int | None = 500, check_command: str | None = None) -> Path:
    """Write the bundle for ``target`` (default: every target the model was quantized for) to ``out``.

    With ``data``, every file is run on its runtime and the report states agreement,
    accuracy (with ``labels``) and latency; the bundle appears whole or not at all.
    ``check_command`` is the re-check command the manifest and report state (the CLI
    gives one naming its data; without it the report shows the command to complete).
    """
    names = qmodel.targets if target in (None, "all") else ([target] if isinstance(target, str) else list(target))
    for n in names:
        if n not in qmodel.targets:
            raise UsageError(f"the model was quantized for {', '.join(qmodel.targets)}, not {n!r}; "
                             f"quantize again with targets including {n!r}")
    x = None
    if data is not None:
        from .data import take_samples

        x = check_sample_shape(qmodel.graph, take_samples(data, None), "check data")  # in the model's own layout
        if fold.is_folded(qmodel.graph):
            _check_pixels(x)
        if check_samples is not None:
            x = x[:check_samples]
            labels = None if labels is None else np.asarray(labels)[:check_samples]
    chosen = [get_target(n) for n in names]
    for t in chosen:  # a compiler target whose toolchain went missing since quantize: refused before writing
        t.ready()
    return write_bundle(qmodel, chosen, Path(out), x=x, labels=labels, force=force,
                        command=command, threads=threads, check_command=check_command)


def _pick_target(bundle_dir: Path, manifest: dict[str, Any], target: str | None) -> list[str]:
    names = list(manifest["targets"])
    if target is None or target == "all":
        return names
    if target not in names:
        raise UsageError(f"bundle {bundle_dir} has no {target!r} model; it holds: {', '.join(names)}")
    return [target]


def load(bundle_dir: str | os.PathLike, target: str | None = None, threads: int = 1) -> Runner:
    """A runner for the bundle's model file on its own runtime (``.run(x) -> y``, float in and out).

    The bundle is verified first (manifest schema, every file's sha256).
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if target is None and len(manifest["targets"]) != 1:
        raise UsageError(f"bundle {bundle_dir} holds several targets ({', '.join(manifest['targets'])}); "
                         "pass target=NAME")
    (name,) = _pick_target(bundle_dir, manifest, target)
    verify_bundle(bundle_dir, name)
    return model_io.SourceRunner(get_target(name).load(bundle_dir / name, threads=threads), manifest_interface(manifest))


def manifest_interface(manifest: dict[str, Any]) -> dict[str, Any]:
    """The model's interface (``model_io``) as a bundle's manifest states it."""
    model = manifest["model"]
    return {"source_layout": manifest["input"].get("layout", "NCHW"), "float_tail": model.get("float_tail", []),
            "cut": model.get("cut") or {}, "source_outputs": model.get("source_outputs", [])}


def check(bundle_dir: str | os.PathLike, data: Any, labels: Any = None, target: str | None = None,
          threads: int = 1, names: Sequence[str] | None = None,
          sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, dict[str, Any]]:
    """Re-run a bundle's model file(s) on their runtimes: agreement, LSB distance, the task's score.

    The simulation is recomputed from the bundle's own quantized graph with the
    rounding rule each target declared; "float" is the target's float model file on
    the same runtime. The bundle is verified (schema, hashes) before anything loads.

    ``labels``: class indices for a classifier (top-1); for a bundle with a detection
    ``postprocess``, COCO annotations (instances.json: ``map``, ``map50``, ``float_map``), for a
    segmenter a folder of label masks (``miou``, ``float_miou``); ``map_vs_float`` / ``miou_vs_float``
    need no labels. ``names`` (the images' file names) match annotations to images, ``sizes`` (their
    original width, height) map boxes back through the bundle's preprocessing.
    """
    from .data import take_samples
    from .simulate import dequantize_outputs, get_rule, run_integer

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    chosen = _pick_target(bundle_dir, manifest, target)
    for n in chosen:
        verify_bundle(bundle_dir, n)
    g = QuantGraph.load(bundle_dir)
    x = check_sample_shape(g, take_samples(data, None), "check data")
    if fold.is_folded(g):
        _check_pixels(x)
    xn = x.numpy()  # the model's own layout; the runners below take it as the source model did
    xg = model_io.to_graph_layout(g.meta, x)
    results: dict[str, dict[str, Any]] = {}
    sims: dict[str, np.ndarray] = {}
    for n in chosen:
        t = get_target(n)
        runner = model_io.SourceRunner(t.load(bundle_dir / n, threads=threads), g.meta, raw=True)
        rule_name = getattr(runner, "rounding", None) or manifest["targets"][n]["rounding"]  # this machine's kernels
        try:
            rule = get_rule(rule_name)
        except ValueError as e:
            raise UsageError(f"{e}; re-export the bundle with this version of eptq-deploy") from None
        if rule_name not in sims:
            with torch.no_grad():
                parts = [dequantize_outputs(g, run_integer(g, xg[i:i + 256], rule)) for i in range(0, len(xg), 256)]
            sims[rule_name] = model_io.to_user(g.meta, as_numpy(concat_batches(parts)), raw=True)
        float_runner = model_io.SourceRunner(t.load(bundle_dir / n, float_model=True, threads=threads), g.meta, raw=True)
        float_out = pack(run_batches(float_runner, xn, f"{n} float"))
        lsbs = [float(g.tensors[o].quant.scale[0]) for o in g.outputs]
        spec = g.meta.get("postprocess")
        seen: list[Any] = []
        res = runtime_checks(n, runner, xn, sims[rule_name], float_out, lsbs, None if spec else labels, list(g.outputs),
                             keep=seen)
        if spec:
            if labels is not None and not isinstance(labels, (str, os.PathLike)):
                raise UsageError("a detector's or segmenter's labels are a path: COCO instances.json or a folder of masks")
            res.update(tasks.file_scores(g.meta, (manifest.get("input") or {}).get("preprocessing"), seen[0], float_out,
                                         labels, names, sizes))
        res["float_reference"] = f"{t.float_model_file} on {t.runtime}"
        res["latency"] = latency(runner.runner, float_runner.runner, xg[:1].numpy())  # the files alone
        results[n] = {"runtime": t.runtime, "checks": res, "latency": res.pop("latency")}
    return results


def bench(bundle_dir: str | os.PathLike, target: str | None = None, threads: int = 1,
          repeats: int = 100) -> dict[str, dict[str, Any]]:
    """Median batch-1 latency of each model file and its float twin, on its own runtime."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    names = _pick_target(bundle_dir, manifest, target)
    shape = [1, *manifest["input"]["shape"][1:]] if isinstance(manifest.get("input"), dict) else None
    if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise BundleError(f"manifest input.shape {shape!r} is not a list of sizes; re-export the bundle")
    x1 = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out: dict[str, dict[str, Any]] = {}
    for n in names:
        verify_bundle(bundle_dir, n)
        t = get_target(n)
        x1g = model_io.to_graph_layout(manifest_interface(manifest), x1)  # the files' runners take the graph's layout
        out[n] = {"runtime": t.runtime,
                  "latency": latency(t.load(bundle_dir / n, threads=threads),
                                     t.load(bundle_dir / n, float_model=True, threads=threads), x1g, repeats)}
    return out
