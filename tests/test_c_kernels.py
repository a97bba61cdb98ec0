"""C backend kernels at their edges, against onnxruntime: 1x1 convolutions tiled 4 channels x 4
pixels (channel and pixel counts that are not multiples of 4, in place across images) and the
zero-padded depthwise kernel (strides, dilations, asymmetric padding, 3x3 and 5x5 windows)."""

from __future__ import annotations

import numpy as np
from graphs import f32, init, model, rand
from onnx import helper

from onnxc.backends.c import compile_model
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
