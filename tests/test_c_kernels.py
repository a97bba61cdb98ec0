"""C backend kernels at their edges, against onnxruntime: 1x1 convolutions tiled 4 channels x 4
pixels (channel and pixel counts that are not multiples of 4, in place across images) and the
zero-padded depthwise kernel (strides, dilations, asymmetric padding, 3x3 and 5x5 windows)."""

from __future__ import annotations

import re

import numpy as np
from graphs import constant_node_cnn, f32, init, model, rand
from onnx import TensorProto, helper

from onnxc.backends.c import compile_model
from onnxc.backends.c.emitter import called_kernels
from onnxc.backends.c.toolchain import build_generated, max_rel_error, run_generated
from onnxc.compiler import runtime

TOL = 1e-5


def _conv_chain():
    rng = np.random.default_rng(3)
    nodes, inits = [], []

    def conv(x, y, cout, cin, k, relu=False, **kw):
        inits.extend([init(f"{y}_w", rand(rng, cout, cin, k, k)), init(f"{y}_b", rand(rng, cout))])
        out = f"{y}_pre" if relu else y
        nodes.append(helper.make_node("Conv", [x, f"{y}_w", f"{y}_b"], [out], name=y, **kw))
        if relu:
            nodes.append(helper.make_node("Relu", [out], [y], name=f"{y}_relu"))

    conv("x", "expand", 7, 3, 1, relu=True)                       # 1x1 out of place, 7 = 4 + 3 channels
    conv("expand", "dw1", 7, 1, 3, group=7, pads=[1, 0, 2, 1], strides=[2, 1])  # depthwise, asymmetric
    conv("dw1", "reduce", 5, 7, 1)                                # 1x1 in place, m < c
    conv("reduce", "dw2", 5, 1, 5, group=5, pads=[4, 4, 4, 4], dilations=[2, 2])
    conv("dw2", "dw3", 5, 1, 3, group=5, auto_pad="SAME_UPPER", strides=[2, 2])
    conv("dw3", "y", 6, 5, 1, relu=True)
    return model(nodes, [f32("x", [2, 3, 9, 7])], [f32("y", [2, 6, 3, 3])], inits)


def test_pointwise_and_depthwise_kernels_match_onnxruntime(tmp_path):
    m = _conv_chain()
    gen = compile_model(m, "convs")
    fns = {c.fn for s, st in enumerate(gen.prog.steps)
           for c in (st.inplace_calls if s in gen.plan.inplace else st.calls)}
    assert {"onnxc_conv1x1", "onnxc_conv1x1_tiled_inplace", "onnxc_depthwise_inplace"} <= fns
    exe = build_generated([gen], tmp_path)
    x = np.random.default_rng(4).standard_normal((2, 3, 9, 7)).astype(np.float32)
    got = run_generated(exe, 0, gen, {"x": x})["y"]
    ref = runtime.run(m, {"x": x})["y"]
    assert got.shape == ref.shape
    assert max_rel_error(got, ref) <= TOL


def test_only_called_kernel_functions_are_written(tmp_path):
    """Flash holds what runs: the written kernel files define exactly the public kernels the
    program calls (plus their static helpers), and a second model written to the same directory
    adds its own without removing the first one's."""
    def public(directory):
        return {name for f in directory.glob("onnxc_*.c")
                for name in re.findall(r"^void (onnxc_\w+)\(", f.read_text(), re.M)}

    gen = compile_model(_conv_chain(), "convs")
    gen.write(tmp_path)
    called = called_kernels(gen.prog, gen.plan)
    assert public(tmp_path) == called
    assert "onnxc_conv2d" not in called and not (tmp_path / "onnxc_conv.c").exists()
    other = compile_model(constant_node_cnn(), "cnn")
    other.write(tmp_path)
    assert public(tmp_path) == called | called_kernels(other.prog, other.plan)
    exe = build_generated([gen, other], tmp_path)  # both link against the merged kernel files
    x = np.random.default_rng(6).standard_normal((1, 3, 8, 8)).astype(np.float32)
    got = run_generated(exe, 1, other, {"x": x})["y"]
    assert max_rel_error(got, runtime.run(constant_node_cnn(), {"x": x})["y"]) <= TOL


def _clustered_pointwise():
    """1x1 convs whose weights stay k-means codes: 8-bit codes over 70 input channels (three
    decode chunks, out of place), then 4-bit per-row codebooks with rows of odd length (in place)."""
    rng = np.random.default_rng(7)
    nodes, inits = [], []

    def clustered_conv(x, y, cout, cin, bits, per_row):
        k = 1 << bits
        codes = rng.integers(0, k, (cout, cin, 1, 1)).astype(np.uint8)
        book = rng.standard_normal(k * (cout if per_row else 1)).astype(np.float32) * 0.2
        ctype = TensorProto.UINT4 if bits == 4 else TensorProto.UINT8
        inits.extend([helper.make_tensor(f"{y}_codes", ctype, codes.shape, codes.reshape(-1).tolist()),
                      init(f"{y}_book", book), init(f"{y}_b", rand(rng, cout))])
        nodes.append(helper.make_node("Cast", [f"{y}_codes"], [f"{y}_idx0"], to=TensorProto.INT32))
        idx = f"{y}_idx0"
        if per_row:
            inits.append(init(f"{y}_rows", (np.arange(cout, dtype=np.int32) * k).reshape(cout, 1, 1, 1)))
            nodes.append(helper.make_node("Add", [idx, f"{y}_rows"], [f"{y}_idx"]))
            idx = f"{y}_idx"
        nodes.append(helper.make_node("Gather", [f"{y}_book", idx], [f"{y}_w"], axis=0))
        nodes.append(helper.make_node("Conv", [x, f"{y}_w", f"{y}_b"], [y], name=y))

    clustered_conv("x", "a", 40, 70, 8, False)
    nodes.append(helper.make_node("Relu", ["a"], ["ar"]))
    clustered_conv("ar", "b", 33, 40, 4, True)
    clustered_conv("b", "y", 5, 33, 4, True)
    return model(nodes, [f32("x", [1, 70, 3, 3])], [f32("y", [1, 5, 3, 3])], inits, opset=21, ir=10)


def test_clustered_pointwise_kernels_match_onnxruntime(tmp_path):
    m = _clustered_pointwise()
    gen = compile_model(m, "cpw")
    assert gen.report()["clustered_weights"] == 3
    assert {"onnxc_conv1x1", "onnxc_conv1x1_tiled_inplace"} <= called_kernels(gen.prog, gen.plan)
    exe = build_generated([gen], tmp_path)
    x = np.random.default_rng(8).standard_normal((1, 70, 3, 3)).astype(np.float32)
    got = run_generated(exe, 0, gen, {"x": x})["y"]
    assert max_rel_error(got, runtime.run(m, {"x": x})["y"]) <= TOL
