"""Constant scales and shifts folded into the convolutions next to them.

Exports often leave per-channel or scalar affine ops around convolutions: a normalization
exported as `Mul`/`Add`, the learnable affine blocks of recent mobile backbones, an activation
written as `x * clip(x + 3, 0, 6) / 6`. Each is a pass over a whole feature map at run time,
and in an int8 model one more quantize/dequantize rounding of it (a float `Div` between two
int8 layers also forces a conversion each way). Folded into the weights they cost nothing.

Rewrites, each exact in real arithmetic (float results move by rounding only):

- a `Div` by a constant becomes a `Mul` by its reciprocal, so it can merge and fold;
- a constant `Mul` (`Add`) whose only consumer is another constant `Mul` (`Add`) merges into it;
- backward: a per-channel or scalar `Mul`/`Add` after a `Conv` goes into that Conv's weights and
  bias (per output channel: exact whatever the padding);
- forward: a per-channel or scalar `Mul` before a `Conv` scales the weights of its input
  channels; an `Add` before a Conv moves into the bias, only when the Conv pads nothing (a
  padded border would see zeros where the shifted input was not zero).

Graph outputs keep their names and values; a tensor read by two nodes is never folded away.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxc.compiler.graph import GraphView, attr
from onnxc.compiler.linear import LinearLayer

AFFINE_OPS = ("Mul", "Add")


def per_channel(value: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """A constant that broadcasts against [N, C, ...] of `rank` as one value per channel (or one
    value for all): its `channels` values, else None."""
    if value.dtype != np.float32:
        return None
    if value.size == 1 and value.ndim <= rank:
        return np.full(channels, value.reshape(-1)[0], np.float32)
    shape = list(value.shape)
    if len(shape) > rank or value.size != channels:
        return None
    shape = [1] * (rank - len(shape)) + shape
    if shape[1] != channels or any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return value.reshape(channels).astype(np.float32)


def fold_affine(graph: onnx.GraphProto) -> list[str]:
    """Fold every constant scale and shift the rules above allow; one line per rewrite."""
    done: list[str] = []
    while True:
        view = GraphView(graph)
        touched: set[str] = set()  # tensors next to a rewrite: their nodes wait for the next sweep
        dropped: set[int] = set()
        for index, node in enumerate(graph.node):
            if node.domain not in ("", "ai.onnx") or touched.intersection(node.input, node.output):
                continue
            line = (_div_to_mul(node, view) or _merge(node, view) or _backward(node, view)
                    or _forward(node, view))
            if line is None:
                continue
            done.append(line)
            if not line.startswith("Div "):  # the Div stays, as a Mul
                dropped.add(index)
            for near in [node, *_neighbours(node, view)]:
                touched.update(t for t in (*near.input, *near.output) if t not in view.initializers)
        if not touched:
            break
        keep = [n for i, n in enumerate(graph.node) if i not in dropped]
        del graph.node[:]
        graph.node.extend(keep)
    return done


def _neighbours(node: onnx.NodeProto, view: GraphView) -> list[onnx.NodeProto]:
    producers = [view.producers[i] for i in node.input if i in view.producers]
    return producers + [c for o in node.output for c in view.consumers.get(o, [])]


def _constant_operand(node: onnx.NodeProto, view: GraphView) -> tuple[str, np.ndarray] | None:
    """(the variable input, the float32 constant) of a binary op with exactly one constant input."""
    if node.op_type not in (*AFFINE_OPS, "Div") or len(node.input) != 2 or len(node.output) != 1:
        return None
    values = [view.const(i) for i in node.input]
    if (values[0] is None) == (values[1] is None):
        return None
    k = 0 if values[0] is not None else 1
    if node.op_type == "Div" and k == 0:
        return None
    if values[k].dtype != np.float32 or not np.all(np.isfinite(values[k])):
        return None
    return node.input[1 - k], values[k]


def _only_consumer(node: onnx.NodeProto, view: GraphView) -> onnx.NodeProto | None:
    """The single node that reads `node`'s output, when nothing else (graph outputs included) does."""
    users = view.consumers.get(node.output[0], [])
    if len(users) != 1 or node.output[0] in view.graph_outputs:
        return None
    return users[0]


def _div_to_mul(node: onnx.NodeProto, view: GraphView) -> str | None:
    operand = _constant_operand(node, view) if node.op_type == "Div" else None
    if operand is None or not np.all(operand[1]):
        return None
    reciprocal = (1.0 / operand[1].astype(np.float64)).astype(np.float32)
    node.op_type = "Mul"
    view.set_input_const(node, 1, reciprocal)
    return f"Div {node.name or node.output[0]} -> Mul by the reciprocal"


def _merge(node: onnx.NodeProto, view: GraphView) -> str | None:
    """x*c*d = x*(c*d), x+c+d = x+(c+d): shapes broadcast the same either way."""
    operand = _constant_operand(node, view)
    user = _only_consumer(node, view) if operand and node.op_type in AFFINE_OPS else None
    if user is None or user.op_type != node.op_type:
        return None
    second = _constant_operand(user, view)
    if second is None or second[0] != node.output[0]:
        return None
    combine = np.multiply if node.op_type == "Mul" else np.add
    merged = combine(operand[1].astype(np.float64), second[1].astype(np.float64)).astype(np.float32)
    k = 1 if user.input[0] == node.output[0] else 0
    view.set_input_const(user, k, merged)
    user.input[1 - k] = operand[0]
    return f"{node.op_type} {node.name or node.output[0]} merged into {user.name or user.output[0]}"


def _conv(conv: onnx.NodeProto | None, view: GraphView) -> LinearLayer | None:
    """A Conv with a constant float32 weight and bias (or none), as `LinearLayer` reads it."""
    if conv is None or conv.op_type != "Conv":
        return None
    layer = LinearLayer.read(conv, view)
    return layer if isinstance(layer, LinearLayer) and layer.dtype == np.float32 else None


def scale_outputs(layer: LinearLayer, view: GraphView, scale: np.ndarray | None = None,
                  shift: np.ndarray | None = None) -> None:
    """Make output channel o of a Conv compute scale[o] * out + shift[o]: its weights and bias
    rewritten in float64, stored in the weight's dtype. Its output keeps its name: the caller
    rewires it."""
    weight = layer.weight.astype(np.float64)
    bias = layer.bias.astype(np.float64) if layer.bias is not None else np.zeros(layer.out_features)
    if scale is not None:
        scale = np.asarray(scale, np.float64)
        weight, bias = weight * scale.reshape(-1, *[1] * (weight.ndim - 1)), bias * scale
    if shift is not None:
        bias = bias + shift
    layer.write(view, weight, bias)


def _backward(node: onnx.NodeProto, view: GraphView) -> str | None:
    """Conv -> Mul/Add(per output channel) becomes the Conv alone."""
    operand = _constant_operand(node, view) if node.op_type in AFFINE_OPS else None
    conv = view.producers.get(operand[0]) if operand else None
    if conv is None or conv.output[0] in view.graph_outputs or len(view.consumers[conv.output[0]]) != 1:
        return None
    layer = _conv(conv, view)
    c = per_channel(operand[1], layer.out_features, layer.weight.ndim) if layer is not None else None
    if c is None:
        return None
    if node.op_type == "Mul":
        scale_outputs(layer, view, scale=c)
    else:
        scale_outputs(layer, view, shift=c)
    conv.output[0] = node.output[0]
    return f"{node.op_type} {node.name or node.output[0]} folded into {layer.name}"


def _forward(node: onnx.NodeProto, view: GraphView) -> str | None:
    """Mul/Add(per input channel) -> Conv becomes the Conv alone, reading the op's input."""
    operand = _constant_operand(node, view) if node.op_type in AFFINE_OPS else None
    conv = _only_consumer(node, view) if operand else None
    layer = _conv(conv, view) if conv is not None and conv.input[0] == node.output[0] else None
    if layer is None:
        return None
    weight, groups = layer.weight, int(attr(conv, "group", 1))
    c = per_channel(operand[1], weight.shape[1] * groups, weight.ndim)
    if c is None or (node.op_type == "Add" and _pads(conv)):
        return None
    # Input channel read by weight[o, j]: group(o) * (channels per group) + j.
    out_per_group = weight.shape[0] // groups
    channel = (np.arange(weight.shape[0]) // out_per_group)[:, None] * weight.shape[1] + np.arange(weight.shape[1])
    per_weight = c.astype(np.float64)[channel].reshape(*channel.shape, *[1] * (weight.ndim - 2))
    if node.op_type == "Mul":
        layer.write(view, weight.astype(np.float64) * per_weight)
    else:
        shift = (weight.astype(np.float64) * per_weight).reshape(weight.shape[0], -1).sum(axis=1)
        scale_outputs(layer, view, shift=shift)
    conv.input[0] = operand[0]
    return f"{node.op_type} {node.name or node.output[0]} folded into {layer.name}"


def _pads(conv: onnx.NodeProto) -> bool:
    auto = attr(conv, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    return auto not in ("NOTSET", "VALID") or any(int(p) for p in attr(conv, "pads", []) or [])
