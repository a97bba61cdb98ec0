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


def test_a_target_run_reports_its_verified_rounds(tmp_path):
    """After the sweep, the allocator verifies whole plans (each a pass run and a held-out run):
    a phase counts them against the most it will run, and ends when the search does."""
    from onnxc.compiler import allocation

    calls: list[tuple[str, int, int]] = []
    result = optimize(sample_path("mlp"), target="macs=0.5", passes=["prune"], calibration=CALIBRATION,
                      cache_dir=tmp_path, progress=lambda label, done, total: calls.append((label, done, total)))
    rounds = [(d, t) for label, d, t in calls if label == "allocation: rounds"]
    assert {t for _, t in rounds} == {allocation.MAX_ROUNDS}
    assert [d for d, _ in rounds] == sorted(d for d, _ in rounds) and rounds[-1][0] == allocation.MAX_ROUNDS
    searched = [r for r in result.report.allocation["rounds"] if not r["action"].startswith("trimmed")]
    assert len(rounds) == len(searched) + 1  # one count as each round starts, one as the search ends


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
    assert labels == {"int8: calibration", "int8: ranges", "compile", "verification"}, labels
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


def test_redirected_target_run_writes_progress_lines_to_its_log(tmp_path):
    """stderr to a file, as in CI logs: one plain line per phase, then timed lines with counts and
    an ETA (the interval shortened so that a short run shows them). test_quiet_prints_nothing
    runs with stderr on a pipe: -q silences them."""
    import os
    import re

    env = {**os.environ, "ONNXC_CACHE": str(tmp_path / "cache"), "ONNXC_PROGRESS_INTERVAL": "0.2"}
    args = [sys.executable, "-m", "onnxc", "optimize", str(sample_path("mlp")), "-o", str(tmp_path / "m.onnx"),
            "--target", "macs=0.5", "-p", "prune", "--calibration", str(CALIBRATION)]
    log = tmp_path / "build.log"
    with open(log, "w") as fh:
        run = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=fh, env=env)
    assert run.returncode == 0, log.read_text()
    lines = [line for line in log.read_text().splitlines() if re.match(r"^\[ *\d+[smh\d]*\] ", line)]
    starts = {m.group(1) for line in lines if (m := re.match(r"^\[.*?\] (.+?): \d+/\d+", line))}  # phases seen
    assert "sensitivity" in starts and any(s.startswith("prune: ") for s in starts), lines
    timed = [line for line in lines if re.search(r": \d+/\d+ \(\d+%\), \d+s elapsed, eta (\d+s|unknown)$", line)]
    assert timed, lines
    assert "\x1b[" not in log.read_text()  # no terminal control codes in a log


def test_plain_progress_lines_and_eta():
    import io

    from onnxc.progress import PlainProgress

    now = [0.0]
    out = io.StringIO()
    plain = PlainProgress(out, interval=30, clock=lambda: now[0])
    plain("fits", 0, 10)
    now[0] = 20.0
    plain("fits", 4, 10)
    plain("fits", 4, 10)  # no new line for progress inside a phase
    plain.report()
    now[0] = 25.0
    plain("fits", 0, 10)  # run again within the interval: no second start line
    plain("verification", 0, 8)
    plain("verification", 8, 8)
    plain.report()  # finished phases are quiet
    assert out.getvalue().splitlines() == [
        "[   20s] fits: 4/10",  # announced once it has run a while
        "[   20s] fits: 4/10 (40%), 20s elapsed, eta 30s",
        "[   25s] fits: 0/10 (0%), 0s elapsed, eta unknown",  # verification ran in no time: never announced
    ]
