"""Captures run only the part of the model the requested tensors need, with the same values."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from graphs import chain

from onnxc.compiler.calibration import iter_activations, with_outputs
from onnxc.passes._reconstruct import Normal


def _full_run(m: onnx.ModelProto, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    """The tensors from a session over the whole graph (every node kept), as before."""
    copy = onnx.ModelProto()
    copy.CopyFrom(m)
    copy.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(copy.SerializeToString(), opts).run(names, {"x": x})


def test_capture_keeps_only_needed_nodes_and_values():
    m = chain(40, width=6)  # nodes listed in reverse order: the walk must not rely on graph order
    x = np.random.default_rng(0).standard_normal((10, 6)).astype(np.float32)
    early = ["m2", "r3"]
    cut = with_outputs(m, early)
    assert sorted(n.name for n in cut.graph.node) == ["mm0", "mm1", "mm2", "mm3", "relu0", "relu1", "relu2", "relu3"]
    assert {t.name for t in cut.graph.initializer} == {"w0", "w1", "w2", "w3"}
    got = next(iter_activations(m, early, {"x": x}, batch_size=10))
    for name, ref in zip(early, _full_run(m, early, x)):
        assert np.array_equal(got[name], ref)


def test_ridge_path_matches_the_direct_solve():
    rng = np.random.default_rng(1)
    system = Normal(12, 3)
    x = rng.standard_normal((200, 12)).astype(np.float32)
    x[:, 5] = x[:, 4]  # a collinear pair: the ridge is what makes the system solvable
    system.add(x, (x @ rng.standard_normal((12, 3)) + 0.1 * rng.standard_normal((200, 3))).astype(np.float32))
    fit = system.path(True)
    for rel in (1e-3, 1e-2, 1.0):
        w, b = fit(rel)
        w_ref, b_ref = system.solve(rel, True)
        assert np.allclose(w, w_ref, rtol=1e-8, atol=1e-10) and np.allclose(b, b_ref, rtol=1e-8, atol=1e-10)


def test_grouped_cross_validation_matches_group_by_group():
    """A depthwise layer's systems are cross-validated as one stack: the same choice per group
    (ridge strength, or the sliced weights where they predict better) as one group at a time."""
    from onnxc.passes._reconstruct import NormalStack, _cross_validate, _cross_validate_stack

    rng = np.random.default_rng(0)
    groups, dim, outs = 30, 9, 1
    fa, fb = NormalStack(groups, dim, outs), NormalStack(groups, dim, outs)
    w = rng.standard_normal((groups, dim, outs))
    for stack in (fa, fb):
        x = rng.standard_normal((200, groups, dim)).astype(np.float32)
        noise = 0.3 * rng.standard_normal((200, groups, outs))
        stack.add(x, (np.einsum("sgd,gdo->sgo", x, w) + noise).astype(np.float32))
    mats = [w[g] + 0.2 * rng.standard_normal((dim, outs)) for g in range(groups)]
    mats[3] = w[3]  # this group's sliced weights are already the truth: no refit beats them
    biases = [np.zeros(outs)] * groups
    va, vb = fa.views(), fb.views()
    expected = [_cross_validate(va[g], vb[g], mats[g], biases[g], 1e-2, True) for g in range(groups)]
    assert _cross_validate_stack(fa, fb, mats, biases, 1e-2, True) == expected
    assert expected[3] is None and expected[0] is not None
