"""Runs an IMX500 ONNX file (``mct_quantizers`` quantizer ops) on onnxruntime, inside the imx500 toolchain.

Started by ``targets/imx500.py`` with the toolchain's own Python, whose onnxruntime and
mct-quantizers (pinned by Sony's converter) provide the custom ops; the project's environment never
imports this file. Usage: ``python imx500_ort_worker.py MODEL.onnx IN.npy OUT.npz THREADS``: reads a
float32 NCHW batch, writes the outputs in the file's order as ``out0``, ``out1``, ...
"""

from __future__ import annotations

import sys

STEP = 8  # images per onnxruntime run


def main(argv: list[str]) -> int:
    import numpy as np
    import onnxruntime as ort
    from mct_quantizers import get_ort_session_options

    model, src, dst, threads = argv
    so = get_ort_session_options()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    x = np.load(src)
    name = sess.get_inputs()[0].name
    # a few images per run: the quantizer ops are Python and hold float64 copies of every tensor
    parts = [sess.run(None, {name: x[i:i + STEP]}) for i in range(0, len(x), STEP)]
    np.savez(dst, **{f"out{k}": np.concatenate([np.asarray(p[k], np.float32) for p in parts])
                     for k in range(len(parts[0]))})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
