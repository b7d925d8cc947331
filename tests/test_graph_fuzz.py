"""Property test: ``QuantGraph.load`` on damaged graph.json/graph.npz files only raises EptqError.

The files come from a bundle, which may have been edited, truncated or crafted; the
loader must answer every such file with the project's one-line error (or a valid
graph), never a KeyError, TypeError, BadZipFile or RecursionError from deep inside.
Documents are derived from a real saved tiny graph and mutated the ways files break.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_graph_json import small_graph

from eptq_deploy.errors import EptqError
from eptq_deploy.graph import QuantGraph


@functools.cache
def _saved() -> tuple[str, bytes]:
    """graph.json text and graph.npz bytes of test_graph_json's small quantized model."""
    with tempfile.TemporaryDirectory() as d:
        small_graph().save(d)
        return (Path(d) / "graph.json").read_text(), (Path(d) / "graph.npz").read_bytes()


def _doc() -> dict[str, Any]:
    return json.loads(_saved()[0])


def _arrays() -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(_saved()[1]), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ----------------------------------------------------------------- value pools

HUGE = [2**63, -(2**63) - 1, 2**100, 1e308, -1e308, float("inf"), float("-inf"), float("nan")]
ODD = [None, True, "", "x", [], {}, [[]], -1, 0, 0.5, *HUGE]
odd_values = st.sampled_from(ODD) | st.integers() | st.floats() | st.text(max_size=4)
json_values = st.recursive(odd_values, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=5)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        doc = doc[k]
    return doc


# ------------------------------------------------------------ document mutations
# each takes (doc, draw) and returns the new document

Mutation = Callable[[Any, st.DrawFn], Any]


def _set_anywhere(doc: Any, draw: st.DrawFn) -> Any:
    path = draw(st.sampled_from(_paths(doc)))
    if not path:
        return draw(json_values)
    _get(doc, path[:-1])[path[-1]] = draw(json_values)
    return doc


def _delete_anywhere(doc: Any, draw: st.DrawFn) -> Any:
    paths = [p for p in _paths(doc) if p]
    if not paths:
        return doc
    path = draw(st.sampled_from(paths))
    del _get(doc, path[:-1])[path[-1]]
    return doc


def _quant_field(doc: Any, draw: st.DrawFn) -> Any:
    """NaN/zero/negative scales, negative or huge bits, bad axes, zero points off the grid."""
    quants = [t["quant"] for t in doc.get("tensors", {}).values() if isinstance(t, dict) and isinstance(t.get("quant"), dict)]
    if not quants:
        return doc
    q = draw(st.sampled_from(quants))
    key = draw(st.sampled_from(["bits", "scale", "zero_point", "axis", "power_of_two_exponent", "signed", "narrow"]))
    q[key] = draw(st.sampled_from([-8, 0, 1, 33, 2**40, [float("nan")], [0.0], [-1.0], [1e-45], [float("inf")],
                                   [1.0, 2.0], [], [2**62], [-(2**62)], [300], 7, -1, "0", None]) | odd_values)
    return doc


def _shape_field(doc: Any, draw: st.DrawFn) -> Any:
    tensors = doc.get("tensors")
    if not isinstance(tensors, dict) or not tensors:
        return doc
    t = tensors[draw(st.sampled_from(sorted(tensors)))]
    t["shape"] = draw(st.sampled_from([[], [-1], [0, 3], [1, 3, 8], [2**70], [1.5, 3], [1, 3, 8, 8, 1]])
                      | st.lists(st.integers(-3, 2**40), max_size=5))
    return doc


def _node_field(doc: Any, draw: st.DrawFn) -> Any:
    """Unknown ops, self loops, forward references, duplicate outputs, wrong arity."""
    nodes = doc.get("nodes")
    if not isinstance(nodes, list) or len(nodes) < 2:
        return doc
    i, j = draw(st.integers(0, len(nodes) - 1)), draw(st.integers(0, len(nodes) - 1))
    a, b = nodes[i], nodes[j]
    kind = draw(st.sampled_from(["op", "self-loop", "forward", "dup-output", "write-input", "arity", "attrs", "swap"]))
    if kind == "op":
        a["op"] = draw(st.sampled_from(["conv3d", "", "CONV2D", "lstm"]) | odd_values)
    elif kind == "self-loop":
        a["inputs"] = list(a["outputs"]) + a["inputs"][1:]
    elif kind == "forward":
        a["inputs"] = list(nodes[-1]["outputs"]) + a["inputs"][1:]
    elif kind == "dup-output":
        a["outputs"] = list(b["outputs"])
    elif kind == "write-input":
        a["outputs"] = list(doc.get("inputs") or ["input"])
    elif kind == "arity":
        a["inputs"] = a["inputs"] * 2
    elif kind == "attrs":
        a["attrs"] = draw(json_values)
    else:
        nodes[i], nodes[j] = b, a
    return doc


def _top_field(doc: Any, draw: st.DrawFn) -> Any:
    key = draw(st.sampled_from(["inputs", "outputs", "version", "meta", "tensors", "nodes", "format"]))
    doc[key] = draw(st.sampled_from([[], ["ghost"], ["input", "input"], 2, "1", None, {}, [None]]) | json_values)
    return doc


DOC_MUTATIONS: list[Mutation] = [_set_anywhere, _delete_anywhere, _quant_field, _shape_field, _node_field, _top_field]


# ------------------------------------------------------------- array mutations


def _mutate_arrays(arrays: dict[str, np.ndarray], draw: st.DrawFn) -> dict[str, Any]:
    name = draw(st.sampled_from(sorted(arrays)))
    kind = draw(st.sampled_from(["drop", "shape", "dtype", "scalar", "empty", "extra", "huge"]))
    a = arrays[name]
    if kind == "drop":
        del arrays[name]
    elif kind == "shape":
        arrays[name] = a.reshape(-1)[: max(1, a.size // 2)]
    elif kind == "dtype":
        arrays[name] = draw(st.sampled_from([a.astype(np.complex64), a.astype(str), a.astype(bool), a.astype(np.float16)]))
    elif kind == "scalar":
        arrays[name] = np.array(7)
    elif kind == "empty":
        arrays[name] = np.zeros((0,) + a.shape[1:], a.dtype)
    elif kind == "extra":
        arrays["ghost"] = np.ones(3)
    else:
        arrays[name] = np.full(a.shape, np.iinfo(np.int64).max if a.dtype.kind in "iu" else np.nan)
    return arrays


def _npz_bytes(arrays: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _damage_bytes(data: bytes, draw: st.DrawFn) -> bytes:
    """Truncated, bit-flipped, emptied, replaced, or a zip whose member is not an array."""
    kind = draw(st.sampled_from(["truncate", "flip", "empty", "random", "foreign-zip"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "flip":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= draw(st.integers(1, 255))
        return bytes(buf)
    if kind == "empty":
        return b""
    if kind == "random":
        return draw(st.binary(max_size=64))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("conv2d_0.weight.npy", b"not an array")
        z.writestr("notes.txt", b"hello")
    return buf.getvalue()


def _damage_text(text: str, draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["truncate", "deep", "nan", "text"]))
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))]
    if kind == "deep":
        return "[" * 200_000 + "]" * 200_000
    if kind == "nan":
        return text.replace('"version": 1', '"version": NaN', 1)
    return draw(st.text(max_size=40))


@st.composite
def damaged_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(graph.json text, graph.npz bytes), broken in one or more ways."""
    text, npz = _saved()
    if draw(st.integers(0, 4)) > 0:  # mostly: structured mutations of the real document
        doc: Any = _doc()
        for _ in range(draw(st.integers(1, 3))):
            mutate = draw(st.sampled_from(DOC_MUTATIONS))
            try:
                doc = mutate(copy.deepcopy(doc), draw)
            except (AttributeError, KeyError, IndexError, TypeError):
                pass  # an earlier mutation already removed what this one edits
        text = json.dumps(doc)  # allow_nan: NaN/Infinity are what a hand-edited file may hold
    elif draw(st.booleans()):
        text = _damage_text(text, draw)
    if draw(st.integers(0, 2)) == 0:
        npz = _npz_bytes(_mutate_arrays(_arrays(), draw))
    elif draw(st.integers(0, 4)) == 0:
        npz = _damage_bytes(npz, draw)
    return text, npz


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(damaged_files())
def test_load_raises_only_eptq_errors(files: tuple[str, bytes]) -> None:
    text, npz = files
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "graph.json").write_text(text)
        (Path(d) / "graph.npz").write_bytes(npz)
        try:
            g = QuantGraph.load(d)
        except EptqError as e:
            msg = str(e)
            assert msg and "\n" not in msg, msg
            return
    # whatever loads is a usable graph: it serialises back and validates again
    assert isinstance(g, QuantGraph)
    QuantGraph.from_json(json.loads(json.dumps(g.to_json())), {k: t.data for k, t in g.tensors.items()
                                                               if t.data is not None})


def test_real_graph_loads_and_round_trips(tmp_path: Path) -> None:
    """The undamaged files load (the fuzz above starts from a valid document)."""
    text, npz = _saved()
    (tmp_path / "graph.json").write_text(text)
    (tmp_path / "graph.npz").write_bytes(npz)
    g = QuantGraph.load(tmp_path)
    assert g.to_json() == json.loads(text)


def _first_quant(doc: dict[str, Any]) -> dict[str, Any]:
    return next(t["quant"] for t in doc["tensors"].values() if t["quant"] is not None and t["kind"] == "activation")


def _forward_reference(doc: dict[str, Any]) -> None:
    first = doc["nodes"][0]
    first["inputs"] = [doc["nodes"][-1]["outputs"][0], *first["inputs"][1:]]


KNOWN_DAMAGE: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "nan-scale": (lambda d: _first_quant(d).__setitem__("scale", [float("nan")]), "finite and positive"),
    "negative-bits": (lambda d: _first_quant(d).__setitem__("bits", -3), "bits -3"),
    "zero-point-off-grid": (lambda d: _first_quant(d).__setitem__("zero_point", [2**40]), "zero points outside"),
    "forward-reference": (_forward_reference, "before it is produced"),
    "duplicate-output": (lambda d: d["nodes"][1].__setitem__("outputs", list(d["nodes"][0]["outputs"])), "already"),
    "unknown-op": (lambda d: d["nodes"][0].__setitem__("op", "lstm"), "unknown op 'lstm'"),
    "negative-shape": (lambda d: d["tensors"]["input"].__setitem__("shape", [1, -3, 8, 8]), "negative size"),
}


@pytest.mark.parametrize("case", list(KNOWN_DAMAGE))
def test_known_damage_is_named(tmp_path: Path, case: str) -> None:
    """Hand-picked damages, each answered with what is wrong."""
    mutate, expected = KNOWN_DAMAGE[case]
    doc = _doc()
    mutate(doc)
    (tmp_path / "graph.json").write_text(json.dumps(doc))
    (tmp_path / "graph.npz").write_bytes(_saved()[1])
    with pytest.raises(EptqError, match=re.escape(expected)):
        QuantGraph.load(tmp_path)


def test_damaged_npz_is_named(tmp_path: Path) -> None:
    (tmp_path / "graph.json").write_text(_saved()[0])
    arrays = _arrays()
    weight = next(k for k in arrays if k.endswith(".weight"))
    arrays[weight] = arrays[weight].reshape(-1)
    (tmp_path / "graph.npz").write_bytes(_npz_bytes(arrays))
    with pytest.raises(EptqError, match="graph.json declares"):
        QuantGraph.load(tmp_path)
    (tmp_path / "graph.npz").write_bytes(_saved()[1][:100])
    with pytest.raises(EptqError, match="cannot read the quantized graph"):
        QuantGraph.load(tmp_path)
