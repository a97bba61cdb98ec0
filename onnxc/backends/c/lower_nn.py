"""Compute ops: Conv, Gemm, MatMul, pooling, Softmax, standalone BatchNormalization, LRN."""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnxc.backends.c.lower_layout import strides_of
from onnxc.backends.c.lowering import Lowerer, broadcast_strides, collapse, handles, text_attr
from onnxc.backends.c.program import SCRATCH, Arg, Call
from onnxc.compiler.graph import attr

NULL = Arg("lit", "NULL")


def _opt(node: onnx.NodeProto, i: int) -> str | None:
    return node.input[i] if len(node.input) > i and node.input[i] else None


def spatial_pads(node: onnx.NodeProto, spatial: tuple[int, ...], kernel: list[int], strides: list[int],
                 dilations: list[int], out: tuple[int, ...] | None = None) -> tuple[list[int], list[int]]:
    """Padding before and after each spatial dim, from `pads` or `auto_pad`."""
    r = len(spatial)
    auto = text_attr(node, "auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(r):
            o = out[i] if out is not None else -(-spatial[i] // strides[i])
            total = max(0, (o - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial[i])
            small = total // 2
            begin.append(small if auto == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        return begin, end
    if auto == "VALID":
        return [0] * r, [0] * r
    pads = list(attr(node, "pads", [0] * 2 * r))
    return pads[:r], pads[r:]


def _conv_geometry(lo: Lowerer, node: onnx.NodeProto, what: str) -> tuple[tuple[int, ...], tuple[int, ...],
                                                                            list[int], list[int], list[int]]:
    """Input and output shapes, kernel, strides and dilations of a 1-D or 2-D Conv/ConvTranspose."""
    xs, ws, ys = lo.shape(node.input[0]), lo.weight_shape(node.input[1]), lo.shape(lo.out(node))
    if len(xs) not in (3, 4):
        raise lo.unsupported(node, f"{len(xs) - 2}-D {what}")
    if not lo.is_const(node.input[1]):
        raise lo.unsupported(node, "weights computed at run time")
    r = len(xs) - 2
    return xs, ys, list(ws[2:]), list(attr(node, "strides", [1] * r)), list(attr(node, "dilations", [1] * r))


def _conv_params(lo: Lowerer, node: onnx.NodeProto, xs: tuple[int, ...], ys: tuple[int, ...], kernel: list[int],
                 strides: list[int], dil: list[int], begin: list[int]) -> tuple[Arg, dict]:
    """The kernels' `onnxc_conv_p` (and its fields); a 1-D convolution is a 2-D one of height 1."""
    if len(xs) == 3:
        xs, ys, kernel, strides, dil, begin = (xs[:2] + (1,) + xs[2:], ys[:2] + (1,) + ys[2:], [1] + kernel,
                                               [1] + strides, [1] + dil, [0] + begin)
    fields = {"n": xs[0], "c": xs[1], "h": xs[2], "w": xs[3], "m": ys[1], "oh": ys[2], "ow": ys[3],
              "kh": kernel[0], "kw": kernel[1], "sh": strides[0], "sw": strides[1], "dh": dil[0], "dw": dil[1],
              "pt": begin[0], "pl": begin[1], "group": attr(node, "group", 1), **lo.act(node)}
    return lo.params("onnxc_conv_p", fields, node.name or lo.out(node)), fields


@handles("Conv")
def conv(lo: Lowerer, node: onnx.NodeProto) -> None:
    x, w, b, y = node.input[0], node.input[1], _opt(node, 2), lo.out(node)
    xs, ys, kernel, strides, dil = _conv_geometry(lo, node, "convolution")
    begin, _ = spatial_pads(node, xs[2:], kernel, strides, dil, ys[2:])
    p, f = _conv_params(lo, node, xs, ys, kernel, strides, dil, begin)
    c, h, wd, m, oh, ow, group = (f[k] for k in ("c", "h", "w", "m", "oh", "ow", "group"))
    weight = lo.weight(w, lambda a: a)
    bias = lo.ref(b) if b else NULL
    pointwise = [f[k] for k in ("kh", "kw", "sh", "sw", "pt", "pl")] == [1, 1, 1, 1, 0, 0] and group == 1 \
        and (oh, ow) == (h, wd)
    kernel = "onnxc_conv1x1" if pointwise else "onnxc_conv2d"
    calls = [Call(kernel, [lo.ref(x), weight, bias, Arg.t(y), p])]
    inplace = {}
    if group == c == m and oh * ow <= h * wd:  # scratch: one zero-padded input plane
        padded = ((oh - 1) * f["sh"] + (f["kh"] - 1) * f["dh"] + 1) * ((ow - 1) * f["sw"] + (f["kw"] - 1) * f["dw"] + 1)
        inplace = {"inplace": 0, "inplace_scratch": padded,
                   "inplace_calls": [Call("onnxc_depthwise_inplace", [Arg.t(y), weight, bias, Arg(SCRATCH), p])]}
    elif pointwise and m <= c:
        tiled = h * wd > 4  # scratch: four pixels' outputs (the one-pixel kernel: one pixel's inputs)
        fn = "onnxc_conv1x1_tiled_inplace" if tiled else "onnxc_conv1x1_inplace"
        inplace = {"inplace": 0, "inplace_scratch": 4 * m if tiled else c,
                   "inplace_calls": [Call(fn, [Arg.t(y), weight, bias, Arg(SCRATCH), p])]}
    lo.step(node, "Conv", [x], [y], calls, **inplace)


@handles("ConvTranspose")
def conv_transpose(lo: Lowerer, node: onnx.NodeProto) -> None:
    x, w, b, y = node.input[0], node.input[1], _opt(node, 2), lo.out(node)
    xs, ys, kernel, strides, dil = _conv_geometry(lo, node, "transposed convolution")
    r = len(xs) - 2
    group = attr(node, "group", 1)
    out_pad = list(attr(node, "output_padding", [0] * r))
    auto = text_attr(node, "auto_pad", "NOTSET")
    begin = []
    for i in range(r):
        total = strides[i] * (xs[2 + i] - 1) + out_pad[i] + (kernel[i] - 1) * dil[i] + 1 - ys[2 + i]
        if auto == "NOTSET" and attr(node, "output_shape") is None:
            begin.append(list(attr(node, "pads", [0] * 2 * r))[i])
        elif auto == "SAME_UPPER":
            begin.append(total // 2)
        else:  # SAME_LOWER, or output_shape given: more padding at the head (onnxruntime)
            begin.append(total - total // 2)
    c, m = xs[1], ys[1]
    cg, mg = c // group, m // group

    def conv_layout(a: np.ndarray) -> np.ndarray:  # [C, M/g, k...] -> [M, C/g, k...]
        k = a.shape[2:]
        return a.reshape(group, cg, mg, *k).swapaxes(1, 2).reshape(m, cg, *k)

    p, _ = _conv_params(lo, node, xs, ys, kernel, strides, dil, begin)
    call = Call("onnxc_conv_transpose2d", [lo.ref(x), lo.weight(w, conv_layout), lo.ref(b) if b else NULL,
                                           Arg.t(y), p])
    lo.step(node, "ConvTranspose", [x], [y], [call])


def _dense_call(lo: Lowerer, node: onnx.NodeProto, x: str, y: str, weight: Arg, bias: Arg, m: int, n: int,
                k: int) -> None:
    p = lo.params("onnxc_dense_p", {"m": m, "n": n, "k": k, **lo.act(node)}, node.name or y)
    lo.step(node, node.op_type, [x], [y], [Call("onnxc_dense", [lo.ref(x), weight, bias, Arg.t(y), p])])


@handles("Gemm")
def gemm(lo: Lowerer, node: onnx.NodeProto) -> None:
    a, b, c = node.input[0], node.input[1], _opt(node, 2)
    y = lo.out(node)
    ta, tb = attr(node, "transA", 0), attr(node, "transB", 0)
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    a_s = lo.shape(a)
    b_s = lo.weight_shape(b)
    m, k = (a_s[1], a_s[0]) if ta else a_s
    n = b_s[0] if tb else b_s[1]
    bias_row = None
    if c is not None and lo.is_const(c):
        cv = np.broadcast_to(lo.const(c), (m, n))
        if (cv == cv[:1]).all():
            bias_row = (np.float32(beta) * cv[0].astype(np.float32)).astype(np.float32)
    if lo.is_const(b) and not ta and not lo.is_const(a) and (c is None or bias_row is not None):
        weight = lo.weight(b, (lambda w: w) if tb else (lambda w: w.T), scale=alpha)
        bias = lo.float_const(bias_row, f"{node.name or y}_bias") if bias_row is not None else NULL
        _dense_call(lo, node, a, y, weight, bias, m, n, k)
        return
    b_ref = lo.ref(b)
    fields = {"batch": 1, "m": m, "n": n, "k": k,
              "a_rs": 1 if ta else k, "a_cs": m if ta else 1,
              "b_rs": 1 if tb else n, "b_cs": k if tb else 1,
              "c_rs": 0, "c_cs": 0, "a_off": "NULL", "b_off": "NULL", "alpha": alpha, "beta": beta,
              **lo.act(node)}
    c_arg = NULL
    if c is not None:
        cs = (1,) * (2 - len(lo.shape(c))) + lo.shape(c)
        fields["c_rs"] = 0 if cs[0] == 1 else cs[1]
        fields["c_cs"] = 0 if cs[1] == 1 else 1
        c_arg = lo.ref(c)
    p = lo.params("onnxc_matmul_p", fields, node.name or y)
    lo.step(node, "Gemm", [a, b] + ([c] if c else []), [y], [Call("onnxc_matmul", [lo.ref(a), b_ref, c_arg,
                                                                                    Arg.t(y), p])])


@handles("MatMul")
def matmul(lo: Lowerer, node: onnx.NodeProto) -> None:
    a, b = node.input[0], node.input[1]
    y = lo.out(node)
    a_s, b_s = lo.shape(a), lo.weight_shape(b)
    if lo.is_const(b) and len(b_s) <= 2 and not lo.is_const(a) and len(a_s) >= 1:
        k = b_s[0]
        n = b_s[1] if len(b_s) == 2 else 1
        m = int(np.prod(a_s[:-1], dtype=np.int64)) if len(a_s) > 1 else 1
        weight = lo.weight(b, lambda w: w.T if w.ndim == 2 else w.reshape(1, -1))
        _dense_call(lo, node, a, y, weight, NULL, m, n, k)
        return
    a2 = (1,) + a_s if len(a_s) == 1 else a_s
    b2 = b_s + (1,) if len(b_s) == 1 else b_s
    m, k, n = a2[-2], a2[-1], b2[-1]
    batch_shape = tuple(np.broadcast_shapes(a2[:-2], b2[:-2]))
    batch = int(np.prod(batch_shape, dtype=np.int64))
    a_off = b_off = "NULL"
    if batch > 1:
        idx = np.indices(batch_shape).reshape(len(batch_shape), -1).T if batch_shape else np.zeros((1, 0), int)
        sa = [m * k * s for s in broadcast_strides(a2[:-2], batch_shape)]
        sb = [k * n * s for s in broadcast_strides(b2[:-2], batch_shape)]
        a_off = lo.int_table(idx @ np.array(sa, dtype=np.int64), f"{node.name or y}_aoff")
        b_off = lo.int_table(idx @ np.array(sb, dtype=np.int64), f"{node.name or y}_boff")
    fields = {"batch": batch, "m": m, "n": n, "k": k, "a_rs": k, "a_cs": 1, "b_rs": n, "b_cs": 1, "c_rs": 0,
              "c_cs": 0, "a_off": a_off, "b_off": b_off, "alpha": 1.0, "beta": 0.0, **lo.act(node)}
    p = lo.params("onnxc_matmul_p", fields, node.name or y)
    lo.step(node, "MatMul", [a, b], [y], [Call("onnxc_matmul", [lo.ref(a), lo.ref(b), NULL, Arg.t(y), p])])


@handles("MaxPool", "AveragePool")
def pool(lo: Lowerer, node: onnx.NodeProto) -> None:
    x, y = node.input[0], lo.out(node)
    fields, safe = pool_fields(lo, node, x, y)
    p = lo.params("onnxc_pool_p", fields, node.name or y)
    lo.step(node, node.op_type, [x], [y], [Call("onnxc_pool", [lo.ref(x), Arg.t(y), p])],
            inplace=0 if safe else None)


def pool_fields(lo: Lowerer, node: onnx.NodeProto, x: str, y: str) -> tuple[dict, bool]:
    """`onnxc_pool_p` fields of a MaxPool/AveragePool, and whether it may run in place."""
    if len(node.output) > 1 and node.output[1]:
        raise lo.unsupported(node, "Indices output")
    xs, ys = lo.shape(x), lo.shape(y)
    r = len(xs) - 2
    if not 1 <= r <= 3:
        raise lo.unsupported(node, f"{r}-D pooling")
    kernel = list(attr(node, "kernel_shape"))
    strides = list(attr(node, "strides", [1] * r))
    dil = list(attr(node, "dilations", [1] * r))
    begin, end = spatial_pads(node, xs[2:], kernel, strides, dil, ys[2:])
    pad3 = [1] * (3 - r)
    zero3 = [0] * (3 - r)
    ins, outs = pad3 + list(xs[2:]), pad3 + list(ys[2:])
    k3, s3, d3 = pad3 + kernel, pad3 + strides, pad3 + dil
    b3, e3 = zero3 + begin, zero3 + end
    fields = {"planes": xs[0] * xs[1], "id": ins[0], "ih": ins[1], "iw": ins[2], "od": outs[0], "oh": outs[1],
              "ow": outs[2], "kd": k3[0], "kh": k3[1], "kw": k3[2], "sd": s3[0], "sh": s3[1], "sw": s3[2],
              "dd": d3[0], "dh": d3[1], "dw": d3[2], "pd": b3[0], "ph": b3[1], "pw": b3[2], "ed": e3[0],
              "eh": e3[1], "ew": e3[2], "is_max": int(node.op_type == "MaxPool"),
              "count_include_pad": attr(node, "count_include_pad", 0)}
    return fields, pool_in_place_safe(ins, outs, k3, s3, d3, b3)


def pool_in_place_safe(ins: list[int], outs: list[int], kernel: list[int], strides: list[int], dil: list[int],
                       begin: list[int]) -> bool:
    """Whether pooling may overwrite its input: the kernel computes output j from its window and
    then writes address j, so every later output's window must start above j. Checking one plane
    suffices: plane c is written at c*out_plane <= c*in_plane where it is read."""
    if math.prod(outs) > math.prod(ins) or math.prod(outs) > 1 << 20:
        return False
    grids = np.meshgrid(*[np.arange(o) for o in outs], indexing="ij")
    first = np.zeros(outs, dtype=np.int64)
    for d in range(3):  # lowest in-bounds input coordinate of each window, per dim
        start = grids[d] * strides[d] - begin[d]
        taps = start[..., None] + np.arange(kernel[d]) * dil[d]
        valid = (taps >= 0) & (taps < ins[d])
        low = np.where(valid, taps, np.iinfo(np.int64).max).min(axis=-1)
        if (low == np.iinfo(np.int64).max).any():
            return False
        first = first * ins[d] + low
    first = first.reshape(-1)
    later_min = np.minimum.accumulate(first[::-1])[::-1]  # min over outputs k >= j
    return bool((later_min[1:] > np.arange(first.size - 1)).all())


@handles("GlobalAveragePool", "GlobalMaxPool")
def global_pool(lo: Lowerer, node: onnx.NodeProto) -> None:
    x, y = node.input[0], lo.out(node)
    xs = lo.shape(x)
    planes, length = xs[0] * xs[1], int(np.prod(xs[2:], dtype=np.int64))
    call = Call("onnxc_global_pool", [lo.ref(x), Arg.t(y), lo.lit(planes), lo.lit(length),
                                      lo.lit(int(node.op_type == "GlobalMaxPool"))])
    lo.step(node, node.op_type, [x], [y], [call], inplace=0)  # plane p is written after it is read, at p


@handles("Softmax", "LogSoftmax")
def softmax(lo: Lowerer, node: onnx.NodeProto) -> None:
    x, y = node.input[0], lo.out(node)
    xs = lo.shape(x) or (1,)
    axis = attr(node, "axis", 1 if lo.opset < 13 else -1)
    axis = axis + len(xs) if axis < 0 else axis
    outer = math.prod(xs[:axis])
    if lo.opset < 13:  # coerced to 2-D: softmax over everything from `axis` on
        length, inner = math.prod(xs[axis:]), 1
    else:
        length, inner = xs[axis], math.prod(xs[axis + 1:])
    call = Call("onnxc_softmax", [lo.ref(x), Arg.t(y), lo.lit(outer), lo.lit(length), lo.lit(inner),
                                  lo.lit(int(node.op_type == "LogSoftmax"))])
    lo.step(node, node.op_type, [x], [y], [call], inplace=0)


@handles("BatchNormalization")
def batchnorm(lo: Lowerer, node: onnx.NodeProto) -> None:
    if any(o for o in node.output[1:]) or attr(node, "training_mode", 0):
        raise lo.unsupported(node, "training mode")
    x, y = node.input[0], lo.out(node)
    params = [lo.const(i) for i in node.input[1:5]]
    if any(p is None for p in params):
        raise lo.unsupported(node, "statistics computed at run time")
    scale, shift, mean, var = (p.astype(np.float64) for p in params)
    factor = scale / np.sqrt(var + attr(node, "epsilon", 1e-5))
    xs = lo.shape(x)
    c = xs[1] if len(xs) > 1 else 1
    inner = math.prod(xs[2:])
    hint = node.name or y
    call = Call("onnxc_channel_affine", [lo.ref(x), Arg.t(y), lo.lit(xs[0]), lo.lit(c), lo.lit(inner),
                                         lo.float_const(factor, f"{hint}_scale"),
                                         lo.float_const(shift - mean * factor, f"{hint}_shift")])
    lo.step(node, node.op_type, [x], [y], [call], inplace=0)


@handles("LRN")
def lrn(lo: Lowerer, node: onnx.NodeProto) -> None:
    x, y = node.input[0], lo.out(node)
    xs = lo.shape(x)
    call = Call("onnxc_lrn", [lo.ref(x), Arg.t(y), lo.lit(xs[0]), lo.lit(xs[1]), lo.lit(math.prod(xs[2:])),
                              lo.lit(attr(node, "size")), lo.lit(attr(node, "alpha", 1e-4)),
                              lo.lit(attr(node, "beta", 0.75)), lo.lit(attr(node, "bias", 1.0))])
    lo.step(node, "LRN", [x], [y], [call])


REDUCE = {"ReduceSum": 0, "ReduceMean": 1, "ReduceMax": 2, "ReduceMin": 3, "ReduceProd": 4, "ReduceSumSquare": 5,
          "ReduceL1": 6, "ReduceL2": 7, "ReduceLogSum": 8, "ReduceLogSumExp": 9}


@handles(*REDUCE)
def reduce(lo: Lowerer, node: onnx.NodeProto) -> None:
    x, y = node.input[0], lo.out(node)
    xs = lo.shape(x)
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = lo.const(node.input[1])
        if value is None:
            raise lo.unsupported(node, "axes computed at run time")
        axes = [int(a) for a in value.reshape(-1)]
    if not axes:
        if attr(node, "noop_with_empty_axes", 0):
            lo.view_step(node, x, y)
            return
        axes = list(range(len(xs)))
    axes = sorted({a + len(xs) if a < 0 else a for a in axes})
    st = strides_of(xs)
    kept = [d for d in range(len(xs)) if d not in axes]
    dims, (strides,) = collapse([xs[d] for d in kept], [[st[d] for d in kept]])
    rdims, (rstrides,) = collapse([xs[d] for d in axes], [[st[d] for d in axes]])
    if len(dims) > 6 or len(rdims) > 6:
        raise lo.unsupported(node, "more than 6 dims")
    op = REDUCE[node.op_type]
    contiguous_tail = axes == list(range(len(xs) - len(axes), len(xs))) and len(axes) > 0
    if op in (1, 2) and contiguous_tail and math.prod(rdims) > 0:  # mean / max over trailing dims: global pool
        planes, length = math.prod(xs[:len(xs) - len(axes)]), math.prod(rdims)
        call = Call("onnxc_global_pool", [lo.ref(x), Arg.t(y), lo.lit(planes), lo.lit(length), lo.lit(int(op == 2))])
        lo.step(node, node.op_type, [x], [y], [call], inplace=0)
        return
    fields = {"op": op, "rank": len(dims), "dims": dims, "strides": strides, "rrank": len(rdims), "rdims": rdims,
              "rstrides": rstrides}
    p = lo.params("onnxc_reduce_p", fields, node.name or y)
    lo.step(node, node.op_type, [x], [y], [Call("onnxc_reduce", [lo.ref(x), Arg.t(y), p])])
