"""Bias correction for int8 weights (Nagel et al. 2019, section 4.2, with empirical input means).

Rounding a layer's weights to int8 moves its output by (W_q - W) x. Over the data, the mean of
that shift per output channel is (W_q - W) E[x]: not noise that averages out, but a bias that
every later layer sees (largest for layers with few weights per output, depthwise convolutions).
The quantized weights are read from the QDQ model (what onnxruntime actually wrote), E[x] per
input channel from the calibration samples, and the float model's biases are moved by minus the
shift before it is quantized again. Zero padding at the borders is ignored (every position is
taken to see the channel mean), so the correction is an estimate, which the caller judges at the
model's outputs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from onnxc.compiler.calibration import iter_activations
from onnxc.compiler.graph import attr


def dequantized_weights(qdq: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Layer name -> its weight as the QDQ model computes it (DequantizeLinear of a constant)."""
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}
    out = {}
    for node in qdq.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        q = inits[dq.input[0]].astype(np.float64)
        scale = inits.get(dq.input[1])
        zero = inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale)
        if scale is None:
            continue
        axis = int(attr(dq, "axis", 1)) if scale.size > 1 else 0
        shape = [1] * q.ndim
        if scale.size > 1:
            shape[axis] = scale.size
        out[node.name] = (q - zero.reshape(shape).astype(np.float64)) * scale.reshape(shape).astype(np.float64)
    return out


def correct_biases(model: onnx.ModelProto, qdq: onnx.ModelProto, train: Mapping[str, np.ndarray],
                   batch_size: int = 1) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of the float `model` whose Conv/Gemm biases cancel the mean output shift of the
    weights `qdq` quantized them to; and the layers corrected."""
    quantized = dequantized_weights(qdq)
    inits = {t.name: t for t in model.graph.initializer}
    layers = [n for n in model.graph.node if n.name in quantized and n.input[1] in inits
              and not (n.op_type == "Gemm" and attr(n, "transA", 0))]
    if not layers:
        return model, []
    inputs = list(dict.fromkeys(n.input[0] for n in layers))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in iter_activations(model, inputs, train, batch_size):
        for name, value in batch.items():
            if value.ndim < 2:
                continue
            axes = (0, *range(2, value.ndim))
            sums[name] = sums.get(name, 0) + value.astype(np.float64).sum(axis=axes)
            counts[name] = counts.get(name, 0) + value.size // value.shape[1]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    inits = {t.name: t for t in copy.graph.initializer}
    done = []
    for node in (n for n in copy.graph.node if n.name in {layer.name for layer in layers}):
        if node.input[0] not in sums:
            continue
        mean = sums[node.input[0]] / max(counts[node.input[0]], 1)
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        dw = quantized[node.name] - w
        if node.op_type == "Conv":
            groups = int(attr(node, "group", 1))
            o, cg = dw.shape[:2]
            if mean.size != cg * groups:
                continue
            per_in = dw.reshape(groups, o // groups, cg, -1).sum(axis=3)  # [G, O/G, C/G]
            shift = np.einsum("goc,gc->go", per_in, mean.reshape(groups, cg)).reshape(o)
        else:
            dw = dw.T if attr(node, "transB", 0) else dw  # [K, N]
            if mean.size != dw.shape[0]:
                continue
            shift = float(attr(node, "alpha", 1.0)) * (mean @ dw)
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias_name is None or bias_name not in inits or sum(i == bias_name for n in copy.graph.node
                                                              for i in n.input) > 1:
            continue
        bias = numpy_helper.to_array(inits[bias_name])
        beta = float(attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
        if bias.size != shift.size or not beta:
            continue
        new = (bias.reshape(-1) - shift / beta).reshape(bias.shape).astype(bias.dtype)
        inits[bias_name].CopyFrom(numpy_helper.from_array(new, bias_name))
        done.append(node.name)
    return copy, done

