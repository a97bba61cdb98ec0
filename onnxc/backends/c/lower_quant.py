"""int8 lowering: the ops `qdq.find` matches become integer kernels (onnxc_int8.c, onnxc_qconv.c),
the other QuantizeLinear / DequantizeLinear nodes become conversion steps, and the integer ONNX
ops (QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger) are lowered directly.

Requantization is onnxruntime's (`requant`: float32 scales, round half to even): the fast kernels
(depthwise, 1x1, im2col, dense) read one table of per output channel bias and scale
(`requant.channel_table`, packed in one word per channel where it fits), the generic ones an int32
bias and a float32 scale array.
Weights of the fast kernels are laid out in the order their loops read them (convolutions
through the GEMM core: `gemm_layout`; dense layers: `dense_layout`); their biases stay the layer's
own and the kernels take the input zero point off each input value, except in dense layers,
whose bias holds it (`_channels`). ONNX uint8 tensors are stored
as int8 (q - 128); uint8 graph inputs and outputs are converted at the boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from onnxc.backends.c import qcodes, qdq
from onnxc.backends.c.lower_nn import pool_fields, spatial_pads
from onnxc.backends.c.lowering import KERNEL_FILES, Lowerer, broadcast_strides, collapse, handles
from onnxc.backends.c.program import SCRATCH, Arg, Call, Int8Entry, Program
from onnxc.backends.c.requant import channel_table, mlas_scale, pool_scale
from onnxc.compiler.graph import attr
from onnxc.errors import OnnxcError

NULL = Arg("lit", "NULL")
KERNEL_FILES.update({fn: "onnxc_int8.c" for fn in (
    "onnxc_quantize", "onnxc_dequantize", "onnxc_dequantize_i32", "onnxc_u8_to_s8", "onnxc_s8_to_u8",
    "onnxc_qconv2d", "onnxc_qmatmul", "onnxc_qpool", "onnxc_qglobal_pool", "onnxc_qbinary")})
KERNEL_FILES.update({fn: "onnxc_qconv.c" for fn in (
    "onnxc_qconv2d_im2col", "onnxc_qconv_dw", "onnxc_qconv_dw_inplace", "onnxc_qconv1x1", "onnxc_qconv1x1_inplace",
    "onnxc_qdense")})
CTYPES = {TensorProto.INT8: "int8_t", TensorProto.UINT8: "uint8_t", TensorProto.INT32: "int32_t"}
ONE = qdq.QParams(np.ones(1, np.float32), np.zeros(1, np.int64))


@dataclass
class QuantState:
    matches: dict[str, qdq.Match] = field(default_factory=dict)
    alias: dict[str, str] = field(default_factory=dict)  # uint8 graph input/output -> its int8 storage


def plan(lo: Lowerer) -> None:
    """Declare the integer tensors, hand matched ops to `lower_match` and absorb their DQ/Q
    nodes; convert uint8 graph inputs. Runs before activation fusion."""
    lo.quant = state = QuantState()
    graph, view = lo.model.graph, lo.view
    if not any(n.op_type in qdq.QUANT_OPS for n in graph.node):
        return
    state.matches = qdq.find(lo.model)
    for m in state.matches.values():
        lo.special[m.node.output[0]] = lower_match
        lo.skip.update(m.absorbed)
    matched = set(state.matches)
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            users = view.consumers.get(node.output[0], [])
            if users and all(u.output[0] in matched for u in users) and node.output[0] not in view.graph_outputs:
                lo.skip.add(node.output[0])
        if node.op_type in ("QuantizeLinear", "QLinearConv", "QLinearMatMul"):
            lo.prog.dtypes[node.output[0]] = "int8_t"
        if node.op_type in ("ConvInteger", "MatMulInteger"):
            lo.prog.dtypes[node.output[0]] = "int32_t"
    for m in state.matches.values():
        lo.prog.dtypes[m.y] = "int8_t"
    for name in lo.prog.inputs + lo.prog.outputs:
        ctype = CTYPES.get(view.dtype(name))
        if ctype is None:
            continue
        lo.prog.dtypes[name] = ctype
        if ctype == "uint8_t":
            state.alias[name] = f"{name}__s8"
            lo.prog.dtypes[state.alias[name]] = "int8_t"
            lo.prog.shapes[name] = lo.prog.shapes[state.alias[name]] = lo.shape(name)
    for name in lo.prog.inputs:
        if name in state.alias:
            _convert(lo, "onnxc_u8_to_s8", name, state.alias[name])


def _convert(lo: Lowerer, fn: str, src: str, dst: str) -> None:
    for name in (src, dst):
        lo.prog.shapes.setdefault(name, lo.prog.shapes.get(src) or lo.prog.shapes.get(dst))
    lo.step(None, "Cast", [src], [dst], [Call(fn, [Arg.t(src), Arg.t(dst), lo.lit(lo.prog.size(src))])])


def q(lo: Lowerer, name: str) -> str:
    """The run-time tensor holding the int8 values of ONNX tensor `name`."""
    return lo.quant.alias.get(name, name)


def finish(lo: Lowerer, name: str) -> None:
    """After the step writing `name`: a uint8 graph output is converted from its int8 storage."""
    if name in lo.quant.alias and name in lo.prog.outputs:
        _convert(lo, "onnxc_s8_to_u8", lo.quant.alias[name], name)


# ---- numbers -------------------------------------------------------------------------------
def quantize_value(v: float, yq: qdq.QParams) -> int:
    """The int8 code of real value v (ties to even, saturated), as QuantizeLinear computes it."""
    if not np.isfinite(v):
        return 127 if v > 0 else -128
    return int(np.clip(np.rint(np.float32(v) / np.float32(yq.s)) + yq.z, -128, 127))


def dense_layout(w: np.ndarray) -> np.ndarray:
    """[rows][k] int8 weights as onnxc_qdense reads them: blocks of 4 rows, each as [k/4][4 rows][4 k]
    (a word of 4 consecutive k per row, which SXTB16 splits as it splits 4 inputs) then the k % 4
    last k as [k % 4][4 rows]; the rows left over plain."""
    rows, k = w.shape
    nb, k4 = rows // 4, k // 4 * 4
    blocks = w[:nb * 4].reshape(nb, 4, k)
    head = blocks[:, :, :k4].reshape(nb, 4, k // 4, 4).transpose(0, 2, 1, 3).reshape(nb, 4 * k4)
    tail = blocks[:, :, k4:].transpose(0, 2, 1).reshape(nb, 4 * (k - k4))
    return np.concatenate([np.concatenate([head, tail], axis=1).reshape(-1), w[nb * 4:].reshape(-1)]).astype(np.int8)


def gemm_order(k: int) -> np.ndarray:
    """For each of the kp stored positions of a GEMM weight row, the k index it holds (-1:
    padding): k in order, padded with zeros to kp (a multiple of 4), so that SXTB16 splits a weight
    word into the pairs (k0, k2), (k1, k3) that SMLAD takes with the gathered columns."""
    kp = -(-k // 4) * 4
    idx = np.arange(kp)
    return np.where(idx < k, idx, -1)


def gemm_layout(w: np.ndarray) -> np.ndarray:
    """[rows][k] int8 weights as the int8 GEMM kernels read them: rows of kp in `gemm_order`."""
    idx = gemm_order(w.shape[1])
    return np.where(idx >= 0, w[:, np.maximum(idx, 0)], 0).astype(np.int8)


def _gemm_weights(lo: Lowerer, rows: np.ndarray, hint: str) -> tuple[Arg, str]:
    """A GEMM layer's weights [m][k] in `gemm_order`: dense, or as 4-bit codes (qcodes) when its
    rows hold at most 16 values each; and the codebook table (or NULL)."""
    idx = gemm_order(rows.shape[1])
    coded = qcodes.row_codebooks(rows, idx.size)
    if coded is None:
        return _int8_const(lo, gemm_layout(rows).reshape(-1), f"w_{hint}"), "NULL"
    codes, book = coded
    lo.prog.coded_int8.append(hint)
    ordered = np.where(idx >= 0, codes[:, np.maximum(idx, 0)], 0)
    packed = qcodes.pack_nibbles(ordered).view(np.int8)
    return _int8_const(lo, packed, f"w_{hint}_codes"), lo.const_array(book.reshape(-1), f"{hint}_codebook")


def _clamp(lo: Lowerer, m: qdq.Match) -> tuple[int, int]:
    """The output range in the int8 domain: saturation, narrowed by a fused Relu / Clip."""
    if m.act is None:
        return -128, 127
    a, b = 0.0, math.inf
    if m.act.op_type == "Clip":
        if lo.opset < 11:
            a, b = attr(m.act, "min", -math.inf), attr(m.act, "max", math.inf)
        else:
            bounds = [lo.const(i) if len(m.act.input) > i and m.act.input[i] else None for i in (1, 2)]
            a = float(bounds[0].reshape(-1)[0]) if bounds[0] is not None else -math.inf
            b = float(bounds[1].reshape(-1)[0]) if bounds[1] is not None else math.inf
    low = quantize_value(a, m.yq) if a > -math.inf else -128
    high = quantize_value(b, m.yq) if b < math.inf else 127
    return low, high


def _bias_int(lo: Lowerer, name: str | None, acc_scale: np.ndarray, rows: int) -> np.ndarray:
    """The bias in accumulator units (int64 [rows]): the stored int32 when its DQ scale is the
    accumulator's, else the real bias re-quantized."""
    if name is None:
        return np.zeros(rows, np.int64)
    dq = lo.view.producers.get(name)
    if dq is not None and dq.op_type == "DequantizeLinear":
        stored, bq = lo.const(dq.input[0]), qdq.node_params(lo.view, dq)
        if (stored is not None and stored.dtype == np.int32 and bq is not None and not bq.zero_point.any()
                and np.allclose(np.broadcast_to(bq.scale, acc_scale.shape), acc_scale, rtol=1e-6, atol=0)):
            return np.broadcast_to(stored.reshape(-1).astype(np.int64), (rows,)).copy()
    real = np.broadcast_to(qdq.bias_value(lo.view, name).reshape(-1), (rows,))
    return np.rint(real / acc_scale).astype(np.int64)


def _rescale(lo: Lowerer, xq: qdq.QParams, yq: qdq.QParams, clamp: tuple[int, int], hint: str,
             count: int | None = None) -> Arg:
    """Pooling's rescale parameters; with `count` (global average pooling) the scale is
    QLinearGlobalAveragePool's, applied to the integer sum."""
    scale = float(pool_scale(xq.s, yq.s, count)) if count else xq.s / yq.s
    fields = {"x_zp": xq.z, "y_zp": yq.z, "lo": clamp[0], "hi": clamp[1], "scale": scale}
    return lo.params("onnxc_qrescale_p", fields, hint)


def _scale_table(lo: Lowerer, scale: np.ndarray, hint: str) -> dict:
    return {"scale": lo.const_array(np.asarray(scale, np.float32).reshape(-1), f"{hint}_scale")}


def _channels(lo: Lowerer, bias: np.ndarray, scale: np.ndarray, rows: np.ndarray, xq: qdq.QParams,
              hint: str, *, fold_zp: bool = False) -> tuple[Arg, dict]:
    """The fast kernels' per channel table (requant.channel_table) for weight rows [m][k] and
    float32 scales; with fold_zp the bias holds -x_zp * sum(row) too, for kernels that multiply the
    stored inputs as they are (the accumulator ends the same)."""
    if fold_zp:
        bias = bias - int(xq.z) * rows.astype(np.int64).sum(axis=1)
    try:
        table = channel_table(bias, scale)
    except ValueError as exc:
        raise OnnxcError(f"C backend: int8 layer '{hint}': {exc}") from None
    return Arg("const", lo.int_table(table.words, f"{hint}_ch")), table.fields


def _int8_const(lo: Lowerer, values: np.ndarray, hint: str) -> Arg:
    return Arg("const", lo.const_array(np.asarray(values).astype(np.int8).reshape(-1), hint))


def _bias_arg(lo: Lowerer, bias: np.ndarray, hint: str) -> Arg:
    if np.abs(bias).max(initial=0) >= 1 << 31:
        raise OnnxcError(f"C backend: int8 bias of '{hint}' is out of the int32 range")
    return Arg("const", lo.int_table(bias, f"{hint}_bias"))


# ---- matched ops -----------------------------------------------------------------------------
def lower_match(lo: Lowerer, node: onnx.NodeProto) -> None:
    m = lo.quant.matches[node.output[0]]
    op, y = node.op_type, q(lo, m.y)
    clamp = _clamp(lo, m)
    if op == "Conv":
        w, wq = m.weight
        conv(lo, node, node.input[0], q(lo, m.x[0]), m.xq[0], w, wq, m.bias, y, m.yq, clamp)
    elif op in ("Gemm", "MatMul"):
        _matched_dense(lo, node, m, y, clamp)
    elif op in ("GlobalAveragePool", "GlobalMaxPool"):
        xs = lo.shape(node.input[0])
        call = Call("onnxc_qglobal_pool", [Arg.t(q(lo, m.x[0])), Arg.t(y), lo.lit(xs[0] * xs[1]),
                                           lo.lit(math.prod(xs[2:])), lo.lit(int(op == "GlobalMaxPool")),
                                           _rescale(lo, m.xq[0], m.yq, clamp, node.name or y,
                                                    None if op == "GlobalMaxPool" else math.prod(xs[2:]))])
        lo.step(node, op, [q(lo, m.x[0])], [y], [call], inplace=0)
    elif op in ("MaxPool", "AveragePool"):
        fields, safe = pool_fields(lo, node, node.input[0], node.output[0])
        p = lo.params("onnxc_pool_p", fields, node.name or y)
        call = Call("onnxc_qpool", [Arg.t(q(lo, m.x[0])), Arg.t(y), p,
                                    _rescale(lo, m.xq[0], m.yq, clamp, node.name or y)])
        lo.step(node, op, [q(lo, m.x[0])], [y], [call], inplace=0 if safe else None)
    elif op in qdq.BINARY:
        _binary(lo, node, m, y, clamp)
    else:  # views
        if m.y in lo.view.graph_outputs:
            raise lo.unsupported(node, "int8 view as a graph output")
        lo.view_step(node, q(lo, m.x[0]), y)
    finish(lo, m.y)


def _matched_dense(lo: Lowerer, node: onnx.NodeProto, m: qdq.Match, y: str, clamp: tuple[int, int]) -> None:
    w, wq = m.weight
    alpha, beta = (attr(node, "alpha", 1.0), attr(node, "beta", 1.0)) if node.op_type == "Gemm" else (1.0, 1.0)
    rows = w if node.op_type == "Gemm" and attr(node, "transB", 0) else w.T  # [n][k]
    xs = lo.shape(node.input[0])
    if node.op_type == "Gemm" and len(xs) != 2:
        raise lo.unsupported(node, "Gemm input of rank other than 2")
    acc_scale = np.float64(m.xq[0].s) * np.broadcast_to(wq.scale.astype(np.float64), (rows.shape[0],))
    # onnxruntime's QGemm: alpha * x_scale * w_scale / y_scale, step by step in float32
    scale = np.broadcast_to(mlas_scale(np.float32(alpha) * np.float32(m.xq[0].s), wq.scale, m.yq.s), (rows.shape[0],))
    bias = np.zeros(rows.shape[0], np.int64)
    if m.bias is not None:
        value = qdq.bias_value(lo.view, m.bias)
        if value.size != rows.shape[0]:
            raise lo.unsupported(node, "bias not one value per output column")
        bias = (_bias_int(lo, m.bias, acc_scale, rows.shape[0]) if alpha == 1.0 and beta == 1.0
                else np.rint(beta * value.reshape(-1) / (alpha * acc_scale)).astype(np.int64))
    dense(lo, node, q(lo, m.x[0]), m.xq[0], rows, bias, scale, y, m.yq, clamp,
          math.prod(xs[:-1]) if xs else 1)


def dense(lo: Lowerer, node: onnx.NodeProto, x: str, xq: qdq.QParams, rows: np.ndarray, bias: np.ndarray,
          scale: np.ndarray, y: str, yq: qdq.QParams, clamp: tuple[int, int], m: int) -> None:
    """y[m][n] = requant(x[m][k] . rows[n][k] + bias[n]) with weights in flash."""
    n, k = rows.shape
    hint = node.name or y
    coded = qcodes.row_codebooks(rows)
    ch, pk = _channels(lo, bias, scale, rows, xq, hint, fold_zp=coded is None)
    x_zp = xq.z
    if coded is None:  # the input zero point is in the bias
        wa, book, x_zp = _int8_const(lo, dense_layout(rows), f"w_{hint}"), "NULL", 0
    else:  # plain rows of codes, (k + 1) / 2 bytes each
        lo.prog.coded_int8.append(hint)
        packed = np.concatenate([qcodes.pack_nibbles(r) for r in coded[0]]).view(np.int8)
        wa, book = _int8_const(lo, packed, f"w_{hint}_codes"), lo.const_array(coded[1].reshape(-1), f"{hint}_codebook")
    fields = {"m": m, "n": n, "k": k, "x_zp": x_zp, "y_zp": yq.z, "lo": clamp[0], "hi": clamp[1], **pk,
              "codebook": book}
    call = Call("onnxc_qdense", [Arg.t(x), wa, ch, Arg.t(y), lo.params("onnxc_qdense_p", fields, hint)])
    lo.step(node, node.op_type, [x], [y], [call])


def conv(lo: Lowerer, node: onnx.NodeProto, x_onnx: str, x: str, xq: qdq.QParams, w: np.ndarray, wq: qdq.QParams,
         bias: str | np.ndarray | None, y: str, yq: qdq.QParams | None, clamp: tuple[int, int]) -> None:
    """An int8 convolution (yq None: raw int32 sums, ConvInteger) with the fastest kernel that
    applies: 1x1, depthwise, or any."""
    xs, ys = lo.shape(x_onnx), lo.shape(node.output[0])
    if len(xs) not in (3, 4):
        raise lo.unsupported(node, f"{len(xs) - 2}-D convolution")
    r = len(xs) - 2
    kernel, strides = list(w.shape[2:]), list(attr(node, "strides", [1] * r))
    dil = list(attr(node, "dilations", [1] * r))
    begin, _ = spatial_pads(node, xs[2:], kernel, strides, dil, ys[2:])
    if r == 1:
        xs, ys, kernel, strides, dil, begin = (xs[:2] + (1,) + xs[2:], ys[:2] + (1,) + ys[2:], [1] + kernel,
                                               [1] + strides, [1] + dil, [0] + begin)
    c, m, group = xs[1], ys[1], attr(node, "group", 1)
    hint = node.name or y
    acc_scale = np.float64(xq.s) * np.broadcast_to(wq.scale.astype(np.float64), (m,))
    if isinstance(bias, np.ndarray):
        bias_q = bias.astype(np.int64).reshape(-1)
    else:
        bias_q = _bias_int(lo, bias, acc_scale, m)
    wzp = np.broadcast_to(wq.zero_point, (m,))
    fields = {"n": xs[0], "c": c, "h": xs[2], "w": xs[3], "m": m, "oh": ys[2], "ow": ys[3], "kh": kernel[0],
              "kw": kernel[1], "sh": strides[0], "sw": strides[1], "dh": dil[0], "dw": dil[1], "pt": begin[0],
              "pl": begin[1], "group": group, "x_zp": xq.z, "y_zp": yq.z if yq else 0, "lo": clamp[0],
              "hi": clamp[1], "scale": "NULL",
              "w_zp": lo.int_table(wzp, f"{hint}_wzp") if wzp.any() else "NULL"}
    fast = yq is not None and not wzp.any()
    if fast:
        ba, pk = _channels(lo, bias_q, mlas_scale(xq.s, np.broadcast_to(wq.scale, (m,)), yq.s),
                           w.reshape(m, -1), xq, hint)
        fields.update(pk)
    elif yq is not None:
        fields.update(_scale_table(lo, mlas_scale(xq.s, np.broadcast_to(wq.scale, (m,)), yq.s), hint))
    depthwise = fast and group == c == m
    if fast and not depthwise:
        wa, fields["codebook"] = _gemm_weights(lo, w.reshape(m, -1), hint)
    p = lo.params("onnxc_qconv_p", fields, hint)
    scratch = Arg(SCRATCH, "int8_t")
    if depthwise:
        wa = _int8_const(lo, w, f"w_{hint}")
        padded = [(ys[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 for i in range(2)]
        words = -(-padded[0] * padded[1] // 4)  # the padded plane
        inplace = {}
        if ys[2] * ys[3] <= xs[2] * xs[3]:
            inplace = {"inplace": 0, "inplace_scratch": words,
                       "inplace_calls": [Call("onnxc_qconv_dw_inplace", [Arg.t(y), wa, ba, scratch, p])]}
        lo.step(node, node.op_type, [x], [y], [Call("onnxc_qconv_dw", [Arg.t(x), wa, ba, Arg.t(y), scratch, p])],
                scratch=words, **inplace)
        return
    if fast:  # GEMM over gathered pixel pairs: 1x1 directly, any other through im2col
        k = w[0].size
        words = 2 * -(-k // 4) * 4 + 2 * (m // group)  # four int16 columns of kp values, the decoded channels
        if fields["codebook"] != "NULL":
            words += -(-k // 4)  # one decoded weight row
        if kernel == [1, 1] and strides == [1, 1] and begin == [0, 0] and group == 1 and ys[2:] == xs[2:]:
            inplace = {"inplace": 0, "inplace_scratch": words,
                       "inplace_calls": [Call("onnxc_qconv1x1_inplace", [Arg.t(y), wa, ba, scratch, p])]}
            lo.step(node, node.op_type, [x], [y], [Call("onnxc_qconv1x1", [Arg.t(x), wa, ba, Arg.t(y), scratch, p])],
                    scratch=words, **(inplace if m <= c else {}))
        else:  # and a window of kp bytes
            lo.step(node, node.op_type, [x], [y], [Call("onnxc_qconv2d_im2col", [Arg.t(x), wa, ba, Arg.t(y),
                                                                                 scratch, p])],
                    scratch=words + -(-k // 4))
        return
    wa = _int8_const(lo, w, f"w_{hint}")
    ba = _bias_arg(lo, bias_q, hint) if bias is not None else NULL
    outs = [Arg.t(y), NULL] if yq is not None else [NULL, Arg.t(y)]
    lo.step(node, node.op_type, [x], [y], [Call("onnxc_qconv2d", [Arg.t(x), wa, ba, *outs, p])])


def _binary(lo: Lowerer, node: onnx.NodeProto, m: qdq.Match, y: str, clamp: tuple[int, int]) -> None:
    a, b = node.input[0], node.input[1]
    out = lo.shape(node.output[0])
    dims, (sa, sb) = collapse(list(out), [broadcast_strides(lo.shape(a), out), broadcast_strides(lo.shape(b), out)])
    if len(dims) > 6:
        raise lo.unsupported(node, "broadcast over > 6 dims")
    (aq, bq), yq = m.xq, m.yq
    mul = node.op_type == "Mul"
    fields = {"op": 2 if mul else 0, "rank": len(dims), "dims": dims, "sa": sa, "sb": sb, "a_zp": aq.z, "b_zp": bq.z,
              "y_zp": yq.z, "lo": clamp[0], "hi": clamp[1],
              "a_scale": aq.s * bq.s / yq.s if mul else aq.s / yq.s, "b_scale": 0.0 if mul else bq.s / yq.s}
    xa, xb = q(lo, m.x[0]), q(lo, m.x[1])
    call = Call("onnxc_qbinary", [Arg.t(xa), Arg.t(xb), Arg.t(y), lo.params("onnxc_qbinary_p", fields,
                                                                              node.name or y)])
    same = [i for i, name in enumerate((a, b)) if lo.shape(name) == out]
    inplace = same[0] if same and xa != xb else None
    lo.step(node, node.op_type, [xa, xb], [y], [call], inplace=inplace)


# ---- QuantizeLinear / DequantizeLinear ---------------------------------------------------------
def _quant_fields(lo: Lowerer, node: onnx.NodeProto, qp: qdq.QParams, shape: tuple[int, ...]) -> dict:
    if qp.per_tensor:
        outer, length, inner = 1, 1, math.prod(shape)
    else:
        axis = qp.axis
        outer, length, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
        if length != qp.scale.size:
            raise lo.unsupported(node, "scale length does not match the axis")
    hint = node.name or node.output[0]
    return {"outer": outer, "len": length, "inner": inner,
            "scale": lo.const_array(qp.scale.astype(np.float32), f"{hint}_scale"),
            "zp": lo.int_table(qp.zero_point, f"{hint}_zp"), "lo": -128, "hi": 127}


@handles("QuantizeLinear")
def quantize(lo: Lowerer, node: onnx.NodeProto) -> None:
    qp = qdq.node_params(lo.view, node)
    if qp is None or qdq.INT8_TYPES.get(lo.view.dtype(node.output[0])) is None:
        raise lo.unsupported(node, "only int8/uint8 outputs with constant scale and zero point")
    x, y = node.input[0], q(lo, node.output[0])
    p = lo.params("onnxc_quant_p", _quant_fields(lo, node, qp, lo.shape(x)), node.name or y)
    lo.step(node, "QuantizeLinear", [x], [y], [Call("onnxc_quantize", [lo.ref(x), Arg.t(y), p])])
    if qp.per_tensor:
        lo.prog.qparams[y] = (qp.s, qp.z)
    finish(lo, node.output[0])


@handles("DequantizeLinear")
def dequantize(lo: Lowerer, node: onnx.NodeProto) -> None:
    qp = qdq.node_params(lo.view, node)
    if qp is None or lo.is_const(node.input[0]):
        raise lo.unsupported(node, "only int8/uint8/int32 run-time inputs with constant scale and zero point")
    x, y = q(lo, node.input[0]), lo.out(node)
    if x not in lo.prog.dtypes:
        raise lo.unsupported(node, "input is not an integer tensor")
    p = lo.params("onnxc_quant_p", _quant_fields(lo, node, qp, lo.shape(node.input[0])), node.name or y)
    fn = "onnxc_dequantize_i32" if lo.prog.dtypes[x] == "int32_t" else "onnxc_dequantize"
    lo.step(node, "DequantizeLinear", [x], [y], [Call(fn, [Arg.t(x), Arg.t(y), p])])
    if qp.per_tensor and lo.prog.dtypes[x] == "int8_t":
        lo.prog.qparams[x] = (qp.s, qp.z)


def int8_entry(prog: Program) -> Int8Entry | None:
    """`NAME_run_int8` when the program quantizes its one float input first (after views of it,
    such as a Flatten) and dequantizes its one float output last, and nothing else touches them."""
    if len(prog.inputs) != 1 or len(prog.outputs) != 1:
        return None
    first = next((i for i, s in enumerate(prog.steps) if s.view is None), len(prog.steps))
    if first >= len(prog.steps) - 1:
        return None
    head, last = prog.steps[first], prog.steps[-1]
    x, y = prog.inputs[0], prog.outputs[0]
    if (head.op != "QuantizeLinear" or last.op != "DequantizeLinear" or last.outputs != [y]
            or prog.ctype(x) != "float" or prog.ctype(y) != "float"):
        return None
    xq, yq = head.outputs[0], last.inputs[0]
    if xq not in prog.qparams or yq not in prog.qparams or xq in prog.outputs:
        return None
    inside = {o for s in prog.steps[:first + 1] for o in s.outputs} | {x}
    if any(inside & set(s.inputs) - {xq} or y in s.outputs or y in s.inputs for s in prog.steps[first + 1:-1]):
        return None
    return Int8Entry(first, xq, yq, *prog.qparams[xq], *prog.qparams[yq])


# ---- integer ONNX ops --------------------------------------------------------------------------
def _params(lo: Lowerer, node: onnx.NodeProto, scale: int | None, zp: int | None, data: int,
            axis: int | None = None) -> qdq.QParams:
    """QParams from a QLinear/Integer op's inputs (scale None: 1, for the Integer ops)."""
    zp_name = node.input[zp] if zp is not None and len(node.input) > zp and node.input[zp] else None
    dtype = qdq.INT8_TYPES.get(lo.view.dtype(node.input[data]))
    if dtype is None:
        raise lo.unsupported(node, f"input {data} is not int8/uint8")
    if scale is None:
        value = lo.const(zp_name) if zp_name else np.zeros(1, dtype)
        if value is None:
            raise lo.unsupported(node, "zero point computed at run time")
        return qdq.QParams(np.ones(value.size, np.float32), qdq.to_int8(value).reshape(-1), axis)
    qp = qdq.quant_params(lo.view, node.input[scale], zp_name, dtype, axis)
    if qp is None:
        raise lo.unsupported(node, "scale or zero point computed at run time")
    return qp


def _const_weight(lo: Lowerer, node: onnx.NodeProto, i: int) -> np.ndarray:
    w = lo.const(node.input[i])
    if w is None:
        raise lo.unsupported(node, "weights computed at run time")
    return qdq.to_int8(w)


@handles("QLinearConv", "ConvInteger")
def qlinear_conv(lo: Lowerer, node: onnx.NodeProto) -> None:
    x_onnx = node.input[0]
    if node.op_type == "QLinearConv":
        xq, wq, yq = _params(lo, node, 1, 2, 0), _params(lo, node, 4, 5, 3, axis=0), _params(lo, node, 6, 7, 0)
        w = _const_weight(lo, node, 3)
        bias = lo.const(node.input[8]) if len(node.input) > 8 and node.input[8] else None
        if len(node.input) > 8 and node.input[8] and bias is None:
            raise lo.unsupported(node, "bias computed at run time")
    else:
        xq, wq, yq = _params(lo, node, None, 2, 0), _params(lo, node, None, 3, 1, axis=0), None
        w, bias = _const_weight(lo, node, 1), None
    y = q(lo, node.output[0])
    conv(lo, node, x_onnx, q(lo, x_onnx), xq, w, wq, bias, y, yq, (-128, 127))
    finish(lo, node.output[0])


@handles("QLinearMatMul", "MatMulInteger")
def qlinear_matmul(lo: Lowerer, node: onnx.NodeProto) -> None:
    if node.op_type == "QLinearMatMul":
        a, b = node.input[0], node.input[3]
        aq, bq, yq = _params(lo, node, 1, 2, 0), _params(lo, node, 4, 5, 3, axis=1), _params(lo, node, 6, 7, 0)
    else:
        a, b = node.input[0], node.input[1]
        aq, bq, yq = _params(lo, node, None, 2, 0), _params(lo, node, None, 3, 1, axis=1), None
    if not aq.per_tensor or (yq is not None and not yq.per_tensor):
        raise lo.unsupported(node, "per-row scales of the first input")
    a_s, b_s = lo.shape(a), lo.shape(b)
    y = q(lo, node.output[0])
    bconst = lo.const(b)
    if yq is not None and bconst is not None and bconst.ndim == 2 and not bq.zero_point.any():
        n = b_s[1]
        scale = mlas_scale(aq.s, np.broadcast_to(bq.scale, (n,)), yq.s)
        dense(lo, node, q(lo, a), aq, qdq.to_int8(bconst).T, np.zeros(n, np.int64), scale, y, yq, (-128, 127),
              math.prod(a_s[:-1]) if len(a_s) > 1 else 1)
        finish(lo, node.output[0])
        return
    if not bq.per_tensor and bq.zero_point.any():
        raise lo.unsupported(node, "per-column zero points of the second input")
    a2 = (1,) + a_s if len(a_s) == 1 else a_s
    b2 = b_s + (1,) if len(b_s) == 1 else b_s
    m, k, n = a2[-2], a2[-1], b2[-1]
    batch_shape = tuple(np.broadcast_shapes(a2[:-2], b2[:-2]))
    batch = math.prod(batch_shape)
    hint = node.name or y
    a_off = b_off = "NULL"
    if batch > 1:
        idx = np.indices(batch_shape).reshape(len(batch_shape), -1).T
        a_off = lo.int_table(idx @ np.array([m * k * s for s in broadcast_strides(a2[:-2], batch_shape)]), f"{hint}_a")
        b_off = lo.int_table(idx @ np.array([k * n * s for s in broadcast_strides(b2[:-2], batch_shape)]), f"{hint}_b")
    fields = {"batch": batch, "m": m, "n": n, "k": k, "a_off": a_off, "b_off": b_off, "a_zp": aq.z, "b_zp": bq.z,
              "y_zp": yq.z if yq else 0, "lo": -128, "hi": 127, "scale": "NULL"}
    if yq is not None:
        fields.update(_scale_table(lo, mlas_scale(aq.s, np.broadcast_to(bq.scale, (n,)), yq.s), hint))
    b_arg = _int8_const(lo, bconst, f"b_{hint}") if bconst is not None else Arg.t(q(lo, b))
    outs = [Arg.t(y), NULL] if yq is not None else [NULL, Arg.t(y)]
    inputs = [q(lo, a)] + ([] if bconst is not None else [q(lo, b)])
    lo.step(node, node.op_type, inputs, [y], [Call("onnxc_qmatmul", [Arg.t(q(lo, a)), b_arg, *outs,
                                                                     lo.params("onnxc_qmatmul_p", fields, hint)])])
    finish(lo, node.output[0])
