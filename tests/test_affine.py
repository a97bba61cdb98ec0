"""Constant scales and shifts folded into convolutions (`compiler.affine`, run by canonicalization):
the folded graph has fewer nodes and computes what the original did, to float rounding."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxc.compiler import runtime
from onnxc.compiler.affine import fold_affine
from onnxc.compiler.canonical import canonicalize

RNG = np.random.default_rng(0)
ROUNDING = 1e-5  # relative L2 that reordered float32 products may move an output


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _conv(name: str, x: str, y: str, cin: int, cout: int, k: int = 1, pads: int = 0, group: int = 1):
    w = RNG.normal(size=(cout, cin // group, k, k)).astype(np.float32)
    b = RNG.normal(size=cout).astype(np.float32)
    node = helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [y], name=name, pads=[pads] * 4, group=group)
    return node, [_const(f"{name}_w", w), _const(f"{name}_b", b)]


def _model(nodes, inits, channels: int = 4, out_channels: int = 4) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, channels, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _folded(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy, fold_affine(copy.graph)


def _same_outputs(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    x = RNG.normal(size=(2, a.graph.input[0].type.tensor_type.shape.dim[1].dim_value, 6, 6)).astype(np.float32)
    ya, yb = runtime.run(a, {"x": x})["y"], runtime.run(b, {"x": x})["y"]
    assert ya.shape == yb.shape
    assert np.linalg.norm(ya - yb) <= ROUNDING * np.linalg.norm(ya)


def test_scale_and_shift_after_a_conv_fold_into_it():
    conv, inits = _conv("c", "x", "t", 4, 4, k=3, pads=1)
    nodes = [conv, helper.make_node("Mul", ["t", "s"], ["u"], name="mul"),
             helper.make_node("Add", ["k", "u"], ["v"], name="add"),  # constant first: order does not matter
             helper.make_node("Relu", ["v"], ["y"], name="relu")]
    model = _model(nodes, inits + [_const("s", RNG.uniform(0.5, 2, (1, 4, 1, 1))), _const("k", [0.3])])
    folded, lines = _folded(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]
    assert len(lines) == 2
    _same_outputs(model, folded)


@pytest.mark.parametrize("pads", [0, 1])
def test_scale_and_shift_before_a_grouped_conv(pads):
    """A scale before a Conv folds whatever its padding; a shift only when nothing is padded."""
    conv, inits = _conv("c", "v", "y", 4, 6, k=3, pads=pads, group=2)
    first, second = ("Mul", "Add") if pads == 0 else ("Add", "Mul")  # the op next to the Conv folds first
    nodes = [helper.make_node(first, ["x", "s" if first == "Mul" else "k"], ["u"], name="first"),
             helper.make_node(second, ["u", "s" if second == "Mul" else "k"], ["v"], name="second"), conv]
    scale, shift = _const("s", RNG.uniform(0.5, 2, (4, 1, 1))), _const("k", RNG.normal(size=(4, 1, 1)))
    model = _model(nodes, inits + [scale, shift])
    folded, _ = _folded(model)
    ops = [n.op_type for n in folded.graph.node]
    assert ops == (["Conv"] if pads == 0 else ["Add", "Conv"])
    _same_outputs(model, folded)


def test_hard_swish_with_an_affine_block_leaves_three_elementwise_ops():
    """x * clip(x + 3, 0, 6) / 6 * a + b before a pointwise conv: the Div, the scale and the shift go."""
    first, inits1 = _conv("c1", "x", "t", 4, 4, k=3, pads=1)
    second, inits2 = _conv("c2", "h4", "y", 4, 4)
    nodes = [first,
             helper.make_node("Add", ["t", "three"], ["h0"], name="add3"),
             helper.make_node("Clip", ["h0", "zero", "six"], ["h1"], name="clip"),
             helper.make_node("Mul", ["t", "h1"], ["h2"], name="mul"),
             helper.make_node("Div", ["h2", "six"], ["h3"], name="div"),
             helper.make_node("Mul", ["h3", "a"], ["h3a"], name="scale"),
             helper.make_node("Add", ["h3a", "b"], ["h4"], name="shift"), second]
    consts = [_const("three", 3.0), _const("zero", 0.0), _const("six", 6.0), _const("a", [1.7]), _const("b", [-0.2])]
    model = _model(nodes, inits1 + inits2 + consts)
    folded = canonicalize(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Add", "Clip", "Mul", "Conv"]
    _same_outputs(model, folded)


def test_shared_tensors_and_graph_outputs_are_kept():
    """An op whose input another node also reads is not folded backward; a folded op's output name survives."""
    conv, inits = _conv("c", "x", "t", 4, 4)
    nodes = [conv, helper.make_node("Mul", ["t", "s"], ["u"], name="mul"),
             helper.make_node("Relu", ["t"], ["r"], name="relu"),
             helper.make_node("Add", ["u", "r"], ["y"], name="sum")]
    model = _model(nodes, inits + [_const("s", [2.0])])
    folded, lines = _folded(model)
    assert lines == [] and len(folded.graph.node) == 4

    nodes = [conv, helper.make_node("Mul", ["t", "s"], ["y"], name="mul")]
    model = _model(nodes, inits + [_const("s", [2.0])])
    folded, lines = _folded(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"] and folded.graph.node[0].output[0] == "y"
    _same_outputs(model, folded)


def test_a_constant_that_broadcasts_the_shape_up_is_left_alone():
    """A Mul whose constant is not per channel (here per column) changes more than a Conv can absorb."""
    conv, inits = _conv("c", "x", "t", 4, 4)
    nodes = [conv, helper.make_node("Mul", ["t", "s"], ["y"], name="mul")]
    model = _model(nodes, inits + [_const("s", RNG.normal(size=(1, 1, 1, 6)))])
    folded, lines = _folded(model)
    assert lines == [] and [n.op_type for n in folded.graph.node] == ["Conv", "Mul"]
