"""Export targets, looked up by name.

A target writes the quantized graph it is given to its runtime's file format,
loads that file in the runtime, runs and times it. It declares what its runtime
demands (``rules``: rounding, shared or fixed grids, the bit widths it can
express); it never decides parameters. Built-ins live in this package; another
package adds one through the ``eptq_deploy.targets`` entry-point group (the entry
point names a :class:`Target` subclass).
"""

from __future__ import annotations

import difflib
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from eptq_deploy.errors import UsageError
from eptq_deploy.graph import QuantGraph, TargetRules
from eptq_deploy.toolchains import Toolchain, require

TARGET_ENTRY_POINT_GROUP = "eptq_deploy.targets"
_BUILTIN = {"onnx-qdq": "eptq_deploy.targets.onnx_qdq:OnnxQdqTarget",
            "openvino-ir": "eptq_deploy.targets.openvino_ir:OpenVinoIrTarget",
            "tflite-int8": "eptq_deploy.targets.tflite_int8:TfliteInt8Target",
            "tflite-micro": "eptq_deploy.targets.tflite_micro:TfliteMicroTarget",
            "ethos-u": "eptq_deploy.targets.ethos_u:EthosUTarget",
            "imx500": "eptq_deploy.targets.imx500:Imx500Target"}


class Runner(ABC):
    """A model file loaded in its runtime: float NCHW in, float (dequantized) output out (a tuple of
    them, in the graph's output order, for several: ``float_exec.pack``)."""

    threads: int = 1
    #: which of the runtime's kernel sets runs the file, where it has several (recorded with the latency)
    kernels: str | None = None
    #: the simulation rule those kernels follow, where it is not the target's declared one
    rounding: str | None = None

    @abstractmethod
    def run(self, x: np.ndarray) -> Any: ...


class Target(ABC):
    """One backend: emit a file, load it in the backend's runtime."""

    name: ClassVar[str]
    description: ClassVar[str]
    runtime: ClassVar[str]
    rules: ClassVar[TargetRules]
    model_file: ClassVar[str]  # file name of the integer model inside the target folder
    float_model_file: ClassVar[str]
    #: every rounding rule this target's runners may follow (``rules.rounding`` first), each defined
    #: in the target's own module and registered there with ``simulate.register_rule``
    rounding_rules: ClassVar[tuple[str, ...]] = ()
    #: the ``load`` keyword sets selecting each kernel set the runtime offers; conformance checks each
    kernel_variants: ClassVar[tuple[dict[str, Any], ...]] = ({},)
    #: the chip compiler ``emit`` calls, in its own environment (``toolchains``); None: no compiler
    toolchain: ClassVar[Toolchain | None] = None
    #: options the target takes (``quantize(target_options={name: {...}})``), name -> what it sets
    options: ClassVar[dict[str, str]] = {}

    def ready(self) -> None:
        """Refuse, before any work, a target whose toolchain is missing (one line naming the install command)."""
        if self.toolchain is not None:
            require(self.toolchain, self.name)

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The target's options, validated (unknown names refused); defaults filled by the target."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(sorted(self.options)) or "none"
            raise UsageError(f"target {self.name} takes no option {', '.join(unknown)}; its options: {allowed}")
        return dict(options)

    @abstractmethod
    def emit(self, graph: QuantGraph, folder: Path, *, quantized: bool = True) -> list[Path]:
        """Write the model file(s) into ``folder``; returns the files written."""

    @abstractmethod
    def load(self, folder: Path, *, float_model: bool = False, threads: int = 1) -> Runner:
        """Load the file written by ``emit`` in the runtime."""

    def validate(self, graph: QuantGraph) -> None:
        """Refuse, right after capture, a float graph this target cannot express (an op, an
        attribute): the same one-line ``UnsupportedOpError`` export would raise minutes later.

        Default: emit the float twin into a scratch folder, so the check is the emitter itself
        and can never disagree with it; a target with a cheaper exact test overrides this.
        """
        with tempfile.TemporaryDirectory(prefix="eptq-validate-") as tmp:
            self.emit(graph, Path(tmp), quantized=False)

    def runtime_versions(self) -> dict[str, str]:
        return {}

    def exact_here(self, graph: QuantGraph) -> bool:
        """Whether this machine's runtime computes ``graph`` bit for bit as the simulation of its
        rule does (a target whose kernels depend on the CPU says where they do not)."""
        return True

    def read_back_mismatches(self, folder: Path, graph: QuantGraph) -> list[str] | None:
        """Every way the integers and grids stored in the emitted file differ from ``graph``
        (empty when the file holds exactly the graph's); None where the target cannot read
        its file back."""
        return None

    def io_contract(self, graph: QuantGraph) -> dict[str, Any]:
        """The integer model file's input and outputs as firmware sees them (the manifest's ``io``:
        ``input``, ``outputs`` in the graph's order, and ``output``, the first).

        Default: what ``Runner`` promises, float32 NCHW tensors named as in the graph,
        quantized and dequantized inside the file on the graph's own grids; a target
        whose file holds anything else overrides this.
        """
        def one(t: str, where: str) -> dict[str, Any]:
            info = graph.tensors[t]
            qp = info.quant
            grid = None if qp is None else (float(qp.scale[0]), int(qp.zero_point[0]), info.dtype, where)
            return io_tensor(t, info.shape, "NCHW", "float32", grid)

        outs = [one(t, "dequantized inside the model") for t in graph.outputs]
        return {"input": one(graph.inputs[0], "quantized inside the model"), "output": outs[0], "outputs": outs}

    def inspect(self, folder: Path) -> dict:
        """Runtime facts worth reporting (e.g. which layers run in integer)."""
        return {}


def io_tensor(name: str, shape: Sequence[int | str], layout: str, dtype: str,
              grid: tuple[float, int, str, str] | None, rounding: str = "half to even") -> dict[str, Any]:
    """One entry of an ``io`` contract; ``grid`` is (scale, zero point, container dtype, where the
    file applies it), the numbers exactly as the file stores them; ``rounding`` is how values are
    rounded onto that grid ("half to even" or "half away from zero"). ``layout`` names a 4-D
    tensor's axes; other ranks are stated as N plus features."""
    axes = layout if len(shape) == 4 else ("NC" if len(shape) == 2 else f"rank {len(shape)}")
    q = None if grid is None else {**dict(zip(("scale", "zero_point", "dtype", "where"), grid, strict=True)),
                                   "rounding": rounding}
    return {"name": name, "shape": list(shape), "layout": axes, "dtype": dtype, "quantization": q}


def same_float32(a: Any, b: Any) -> bool:
    """Whether two scale arrays are the same float32 numbers, bit for bit."""
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a32.shape == b32.shape and bool(np.array_equal(a32.view(np.uint32), b32.view(np.uint32)))


def _load(spec: str) -> type[Target]:
    mod, _, attr = spec.partition(":")
    return getattr(import_module(mod), attr)


def _plugins() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=TARGET_ENTRY_POINT_GROUP)}


def list_targets(compilers: bool = True) -> list[tuple[str, str]]:
    """(name, one-line description) of every target, built-in and plugin; ``compilers=False`` leaves out
    the targets that call a chip compiler (``Target.toolchain``), whose files another target also writes."""
    if not compilers:
        return [(n, d) for n, d in list_targets() if get_target(n).toolchain is None]
    out = {name: _load(spec).description for name, spec in _BUILTIN.items()}
    for name, ep in _plugins().items():
        if name not in out:
            try:
                out[name] = ep.load().description
            except Exception as e:  # a broken plugin must not hide the others
                out[name] = f"(plugin failed to load: {type(e).__name__}: {e})"
    return sorted(out.items())


def get_target(name: str) -> Target:
    if name in _BUILTIN:
        return _load(_BUILTIN[name])()
    plugins = _plugins()
    if name in plugins:
        return plugins[name].load()()
    known = [n for n, _ in list_targets()]
    close = difflib.get_close_matches(name, known, n=1)
    guess = f"did you mean '{close[0]}'? " if close else ""
    raise UsageError(f"unknown target {name!r}; {guess}known targets: {', '.join(known)} "
                     "(eptq-deploy targets lists them)")
