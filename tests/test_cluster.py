"""The `cluster` pass: accuracy and file size on the samples, the ONNX pattern, determinism."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import f32, init, model, randomize_weights
from onnx import TensorProto, helper
from sample_data import CALIBRATION, accuracy, sample_path
from test_channel_groups import Net

from onnxc.api import optimize
from onnxc.compiler.calibration import Calibration, make_calibration, with_outputs
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.graph import GraphView
from onnxc.compiler.model import load, save
from onnxc.compiler.passes import PassContext, create
from onnxc.errors import UsageError
from onnxc.passes._codes import read_clustered

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def _optimize_sample(name: str, spec: str, out) -> tuple:
    result = optimize(sample_path(name), passes=[spec], calibration=CALIBRATION, output=out)
    record = result.report.passes[0]
    assert record.status == "applied", record.reason
    return result, record


@pytest.mark.parametrize("name,bits,max_drop", [("vgg", 4, 0.5), ("mlp", 3, 1.5)])
def test_sample_accuracy_and_file_size(name, bits, max_drop, tmp_path):
    out = tmp_path / f"{name}.onnx"
    _, record = _optimize_sample(name, f"cluster:bits={bits}", out)
    base, got = accuracy(sample_path(name)), accuracy(out)
    ratio = out.stat().st_size / sample_path(name).stat().st_size
    assert got >= base - max_drop, f"accuracy {base:.2f} -> {got:.2f}"
    assert ratio <= 0.16, f"file is {ratio:.3f}x of the original"
    assert all(c.detail["container"] == "uint4" for c in record.changes)
    assert record.info["codes_4bit"] == "UINT4 (opset 17 -> 21)"


def test_pattern_survives_canonicalization_and_decodes(tmp_path):
    out = tmp_path / "mlp.onnx"
    _, record = _optimize_sample("mlp", "cluster:bits=4", out)
    m = canonicalize(load(out))
    found = read_clustered(m)
    assert sorted(found) == sorted(c.detail["weight"] for c in record.changes)
    inits = {t.name: t for t in m.graph.initializer}
    original = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(sample_path("mlp")).graph.initializer}
    for change in record.changes:
        w = found[change.detail["weight"]]
        assert inits[w.codes_tensor].data_type == TensorProto.UINT4
        assert w.codebook.size == change.detail["codebook_size"] <= 16
        ref = original[w.name]
        rel = np.linalg.norm(w.weights() - ref) / np.linalg.norm(ref)
        assert rel == pytest.approx(change.detail["weight_rel_error"], rel=1e-5)
        consumer = next(n for n in m.graph.node if w.name in n.input)
        assert consumer.op_type == "Gemm"
    assert sum(n.op_type == "Gather" for n in m.graph.node) == len(record.changes)


def test_report_sizes_and_huffman(tmp_path):
    _, record = _optimize_sample("mlp", "cluster:bits=3", tmp_path / "m.onnx")
    info = record.info
    assert info["layers"] == len(record.changes) == 3
    for c in record.changes:
        d = c.detail
        n = d["bytes_before"] // 4
        assert d["bits"] == 3 and d["codebook_size"] == 8
        assert d["code_bytes"] == (n + 1) // 2  # 3-bit codes in 4-bit containers
        assert d["huffman_code_bytes"] <= (3 * n + 7) // 8  # Huffman never beats nothing... nor loses to 3 bits
        assert d["bytes_after"] == d["code_bytes"] + 4 * d["codebook_size"]
        assert c.after["bytes"] < c.before["bytes"]
    assert info["weight_bytes_after"] == sum(c.detail["bytes_after"] for c in record.changes)
    assert info["huffman_bytes"] < info["weight_bytes_after"]
    assert info["model_tensor_bytes_after"] < info["model_tensor_bytes_before"] / 7


@pytest.mark.parametrize("bits", [3, 6])
def test_tight_packing_stores_exact_bit_width(bits, tmp_path):
    """Same codes as the default containers (identical outputs), bits/8 bytes per weight."""
    m = canonicalize(load(sample_path("vgg")))
    cal = Calibration(*(2 * [dict(np.load(CALIBRATION))]), "calib.npz")
    outs, sizes = [], []
    for packing in ("auto", "tight"):
        result = create("cluster", {"bits": bits, "packing": packing}).run(canonicalize(m), PassContext(cal))
        path = save(canonicalize(result.model), tmp_path / f"{packing}.onnx")
        outs.append(ort.InferenceSession(str(path)).run(None, {"input": cal.train["input"][:32]})[0])
        sizes.append(sum(c.detail["code_bytes"] for c in result.changes))
        if packing == "tight":
            big = [c for c in result.changes if c.detail["bytes_before"] > 100_000]  # small ones: UINT4
            assert big and {c.detail["container"] for c in big} == {"tight"}
            n = sum(c.detail["bytes_before"] // 4 for c in big)
            assert sum(c.detail["code_bytes"] for c in big) <= n * bits / 8 + 8 * len(big)
            decoded = read_clustered(load(path))
            assert {decoded[c.detail["weight"]].container for c in big} == {"tight"}
            uses_uint4 = any(c.detail["container"] == "uint4" for c in result.changes)
            assert _default_opset(load(path)) == (21 if uses_uint4 else 17)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert sizes[1] < sizes[0]


def _default_opset(m: onnx.ModelProto) -> int:
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def test_same_seed_gives_byte_identical_files(tmp_path):
    spec = "cluster:bits=4,init=kmeans++,per_channel=true"
    paths = []
    for i in range(2):
        out = tmp_path / f"run{i}.onnx"
        optimize(sample_path("mlp"), passes=[spec], calibration=CALIBRATION, seed=3, output=out)
        paths.append(out)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    other = tmp_path / "seed4.onnx"
    optimize(sample_path("mlp"), passes=[spec], calibration=CALIBRATION, seed=4, output=other)
    assert other.read_bytes() != paths[0].read_bytes()


def _dense_equivalent(m: onnx.ModelProto) -> onnx.ModelProto:
    """The clustered model with each Gather pattern replaced by its decoded dense weight."""
    dense = onnx.ModelProto()
    dense.CopyFrom(m)
    for name, w in read_clustered(m).items():
        dense.graph.initializer.append(onnx.numpy_helper.from_array(w.weights(), name))
        for node in [n for n in dense.graph.node if name in n.output]:
            dense.graph.node.remove(node)
    GraphView(dense.graph).remove_unused()
    return dense


def _mixed_model(opset: int) -> onnx.ModelProto:
    """Gemm (transB=0: [in, out] until canonicalized), MatMul + Add and Conv without bias; opset 11
    Squeeze blocks opset 21."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["g"], name="gemm"),
        helper.make_node("MatMul", ["g", "wm"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "bm"], ["a"], name="add"),
    ]
    inits = [init("wc", rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2),
             init("wg", rng.standard_normal((16 * 4 * 4, 40)).astype(np.float32) * 0.05),
             init("bg", rng.standard_normal(40).astype(np.float32)),
             init("wm", rng.standard_normal((40, 33)).astype(np.float32) * 0.2),
             init("bm", rng.standard_normal(33).astype(np.float32))]
    outputs = [f32("y", [None, 33])]
    if opset < 13:
        nodes.append(helper.make_node("Unsqueeze", ["a"], ["u"], name="unsq", axes=[0]))
        nodes.append(helper.make_node("Squeeze", ["u"], ["y"], name="sq", axes=[0]))
    else:
        nodes.append(helper.make_node("Relu", ["a"], ["y"], name="out"))
    return model(nodes, [f32("x", ["N", 8, 4, 4])], outputs, inits, opset=opset, ir=7)


@pytest.mark.parametrize("opset,per_channel", [(11, True), (17, True), (11, False)])
def test_pattern_runs_in_onnxruntime_and_matches_its_decoding(opset, per_channel):
    src = canonicalize(_mixed_model(opset))
    x = np.random.default_rng(1).standard_normal((40, 8, 4, 4)).astype(np.float32)
    ctx = PassContext(calibration=Calibration({"x": x[:32]}, {"x": x[32:]}, "test.npz"))
    p = create("cluster", {"bits": 4, "per_channel": per_channel, "min_size": 256})
    result = p.run(canonicalize(src), ctx)
    assert result.modified and len(result.changes) == 3
    out = canonicalize(result.model)
    onnx.checker.check_model(out, full_check=True)
    expected = "nibbles" if opset < 13 else "uint4"
    assert {c.detail["container"] for c in result.changes} == {expected}
    # each correction is judged on the 8 held-out samples: kept only where it lowers their error
    assert all(c.detail["error_held_out"] is not None and c.detail["unrefitted_held_out"] is not None
               and c.detail["bias_corrected"] == (c.detail["refit"] == "kept") for c in result.changes)
    found = read_clustered(out)
    assert len(found) == 3 and all((w.offsets is not None) == per_channel for w in found.values())
    if per_channel:
        # the canonical Gemm's weight is [out, in] like the Conv's; the MatMul's [in, out]
        assert found["wg"].offsets.shape == (40, 1) and found["wc"].offsets.shape == (16, 1, 1, 1)
        assert found["wm"].offsets.shape == (1, 33)
    got = ort.InferenceSession(out.SerializeToString()).run(None, {"x": x})[0]
    dense = ort.InferenceSession(_dense_equivalent(out).SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-5)
    ref = ort.InferenceSession(src.SerializeToString()).run(None, {"x": x})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.1


def test_pruned_zeros_stay_exact_zeros():
    m = canonicalize(load(sample_path("mlp")))
    rng = np.random.default_rng(0)
    for t in m.graph.initializer:
        w = onnx.numpy_helper.to_array(t).copy()
        if w.ndim == 2:
            w[rng.random(w.shape) < 0.6] = 0.0
            t.CopyFrom(onnx.numpy_helper.from_array(w, t.name))
    original = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    result = create("cluster", {"bits": 2}).run(canonicalize(m), PassContext())
    assert all(c.detail["exact_zero_code"] for c in result.changes)
    for name, w in read_clustered(result.model).items():
        zeros = original[name] == 0
        assert np.all(w.weights()[zeros] == 0.0)
        assert 0.0 in w.codebook


@pytest.mark.parametrize("name,bits", [("light_squeezenet", 8), ("light_shufflenet", 3), ("light_resnet50", 4)])
def test_light_architectures_cluster_save_and_run(name, bits, tmp_path):
    """Random He-scaled weights (the shipped ones are constant); errors compared before Softmax."""
    src = canonicalize(randomize_weights(canonicalize(onnx.load(os.path.join(LIGHT, f"{name}.onnx"))), seed=0))
    result = create("cluster", {"bits": bits}).run(canonicalize(src), PassContext(seed=0))
    sizes = {t.name: int(np.prod(t.dims)) for t in src.graph.initializer}
    big = [n for n in src.graph.node if n.op_type in ("Conv", "Gemm") and sizes[n.input[1]] >= 1024]
    assert result.modified and len(result.changes) == len(big)
    path = save(canonicalize(result.model), tmp_path / "c.onnx")
    assert path.stat().st_size < result.info["model_tensor_bytes_before"] * (0.2 if bits <= 4 else 0.3)
    if bits <= 4:
        assert result.info["codes_4bit"] == "UINT4 (opset 9 -> 21)"
    logits = next(n.input[0] for n in src.graph.node if n.op_type == "Softmax")
    feed = {src.graph.input[0].name: np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    got = ort.InferenceSession(with_outputs(load(path), [logits]).SerializeToString()).run(None, feed)[0]
    ref = ort.InferenceSession(with_outputs(src, [logits]).SerializeToString()).run(None, feed)[0]
    assert np.all(np.isfinite(got))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < {3: 0.6, 4: 0.35, 8: 0.05}[bits]


def test_options_exclude_min_size_and_validation():
    m = canonicalize(load(sample_path("mlp")))
    result = create("cluster", {"exclude": ["*net.3*"]}).run(canonicalize(m), PassContext())
    assert [c.node for c in result.changes] == ["/net/net.1/Gemm", "/net/net.5/Gemm"]
    assert [(s.node, s.reason) for s in result.skipped] == [("/net/net.3/Gemm", "excluded")]
    assert not create("cluster", {"min_size": 10**6}).run(canonicalize(m), PassContext()).modified
    for bad in ({"bits": 0}, {"bits": 9}, {"init": "random"}, {"min_size": 0}):
        with pytest.raises(UsageError):
            create("cluster", bad)


def test_random_calibration_disables_data_aware_fitting():
    m = canonicalize(load(sample_path("mlp")))
    cal = make_calibration(m, None, seed=0)
    result = create("cluster", {"bits": 4}).run(canonicalize(m), PassContext(calibration=cal))
    assert result.info["data_aware"] is False
    assert not any("bias_corrected" in c.detail for c in result.changes)


def test_changes_count_macs_at_the_calibration_shapes_of_a_dynamic_model():
    """A dynamic spatial dim is read at the calibration samples' size (6 x 10), not as 1, so the
    report's per-layer cost is what the layer costs per sample (clustering changes no MACs)."""
    n = Net(seed=3)
    y = n.relu(n.conv(n.relu(n.conv("x", 3, 32, name="c1")), 32, 16, name="c2"))
    model = canonicalize(n.model({"x": ["N", 3, "H", "W"]}, [y]))
    x = np.random.default_rng(0).standard_normal((16, 3, 6, 10)).astype(np.float32)
    ctx = PassContext(calibration=Calibration({"x": x[:8]}, {"x": x[8:]}, "test"))
    result = create("cluster", {"bits": 4, "min_size": 1}).run(model, ctx)
    change = next(c for c in result.changes if c.node == "c2")
    assert change.before["macs"] == change.after["macs"] == 32 * 9 * 16 * 60
