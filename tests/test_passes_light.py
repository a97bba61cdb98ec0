"""Every decomposition pass leaves the onnx package's real architectures valid and runnable.

(Pruning and clustering have their own light-model tests.) Random weights and random inputs:
accuracy means nothing here, so the checks are structural: the checker passes, onnxruntime runs
the result, output shapes are unchanged, outputs are finite, and the pass did rewrite something.
"""

from __future__ import annotations

import os

import graphs
import numpy as np
import onnx
import pytest

import onnxc
from onnxc.compiler import runtime

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")

CASES = [
    ("squeezenet", "tucker"),
    ("squeezenet", "cp:max_rank=32"),
    ("shufflenet", "svd"),
    ("shufflenet", "circulant:block=8"),
    ("inception_v1", "svd"),
    ("inception_v1", "circulant:block=8"),
    ("inception_v1", "circulant:block=8,convs=true,min_features=256"),  # its widest pointwise convs
]


@pytest.fixture(scope="module")
def light_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("light")
    made = {}
    for name in sorted({name for name, _ in CASES}):
        m = onnxc.canonicalize(onnx.load(os.path.join(LIGHT, f"light_{name}.onnx")), infer=False)
        graphs.randomize_weights(m, seed=1)
        path = folder / f"{name}.onnx"
        onnx.save(m, str(path))
        x = np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)
        np.savez(folder / f"{name}.npz", **{m.graph.input[0].name: x})
        made[name] = (path, folder / f"{name}.npz", {m.graph.input[0].name: x[:1]})
    return made


@pytest.mark.parametrize("name,spec", CASES)
def test_pass_keeps_light_model_valid_and_runnable(name, spec, light_models, tmp_path):
    src, cal, x = light_models[name]
    out = tmp_path / "out.onnx"
    result = onnxc.optimize(src, passes=[spec], calibration=cal, output=out)
    record = result.report.passes[0]
    assert record.status == "applied", record.reason
    assert record.changes
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    before, after = runtime.run(onnx.load(str(src)), x), runtime.run(model, x)
    for key in before:
        assert after[key].shape == before[key].shape
        assert np.isfinite(after[key]).all()
