"""Small ONNX graphs built in code for the core tests (no torch, no downloads)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR = 8


def model(nodes, inputs, outputs, initializers=(), opset=OPSET, ir=IR, **kwargs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)
    m.ir_version = ir
    return m


def f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def rand(rng, *shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def constant_node_cnn(seed=0) -> onnx.ModelProto:
    """A Paddle-style CNN: weights in Constant nodes, BN after conv, symbolic batch, Dropout."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=init("w1v", rand(rng, 8, 3, 3, 3))),
        helper.make_node("Constant", [], ["b1"], value=init("b1v", rand(rng, 8))),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Constant", [], ["s"], value=init("sv", rng.uniform(0.5, 1.5, 8).astype(np.float32))),
        helper.make_node("Constant", [], ["t"], value=init("tv", rand(rng, 8))),
        helper.make_node("Constant", [], ["m"], value=init("mv", rand(rng, 8))),
        helper.make_node("Constant", [], ["v"], value=init("vv", rng.uniform(0.5, 2, 8).astype(np.float32))),
        helper.make_node("BatchNormalization", ["c1", "s", "t", "m", "v"], ["bn1"], name="bn1", epsilon=1e-3),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Dropout", ["r1"], ["d1"], name="drop"),
        helper.make_node("Identity", ["d1"], ["i1"], name="ident"),
        helper.make_node("GlobalAveragePool", ["i1"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Constant", [], ["fw"], value=init("fwv", rand(rng, 8, 5))),
        helper.make_node("MatMul", ["flat", "fw"], ["y"], name="fc"),
    ]
    return model(nodes, [f32("x", ["N", 3, 8, 8])], [f32("y", ["N", 5])], producer_name="paddle-like",
                 doc_string="built in tests")


def if_model() -> onnx.ModelProto:
    """A graph with an If whose branches read an outer-scope tensor."""
    then_g = helper.make_graph([helper.make_node("Relu", ["h"], ["t_out"])], "then", [], [f32("t_out", ["N", 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["h"], ["e_out"])], "else", [], [f32("e_out", ["N", 4])])
    nodes = [
        helper.make_node("Constant", [], ["w"], value=init("wv", np.eye(4, dtype=np.float32) * 2)),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
        helper.make_node("Constant", [], ["zero"], value=init("zv", np.array(0, np.float32))),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g),
    ]
    return model(nodes, [f32("x", [1, 4])], [f32("y", ["N", 4])])


def conv_integer_model(seed=0) -> onnx.ModelProto:
    """An already-quantized graph: QuantizeLinear -> ConvInteger -> Cast -> Mul (scale)."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-100, 100, (4, 2, 3, 3)).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
        helper.make_node("ConvInteger", ["xq", "w", "xz", "wz"], ["acc"], name="convint"),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul", ["accf", "scale"], ["y"], name="rescale"),
    ]
    inits = [init("xs", np.array(0.05, np.float32)), init("xz", np.array(0, np.uint8).astype(np.uint8)),
             init("w", w), init("wz", np.array(0, np.int8)), init("scale", np.array(0.05 * 0.01, np.float32))]
    # ConvInteger needs uint8 input with uint8 zero point.
    return model(nodes, [f32("x", ["N", 2, 6, 6])], [f32("y", ["N", 4, 4, 4])], inits, opset=13)


def lstm_model(seed=0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    hidden, inp = 6, 5
    inits = [init("W", rand(rng, 1, 4 * hidden, inp)), init("R", rand(rng, 1, 4 * hidden, hidden)),
             init("B", rand(rng, 1, 8 * hidden))]
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y", "Y_h"], name="lstm", hidden_size=hidden),
             helper.make_node("Squeeze", ["Y_h", "ax"], ["y"], name="sq")]
    inits.append(init("ax", np.array([0], np.int64)))
    return model(nodes, [f32("x", ["T", "N", inp])], [f32("y", ["N", hidden])], inits, opset=14)


def chain(n: int, width: int = 4, seed: int = 0) -> onnx.ModelProto:
    """n alternating MatMul/Relu nodes (a long, deep graph), nodes listed in reverse order."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i in range(n // 2):
        inits.append(init(f"w{i}", (np.eye(width) + rand(rng, width, width, scale=0.01)).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"], name="out"))
    return model(list(reversed(nodes)), [f32("x", ["N", width])], [f32("y", ["N", width])], inits)


def randomize_weights(m: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace float initializers by random values with sane scales (in place; returns `m`).

    The onnx package's `light` models are constant-filled: every channel ties and every output is
    trivial. Conv/Gemm/MatMul weights get He scaling, BatchNormalization gets plausible statistics
    (positive variance), everything else small noise.
    """
    rng = np.random.default_rng(seed)
    role: dict[str, tuple[str, int]] = {}
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            role.setdefault(name, (node.op_type, i))
    for t in m.graph.initializer:
        if t.data_type != TensorProto.FLOAT or not len(t.dims):
            continue
        shape = tuple(t.dims)
        op, idx = role.get(t.name, ("", -1))
        if op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and idx == 1 and len(shape) >= 2:
            fan_in = int(np.prod(shape[1:])) if op in ("Conv", "ConvTranspose") else shape[0]
            if op == "Gemm" and len(shape) == 2:
                fan_in = min(shape)
            new = rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))
        elif op == "BatchNormalization" and idx == 1:
            new = rng.uniform(0.5, 1.0, shape)
        elif op == "BatchNormalization" and idx == 4:
            new = rng.uniform(0.5, 1.5, shape)
        else:
            new = rng.standard_normal(shape) * 0.1
        t.CopyFrom(numpy_helper.from_array(new.astype(np.float32), t.name))
    return m
