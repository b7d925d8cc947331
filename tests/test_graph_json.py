"""graph.json is untrusted input: malformed documents fail with one-line UsageErrors."""

from __future__ import annotations

import copy
import functools
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import eptq_deploy
from eptq_deploy.errors import EptqError, UsageError
from eptq_deploy.graph import FORMAT_VERSION, QuantGraph


@functools.cache
def small_graph() -> QuantGraph:
    """A small quantized model's graph (conv, BN, pool, depthwise, linear); shared with test_graph_fuzz."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).eval()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return eptq_deploy.quantize(model, x, profile="int8-pot", targets="onnx-qdq", progress=False).graph


@functools.cache
def _saved() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """graph.json (as a dict) and graph.npz arrays of ``small_graph``."""
    with tempfile.TemporaryDirectory() as d:
        small_graph().save(d)
        doc = json.loads((Path(d) / "graph.json").read_text())
        with np.load(Path(d) / "graph.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    return doc, arrays


def _doc() -> dict[str, Any]:
    return copy.deepcopy(_saved()[0])


def _arrays() -> dict[str, np.ndarray]:
    return dict(_saved()[1])


def _quant_tensor(doc: dict[str, Any]) -> str:
    return next(k for k, t in doc["tensors"].items() if t["quant"] is not None and t["kind"] == "activation")


def test_valid_document_loads() -> None:
    doc = _doc()
    assert doc["version"] == FORMAT_VERSION
    g = QuantGraph.from_json(doc, _arrays())
    assert [n.op for n in g.nodes] == ["conv2d", "max_pool2d", "depthwise_conv2d", "flatten", "linear"]
    assert g.to_json() == _doc()


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], Any]:
    def mutate(doc: dict[str, Any]) -> Any:
        obj = doc
        for k in path[:-1]:
            obj = obj[k] if not callable(k) else obj[k(obj)]
        obj[path[-1]] = value
        return doc

    return mutate


def _delete(*path: Any) -> Callable[[dict[str, Any]], Any]:
    def mutate(doc: dict[str, Any]) -> Any:
        obj = doc
        for k in path[:-1]:
            obj = obj[k] if not callable(k) else obj[k(obj)]
        del obj[path[-1]]
        return doc

    return mutate


def _first_quant(tensors: dict[str, Any]) -> str:
    return next(k for k, t in tensors.items() if t["quant"] is not None)


def _swap_first_nodes(doc: dict[str, Any]) -> dict[str, Any]:
    doc["nodes"][0], doc["nodes"][1] = doc["nodes"][1], doc["nodes"][0]
    return doc


def _rename_op(doc: dict[str, Any]) -> dict[str, Any]:
    doc["nodes"][0]["op"] = "conv3d"
    return doc


MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    # missing keys
    "no-tensors": (_delete("tensors"), "malformed"),
    "no-nodes": (_delete("nodes"), "malformed"),
    "no-inputs": (_delete("inputs"), "malformed"),
    "no-outputs": (_delete("outputs"), "malformed"),
    "node-no-op": (_delete("nodes", 0, "op"), "malformed"),
    "node-no-inputs": (_delete("nodes", 2, "inputs"), "malformed"),
    "tensor-no-shape": (_delete("tensors", "input", "shape"), "malformed"),
    "tensor-no-has-data": (_delete("tensors", "input", "has_data"), "malformed"),
    "quant-no-scale": (_delete("tensors", _first_quant, "quant", "scale"), "malformed"),
    "quant-no-bits": (_delete("tensors", _first_quant, "quant", "bits"), "malformed"),
    # wrong types
    "doc-is-list": (lambda d: [d], "version"),
    "tensors-is-list": (_set(("tensors",), ["input"]), "malformed"),
    "nodes-is-string": (_set(("nodes",), "conv2d"), "malformed"),
    "nodes-is-number": (_set(("nodes",), 3), "malformed"),
    "shape-is-string": (_set(("tensors", "input", "shape"), "NCHW"), "malformed"),
    "shape-has-null": (_set(("tensors", "input", "shape"), [1, None, 8, 8]), "malformed"),
    "inputs-is-number": (_set(("nodes", 0, "inputs"), 7), "malformed"),
    "attrs-is-list": (_set(("nodes", 0, "attrs"), [1, 2]), "malformed"),
    "quant-is-string": (_set(("tensors", _first_quant, "quant"), "int8"), "malformed"),
    "scale-is-dict": (_set(("tensors", _first_quant, "quant", "scale"), {"a": 1}), "malformed"),
    "scale-is-text": (_set(("tensors", _first_quant, "quant", "scale"), ["big"]), "malformed"),
    "zero-point-ragged": (_set(("tensors", _first_quant, "quant", "zero_point"), [[0], [0, 1]]), "malformed"),
    "bits-is-list": (_set(("tensors", _first_quant, "quant", "bits"), [8]), "malformed"),
    "meta-is-number": (_set(("meta",), 5), "malformed"),
    # unknown op, arity
    "unknown-op": (_rename_op, "unknown op 'conv3d'"),
    "wrong-arity": (_set(("nodes", 1, "inputs"), ["conv2d_0", "conv2d_0"]), "expected 1"),
    # versions
    "version-2": (_set(("version",), 2), "version 2"),
    "version-text": (_set(("version",), "1"), "version '1'"),
    "version-null": (_set(("version",), None), "version None"),
    "no-version": (_delete("version"), "version None"),
    # order and references
    "used-before-produced": (_swap_first_nodes, "before it is produced"),
    "undeclared-read": (_set(("nodes", 1, "inputs"), ["ghost"]), "undeclared tensor 'ghost'"),
    "output-never-produced": (_set(("outputs",), ["input_9"]), "never produced"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_document(case: str) -> None:
    mutate, expect = MALFORMED[case]
    doc = mutate(_doc())
    with pytest.raises(UsageError) as info:
        QuantGraph.from_json(doc, _arrays())
    msg = str(info.value)
    assert expect in msg
    assert "\n" not in msg and msg.strip() == msg and msg


def test_missing_array_data() -> None:
    arrays = _arrays()
    name = next(k for k in arrays if k.endswith(".weight"))
    del arrays[name]
    with pytest.raises(UsageError, match=f"tensor '{name}' has no data in graph.npz"):
        QuantGraph.from_json(_doc(), arrays)


def test_load_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read the quantized graph"):
        QuantGraph.load(tmp_path)
    (tmp_path / "graph.json").write_text("{not json")
    (tmp_path / "graph.npz").write_bytes(b"")
    with pytest.raises(UsageError) as info:
        QuantGraph.load(tmp_path)
    assert "\n" not in str(info.value)


# ------------------------------------------------------- out-of-range and dangling values


@pytest.mark.parametrize("value", [2**70, 1e20], ids=["int", "float"])
def test_huge_zero_point_is_usage_error(value: float) -> None:
    doc = _doc()
    doc["tensors"][_quant_tensor(doc)]["quant"]["zero_point"] = [value]
    with pytest.raises(UsageError):
        QuantGraph.from_json(doc, _arrays())


def test_huge_exponent_is_usage_error() -> None:
    doc = _doc()
    doc["tensors"][_quant_tensor(doc)]["quant"]["power_of_two_exponent"] = [2**70]
    with pytest.raises(UsageError):
        QuantGraph.from_json(doc, _arrays())


def test_undeclared_output_is_usage_error() -> None:
    doc = _doc()
    doc["nodes"][-1]["outputs"] = ["ghost"]
    doc["outputs"] = ["ghost"]
    with pytest.raises(UsageError):
        QuantGraph.from_json(doc, _arrays())


# ------------------------------------------------------------------- fuzzing


# Numbers stay inside the int64 range: larger ones hit the OverflowError bug pinned
# by test_huge_zero_point_is_usage_error above (widen this once that is fixed).
_SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6)
)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _apply(doc: Any, path: tuple[Any, ...], delete: bool, value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_documents_raise_only_eptq_errors(data: st.DataObject) -> None:
    doc: Any = _doc()
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        paths = _paths(doc)
        path = data.draw(st.sampled_from(paths), label="path")
        delete = bool(path) and data.draw(st.booleans(), label="delete")
        value = None if delete else data.draw(JSON_VALUES, label="value")
        doc = _apply(doc, path, delete, value)
    try:
        g = QuantGraph.from_json(doc, _arrays())
    except EptqError as e:
        assert isinstance(e, UsageError)
        assert "\n" not in str(e)
    else:
        assert isinstance(g, QuantGraph)
