"""Weight scales of the C int8 flow, rounded so that requantization packs exactly.

`requant.channel_table` packs an output channel's bias and multiplier
(x_scale * w_scale / y_scale) into one 32-bit word only when the multiplier fits, to float32
precision, the mantissa bits the bias leaves (15 to 19 below the leading one): a coarser
multiplier would move outputs off what onnxruntime computes for the same model. The QDQ model of
our onnxruntime int8 flow has arbitrary float32 weight scales, so before lowering, every
per-channel (or per-tensor) weight scale of an op that the fast kernels run is moved to the
nearest float32 whose multiplier is such a number: by less than 2^-16 of itself (half a unit of
the layer's mantissa). No int8 weight changes (w * s / s' rounds back to w for |w| <= 127), the
int32 biases are re-quantized with the new scales as the quantizer computes them
(bias / (x_scale * w_scale)), and onnxruntime runs the snapped model: the C kernels then agree
with it as closely as with 25-bit multipliers, in half the bytes per channel.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from onnxc.backends.c import qdq
from onnxc.backends.c.requant import EXACT, layout
from onnxc.compiler.canonical import infer_shapes
from onnxc.compiler.graph import GraphView, attr


def snap_weight_scales(model: onnx.ModelProto) -> list[str]:
    """Snap the scales in place; the names of the ops whose scales moved."""
    typed = infer_shapes(model)  # qdq.find reads element types
    view = GraphView(model.graph)
    inits = {t.name: t for t in model.graph.initializer}
    uses = Counter(i for n in model.graph.node for i in n.input)
    moved = []
    for m in qdq.find(typed).values():
        node = m.node
        if node.op_type not in qdq.DENSE or m.weight is None or m.weight[1].zero_point.any():
            continue
        if node.op_type == "Gemm" and (attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0):
            continue
        scale = view.producers[node.input[1]].input[1]
        bias = _int32_bias(view, node, inits, uses)
        if scale not in inits or uses[scale] != 1 or bias is False:
            continue
        sw = numpy_helper.to_array(inits[scale]).astype(np.float32)
        b_int, b_scale = (None, None) if bias is None else (numpy_helper.to_array(inits[bias[0]]),
                                                            numpy_helper.to_array(inits[bias[1]]))
        snapped = _snap(np.float32(m.xq[0].s), sw.reshape(-1), np.float32(m.yq.s), b_int, b_scale)
        if snapped is None:
            continue
        new_sw, new_b, new_bs = snapped
        if np.array_equal(new_sw, sw.reshape(-1)):
            continue
        _replace(inits[scale], new_sw.reshape(sw.shape))
        if bias is not None:
            _replace(inits[bias[0]], new_b.reshape(b_int.shape).astype(np.int32))
            _replace(inits[bias[1]], new_bs.reshape(b_scale.shape).astype(np.float32))
        moved.append(node.name or node.output[0])
    return moved


def _int32_bias(view: GraphView, node: onnx.NodeProto, inits: dict, uses: Counter) -> tuple[str, str] | None | bool:
    """(int32 values, scale) initializers of the op's bias DQ, None without a bias, False when the
    bias is in another form (left alone)."""
    if len(node.input) < 3 or not node.input[2]:
        return None
    dq = view.producers.get(node.input[2])
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 2:
        return False
    values, scale = dq.input[0], dq.input[1]
    zp = dq.input[2] if len(dq.input) > 2 and dq.input[2] else None
    if values not in inits or scale not in inits or uses[values] != 1 or uses[scale] != 1:
        return False
    if inits[values].data_type != onnx.TensorProto.INT32 or (zp and numpy_helper.to_array(inits[zp]).any()):
        return False
    return values, scale


def _snap(sx: np.float32, sw: np.ndarray, sy: np.float32, b_int: np.ndarray | None,
          b_scale: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None:
    """(weight scales, int32 biases, bias scales) whose multipliers pack exactly, or None."""
    ratio = np.float64(sx) / np.float64(sy)
    rows = b_int.size if b_int is not None else sw.size
    b_real = None if b_int is None else b_int.reshape(-1).astype(np.float64) * b_scale.reshape(-1).astype(np.float64)
    new_sw, bias, bias_scale = sw, np.zeros(rows, np.int64) if b_int is None else b_int.reshape(-1), b_scale
    for _ in range(4):  # a re-quantized bias may need one more bit: settle the layout
        lay = layout(bias, np.broadcast_to(ratio * new_sw.astype(np.float64), (rows,)))
        if lay is None:
            return None
        target = lay.real[:sw.size] if sw.size == rows else lay.real[:1]
        new_sw = _nearest_float32(target / ratio, ratio, target)
        if b_real is not None:
            bias_scale = (np.float32(sx) * new_sw).astype(np.float32)
            bias = np.rint(b_real / np.broadcast_to(bias_scale.astype(np.float64), (rows,))).astype(np.int64)
        check = layout(bias, np.broadcast_to(ratio * new_sw.astype(np.float64), (rows,)))
        real = np.broadcast_to(ratio * new_sw.astype(np.float64), (rows,))
        if check is not None and (np.abs(check.real / real - 1) <= EXACT).all():
            return new_sw, bias, bias_scale
    return None


def _nearest_float32(values: np.ndarray, ratio: float, target: np.ndarray) -> np.ndarray:
    """For each value, the float32 among its nearest few whose multiplier (times ratio) is closest
    to target."""
    base = values.astype(np.float32)
    best, err = base, np.full(base.shape, np.inf)
    cand = base.copy()
    down = base.copy()
    for _ in range(3):
        for c in (cand, down):
            e = np.abs(ratio * c.astype(np.float64) / target - 1)
            take = e < err
            best, err = np.where(take, c, best), np.where(take, e, err)
        cand = np.nextafter(cand, np.float32(np.inf))
        down = np.nextafter(down, np.float32(0))
    return best.astype(np.float32)


def _replace(init: onnx.TensorProto, values: np.ndarray) -> None:
    init.CopyFrom(numpy_helper.from_array(values, init.name))
