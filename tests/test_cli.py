"""The command-line contract: exit codes, one-line errors, no partial output, data on stdout."""

from __future__ import annotations

import json
import subprocess
import sys

import graphs
import numpy as np
import onnx
import pytest
from sample_data import SAMPLES

VGG = str(SAMPLES / "vgg.onnx")
CALIB = str(SAMPLES / "digits_calib.npz")


def onnxc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxc", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def assert_one_line_error(proc, codes=(1, 2)):
    assert proc.returncode in codes, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture
def bad_files(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    text = tmp_path / "text.onnx"
    text.write_text("this is not a model\n" * 20)
    truncated = tmp_path / "truncated.onnx"
    data = open(VGG, "rb").read()
    truncated.write_bytes(data[: len(data) // 3])
    return {"missing": tmp_path / "missing.onnx", "empty": empty, "text": text, "truncated": truncated}


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "truncated"])
def test_bad_model_files(kind, bad_files, tmp_path):
    out = tmp_path / "out.onnx"
    proc = onnxc("optimize", bad_files[kind], "-o", out, "--preset", "lossless")
    line = assert_one_line_error(proc, (1,))
    assert str(bad_files[kind].name) in line
    assert not out.exists()
    assert not list(tmp_path.glob(".out.onnx*"))  # no temp leftovers either


@pytest.mark.parametrize("kind", ["missing", "truncated"])
def test_bad_model_files_other_commands(kind, bad_files, tmp_path):
    assert_one_line_error(onnxc("inspect", bad_files[kind]), (1,))
    assert_one_line_error(onnxc("compare", VGG, bad_files[kind]), (1,))
    out = tmp_path / "c"
    assert_one_line_error(onnxc("export", bad_files[kind], "--backend", "c", "-o", out), (1,))
    assert not out.exists()


def _npz(tmp_path, **arrays):
    path = tmp_path / "cal.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case,needle", [
    ("wrong_key", "missing input"),
    ("extra_key", "unexpected"),
    ("wrong_shape", "shape"),
    ("wrong_rank", "rank"),
    ("wrong_dtype", "dtype"),
    ("not_npz", "not a readable"),
])
def test_bad_calibration(case, needle, tmp_path):
    x = np.zeros((4, 1, 16, 16), np.float32)
    path = {
        "wrong_key": lambda: _npz(tmp_path, images=x),
        "extra_key": lambda: _npz(tmp_path, input=x, label=np.zeros(4)),
        "wrong_shape": lambda: _npz(tmp_path, input=np.zeros((4, 1, 8, 8), np.float32)),
        "wrong_rank": lambda: _npz(tmp_path, input=np.zeros((4, 256), np.float32)),
        "wrong_dtype": lambda: _npz(tmp_path, input=np.zeros((4, 1, 16, 16), np.int64)),
        "not_npz": lambda: (tmp_path / "x.npz").write_text("nope") and tmp_path / "x.npz",
    }[case]()
    out = tmp_path / "out.onnx"
    proc = onnxc("optimize", VGG, "-o", out, "--calibration", path, "--preset", "lossless")
    line = assert_one_line_error(proc, (1,))
    assert needle in line
    assert not out.exists()


@pytest.mark.parametrize("spec,needle", [
    ("nosuchpass", "unknown pass 'nosuchpass'"),
    ("cluster:nosuchoption=1", "no option 'nosuchoption'"),
    ("cluster:bits=abc", "expects int"),
    ("cluster:bits", "expected key=value"),
])
def test_bad_pass_specs(spec, needle, tmp_path):
    out = tmp_path / "out.onnx"
    proc = onnxc("optimize", VGG, "-o", out, "-p", spec)
    line = assert_one_line_error(proc, (2,))
    assert needle in line
    assert not out.exists()


def test_usage_errors(tmp_path):
    assert onnxc("optimize", VGG).returncode == 2  # missing -o
    assert_one_line_error(onnxc("optimize", VGG, "-o", tmp_path / "o.onnx", "--preset", "nope"), (2,))
    assert_one_line_error(onnxc("optimize", VGG, "-o", tmp_path / "o.onnx", "--input-shape", "input=1xAx3"), (2,))
    line = assert_one_line_error(onnxc("optimize", VGG, "-o", tmp_path / "o.onnx", "--input-shape", "nope=1x1x16x16"),
                                 (1,))
    assert "no input 'nope'" in line
    assert_one_line_error(onnxc("optimize", VGG, "-o", VGG), (2,))


def test_bad_recipe(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[[pass]]\nname = 'nosuch'\n")
    out = tmp_path / "o.onnx"
    assert "unknown pass" in assert_one_line_error(onnxc("optimize", VGG, "-o", out, "--recipe", recipe))
    recipe.write_text("this is = = not toml")
    assert "TOML" in assert_one_line_error(onnxc("optimize", VGG, "-o", tmp_path / "o.onnx", "--recipe", recipe))


def test_optimize_report_and_json(tmp_path):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    proc = onnxc("optimize", VGG, "-o", out, "--preset", "lossless", "--calibration", CALIB, "--report", report,
                 "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data == json.loads(report.read_text())
    assert data["fidelity"]["rel_l2"] <= 1e-5 and data["fidelity"]["top1"] == 1.0
    assert data["before"]["macs"] == data["after"]["macs"] > 0
    assert data["calibration"] == CALIB and data["file_bytes"]["after"] == out.stat().st_size
    assert proc.stderr == ""


def test_random_calibration_is_reported(tmp_path):
    proc = onnxc("optimize", VGG, "-o", tmp_path / "o.onnx", "--preset", "lossless", "--json", "-q")
    data = json.loads(proc.stdout)
    assert data["calibration"] == "random" and any("random" in n for n in data["notes"])


def test_verification_failure_exit_code(tmp_path):
    other = tmp_path / "other.onnx"
    m = onnx.load(VGG)
    w = next(t for t in m.graph.initializer if t.name.endswith("weight"))
    arr = onnx.numpy_helper.to_array(w) * 3
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(m, str(other))
    proc = onnxc("compare", VGG, other, "--calibration", CALIB, "--max-error", "0.01")
    assert proc.returncode == 3
    assert "rel" in proc.stdout or "output" in proc.stdout
    assert onnxc("compare", VGG, VGG, "--calibration", CALIB, "--max-error", "0").returncode == 0


def test_python_dash_m_and_passes_listing():
    proc = onnxc("passes", "--json")
    assert proc.returncode == 0
    ids = {row["id"] for row in json.loads(proc.stdout)}
    assert isinstance(ids, set)
    assert onnxc("--help").returncode == 0


def test_inspect_json_and_table(tmp_path):
    proc = onnxc("inspect", VGG, "--json")
    data = json.loads(proc.stdout)
    assert data["totals"]["macs"] > 0
    table = onnxc("inspect", VGG)
    assert f"{data['totals']['macs']:,}" in table.stdout


def test_bench_runs_side_by_side(tmp_path):
    m = tmp_path / "paddle.onnx"
    onnx.save(graphs.constant_node_cnn(), str(m))
    proc = onnxc("bench", m, m, "--runs", "3", "--warmup", "1", "--input-shape", "x=1x3x8x8", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 2 and rows[0]["ratio"] == 1.0


def test_inspect_lists_prunable_groups_across_residuals():
    data = json.loads(onnxc("inspect", SAMPLES / "resnet.onnx", "--json").stdout)
    groups = data["prunable_groups"]
    assert any(not g["frozen"] for g in groups)
    residual = [g for g in groups if len(g["producers"]) >= 2 and not g["frozen"]]
    assert residual, "the identity-shortcut blocks share one channel set across their Add"
    assert any("graph input" in reason for g in groups for reason in g["frozen"])


def test_default_budget_without_max_error(tmp_path):
    """A plain -p run that destroys the model: the pass is rolled back under the stated default
    budget (exit 0, the report says why); --max-error inf keeps it."""
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    destroy = "prune:ratio=0.9,round_to=1"  # every channel count exact: the automatic block keeps 8 of 32
    proc = onnxc("optimize", VGG, "-o", out, "-p", destroy, "--calibration", CALIB, "--report", report)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert (data["max_error"], data["budget_source"]) == (0.25, "default")
    [record] = data["passes"]
    assert record["status"] == "rolled back" and "exceeds the budget 0.25" in record["reason"]
    assert data["fidelity"]["rel_l2"] <= 0.25
    assert "budget 0.25 (default; set --max-error to change)" in " ".join(proc.stderr.split())
    kept = onnxc("optimize", VGG, "-o", out, "-p", destroy, "--calibration", CALIB, "--max-error", "inf",
                 "--json", "-q")
    assert kept.returncode == 0, kept.stderr
    data = json.loads(kept.stdout)
    assert data["passes"][0]["status"] == "applied" and data["budget_source"] == "none"
    assert data["fidelity"]["rel_l2"] > 0.25
