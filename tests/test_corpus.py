"""Real exports as they are (issue 11): every public corpus model and our dynamic-axes exports go
through inspect, the lossless preset, every pass at its defaults and both backends without an
internal error; every result is valid, keeps the source interface, and runs at two input sizes
where the source allows.

Passes run on 8 random samples (verification on 2 of them): this proves the mechanics on real
graphs; what a compressed real model is still good for is measured in benchmarks/.
"""

from __future__ import annotations

import json
import subprocess
import sys

import corpus
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxc
from onnxc.compiler.interface import interface_differences

# Every pass at its defaults on every model (the slowest pair, prune on the 800x608 layout detector's
# 100 convs, takes about 1.5 minutes); `python benchmarks/corpus.py --passes` prints the same matrix
# with seconds and errors.
PASSES = ["prune", "svd", "tucker", "cp", "cluster", "circulant"]
MATRIX = [(name, p) for name in corpus.ALL for p in PASSES]


def _run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [sess.run(None, f) for f in feeds]


def _check_drop_in(name, out_path, lossless=False):
    source = onnx.load(str(corpus.path(name)))
    written = onnx.load(str(out_path))
    onnx.checker.check_model(written)
    assert interface_differences(source, written) == []
    for shapes in corpus.sizes(name):
        feed = corpus.feed(source, shapes, seed=7)
        [ref], [got] = _run(corpus.path(name), [feed]), _run(out_path, [feed])
        for r, g in zip(ref, got):
            assert r.shape == g.shape and r.dtype == g.dtype
            assert np.isfinite(g).all()
            if lossless:
                rel = np.linalg.norm(r - g) / max(np.linalg.norm(r), 1e-30)
                assert rel < 1e-4, f"{name} at {shapes}: lossless result differs by {rel:.3g}"


@pytest.mark.parametrize("name", corpus.ALL)
def test_inspect_without_flags(name):
    proc = subprocess.run([sys.executable, "-m", "onnxc", "inspect", str(corpus.path(name)), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "internal error" not in proc.stderr
    assert json.loads(proc.stdout)["totals"]["macs"] > 0


@pytest.mark.parametrize("name", corpus.ALL)
def test_lossless_preset(name, tmp_path):
    out = tmp_path / f"{name}.onnx"
    result = onnxc.optimize(corpus.path(name), preset="lossless", calibration=corpus.calibration(name, 4),
                            output=out)
    assert not [r for r in result.report.passes if r.status == "failed"]
    _check_drop_in(name, out, lossless=True)


@pytest.mark.parametrize("name, pass_id", MATRIX)
def test_every_pass_at_defaults(name, pass_id, tmp_path):
    out = tmp_path / f"{name}-{pass_id}.onnx"
    result = onnxc.optimize(corpus.path(name), passes=[pass_id], calibration=corpus.calibration(name),
                            output=out)
    [record] = result.report.passes
    assert record.status != "failed", record.reason  # a crash inside a pass is an internal error
    _check_drop_in(name, out)


@pytest.mark.parametrize("name", corpus.ALL)
def test_onnxruntime_export_int8(name, tmp_path, monkeypatch):
    out = tmp_path / f"{name}-int8.onnx"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # onnxruntime's quantization tools drop temporary files into the cwd
    onnxc.export(corpus.path(name), "onnxruntime", out, int8="static", calibration=corpus.calibration(name, 4))
    assert list(cwd.iterdir()) == []
    _check_drop_in(name, out)


@pytest.mark.parametrize("name, shape", [("crnn", [1, 1, 32, 96]), ("resnet_dyn", [1, 3, 48, 64])])
def test_c_export_of_dynamic_exports(name, shape, tmp_path):
    """Symbolic dims fixed by --input-shape (the CRNN's sequence length follows from its width
    through Shape/Gather/ConstantOfShape), LSTM included; the C build matches onnxruntime."""
    from onnxc.backends.c import compile_model
    from onnxc.backends.c.toolchain import build_generated, max_rel_error, run_generated

    model = onnx.load(str(corpus.path(name)))
    input_name = model.graph.input[0].name
    gen = compile_model(model, "net", {input_name: shape})
    exe = build_generated([gen], tmp_path / "c")
    for seed in range(2):
        feed = corpus.feed(model, {input_name: shape}, seed=seed)
        [ref] = _run(corpus.path(name), [feed])
        got = run_generated(exe, 0, gen, feed)
        assert max_rel_error(got[model.graph.output[0].name], ref[0]) < 1e-4
