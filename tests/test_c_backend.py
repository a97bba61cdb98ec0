"""C backend: generated C compiles with -Werror and matches onnxruntime; memory plan claims;
clustered weights read from codes; the export command's contract (files, atomicity, errors)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxc.backends.c import compile_model
from onnxc.backends.c.reference_models import ds_cnn, onnx2c_reference_bytes
from onnxc.backends.c.toolchain import build_generated, max_rel_error, run_generated
from onnxc.compiler import runtime
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.graph import GraphView
from onnxc.errors import OnnxcError

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
TOL = 1e-4  # max |C - onnxruntime| / max |onnxruntime|


def naive_peak_bytes(model: onnx.ModelProto, shapes: dict | None = None) -> int:
    """Peak bytes of simultaneously live intermediate tensors in the canonical model's node order,
    counted from the ONNX graph alone (independent of the C backend's planner)."""
    model = canonicalize(model, shapes or {})
    view = GraphView(model.graph)
    io = view.graph_inputs | view.graph_outputs
    first, last = {}, {}
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            if name in first:
                last[name] = i
        for name in node.output:
            if name and name not in io:
                first[name], last[name] = i, i
    size = {n: 4 * int(np.prod(view.static_shape(n))) for n in first}
    return max(sum(size[n] for n in first if first[n] <= i <= last[n]) for i in range(len(model.graph.node)))


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return np.load(SAMPLES / "digits_test.npz")["input"][:6]


@pytest.fixture(scope="module")
def samples_build(tmp_path_factory):
    names = ["mlp", "vgg", "resnet", "mobilenet"]
    models = {n: onnx.load(SAMPLES / f"{n}.onnx") for n in names}
    gens = [compile_model(models[n], n) for n in names]
    exe = build_generated(gens, tmp_path_factory.mktemp("samples"))
    return models, gens, exe


def test_samples_compile_strict_and_match_onnxruntime(samples_build, digits):
    models, gens, exe = samples_build
    for k, gen in enumerate(gens):
        ref = runtime.run(models[gen.prog.name], {"input": digits})["logits"]
        for i in range(len(digits)):  # the generated program runs one image at a time
            got = run_generated(exe, k, gen, {"input": digits[i:i + 1]})["logits"]
            assert max_rel_error(got, ref[i:i + 1]) <= TOL, gen.prog.name


def test_arena_at_most_naive_peak_and_lower_with_inplace(samples_build):
    models, gens, _ = samples_build
    for gen in gens:
        peak = naive_peak_bytes(models[gen.prog.name])
        assert gen.arena_bytes <= peak, (gen.prog.name, gen.arena_bytes, peak)
    mobilenet = next(g for g in gens if g.prog.name == "mobilenet")
    # depthwise and 1x1 convolutions and residual adds run in place there
    assert mobilenet.report()["in_place_steps"]
    assert mobilenet.arena_bytes < 0.7 * naive_peak_bytes(models["mobilenet"])


def test_report_lists_each_tensor_with_offset_size_and_lifetime(samples_build):
    _, gens, _ = samples_build
    report = next(g for g in gens if g.prog.name == "resnet").report()
    assert report["arena_bytes"] > 0 and report["weight_bytes"] > 500_000
    arena = [t for t in report["tensors"] if t["location"] == "arena"]
    assert arena and all({"name", "offset", "bytes", "first_step", "last_step"} <= set(t) for t in arena)
    for t in arena:
        assert 0 <= t["offset"] and t["offset"] + t["bytes"] <= report["arena_bytes"]
        assert t["first_step"] <= t["last_step"]
    # tensors alive at the same steps in different buffers never overlap in memory
    for a in arena:
        for b in arena:
            if a["buffer"] == b["buffer"] or a["last_step"] < b["first_step"] or b["last_step"] < a["first_step"]:
                continue
            assert a["offset"] + a["bytes"] <= b["offset"] or b["offset"] + b["bytes"] <= a["offset"], (a, b)


def test_ds_cnn_arena_under_48k_and_matches(tmp_path):
    model = ds_cnn(seed=0)
    gen = compile_model(model, "kws")
    assert gen.arena_bytes <= 48_000 < onnx2c_reference_bytes()
    assert gen.arena_bytes <= naive_peak_bytes(model)
    exe = build_generated([gen], tmp_path)
    xs = np.random.default_rng(0).standard_normal((3, 1, 49, 10)).astype(np.float32)
    ref = runtime.run(model, {"input": xs})["logits"]  # batch dim fixed to 1: runtime.run feeds one at a time
    for i in range(len(xs)):
        got = run_generated(exe, 0, gen, {"input": xs[i:i + 1]})["logits"]
        assert max_rel_error(got, ref[i:i + 1]) <= TOL


def _clustered_model() -> onnx.ModelProto:
    """Conv with 4-bit per-channel codebooks (UINT4 codes, opset 21), a 1x1 Conv with one 4-bit
    codebook and rows of odd length (runs in place), Gemm (transB=0) with one shared 200-entry
    codebook (UINT8 codes), then a plain MatMul."""
    rng = np.random.default_rng(3)
    inits, nodes = [], []
    conv_codes = rng.integers(0, 16, (7, 4, 3, 3)).astype(np.uint8)  # 7 output channels x 16 codes
    inits += [helper.make_tensor("conv_codes", TensorProto.UINT4, conv_codes.shape, conv_codes.reshape(-1).tolist()),
              numpy_helper.from_array(rng.standard_normal(7 * 16).astype(np.float32), "conv_book"),
              numpy_helper.from_array((np.arange(7, dtype=np.int32) * 16).reshape(7, 1, 1, 1), "conv_rows"),
              numpy_helper.from_array(rng.standard_normal(7).astype(np.float32), "conv_b")]
    nodes += [helper.make_node("Cast", ["conv_codes"], ["conv_idx0"], to=TensorProto.INT32),
              helper.make_node("Add", ["conv_idx0", "conv_rows"], ["conv_idx"]),
              helper.make_node("Gather", ["conv_book", "conv_idx"], ["conv_w"], axis=0),
              helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"])]
    pw_codes = rng.integers(0, 16, (5, 7, 1, 1)).astype(np.uint8)
    inits += [helper.make_tensor("pw_codes", TensorProto.UINT4, pw_codes.shape, pw_codes.reshape(-1).tolist()),
              numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "pw_book")]
    nodes += [helper.make_node("Cast", ["pw_codes"], ["pw_idx"], to=TensorProto.INT32),
              helper.make_node("Gather", ["pw_book", "pw_idx"], ["pw_w"], axis=0),
              helper.make_node("Conv", ["r", "pw_w"], ["pw"], name="pw"),
              helper.make_node("Flatten", ["pw"], ["f"])]
    gemm_codes = rng.integers(0, 200, (180, 10)).astype(np.uint8)  # W [K=5*6*6, N=10]
    inits += [numpy_helper.from_array(gemm_codes, "gemm_codes"),
              numpy_helper.from_array(rng.standard_normal(200).astype(np.float32) * 0.1, "gemm_book")]
    nodes += [helper.make_node("Cast", ["gemm_codes"], ["gemm_idx"], to=TensorProto.INT32),
              helper.make_node("Gather", ["gemm_book", "gemm_idx"], ["gemm_w"], axis=0),
              helper.make_node("Gemm", ["f", "gemm_w"], ["g"], name="gemm")]
    inits += [numpy_helper.from_array(rng.standard_normal((10, 10)).astype(np.float32), "mm_w")]
    nodes += [helper.make_node("MatMul", ["g", "mm_w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "clustered", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_clustered_weights_stay_codes_in_flash(tmp_path):
    model = _clustered_model()
    gen = compile_model(model, "clu")
    report = gen.report()
    assert report["clustered_weights"] == 3
    assert any(s.op == "Conv" and i in report["in_place_steps"] for i, s in enumerate(gen.prog.steps)
               if s.node == "pw")
    exe = build_generated([gen], tmp_path)
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32)
    got = run_generated(exe, 0, gen, {"x": x})["y"]
    assert max_rel_error(got, runtime.run(model, {"x": x})["y"]) <= TOL
    source = (tmp_path / "clu.c").read_text()
    float_arrays = [int(n) for n in re.findall(r"union \{ uint32_t u\[(\d+)\]", source)]
    # no dense float copy of any clustered weight, in flash or RAM; codes are uint8 arrays
    assert not {7 * 4 * 9, 5 * 7, 180 * 10} & set(float_arrays)
    byte_arrays = [int(n) for n in re.findall(r"static const uint8_t \w+\[(\d+)\]", source)]
    assert sorted(byte_arrays) == sorted([(7 * 4 * 9) // 2, (5 * 7 + 1) // 2, 180 * 10])  # 4-bit: 2 per byte
    # activations only, no weight-sized scratch: the 7x6x6 conv output, the 10 Gemm outputs and
    # the in-place 1x1 conv's scratch (four pixels' 5 outputs)
    assert gen.arena_bytes <= 4 * (7 * 36 + 10 + 4 * 5)
    dense_bytes = 4 * (7 * 4 * 9 + 5 * 7 + 180 * 10 + 100 + 7)
    assert report["weight_bytes"] < 0.5 * dense_bytes


def test_non_matching_gather_is_evaluated_to_dense(tmp_path):
    """A Gather whose codebook is 2-D is no clustered weight: folded to a dense const array."""
    rng = np.random.default_rng(1)
    table = rng.standard_normal((4, 6)).astype(np.float32)
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([2, 0, 3], np.int64), "rows")]
    nodes = [helper.make_node("Gather", ["table", "rows"], ["w"], axis=0),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    gen = compile_model(model, "g")
    assert gen.report()["clustered_weights"] == 0
    exe = build_generated([gen], tmp_path)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    assert max_rel_error(run_generated(exe, 0, gen, {"x": x})["y"], x @ table[[2, 0, 3]]) <= TOL


def test_weights_are_written_bit_exact(tmp_path):
    model = onnx.load(SAMPLES / "mlp.onnx")
    gen = compile_model(model, "mlp")
    gen.write(tmp_path)
    source = (tmp_path / "mlp.c").read_text()
    arrays = {}
    for m in re.finditer(r"union \{ uint32_t u\[\d+\]; float f\[\d+\]; \} (\w+) = \{\{\n(.*?)\n\}\};", source, re.S):
        arrays[m.group(1)] = np.array([int(t, 16) for t in m.group(2).replace("\n", "").split(",")], dtype=np.uint64)
    bits = {a.tobytes() for a in (v.astype("<u4") for v in arrays.values())}
    view = GraphView(model.graph)
    checked = 0
    for name in view.initializers:
        w = view.const(name)
        if w.dtype != np.float32:
            continue
        layouts = [w, w.T] if w.ndim == 2 else [w]
        assert any(np.ascontiguousarray(v).view("<u4").tobytes() in bits for v in layouts), name
        checked += 1
    assert checked >= 6


def test_input_shape_fixes_batch(tmp_path, digits):
    """Batch 3 through MobileNet: the in-place depthwise and 1x1 kernels across images too."""
    model = onnx.load(SAMPLES / "mobilenet.onnx")
    gen = compile_model(model, "mb3", input_shapes={"input": [3, 1, 16, 16]})
    assert gen.prog.shapes["logits"] == (3, 10)
    assert {"onnxc_depthwise_inplace", "onnxc_conv1x1_tiled_inplace"} <= {
        c.fn for s in gen.plan.inplace for c in gen.prog.steps[s].inplace_calls}
    exe = build_generated([gen], tmp_path)
    x = digits[:3]
    got = run_generated(exe, 0, gen, {"input": x})["logits"]
    assert max_rel_error(got, runtime.run(model, {"input": x})["logits"]) <= TOL


def _inplace_chain() -> onnx.ModelProto:
    """Ops that run in place or as views, back to back, with broadcasting and a split/concat."""
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w")
    s = numpy_helper.from_array(rng.standard_normal((1, 8, 1, 1)).astype(np.float32), "s")
    shape = numpy_helper.from_array(np.array([1, 8, 49], np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Mul", ["p", "s"], ["m"]),
             helper.make_node("Sigmoid", ["m"], ["sg"]),
             helper.make_node("AveragePool", ["sg"], ["ap"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
             helper.make_node("Split", ["ap"], ["a", "b"], axis=1, num_outputs=2),
             helper.make_node("Tanh", ["a"], ["ta"]),
             helper.make_node("Concat", ["b", "ta"], ["cat"], axis=1),
             helper.make_node("Reshape", ["cat", "shape"], ["rs"]),
             helper.make_node("Softmax", ["rs"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 14, 14])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 49])], [w, s, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def test_in_place_and_view_chain_matches(tmp_path):
    model = _inplace_chain()
    gen = compile_model(model, "chain")
    assert gen.report()["in_place_steps"]
    assert gen.arena_bytes < naive_peak_bytes(model)
    exe = build_generated([gen], tmp_path)
    x = np.random.default_rng(2).standard_normal((1, 3, 14, 14)).astype(np.float32)
    got = run_generated(exe, 0, gen, {"x": x})["y"]
    assert max_rel_error(got, runtime.run(model, {"x": x})["y"]) <= TOL


def test_export_is_deterministic(tmp_path):
    from onnxc.api import export

    for d in ("a", "b"):
        export(SAMPLES / "resnet.onnx", "c", tmp_path / d, name="net")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_optimize_with_cluster_pass_lowers_codes_to_c(tmp_path):
    """The real cluster pass, then the C backend through `optimize(backend="c")`."""
    from onnxc.api import optimize
    from onnxc.backends.c.toolchain import HarnessModel, build_host, harness, run_host

    out = tmp_path / "gen"
    result = optimize(SAMPLES / "mobilenet.onnx", passes=["cluster:bits=4,min_size=256"],
                      calibration=SAMPLES / "digits_calib.npz", output=out, backend="c")
    report = result.report.backend
    assert report["clustered_weights"] >= 10
    assert report["weight_bytes"] < 0.25 * compile_model(onnx.load(SAMPLES / "mobilenet.onnx")).weight_bytes
    (out / "main.c").write_text(harness([HarnessModel("net", [256], [10])]))
    exe = build_host(sorted(out.glob("*.c")), tmp_path / "prog", include=[out])
    x = np.load(SAMPLES / "digits_test.npz")["input"][:1]
    got = run_host(exe, 0, [x], [10])[0]
    assert max_rel_error(got, runtime.run(result.model, {"input": x})["logits"].reshape(-1)) <= TOL


# ---- the export command -----------------------------------------------------------------------
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxc", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_export_writes_header_and_sources(tmp_path):
    out = tmp_path / "gen"
    proc = _cli("export", str(SAMPLES / "mlp.onnx"), "--backend", "c", "-o", str(out), "--name", "net", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    header = (out / "net.h").read_text()
    for macro in ("NET_INPUT_SIZE 256", "NET_OUTPUT_SIZE 10", "NET_ARENA_BYTES", "NET_WEIGHT_BYTES"):
        assert macro in header
    assert "int net_run(const float *input, float *output);" in header
    source = (out / "net.c").read_text()
    assert "malloc" not in source and "fopen" not in source and "stdio" not in source
    assert {p.name for p in out.iterdir()} >= {"net.h", "net.c", "onnxc_kernels.h", "onnxc_dense.c"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def _unsupported_model(path: Path) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Einsum", ["r", "r"], ["y"], name="my_einsum", equation="ij,ij->ij")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)


def test_unsupported_op_names_op_and_node_and_leaves_nothing(tmp_path):
    _unsupported_model(tmp_path / "bad.onnx")
    out = tmp_path / "gen"
    proc = _cli("export", str(tmp_path / "bad.onnx"), "--backend", "c", "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Einsum" in lines[0] and "my_einsum" in lines[0], proc.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_failed_export_keeps_previous_output(tmp_path):
    from onnxc.api import export

    out = tmp_path / "gen"
    export(SAMPLES / "mlp.onnx", "c", out, name="net")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _unsupported_model(tmp_path / "bad.onnx")
    with pytest.raises(OnnxcError, match="Einsum"):
        export(tmp_path / "bad.onnx", "c", out, name="net")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    report = export(SAMPLES / "vgg.onnx", "c", out, name="net")  # replacing works too
    assert "onnxc_conv.c" in report["files"] and (out / "onnxc_conv.c").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "gen"]
