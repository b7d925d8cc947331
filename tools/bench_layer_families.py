"""Which layers cost the accuracy at low bits: PTQ with one family of layers kept at 8 bits.

Families: the first layer ("stem"), the last ("classifier"), depthwise convolutions, 1x1
("pointwise") convolutions and the other convolutions. For each, every layer of that family
keeps 8-bit weights and the rest take ``--weight-bits`` (default 4) under ``--profile``
(default imx500); "none" keeps nothing at 8 bits, "all" keeps everything. PTQ only (seconds per
row), so it shows where rounding to nearest loses and where a method that learns the rounding
has to work. Top-1 of the simulation on the benchmark's evaluation images (EfficientNet-Lite0:
the 500 held-out ImageNet samples; CIFAR ResNets: the 10,000 test images).

    python tools/bench_layer_families.py --model efficientnet_lite0

One JSON line per row on stdout, appended to ``--results``; a Markdown table ends the output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

# same folder (tools/ is the script's path): data and models of the other benchmarks
from bench_accuracy import load_dataset, load_model
from bench_mixed_precision import simulated_top1

from eptq_deploy import model_io
from eptq_deploy.capture import capture
from eptq_deploy.equalize import equalize
from eptq_deploy.graph import Node, QuantGraph
from eptq_deploy.hw_profiles import load_profile
from eptq_deploy.ptq import collect_stats, ptq
from eptq_deploy.quantized import QuantizedModel
from eptq_deploy.targets import get_target
from eptq_deploy.zoo import shared_data_dir

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "bench_layer_families.jsonl"
TARGET = "onnx-qdq"
FAMILIES = ("none", "stem", "classifier", "depthwise", "pointwise", "other conv", "all")


def family(g: QuantGraph, n: Node, first: Node, last: Node) -> str:
    if n is first:
        return "stem"
    if n is last:
        return "classifier"
    if n.op == "depthwise_conv2d":
        return "depthwise"
    w = g.tensors[n.inputs[1]].data
    return "pointwise" if n.op == "conv2d" and w.shape[2:] == (1, 1) else "other conv"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--profile", default="imx500")
    p.add_argument("--weight-bits", type=int, default=4)
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = p.parse_args(argv)
    if shared_data_dir() is None:
        print("skipped: benchmark data not found (set EPTQ_DATA_DIR to the shared data folder)")
        return 0
    torch.set_num_threads(2)
    calib, x, y = load_dataset(args.model, None)
    prof = load_profile(args.profile, weight_bits=args.weight_bits)
    fg = model_io.cut_graph(capture(load_model(args.model), calib[:1], fusing=prof.fusing, profile_name=prof.name),
                            None)
    batches = [calib[i:i + 64] for i in range(0, len(calib), 64)]
    equalize(fg, batches, prof.activations.bits)  # as quantize() does by default
    stats = collect_stats(fg, batches, seed=0, progress=False)
    rules = get_target(TARGET).rules
    nodes = fg.weighted_nodes()
    kinds = {n.name: family(fg, n, nodes[0], nodes[-1]) for n in nodes}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for keep in FAMILIES:
        members = [k for k, f in kinds.items() if keep == "all" or f == keep]
        if keep not in ("none", "all") and not members:
            continue
        bits = {k: (8 if k in members else args.weight_bits) for k in kinds}
        qm = QuantizedModel(ptq(fg, stats, prof, [rules], weight_bits=bits), fg, prof, [TARGET],
                            {TARGET: rules.rounding}, {})
        r = {"model": args.model, "profile": args.profile, "weight_bits": args.weight_bits, "kept_at_8_bits": keep,
             "layers_kept": len(members), "layers": len(kinds),
             "weights_kept": int(sum(np.size(fg.tensors[n.inputs[1]].data) for n in nodes if n.name in members)),
             "images": len(y), "top1_simulation": simulated_top1(qm, x, y, TARGET)}
        print(json.dumps(r), flush=True)
        with args.results.open("a") as f:
            f.write(json.dumps(r) + "\n")
        rows.append(r)
    print(f"\n| {args.model}, PTQ W{args.weight_bits} ({args.profile}) | layers at 8 bits | weights at 8 bits | top-1 |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['kept_at_8_bits']} | {r['layers_kept']} of {r['layers']} | {r['weights_kept']:,} | "
              f"{r['top1_simulation']:.2f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
