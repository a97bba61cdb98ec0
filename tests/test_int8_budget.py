"""int8 keeps the budget promise (per-channel fidelity or the user's metric, back-off per region,
optimize's int8 stage held to the optimize budget), and loses less where it can: affine folding
and cross-layer equalization are lossless in float and lower the int8 error of a model whose
channel ranges are badly balanced."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import f32, init, model
from onnx import helper
from test_ort_backend import outlier_mlp

from onnxc import api
from onnxc.backends import ExportOptions
from onnxc.backends import export as backend_export
from onnxc.backends.ort_quant import quantize
from onnxc.backends.quant_equalize import equalize
from onnxc.compiler import runtime
from onnxc.compiler.calibration import make_calibration
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.verify import compare_outputs


def flip_rate(reference_outputs: list, candidate_outputs: list) -> float:
    """A discrete metric: the fraction of samples whose top class changed."""
    return float(np.mean(reference_outputs[0].argmax(-1) != candidate_outputs[0].argmax(-1)))


def _mlp_data(count: int = 256) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(3).standard_normal((count, 16)).astype(np.float32)}


def test_int8_backs_off_to_the_metric_budget_and_lists_the_float_nodes(tmp_path):
    m = canonicalize(outlier_mlp())
    cal = make_calibration(m, _mlp_data(), seed=0)
    plain = backend_export("onnxruntime", m, tmp_path / "plain.onnx",
                           ExportOptions(int8="static", calibration=cal, metric=flip_rate))
    assert plain["fidelity"]["metric"] > 0.1, "int8 destroys this model: the test needs that"
    budget = 0.01  # under the metric's resolution on 64 held-out samples (1/64)
    report = backend_export("onnxruntime", m, tmp_path / "kept.onnx",
                            ExportOptions(int8="static", calibration=cal, metric=flip_rate, max_error=budget))
    spent = report["int8_budget"]
    assert spent["metric_used"] and spent["max_error"] == budget
    assert spent["metric_resolution"] == pytest.approx(1 / cal.validation.count)
    assert any("below the metric's resolution" in n for n in report["notes"])
    assert spent["error_all_int8"] > budget >= spent["error_after"]
    assert report["fidelity"]["metric"] <= budget
    assert "mm2" in report["excluded_nodes"] and "mm3" not in report["excluded_nodes"]
    assert set(report["sensitivity"]) <= {"mm1", "mm2", "mm3"} and report["sensitivity"]
    written = onnx.load(str(tmp_path / "kept.onnx"))
    assert any(n.op_type == "DequantizeLinear" for n in written.graph.node), "the harmless layer stays int8"
    got = runtime.run(written, cal.validation)
    assert flip_rate([runtime.run(m, cal.validation)["y"]], [got["y"]]) <= budget


def test_optimize_holds_its_int8_stage_to_the_budget(tmp_path):
    """The optimize budget is the int8 stage's: before, an int8 stage that left it was written with exit 0."""
    source, data = tmp_path / "mlp.onnx", tmp_path / "data.npz"
    onnx.save(outlier_mlp(), source)
    np.savez(data, **_mlp_data())
    budget = 0.05
    out = tmp_path / "small.onnx"
    result = api.optimize(source, passes=["cluster:bits=8"], calibration=data, max_error=budget, output=out,
                          backend="onnxruntime", export_options=ExportOptions(int8="static"),
                          metric=f"{__name__}:flip_rate")
    spent = result.report.backend["int8_budget"]
    assert spent["max_error"] == budget and spent["metric_used"]
    assert spent["error_all_int8"] > budget >= spent["error_after"]
    assert result.report.backend["excluded_nodes"]
    assert result.report.backend["fidelity"]["metric"] <= budget
    original = canonicalize(outlier_mlp())
    cal = make_calibration(original, str(data), seed=0)  # the same held-out samples as optimize's
    ref, got = runtime.run(original, cal.validation), runtime.run(onnx.load(str(out)), cal.validation)
    assert flip_rate([ref["y"]], [got["y"]]) <= budget


def unbalanced_convs(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Mul (per channel) -> Relu -> Conv whose eight channels between the convs span four
    orders of magnitude (the second conv compensates), so a per-tensor int8 range set by the
    largest channel leaves the small ones a step or two."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) / 4
    b1 = rng.uniform(0.0, 0.2, 8).astype(np.float32)
    spread = np.logspace(-2, 2, 8).astype(np.float32)
    w2 = rng.standard_normal((6, 8, 3, 3)).astype(np.float32) / 8 / spread[None, :, None, None]
    scale = (spread * 2).reshape(1, 8, 1, 1).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c1", "s"], ["m1"], name="affine"),
             helper.make_node("Relu", ["m1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    return model(nodes, [f32("x", ["N", 3, 12, 12])], [f32("y", ["N", 6, 12, 12])],
                 [init("w1", w1 / 2), init("b1", b1 / 2), init("s", scale), init("w2", w2)])


def test_equalization_is_lossless_and_lowers_int8_error():
    m = canonicalize(unbalanced_convs())
    assert "Mul" not in {n.op_type for n in m.graph.node}, "the canonical form folds the affine op already"
    inputs = {"x": np.random.default_rng(1).standard_normal((16, 3, 12, 12)).astype(np.float32)}
    eq = equalize(unbalanced_convs())  # a model that reaches the export without canonicalization
    assert eq.folded == ["Mul affine folded into conv1"] and eq.pairs == [("conv1", "conv2")]
    assert "Mul" not in {n.op_type for n in eq.model.graph.node}
    ref, got = runtime.run(m, inputs), runtime.run(eq.model, inputs)
    assert compare_outputs(ref, got).rel_l2 < 1e-5
    weight = eq.model.graph.node[0].input[1]
    w1 = onnx.numpy_helper.to_array(next(t for t in eq.model.graph.initializer if t.name == weight))
    rows = np.abs(w1).reshape(8, -1).max(axis=1)
    assert rows.max() / rows.min() < 20, "channel ranges equalized (they spanned 1e4)"

    cal = make_calibration(m, {"x": np.random.default_rng(2).standard_normal((96, 3, 12, 12)).astype(np.float32)},
                           seed=0)
    plain = quantize(m, "static", cal, equalize=False, choose_ranges=False, reduce_range=False)
    better = quantize(m, "static", cal, equalize=True, choose_ranges=False, reduce_range=False)
    assert plain.rel_l2 > 0.05, "the unbalanced model loses to int8: the test needs that"
    assert better.improvements["equalization"]["kept"]
    assert better.improvements["equalization"]["float_rel_l2"] < 1e-5
    assert better.rel_l2 < 0.5 * plain.rel_l2, (plain.rel_l2, better.rel_l2)


def test_range_candidates_are_judged_on_held_out_values():
    """A long-tailed tensor: min/max spends its 255 steps on two outliers, the chosen range clips
    them and quantizes held-out values with a far smaller error (as the histogram predicts it,
    within its bins' resolution); on evenly spread values the choice costs nothing."""
    from onnxc.backends.quant_ranges import _Histogram, candidates

    rng = np.random.default_rng(0)

    def actual(values: np.ndarray, lo: float, hi: float) -> float:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        step = (hi - lo) / 255
        return float(np.mean((values - (np.clip(np.round((values - lo) / step), 0, 255) * step + lo)) ** 2))

    tailed = (np.concatenate([rng.standard_normal(200_000), [80.0, -60.0]]), rng.standard_normal(50_000))
    even = (rng.uniform(-1, 1, 200_000), rng.uniform(-1, 1, 50_000))
    for (values, check), gain in ((tailed, 50.0), (even, 0.99)):
        fit, test = (_Histogram(float(values.min()), float(values.max())) for _ in range(2))
        fit.add(values)
        test.add(check)
        options = candidates(fit)
        expected = {k: float(test.error(np.array([lo]), np.array([hi]))[0]) for k, (lo, hi) in options.items()}
        best = min(expected, key=lambda k: (expected[k], k != "minmax"))
        chosen, minmax = actual(check, *options[best]), actual(check, *options["minmax"])
        assert chosen * gain <= minmax, (best, chosen, minmax)
        assert expected[best] == pytest.approx(chosen, rel=0.5)


def test_bias_correction_cancels_the_mean_shift_of_rounded_weights():
    """A depthwise conv with one large tap per filter (a coarse per-channel step for the others)
    on inputs far from zero: rounding the weights shifts each output channel's mean by
    (W_q - W) E[x]; the corrected biases cancel it, and the int8 error falls."""
    rng = np.random.default_rng(0)
    c = 16
    w = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
    w[:, 0, 0, 0] *= 30
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="dw", group=c)]
    m = canonicalize(model(nodes, [f32("x", ["N", c, 10, 10])], [f32("y", ["N", c, 8, 8])],
                           [init("w", w), init("b", np.zeros(c, np.float32))]))
    cal = make_calibration(m, {"x": (rng.standard_normal((128, c, 10, 10)) * 0.3 + 4).astype(np.float32)}, seed=0)
    options = {"equalize": False, "choose_ranges": False, "reduce_range": False}
    plain = quantize(m, "static", cal, correct_bias=False, **options)
    corrected = quantize(m, "static", cal, correct_bias=True, **options)
    assert corrected.improvements["bias_correction"] == {**corrected.improvements["bias_correction"],
                                                         "layers": 1, "kept": True}
    ref = runtime.run(m, cal.validation)["y"]

    def mean_shift(q) -> float:
        return float(np.abs((runtime.run(q.model, cal.validation)["y"] - ref).mean(axis=(0, 2, 3))).mean())

    assert mean_shift(corrected) < 0.1 * mean_shift(plain), (mean_shift(plain), mean_shift(corrected))
    assert corrected.rel_l2 < plain.rel_l2


def test_export_cli_takes_the_metric_and_reports_what_int8_spent(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    source, data, out = tmp_path / "mlp.onnx", tmp_path / "data.npz", tmp_path / "int8.onnx"
    onnx.save(outlier_mlp(), source)
    np.savez(data, **_mlp_data())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "onnxc", "export", str(source), "--backend", "onnxruntime",
                               "-o", str(out), "--int8", "--calibration", str(data), *extra],
                              capture_output=True, text=True, env=env, timeout=600)

    done = run("--max-error", "0.01", "--metric", "test_int8_budget:flip_rate", "--report", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr
    assert "the metric, on 64 held-out samples" in done.stderr and "below the metric's resolution" in done.stderr
    assert "left float to stay within budget 0.01: mm2" in done.stderr
    report = __import__("json").loads((tmp_path / "r.json").read_text())
    assert report["int8_budget"]["error_after"] <= 0.01 < report["int8_budget"]["error_all_int8"]
    out.unlink()
    bad = run("--max-error", "0.01", "--metric", "test_int8_budget:no_such_metric")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_derived_model_is_prepared_with_the_choices_measured_first(tmp_path):
    """`prepare(like=...)` takes the measured choices of an earlier preparation (each plan the
    allocator verifies derives from one model) instead of measuring them against their
    alternatives again: what it was told to skip is not tried, what it was told to use is."""
    from dataclasses import replace

    from onnxc.backends.ort_quant import _quiet, _working_directory, prepare
    from onnxc.backends.quant_budget import Scorer

    m = canonicalize(unbalanced_convs())
    cal = make_calibration(m, {"x": np.random.default_rng(2).standard_normal((96, 3, 12, 12)).astype(np.float32)},
                           seed=0)

    def prepared(folder: str, like=None):
        work = tmp_path / folder
        work.mkdir()
        with _quiet(), _working_directory(str(work)):
            return prepare(m, "static", cal, work, Scorer(m, cal.validation), correct_bias=False, like=like)

    first = prepared("first")
    assert first.improvements["equalization"]["kept"] and "variants" in first.improvements["ranges"]
    again = prepared("again", first)
    assert again.improvements["equalization"]["kept"]
    assert "plain" not in again.improvements  # no baseline measured for a choice already made
    kept = first.improvements["ranges"]["kept"]
    if kept:  # the kinds kept are the only ones tried
        assert [v["allowed"] for v in again.improvements["ranges"]["variants"]] == [list(kept)]
    else:
        assert "ranges" not in again.improvements
    assert again.reduce_range == first.reduce_range
    refused = replace(first, improvements={"equalization": {"kept": False}, "ranges": {"kept": None}},
                      reduce_range=True)
    plain = prepared("plain", refused)
    assert "equalization" not in plain.improvements and "ranges" not in plain.improvements
    assert plain.reduce_range
