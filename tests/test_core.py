"""Canonical form, graph view, pass registry and manager, calibration, cost and verification."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import graphs
import numpy as np
import onnx
import pytest
from onnx import helper
from sample_data import SAMPLES

import onnxc
from onnxc.compiler import calibration as calib
from onnxc.compiler import model as model_io
from onnxc.compiler import runtime
from onnxc.compiler.canonical import canonicalize, toposort
from onnxc.compiler.graph import GraphView
from onnxc.compiler.passes import PASSES, Pass, PassContext, PassManager, PassResult, create, register
from onnxc.compiler.recipe import build, parse_spec
from onnxc.compiler.verify import compare
from onnxc.errors import OnnxcError, UsageError


def test_toposort_is_iterative_on_long_chains():
    m = graphs.chain(6000)
    start = time.perf_counter()
    toposort(m.graph)
    assert time.perf_counter() - start < 10
    seen = {"x"} | {t.name for t in m.graph.initializer}
    for node in m.graph.node:
        assert all(i in seen for i in node.input)
        seen.update(node.output)


def test_shared_initializer_copy_on_write():
    rng = np.random.default_rng(0)
    w = graphs.init("w", graphs.rand(rng, 4, 4))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="a"),
             helper.make_node("MatMul", ["a", "w"], ["y"], name="b")]
    m = graphs.model(nodes, [graphs.f32("x", [1, 4])], [graphs.f32("y", [1, 4])], [w])
    view = GraphView(m.graph)
    first = m.graph.node[0]
    new_name = view.set_input_const(first, 1, np.zeros((4, 4), np.float32))
    assert new_name != "w" and m.graph.node[1].input[1] == "w"
    assert np.array_equal(view.const("w"), onnx.numpy_helper.to_array(w))
    # The last user may change it in place.
    view.refresh()
    assert view.set_input_const(m.graph.node[1], 1, np.ones((4, 4), np.float32)) == "w"


def test_batchnorm_fold_is_exact():
    m = graphs.constant_node_cnn()
    c = canonicalize(m)
    assert "BatchNormalization" not in {n.op_type for n in c.graph.node}
    x = {"x": np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)}
    assert compare(m, c, x).rel_l2 < 1e-6


def test_canonical_is_idempotent():
    c1 = canonicalize(graphs.constant_node_cnn())
    c2 = canonicalize(c1)
    assert c1.SerializeToString(deterministic=True) == c2.SerializeToString(deterministic=True)


def test_save_switches_to_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    m = canonicalize(graphs.chain(10, width=32))
    out = model_io.save(m, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size >= 5 * 32 * 32 * 4
    back = model_io.load(out)
    x = {"x": np.ones((2, 32), np.float32)}
    assert compare(m, back, x).rel_l2 == 0


def test_load_errors(tmp_path):
    with pytest.raises(OnnxcError, match="no such file"):
        model_io.load(tmp_path / "nope.onnx")
    (tmp_path / "e.onnx").write_bytes(b"")
    with pytest.raises(OnnxcError, match="empty"):
        model_io.load(tmp_path / "e.onnx")


@register
@dataclass
class _BreakPass(Pass):
    """A test pass that scales the first weight: lossy by `factor`."""

    id = "test_break"
    summary = "test only"
    factor: float = 2.0

    def run(self, model, ctx):
        view = GraphView(model.graph)
        node = next(n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul"))
        view.set_input_const(node, 1, view.const(node.input[1]) * self.factor)
        return PassResult(model, True)


@register
@dataclass
class _CrashPass(Pass):
    id = "test_crash"
    summary = "test only"

    def run(self, model, ctx):
        raise RuntimeError("boom")


def _vgg_ctx(max_error):
    m = canonicalize(onnxc.load(SAMPLES / "vgg.onnx"))
    cal = calib.make_calibration(m, SAMPLES / "digits_calib.npz")
    return m, PassContext(calibration=cal, max_error=max_error)


def test_manager_rolls_back_over_budget_and_keeps_within():
    m, ctx = _vgg_ctx(0.01)
    out, records = PassManager([create("test_break", {"factor": 3.0}), create("test_break", {"factor": 1.001})],
                               ctx).run(m)
    assert records[0].status == "rolled back" and "exceeds the budget" in records[0].reason
    assert records[1].status == "applied"
    assert 0 < records[1].fidelity["rel_l2"] < 0.01


def test_manager_survives_a_crashing_pass():
    m, ctx = _vgg_ctx(None)
    out, records = PassManager([create("test_crash", {})], ctx).run(m)
    assert records[0].status == "failed" and "boom" in records[0].reason
    assert out is m


def test_registry_options_are_typed_and_checked():
    p = create("test_break", {"factor": "1.5"})
    assert p.factor == 1.5 and p.spec() == "test_break:factor=1.5"
    with pytest.raises(UsageError, match="valid: factor"):
        create("test_break", {"nope": 1})
    with pytest.raises(UsageError, match="expects float"):
        create("test_break", {"factor": "x"})
    assert parse_spec("prune:ratio=0.5, criterion=l1") == ("prune", {"ratio": "0.5", "criterion": "l1"})
    assert "test_break" in PASSES


def test_recipe_toml(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('max_error = 0.02\nseed = 5\n[[pass]]\nname = "test_break"\nfactor = 1.1\n')
    recipe = build(["test_break:factor=1.2"], None, path)
    assert [p.factor for p in recipe.passes] == [1.1, 1.2]
    assert recipe.max_error == 0.02 and recipe.seed == 5


def test_calibration_split_is_held_out():
    m = onnxc.load(SAMPLES / "vgg.onnx")
    cal = calib.make_calibration(m, SAMPLES / "digits_calib.npz", seed=0)
    n_train, n_val = len(cal.train["input"]), len(cal.validation["input"])
    assert n_train + n_val == 256 and n_val == 64
    train_rows = {r.tobytes() for r in cal.train["input"]}
    assert not any(r.tobytes() in train_rows for r in cal.validation["input"])


def test_capture_samples_positions_when_over_budget():
    m = canonicalize(onnxc.load(SAMPLES / "vgg.onnx"))
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    x = {"input": np.load(SAMPLES / "digits_calib.npz")["input"][:16]}
    full = calib.capture(m, [conv.output[0]], x)[conv.output[0]]
    assert full.shape == (16, 32, 16, 16)
    sampled = calib.capture(m, [conv.output[0]], x, max_bytes=16 * 32 * 4 * 10)[conv.output[0]]
    assert sampled.shape == (160, 32)
    # every sampled row is a real channel vector of the full map
    flat = full.transpose(0, 2, 3, 1).reshape(-1, 32)
    assert all(np.any(np.all(np.isclose(flat, row), axis=1)) for row in sampled[:5])


def test_verify_metrics():
    ref = {"y": np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], np.float32)}
    got = {"y": np.array([[1.0, 2.0, 3.5], [3.0, 2.5, 2.0]], np.float32)}
    from onnxc.compiler.verify import compare_outputs

    f = compare_outputs(ref, got)
    o = f.outputs[0]
    assert o.max_abs == pytest.approx(1.0)
    assert o.rel_l2 == pytest.approx(np.sqrt(0.25 + 0.25 + 1.0) / np.sqrt(28))
    assert o.top1 == 1.0 and 0.95 < o.cosine < 1.0


def _hand_macs(name: str) -> int:
    """MACs counted by hand from the architectures in samples/make_samples.py (batch 1, 16x16 input)."""
    conv = lambda cin, cout, hw, k=3, groups=1: cout * hw * hw * (cin // groups) * k * k  # noqa: E731
    if name == "mlp":
        return 256 * 512 + 512 * 256 + 256 * 10
    if name == "vgg":
        return (conv(1, 32, 16) + conv(32, 32, 16) + conv(32, 64, 8) + conv(64, 64, 8) + conv(64, 128, 4)
                + conv(128, 128, 4) + 128 * 10)
    if name == "resnet":
        return (conv(1, 32, 16) + 2 * conv(32, 32, 16) + conv(32, 64, 8) + conv(64, 64, 8) + conv(32, 64, 8, k=1)
                + 2 * conv(64, 64, 8) + 64 * 10)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet"])
def test_inspect_macs_match_hand_count(name):
    assert onnxc.inspect(SAMPLES / f"{name}.onnx").macs == _hand_macs(name)


@pytest.mark.parametrize("nodes", [60, 3000])
def test_inspect_is_fast(nodes):
    m = graphs.chain(nodes)
    start = time.perf_counter()
    cost = onnxc.inspect(m, {"x": [1, 4]})
    assert time.perf_counter() - start < 20
    assert cost.macs == (nodes // 2) * 16


def test_runtime_pads_fixed_batches():
    m = canonicalize(graphs.constant_node_cnn(), {"x": [4, 3, 8, 8]})
    x = {"x": np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)}
    out = runtime.run(m, x)["y"]
    assert out.shape == (6, 5)
    free = runtime.run(graphs.constant_node_cnn(), x)["y"]
    assert np.allclose(out, free, atol=1e-5)


# ---- the default budget: a destroyed model is not written as a success ---------------------------
def test_default_budget_rolls_back_a_destroying_pass_and_is_stated(tmp_path):
    from onnxc.api import optimize
    from onnxc.compiler.passes import DEFAULT_BUDGET
    from onnxc.compiler.report import budget_text

    src, cal = SAMPLES / "vgg.onnx", SAMPLES / "digits_calib.npz"
    result = optimize(src, passes=[create("test_break", {"factor": 3.0})], calibration=cal)
    [record] = result.report.passes
    assert record.status == "rolled back" and f"exceeds the budget {DEFAULT_BUDGET:g}" in record.reason
    assert (result.report.max_error, result.report.budget_source) == (DEFAULT_BUDGET, "default")
    assert budget_text(DEFAULT_BUDGET, "default") == "budget 0.25 (default; set --max-error to change)"
    # --max-error inf: no budget, the pass is kept (and the JSON report stays valid JSON)
    kept = optimize(src, passes=[create("test_break", {"factor": 3.0})], calibration=cal, max_error=float("inf"))
    assert kept.report.passes[0].status == "applied" and kept.report.fidelity["rel_l2"] > DEFAULT_BUDGET
    assert (kept.report.max_error, kept.report.budget_source) == (None, "none")
    assert json.loads(kept.report.to_json())["budget_source"] == "none"
    # a preset's budget is the preset's
    lossless = optimize(src, preset="lossless", calibration=cal)
    assert (lossless.report.max_error, lossless.report.budget_source) == (1e-5, "preset lossless")
    with pytest.raises(UsageError, match="--max-error must be at least 0"):
        optimize(src, passes=[create("test_break", {})], calibration=cal, max_error=-1.0)
