"""Which channels must be removed together: the channel-group analysis behind `prune`.

Every activation tensor with a known channel count (axis 1) is a node of a networkx graph; an op
that carries channels from an input to an output (Relu, BN, pooling, a per-channel Mul, a
depthwise Conv, a residual Add, Concat, Split, Slice, Flatten into a Gemm, a channel shuffle)
joins them with an edge. A connected component is a *group*: the tensors whose channel
dimensions change together. Inside a group, channels are coupled one by one (Concat maps an input
to its offset range, Flatten maps a channel to its block of features, a shuffle permutes them and
ties the channels that must stay in step); the connected components of that channel-level graph
are the group's *units*: removing a unit removes its channel from every member tensor at once.

Ops that mix channels with constant weights (Conv, ConvTranspose, Gemm, MatMul) end a group:
their output channels are a group's *producers* (rows of the weight), their data input is read by
a *consumer* (columns of the weight). Grouped convolutions constrain how many channels each of
their groups may lose; the analysis reduces those constraints to equal-size bins of units.

A group is frozen, with a recorded reason and never an error, when it reaches a graph output or
input, or touches an op the analysis does not understand.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from onnxc.compiler.graph import GraphView, attr, node_inputs_with_subgraphs

UNARY = {"Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
         "Softplus", "Softsign", "Gelu", "Mish", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Floor",
         "Ceil", "Round", "Sign", "Erf", "Sin", "Cos", "Cast", "Identity", "Dropout", "ThresholdedRelu",
         "Clip", "Not", "IsNaN", "IsInf", "Shrink", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
         "GlobalMaxPool", "GlobalLpPool", "BatchNormalization", "InstanceNormalization", "MaxRoiPool"}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow", "PRelu", "Where", "And", "Or",
               "Xor", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Mod", "BitShift"}
MIXING = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass
class Constraint:
    """A grouped conv: every one of `bins` equal slices of `tensor` must lose as many channels."""

    tensor: str
    bins: int
    node: str


@dataclass
class ChannelGroup:
    """Tensors whose channels are removed together, and the nodes whose weights follow them."""

    id: int
    tensors: dict[str, np.ndarray]  # member tensor -> unit index of each of its channels
    n_units: int
    producers: list[str] = field(default_factory=list)  # nodes whose output channels start here
    consumers: list[str] = field(default_factory=list)  # nodes that read a member and mix its channels
    nodes: list[str] = field(default_factory=list)  # every node whose weights or attributes follow
    frozen: list[str] = field(default_factory=list)  # why the group cannot be pruned (empty: it can)
    unit_bins: np.ndarray | None = None  # equal-removal bin of each unit (-1: free), from grouped convs
    constraints: list[Constraint] = field(default_factory=list)
    members: list[str] = field(default_factory=list)  # every tensor of the group, channels known or not

    @property
    def name(self) -> str:
        """The first producer, else the first member tensor (a group of unknown-channel tensors has
        no `tensors` entry but always has members)."""
        if self.producers:
            return self.producers[0]
        return next(iter(self.tensors), self.members[0] if self.members else f"group{self.id}")

    @property
    def prunable(self) -> bool:
        return not self.frozen and bool(self.producers)

    def channels(self) -> dict[str, int]:
        return {t: len(u) for t, u in self.tensors.items()}

    def keep_channels(self, kept_units: np.ndarray) -> dict[str, np.ndarray]:
        """Kept channel indices of every member tensor for a boolean mask over units."""
        return {t: np.flatnonzero(kept_units[u]) for t, u in self.tensors.items()}

    def describe(self) -> dict:
        channels = {t: (len(self.tensors[t]) if t in self.tensors else None) for t in self.members or self.tensors}
        return {"id": self.id, "name": self.name, "units": self.n_units, "tensors": channels,
                "producers": list(self.producers), "consumers": list(self.consumers),
                "frozen": list(self.frozen)}


@dataclass
class Analysis:
    groups: list[ChannelGroup]
    roles: dict[str, str]  # node name -> how the rewrite must treat it (e.g. "depthwise", "shuffle_in")
    group_of: dict[str, int]  # member tensor -> group id

    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]


# ---------------------------------------------------------------------------------------------
class _Builder:
    """Collects tensor edges, channel couplings, roles and freeze reasons while rules run."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.view = GraphView(model.graph)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.tgraph = nx.Graph()
        self.offsets: dict[str, int] = {}
        self.total = 0
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.freeze: dict[str, list[str]] = defaultdict(list)
        self.producers: dict[str, list[str]] = defaultdict(list)  # tensor -> producer nodes
        self.consumers: dict[str, list[str]] = defaultdict(list)  # tensor -> consumer nodes
        self.touch: dict[str, list[str]] = defaultdict(list)  # tensor -> pass-through nodes with weights
        self.constraints: list[Constraint] = []
        self.roles: dict[str, str] = {}
        self.handled: set[str] = set()  # nodes already covered by a multi-node pattern

    # -- tensors --------------------------------------------------------------------------
    def rank(self, name: str) -> int | None:
        s = self.view.shape(name)
        return None if s is None else len(s)

    def channels(self, name: str) -> int | None:
        """Channel count (axis 1) of an activation tensor; None for constants and unknown shapes."""
        if not name or self.view.is_const(name):
            return None
        s = self.view.shape(name)
        if s is None or len(s) < 2 or not isinstance(s[1], int) or s[1] <= 0:
            return None
        return s[1]

    def is_channel_tensor(self, name: str) -> bool:
        if not name or self.view.is_const(name):
            return False
        s = self.view.shape(name)
        return s is not None and len(s) >= 2

    def add(self, name: str) -> bool:
        c = self.channels(name)
        if c is None:
            if self.is_channel_tensor(name) or (name and self.view.shape(name) is None
                                                and not self.view.is_const(name)):
                self.tgraph.add_node(name)
                self.freeze[name].append(f"channel count of '{name}' is unknown")
            return False
        if name not in self.offsets:
            self.offsets[name] = self.total
            self.total += c
            self.tgraph.add_node(name)
        return True

    def couple(self, a: str, ia, b: str, ib) -> None:
        """Channel ia[k] of tensor a is channel ib[k] of tensor b."""
        if not (self.add(a) and self.add(b)):
            self.unknown_tensors([a, b], f"cannot map the channels between '{a}' and '{b}'")
            return
        ia, ib = np.asarray(ia, np.int64), np.asarray(ib, np.int64)
        self.tgraph.add_edge(a, b)
        self.edges.append((self.offsets[a] + ia, self.offsets[b] + ib))

    def same(self, a: str, b: str) -> bool:
        ca, cb = self.channels(a), self.channels(b)
        if ca is None or cb is None or ca != cb:
            self.unknown_tensors([a, b], f"channel counts of '{a}' and '{b}' differ or are unknown")
            return False
        self.couple(a, np.arange(ca), b, np.arange(cb))
        return True

    def unknown_tensors(self, names, reason: str) -> None:
        """Freeze tensors an op does not let us follow. Their channels are still registered when
        known, so the group they form lists them (a tensor met only by such ops is its own group)."""
        for n in names:
            if n and not self.view.is_const(n):
                if self.channels(n) is not None:
                    self.add(n)
                else:
                    self.tgraph.add_node(n)
                self.freeze[n].append(reason)

    def unknown(self, node: onnx.NodeProto, reason: str | None = None) -> None:
        reason = reason or f"{node.op_type} node '{node.name}' is not understood by the channel analysis"
        names = list(node_inputs_with_subgraphs(node)) + [o for o in node.output if o]
        self.unknown_tensors([n for n in names if self.is_channel_tensor(n) or self.view.shape(n) is None],
                             reason)

    def data_inputs(self, node: onnx.NodeProto) -> list[str]:
        return [i for i in node.input if i and not self.view.is_const(i)]

    def ints(self, node: onnx.NodeProto, attr_name: str, input_index: int | None) -> list[int] | None:
        """An int-list parameter given as an attribute (old opsets) or a constant input (new)."""
        if input_index is not None and len(node.input) > input_index and node.input[input_index]:
            value = self.view.const(node.input[input_index])
            return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]
        value = attr(node, attr_name)
        return None if value is None else [int(v) for v in value]


# ---- rules: one function per op family ---------------------------------------------------------
def _unary(b: _Builder, node: onnx.NodeProto) -> None:
    x = node.input[0]
    if b.view.is_const(x):
        return
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1] and b.view.consumers.get(node.output[1]):
        b.unknown(node, f"MaxPool '{node.name}' returns indices that encode channel positions")
        return
    if node.op_type in ("BatchNormalization", "InstanceNormalization", "Clip"):
        if not all(b.view.is_const(i) for i in node.input[1:] if i):
            b.unknown(node, f"{node.op_type} '{node.name}' has non-constant parameters")
            return
        if node.op_type != "Clip":
            b.touch[node.output[0]].append(node.name)
    for out in node.output:
        if out and b.view.consumers.get(out) or out in b.view.graph_outputs:
            if out == node.output[0] or b.view.shape(out) == b.view.shape(x):
                b.same(x, out)
            else:
                b.unknown(node)


def _elementwise(b: _Builder, node: onnx.NodeProto) -> None:
    out = node.output[0]
    c_out, r_out = b.channels(out), b.rank(out)
    if c_out is None or r_out is None:
        if any(b.is_channel_tensor(i) for i in node.input):
            b.unknown(node, f"{node.op_type} '{node.name}': output channels unknown")
        return
    weights = False
    for name in node.input:
        if not name:
            continue
        shape = b.view.shape(name)
        if shape is None:
            b.unknown(node)
            return
        axis = 1 - (r_out - len(shape))
        dim = shape[axis] if axis >= 0 else 1
        if b.view.is_const(name):
            if dim not in (1, c_out):
                b.unknown(node, f"{node.op_type} '{node.name}': constant '{name}' does not broadcast per channel")
                return
            weights = weights or (dim == c_out and c_out > 1)
        elif dim == c_out and c_out > 1:
            b.same(name, out)
        elif dim != 1:
            b.unknown(node, f"{node.op_type} '{node.name}': input '{name}' broadcasts oddly on channels")
            return
    b.add(out)
    if weights:
        b.touch[out].append(node.name)


def _conv(b: _Builder, node: onnx.NodeProto) -> None:
    x, w_name, y = node.input[0], node.input[1], node.output[0]
    w = b.view.shape(w_name)
    if not b.view.is_const(w_name) or (len(node.input) > 2 and node.input[2] and not b.view.is_const(node.input[2])):
        b.unknown(node, f"{node.op_type} '{node.name}' has non-constant weights")
        return
    c_in, c_out = b.channels(x), b.channels(y)
    if c_in is None or c_out is None or w is None:
        b.unknown(node, f"{node.op_type} '{node.name}': channel counts unknown")
        return
    group = attr(node, "group", 1)
    if node.op_type == "ConvTranspose":
        if group != 1:
            b.unknown(node, f"grouped ConvTranspose '{node.name}' is not supported")
            return
    elif group > 1 and group == c_in and c_out % c_in == 0:
        mult = c_out // c_in
        b.couple(x, np.arange(c_out) // mult, y, np.arange(c_out))
        b.roles[node.name] = "depthwise"
        b.touch[y].append(node.name)
        return
    b.add(x)
    b.add(y)
    b.producers[y].append(node.name)
    b.consumers[x].append(node.name)
    if group > 1:
        b.roles[node.name] = "grouped"
        b.constraints.append(Constraint(y, group, node.name))
        b.constraints.append(Constraint(x, group, node.name))


def _gemm(b: _Builder, node: onnx.NodeProto) -> None:
    a, w_name, y = node.input[0], node.input[1], node.output[0]
    consts = [w_name] + ([node.input[2]] if len(node.input) > 2 and node.input[2] else [])
    if not all(b.view.is_const(n) for n in consts) or b.view.is_const(a):
        b.unknown(node, f"{node.op_type} '{node.name}' multiplies two activations")
        return
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        b.unknown(node, f"Gemm '{node.name}' transposes its input")
        return
    if node.op_type == "MatMul" and (b.rank(a) != 2 or b.rank(w_name) != 2):
        if (b.rank(a) or 0) >= 3 and b.rank(w_name) == 2:
            b.same(a, y)  # contraction on the last axis: channels (axis 1) pass through
            return
        b.unknown(node, f"MatMul '{node.name}' is not a 2-D layer")
        return
    if b.add(a) and b.add(y):
        b.producers[y].append(node.name)
        b.consumers[a].append(node.name)
    else:
        b.unknown(node, f"{node.op_type} '{node.name}': channel counts unknown")


def _axis(b: _Builder, node: onnx.NodeProto, tensor: str, default: int) -> int | None:
    """The node's `axis` normalised by the rank of `tensor`; None (node frozen) without a channel count."""
    r = b.rank(tensor)
    if r is None or b.channels(tensor) is None:
        b.unknown(node)
        return None
    axis = attr(node, "axis", default)
    return axis + r if axis < 0 else axis


def _concat(b: _Builder, node: onnx.NodeProto) -> None:
    out = node.output[0]
    axis = _axis(b, node, out, 1)
    if axis is None:
        return
    if any(b.view.is_const(i) for i in node.input if i):
        b.unknown(node, f"Concat '{node.name}' concatenates a constant")
        return
    if axis != 1:
        for i in node.input:
            b.same(i, out)
        return
    offset = 0
    for i in node.input:
        c = b.channels(i)
        if c is None:
            b.unknown(node)
            return
        b.couple(i, np.arange(c), out, offset + np.arange(c))
        offset += c


def _split(b: _Builder, node: onnx.NodeProto) -> None:
    x = node.input[0]
    axis = _axis(b, node, x, 0)
    if axis is None:
        return
    outs = list(node.output)
    if axis != 1:
        for o in outs:
            if o:
                b.same(x, o)
        return
    offset = 0
    for o in outs:
        c = b.channels(o)
        if c is None:
            b.unknown(node)
            return
        b.couple(x, offset + np.arange(c), o, np.arange(c))
        offset += c
    if offset != b.channels(x):
        b.unknown(node, f"Split '{node.name}': output channels do not add up")
        return
    b.roles[node.name] = "split"
    b.touch[x].append(node.name)


def _slice(b: _Builder, node: onnx.NodeProto) -> None:
    x, y = node.input[0], node.output[0]
    r, c = b.rank(x), b.channels(x)
    legacy = b.opset < 10
    starts = b.ints(node, "starts", None if legacy else 1)
    ends = b.ints(node, "ends", None if legacy else 2)
    axes = b.ints(node, "axes", None if legacy else 3)
    steps = None if legacy else b.ints(node, "steps", 4)
    if starts is None or ends is None or r is None or c is None or \
            any(len(node.input) > i and node.input[i] and not b.view.is_const(node.input[i]) for i in range(1, 5)):
        b.unknown(node, f"Slice '{node.name}' has non-constant or unknown bounds")
        return
    axes = [a + r if a < 0 else a for a in (axes if axes is not None else range(len(starts)))]
    steps = steps if steps is not None else [1] * len(starts)
    if 1 not in axes:
        b.same(x, y)
        return
    k = axes.index(1)
    if steps[k] != 1:
        b.unknown(node, f"Slice '{node.name}' strides over channels")
        return
    idx = np.arange(c)[slice(starts[k], ends[k], 1)]
    if b.channels(y) != len(idx):
        b.unknown(node)
        return
    b.couple(x, idx, y, np.arange(len(idx)))
    b.roles[node.name] = "slice"
    b.touch[x].append(node.name)


def _flatten(b: _Builder, node: onnx.NodeProto) -> None:
    x, y = node.input[0], node.output[0]
    shape = b.view.static_shape(x)
    if shape is None or attr(node, "axis", 1) != 1 or b.channels(x) is None or b.channels(y) is None:
        b.unknown(node, f"Flatten '{node.name}' does not keep channels on axis 1")
        return
    block = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    b.couple(x, np.arange(b.channels(y)) // block, y, np.arange(b.channels(y)))


def _reshape(b: _Builder, node: onnx.NodeProto) -> None:
    if node.name in b.handled:
        return
    x, y = node.input[0], node.output[0]
    if _shuffle(b, node):
        return
    xs, ys = b.view.shape(x), b.view.shape(y)
    if not b.view.is_const(node.input[1]) or xs is None or ys is None or len(xs) < 2 or len(ys) < 2 \
            or not all(isinstance(d, int) and d > 0 for d in list(xs[1:]) + list(ys[1:])):
        b.unknown(node, f"Reshape '{node.name}' has an unknown target shape")
        return
    spatial_in = int(np.prod(xs[2:], dtype=np.int64))
    if xs[0] == ys[0] and xs[1] == ys[1] and int(np.prod(ys[2:], dtype=np.int64)) == spatial_in:
        b.same(x, y)
        b.roles[node.name] = "reshape_keep"
    elif len(ys) == 2 and xs[0] == ys[0] and ys[1] == xs[1] * spatial_in:
        b.couple(x, np.arange(ys[1]) // spatial_in, y, np.arange(ys[1]))
        b.roles[node.name] = "reshape_flat"
    else:
        b.unknown(node, f"Reshape '{node.name}' moves channels off axis 1")
        return
    b.touch[y].append(node.name)


def _shuffle(b: _Builder, node: onnx.NodeProto) -> bool:
    """Reshape [N,C,*S]->[N,g,C/g,*S], Transpose(1<->2), Reshape back: a channel shuffle."""
    x, mid = node.input[0], node.output[0]
    xs, ms = b.view.shape(x), b.view.shape(mid)
    users = b.view.consumers.get(mid, [])
    if xs is None or ms is None or len(ms) != len(xs) + 1 or len(users) != 1 or users[0].op_type != "Transpose":
        return False
    tr = users[0]
    perm = attr(tr, "perm")
    want = [0, 2, 1] + list(range(3, len(ms)))
    after = b.view.consumers.get(tr.output[0], [])
    if perm is None or list(perm) != want or len(after) != 1 or after[0].op_type != "Reshape":
        return False
    back = after[0]
    y = back.output[0]
    ys = b.view.shape(y)
    c = b.channels(x)
    if c is None or ys is None or list(ys) != list(xs) or ms[1] * ms[2] != c or list(ms[3:]) != list(xs[2:]) \
            or mid in b.view.graph_outputs or tr.output[0] in b.view.graph_outputs \
            or not b.view.is_const(back.input[1]) or not b.view.is_const(node.input[1]):
        return False
    g, per = int(ms[1]), int(ms[2])
    gi, j = np.divmod(np.arange(c), per)
    b.couple(x, np.arange(c), y, j * g + gi)
    b.couple(x, np.arange(c), x, j)  # channel j of every group stays in step: one unit
    b.roles[node.name] = "shuffle_in"
    b.roles[back.name] = "shuffle_out"
    b.handled.update({tr.name, back.name})
    b.touch[x].extend([node.name, back.name])
    return True


def _transpose(b: _Builder, node: onnx.NodeProto) -> None:
    if node.name in b.handled:
        return
    perm = attr(node, "perm")
    if perm is not None and len(perm) >= 2 and perm[0] == 0 and perm[1] == 1:
        b.same(node.input[0], node.output[0])
    else:
        b.unknown(node, f"Transpose '{node.name}' moves the channel axis")


def _squeeze(b: _Builder, node: onnx.NodeProto) -> None:
    axes = b.ints(node, "axes", 1 if b.opset >= 13 else None)
    x, y = node.input[0], node.output[0]
    r = b.rank(y if node.op_type == "Unsqueeze" else x)
    if axes is None or r is None:
        b.unknown(node, f"{node.op_type} '{node.name}' has unknown axes")
        return
    axes = [a + r if a < 0 else a for a in axes]
    if any(a in (0, 1) for a in axes):
        b.unknown(node, f"{node.op_type} '{node.name}' moves the channel axis")
        return
    b.same(x, y)


def _reduce(b: _Builder, node: onnx.NodeProto) -> None:
    x, y = node.input[0], node.output[0]
    axes = b.ints(node, "axes", 1 if (b.opset >= 18 or node.op_type == "ReduceSum" and b.opset >= 13) else None)
    r = b.rank(x)
    if axes is None or r is None or any((a + r if a < 0 else a) in (0, 1) for a in axes):
        b.unknown(node, f"{node.op_type} '{node.name}' reduces over channels")
        return
    b.same(x, y)


def _softmax(b: _Builder, node: onnx.NodeProto) -> None:
    r = b.rank(node.input[0])
    axis = attr(node, "axis", -1 if b.opset >= 13 else 1)
    axis = axis + r if r is not None and axis < 0 else axis
    if b.opset < 13 or r is None or axis in (0, 1):
        b.unknown(node, f"{node.op_type} '{node.name}' normalizes across channels")
        return
    b.same(node.input[0], node.output[0])


def _resize(b: _Builder, node: onnx.NodeProto) -> None:
    x, y = node.input[0], node.output[0]
    extra = [i for i in node.input[1:] if i]
    if not all(b.view.is_const(i) for i in extra):
        b.unknown(node, f"{node.op_type} '{node.name}' has non-constant scales")
        return
    scales_idx = 1 if node.op_type == "Upsample" or b.opset < 11 else 2
    if len(node.input) > scales_idx and node.input[scales_idx]:
        scales = b.view.const(node.input[scales_idx])
        if scales is not None and scales.size >= 2 and float(scales.reshape(-1)[1]) != 1.0:
            b.unknown(node, f"{node.op_type} '{node.name}' scales the channel axis")
            return
    if node.op_type == "Resize" and len(node.input) > 3 and node.input[3]:
        b.roles[node.name] = "resize_sizes"
        b.touch[y].append(node.name)
    elif node.op_type == "Upsample" and b.opset < 9:
        scales = attr(node, "scales")
        if scales is not None and len(scales) >= 2 and scales[1] != 1.0:
            b.unknown(node, f"Upsample '{node.name}' scales the channel axis")
            return
    b.same(x, y)


def _pad(b: _Builder, node: onnx.NodeProto) -> None:
    x, y = node.input[0], node.output[0]
    pads = b.ints(node, "pads", 1 if b.opset >= 11 else None)
    r = b.rank(x)
    if pads is None or r is None or (len(node.input) > 3 and node.input[3]):
        b.unknown(node, f"Pad '{node.name}' has non-constant pads")
        return
    if pads[1] != 0 or pads[1 + r] != 0:
        b.unknown(node, f"Pad '{node.name}' pads the channel axis")
        return
    b.same(x, y)


def _lrn(b: _Builder, node: onnx.NodeProto) -> None:
    b.unknown(node, f"LRN '{node.name}' normalizes across neighbouring channels")


RULES: dict[str, Callable[[_Builder, onnx.NodeProto], None]] = {
    **{op: _unary for op in UNARY}, **{op: _elementwise for op in ELEMENTWISE},
    "Conv": _conv, "ConvTranspose": _conv, "Gemm": _gemm, "MatMul": _gemm, "Concat": _concat,
    "Split": _split, "Slice": _slice, "Flatten": _flatten, "Reshape": _reshape, "Transpose": _transpose,
    "Squeeze": _squeeze, "Unsqueeze": _squeeze, "Softmax": _softmax, "LogSoftmax": _softmax,
    "Resize": _resize, "Upsample": _resize, "Pad": _pad, "LRN": _lrn,
    **{op: _reduce for op in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2",
                              "ReduceProd", "ReduceLogSumExp", "ReduceSumSquare")},
}


# ---------------------------------------------------------------------------------------------
def analyze(model: onnx.ModelProto) -> Analysis:
    """Channel groups of a canonical model (shapes inferred), frozen ones included."""
    b = _Builder(model)
    for node in model.graph.node:
        touches = [n for n in list(node_inputs_with_subgraphs(node)) + list(node.output)
                   if n and not b.view.is_const(n)]
        if not any(b.is_channel_tensor(n) or b.view.shape(n) is None for n in touches):
            continue  # shape arithmetic on scalars and 1-D tensors
        rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None:
            b.unknown(node)
        else:
            rule(b, node)
    for name in b.view.graph_outputs:
        if name in b.tgraph:
            b.freeze[name].append(f"reaches graph output '{name}'")
    for name in b.view.graph_inputs:
        if name in b.tgraph:
            b.freeze[name].append(f"carries graph input '{name}'")
    return _groups(b)


def _groups(b: _Builder) -> Analysis:
    labels = _channel_units(b)
    order = {name: i for i, name in enumerate(_tensor_order(b))}
    node_order = {n.name: i for i, n in enumerate(b.model.graph.node)}
    groups, group_of = [], {}
    components = sorted((sorted(c, key=order.__getitem__) for c in nx.connected_components(b.tgraph)),
                        key=lambda c: order[c[0]])
    for members in components:
        tensors = {t: labels[b.offsets[t]:b.offsets[t] + b.channels(t)] for t in members if t in b.offsets}
        if tensors:
            _, inverse = np.unique(np.concatenate(list(tensors.values())), return_inverse=True)
            n_units = int(inverse.max()) + 1
            start = 0
            for t in tensors:
                tensors[t] = inverse[start:start + len(tensors[t])].astype(np.int64)
                start += len(tensors[t])
        else:
            n_units = 0
        gid = len(groups)
        g = ChannelGroup(gid, tensors, n_units, members=list(members))
        for t in members:
            group_of[t] = gid
            g.producers += b.producers.get(t, [])
            g.consumers += b.consumers.get(t, [])
            g.nodes += b.touch.get(t, [])
            g.frozen += [r for r in b.freeze.get(t, []) if r not in g.frozen]
            producer = b.view.producers.get(t)
            if producer is None and t not in b.view.graph_inputs:
                g.frozen.append(f"'{t}' has no producer")
        key = node_order.get
        g.producers = sorted(set(g.producers), key=key)
        g.consumers = sorted(set(g.consumers), key=key)
        g.nodes = sorted(set(g.nodes) | set(g.producers) | set(g.consumers), key=key)
        g.constraints = [c for c in b.constraints if c.tensor in tensors]
        if not tensors:
            g.frozen.append("no member has a known channel count")
        elif not g.producers and not g.frozen:
            g.frozen.append("no layer with weights produces these channels")
        if g.prunable:
            _resolve_constraints(g)
        groups.append(g)
    return Analysis(groups, dict(b.roles), group_of)


def _tensor_order(b: _Builder) -> list[str]:
    seen: dict[str, None] = {}
    for v in b.model.graph.input:
        seen.setdefault(v.name)
    for node in b.model.graph.node:
        for name in list(node.input) + list(node.output):
            if name:
                seen.setdefault(name)
    return [n for n in seen if n in b.tgraph] + sorted(n for n in b.tgraph if n not in seen)


def _channel_units(b: _Builder) -> np.ndarray:
    """Connected components of the channel-level coupling graph (one label per channel)."""
    if b.total == 0:
        return np.zeros(0, np.int64)
    if b.edges:
        rows = np.concatenate([e[0] for e in b.edges])
        cols = np.concatenate([e[1] for e in b.edges])
    else:
        rows = cols = np.zeros(0, np.int64)
    adj = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(b.total, b.total))
    _, labels = connected_components(adj, directed=False)
    return labels.astype(np.int64)


def _resolve_constraints(g: ChannelGroup) -> None:
    """Turn grouped-conv constraints into equal-size bins of units (or freeze the group)."""
    maps = []
    for c in g.constraints:
        units = g.tensors[c.tensor]
        size = len(units) // c.bins
        if size * c.bins != len(units):
            g.frozen.append(f"grouped conv '{c.node}': {len(units)} channels do not split into {c.bins} groups")
            return
        hist = np.zeros((g.n_units, c.bins), np.int64)
        np.add.at(hist, (units, np.arange(len(units)) // size), 1)
        present = hist.sum(1) > 0
        h = hist[present]
        if np.all(h == h[:, :1]):
            continue  # every unit has as many channels in every conv group: always balanced
        per_unit = h.sum(1)
        if np.count_nonzero(h, axis=1).max() > 1 or per_unit.min() != per_unit.max():
            g.frozen.append(f"grouped conv '{c.node}' splits coupled channels across its groups")
            return
        mapping = np.full(g.n_units, -1, np.int64)
        mapping[present] = h.argmax(1)
        if not any(np.array_equal(mapping, m) for m in maps):
            maps.append(mapping)
    if not maps:
        return
    keys = np.stack(maps, axis=1)
    covered = (keys >= 0).any(1)
    bins = np.full(g.n_units, -1, np.int64)
    _, inv, counts = np.unique(keys[covered], axis=0, return_inverse=True, return_counts=True)
    bins[covered] = inv.reshape(-1)
    ok = counts.min() == counts.max()
    for m in maps:
        per_bin = [len(np.unique(bins[m == v])) for v in np.unique(m[m >= 0])]
        ok = ok and min(per_bin) == max(per_bin)
    if not ok:
        g.frozen.append("grouped convolutions constrain these channels incompatibly")
        return
    g.unit_bins = bins


def describe_groups(model: onnx.ModelProto) -> list[dict]:
    """Every channel group of a canonical model as plain data (for `onnxc inspect`)."""
    return [g.describe() for g in analyze(model).groups]
