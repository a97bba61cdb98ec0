"""One definition of an int8 region (`compiler.int8_regions`) for the allocator's int8 candidates
(float graph) and the export's back-off (QDQ graph): a branch stays with its layer, a residual
Add goes to the block it closes, an op the quantizer leaves float ends a region."""

from __future__ import annotations

import numpy as np
import onnx
from graphs import f32, init, model
from onnx import helper

from onnxc.backends.ort_quant import quantized_nodes
from onnxc.backends.quant_budget import regions as export_regions
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.int8_regions import QDQ_OPS
from onnxc.compiler.passes import create

# conv1 -> x * clip(x + 3) (reads conv1's output twice) -> conv2 -> relu -> Add(skip, relu): the
# skip path's region is the Add's first input -> relu -> conv3 -> HardSwish (onnxruntime leaves it
# float) -> GlobalAveragePool -> Flatten -> Gemm -> Softmax.
PLAN = {"conv1": ["conv1", "add3", "clip", "hswish"],
        "conv2": ["conv2", "relu2", "residual", "relu3"],
        "conv3": ["conv3"],
        "fc": ["fc", "softmax"]}


def branchy() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    node = helper.make_node
    nodes = [node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             node("Add", ["c1", "three"], ["a"], name="add3"),
             node("Clip", ["a", "zero", "six"], ["cl"], name="clip"),
             node("Mul", ["c1", "cl"], ["h"], name="hswish"),
             node("Conv", ["h", "w2"], ["c2"], name="conv2"),
             node("Relu", ["c2"], ["r2"], name="relu2"),
             node("Add", ["h", "r2"], ["s"], name="residual"),
             node("Relu", ["s"], ["t"], name="relu3"),
             node("Conv", ["t", "w3"], ["c3"], name="conv3"),
             node("HardSwish", ["c3"], ["u"], name="hardswish"),
             node("GlobalAveragePool", ["u"], ["g"], name="pool"),
             node("Flatten", ["g"], ["f"], name="flatten"),
             node("Gemm", ["f", "wf"], ["logits"], name="fc"),
             node("Softmax", ["logits"], ["y"], name="softmax", axis=1)]
    scalars = [init("three", np.float32(3)), init("zero", np.float32(0)), init("six", np.float32(6))]
    return model(nodes, [f32("x", [1, 4, 6, 6])], [f32("y", [1, 3])],
                 [init("w1", w(4, 4, 3, 3)), init("w2", w(4, 4, 1, 1)), init("w3", w(4, 4, 1, 1)),
                  init("wf", w(4, 3)), *scalars])


def with_qdq(float_model: onnx.ModelProto) -> onnx.ModelProto:
    """`float_model` as a QDQ export writes it: every activation read through QuantizeLinear ->
    DequantizeLinear, every weight through a DequantizeLinear of an int8 initializer."""
    graph = float_model.graph
    weights = {t.name for t in graph.initializer if len(t.dims) >= 2}
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    nodes, inits = [], [t for t in graph.initializer if t.name not in weights]
    inits += [init("s", np.float32(0.1)), init("z", np.uint8(128)), init("zw", np.int8(0))]
    for n in graph.node:
        inputs = []
        for i in n.input:
            if i in weights:
                shape = next(t.dims for t in graph.initializer if t.name == i)
                inits.append(init(f"{i}_q", np.zeros(shape, np.int8)))
                nodes.append(helper.make_node("DequantizeLinear", [f"{i}_q", "s", "zw"], [f"{i}_dq"]))
                inputs.append(f"{i}_dq")
            elif i in produced:
                nodes += [helper.make_node("QuantizeLinear", [i, "s", "z"], [f"{i}_{n.name}_q"]),
                          helper.make_node("DequantizeLinear", [f"{i}_{n.name}_q", "s", "z"], [f"{i}_{n.name}_dq"])]
                inputs.append(f"{i}_{n.name}_dq")
            else:
                inputs.append(i)
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        del copy.input[:]
        copy.input.extend(inputs)
        nodes.append(copy)
    return model(nodes, list(graph.input), list(graph.output), inits)


def test_the_allocator_candidates_follow_branches_and_give_the_residual_add_to_its_block():
    m = canonicalize(branchy())
    assert [n.name for n in m.graph.node] == [n.name for n in branchy().graph.node]
    found = {c.name: list(c.nodes) for c in create("int8").plan_candidates(m)}
    # the head holds under MIN_SHARE of the MACs: planned with the region before it (not connected)
    assert found == {**{k: v for k, v in PLAN.items() if k != "fc"}, "conv3": PLAN["conv3"] + PLAN["fc"]}
    # conv2 kept float: its Relu joins nothing, and the residual Add has only the skip path's region.
    without = {c.name: list(c.nodes) for c in create("int8", {"exclude": ["conv2"]}).plan_candidates(m)}
    assert without == {"conv1": [*PLAN["conv1"], "residual", "relu3"], "conv3": ["conv3", "fc", "softmax"]}


def test_the_export_groups_the_qdq_graph_as_the_planner_groups_the_float_graph():
    qdq = with_qdq(branchy())
    assert sum(n.op_type in QDQ_OPS for n in qdq.graph.node) > 20
    candidates = quantized_nodes(qdq)
    assert set(candidates) == {n.name for n in branchy().graph.node}
    # In the quantized graph every node that reads a dequantized tensor is int8, HardSwish too
    # (here), so what follows conv3 joins it; the rest is the planner's grouping.
    expected = {**PLAN, "conv3": ["conv3", "hardswish", "pool", "flatten"]}
    assert export_regions(qdq, candidates) == expected
    # A candidate that joins no region opens its own; nodes that are no candidates still link.
    assert export_regions(qdq, ["add3", "relu3", "softmax"]) == {"add3": ["add3", "relu3"], "softmax": ["softmax"]}
    assert export_regions(qdq, ["conv2", "relu3"]) == {"conv2": ["conv2", "relu3"]}
