"""Runs an IMX500 ONNX file (``mct_quantizers`` quantizer ops) on onnxruntime, inside the imx500 toolchain.

Started by ``targets/imx500.py`` with the toolchain's own Python, whose onnxruntime and
mct-quantizers (pinned by Sony's converter) provide the custom ops; the project's environment never
imports this file. Usage: ``python imx500_ort_worker.py MODEL.onnx IN.npy OUT.npz THREADS``: reads a
float32 NCHW batch, writes the outputs in the file's order as ``out0``, ``out1``, ...
"""

from __future__ import annotations

import sys


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
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    np.savez(dst, **{f"out{k}": np.asarray(y, np.float32) for k, y in enumerate(outs)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
