"""The 1-D k-means and the code containers behind the `cluster` pass."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import f32, model
from onnx import TensorProto, helper, numpy_helper

from onnxc.compiler.graph import GraphView
from onnxc.passes import _codes
from onnxc.passes._kmeans1d import assign, kmeans1d


def brute_lloyd(x: np.ndarray, c: np.ndarray, w: np.ndarray | None = None, iters: int = 2000) -> np.ndarray:
    """Textbook Lloyd on every point (O(N K) per iteration) to check the prefix-sum version."""
    x = x.astype(np.float64)
    w = np.ones_like(x) if w is None else w
    for _ in range(iters):
        a = np.searchsorted((c[1:] + c[:-1]) / 2, x, side="right")
        s0 = np.bincount(a, w, len(c))
        new = np.where(s0 > 0, np.bincount(a, w * x, len(c)) / np.maximum(s0, 1e-300), c)
        if np.array_equal(new, c):
            break
        c = new
    return c


@pytest.mark.parametrize("weighted", [False, True])
def test_lloyd_reaches_the_same_fixed_point_as_brute_force(weighted):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(20_000).astype(np.float32)
    w = rng.random(20_000) if weighted else None
    got = kmeans1d(x, 16, weights=w, init="linear", max_iter=2000, reseed_rounds=0)
    want = brute_lloyd(x, np.linspace(x.min(), x.max(), 16), w)
    np.testing.assert_allclose(got.centroids[0], want, rtol=0, atol=1e-9)
    assert np.array_equal(got.codes[0], np.searchsorted((want[1:] + want[:-1]) / 2, x, side="right"))


def test_kmeanspp_inertia_matches_scikit_learn():
    """Same algorithm family (greedy k-means++ then Lloyd): comparable optima over a few seeds."""
    from sklearn.cluster import KMeans

    x = (np.random.default_rng(1).standard_t(4, 10_000) * 0.05).astype(np.float32)
    xd = x.astype(np.float64)
    ours = []
    theirs = []
    for seed in range(3):
        r = kmeans1d(x, 16, init="kmeans++", rng=np.random.default_rng(seed))
        ours.append(np.sum((r.centroids[0][r.codes[0]] - xd) ** 2))
        theirs.append(KMeans(16, n_init=1, random_state=seed).fit(xd.reshape(-1, 1)).inertia_)
    assert np.median(ours) <= np.median(theirs) * 1.02


@pytest.mark.parametrize("init_", ["linear", "density", "kmeans++"])
def test_every_init_gives_sorted_used_codebooks(init_):
    x = np.random.default_rng(2).laplace(size=30_000).astype(np.float32)
    r = kmeans1d(x, 64, init=init_, rng=np.random.default_rng(0))
    c = r.centroids[0]
    assert np.all(np.diff(c) >= 0)
    assert r.counts.sum() == x.size
    assert np.count_nonzero(r.counts) == 64  # empty clusters were re-seeded
    rel = np.linalg.norm(c[r.codes[0]] - x) / np.linalg.norm(x)
    assert rel < 0.05


def test_histogram_mode_matches_the_exact_sort():
    x = np.random.default_rng(3).standard_normal(1 << 21).astype(np.float32)
    fast = kmeans1d(x, 256)
    exact = kmeans1d(x, 256, hist=False)
    err_fast = np.linalg.norm(fast.centroids[0][fast.codes[0]] - x)
    err_exact = np.linalg.norm(exact.centroids[0][exact.codes[0]] - x)
    assert err_fast <= err_exact * 1.01
    bounds = 0.5 * (fast.centroids[0, 1:] + fast.centroids[0, :-1])
    assert np.array_equal(fast.codes[0], np.searchsorted(bounds, x, side="right"))  # grid lookup is exact


def test_exact_zeros_keep_an_exact_zero_code():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 600)).astype(np.float32)
    x[:, ::3] = 0.0
    x[5] = rng.standard_normal(600)  # one row without zeros
    for rows in (x.reshape(1, -1), x):
        r = kmeans1d(rows, 8)
        rebuilt = np.take_along_axis(r.centroids, r.codes.astype(np.int64), axis=1)
        zeros = rows == 0
        assert np.all(rebuilt[zeros] == 0.0)
        has_zero = zeros.any(axis=1)
        assert np.array_equal(r.zero_code >= 0, has_zero)
    r = kmeans1d(x, 8, keep_zero=False)
    assert np.all(r.zero_code == -1)


def test_rows_are_clustered_independently():
    x = np.random.default_rng(5).standard_normal((6, 400)).astype(np.float32) * np.arange(1, 7)[:, None]
    together = kmeans1d(x, 8, init="density")
    for i in range(6):
        alone = kmeans1d(x[i], 8, init="density")
        np.testing.assert_allclose(together.centroids[i], alone.centroids[0], atol=1e-9)
        assert np.array_equal(together.codes[i], alone.codes[0])


def test_kmeanspp_is_seeded():
    x = np.random.default_rng(6).standard_normal((3, 5000)).astype(np.float32)
    a = kmeans1d(x, 16, init="kmeans++", rng=np.random.default_rng(7))
    b = kmeans1d(x, 16, init="kmeans++", rng=np.random.default_rng(7))
    c = kmeans1d(x, 16, init="kmeans++", rng=np.random.default_rng(8), max_iter=1)
    d = kmeans1d(x, 16, init="kmeans++", rng=np.random.default_rng(7), max_iter=1)
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.codes, b.codes)
    assert not np.array_equal(c.centroids, d.centroids)


def test_fewer_distinct_values_than_clusters():
    x = np.repeat(np.array([-1.0, 0.5, 2.0], dtype=np.float32), 50)
    r = kmeans1d(x, 16)
    rebuilt = r.centroids[0][r.codes[0]]
    np.testing.assert_array_equal(rebuilt, x)
    assert np.array_equal(assign(x, r.centroids), r.codes)


def test_huffman_bits():
    assert _codes.huffman_bits([1, 1, 2, 4]) == 14  # lengths 3, 3, 2, 1
    assert _codes.huffman_bits([5, 0, 0]) == 5
    assert _codes.huffman_bits([10, 10, 10, 10]) == 80


def test_uint4_tensor_layout_and_nibble_fallback_agree():
    codes = np.random.default_rng(8).integers(0, 16, size=(3, 5)).astype(np.uint8)
    tensor = _codes.uint4_tensor("c", codes)
    assert tensor.data_type == TensorProto.UINT4
    np.testing.assert_array_equal(numpy_helper.to_array(tensor).astype(np.uint8), codes)
    assert tensor.raw_data == _codes.pack_nibbles(codes).tobytes()  # the fallback stores these bytes


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_stream_roundtrip(bits):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, size=8 * 37 + 5)
    packed, tail = _codes.pack_bits(codes, bits)
    assert packed.shape == (37, bits) and tail.size == 5
    np.testing.assert_array_equal(np.concatenate([_codes.unpack_bits(packed, bits), tail]), codes)
    if bits == 4:
        assert packed.tobytes() == _codes.pack_nibbles(codes[:-5]).tobytes()


def _softmax_model(opset: int, axis: int, rank: int) -> onnx.ModelProto:
    shape = [2, 3, 4, 5][:rank]
    nodes = [helper.make_node("Softmax", ["x"], ["y"], name="sm", axis=axis)]
    m = model(nodes, [f32("x", shape)], [f32("y", shape)], opset=opset, ir=7)
    return onnx.shape_inference.infer_shapes(m)


def test_opset_upgrade_keeps_meaning_or_refuses():
    ok = _softmax_model(11, 1, 2)  # softmax over the last axis: same meaning at opset 13+
    x = np.random.default_rng(9).standard_normal((2, 3)).astype(np.float32)
    before = ort.InferenceSession(ok.SerializeToString()).run(None, {"x": x})[0]
    assert _codes.upgrade_for_uint4(ok) == ""
    assert _codes.default_opset(ok) == 21 and ok.ir_version == 10
    after = ort.InferenceSession(ok.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-6)
    bad = _softmax_model(11, 1, 4)  # opset 11 flattens [2, 60]; opset 13 would not
    assert "changed meaning" in _codes.upgrade_for_uint4(bad)
    assert _codes.default_opset(bad) == 11
    squeeze = model([helper.make_node("Squeeze", ["x"], ["y"], name="sq", axes=[0])], [f32("x", [1, 3])],
                    [f32("y", [3])], opset=11, ir=7)
    assert "axes" in _codes.upgrade_for_uint4(squeeze)


def test_encode_patterns_run_in_onnxruntime():
    rng = np.random.default_rng(10)
    codes = rng.integers(0, 16, size=(7, 5)).astype(np.uint8)  # odd element count: nibble tail
    codebook = np.sort(rng.standard_normal(16)).astype(np.float32)
    for container, opset in (("uint4", 21), ("nibbles", 11), ("uint8", 11), ("tight", 11)):
        m = model([], [f32("x", [1, 7])], [f32("y", [1, 5])], opset=opset, ir=10 if opset == 21 else 7)
        view = GraphView(m.graph)
        enc = _codes.encode(view, "W", codes, codebook, None, container, "W", bits=4)
        m.graph.initializer.extend(enc.initializers)
        m.graph.node.extend(enc.nodes + [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")])
        onnx.checker.check_model(m, full_check=True)
        x = rng.standard_normal((1, 7)).astype(np.float32)
        got = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, x @ codebook[codes], rtol=1e-5, atol=1e-6)
        decoded = _codes.read_clustered(m)["W"]
        assert decoded.container == container
        np.testing.assert_array_equal(decoded.weights(), codebook[codes])
