"""Quantized (QDQ) graphs: which ops the C backend runs on integers.

The int8 export lowers the QDQ model of our onnxruntime int8 flow (`ort_quant`): a quantized op
reads DequantizeLinear outputs and feeds a QuantizeLinear, `DQ(x_q) -> op -> Q -> y_q`, with
weights `DQ(w_int8)` (one scale per output channel) and biases `DQ(b_int32)`. Such an op runs on
the integers (a `Match`) when every run-time input is a DQ of a per-tensor quantized tensor, its
output's one consumer is a per-tensor Q (directly or through a Relu/Clip, which becomes the
output clamp), and its weights are constant DQs along the output channel. The matched DQ and Q
nodes are absorbed; every other op stays float (nodes the flow excluded, ops without an int8
kernel), with its DQ and Q lowered as conversion steps.

Pure graph analysis: `prepare` uses it to keep the matched weight DQs from being folded to float,
`lower_quant` to lower the matches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from onnxc.compiler.graph import GraphView, attr

QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
INT8_TYPES = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}
VIEWS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
POOLS = {"GlobalAveragePool", "GlobalMaxPool", "MaxPool", "AveragePool"}
BINARY = {"Add", "Mul"}
DENSE = {"Conv", "Gemm", "MatMul"}


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of a quantized tensor, the zero point in the int8 domain (an ONNX
    uint8 tensor is stored as int8 q - 128)."""

    scale: np.ndarray       # float32 [len]
    zero_point: np.ndarray  # int64 [len], int8 domain
    axis: int | None = None  # None: per tensor

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1

    @property
    def s(self) -> float:
        return float(self.scale.reshape(-1)[0])

    @property
    def z(self) -> int:
        return int(self.zero_point.reshape(-1)[0])

    def same(self, other: QParams) -> bool:
        return self.per_tensor and other.per_tensor and self.s == other.s and self.z == other.z


def to_int8(values: np.ndarray) -> np.ndarray:
    """int8/uint8 values in int8 storage (uint8 shifted by -128), as int64."""
    v = np.asarray(values).astype(np.int64)
    return v - 128 if np.asarray(values).dtype == np.uint8 else v


def quant_params(view: GraphView, scale: str, zero_point: str | None, dtype: type | None,
                 axis: int | None) -> QParams | None:
    """QParams from constant scale / zero point inputs; None when they are not constants."""
    s = view.const(scale)
    if s is None or s.dtype != np.float32:
        return None
    if zero_point:
        z = view.const(zero_point)
        if z is None:
            return None
        dtype = z.dtype.type
    else:
        z = np.zeros(s.shape, dtype=dtype or np.uint8)
    if np.dtype(dtype) not in (np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int32)):
        return None
    zp = to_int8(z) if np.dtype(dtype) != np.int32 else z.astype(np.int64)
    return QParams(s.reshape(-1).astype(np.float32), np.broadcast_to(zp.reshape(-1), s.reshape(-1).shape).copy(),
                   None if s.size == 1 else axis)


def node_params(view: GraphView, node: onnx.NodeProto) -> QParams | None:
    """QParams of a QuantizeLinear / DequantizeLinear (None for blocked or non-8-bit ones)."""
    if attr(node, "block_size", 0):
        return None
    zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "QuantizeLinear":
        dtype = INT8_TYPES.get(attr(node, "output_dtype", 0) or TensorProto.UINT8)
    else:
        dtype = {**INT8_TYPES, TensorProto.INT32: np.int32}.get(view.dtype(node.input[0]))
    if dtype is None and zp is None:
        return None
    rank = len(view.shape(node.input[0]) or [])
    axis = attr(node, "axis", 1)
    return quant_params(view, node.input[1], zp, dtype, axis + rank if axis < 0 else axis)


@dataclass
class Match:
    """An op run on integers: reads the int8 tensors `x`, writes the int8 tensor `y`."""

    node: onnx.NodeProto
    x: list[str]
    xq: list[QParams]
    y: str
    yq: QParams
    weight: tuple[np.ndarray, QParams] | None = None  # int values (int8 domain) and their params
    bias: str | None = None                            # the bias input (a DQ output or a float constant)
    act: onnx.NodeProto | None = None                  # Relu / Clip between the op and its Q
    absorbed: list[str] = field(default_factory=list)  # first outputs of the act and the Q


def find(model: onnx.ModelProto) -> dict[str, Match]:
    """Every op of the graph that runs on integers, by first output."""
    view = GraphView(model.graph)
    found = {}
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in DENSE | POOLS | BINARY | VIEWS:
            m = _match(view, node)
            if m is not None:
                found[node.output[0]] = m
    return found


def kept_dequantize(model: onnx.ModelProto) -> set[str]:
    """Outputs of constant DQs (weights, biases) read only by matched ops: keep them unfolded."""
    view = GraphView(model.graph)
    matched = {m.node.output[0] for m in find(model).values()}
    keep = set()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and view.is_const(node.input[0]):
            users = view.consumers.get(node.output[0], [])
            if users and all(u.output[0] in matched for u in users) and node.output[0] not in view.graph_outputs:
                keep.add(node.output[0])
    return keep


def _dq_input(view: GraphView, name: str) -> tuple[str, QParams] | None:
    """(int8 tensor, params) when `name` is the DQ of a run-time per-tensor int8/uint8 tensor."""
    dq = view.producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or view.is_const(dq.input[0]):
        return None
    if view.dtype(dq.input[0]) not in INT8_TYPES:
        return None
    q = node_params(view, dq)
    return (dq.input[0], q) if q is not None and q.per_tensor else None


def _dq_weight(view: GraphView, name: str, channel_axis: int) -> tuple[np.ndarray, QParams] | None:
    """(int values, params) when `name` is the DQ of a constant int8/uint8 weight, quantized per
    tensor or along `channel_axis`."""
    dq = view.producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or not view.is_const(dq.input[0]):
        return None
    w = view.const(dq.input[0])
    q = node_params(view, dq)
    if q is None or w.dtype not in (np.int8, np.uint8) or not (q.per_tensor or q.axis == channel_axis):
        return None
    return to_int8(w), q


def _output_q(view: GraphView, node: onnx.NodeProto) -> tuple[str, QParams, onnx.NodeProto | None, list[str]] | None:
    """The Q the op's output goes to (through at most one Relu/Clip with constant bounds)."""
    out, act, absorbed = node.output[0], None, []
    for _ in range(2):
        users = view.consumers.get(out, [])
        if len(users) != 1 or out in view.graph_outputs:
            return None
        user = users[0]
        if user.op_type == "QuantizeLinear" and user.input[0] == out:
            q = node_params(view, user)
            if q is None or not q.per_tensor or view.dtype(user.output[0]) not in INT8_TYPES:
                return None
            return user.output[0], q, act, absorbed + [user.output[0]]
        if act is not None or user.op_type not in ("Relu", "Clip") or node.op_type in VIEWS:
            return None
        if user.op_type == "Clip" and any(i and not view.is_const(i) for i in user.input[1:]):
            return None
        act, out = user, user.output[0]
        absorbed.append(out)
    return None


def _match(view: GraphView, node: onnx.NodeProto) -> Match | None:
    op = node.op_type
    if len([o for o in node.output if o]) != 1:
        return None
    data = [node.input[0]] if op in DENSE | POOLS | VIEWS else list(node.input)
    if op in BINARY and len(data) != 2:
        return None
    xs = [_dq_input(view, name) for name in data]
    if any(x is None for x in xs):
        return None
    out = _output_q(view, node)
    if out is None:
        return None
    y, yq, act, absorbed = out
    m = Match(node, [x for x, _ in xs], [q for _, q in xs], y, yq, act=act, absorbed=absorbed)
    if op in VIEWS:
        return m if m.xq[0].same(yq) else None
    if op in DENSE:
        if op == "Gemm" and attr(node, "transA", 0):
            return None
        axis = 0 if op == "Conv" or (op == "Gemm" and attr(node, "transB", 0)) else 1
        m.weight = _dq_weight(view, node.input[1], axis)
        if m.weight is None or (op == "MatMul" and m.weight[0].ndim != 2):
            return None
        m.bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if m.bias is not None and not _constant_bias(view, m.bias):
            return None
    return m


def _constant_bias(view: GraphView, name: str) -> bool:
    if view.is_const(name):
        return view.const(name).dtype == np.float32
    dq = view.producers.get(name)
    return dq is not None and dq.op_type == "DequantizeLinear" and view.is_const(dq.input[0])


def bias_value(view: GraphView, name: str) -> np.ndarray:
    """A bias as float64: a float constant, or the dequantized value of a constant DQ."""
    if view.is_const(name):
        return view.const(name).astype(np.float64)
    dq = view.producers[name]
    q = node_params(view, dq)
    v = view.const(dq.input[0]).astype(np.float64)
    return (v - q.zero_point) * q.scale.astype(np.float64)
