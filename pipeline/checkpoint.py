"""Long EPTQ runs: the optimisation state on disk, and Ctrl-C honoured at a step boundary.

The optimiser (``eptq.optimize``) decides what its state is; this module keeps it safe:
written atomically, tied to one graph, data and configuration (a checkpoint made for
another run is refused, never mixed in), and read back with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import EptqError, UsageError
from .graph import WEIGHTED_OPS, QuantGraph


class Interrupted(EptqError):
    """Ctrl-C during the optimisation, honoured at a step boundary."""

    exit_code = 130


@contextmanager
def interrupt_at_step_boundary() -> Iterator[dict[str, bool]]:
    """Turn SIGINT into a flag the loop checks once per step (main thread only)."""
    flag = {"hit": False}

    def handler(signum, frame) -> None:
        if flag["hit"]:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        flag["hit"] = True

    try:
        old = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


class Checkpoint:
    """The optimisation state in ``folder/eptq_state.pt``, tied to one graph and config.

    Written atomically (temporary file, then rename) and read with
    ``weights_only=True``; a checkpoint made for another model or other options is
    refused rather than silently mixed in.
    """

    def __init__(self, folder: str | os.PathLike, qg: QuantGraph, x: torch.Tensor, options: dict[str, Any]) -> None:
        """``options``: everything that shapes the result (not how the run is driven)."""
        self.path = Path(folder) / "eptq_state.pt"
        h = hashlib.sha256()
        for n in qg.nodes:
            if n.op in WEIGHTED_OPS:
                h.update(qg.tensors[n.inputs[1]].data.tobytes())
                h.update(qg.tensors[n.inputs[1]].quant.scale.tobytes())
        h.update(x[:: max(1, len(x) // 16)].numpy().tobytes())
        h.update(repr(sorted(options.items())).encode())
        self.key = h.hexdigest()

    def save(self, state: dict[str, Any]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".eptq_state-", dir=self.path.parent)
            with os.fdopen(fd, "wb") as f:
                torch.save({"key": self.key, **state}, f)
            os.replace(tmp, self.path)
        except OSError as e:
            raise EptqError(f"cannot write the EPTQ checkpoint to {self.path.parent}: {e.strerror or e}; "
                            "choose a writable --checkpoint-dir with free space") from None

    def load(self) -> dict[str, Any]:
        if not self.path.is_file():
            raise UsageError(f"--resume but there is no checkpoint in {self.path.parent}; run once with "
                             "--checkpoint-dir first, or drop --resume")
        try:
            state = torch.load(self.path, weights_only=True, map_location="cpu")
        except Exception as e:  # truncated or foreign file: one line, no traceback
            raise UsageError(f"cannot read the EPTQ checkpoint {self.path}: {type(e).__name__}; delete it and "
                             "start again without --resume") from None
        if not isinstance(state, dict) or state.get("key") != self.key:
            raise UsageError(f"the checkpoint in {self.path.parent} was made for another model, data or options; "
                             "use the same command as the interrupted run, or drop --resume")
        return state


def interrupted(step: int, ckpt: Checkpoint | None, state: Callable[[int], dict[str, Any]] | None) -> Interrupted:
    """Save the state at this step boundary (if checkpointing) and say how to go on."""
    if ckpt is None:
        return Interrupted(f"interrupted at EPTQ step {step}; nothing was written (pass --checkpoint-dir DIR to be "
                           "able to --resume an interrupted run)")
    if state is not None:
        ckpt.save(state(step))
    return Interrupted(f"interrupted at EPTQ step {step}; state saved in {ckpt.path.parent}, no bundle was written; "
                       "run the same command with --resume to continue")
