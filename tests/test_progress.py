"""Progress reports: one bar per phase, with real counts that end at their totals."""

from __future__ import annotations

import subprocess
import sys

from sample_data import CALIBRATION, sample_path

from onnxc.api import optimize
from onnxc.compiler import runtime
from onnxc.compiler.calibration import make_calibration
from onnxc.compiler.model import load


def test_every_long_phase_reports_real_counts():
    calls: list[tuple[str, int, int]] = []
    result = optimize(sample_path("mlp"), passes=["prune:ratio=0.3", "svd"], calibration=CALIBRATION,
                      progress=lambda label, done, total: calls.append((label, done, total)))
    assert result.report.passes[0].status == "applied"
    labels = {label for label, _, _ in calls}
    assert {"passes", "prune: capture", "prune: selection", "prune: fits", "verification"} <= labels, labels
    for label in labels:
        seen = [(d, t) for lab, d, t in calls if lab == label]
        assert all(0 <= d <= t for d, t in seen), (label, seen)
        assert seen[-1][0] == seen[-1][1], (label, seen[-1])  # every phase finishes
    cal = make_calibration(load(sample_path("mlp")), CALIBRATION)
    verification = {t for lab, _, t in calls if lab == "verification"}
    assert verification == {runtime.sample_count(cal.validation)}  # counted in samples, not in calls
    capture = [t for lab, _, t in calls if lab == "prune: capture"]
    streamed = runtime.sample_count(cal.train) + runtime.sample_count(cal.validation)  # the refit judges on both
    assert capture[-1] % streamed == 0
    groups = [t for lab, _, t in calls if lab == "prune: selection"]
    assert groups[-1] == len(result.report.passes[0].changes) + sum(
        1 for s in result.report.passes[0].skipped if "nothing to remove" in s.reason)


def test_quiet_prints_nothing(tmp_path):
    out = tmp_path / "m.onnx"
    run = subprocess.run([sys.executable, "-m", "onnxc", "optimize", str(sample_path("mlp")), "-o", str(out),
                          "-p", "prune:ratio=0.3", "--calibration", str(CALIBRATION), "-q"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "" and run.stdout == ""


def test_export_reports_its_phases(tmp_path):
    from onnxc.api import export

    calls: list[tuple[str, int, int]] = []

    def record(label: str, done: int, total: int) -> None:
        calls.append((label, done, total))

    export(sample_path("mlp"), "onnxruntime", tmp_path / "q.onnx", int8="static", calibration=CALIBRATION,
           progress=record)
    cal = make_calibration(load(sample_path("mlp")), CALIBRATION)
    labels = {label for label, _, _ in calls}
    assert labels == {"int8: calibration", "compile", "verification"}, labels
    for label in labels:
        seen = [(d, t) for lab, d, t in calls if lab == label]
        assert all(0 <= d <= t for d, t in seen) and seen[-1][0] == seen[-1][1], (label, seen)
    assert {t for lab, _, t in calls if lab == "int8: calibration"} == {runtime.sample_count(cal.train)}
    assert {t for lab, _, t in calls if lab == "verification"} == {2 * runtime.sample_count(cal.validation)}
    calls.clear()
    export(sample_path("mlp"), "c", tmp_path / "c", progress=record)
    assert calls == [("compile", 0, 2), ("compile", 1, 2), ("compile", 2, 2)]


def test_export_quiet_prints_nothing(tmp_path):
    run = subprocess.run([sys.executable, "-m", "onnxc", "export", str(sample_path("mlp")), "--backend", "onnxruntime",
                          "-o", str(tmp_path / "m.onnx"), "--calibration", str(CALIBRATION), "-q"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "" and run.stdout == ""
