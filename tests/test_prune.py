"""The prune pass on graphs built in code: lossless rewrites, options, refit, report, determinism."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_channel_groups import Net

from onnxc.compiler import runtime
from onnxc.compiler.calibration import make_calibration
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.cost import model_cost
from onnxc.compiler.graph import GraphView
from onnxc.compiler.model import tensor_bytes
from onnxc.compiler.passes import PassContext, create
from onnxc.compiler.verify import compare
from onnxc.errors import UsageError
from onnxc.passes import prune
from onnxc.passes._importance import filter_norms
from onnxc.passes.channel_groups import analyze


def composite(opset: int = 17) -> onnx.ModelProto:
    """Every structure the rewrite must follow, with some channels dead (zero filter and bias)."""
    n = Net(seed=1, opset=opset)
    a = n.relu(n.conv("x", 3, 8, name="c1", dead=[1, 5]))
    r = n.relu(n.op("Add", [a, n.conv(a, 8, 8, name="res", dead=[1, 5])]))
    scale = n.rng.uniform(0.5, 1.5, 8).astype(np.float32)
    zeros, ones = np.zeros(8, np.float32), np.ones(8, np.float32)
    bn = n.op("BatchNormalization", [r, n.const(scale), n.const(zeros), n.const(zeros), n.const(ones)])
    m = n.op("Mul", [bn, n.const(n.rng.uniform(0.5, 1.5, (8, 1, 1)).astype(np.float32))])
    cat = n.relu(n.op("Concat", [n.conv(m, 8, 6, name="d", dead=[2]), n.conv(m, 8, 4, name="e", dead=[0])], axis=1))
    if opset >= 13:
        s1, s2 = n.op("Split", [cat, n.const(np.array([4, 6], np.int64))], outputs=2, axis=1)
    else:
        s1, s2 = n.op("Split", [cat], outputs=2, axis=1, split=[4, 6])
    g = n.relu(n.op("Add", [n.conv(s1, 4, 5, name="f1", dead=[3]), n.conv(s2, 6, 5, name="f2", dead=[3])]))
    h = n.relu(n.conv(g, 5, 5, group=5, name="dw", dead=[3]))
    sl = n.op("Slice", [h] + [n.const(np.array(v, np.int64)) for v in ([1], [5], [1])])
    up = n.op("Resize", [sl, n.const(np.zeros(0, np.float32)), n.const(np.array([1, 1, 2, 2], np.float32))],
              mode="nearest")
    p = n.op("MaxPool", [up], kernel_shape=[2, 2], strides=[2, 2])
    q = n.relu(n.conv(p, 4, 6, name="q", dead=[0, 4]))
    head = n.gemm(n.op("Flatten", [n.op("GlobalAveragePool", [q])], axis=1), 6, 3, name="fc")
    flat = n.relu(n.conv(q, 6, 4, stride=2, name="t", dead=[2]))
    side = n.gemm(n.op("Flatten", [flat], axis=1), 4 * 8 * 8, 3, name="fc2")
    return n.model({"x": [2, 3, 16, 16]}, [head, side])


def dead_keep(model):
    """Kept channels of every prunable group when exactly its dead units go."""
    analysis = analyze(model)
    view = GraphView(model.graph)
    keep, groups = {}, []
    for g in analysis.prunable():
        alive = filter_norms(g, view, 1) > 0
        if not alive.all():
            keep.update(g.keep_channels(alive))
            groups.append(g)
    return analysis, keep, groups


def outputs(model, x):
    return runtime.run(model, {"x": x})


@pytest.mark.parametrize("opset", [11, 17])
def test_removing_dead_channels_everywhere_is_lossless(opset):
    model = composite(opset)
    analysis, keep, groups = dead_keep(model)
    assert len(groups) >= 5  # residual, concat+split, add+depthwise+slice, q, t
    pruned = canonicalize(prune._reinfer(_rewritten(model, analysis, keep)))
    onnx.checker.check_model(pruned, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    ref, got = outputs(model, x), outputs(pruned, x)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-5)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in pruned.graph.value_info}
    for tensor, kept in keep.items():
        if tensor in shapes:
            assert shapes[tensor][1] == len(kept) < len(analysis.groups[analysis.group_of[tensor]].tensors[tensor])
    assert model_cost(pruned).params < model_cost(model).params
    assert tensor_bytes(pruned) < tensor_bytes(model)


def _rewritten(model, analysis, keep):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    prune.rewrite(copy, analysis, keep)
    return copy


def shuffle_net() -> onnx.ModelProto:
    n = Net(seed=2)
    a = n.relu(n.conv("x", 4, 8, k=1, group=2, name="g1", dead=[1, 5, 3, 7]))
    r = n.op("Reshape", [a, n.const(np.array([1, 2, 4, 6, 6], np.int64))])
    t = n.op("Transpose", [r], perm=[0, 2, 1, 3, 4])
    s = n.op("Reshape", [t, n.const(np.array([1, 8, 6, 6], np.int64))])
    d = n.conv(s, 8, 8, group=8, name="dw", dead=[2, 3, 6, 7])
    y = n.conv(d, 8, 4, k=1, group=2, name="g2")
    return n.model({"x": [1, 4, 6, 6]}, [y])


def test_channel_shuffle_and_grouped_convs_prune_losslessly():
    model = shuffle_net()
    analysis, keep, groups = dead_keep(model)
    assert len(groups) == 1 and groups[0].unit_bins is not None
    pruned = canonicalize(prune._reinfer(_rewritten(model, analysis, keep)))
    onnx.checker.check_model(pruned, full_check=True)
    x = np.random.default_rng(1).standard_normal((1, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(outputs(pruned, x)["g2_out"], outputs(model, x)["g2_out"], rtol=1e-4, atol=1e-5)
    convs = {n.name: n for n in pruned.graph.node if n.op_type == "Conv"}
    weights = {t.name: t.dims for t in pruned.graph.initializer}
    assert list(weights[convs["g1"].input[1]]) == [4, 2, 1, 1]
    assert list(weights[convs["g2"].input[1]]) == [4, 2, 1, 1]
    assert next(a.i for a in convs["dw"].attribute if a.name == "group") == 4


def chain(seed: int = 3, width: int = 32) -> onnx.ModelProto:
    n = Net(seed=seed)
    a = n.relu(n.conv("x", 3, width, name="c1"))
    b = n.relu(n.conv(a, width, width, name="c2"))
    c = n.relu(n.conv(b, width, 16, name="c3"))
    y = n.gemm(n.op("Flatten", [n.op("GlobalAveragePool", [c])], axis=1), 16, 5, name="fc")
    return n.model({"x": ["N", 3, 8, 8]}, [y])


def run_pass(model, seed=0, **options):
    cal = make_calibration(model, None, seed=0, random_count=48)
    return create("prune", options).run(canonicalize(model), PassContext(calibration=cal, seed=seed)), cal


def kept_channels(result, tensor_producer):
    change = next(c for c in result.changes if c.node == tensor_producer)
    return change.detail["units_after"]


def test_ratio_round_to_and_min_channels():
    model = chain()
    res, _ = run_pass(model, ratio=0.25, criterion="l1", reconstruct=False)
    assert kept_channels(res, "c1") == 24 and kept_channels(res, "c3") == 12
    res, _ = run_pass(model, ratio=0.3, criterion="l1", reconstruct=False, round_to=8)
    assert kept_channels(res, "c1") == 24  # 32 - 10 = 22, rounded up to 24
    assert "c3" not in {c.node for c in res.changes}  # 16 - 5 = 11, rounded up to 16: untouched
    res, _ = run_pass(model, ratio=0.9, criterion="l1", reconstruct=False, min_channels=6, round_to=1)
    assert kept_channels(res, "c1") == 6 and kept_channels(res, "c3") == 6
    # automatic (0): the nearest multiple of the machine's channel block, at least one; groups
    # under four blocks round to the largest power of two they hold four of (32 channels: 8)
    res, _ = run_pass(model, ratio=0.9, criterion="l1", reconstruct=False)
    assert kept_channels(res, "c1") == 8 and kept_channels(res, "c3") == 4
    res, _ = run_pass(model, ratio=0.3, criterion="l1", reconstruct=False)
    assert kept_channels(res, "c1") == 24 and kept_channels(res, "c3") == 12  # 22.4 -> 24, 11.2 -> 12


def test_exclude_frozen_report_and_validation():
    model = chain()
    res, _ = run_pass(model, ratio=0.5, criterion="l1", reconstruct=False, exclude=["c2*"])
    pruned = {c.node for c in res.changes}
    assert pruned == {"c3"}  # c1's and c2's groups both touch c2
    reasons = {s.node: s.reason for s in res.skipped}
    assert "excluded" in reasons["c1"] and "graph output" in reasons["fc"]
    info = {g["name"]: g for g in res.info["groups"]}
    assert info["c3"]["units_after"] == 8 and info["c3"]["macs_after"] < info["c3"]["macs_before"]
    with pytest.raises(UsageError):
        create("prune", {"ratio": 1.5})
    with pytest.raises(UsageError):
        create("prune", {"criterion": "random"})


def test_global_scope_removes_the_ratio_overall_but_unevenly():
    model = chain()
    res, _ = run_pass(model, ratio=0.5, scope="global", round_to=1)  # the automatic rounding evens it out
    before = sum(c.detail["units_before"] for c in res.changes)
    after = sum(c.detail["units_after"] for c in res.changes)
    assert before - after == round(0.5 * (32 + 32 + 16))
    fractions = {c.node: c.detail["units_after"] / c.detail["units_before"] for c in res.changes}
    assert len(set(fractions.values())) > 1


@pytest.mark.parametrize("criterion", ["l1", "activation", "thinet", "lsq"])
def test_refit_beats_slicing(criterion):
    model = chain(seed=4)
    sliced, cal = run_pass(model, ratio=0.5, criterion=criterion, reconstruct=False)
    refit, _ = run_pass(model, ratio=0.5, criterion=criterion)
    ref = canonicalize(model)
    e_sliced = compare(ref, canonicalize(sliced.model), cal.validation).rel_l2
    e_refit = compare(ref, canonicalize(refit.model), cal.validation).rel_l2
    assert e_refit < 0.7 * e_sliced
    for change in refit.changes:
        if change.detail["error_refit"] is not None:
            assert change.detail["error_refit"] <= change.detail["error_sliced"]


def test_same_seed_same_bytes_and_nothing_to_do_is_unmodified():
    model = chain()
    a, _ = run_pass(model, ratio=0.4, seed=7)
    b, _ = run_pass(model, ratio=0.4, seed=7)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    none, _ = run_pass(model, ratio=0.0)
    assert not none.modified


def test_unnamed_nodes_get_names_and_prune():
    model = chain()
    for node in model.graph.node:
        node.name = ""
    res, cal = run_pass(model, ratio=0.5)
    assert res.modified and len(res.changes) == 3
    assert len({n.name for n in res.model.graph.node}) == len(res.model.graph.node)
    assert compare(canonicalize(model), canonicalize(res.model), cal.validation).rel_l2 < 0.5


@pytest.mark.parametrize("criterion", ["lsq", "thinet"])
def test_dead_inputs_without_ridge_do_not_break_the_refit(criterion):
    model = composite()
    res, cal = run_pass(model, ratio=0.2, criterion=criterion, ridge=0.0, samples=256)
    assert res.modified
    pruned = canonicalize(res.model)
    onnx.checker.check_model(pruned)
    got = runtime.run(pruned, cal.validation)
    assert all(np.isfinite(v).all() for v in got.values())
    assert compare(canonicalize(model), pruned, cal.validation).rel_l2 < 1.0


def test_changes_count_macs_at_the_calibration_shapes_of_a_dynamic_model():
    """A dynamic spatial dim is read at the calibration samples' size (6 x 10), not as 1."""
    n = Net(seed=3)
    a = n.relu(n.conv("x", 3, 32, name="c1"))
    y = n.relu(n.conv(a, 32, 16, name="c2"))
    model = canonicalize(n.model({"x": ["N", 3, "H", "W"]}, [y]))
    x = np.random.default_rng(0).standard_normal((16, 3, 6, 10)).astype(np.float32)
    cal = make_calibration(model, {"x": x}, seed=0)
    res = create("prune", {"ratio": 0.5, "criterion": "l1", "reconstruct": False}).run(
        model, PassContext(calibration=cal, seed=0))
    [change] = [c for c in res.changes if c.node == "c1"]
    # the group holds c1's filters and c2's input channels: both convs at 60 positions
    assert change.before["macs"] == (3 * 9 * 32 + 32 * 9 * 16) * 60
    assert change.after["macs"] == (3 * 9 * 16 + 16 * 9 * 16) * 60
