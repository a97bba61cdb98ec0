"""Refits judged on samples they were not fitted on (compiler/holdout.py), and fitted where the
layer's output really is: on the real text recognizer with lines of their own widths, and on a
small conv net with a symbolic width."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import onnx
import pytest
from graphs import f32, init, model
from onnx import helper
from sample_data import CALIBRATION, sample_path

from onnxc.compiler import holdout, runtime
from onnxc.compiler.calibration import Calibration, make_calibration, with_outputs, working_shapes
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.graph import GraphView
from onnxc.compiler.model import clone
from onnxc.compiler.passes import PassContext, create
from onnxc.compiler.samples import Samples
from onnxc.passes import _reconstruct as rec


def test_choose_keeps_the_refit_only_where_held_out_samples_agree():
    assert holdout.choose(holdout.Errors(0.01, 0.2), holdout.Errors(0.3, 0.1)).kept is False
    assert holdout.choose(holdout.Errors(0.01, 0.05), holdout.Errors(0.3, 0.1)).kept is True
    # nothing held out: the in-sample errors decide
    verdict = holdout.choose(holdout.Errors(0.01, None), holdout.Errors(0.3, None))
    assert verdict.kept and verdict.detail()["refit"] == "kept"
    assert holdout.choose(holdout.Errors(0.01, float("nan")), holdout.Errors(0.3, 0.1)).kept is False


def _wide_net() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="c2")]
    inits = [init("w1", rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3),
             init("b1", rng.standard_normal(8).astype(np.float32) * 0.1),
             init("w2", rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3),
             init("b2", np.zeros(4, np.float32))]
    return model(nodes, [f32("x", ["N", 3, 8, "W"])], [f32("y", ["N", 4, 8, "W"])], inits)


def test_a_layer_with_symbolic_dims_is_fitted_on_its_whole_output():
    """The graph says 1 for a symbolic width; the rows must come from each batch's real 8 x W map
    (before, every sample gave its top-left pixel only)."""
    m = canonicalize(_wide_net())
    view = GraphView(m.graph)
    node = view.node_by_name("c2")
    job = rec.RefitJob("c2", "r1", "y", np.arange(8), None)
    refitter = rec.Refitter(job, node, view, view, samples=10_000, total=4, from_original=True)
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 24)).astype(np.float32)
    values = runtime.run(with_outputs(m, ["r1", "y"]), {"x": x})
    refitter.update(values, values, np.random.default_rng(0))
    rows = sum(s.n for fold in refitter.folds for s in fold)
    assert rows == 4 * 8 * 24


def test_prune_reports_in_sample_and_held_out_errors_side_by_side():
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((1, 3, 8, w)).astype(np.float32)} for w in (16, 24, 32) for _ in range(8)]
    src = _wide_net()
    cal = make_calibration(canonicalize(src, {}, infer=False), feeds, seed=0)
    m = canonicalize(src, working_shapes(src, cal, {}))
    p = replace(create("prune", {}), _levels={next(g.name for g in create("prune", {}).candidates(m)): 0.5})
    result = p.run(m, PassContext(calibration=cal))
    [refit] = result.info["refits"]
    assert set(refit) >= {"error_fit", "error_held_out", "unrefitted_fit", "unrefitted_held_out", "refit"}
    assert all(refit[k] is not None for k in ("error_held_out", "unrefitted_held_out"))
    # the refit is kept exactly where it beats the sliced weights on the held-out samples
    assert (refit["refit"] == "kept") == (refit["error_held_out"] <= refit["unrefitted_held_out"])
    detail = result.changes[0].detail
    assert detail["error_refit_held_out"] is not None and detail["error_sliced_held_out"] is not None


# ---- the real recognizer ---------------------------------------------------------------------------
def test_recognizer_group_refit_reads_lines_of_their_own_widths():
    """ppocr_rec, the group the issue pruned alone (240 -> 180 channels), calibrated on 48 lines of
    their own widths: sliced it reads no line; the refit, fitted on whole feature maps and judged on
    held-out lines, must read nearly all test lines again (before the fix it read none either)."""
    corpus = pytest.importorskip("corpus")
    import text_lines as tl

    try:
        path = corpus.path("ppocr_rec")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    original = onnx.load(str(path))
    alphabet = tl.characters(original)
    xs, _ = tl.own_widths(48, seed=0)
    cal = make_calibration(canonicalize(original, {}, infer=False), [{"x": x} for x in xs], seed=0)
    m = canonicalize(original, working_shapes(original, cal, {}))
    test, texts = tl.own_widths(40, seed=1)

    def accuracy(candidate: onnx.ModelProto) -> float:
        sess = runtime.session(candidate)
        return tl.line_accuracy([tl.decode(sess.run(None, {"x": x})[0], alphabet)[0] for x in test], texts)

    assert accuracy(m) >= 0.95
    read = {}
    for label, options in (("sliced", {"reconstruct": "false"}), ("refit", {"downstream": "false"})):
        p = replace(create("prune", options), _levels={"p2o.Conv.18": 0.25})
        read[label] = accuracy(canonicalize(p.run(clone(m), PassContext(calibration=cal)).model))
    assert read["sliced"] <= 0.2 and read["refit"] >= 0.85, read


def test_fitting_and_held_out_samples_stream_apart():
    """Held-out samples never enter the fitting folds (they come as their own shape groups)."""
    fit = Samples([{"x": np.zeros((3, 2), np.float32)}])
    held = Samples([{"x": np.ones((2, 2), np.float32)}])
    both = Samples(fit.groups + held.groups)
    assert [len(b["x"]) for b in both.batches(8)] == [3, 2]
    assert Calibration(fit, fit, "t").validation is Calibration(fit, fit, "t").train
    assert not holdout.has_held_out(Calibration(fit, fit, "t")) and holdout.has_held_out(Calibration(fit, held, "t"))


@pytest.mark.parametrize("recapture", [True, False])
def test_cluster_bias_corrections_are_judged_on_held_out_samples(recapture):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((40, 3, 8, 16)) + 1.0).astype(np.float32)  # a mean for the correction to carry
    m = canonicalize(_wide_net(), {"x": [None, 3, 8, 16]})
    cal = Calibration({"x": x[:30]}, {"x": x[30:]}, "test")
    p = create("cluster", {"bits": 2, "min_size": 16, "recapture": str(recapture)})
    result = p.run(m, PassContext(calibration=cal))
    assert result.modified and result.changes
    for change in result.changes:
        assert change.detail["error_held_out"] is not None and change.detail["unrefitted_held_out"] is not None
        assert change.detail["bias_corrected"] == (change.detail["refit"] == "kept")


def test_terminal_summary_shows_the_refit_verdict(tmp_path):
    """`optimize` prints the pass's refit verdict, held-out beside in-sample, as the JSON holds it."""
    report = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "onnxc", "optimize", str(sample_path("vgg")), "-o",
                           str(tmp_path / "v.onnx"), "-p", "prune:ratio=0.5", "--calibration", str(CALIBRATION),
                           "--report", str(report)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    verdict = json.loads(report.read_text())["passes"][0]["info"]["model_refit"]
    assert verdict["error_held_out"] < verdict["unrefitted_held_out"]
    text = proc.stdout + proc.stderr
    assert f"refit {verdict['refit']} (held-out {verdict['error_held_out']:.3g} refit / " \
           f"{verdict['unrefitted_held_out']:.3g} unrefitted; in-sample {verdict['error_fit']:.3g}" in text
