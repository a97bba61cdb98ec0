"""Lossless float rewrites that make a model easier to quantize to int8.

Two steps, both exact in real arithmetic (the caller checks the float outputs before and after):

- Affine folding (`compiler.affine`, which canonicalization already runs: here for models that
  reach the export another way): constant scales and shifts next to a `Conv` go into its weights.
  onnxruntime's quantizer puts a quantize/dequantize pair on every elementwise op's output, so
  each such op is one more rounding of the whole feature map; folded, it costs nothing.
- Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight
  Equalization and Bias Correction"): for two Convs joined by nothing or by positively
  homogeneous per-channel ops (Relu, LeakyRelu, MaxPool: f(s x) = s f(x) for s > 0), output
  channel i of the first is divided by s_i and input channel i of the second multiplied by s_i.
  With s_i = sqrt(r1_i / r2_i) (r1: the range of the first layer's channel i weights, r2: of the
  second's input channel i) both ranges become sqrt(r1_i r2_i), so the per-tensor activation
  between them and the second layer's per-channel weights no longer have a few channels that
  take the whole range. Pairs are swept a few times, since a layer in a chain is in two pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxc.compiler.affine import fold_affine
from onnxc.compiler.graph import GraphView, attr

# Per-channel ops that commute with a positive per-channel scale and keep zero at zero.
HOMOGENEOUS = {"Relu", "LeakyRelu", "MaxPool"}
SWEEPS = 4
# Channels whose weights are all (near) zero keep scale 1: their ratio means nothing.
TINY = 1e-8


@dataclass
class Equalized:
    model: onnx.ModelProto
    folded: list[str] = field(default_factory=list)  # "Conv <- Mul" for each elementwise op folded
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (producer, consumer) Convs equalized

    @property
    def changed(self) -> bool:
        return bool(self.folded or self.pairs)


def equalize(model: onnx.ModelProto, *, fold: bool = True, scale: bool = True) -> Equalized:
    """A copy of `model` with affine ops folded into Convs and Conv pairs equalized."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    result = Equalized(copy)
    if fold:
        result.folded = fold_affine(copy.graph)
    view = GraphView(copy.graph)
    if scale:
        result.pairs = _equalize_pairs(view)
    view.remove_unused()  # the constants the folds and scales replaced
    return result


def _shared(view: GraphView, name: str) -> bool:
    """A constant read by more than one node (or twice) cannot be rewritten for one of them."""
    return len(view.consumers.get(name, [])) > 1


def _conv_weights(view: GraphView, node: onnx.NodeProto) -> np.ndarray | None:
    if node.op_type != "Conv" or len(node.input) < 2:
        return None
    w = view.const(node.input[1])
    if w is None or w.dtype != np.float32 or w.ndim < 3 or _shared(view, node.input[1]):
        return None
    if len(node.input) > 2 and node.input[2] and (not view.is_const(node.input[2]) or _shared(view, node.input[2])):
        return None
    return w


def _pairs(view: GraphView) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(producer, consumer) Convs joined only through positively homogeneous per-channel ops,
    each tensor on the way read by the next node alone."""
    found = []
    for node in view.graph.node:
        w1 = _conv_weights(view, node)
        if w1 is None:
            continue
        tensor, ok = node.output[0], True
        while ok:
            users = view.consumers.get(tensor, [])
            if tensor in view.graph_outputs or len(users) != 1:
                ok = False
                break
            nxt = users[0]
            if nxt.op_type in HOMOGENEOUS and nxt.input[0] == tensor and len(nxt.output) == 1:
                tensor = nxt.output[0]
                continue
            break
        if not ok:
            continue
        consumer = view.consumers[tensor][0]
        w2 = _conv_weights(view, consumer)
        if w2 is None or consumer.input[0] != tensor or consumer is node:
            continue
        groups = int(attr(consumer, "group", 1))
        if w2.shape[1] * groups != w1.shape[0]:
            continue
        found.append((node, consumer))
    return found


def _consumer_columns(w2: np.ndarray, groups: int) -> np.ndarray:
    """max |w| per input channel of a (grouped) Conv weight [O, C/G, k...]: [C]."""
    o, cg = w2.shape[:2]
    per_group = np.abs(w2).reshape(groups, o // groups, cg, -1).max(axis=(1, 3))  # [G, C/G]
    return per_group.reshape(-1)


def _scale_columns(w2: np.ndarray, groups: int, s: np.ndarray) -> np.ndarray:
    o, cg = w2.shape[:2]
    shaped = w2.reshape(groups, o // groups, cg, -1) * s.reshape(groups, 1, cg, 1)
    return shaped.reshape(w2.shape).astype(np.float32)


def _equalize_pairs(view: GraphView) -> list[tuple[str, str]]:
    pairs = _pairs(view)
    for _ in range(SWEEPS):
        for producer, consumer in pairs:
            w1, w2 = view.const(producer.input[1]), view.const(consumer.input[1])
            groups = int(attr(consumer, "group", 1))
            r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
            r2 = _consumer_columns(w2, groups)
            s = np.ones_like(r1)
            ok = (r1 > TINY) & (r2 > TINY)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            view.set_input_const(producer, 1, (w1 / s.reshape(-1, *[1] * (w1.ndim - 1))).astype(np.float32))
            if len(producer.input) > 2 and producer.input[2]:
                view.set_input_const(producer, 2, (view.const(producer.input[2]) / s).astype(np.float32))
            view.set_input_const(consumer, 1, _scale_columns(w2, groups, s))
    return [(p.name, c.name) for p, c in pairs]
