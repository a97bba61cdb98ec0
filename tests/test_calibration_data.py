"""Calibration data as users have it (npy, folders, images, feed dicts, variable shapes) and the
interface contract (the written model is a drop-in replacement on every path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import graphs
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from sample_data import SAMPLES

import onnxc
from onnxc.compiler import calibration as calib
from onnxc.compiler import calibration_data, preprocess
from onnxc.compiler.interface import interface_differences
from onnxc.compiler.samples import Samples
from onnxc.errors import OnnxcError, UsageError

MODELS = Path(__file__).resolve().parent / "models"
CRNN = MODELS / "crnn.onnx"
RESNET_DYN = MODELS / "resnet_dyn.onnx"
MLP = SAMPLES / "mlp.onnx"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxc", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def line_folder(tmp_path: Path, widths=(96, 128, 160), count=18, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    folder = tmp_path / "lines"
    folder.mkdir()
    for i in range(count):
        w = widths[i % len(widths)]
        # half the files carry the batch axis, half do not: both are one sample
        x = rng.standard_normal((1, 32, w)).astype(np.float32)
        np.save(folder / f"line{i:02d}.npy", x[None] if i % 2 else x)
    return folder


# ---- Samples ---------------------------------------------------------------------------------
def test_samples_group_by_shape_and_keep_order():
    feeds = [{"x": np.full((1, 2, w), i, np.float32)} for i, w in enumerate([3, 5, 3, 5, 3])]
    s = Samples.from_feeds(feeds)
    assert s.count == 5 and len(s.groups) == 2 and not s.is_uniform
    assert [g["x"].shape for g in s.groups] == [(3, 2, 3), (2, 2, 5)]
    assert s.groups[0]["x"][:, 0, 0].tolist() == [0, 2, 4]
    with pytest.raises(OnnxcError, match="2 different shapes"):
        s["x"]
    batches = list(s.batches(2))
    assert [b["x"].shape[0] for b in batches] == [2, 1, 2]
    sub = s.subset([1, 3, 4])  # global order: group 0 holds values 0, 2, 4, then group 1 holds 1, 3
    assert sub.count == 3 and sub.groups[0]["x"][:, 0, 0].tolist() == [2]
    assert sub.groups[1]["x"][:, 0, 0].tolist() == [1, 3]


def test_uniform_samples_are_a_mapping_of_stacked_arrays():
    s = Samples.from_feeds({"x": np.ones((1, 4), np.float32) * i} for i in range(6))
    assert s.is_uniform and s["x"].shape == (6, 4) and list(s) == ["x"]


# ---- files and folders -----------------------------------------------------------------------
def test_single_npy_for_single_input_model(tmp_path):
    x = np.random.default_rng(0).standard_normal((20, 1, 16, 16))  # float64, as numpy saves by default
    np.save(tmp_path / "x.npy", x)
    cal = calib.make_calibration(onnx.load(MLP), tmp_path / "x.npy")
    assert cal.train.count + cal.validation.count == 20
    assert cal.train["input"].dtype == np.float32


def test_npy_refused_for_multi_input_model(tmp_path):
    m = graphs.model([onnx.helper.make_node("Add", ["a", "b"], ["y"])],
                     [graphs.f32("a", ["N", 4]), graphs.f32("b", ["N", 4])], [graphs.f32("y", ["N", 4])])
    np.save(tmp_path / "x.npy", np.zeros((4, 4), np.float32))
    with pytest.raises(OnnxcError, match="a .npy holds one input, the model has 2"):
        calibration_data.load(tmp_path / "x.npy", m)


def test_folder_of_variable_width_lines(tmp_path):
    cal = calib.make_calibration(onnx.load(CRNN), line_folder(tmp_path), seed=1)
    assert cal.train.count + cal.validation.count == 18
    widths = sorted({g["line"].shape[3] for g in cal.train.groups})
    assert widths == [96, 128, 160]
    assert calib.working_shapes(onnx.load(CRNN), cal) == {}  # variable: nothing is frozen


def test_folder_errors_are_one_line(tmp_path):
    folder = line_folder(tmp_path, count=3)
    (folder / "notes.txt").write_text("x")
    with pytest.raises(OnnxcError, match="notes.txt' is not a .npy, .npz or image"):
        calibration_data.load(folder, onnx.load(CRNN))
    (folder / "notes.txt").unlink()
    np.save(folder / "bad.npy", np.zeros((1, 1, 31, 64), np.float32))  # height is fixed to 32
    expected = r"bad.npy: .line. has shape \(1, 1, 31, 64\), the model expects \[batch, 1, 32, width\]"
    with pytest.raises(OnnxcError, match=expected):
        calibration_data.load(folder, onnx.load(CRNN))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OnnxcError, match="empty"):
        calibration_data.load(empty, onnx.load(CRNN))


def test_feed_iterable_in_the_library():
    rng = np.random.default_rng(0)
    feeds = ({"line": rng.standard_normal((1, 1, 32, w)).astype(np.float32)} for w in [64, 96] * 4)
    samples, label = calibration_data.load(feeds, onnx.load(CRNN))
    assert label == "feeds" and samples.count == 8 and len(samples.groups) == 2


# ---- images ----------------------------------------------------------------------------------
def test_preprocess_spec_parsing():
    p = preprocess.parse("size=320x240,letterbox,scale=1/255,mean=0.5|0.4|0.3,std=0.2,layout=NHWC,bgr")
    assert p.size == (320, 240) and p.letterbox and p.layout == "NHWC" and p.color == "bgr"
    assert p.scale == pytest.approx(1 / 255) and p.mean == (0.5, 0.4, 0.3)
    for bad in ("size=32", "shear=1", "std=0", "layout=CHW"):
        with pytest.raises(UsageError):
            preprocess.parse(bad)


def test_image_folder_letterboxed(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (200, 100), (255, 0, 0)).save(folder / "wide.png")
    Image.new("RGB", (50, 100), (0, 0, 255)).save(folder / "tall.jpg")
    samples, _ = calibration_data.load(folder, onnx.load(RESNET_DYN), "size=64x64,letterbox,scale=1/255")
    x = samples["image"]
    assert x.shape == (2, 3, 64, 64) and x.dtype == np.float32
    tall, wide = x  # sorted by file name
    assert wide[0, 32, 32] == pytest.approx(1.0) and wide[2, 32, 32] == pytest.approx(0.0)
    assert wide[0, 2, 32] == pytest.approx(114 / 255, abs=1e-6)  # letterbox padding above the wide image
    assert tall[2, 32, 32] == pytest.approx(1.0, abs=0.02) and tall[2, 32, 2] == pytest.approx(114 / 255, abs=1e-6)


def test_image_folder_without_size_keeps_each_size(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, size in enumerate([(64, 48), (80, 48), (64, 48)]):
        Image.new("RGB", size, (10 * i, 0, 0)).save(folder / f"p{i}.png")
    samples, _ = calibration_data.load(folder, onnx.load(RESNET_DYN), "scale=1/255")
    assert sorted(g["image"].shape for g in samples.groups) == [(1, 3, 48, 80), (2, 3, 48, 64)]


# ---- the interface is kept on every path -----------------------------------------------------
def _runs_at(path: Path, name: str, shapes) -> list[tuple]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    return [sess.run(None, {name: rng.standard_normal(s).astype(np.float32)})[0].shape for s in shapes]


def test_variable_width_calibration_end_to_end(tmp_path):
    out = tmp_path / "crnn-small.onnx"
    result = onnxc.optimize(CRNN, passes=["prune:ratio=0.3"], calibration=line_folder(tmp_path), output=out)
    assert interface_differences(onnx.load(CRNN), onnx.load(out)) == []
    record = result.report.passes[0]
    assert record.status == "applied", record.reason
    assert result.report.fidelity["rel_l2"] < 0.2
    assert len(result.report.shapes) == 3  # verification ran at the three widths
    # the pruned model still serves a batch of wider lines and a single narrow one
    assert _runs_at(out, "line", [(3, 1, 32, 200), (1, 1, 32, 48)]) == [(3, 50, 37), (1, 12, 37)]
    w = {t.name: t.dims for t in onnx.load(out).graph.initializer}
    assert any(d[0] < 128 for d in w.values() if len(d) == 4)  # channels were removed, not masked


def test_input_shape_does_not_freeze_the_written_model(tmp_path):
    out = tmp_path / "resnet-small.onnx"
    source = onnx.load(RESNET_DYN)
    source.metadata_props.add(key="labels", value="a,b,c")
    src = tmp_path / "resnet.onnx"
    onnx.save(source, src)
    proc = cli("optimize", src, "-o", out, "--input-shape", "image=1x3x64x64", "-p", "cluster:bits=8", "-q")
    assert proc.returncode == 0, proc.stderr
    assert interface_differences(source, onnx.load(out)) == []
    assert _runs_at(out, "image", [(2, 3, 96, 128), (1, 3, 40, 40)]) == [(2, 10), (1, 10)]


def test_input_shape_accepts_minus_one_dims(tmp_path):
    source = onnx.load(RESNET_DYN)
    for d in source.graph.input[0].type.tensor_type.shape.dim:
        if d.dim_param:
            d.Clear()
            d.dim_value = -1  # as Paddle writes a dynamic dim
    src = tmp_path / "paddle-like.onnx"
    onnx.save(source, src)
    out = tmp_path / "out.onnx"
    proc = cli("optimize", src, "-o", out, "--input-shape", "image=1x3x48x48", "--preset", "lossless", "-q")
    assert proc.returncode == 0, proc.stderr
    assert interface_differences(source, onnx.load(out)) == []
    assert _runs_at(out, "image", [(2, 3, 64, 64)]) == [(2, 10)]


def test_bad_calibration_is_one_line_and_no_output(tmp_path):
    out = tmp_path / "o.onnx"
    np.save(tmp_path / "ints.npy", np.zeros((4, 1, 16, 16), np.int64))
    for arg, message in [(tmp_path / "missing", "no such calibration"), (tmp_path / "ints.npy", "dtype int64")]:
        proc = cli("optimize", MLP, "-o", out, "--calibration", arg, "-p", "cluster")
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("spec", ["svd", "tucker", "cluster:bits=6"])
def test_passes_fit_to_variable_width_samples(spec, tmp_path):
    """Channel and input statistics do not need equal shapes: each pass fits to the three widths."""
    out = tmp_path / "out.onnx"
    result = onnxc.optimize(CRNN, passes=[spec], calibration=line_folder(tmp_path, count=9), output=out)
    [record] = result.report.passes
    assert record.status == "applied", record.reason
    assert interface_differences(onnx.load(CRNN), onnx.load(out)) == []
    assert _runs_at(out, "line", [(2, 1, 32, 72)]) == [(2, 18, 37)]
