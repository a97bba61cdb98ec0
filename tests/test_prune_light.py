"""Must-show: the onnx package's `light` architectures (random weights) prune through their
residual Sums, Concats and channel shuffles, and stay valid with the same output shapes."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from graphs import randomize_weights

from onnxc.compiler import runtime
from onnxc.compiler.calibration import make_calibration
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.cost import model_cost
from onnxc.compiler.passes import PassContext, create

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def randomized(name: str, seed: int = 0) -> onnx.ModelProto:
    """Canonical light model with seeded He-scaled random weights (the originals are constant-filled)."""
    return randomize_weights(canonicalize(onnx.load(os.path.join(LIGHT, f"light_{name}.onnx"))), seed)


def producers_of(model, op_type):
    return {o for n in model.graph.node if n.op_type == op_type for o in n.output}


# name -> (op whose output must lie in a pruned group, options)
CASES = {
    "resnet50": ("Sum", "criterion=l1,reconstruct=false"),
    "densenet121": ("Concat", "criterion=l1,reconstruct=false"),
    "inception_v1": ("Concat", "criterion=l1,reconstruct=false"),
    "inception_v2": ("Concat", "criterion=activation,reconstruct=false"),
    "squeezenet": ("Concat", "criterion=lsq,samples=1024"),  # with the refit of every later layer
    "shufflenet": ("Reshape", "criterion=thinet,samples=1024,downstream=false"),  # grouped refits
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_light_model_prunes_through_its_topology(name):
    op, spec = CASES[name]
    model = randomized(name)
    cal = make_calibration(model, None, seed=0, random_count=4)
    options = dict(kv.split("=") for kv in spec.split(","))
    result = create("prune", {"ratio": 0.3, **options}).run(canonicalize(model), PassContext(calibration=cal))
    assert result.modified
    pruned = canonicalize(result.model)
    onnx.checker.check_model(pruned)
    ref, got = runtime.run(model, cal.validation), runtime.run(pruned, cal.validation)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    assert all(np.isfinite(v).all() for v in got.values())
    through = producers_of(model, op)
    crossing = [c for c in result.changes if through & set(c.detail["members"])]
    ratio = model_cost(pruned).macs / model_cost(model).macs
    print(f"{name}: {len(result.changes)} groups pruned ({len(crossing)} through {op}), "
          f"{result.info['frozen_groups']} frozen, MACs x{ratio:.3f}")
    assert crossing, f"no pruned group passes through a {op}"
    assert ratio < 0.85
    assert all(s.reason for s in result.skipped)
    if name == "shufflenet":
        assert any("grouped conv" in s.reason for s in result.skipped)  # 136-channel shuffles straddle
        assert any(c.detail["error_refit"] is not None for c in crossing)
