"""Accuracy-aware compression to a target: fidelity per channel, the metric hook, sensitivity,
allocation, per-candidate rollback and the sensitivity cache."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from sample_data import CALIBRATION, SAMPLE_MODELS, accuracy, sample_path

from onnxc.api import optimize
from onnxc.compiler import allocation, sensitivity
from onnxc.compiler.verify import compare_outputs


def top1_disagreement(reference: list, candidate: list) -> float:
    """A user metric: the fraction of samples whose predicted class changed."""
    return float(np.mean(np.argmax(reference[0], axis=1) != np.argmax(candidate[0], axis=1)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sensitivity")


# ---- fidelity ------------------------------------------------------------------------------------
def test_channel_error_weighs_scores_like_boxes():
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 320, (4, 100, 4))
    scores = rng.uniform(0, 1, (4, 100, 3))
    ref = np.concatenate([boxes, scores], axis=2).astype(np.float32)
    got = ref.copy()
    got[..., 4:] = rng.uniform(0, 1, scores.shape)  # the class scores are destroyed
    out = compare_outputs({"y": ref}, {"y": got}).outputs[0]
    assert out.rel_l2 < 0.01  # the plain L2 sees only the boxes
    assert out.channel_rel_l2 > 0.4 and out.error == out.channel_rel_l2


def test_top1_per_position_for_sequences():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((2, 5, 7)).astype(np.float32)
    got = ref.copy()
    got[0, 0] = ref[0, 0][::-1]  # one position's argmax moves (reversed row of distinct values)
    fid = compare_outputs({"p": ref}, {"p": got})
    assert fid.top1 == pytest.approx(9 / 10)


def test_metric_replaces_the_default_error():
    ref = {"logits": np.eye(4, dtype=np.float32)}
    got = {"logits": np.eye(4, dtype=np.float32)[[0, 1, 3, 2]]}
    fid = compare_outputs(ref, got, top1_disagreement)
    assert fid.metric == pytest.approx(0.5) and fid.error == pytest.approx(0.5)
    assert compare_outputs(ref, ref, top1_disagreement).error == 0


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def test_probabilities_are_judged_as_logits():
    """A confident softmax hides a logit change that halves the margins: its probabilities move
    by a few percent, the logits (recovered as centered log-probabilities) by what they moved."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((64, 4)) * 0.3
    z[np.arange(64), rng.integers(0, 4, 64)] += 3.5  # top probability ~0.9, like the orientation pages
    moved = z + rng.standard_normal(z.shape) * 0.6
    ref, got = softmax(z), softmax(moved)
    out = compare_outputs({"p": ref}, {"p": got}).outputs[0]
    zc = z - z.mean(axis=1, keepdims=True)
    mc = moved - moved.mean(axis=1, keepdims=True)
    assert out.logit_rel_l2 == pytest.approx(np.linalg.norm(zc - mc) / np.linalg.norm(zc), rel=1e-4)
    assert out.error == out.logit_rel_l2 and out.logit_rel_l2 > 2 * out.rel_l2
    logits = compare_outputs({"z": z.astype(np.float32)}, {"z": moved.astype(np.float32)}).outputs[0]
    assert logits.logit_rel_l2 is None and logits.error == logits.rel_l2  # logits stay as they are
    # shape groups aggregate the same sums
    from onnxc.compiler.samples import Samples

    grouped = compare_outputs(Samples([{"p": ref[:40]}, {"p": ref[40:]}]),
                              Samples([{"p": got[:40]}, {"p": got[40:]}]))
    assert grouped.outputs[0].logit_rel_l2 == pytest.approx(out.logit_rel_l2, rel=1e-6)


# ---- allocation on the digits samples ------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_macs_half_keeps_top1(name, cache):
    result = optimize(sample_path(name), calibration=CALIBRATION, target="macs=0.5", cache_dir=cache)
    alloc = result.report.allocation
    assert alloc["met"] and result.report.after["macs"] <= 0.51 * result.report.before["macs"]
    assert accuracy(result.model) >= accuracy(sample_path(name)) - 0.5
    assert result.report.fidelity["error"] <= alloc["budget"]


def test_metric_changes_what_is_chosen(cache):
    """The budget is judged by the metric: a plan whose relative L2 is over 0.02 changes no label
    among the held-out samples, so the metric's run meets a target the default's cannot."""
    common = dict(calibration=CALIBRATION, target="macs=0.3", passes=["svd", "prune"], cache_dir=cache,
                  max_error=0.02)
    default = optimize(sample_path("mlp"), **common).report.allocation
    report = optimize(sample_path("mlp"), metric=top1_disagreement, **common).report
    custom = report.allocation
    assert custom["chosen"] != default["chosen"]
    assert custom["met"] and not default["met"]
    rows = custom["sensitivity"]["measurements"]
    assert all(r["error"] in {k / 64 for k in range(65)} for r in rows)  # top-1 changes on 64 held-out samples
    assert custom["surrogate_scale"] is not None  # a metric reading 0 for single rewrites: ranked by the surrogate
    assert report.fidelity["samples"] == 256  # and plans judged on every calibration sample, 64 held out among them
    assert report.fidelity["error"] <= 0.02


def test_rollback_keeps_the_good_candidates(cache, monkeypatch):
    """Sensitivities understated tenfold make the first plan leave the budget: the allocator gives
    back the worst error-per-saving steps one candidate at a time and keeps the rest."""
    real = sensitivity.measure

    def understated(*args, **kwargs):
        table = real(*args, **kwargs)
        for m in table.measurements:
            m.error /= 10
        return table

    monkeypatch.setattr(allocation, "measure", understated)
    budget = 0.02  # the true plan at macs=0.2 verifies at ~0.03: the first round must leave the budget
    result = optimize(sample_path("mlp"), calibration=CALIBRATION, passes=["svd"], target="macs=0.2",
                      max_error=budget, cache_dir=cache)
    alloc = result.report.allocation
    rounds = alloc["rounds"]
    assert any(a["error"] > budget and b["steps"] < a["steps"] for a, b in zip(rounds, rounds[1:])), rounds
    assert result.report.fidelity["error"] <= budget
    kept = [k for k in alloc["chosen"] if k.startswith("svd:")]
    assert kept, "the rollback discarded every svd layer"
    assert result.report.after["macs"] < result.report.before["macs"]


def test_second_target_reads_the_cache(cache):
    first = optimize(sample_path("mlp"), calibration=CALIBRATION, target="macs=0.6", passes=["svd"], cache_dir=cache)
    second = optimize(sample_path("mlp"), calibration=CALIBRATION, target="params=0.5", passes=["svd"],
                      cache_dir=cache)
    s1, s2 = first.report.allocation["sensitivity"], second.report.allocation["sensitivity"]
    assert s2["measured"] == 0 and s2["cache_hits"] == len(s2["measurements"]) > 0
    assert s1["cache"] == s2["cache"]
    assert second.report.after["params"] <= 0.51 * second.report.before["params"]


def test_cli_target_metric_plot(tmp_path, cache, monkeypatch):
    from onnxc.cli import main

    monkeypatch.setenv("ONNXC_CACHE", str(cache))
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    out, report, plot = tmp_path / "m.onnx", tmp_path / "r.json", tmp_path / "p.png"
    with pytest.raises(SystemExit) as exc:
        main([
            "optimize", str(sample_path("mlp")), "-o", str(out), "--calibration", str(CALIBRATION), "-p", "svd",
            "--target", "macs=0.6", "--metric", "test_allocation:top1_disagreement", "--max-error", "0.02",
            "--plot", str(plot), "--report", str(report), "-q",
        ])
    assert exc.value.code == 0
    data = json.loads(report.read_text())
    assert data["allocation"]["met"] and data["fidelity"]["metric"] <= 0.02
    assert data["after"]["macs"] <= 0.61 * data["before"]["macs"]
    real = data["allocation"]["realization"]
    assert real["macs_ratio"] == pytest.approx(data["after"]["macs"] / data["before"]["macs"])
    assert real["efficiency"] == pytest.approx(real["macs_ratio"] / real["latency_ratio"])
    head = plot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 400 and height > 200


@pytest.mark.parametrize("bad", ["macs", "flops=0.5", "macs=1.5", "macs=x"])
def test_bad_target_is_one_line(bad, tmp_path, capsys):
    from onnxc.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["optimize", str(sample_path("mlp")), "-o", str(tmp_path / "m.onnx"), "--target", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--target" in err and len(err.splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


def test_size_target_clusters_per_layer(cache, tmp_path):
    out = tmp_path / "m.onnx"
    result = optimize(sample_path("mlp"), calibration=CALIBRATION, target="size=0.3", passes=["cluster"],
                      cache_dir=cache, output=out)
    alloc = result.report.allocation
    assert alloc["met"] and all(k.startswith("cluster:") for k in alloc["chosen"])
    assert result.report.file_bytes["after"] <= 0.31 * result.report.file_bytes["before"]
    assert accuracy(out) >= accuracy(sample_path("mlp")) - 0.5


# ---- predictions and the search over step counts (no sensitivity measurement) --------------------
def test_cost_model_multiplies_overlapping_prunes():
    """Groups pruned together save what their nodes keep multiplied ((1 - r1)(1 - r2) of a conv
    between them), read from each group's saving alone; summing those savings over-counts."""
    from onnxc.compiler.canonical import canonicalize
    from onnxc.compiler.cost import model_cost
    from onnxc.compiler.model import load
    from onnxc.compiler.passes import PassContext

    model = canonicalize(load(sample_path("vgg")))
    techniques = sensitivity.make_techniques(["prune:criterion=l1,reconstruct=false"])
    ctx = PassContext(calibration=None, seed=0)
    base = model_cost(model).totals()
    found = sensitivity.candidates(model, techniques, "macs")
    plan = {("prune", c.name): level for c, level in zip(found, (0.5, 0.25, 0.5, 0.75))}
    rows = []
    for key, level in plan.items():
        alone, _ = sensitivity.apply_plan(model, {key: level}, techniques, ctx)
        after = model_cost(alone).totals()
        rows.append(sensitivity.Measurement(*key, level, 0.0, {k: base[k] - after[k] for k in ("macs", "params")}))
    table = sensitivity.Table(rows, base, nodes={(c.technique, c.name): list(c.nodes) for c in found})
    costs = allocation.CostModel.of(model, table, "macs", None)
    predicted = costs.savings([allocation.Step(*key, level, 0.0, 0.0) for key, level in plan.items()])[-1]
    together, _ = sensitivity.apply_plan(model, plan, techniques, ctx)
    actual = base["macs"] - model_cost(together).totals()["macs"]
    assert predicted == pytest.approx(actual, rel=1e-9)
    assert sum(r.saving["macs"] for r in rows) > 1.15 * actual


def test_deep_targets_offer_deeper_prune_levels():
    from onnxc.compiler.passes import create

    prune, tucker = create("prune"), create("tucker")
    assert prune.levels() == prune.levels(0.5)
    assert max(prune.levels(0.15)) > max(prune.levels(0.5))
    assert tucker.levels(0.15) == tucker.levels(0.5)


def _steps(*rows):
    return sorted((allocation.Step(t, n, level, saving, error2) for t, n, level, saving, error2 in rows),
                  key=lambda s: s.slope)


def test_one_technique_per_node_by_the_marginal_trade():
    """A layer's factorization whose first step is the cheapest of all still gives its node up to
    the two prune groups around it when they save more at the plan's marginal error-per-saving,
    and keeps it when they cost more; nodes nobody shares are left alone."""
    nodes = {("prune", "a"): ["conv1", "dw1", "conv2"], ("prune", "b"): ["conv2", "dw2", "conv3"],
             ("tucker", "conv2"): ["conv2"], ("tucker", "conv9"): ["conv9"]}
    cheap_prune = _steps(("tucker", "conv2", 0.5, 10, 1e-6), ("tucker", "conv2", 0.25, 5, 1e-4),
                         ("prune", "a", 0.25, 10, 1e-5), ("prune", "a", 0.5, 10, 1e-4),
                         ("prune", "b", 0.25, 10, 1e-5), ("prune", "b", 0.5, 10, 1e-4),
                         ("tucker", "conv9", 0.5, 10, 1e-5))
    techniques = sensitivity.make_techniques(["prune", "tucker"])
    kept = allocation.one_technique_per_node(cheap_prune, nodes, slope=1e-5, techniques=techniques)
    assert {(s.technique, s.name) for s in kept} == {("prune", "a"), ("prune", "b"), ("tucker", "conv9")}
    costly_prune = _steps(("tucker", "conv2", 0.5, 10, 1e-6), ("tucker", "conv2", 0.25, 5, 1e-5),
                          ("prune", "a", 0.25, 10, 1e-3), ("prune", "b", 0.25, 10, 1e-3),
                          ("tucker", "conv9", 0.5, 10, 1e-5))
    kept = allocation.one_technique_per_node(costly_prune, nodes, slope=1e-5, techniques=techniques)
    assert {(s.technique, s.name) for s in kept} == {("tucker", "conv2"), ("tucker", "conv9")}


def test_trim_gives_back_the_costliest_top_levels_the_target_does_not_need():
    """A plan that overshoots its target gives back whole top levels, the costliest error first,
    while the saving still covers what is wanted; a candidate's lower level never goes before its
    higher one, and nothing goes when every step is needed."""
    steps = [allocation.Step("prune", "a", 0.25, 10, 1e-4), allocation.Step("prune", "b", 0.25, 10, 2e-4),
             allocation.Step("prune", "a", 0.5, 10, 9e-4), allocation.Step("tucker", "c", 0.5, 30, 5e-3)]

    def saving(trial):
        return sum(s.saving for s in trial)

    kept = allocation.trimmed(steps, saving, wanted=28)  # 60 saved: c's level (the costliest) goes
    assert kept == steps[:3]
    kept = allocation.trimmed(steps, saving, wanted=15)  # then a at 0.5 (a's top level); b is needed
    assert kept == steps[:2]
    kept = allocation.trimmed(steps, saving, wanted=5)  # b costs more than a's first level
    assert kept == steps[:1]
    assert all(s in kept for s in steps if (s.technique, s.name, s.level) == ("prune", "a", 0.25))
    assert allocation.trimmed(steps, saving, wanted=60) == steps


def test_deep_target_on_probabilities_keeps_one_technique_per_node(tmp_path, cache):
    """The digits VGG with a softmax head (judged as logits) at macs=0.25 (deep: prune offers 0.875
    too): the target is met within the budget, top-1 stays within a point on the test digits, and
    no node is both pruned and factorized."""
    import onnx
    from onnx import helper
    from sample_data import load_test_set

    from onnxc.compiler.model import clone, load

    model = load(sample_path("vgg"))
    logits = model.graph.output[0].name
    model.graph.node.append(helper.make_node("Softmax", [logits], ["probabilities"], axis=1))
    model.graph.output[0].name = "probabilities"
    path = tmp_path / "vgg_softmax.onnx"
    onnx.save(model, path)
    result = optimize(path, calibration=CALIBRATION, target="macs=0.25", cache_dir=cache)
    alloc = result.report.allocation
    assert alloc["met"] and result.report.fidelity["error"] <= alloc["budget"]
    out = result.report.fidelity["outputs"][0]
    assert out["logit_rel_l2"] is not None and result.report.fidelity["error"] == out["logit_rel_l2"]
    x, y = load_test_set()
    from onnxc.compiler.runtime import run

    before = np.mean(run(model, {"input": x})["probabilities"].argmax(1) == y)
    after = np.mean(run(result.model, {"input": x})["probabilities"].argmax(1) == y)
    assert after >= before - 0.01
    techniques = sensitivity.make_techniques(None)
    from onnxc.compiler.canonical import canonicalize

    groups = {g.name: g.nodes for g in techniques["prune"].candidates(clone(canonicalize(model)))}
    chosen = [k.split(":", 1) for k in alloc["chosen"]]
    pruned = {n for t, name in chosen if t == "prune" for n in groups[name]}
    factorized = {name for t, name in chosen if t in ("svd", "tucker")}
    assert pruned and not pruned & factorized


@pytest.mark.parametrize("reachable", [True, False])
def test_search_corrects_predictions(reachable):
    """The verified error grows 30x faster than the quadrature prediction and savings come in at
    80% of the predicted ones: the search still ends at the fewest steps meeting the target
    within the budget, or (target out of reach) at the most steps within the budget."""
    n = 60
    cum_save = np.linspace(0, 0.9, n + 1)
    cum_err2 = np.linspace(0, 1e-4, n + 1)  # predicted error 0.01 at most: verified, 0.3
    budget, target = 0.25, allocation.Target("macs", 0.6 if reachable else 0.15)

    def verify(k):
        return 30 * np.sqrt(cum_err2[k]), 0.8 * cum_save[k]  # (error, saved)

    search = allocation.Search(cum_save, cum_err2, 1.0, target, budget)
    k, tried = search.first(), []
    while k is not None and len(tried) < allocation.MAX_ROUNDS:
        error, saved = verify(k)
        tried.append(k)
        ratio = 1 - saved
        k, _ = search.next(k, error, saved, ratio <= target.ratio + allocation.TOLERANCE, ratio)
    within = [k for k in tried if verify(k)[0] <= budget]
    most_within = max(j for j in range(n + 1) if verify(j)[0] <= budget)
    if reachable:
        fewest = min(j for j in range(n + 1) if 1 - verify(j)[1] <= target.ratio + allocation.TOLERANCE)
        assert fewest < most_within
        assert min(j for j in within if 1 - verify(j)[1] <= target.ratio + allocation.TOLERANCE) <= fewest + 2
    else:
        assert max(within) >= most_within - 1


def test_channel_block_is_what_onnxruntime_blocks():
    """Levels round to runtime.channel_block(): a Conv of that many input channels runs in
    onnxruntime's blocked layout, one more channel does not."""
    import onnx
    import onnxruntime as ort
    from graphs import f32, init, model
    from onnx import helper

    from onnxc.compiler import runtime

    block = runtime.channel_block()
    assert block in (1, 4, 8, 16)
    if block == 1:
        pytest.skip("this onnxruntime build has no blocked convolutions")

    def blocked(c: int, tmp: str) -> bool:
        w = np.ones((block, c, 3, 3), np.float32)
        m = model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], [f32("x", [1, c, 8, 8])],
                  [f32("y", [1, block, 8, 8])], [init("w", w)])
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = f"{tmp}/o{c}.onnx"
        ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return any(n.domain == "com.microsoft.nchwc" for n in onnx.load(opts.optimized_model_filepath).graph.node)

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        assert blocked(2 * block, tmp) and not blocked(2 * block + 1, tmp)
    assert sensitivity.round_to() == block


def test_layout_score_error_reads_what_the_decoder_reads():
    """The layout benchmark's metric ignores classes nowhere near the 0.5 threshold (the default
    per-channel error does not) and sees a detection's score and boxes move."""
    import layout_pages

    from onnxc.compiler.verify import channel_error

    rng = np.random.default_rng(0)
    scores = [np.full((1, p, 10), 0.01) for p in (64, 16, 4, 1)]
    boxes = [rng.standard_normal((1, p, 32)) for p in (64, 16, 4, 1)]
    scores[0][0, 5, 1] = 0.6  # one title at stride 8
    ref = scores + boxes
    assert layout_pages.score_error(ref, ref) == 0.0
    faint = [s.copy() for s in scores]
    faint[0][..., 9] = 0.03  # a class these pages never hold triples, far under the threshold
    assert layout_pages.score_error(ref, faint + boxes) == 0.0
    assert channel_error(ref[0], faint[0], 2) > 0.5
    weaker = [s.copy() for s in scores]
    weaker[0][0, 5, 1] = 0.45
    assert layout_pages.score_error(ref, weaker + boxes) == pytest.approx(0.25)
    moved = [b.copy() for b in boxes]
    moved[0][0, 6] += 1.0  # no detection there
    assert layout_pages.score_error(ref, scores + moved) == 0.0
    moved[0][0, 5] *= 1.5
    assert layout_pages.score_error(ref, scores + moved) == pytest.approx(0.5)


# ---- the Technique protocol ----------------------------------------------------------------------
def test_a_technique_in_one_file_is_planned(cache):
    """A toy technique defined in one test module (tests/toy_technique.py) is measured, chosen and
    applied by the allocator with no change to onnxc: the compiler knows techniques only through
    the protocol."""
    from toy_technique import ToyRankPass

    result = optimize(sample_path("mlp"), calibration=CALIBRATION, passes=[ToyRankPass()], target="macs=0.6",
                      cache_dir=cache)
    alloc = result.report.allocation
    rows = alloc["sensitivity"]["measurements"]
    # two levels of the two large Gemms (the 10-class head holds under 1% of the MACs: not measured)
    assert {r["technique"] for r in rows} == {"toy_rank"} and len(rows) == 2 * 2
    assert alloc["met"] and all(k.startswith("toy_rank:") for k in alloc["chosen"])
    assert result.report.after["macs"] <= 0.61 * result.report.before["macs"]
    assert any(n.name.endswith("/toy_1") for n in result.model.graph.node)
    assert result.report.fidelity["error"] <= alloc["budget"]


def test_techniques_are_planned_for_the_target_kind():
    """`Technique.planned` hears the kind the run plans on: circulant takes its fft form for a
    MACs target only (then saving MACs, pointwise convs included), a form the user set wins, and
    the other techniques are configured the same whatever the kind."""
    from onnxc.compiler.canonical import canonicalize
    from onnxc.compiler.model import load

    model = canonicalize(load(sample_path("mobilenet")))
    specs = ["prune", "svd", "tucker", "cp", "cluster", "circulant"]
    for kind in ("params", "size", "latency", None):
        plain = sensitivity.make_techniques(specs, kind)["circulant"]
        assert plain.form == "shift" and "macs" not in plain.saves, kind
    macs = sensitivity.make_techniques(specs, "macs")
    assert macs["circulant"].form == "fft" and "macs" in macs["circulant"].saves
    assert macs["circulant"].convs and macs["circulant"].pad
    found = sensitivity.candidates(model, macs, "macs")
    circulant = [c for c in found if c.technique == "circulant"]
    assert len(circulant) == 9 and all(c.name.endswith("Conv") for c in circulant)  # its pointwise convs
    assert sensitivity.make_techniques(["circulant:form=shift"], "macs")["circulant"].form == "shift"
    others = {k: p.spec() for k, p in macs.items() if k != "circulant"}
    for kind in ("params", "size", "latency"):
        assert {k: p.spec() for k, p in sensitivity.make_techniques(specs, kind).items() if k != "circulant"} == others


def test_candidates_leave_the_model_untouched():
    """Every built-in technique finds its candidates without renaming or editing the model."""
    from onnxc.compiler.canonical import canonicalize
    from onnxc.compiler.model import load

    model = canonicalize(load(sample_path("resnet")))
    for node in model.graph.node:
        node.name = ""  # prune names unnamed nodes: it must do so on its own copy
    before = model.SerializeToString(deterministic=True)
    techniques = sensitivity.make_techniques(["prune", "svd", "tucker", "cp", "cluster"])
    found = sensitivity.candidates(model, techniques, "size")
    assert {c.technique for c in found} >= {"prune", "tucker", "cluster"}
    assert all(c.nodes for c in found)
    assert model.SerializeToString(deterministic=True) == before


# ---- discrete metrics ----------------------------------------------------------------------------
def test_a_starved_metric_is_planned_on_its_surrogate():
    """A metric that reads 0 for most single rewrites (it counts samples) gives the search nothing
    to rank by: the surrogate measured in the same runs orders the steps, scaled to the metric."""
    M = sensitivity.Measurement
    saving = {"macs": 100, "params": 10, "bytes": 40}
    rows = [M("prune", "a", 0.5, 0.0, saving, surrogate=0.02), M("prune", "b", 0.5, 0.0, saving, surrogate=0.20),
            M("prune", "c", 0.5, 1 / 32, saving, surrogate=0.10), M("prune", "d", 0.5, 0.0, saving, surrogate=0.05)]
    table = sensitivity.Table(rows, {"macs": 1000, "params": 100, "bytes": 400})
    errors, scale = allocation.planning_errors(table)
    assert scale == pytest.approx((1 / 32) / 0.10)
    steps = allocation.ordered_steps(table, "macs", errors)
    assert [s.name for s in steps] == ["a", "d", "c", "b"]  # by the surrogate, not the metric's ties at 0
    assert errors[("prune", "c", 0.5)] == pytest.approx(1 / 32)
    continuous = sensitivity.Table([M("prune", n, 0.5, e, saving, surrogate=e * 2) for n, e in
                                    (("a", 0.01), ("b", 0.02), ("c", 0.0))], table.base)
    assert allocation.planning_errors(continuous)[1] is None  # a metric that moves is planned on as it is


def test_the_stretched_metric_sees_how_near_samples_are_to_flipping():
    """A change too small to flip any sample's label reads 0 in the metric, but stretching it
    shows which of two such changes is nearer to flipping labels, and by how many samples."""
    from onnxc.compiler.verify import amplified_metric

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(64, 10)).astype(np.float32)
    top = ref.argmax(1)
    toward = np.zeros_like(ref)
    toward[np.arange(64), top] = -1.0  # pushes every top class down, towards its runner-up
    gap = np.sort(ref, 1)[:, -1] - np.sort(ref, 1)[:, -2]
    small, larger = ref + 0.2 * gap.min() * toward, ref + 0.9 * gap.min() * toward
    flips = lambda r, g: float(np.mean(r[0].argmax(1) != g[0].argmax(1)))  # noqa: E731
    assert flips([ref], [small]) == flips([ref], [larger]) == 0.0
    a, b = amplified_metric(flips, {"y": ref}, {"y": small}), amplified_metric(flips, {"y": ref}, {"y": larger})
    assert 0 < a < b <= 1
    assert amplified_metric(flips, {"y": ref}, {"y": ref}) == 0.0

    def logs(r, g):  # a metric that cannot read stretched probabilities
        return float(np.mean(np.log(g[0])))
    assert amplified_metric(logs, {"y": np.full((4, 2), 0.5)}, {"y": np.array([[0.4, 0.6]] * 4)}) is None


def test_metric_resolution_is_reported(cache):
    common = dict(calibration=CALIBRATION, passes=["svd"], target="macs=0.7", cache_dir=cache,
                  metric=top1_disagreement)
    below = optimize(sample_path("mlp"), max_error=0.005, **common).report
    assert below.metric_resolution == pytest.approx(1 / 64)  # 256 calibration samples, a quarter held out
    assert any("below the resolution" in n for n in below.notes)
    default = optimize(sample_path("mlp"), **common).report
    assert any("--metric without --max-error" in n for n in default.notes)
    assert not any("below the resolution" in n for n in default.notes)
