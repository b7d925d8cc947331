"""The ``eptq-deploy`` command line, a thin layer over the Python API.

Every user error ends as one line on stderr and exit code 2 (usage) or 1 (run
time); never a traceback and never a half-written bundle.
"""

from __future__ import annotations

import shlex
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from . import __version__
from .checks import agreement
from .errors import DataError, EptqError, UsageError
from .preprocess import DEFAULT_PRESET, describe_presets
from .sizes import parse_size

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="EPTQ post-training quantization for edge targets: quantize, export, check.")
T = TypeVar("T")


def _warning_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    """Show a warning as one ``warning:`` line (not Python's file:line plus source line)."""
    text = " ".join(str(message).split())
    typer.echo(f"warning: {text}", err=True)


def _guard(fn: Callable[[], T]) -> T:
    """Run a command body; turn the project's errors into one line and an exit code."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line
            return fn()
    except EptqError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: stopped, no bundle was written", err=True)
        raise typer.Exit(130) from None


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--{what} {text!r} is not a comma-separated list of numbers; e.g. 0.485,0.456,0.406") from None


def _ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"--{what} {text!r} is not a comma-separated list of sizes; e.g. 3,224,224") from None


def _command_line() -> str:
    return "eptq-deploy " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@app.command()
def quantize(
    model: Annotated[str | None, typer.Argument(help="module.py:factory, package.module:factory, torchvision:NAME, "
                                                     "a built-in name (resnet20, efficientnet_lite0, ...) or a .pt2 "
                                                     "program. Omit it to run the embedded demo.")] = None,
    data: Annotated[Path | None, typer.Option(help="Representative images: a folder, or an .npz/.npy array "
                                                   "(uint8 NHWC under 'images', or float NCHW used as is).")] = None,
    profile: Annotated[str | None, typer.Option(help="Hardware profile name or YAML file (default: the target's "
                                                     "native profile, or int8-pot).")] = None,
    target: Annotated[str | None, typer.Option(help="Target name(s), comma-separated, or 'all' (default: the "
                                                    "profile's native target).")] = None,
    method: Annotated[str | None, typer.Option(help="Quantization method: eptq (default: network-wise "
                                                     "rounding optimisation, minutes) or ptq (calibrated "
                                                     "round-to-nearest, seconds), or adaround.")] = None,
    iters: Annotated[int | None, typer.Option(help="EPTQ optimisation iterations (default 800).")] = None,
    hessian: Annotated[str | None, typer.Option(help="EPTQ's sample attention: none (default: every sample weighs "
                                                      "the same) or eptq (each sample weighed by its label-free "
                                                      "Hessian score at each layer, the paper's).")] = None,
    scope: Annotated[str | None, typer.Option(help="How far back each layer's loss sends gradient in EPTQ: "
                                                    "network (the paper's), block or layer.")] = None,
    max_memory: Annotated[str | None, typer.Option(help="Memory for EPTQ's float-activation cache, e.g. 4G or "
                                                        "512M (default: a quarter of the RAM); above it the "
                                                        "activations are recomputed per batch instead.")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Save the EPTQ optimisation state here as it runs "
                                                             "(kept on Ctrl-C; outside the bundle).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted EPTQ run from --checkpoint-dir.")] = False,
    weight_bits: Annotated[int | None, typer.Option(help="Weight bit width, one the profile allows.")] = None,
    weight_memory: Annotated[str | None, typer.Option(help="Budget for the packed weights, e.g. 300KB (300,000 "
                                                           "bytes), 300KiB or 1.5MB: per-layer widths from the "
                                                           "profile's allowed ones, chosen by Hessian sensitivity "
                                                           "(instead of --weight-bits).")] = None,
    input_shape: Annotated[str | None, typer.Option(help="Sizes for a model file's dynamic input, in its layout "
                                                         "without the batch: C,H,W for ONNX, e.g. 3,224,224.")] = None,
    outputs: Annotated[str | None, typer.Option(help="Tensor names, comma-separated, where the integer model ends; "
                                                     "the ops after them run in float on the host (default: found, "
                                                     "before the softmax/sigmoid heads, merging concats, last resize).")] = None,
    postprocess: Annotated[str | None, typer.Option(help="What the outputs are, for decode parameters in the manifest "
                                                         "and task scores in checks: yolox, ssd (BlazeFace anchors), "
                                                         "decoded ([N, A, 5 + C] boxes) or segment.")] = None,
    accelerator: Annotated[str | None, typer.Option(help="Ethos-U accelerator for --target ethos-u (Vela's "
                                                         "--accelerator-config, default ethos-u55-128).")] = None,
    equalize: Annotated[bool, typer.Option(help="Rescale each SiLU's channels exactly (a 1x1 depthwise layer per "
                                                "SiLU) so one activation grid serves them all.")] = True,
    weights: Annotated[Path | None, typer.Option(help="State-dict file for MODEL (loaded with weights_only=True).")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Load a pickled full model: this RUNS CODE FROM THE FILE; only "
                                                    "for files you trust.")] = False,
    labels: Annotated[Path | None, typer.Option(help="Labels for the held-out check: a CSV (filename,class_index) "
                                                     "for an image folder (an .npz's 'labels' are used by default).")] = None,
    preset: Annotated[str | None, typer.Option(help=f"Preprocessing preset: {describe_presets()}; bicubic resize "
                                                     "of the shorter side, then (x * scale - mean) / std. Default: "
                                                     "the built-in model's own (resnet*: cifar, efficientnet_lite0: "
                                                     f"lite), else {DEFAULT_PRESET}.")] = None,
    resize: Annotated[int | None, typer.Option(help="Shorter side before the crop (overrides the preset).")] = None,
    crop: Annotated[int | None, typer.Option(help="Centre crop size (overrides the preset).")] = None,
    mean: Annotated[str | None, typer.Option(help="Per-channel mean, e.g. 0.485,0.456,0.406.")] = None,
    std: Annotated[str | None, typer.Option(help="Per-channel std, e.g. 0.229,0.224,0.225.")] = None,
    fold_preprocessing: Annotated[bool, typer.Option(help="Fold the preset's normalisation into the first layer: "
                                                          "the exported model takes uint8 RGB pixels 0..255.")] = False,
    samples: Annotated[int | None, typer.Option(help="Calibration samples (default: up to 1024).")] = None,
    check_samples: Annotated[int, typer.Option(help="Held-out samples run on each runtime for the report.")] = 500,
    skip_bad_data: Annotated[bool, typer.Option("--skip-bad-data/--strict-data",
                                                help="Skip unreadable or non-image files in a --data folder "
                                                     "(counted in one warning), or refuse the folder.")] = True,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bundle).")] = 0,
    out: Annotated[Path, typer.Option(help="Bundle folder to create.")] = Path("build/bundle"),
    force: Annotated[bool, typer.Option(help="Replace an existing bundle folder.")] = False,
    threads: Annotated[int, typer.Option(help="Threads for torch and the runtimes.")] = 2,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Quantize MODEL for a target and write a checked bundle."""

    def body() -> None:
        import torch

        torch.set_num_threads(threads)
        from .api import DEFAULT_METHOD

        if model is None:
            from .demo import DEMO_METHOD, run_demo

            run_demo(out=out, force=force, threads=threads, progress=progress, command=_command_line(),
                     method=method or DEMO_METHOD)
            return
        chosen = method or DEFAULT_METHOD
        options: dict[str, Any] = {} if iters is None else {"iters": iters}
        if hessian is not None:
            options["hessian"] = hessian
        if scope is not None:
            options["scope"] = scope
        if max_memory is not None:
            options["max_memory"] = parse_size(max_memory, "--max-memory")
        if weight_memory is not None:
            if weight_bits is not None:
                raise UsageError("--weight-bits and --weight-memory both given: a budget chooses the widths per "
                                 "layer; give one of them")
            options["weight_memory"] = parse_size(weight_memory, "--weight-memory")
        if checkpoint_dir is not None or resume:
            if chosen != "eptq":
                raise UsageError(f"--checkpoint-dir/--resume apply to --method eptq, not {chosen}; drop them or use eptq")
            options.update(checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None, resume=resume)
        if outputs is not None:
            options["outputs"] = [o.strip() for o in outputs.split(",") if o.strip()]
        if postprocess is not None:
            options["postprocess"] = postprocess
        if not equalize:
            options["equalize"] = False
        if accelerator is not None:
            options["target_options"] = {"ethos-u": {"accelerator": accelerator}}
        run_quantize(model, data, profile, target, chosen, weight_bits, weights, allow_pickle, preset, resize, crop,
                     _floats(mean, "mean"), _floats(std, "std"), samples, check_samples, seed, out, force, threads,
                     progress, options, labels, skip_bad=skip_bad_data, fold=fold_preprocessing,
                     input_shape=_ints(input_shape, "input-shape"))

    _guard(body)


def run_quantize(model: str, data: Path | None, profile: str | None, target: str | None, method: str,
                 weight_bits: int | None, weights: Path | None, allow_pickle: bool, preset: str | None,
                 resize: int | None, crop: int | None, mean: Any, std: Any, samples: int | None, check_samples: int,
                 seed: int, out: Path, force: bool, threads: int, progress: bool,
                 options: dict[str, Any] | None = None, labels_path: Path | None = None,
                 skip_bad: bool = True, fold: bool = False, input_shape: tuple[int, ...] | None = None) -> Path:
    """Load, quantize, export: what ``eptq-deploy quantize MODEL`` does.

    With ``fold`` the images are loaded normalised as usual and converted back to their
    pixels (``data.to_pixels``, exact for images), which the folded model takes.
    """
    from . import api, model_io
    from .bundle import calibration_record, refuse_existing
    from .data import load_class_names, load_data, load_labels
    from .models import load_model
    from .preprocess import get_preset, preset_info, to_pixels
    from .readers import SourceGraph

    if data is None:
        raise UsageError("--data is required with a MODEL: give an image folder or an .npz/.npy array")
    if not Path(data).exists():
        raise UsageError(f"data path not found: {data}; give an image folder, .npz or .npy")
    refuse_existing(out, force)
    prof_name = profile
    if prof_name is None:
        prof_name = _native_profile(target)
    prof = api.resolve_profile(prof_name, weight_bits)
    tgts = api.resolve_targets(target, prof)  # fail on impossible pairs before loading anything
    for t in tgts:
        api.check_pair(prof, t)
    net, hints = load_model(model, str(weights) if weights else None, allow_pickle=allow_pickle, seed=seed,
                            input_shape=input_shape)
    if isinstance(net, SourceGraph) and crop is None and resize is None:  # a model file states its input size
        _, h, w = net.graph.tensors[net.graph.inputs[0]].shape[1:]
        crop = h if h == w else None
    pre = get_preset(preset or hints.get("preset"), resize=resize, crop=crop, mean=mean, std=std)
    names: list[str] = []
    x = load_data(data, pre, skip_bad=skip_bad, names=names)
    if isinstance(net, SourceGraph):  # images load as NCHW; a TFLite or Keras file takes them NHWC
        x = model_io.to_source_layout(net.graph.meta, x)
    if fold:
        x = to_pixels(x, pre)
    labels = load_labels(labels_path if labels_path is not None else data, names=names)
    n_cal = min(samples or api.DEFAULT_SAMPLES, len(x))
    if samples is not None and samples > len(x):
        raise UsageError(f"--samples {samples} but {data} holds only {len(x)} samples; lower --samples or add data")
    calib = x[:n_cal]
    held = x[n_cal:n_cal + check_samples]
    held_labels = labels[n_cal:n_cal + check_samples] if labels is not None and len(labels) == len(x) else None
    if len(held) == 0:
        typer.echo(f"note: all {len(x)} samples were used for calibration; the runtime checks reuse the first "
                   f"{min(check_samples, len(x))} of them (give more data for a held-out check)", err=True)
        held = x[:check_samples]
        held_labels = labels[:check_samples] if labels is not None and len(labels) == len(x) else None
    t0 = time.perf_counter()
    qm = api.quantize(net, calib, profile=prof, targets=[t.name for t in tgts], method=method, seed=seed,
                      progress=progress, fold_preprocessing=pre if fold else None, **(options or {}))
    qm.info["preprocessing"] = preset_info(pre)
    qm.info["model_name"] = hints.get("name", model)
    qm.info["weights"] = hints.get("weights", "as given")
    qm.info["calibration"] = calibration_record(Path(data), names[:n_cal], n_cal)
    classes = load_class_names(labels_path if labels_path is not None else data) or hints.get("classes")
    outputs = qm.graph.tensors[qm.graph.outputs[0]].shape[-1]
    if classes and len(classes) <= outputs and len(qm.graph.outputs) == 1:  # names for the output's classes, any unnamed ones numbered
        qm.info["classes"] = classes + [f"class {k}" for k in range(len(classes), outputs)]
    typer.echo(f"quantized {model} ({prof.name}, {method}, {len(calib)} samples) in {time.perf_counter() - t0:.1f} s")
    if model_io.interface(qm.graph.meta)["float_tail"]:
        typer.echo(f"cut: {model_io.describe(qm.graph.meta)}")
    check_cmd = f"eptq-deploy check {shlex.quote(str(Path(out).resolve()))} --data {shlex.quote(str(Path(data).resolve()))}"
    if labels_path is not None:
        check_cmd += f" --labels {shlex.quote(str(Path(labels_path).resolve()))}"
    path = api.export(qm, out=out, data=held, labels=held_labels, force=force, command=_command_line(),
                      threads=threads, check_samples=None, check_command=check_cmd)
    print_summary(path)
    return path


#: the profile when neither --profile nor a target with a profile of its own decides
FALLBACK_PROFILE = "int8-pot"


def _native_profile(target: str | None) -> str:
    """The profile a target is native to (tflite-int8 -> tflite-int8); where several are
    (onnx-qdq: imx500, int8-pot, w4a8-pot) the general int8-pot, not the first by name."""
    from .hw_profiles import list_profiles, load_profile

    if target and "," not in target and target != "all":
        native = []
        for name, _ in list_profiles():
            try:
                if load_profile(name).native_target == target:
                    native.append(name)
            except EptqError:
                continue
        if len(native) == 1 or (native and FALLBACK_PROFILE not in native):
            return native[0]
    return FALLBACK_PROFILE


def target_line(name: str, runtime: str, c: dict[str, Any] | None, lat: dict[str, Any] | None) -> str:
    """One target's runtime checks and latency as one line (quantize, check and bench print it)."""
    line = f"  {name:<12} {runtime}:"
    if c:
        f = c.get("fidelity_vs_float")
        what = "agreement with simulation" if "argmax_agreement_vs_simulation" in c else "outputs exactly the simulation's"
        line += f" {what} {agreement(c):.2%}, max diff {c['max_abs_diff_lsb']:.0f} LSB"
        if f and "top1_agreement" in f:
            line += (f"; vs float: top-1 agreement {f['top1_agreement']:.2%}, top-5 {f['top5_agreement']:.2%}, "
                     f"SQNR {f['sqnr_db']} dB")
        elif f:
            line += f"; vs float: per-pixel argmax agreement {c['argmax_agreement_vs_float']:.2%}, SQNR {f['sqnr_db']} dB"
        else:
            line += "; vs float: SQNR " + ", ".join(f"{o['sqnr_db_vs_float']}" for o in c["outputs"]) + " dB per output"
        for key, label in (("map", "mAP"), ("map50", "mAP@.5"), ("map_vs_float", "mAP vs float"),
                           ("miou", "mIoU"), ("miou_vs_float", "mIoU vs float")):
            if c.get(key) is not None:
                line += f"; {label} {c[key]:.1f}"
            elif key in c:  # e.g. the float model finds nothing to score against on these images
                line += f"; {label} n/a"
        if "top1" in c:
            line += f"; top-1 float {c['top1']['float']:.2%} sim {c['top1']['simulation']:.2%} runtime {c['top1']['runtime']:.2%}"
    if lat:
        line += (f"{';' if c else ''} median latency {lat['int8_ms']} ms (float {lat['float_ms']} ms, "
                 f"float/int8 x{lat['speedup_vs_float']}, "
                 f"{lat['threads']} thread{'s' if lat['threads'] != 1 else ''})")
    return line


def print_summary(bundle: Path) -> None:
    from .bundle import read_manifest

    m = read_manifest(bundle)
    typer.echo(f"bundle: {bundle}")
    if m.get("mixed_precision"):
        mp = m["mixed_precision"]
        typer.echo(f"weight widths: {mp['packed_bytes']:,} of {mp['budget_bytes']:,} bytes; {mp['note']} "
                   f"(per layer: report.md, {mp['plot']})")
    for name, t in m["targets"].items():
        if t.get("checks") or t.get("latency"):
            typer.echo(target_line(name, t["runtime"], t.get("checks"), t.get("latency")))
    if m.get("check_command"):
        typer.echo(f"re-check: {m['check_command']}")


@app.command()
def check(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by eptq-deploy quantize.")],
    data: Annotated[Path, typer.Option(help="Images to run: a folder, or an .npz/.npy array (preprocessed as the "
                                            "bundle's manifest states).")],
    labels: Annotated[Path | None, typer.Option(help="Labels: a CSV (filename,class_index) for an image folder; "
                                                     "an .npz's own 'labels' array is used by default. A detector "
                                                     "(postprocess in the manifest): COCO instances.json; a segmenter: "
                                                     "a folder of label masks (VOC palette or class-index PNGs).")] = None,
    target: Annotated[str | None, typer.Option(help="Check one target (default: every target in the bundle).")] = None,
    limit: Annotated[int | None, typer.Option(help="Use the first N samples.")] = None,
    min_agreement: Annotated[float, typer.Option(help="Fail (exit 1) when the runtime's argmax agrees with the "
                                                      "simulation on fewer than this fraction of samples.")] = 0.99,
    include_calibration: Annotated[bool, typer.Option(help="Also run the samples the bundle was calibrated on "
                                                           "(skipped by default: they flatter the numbers).")] = False,
    threads: Annotated[int, typer.Option(help="Runtime threads.")] = 2,
) -> None:
    """Re-run a bundle on its runtimes and compare.

    Each model file runs on its own runtime over --data (preprocessed as the manifest
    states, the calibration samples left out) and is compared with the simulation
    recomputed from the bundle's graph and with its float twin.
    """

    def body() -> None:
        from . import api, model_io
        from .bundle import calibration_overlap, verify_bundle
        from .data import load_data, load_labels
        from .demo import DEMO_HOLDOUT
        from .preprocess import preset_from_info, to_pixels

        if not 0.0 <= min_agreement <= 1.0:
            raise UsageError(f"--min-agreement {min_agreement} must be a fraction between 0 and 1, e.g. 0.995")
        m = verify_bundle(bundle, target)  # the calibration record is read only from a verified bundle
        pre = (m.get("input") or {}).get("preprocessing") if isinstance(m.get("input"), dict) else None
        preset = None
        if isinstance(pre, dict):
            try:
                preset = preset_from_info(pre)
            except (KeyError, TypeError, ValueError):
                raise UsageError(f"{bundle}/manifest.json input.preprocessing is malformed; re-export the bundle") from None
        if str(data) != DEMO_HOLDOUT and not data.exists():
            raise UsageError(f"data path not found: {data}; give an image folder, .npz or .npy")
        skip = [] if include_calibration or str(data) == DEMO_HOLDOUT else calibration_overlap(bundle, data)
        names: list[str] = []
        sizes: list[tuple[int, int]] = []
        try:
            x = load_data(data, preset, limit=limit, names=names, exclude=skip, sizes=sizes)
        except DataError:
            if skip:
                raise UsageError(f"all samples of {data} calibrated this bundle ({len(skip)} skipped); give other "
                                 "images, or pass --include-calibration to run them anyway") from None
            raise
        folded = isinstance(m.get("input"), dict) and m["input"].get("folded") is True
        if folded and preset is not None:  # the model takes the pixels themselves
            x = to_pixels(x, preset)
        x = model_io.to_source_layout(api.manifest_interface(m), x)  # loaded NCHW; a TFLite-read model takes NHWC
        task = (m.get("model") or {}).get("postprocess")
        if task:  # a detector's annotations or a segmenter's masks, matched to the images by file name
            y = labels
            if labels is not None and not labels.exists():
                raise UsageError(f"labels not found: {labels}; give COCO instances.json or a folder of label masks")
        else:
            y = load_labels(labels if labels is not None else data, limit=limit, names=names,
                            exclude=[i for i in skip if isinstance(i, int)])
        results = api.check(bundle, x, y, target=target, threads=threads, names=names or None,
                            sizes=sizes if len(sizes) == len(x) else None)
        skipped = (f"; skipped {len(skip)} calibration sample(s), --include-calibration keeps them" if skip
                   else "; none of them calibrated the bundle" if not include_calibration else "")
        typer.echo(f"bundle: {bundle} ({len(x)} samples from {data}{skipped})")
        worst = 1.0
        for name, r in results.items():
            typer.echo(target_line(name, r["runtime"], r["checks"], r["latency"]))
            worst = min(worst, agreement(r["checks"]))
        if worst < min_agreement:
            typer.echo(f"error: agreement with the simulation {worst:.2%} is below --min-agreement "
                       f"{min_agreement:.2%}", err=True)
            raise typer.Exit(1)

    _guard(body)


@app.command()
def bench(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by eptq-deploy quantize.")],
    target: Annotated[str | None, typer.Option(help="Time one target (default: every target in the bundle).")] = None,
    threads: Annotated[int, typer.Option(help="Runtime threads (quantize and check time with 2 too).")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed batch-1 runs per model (the median is reported).")] = 100,
) -> None:
    """Time each model file and its float twin.

    The median batch-1 latency of each target's model file and of its float twin on
    the same runtime, at --threads.
    """

    def body() -> None:
        from . import api

        if repeats < 1:
            raise UsageError(f"--repeats {repeats} must be at least 1")
        typer.echo(f"bundle: {bundle}")
        for name, r in api.bench(bundle, target=target, threads=threads, repeats=repeats).items():
            typer.echo(target_line(name, r["runtime"], None, r["latency"]))

    _guard(body)


def _print_listing(rows: Callable[[], list[tuple[str, str]]]) -> None:
    """Print (name, description) rows from a registry, one per line."""
    _guard(lambda: [typer.echo(f"{name:<16} {desc}") for name, desc in rows()])


@app.command()
def profiles() -> None:
    """List the hardware profiles (built-in and plugins)."""
    from .hw_profiles import list_profiles

    _print_listing(list_profiles)


@app.command()
def targets() -> None:
    """List the export targets (built-in and plugins)."""
    from .targets import list_targets

    _print_listing(list_targets)


toolchain_app = typer.Typer(help="Install and list the chip compilers targets call.",
                            no_args_is_help=True)
app.add_typer(toolchain_app, name="toolchain")


def _toolchains() -> dict[str, Any]:
    from .targets import get_target, list_targets

    out: dict[str, Any] = {}
    for name, _ in list_targets():
        tc = get_target(name).toolchain
        if tc is not None:
            out.setdefault(tc.name, (tc, []))[1].append(name)
    return out


@toolchain_app.command("list")
def toolchain_list() -> None:
    """List the toolchains the targets call, where each lives and whether it is installed."""
    from .toolchains import installed, location, missing_system

    def rows() -> None:
        for name, (tc, users) in sorted(_toolchains().items()):
            state = "installed" if installed(tc) else "not installed"
            lacking = missing_system(tc)
            typer.echo(f"{name:<10} {state:<14} {tc.description}; targets: {', '.join(users)}; {location(tc)}"
                       + (f"; {'; '.join(lacking)}" if lacking else ""))

    _guard(rows)


@toolchain_app.command("install")
def toolchain_install(name: Annotated[str, typer.Argument(help="Toolchain name (eptq-deploy toolchain list).")],
                      force: Annotated[bool, typer.Option(help="Rebuild even where it is installed.")] = False) -> None:
    """Build a toolchain's environment with its pinned packages (needs the package index once)."""
    from .errors import UsageError
    from .toolchains import install

    def body() -> None:
        known = _toolchains()
        if name not in known:
            raise UsageError(f"unknown toolchain {name!r}; known: {', '.join(sorted(known)) or 'none'}")
        exe = install(known[name][0], force=force)
        typer.echo(f"installed {name}: {exe}")

    _guard(body)


@app.command()
def readers() -> None:
    """List the model-file readers (file suffixes, ops)."""
    from .readers import list_readers

    _print_listing(list_readers)


@app.command()
def ops() -> None:
    """List the PyTorch (ATen) ops the graph capture understands."""
    from .capture import supported_ops

    for op in supported_ops():
        typer.echo(op)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
