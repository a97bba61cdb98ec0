"""onnxruntime backend: offline-optimized .onnx, .ort format, int8 (static, dynamic, --max-error), bench."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import f32, init, model
from onnx import helper
from sample_data import CALIBRATION, accuracy, sample_path

from onnxc import api
from onnxc.backends import ExportOptions
from onnxc.backends import export as backend_export
from onnxc.backends import ort as ort_backend
from onnxc.compiler.bench import bench, table
from onnxc.compiler.calibration import make_calibration
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.model import load, save
from onnxc.errors import OnnxcError, UsageError, VerificationError

VGG = sample_path("vgg")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ort")


@pytest.fixture(scope="module")
def vgg_int8(out_dir) -> tuple[Path, dict]:
    out = out_dir / "vgg_int8.onnx"
    return out, api.export(VGG, "onnxruntime", out, int8="static", calibration=CALIBRATION)


def _outputs(path_or_model, x: np.ndarray) -> np.ndarray:
    source = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _test_inputs(n=200) -> np.ndarray:
    from sample_data import load_test_set

    return load_test_set()[0][:n]


# ------------------------------------------------------------------ int8 on the VGG sample


def test_vgg_int8_keeps_accuracy_and_shrinks_file(vgg_int8):
    out, report = vgg_int8
    float_acc, int8_acc = accuracy(VGG), accuracy(out)
    assert int8_acc >= float_acc - 0.5, (float_acc, int8_acc)
    assert out.stat().st_size <= 0.3 * VGG.stat().st_size
    assert report["file_bytes"] == out.stat().st_size
    assert report["int8"] == "static" and report["quant_format"] == "QDQ" and report["per_channel"]
    assert report["fidelity"]["top1"] >= 0.97 and 0 < report["fidelity"]["rel_l2"] < 0.05
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


def test_int8_runs_in_onnxruntime_as_close_as_its_own_arithmetic():
    """Whatever this CPU's int8 kernels (x86 without VNNI saturates u8 x s8 pair sums), the exported
    model's error in onnxruntime stays within 2x its QDQ arithmetic's: 8-bit weights where the
    kernels are exact, 7-bit (reduce_range) where they saturate; forcing 8 bits is kept as asked."""
    from onnxc.backends.ort_quant import Scorer, quantize

    model = canonicalize(onnx.load(sample_path("resnet")))
    cal = make_calibration(model, CALIBRATION, seed=0)
    q = quantize(model, "static", cal)
    scorer = Scorer(model, cal.validation)
    fused, exact = scorer(q.model).surrogate, scorer.exact(q.model).surrogate
    assert fused <= 2 * exact + 0.005, (fused, exact, q.reduce_range)
    assert q.reduce_range == any("saturate" in n for n in q.notes)
    forced = quantize(model, "static", cal, reduce_range=False)
    assert not forced.reduce_range and not any("saturate" in n for n in forced.notes)


def test_export_is_deterministic(vgg_int8, out_dir):
    out, _ = vgg_int8
    again = out_dir / "vgg_int8_again.onnx"
    api.export(VGG, "onnxruntime", again, int8="static", calibration=CALIBRATION)
    assert again.read_bytes() == out.read_bytes()


def test_ort_format_loads_and_matches_onnx(vgg_int8, out_dir):
    x = _test_inputs()
    for int8 in (None, "static"):
        ort_file = out_dir / f"vgg_{int8}.ort"
        onnx_file = vgg_int8[0] if int8 else out_dir / "vgg_float.onnx"
        if not int8:
            api.export(VGG, "onnxruntime", onnx_file)
        report = api.export(VGG, "onnxruntime", ort_file, int8=int8, calibration=CALIBRATION)
        assert report["format"] == "ort" and ort_file.read_bytes()[4:8] == b"ORTM"  # flatbuffer identifier
        got, want = _outputs(ort_file, x), _outputs(onnx_file, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    assert not list(out_dir.glob(".*")), "temporary files left behind"


def test_levels_give_loadable_equivalent_models(out_dir):
    x = _test_inputs(64)
    ref = _outputs(VGG, x)
    for level in ("portable", "machine"):
        out = out_dir / f"vgg_{level}.onnx"
        report = api.export(VGG, "onnxruntime", out, level=level)
        assert report["level"] == level and report["fidelity"]["rel_l2"] < 1e-5
        np.testing.assert_allclose(_outputs(out, x), ref, rtol=1e-4, atol=1e-4)
    portable = onnx.load(str(out_dir / "vgg_portable.onnx"))
    assert {n.domain for n in portable.graph.node} == {""}, "portable: standard ops only"
    assert [o.domain for o in portable.opset_import] == [""]
    onnx.checker.check_model(portable, full_check=True)
    if platform.machine().lower() in ("x86_64", "amd64"):  # NCHWc layouts for this CPU's vector width
        assert "com.microsoft.nchwc" in {n.domain for n in onnx.load(str(out_dir / "vgg_machine.onnx")).graph.node}


# ------------------------------------------------------------------ the chain: prune / cluster, then int8


@pytest.fixture(scope="module")
def pruned() -> onnx.ModelProto:
    return api.optimize(VGG, passes=["prune:ratio=0.5"], calibration=CALIBRATION).model


@pytest.fixture(scope="module")
def clustered(pruned) -> onnx.ModelProto:
    return api.optimize(pruned, passes=["cluster:bits=4"], calibration=CALIBRATION).model


def test_pruned_then_int8_keeps_accuracy(pruned, out_dir):
    out = out_dir / "pruned_int8.onnx"
    report = api.export(pruned, "onnxruntime", out, int8="static", calibration=CALIBRATION)
    assert report["fidelity"]["top1"] >= 0.95
    assert accuracy(out) >= accuracy(VGG) - 1.5
    assert out.stat().st_size < 0.15 * VGG.stat().st_size


def test_pruned_and_clustered_model_quantizes_and_runs(clustered, out_dir):
    assert any(n.op_type == "Gather" for n in clustered.graph.node), "expected codebook weights"
    out = out_dir / "pruned_clustered_int8.onnx"
    report = api.export(clustered, "onnxruntime", out, int8="static", calibration=CALIBRATION)
    x = _test_inputs()
    assert np.mean(_outputs(out, x).argmax(1) == _outputs(clustered, x).argmax(1)) >= 0.97
    assert report["fidelity"]["rel_l2"] < 0.1
    assert accuracy(out) >= accuracy(VGG) - 1.5
    assert any("codebook" in note for note in report["notes"])
    assert out.stat().st_size < 0.15 * VGG.stat().st_size


def test_float_export_keeps_codebooks(clustered, out_dir):
    """Offline constant folding would decode the codes into dense float weights in the file."""
    source = out_dir / "clustered.onnx"
    save(clustered, source)
    out = out_dir / "clustered_portable.onnx"
    report = api.export(source, "onnxruntime", out)
    assert report["fidelity"]["rel_l2"] < 1e-6
    assert out.stat().st_size <= 1.02 * source.stat().st_size
    assert "Gather" in {n.op_type for n in onnx.load(str(out)).graph.node}
    ort_file = out_dir / "clustered.ort"  # the ORT format has no uint4: decoded, but loads and matches
    api.export(source, "onnxruntime", ort_file)
    x = _test_inputs(64)
    np.testing.assert_allclose(_outputs(ort_file, x), _outputs(out, x), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ --max-error: per-node sensitivity


def outlier_mlp() -> onnx.ModelProto:
    """Three MatMuls; the tensor between the first two has one channel 200x larger than the rest
    (compensated in the next weight), so quantizing that tensor per-tensor wipes out the others."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32) / 4
    w1[:, 0] *= 200
    w2 = rng.standard_normal((32, 32)).astype(np.float32) / 6
    w2[0, :] /= 200
    w3 = rng.standard_normal((32, 10)).astype(np.float32) / 6
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
             helper.make_node("MatMul", ["h1", "w2"], ["h2"], name="mm2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("MatMul", ["r2", "w3"], ["y"], name="mm3")]
    return model(nodes, [f32("x", ["N", 16])], [f32("y", ["N", 10])],
                 [init("w1", w1), init("w2", w2), init("w3", w3)])


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_max_error_excludes_the_sensitive_nodes(mode, tmp_path):
    m = canonicalize(outlier_mlp())
    cal = make_calibration(m, None, seed=0, random_count=128)
    plain = backend_export("onnxruntime", m, tmp_path / "a.onnx", ExportOptions(int8=mode, calibration=cal))
    assert plain["fidelity"]["rel_l2"] > 0.1 and plain["excluded_nodes"] == []
    budget = 0.02
    report = backend_export("onnxruntime", m, tmp_path / "b.onnx",
                            ExportOptions(int8=mode, calibration=cal, max_error=budget))
    assert report["fidelity"]["rel_l2"] <= budget
    assert "mm2" in report["excluded_nodes"] and "mm3" not in report["excluded_nodes"]
    assert set(report["sensitivity"]) == {"mm1", "mm2", "mm3"}
    assert report["sensitivity"]["mm2"] > 10 * report["sensitivity"]["mm3"]
    with pytest.raises(VerificationError, match="over the budget"):  # a float export is held to it too
        backend_export("onnxruntime", m, tmp_path / "c.onnx", ExportOptions(max_error=-1.0))
    assert not (tmp_path / "c.onnx").exists()
    quantized = {n.name for n in onnx.load(str(tmp_path / "b.onnx")).graph.node
                 if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")
                 or any(i.endswith("_DequantizeLinear_Output") for i in n.input)}
    assert any(name.startswith("mm3") for name in quantized), "the harmless layer stays int8"


def test_old_opset_is_raised_for_per_channel_scales(tmp_path):
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1)]
    old = model(nodes, [f32("x", ["N", 3, 8, 8])], [f32("y", ["N", 4])],
                [init("w", rng.standard_normal((16, 3, 3, 3)).astype(np.float32) / 5),
                 init("b", rng.standard_normal(16).astype(np.float32) / 10),
                 init("fw", rng.standard_normal((4, 16)).astype(np.float32) / 4),
                 init("fb", np.zeros(4, np.float32))], opset=9, ir=4)
    out = tmp_path / "old_int8.onnx"
    report = api.export(old, "onnxruntime", out, int8="static")
    assert report["per_channel"] and any("opset raised from 9 to 13" in n for n in report["notes"])
    assert report["fidelity"]["rel_l2"] < 0.05
    written = onnx.load(str(out))
    assert [o.version for o in written.opset_import if o.domain == ""] == [13]
    scales = [n for n in written.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w_quantized"]
    assert scales and helper.get_attribute_value(scales[0].attribute[0]) == 0  # axis: one scale per channel


# ------------------------------------------------------------------ dynamic int8 on a Gemm model


def test_dynamic_int8_quantizes_gemm_layers(tmp_path):
    mlp = sample_path("mlp")
    out = tmp_path / "mlp_dyn.onnx"
    report = api.export(mlp, "onnxruntime", out, int8="dynamic", calibration=CALIBRATION)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("MatMulInteger") == 3 and "Gemm" not in ops
    assert out.stat().st_size <= 0.3 * mlp.stat().st_size
    assert accuracy(out) >= accuracy(mlp) - 0.5
    assert report["int8"] == "dynamic"


# ------------------------------------------------------------------ bad input, atomic output


def test_bad_options_give_one_clear_error(tmp_path):
    m = canonicalize(load(VGG))
    cases = [(tmp_path / "x.txt", {}, UsageError, ".onnx or .ort"),
             (tmp_path / "x.onnx", {"level": "fast"}, UsageError, "level"),
             (tmp_path / "x.onnx", {"int8": "int4"}, UsageError, "static or dynamic"),
             (tmp_path / "missing" / "x.onnx", {}, OnnxcError, "does not exist")]
    for out, kwargs, error, text in cases:
        with pytest.raises(error, match=text) as info:
            backend_export("onnxruntime", m, out, ExportOptions(**kwargs))
        assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_failure_leaves_no_output(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OnnxcError("simulated failure")

    monkeypatch.setattr(ort_backend, "_fidelity", broken)
    out = tmp_path / "x.onnx"
    with pytest.raises(OnnxcError, match="simulated"):
        backend_export("onnxruntime", canonicalize(load(VGG)), out, ExportOptions())
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ bench


def test_bench_side_by_side(vgg_int8, out_dir):
    x = {"input": _test_inputs(8)}
    fixed = canonicalize(load(VGG), {"input": [2, 1, 16, 16]})  # fixed batch: gets the first rows
    timings = bench([VGG, vgg_int8[0], fixed], x, labels=["float", "int8", "fixed"], runs=5, warmup=1)
    assert [t.label for t in timings] == ["float", "int8", "fixed"]
    assert timings[0].ratio == 1.0 and all(t.runs == 5 for t in timings)
    assert all(0 < t.p10_ms <= t.median_ms <= t.p90_ms for t in timings)
    assert all(t.ratio == pytest.approx(t.median_ms / timings[0].median_ms) for t in timings)
    assert "int8" in table(timings)
    with pytest.raises(OnnxcError, match="no input 'input'"):
        bench([VGG], {"x": x["input"]}, runs=1, warmup=0)


def test_per_axis_scales_point_at_their_dim():
    """onnxruntime's quantizer writes a [1, C] Gemm bias with C scales on axis 0 (magika): the
    model only runs where its fused kernels skip the DequantizeLinear. The repaired one runs
    unfused and computes the same outputs as the fused run."""
    from onnxc.backends.ort_quant import repair_per_axis

    rng = np.random.default_rng(0)
    c = 6
    nodes = [helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["b"], axis=0, name="dq"),
             helper.make_node("Add", ["x", "b"], ["y"], name="add")]
    inits = [init("bq", rng.integers(-100, 100, (1, c)).astype(np.int32)),
             init("bs", rng.uniform(0.01, 0.1, c).astype(np.float32)), init("bz", np.zeros(c, np.int32))]
    broken = model(nodes, [f32("x", [2, c])], [f32("y", [2, c])], inits, opset=13, ir=7)
    x = rng.standard_normal((2, c)).astype(np.float32)
    with pytest.raises(Exception, match="per axis"):
        _outputs(broken, x)
    fixed = repair_per_axis(broken)
    assert [a.i for a in fixed.graph.node[0].attribute if a.name == "axis"] == [1]
    q = np.asarray(onnx.numpy_helper.to_array(inits[0]), np.float32)
    expected = x + q * onnx.numpy_helper.to_array(inits[1])
    np.testing.assert_allclose(_outputs(fixed, x), expected, rtol=1e-6)
