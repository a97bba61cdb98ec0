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


# ---- allocation on the digits samples ------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_macs_half_keeps_top1(name, cache):
    result = optimize(sample_path(name), calibration=CALIBRATION, target="macs=0.5", cache_dir=cache)
    alloc = result.report.allocation
    assert alloc["met"] and result.report.after["macs"] <= 0.51 * result.report.before["macs"]
    assert accuracy(result.model) >= accuracy(sample_path(name)) - 0.5
    assert result.report.fidelity["error"] <= alloc["budget"]


def test_metric_changes_what_is_chosen(cache):
    common = dict(calibration=CALIBRATION, target="macs=0.4", passes=["svd", "prune"], cache_dir=cache)
    default = optimize(sample_path("mlp"), **common).report.allocation
    custom = optimize(sample_path("mlp"), metric=top1_disagreement, **common).report.allocation
    assert custom["chosen"] != default["chosen"]
    rows = custom["sensitivity"]["measurements"]
    assert all(r["error"] in {k / 64 for k in range(65)} for r in rows)  # top-1 changes on 64 held-out samples


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
    budget = 0.05
    result = optimize(sample_path("mlp"), calibration=CALIBRATION, passes=["svd"], target="macs=0.2",
                      max_error=budget, cache_dir=cache)
    alloc = result.report.allocation
    assert any("back off" in r["action"] for r in alloc["rounds"])
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
