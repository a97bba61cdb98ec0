"""Resumed captures: the same tensors as a capture from the graph inputs, at a fraction of the
nodes, however the requests follow each other and whatever is rewritten in between. (Equal to
float32 rounding: at onnxruntime's full optimization level a Conv's kernel, blocked NCHWc or
plain, depends on where the session's graph starts.)"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import f32, init, model
from onnx import helper
from sample_data import load_calibration, sample_path

from onnxc.compiler import resumable
from onnxc.compiler.calibration import iter_activations
from onnxc.compiler.graph import GraphView
from onnxc.compiler.model import load
from onnxc.compiler.resumable import Resumable


def same(got: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def _reference(m: onnx.ModelProto, names: list[str], inputs, bs: int) -> list[dict[str, np.ndarray]]:
    return list(iter_activations(m, names, inputs, bs))


def _tensors(m: onnx.ModelProto, op: str) -> list[str]:
    return [n.output[0] for n in m.graph.node if n.op_type == op]


@pytest.fixture(scope="module")
def resnet():
    return load(sample_path("resnet")), {k: v[:40] for k, v in load_calibration().items()}


def _counting(monkeypatch) -> list[int]:
    """Node counts of the sessions the resumed captures build."""
    counts: list[int] = []
    real = resumable.runtime.session

    def session(m, **kwargs):
        counts.append(len(m.graph.node))
        return real(m, **kwargs)
    monkeypatch.setattr(resumable.runtime, "session", session)
    return counts


def test_waves_front_to_back_equal_captures_from_the_inputs(resnet, monkeypatch):
    m, data = resnet
    counts = _counting(monkeypatch)
    convs = _tensors(m, "Conv")
    resumed = Resumable(m, data, 16)
    ran = 0
    for name in convs:  # one wave per conv, residual branches included
        ref = _reference(m, [name], data, 16)
        before = len(counts)
        got = list(resumed.capture(m, [name]))
        ran += sum(counts[before:])
        assert [b.keys() for b in got] == [b.keys() for b in ref]
        for a, b in zip(got, ref):
            same(a[name], b[name])
    assert ran < len(m.graph.node)  # every node up to the last conv ran in one session only


def test_a_rewrite_downstream_is_seen_and_one_upstream_starts_over(resnet):
    m, data = resnet
    m = onnx.ModelProto.FromString(m.SerializeToString())
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    early, late = convs[1], convs[-1]
    resumed = Resumable(m, data, 16)
    list(resumed.capture(m, [early.input[0]]))
    view = GraphView(m.graph)
    for node in (late, early):  # downstream of what was computed, then inside it
        view.set_input_const(node, 1, view.const(node.input[1]) * 0.5)
        view.refresh()
        resumed.modified([node])
        name = m.graph.output[0].name
        got = np.concatenate([b[name] for b in resumed.capture(m, [name])])
        ref = np.concatenate([b[name] for b in _reference(m, [name], data, 16)])
        same(got, ref)


def test_over_the_memory_budget_it_starts_from_the_inputs(resnet):
    m, data = resnet
    convs = _tensors(m, "Conv")
    resumed = Resumable(m, data, 16, max_bytes=1)
    for name in (convs[2], convs[0], convs[-1]):  # out of order too
        got = np.concatenate([b[name] for b in resumed.capture(m, [name])])
        same(got, np.concatenate([b[name] for b in _reference(m, [name], data, 16)]))
    assert resumed.done == set()


def test_fixed_batch_is_padded_and_trimmed():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["y"])]
    m = model(nodes, [f32("x", [2, 3])], [f32("y", [2, 4])], [init("w", w), init("shape", np.array([2, 4]))])
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    resumed = Resumable(m, {"x": x}, 64)
    h = np.concatenate([b["h"] for b in resumed.capture(m, ["h"])])
    y = np.concatenate([b["y"] for b in resumed.capture(m, ["y"])])
    np.testing.assert_allclose(h, x @ w, rtol=1e-6)
    np.testing.assert_allclose(y, np.maximum(x @ w, 0), rtol=1e-6)
    assert len(y) == 5


def test_a_stored_tensor_and_a_new_one_in_one_request(resnet):
    m, data = resnet
    convs = _tensors(m, "Conv")
    resumed = Resumable(m, data, 16)
    list(resumed.capture(m, [convs[1]]))
    names = [convs[1], convs[3]]
    for got, ref in zip(resumed.capture(m, names), _reference(m, names, data, 16)):
        for name in names:
            same(got[name], ref[name])
