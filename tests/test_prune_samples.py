"""Must-show: the digit samples pruned at ratio=0.5 keep their held-out accuracy within 1 point."""

from __future__ import annotations

import pytest
from sample_data import CALIBRATION, accuracy, sample_path

from onnxc.api import optimize
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.cost import model_cost
from onnxc.compiler.model import load

# MAC bounds from the issue; `scope=global` ranks all channels together with the lsq cost.
BOUNDS = {"vgg": 0.5, "resnet": 0.6, "mobilenet": 0.6}


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_sample_pruned_at_half_keeps_accuracy(name, tmp_path):
    path = sample_path(name)
    original = canonicalize(load(path))
    out = tmp_path / f"{name}.onnx"
    result = optimize(path, passes=["prune:ratio=0.5,scope=global"], calibration=CALIBRATION, output=out)
    record = result.report.passes[0]
    assert record.status == "applied", record.reason
    pruned = load(out)
    macs = model_cost(canonicalize(pruned)).macs / model_cost(original).macs
    before, after = accuracy(path), accuracy(pruned)
    print(f"{name}: accuracy {before:.2f} -> {after:.2f}, MACs x{macs:.3f}, groups {len(record.changes)}")
    assert after >= before - 1.0
    assert macs <= BOUNDS[name]
    assert out.stat().st_size < path.stat().st_size
    assert all(c.detail["channels_after"] for c in record.changes)
