"""What a new user trips over first: text printed literally, --preprocess refused where it does not
apply, and option help that says what an option does (no findings about particular models)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from rich.console import Console
from sample_data import CALIBRATION, SAMPLE_MODELS, sample_path

from onnxc import cli
from onnxc.compiler.passes import available

MLP = sample_path("mlp")
VGG = sample_path("vgg")
# A node name as YOLO-style exports carry them, with a bracket rich would read as a markup tag.
BRACKETED = "/model.22/cv2.0/m[cv2]/Gemm"


def run(*args, env=None, prelude: str = "") -> subprocess.CompletedProcess:
    """`python -m onnxc ARGS`, optionally after `prelude` (Python run before the CLI starts)."""
    code = f"import sys\n{prelude}\nfrom onnxc.cli import main\nmain(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def one_line(proc: subprocess.CompletedProcess, code: int) -> str:
    """The whole of stderr: exactly one line (no blank line before it, no traceback)."""
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---- 1. brackets are printed as they are ----------------------------------------------------
def test_extra_name_survives_in_the_plot_error(tmp_path):
    out, plot = tmp_path / "o.onnx", tmp_path / "p.png"
    proc = run("optimize", VGG, "-o", out, "--target", "macs=0.5", "--plot", plot,
               prelude="sys.modules['matplotlib'] = None  # as if the plot extra were not installed")
    assert one_line(proc, 2) == "error: --plot needs matplotlib: pip install 'onnxc[plot]'"
    assert not out.exists() and not plot.exists()


def test_node_names_with_brackets_in_tables(tmp_path):
    model = onnx.load(MLP)
    node = next(n for n in model.graph.node if n.op_type in ("Gemm", "MatMul"))
    node.name = BRACKETED
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    proc = run("inspect", path, env={"COLUMNS": "300"})
    assert proc.returncode == 0, proc.stderr
    assert BRACKETED in proc.stdout


def test_user_paths_with_brackets(tmp_path):
    missing = tmp_path / "[red]missing.onnx"
    assert one_line(run("inspect", missing), 1) == f"error: {missing}: no such file"
    folder = tmp_path / "run[bold]"
    folder.mkdir()
    out = folder / "m.onnx"
    proc = run("optimize", MLP, "-o", out, "--preset", "lossless")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[-1] == f"wrote {out}"


def test_pass_option_types_keep_their_brackets():
    proc = run("passes")
    assert proc.returncode == 0, proc.stderr
    assert "    exclude (list[str], default [])" in proc.stdout  # `[str]` once read as a markup tag


def test_progress_labels_are_literal(monkeypatch):
    buf = io.StringIO()
    terminal = Console(file=buf, force_terminal=True, force_interactive=True, markup=False, width=200,
                       color_system=None)
    monkeypatch.setattr(cli, "stderr", terminal)
    label = f"prune: {BRACKETED}"
    with cli._ProgressReporter(True) as progress:
        progress(label, 1, 2)
        progress.progress.refresh()
    assert f"{label} " in buf.getvalue()


# ---- 2. --preprocess: known keys, and only with images --------------------------------------
def _command(name: str, tmp_path, *extra) -> list:
    return {
        "optimize": ["optimize", MLP, "-o", tmp_path / "o.onnx", "--preset", "lossless"],
        "export": ["export", MLP, "--backend", "onnxruntime", "-o", tmp_path / "o.onnx"],
        "compare": ["compare", MLP, MLP],
        "bench": ["bench", MLP, "--runs", "1", "--warmup", "0"],
    }[name] + list(extra)


@pytest.mark.parametrize("name", ["optimize", "export", "compare", "bench"])
def test_unknown_preprocess_key_lists_the_valid_ones(name, tmp_path):
    line = one_line(run(*_command(name, tmp_path, "--calibration", CALIBRATION, "--preprocess", "garbage=1")), 2)
    assert "'garbage=1'" in line and all(k in line for k in ("size", "letterbox", "scale", "layout", "rgb"))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["optimize", "export", "compare", "bench"])
def test_preprocess_without_images_is_a_usage_error(name, tmp_path):
    line = one_line(run(*_command(name, tmp_path, "--calibration", CALIBRATION, "--preprocess", "size=16x16")), 2)
    assert line == ("error: --preprocess applies only to image calibration (a folder of images); "
                    f"{CALIBRATION} is a .npz file")
    line = one_line(run(*_command(name, tmp_path, "--preprocess", "size=16x16")), 2)
    assert line.endswith("there is no --calibration (inputs are drawn at random)")
    assert not list(tmp_path.iterdir())


def test_preprocess_with_a_folder_of_arrays(tmp_path):
    folder = tmp_path / "arrays"
    folder.mkdir()
    with np.load(CALIBRATION) as data:
        np.save(folder / "a.npy", data["input"][:4])
    out = tmp_path / "o.onnx"
    line = one_line(run("optimize", MLP, "-o", out, "--preset", "lossless", "--calibration", folder,
                        "--preprocess", "scale=1"), 2)
    assert line.endswith(f"{folder} holds npy files")
    assert not out.exists()


def test_preprocess_still_reads_image_folders(tmp_path):
    from PIL import Image

    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(4):
        Image.new("L", (16, 16), 40 * i).save(folder / f"d{i}.png")
    proc = run("compare", MLP, MLP, "--calibration", folder, "--preprocess", "scale=1/255,gray", "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"samples": 4' in proc.stdout


# ---- 3. option help says what an option does ------------------------------------------------
MODEL_NAMES = ["magika", "rapid", "ppocr", "orientation", "layout", "digits", "crnn", "yolo", "resnet",
               *SAMPLE_MODELS]
# Findings rather than descriptions: a measured percentage, a speed-up or accuracy figure
# ("1.25x the time", "0.74x faster"), or a note that something is not understood.
FINDINGS = [r"\d\s*%", r"\d(\.\d+)?x (faster|slower|the|time|latency|speed|MACs)", r"not understood",
            r"\bmeasured\b", r"\bread \d"]


def findings(text: str) -> list[str]:
    """The model names and measurement patterns in `text` (empty when it only describes)."""
    names = [n for n in MODEL_NAMES if re.search(rf"(?<![a-z]){re.escape(n)}(?![a-z])", text, re.IGNORECASE)]
    return names + [p for p in FINDINGS if re.search(p, text, re.IGNORECASE)]


def test_the_checker_catches_a_model_finding():
    old = ("with bias_correction, correct layer by layer (slower; off: on ppocr_rec at 4 bits it read 0% of "
           "lines where the one-shot correction reads 59%, not understood yet)")
    assert "ppocr" in findings(old) and r"\d\s*%" in findings(old) and "not understood" in findings(old)
    assert findings("round ranks to a multiple of this (8: blocked conv/GEMM kernels run them faster)") == []


def test_pass_help_cites_no_model_or_measurement():
    passes = available()
    assert {"prune", "svd", "tucker", "cp", "cluster", "circulant"} <= set(passes)
    for pid, cls in passes.items():
        assert not findings(cls.summary), (pid, cls.summary)
        for option, text in cls.option_help.items():
            assert not findings(text), (pid, option, text)
