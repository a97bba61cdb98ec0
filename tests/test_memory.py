"""Peak memory of whole commands stays bounded, measured on a child process.

The model has small weights and large feature maps (32 x 96 x 96 floats per tensor, 1.2 MB per
sample), the case where memory follows activations. Each command runs in a child whose peak RSS
(`ru_maxrss` of its own children) is read back, so the test process itself does not count.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import f32, init, model
from onnx import helper

ROOT = Path(__file__).resolve().parent.parent
SIDE, WIDTH = 96, 32

# Measured on this model with 96 calibration samples: the int8 export peaked at ~1000 MB when
# onnxruntime's calibrator was fed batches of 32 samples, ~510 MB with batches of 8 (same output).
INT8_EXPORT_MB = 700


def wide_maps(seed: int = 0) -> onnx.ModelProto:
    """Conv 3->32 then four 1x1 convs with Relu at full resolution, pooled into 10 logits."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, cin = "x", 3
    for i in range(5):
        k = 3 if i == 0 else 1
        w = (rng.standard_normal((WIDTH, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        inits += [init(f"w{i}", w), init(f"b{i}", (0.1 * rng.standard_normal(WIDTH)).astype(np.float32))]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[k // 2] * 4),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x, cin = f"r{i}", WIDTH
    inits += [init("wf", (0.1 * rng.standard_normal((10, WIDTH))).astype(np.float32)),
              init("bf", np.zeros(10, np.float32))]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "wf", "bf"], ["y"], name="fc", transB=1)]
    return model(nodes, [f32("x", ["N", 3, SIDE, SIDE])], [f32("y", ["N", 10])], inits)


def peak_rss_mb(args: list[str]) -> float:
    """Peak RSS in MB of `python -m onnxc ARGS` (fails the test if the command fails)."""
    probe = ("import json, resource, subprocess, sys\n"
             "r = subprocess.run([sys.executable, '-m', 'onnxc', *sys.argv[1:]], capture_output=True, text=True)\n"
             "print(json.dumps([r.returncode, r.stderr[-2000:], "
             "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))\n")
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    code, err, mb = json.loads(out.stdout.strip().splitlines()[-1])
    assert code == 0, err
    return mb


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    d = tmp_path_factory.mktemp("wide")
    path = d / "wide.onnx"
    onnx.save(wide_maps(), path)
    x = np.random.default_rng(1).random((128, 3, SIDE, SIDE), dtype=np.float32)
    np.savez(d / "cal.npz", x=x)
    return d


def test_int8_export_peak_rss_is_bounded(wide):
    mb = peak_rss_mb(["export", str(wide / "wide.onnx"), "--backend", "onnxruntime", "--int8",
                      "-o", str(wide / "q.onnx"), "--calibration", str(wide / "cal.npz"), "-q"])
    print(f"int8 export peak RSS {mb:.0f} MB")
    assert mb < INT8_EXPORT_MB


# Clustering's input statistics once listed every captured batch before reducing them: 744 MB
# here; streamed, 595 MB (on ppocr_rec with 128 lines: 2.8 GB -> 0.94 GB).
CLUSTER_MB = 680


def test_cluster_statistics_stream(wide):
    mb = peak_rss_mb(["optimize", str(wide / "wide.onnx"), "-o", str(wide / "c.onnx"), "-p", "cluster:bits=4",
                      "--calibration", str(wide / "cal.npz"), "-q", "--max-error", "inf"])
    print(f"cluster peak RSS {mb:.0f} MB")
    assert mb < CLUSTER_MB
