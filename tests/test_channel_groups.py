"""Channel-group analysis on small graphs built with onnx.helper (and the builder the prune tests use)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxc.compiler.canonical import canonicalize
from onnxc.passes.channel_groups import analyze


class Net:
    """A tiny graph builder: every call appends nodes with seeded random weights, returns tensor names."""

    def __init__(self, seed: int = 0, opset: int = 17):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.opset = opset
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, value, base: str = "k") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, name: str | None = None, **attrs):
        name = name or self.name(op_type.lower())
        outs = [f"{name}_out{i}" if i else f"{name}_out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0] if outputs == 1 else outs

    def conv(self, x, cin, cout, k=3, stride=1, group=1, bias=True, name=None, dead=()):
        """Conv with He-scaled weights; channels in `dead` get zero filters and bias."""
        w = self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / (cin // group * k * k))
        b = self.rng.standard_normal(cout) * 0.1
        w[list(dead)] = 0
        b[list(dead)] = 0
        inputs = [x, self.const(w.astype(np.float32), "w")] + ([self.const(b.astype(np.float32), "b")] if bias else [])
        return self.op("Conv", inputs, name=name or self.name("conv"), kernel_shape=[k, k],
                       pads=[k // 2] * 4, strides=[stride, stride], group=group)

    def relu(self, x):
        return self.op("Relu", [x])

    def silu(self, x):
        return self.op("Mul", [x, self.op("Sigmoid", [x])])

    def gemm(self, x, fin, fout, name=None, dead=()):
        w = (self.rng.standard_normal((fout, fin)) * np.sqrt(2.0 / fin)).astype(np.float32)
        b = (self.rng.standard_normal(fout) * 0.1).astype(np.float32)
        w[list(dead)] = 0
        b[list(dead)] = 0
        return self.op("Gemm", [x, self.const(w, "w"), self.const(b, "b")], name=name or self.name("fc"), transB=1)

    def model(self, inputs: dict[str, list], outputs: list[str], canonical: bool = True) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "net",
            [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = 8
        inferred = onnx.shape_inference.infer_shapes(m).graph
        known = {v.name: v for v in list(inferred.value_info) + list(inferred.output)}
        for out in m.graph.output:
            out.CopyFrom(known[out.name])
        onnx.checker.check_model(m)
        return canonicalize(m) if canonical else m


def group_of(analysis, tensor):
    return analysis.groups[analysis.group_of[tensor]]


def test_chain_has_one_group_per_layer_and_freezes_the_output():
    n = Net()
    a = n.relu(n.conv("x", 3, 8, name="c1"))
    b = n.relu(n.conv(a, 8, 16, name="c2"))
    y = n.conv(b, 16, 4, name="c3")
    an = analyze(n.model({"x": [1, 3, 8, 8]}, [y]))
    g1, g2, g3 = group_of(an, a), group_of(an, b), group_of(an, y)
    assert (g1.producers, g1.consumers, g1.n_units) == (["c1"], ["c2"], 8)
    assert g1.prunable and g2.prunable and not g3.prunable
    assert any("graph output" in r for r in g3.frozen)
    assert g1.id != g2.id != g3.id


def test_residual_add_and_sum_share_one_kept_set():
    n = Net()
    a = n.relu(n.conv("x", 3, 8, name="stem"))
    r1 = n.op("Add", [a, n.conv(n.relu(n.conv(a, 8, 4, name="b1a")), 4, 8, name="b1b")])
    r2 = n.op("Sum", [r1, n.conv(r1, 8, 8, name="b2")])
    y = n.conv(n.relu(r2), 8, 2, name="head")
    an = analyze(n.model({"x": [1, 3, 8, 8]}, [y]))
    g = group_of(an, a)
    assert g is group_of(an, r1) is group_of(an, r2)
    assert g.producers == ["stem", "b1b", "b2"]
    assert set(g.consumers) == {"b1a", "b2", "head"}
    assert g.n_units == 8  # channel c of every member is one unit
    for units in g.tensors.values():
        assert np.array_equal(units, g.tensors[a])


def test_concat_maps_each_input_to_its_offset_and_split_slices_back():
    n = Net()
    a = n.conv("x", 3, 4, name="ca")
    b = n.conv("x", 3, 6, name="cb")
    cat = n.op("Concat", [a, b], axis=1)
    s1, s2 = n.op("Split", [cat, n.const(np.array([3, 7], np.int64))], outputs=2, axis=1)
    y1, y2 = n.conv(s1, 3, 2, name="u1"), n.conv(s2, 7, 2, name="u2")
    an = analyze(n.model({"x": [1, 3, 8, 8]}, [y1, y2]))
    g = group_of(an, cat)
    assert g is group_of(an, a) is group_of(an, s2)
    assert g.n_units == 10 and g.producers == ["ca", "cb"] and g.consumers == ["u1", "u2"]
    assert np.array_equal(g.tensors[cat], np.concatenate([g.tensors[a], g.tensors[b]]))
    assert np.array_equal(g.tensors[s2], g.tensors[cat][3:])


def test_depthwise_couples_input_and_output_and_flatten_maps_blocks():
    n = Net()
    a = n.relu(n.conv("x", 3, 6, name="expand"))
    d = n.relu(n.conv(a, 6, 6, group=6, name="dw"))
    f = n.op("Flatten", [n.op("MaxPool", [d], kernel_shape=[2, 2], strides=[2, 2])], axis=1)
    y = n.gemm(f, 6 * 16, 3, name="fc")
    an = analyze(n.model({"x": [1, 3, 8, 8]}, [y]))
    g = group_of(an, a)
    assert g is group_of(an, d) is group_of(an, f)
    assert g.producers == ["expand"] and g.consumers == ["fc"] and "dw" in g.nodes
    assert an.roles["dw"] == "depthwise"
    assert np.array_equal(g.tensors[f], np.repeat(g.tensors[d], 16))


def test_channel_shuffle_ties_channels_and_grouped_consumer_bins_units():
    n = Net()
    a = n.relu(n.conv("x", 4, 8, k=1, group=2, name="g1"))
    r = n.op("Reshape", [a, n.const(np.array([1, 2, 4, 6, 6], np.int64))])
    t = n.op("Transpose", [r], perm=[0, 2, 1, 3, 4])
    s = n.op("Reshape", [t, n.const(np.array([1, 8, 6, 6], np.int64))])
    y = n.conv(n.conv(s, 8, 8, group=8, name="dw"), 8, 4, k=1, group=2, name="g2")
    an = analyze(n.model({"x": [1, 4, 6, 6]}, [y]))
    g = group_of(an, a)
    assert g is group_of(an, s) and g.prunable
    assert g.n_units == 4  # channel j of both shuffle groups moves together
    assert np.array_equal(g.tensors[a], [0, 1, 2, 3, 0, 1, 2, 3])
    assert np.array_equal(g.tensors[s], [0, 0, 1, 1, 2, 2, 3, 3])
    assert np.array_equal(g.unit_bins, [0, 0, 1, 1])  # g2's two groups each lose as many units


def test_incompatible_grouped_convs_freeze_with_a_reason():
    n = Net()
    a = n.conv("x", 3, 12, k=1, group=1, name="p")
    y1 = n.conv(a, 12, 4, k=1, group=2, name="q")
    y2 = n.conv(a, 12, 3, k=1, group=3, name="r")
    an = analyze(n.model({"x": [1, 3, 4, 4]}, [n.op("Add", [n.op("ReduceMean", [y1], axes=[1]),
                                                            n.op("ReduceMean", [y2], axes=[1])])]))
    g = group_of(an, a)
    assert not g.prunable and any("incompatibly" in r for r in g.frozen)


def test_unknown_ops_and_cross_channel_ops_freeze_not_fail():
    n = Net()
    a = n.relu(n.conv("x", 3, 8, name="c1"))
    lrn = n.op("LRN", [a], size=3)
    b = n.conv(lrn, 8, 8, name="c2")
    c = n.op("Shape", [b])
    y = n.conv(n.op("Reshape", [b, c]), 8, 2, name="c3")
    an = analyze(n.model({"x": [1, 3, 8, 8]}, [y]))
    assert any("LRN" in r for r in group_of(an, a).frozen)
    assert any("Shape" in r for r in group_of(an, b).frozen)


def test_slice_on_channels_and_per_channel_constants():
    n = Net()
    a = n.conv("x", 3, 10, name="c1")
    m = n.op("Mul", [a, n.const(np.ones((10, 1, 1), np.float32))])
    r = n.op("Add", [m, a])  # c1's output read twice: canonicalization cannot fold the Mul into it
    s = n.op("Slice", [r] + [n.const(np.array(v, np.int64)) for v in ([2], [8], [1])])
    y = n.conv(s, 6, 2, name="c2")
    an = analyze(n.model({"x": [1, 3, 8, 8]}, [y]))
    g = group_of(an, a)
    assert g is group_of(an, m) and g is group_of(an, s) and g.prunable and g.n_units == 10
    assert np.array_equal(g.tensors[s], g.tensors[a][2:8])
    assert an.roles[n.nodes[3].name] == "slice"


def test_graph_input_and_spatial_broadcasts():
    n = Net()
    a = n.conv("x", 3, 3, name="c1")
    r = n.op("Add", ["x", a])  # residual with the graph input: its group cannot lose channels
    att = n.op("Sigmoid", [n.conv(r, 3, 1, name="att")])
    y = n.conv(n.op("Mul", [r, att]), 3, 2, name="c2")  # [N,1,H,W] gate does not couple channels
    an = analyze(n.model({"x": [1, 3, 8, 8]}, [y]))
    assert any("graph input" in r for r in group_of(an, a).frozen)
    assert group_of(an, att) is not group_of(an, a)
