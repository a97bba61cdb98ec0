"""Weight scales of the C int8 flow, moved so that requantization scales pack exactly.

`requant.channel_table` packs an output channel's bias and float32 requantization scale
((x_scale * w_scale) / y_scale in float32, as onnxruntime computes it) into one 32-bit word only
when the scale's mantissa fits the bits the bias leaves (15 to 23 below the leading one): the
kernels must read back the very float32 onnxruntime multiplies by. The QDQ model of our
onnxruntime int8 flow has arbitrary float32 weight scales, so before lowering, every per-channel
(or per-tensor) weight scale of an op that the fast kernels run is moved to a float32 nearby whose
requantization scale is such a number. The float32 steps of the product and the quotient skip
some points of that grid, so the nearest reachable one is taken: a move of at most GRID_STEPS
units of the layer's mantissa (< 2^-12 of the scale, far below the weights' own rounding). No int8
weight changes (w * s / s' rounds back to w for |w| <= 127), the int32 biases
are re-quantized with the new scales as the quantizer computes them (bias / (x_scale * w_scale)),
and onnxruntime runs the snapped model: the C kernels agree with it bit for bit, in half the bytes
per channel of {bias, scale} pairs.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from onnxc.backends.c import qdq
from onnxc.backends.c.requant import fits, mlas_scale, room
from onnxc.compiler.canonical import infer_shapes
from onnxc.compiler.graph import GraphView, attr

SEARCH = 3  # float32 steps tried each way around a weight scale's target
GRID_STEPS = tuple(k * sign for k in range(49) for sign in ((1,) if k == 0 else (-1, 1)))  # grid points, nearest first


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
    """(weight scales, int32 biases, bias scales) whose float32 requantization scales pack exactly,
    or None."""
    rows = b_int.size if b_int is not None else sw.size
    b_real = None if b_int is None else b_int.reshape(-1).astype(np.float64) * b_scale.reshape(-1).astype(np.float64)
    new_sw, bias, bias_scale = sw, np.zeros(rows, np.int64) if b_int is None else b_int.reshape(-1), b_scale
    for _ in range(4):  # a re-quantized bias may need one more bit: settle the layout
        scale = np.broadcast_to(mlas_scale(sx, new_sw, sy), (rows,))
        lay = room(bias, scale)
        if lay is None:
            return None
        if fits(scale, lay.mantissa_bits).all():
            return new_sw, bias, bias_scale
        new_sw = _fitting_weight_scales(sx, new_sw, sy, lay.mantissa_bits)
        if new_sw is None:
            return None
        if b_real is not None:
            bias_scale = (np.float32(sx) * new_sw).astype(np.float32)
            bias = np.rint(b_real / np.broadcast_to(bias_scale.astype(np.float64), (rows,))).astype(np.int64)
    return None


def _fitting_weight_scales(sx: np.float32, sw: np.ndarray, sy: np.float32, bits: int) -> np.ndarray | None:
    """For each weight scale, a float32 nearby whose requantization scale (`mlas_scale`) has a
    `bits`-bit mantissa, the one whose scale is closest to the original's; None when one has none.
    A grid point of `bits` bits is reached by a weight scale a few units of the last place around
    target * y_scale / x_scale, unless the float32 steps of the product and quotient skip it: then
    the next grid points are tried."""
    want = mlas_scale(sx, sw, sy).astype(np.float64)
    frac, exp = np.frexp(want)
    grid = np.rint(frac * 2.0 ** (bits + 1))  # want's nearest point of the grid, in its units
    best, err = np.zeros(want.shape, np.float32), np.full(want.shape, np.inf)
    for k in GRID_STEPS:
        target = np.ldexp(grid + k, exp - bits - 1)
        centre = (target * np.float64(sy) / np.float64(sx)).astype(np.float32)
        for direction in (np.float32(np.inf), np.float32(0)):
            cand = centre.copy()
            for _ in range(SEARCH):
                scale = mlas_scale(sx, cand, sy)
                e = np.abs(scale.astype(np.float64) / want - 1)
                take = fits(scale, bits) & (e < err)
                best, err = np.where(take, cand, best), np.where(take, e, err)
                cand = np.nextafter(cand, direction)
    return None if np.isinf(err).any() else best


def _replace(init: onnx.TensorProto, values: np.ndarray) -> None:
    init.CopyFrom(numpy_helper.from_array(values, init.name))
