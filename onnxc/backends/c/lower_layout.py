"""Data-movement ops. Reshape-like ops and contiguous Split/Slice pieces are views (no code);
Concat copies blocks; Transpose, Slice and Expand are strided copies; Pad and nearest Resize
are table-driven gathers (one small int32 table per output dim, built here)."""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnxc.backends.c.lowering import Lowerer, broadcast_strides, collapse, handles, text_attr
from onnxc.backends.c.program import Arg, Call
from onnxc.backends.c.resize import interpolation_tables, nearest_tables
from onnxc.compiler.graph import attr


def strides_of(shape: tuple[int, ...]) -> list[int]:
    out, acc = [0] * len(shape), 1
    for d in range(len(shape) - 1, -1, -1):
        out[d] = acc
        acc *= shape[d]
    return out


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


@handles("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout")
def reshape(lo: Lowerer, node: onnx.NodeProto) -> None:
    if node.op_type == "Dropout":
        mask = node.output[1] if len(node.output) > 1 else ""
        if mask and (lo.view.consumers.get(mask) or mask in lo.view.graph_outputs):
            raise lo.unsupported(node, "mask output")
        training = lo.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        ratio = lo.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        random = ratio is None and len(node.input) > 1 and node.input[1] or ratio is not None and ratio.any()
        if (len(node.input) > 2 and node.input[2] and training is None) or (training is not None and training.any()
                                                                            and (random or len(node.input) < 2)):
            raise lo.unsupported(node, "training mode")
    x, y = node.input[0], lo.out(node)
    if lo.size(x) != lo.size(y):
        raise lo.unsupported(node, f"{lo.shape(x)} -> {lo.shape(y)} changes the element count")
    lo.view_step(node, x, y)


def strided_call(lo: Lowerer, x: str, y: str, dims: list[int], strides: list[int], base: int, hint: str,
                 x_offset: int = 0) -> Call:
    dims, (strides,) = collapse(dims, [strides])
    if len(dims) > 6:
        raise lo.unsupported(lo.view.producers.get(y), "more than 6 dims")
    p = lo.params("onnxc_strided_p", {"rank": len(dims), "dims": dims, "strides": strides, "base": base}, hint)
    ref = lo.ref(x)
    return Call("onnxc_strided_copy", [Arg(ref.kind, ref.value, x_offset), Arg.t(y), p])


@handles("Transpose")
def transpose(lo: Lowerer, node: onnx.NodeProto) -> None:
    x, y = node.input[0], lo.out(node)
    xs = lo.shape(x)
    perm = list(attr(node, "perm", list(range(len(xs)))[::-1]))
    st = strides_of(xs)
    dims = [xs[p] for p in perm]
    if [d for d in perm if xs[d] != 1] == sorted(d for d in perm if xs[d] != 1):
        lo.view_step(node, x, y)  # only size-1 dims move: same memory order
        return
    lo.step(node, "Transpose", [x], [y], [strided_call(lo, x, y, dims, [st[p] for p in perm], 0, node.name or y)])


@handles("Expand")
def expand(lo: Lowerer, node: onnx.NodeProto) -> None:
    x, y = node.input[0], lo.out(node)
    ys = lo.shape(y)
    if lo.size(x) == lo.size(y):
        lo.view_step(node, x, y)
        return
    lo.step(node, "Expand", [x], [y], [strided_call(lo, x, y, list(ys), broadcast_strides(lo.shape(x), ys), 0,
                                                      node.name or y)])


@handles("Concat")
def concat(lo: Lowerer, node: onnx.NodeProto) -> None:
    y = lo.out(node)
    ys = lo.shape(y)
    axis = _axis(attr(node, "axis"), len(ys))
    outer, row = math.prod(ys[:axis]), math.prod(ys[axis:])
    calls, pieces, offset = [], [], 0
    inputs = [i for i in node.input if i]
    for name in inputs:
        chunk = math.prod(lo.shape(name)[axis:])
        if outer * chunk:
            if outer == 1 and not lo.is_const(name):
                pieces.append((name, offset, len(calls)))
            calls.append(Call("onnxc_copy2d", [lo.ref(name), Arg.t(y, offset), lo.lit(outer), lo.lit(chunk),
                                               lo.lit(chunk), lo.lit(row)]))
        offset += chunk
    lo.step(node, "Concat", inputs, [y], calls, pieces=pieces or None)


@handles("Split")
def split(lo: Lowerer, node: onnx.NodeProto) -> None:
    x = node.input[0]
    xs = lo.shape(x)
    axis = _axis(attr(node, "axis", 0), len(xs))
    outs = [lo.out(node, i) for i in range(len(node.output))]
    outer, row = math.prod(xs[:axis]), math.prod(xs[axis:])
    start = 0
    for y in outs:
        chunk = math.prod(lo.shape(y)[axis:])
        offset = start
        start += lo.shape(y)[axis] * math.prod(xs[axis + 1:])
        if outer == 1:
            lo.view_step(node, x, y, offset)
            continue
        ref = lo.ref(x)
        lo.step(node, "Split", [x], [y], [Call("onnxc_copy2d", [Arg(ref.kind, ref.value, offset), Arg.t(y),
                                                                lo.lit(outer), lo.lit(chunk), lo.lit(row),
                                                                lo.lit(chunk)])])


def _int_input(lo: Lowerer, node: onnx.NodeProto, i: int, what: str) -> list[int] | None:
    if len(node.input) <= i or not node.input[i]:
        return None
    value = lo.const(node.input[i])
    if value is None:
        raise lo.unsupported(node, f"{what} computed at run time")
    return [int(v) for v in value.reshape(-1)]


@handles("Slice")
def slice_(lo: Lowerer, node: onnx.NodeProto) -> None:
    x, y = node.input[0], lo.out(node)
    xs = lo.shape(x)
    if lo.opset < 10:
        starts, ends = list(attr(node, "starts")), list(attr(node, "ends"))
        axes, steps = attr(node, "axes", None), None
    else:
        starts, ends = _int_input(lo, node, 1, "starts"), _int_input(lo, node, 2, "ends")
        axes, steps = _int_input(lo, node, 3, "axes"), _int_input(lo, node, 4, "steps")
    axes = [_axis(a, len(xs)) for a in (axes if axes is not None else range(len(starts)))]
    steps = steps or [1] * len(axes)
    begin, step_of, dims = [0] * len(xs), [1] * len(xs), list(xs)
    for a, s, e, st in zip(axes, starts, ends, steps):
        rng = range(*slice(s, e, st).indices(xs[a]))
        begin[a], step_of[a], dims[a] = (rng.start if len(rng) else 0), st, len(rng)
    if tuple(dims) != lo.shape(y):
        raise lo.unsupported(node, f"computed shape {dims} differs from the inferred {lo.shape(y)}")
    st = strides_of(xs)
    base = sum(b * s for b, s in zip(begin, st))
    # A view when the piece is contiguous: leading dims of size 1, one stepping-1 dim, full dims after.
    lead = next((d for d in range(len(xs)) if dims[d] != 1), len(xs))
    contiguous = all(dims[d] == xs[d] and (step_of[d] == 1 or xs[d] == 1) for d in range(lead + 1, len(xs)))
    contiguous = contiguous and (lead == len(xs) or step_of[lead] == 1)
    if contiguous and math.prod(dims) > 0:
        lo.view_step(node, x, y, base)
        return
    lo.step(node, "Slice", [x], [y], [strided_call(lo, x, y, dims, [s * k for s, k in zip(st, step_of)], base,
                                                     node.name or y)])


def gather_call(lo: Lowerer, x: str, y: str, tables: list[np.ndarray], fill: float, hint: str,
                dims: list[int] | None = None) -> Call:
    """Gather-copy with one offset table per output dim (`dims`, by default `y`'s shape)."""
    ys = list(lo.shape(y)) if dims is None else dims
    if len(ys) > 6:
        raise lo.unsupported(lo.view.producers.get(y), "more than 6 dims")
    if not ys:
        ys, tables = [1], [np.zeros(1, np.int64)]
    names = [lo.int_table(t, f"{hint}_tab{d}") for d, t in enumerate(tables)]
    p = lo.params("onnxc_gather_p", {"rank": len(ys), "dims": ys, "tab": names, "fill": fill}, hint)
    return Call("onnxc_gather_copy", [lo.ref(x), Arg.t(y), p])


@handles("Pad")
def pad(lo: Lowerer, node: onnx.NodeProto) -> None:
    x, y = node.input[0], lo.out(node)
    xs = lo.shape(x)
    r = len(xs)
    mode = text_attr(node, "mode", "constant")
    if lo.opset < 11:
        pads, value = list(attr(node, "pads")), attr(node, "value", 0.0)
        axes = list(range(r))
    else:
        pads = _int_input(lo, node, 1, "pads")
        value = 0.0
        if len(node.input) > 2 and node.input[2]:
            v = lo.const(node.input[2])
            if v is None:
                raise lo.unsupported(node, "pad value computed at run time")
            value = float(v.reshape(-1)[0]) if v.size else 0.0
        axes = _int_input(lo, node, 3, "axes")
        axes = [_axis(a, r) for a in axes] if axes is not None else list(range(r))
    begin, end = [0] * r, [0] * r
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[i + len(axes)]
    st = strides_of(xs)
    tables = []
    for d in range(r):
        out_len = xs[d] + begin[d] + end[d]
        src = np.arange(out_len) - begin[d]
        inside = (src >= 0) & (src < xs[d])
        if mode == "constant" or xs[d] == 0:
            idx = np.where(inside, src, -1)
        elif mode == "edge":
            idx = np.clip(src, 0, xs[d] - 1)
        elif mode == "reflect":
            period = max(2 * (xs[d] - 1), 1)
            m = np.mod(src, period)
            idx = np.where(m < xs[d], m, period - m) if xs[d] > 1 else np.zeros_like(src)
        elif mode == "wrap":
            idx = np.mod(src, xs[d])
        else:
            raise lo.unsupported(node, f"mode {mode}")
        tables.append(np.where(idx >= 0, idx * st[d], -1))
    lo.step(node, "Pad", [x], [y], [gather_call(lo, x, y, tables, value, node.name or y)])


@handles("Resize", "Upsample")
def resize(lo: Lowerer, node: onnx.NodeProto) -> None:
    x, y = node.input[0], lo.out(node)
    mode = text_attr(node, "mode", "nearest")
    xs, ys = lo.shape(x), lo.shape(y)
    st = strides_of(xs)
    hint = node.name or y
    try:
        if mode == "nearest":
            sources, fill = nearest_tables(lo, node, xs, ys)
            tables = [np.where(src >= 0, src * st[d], -1) for d, src in enumerate(sources)]
            lo.step(node, node.op_type, [x], [y], [gather_call(lo, x, y, tables, fill, hint)])
            return
        if mode not in ("linear", "cubic"):
            raise ValueError(f"mode {mode}")
        tables, fill = interpolation_tables(lo, node, xs, ys)
    except ValueError as exc:
        raise lo.unsupported(node, str(exc)) from None
    if len(ys) > 6:
        raise lo.unsupported(node, "more than 6 dims")
    offs = [lo.int_table(np.where(src >= 0, src * st[d], -1), f"{hint}_off{d}") for d, (src, _) in enumerate(tables)]
    wts = [lo.float_const(wt, f"{hint}_wt{d}").value for d, (_, wt) in enumerate(tables)]
    fields = {"rank": len(ys), "dims": list(ys), "taps": [src.shape[1] for src, _ in tables], "off": offs,
              "wt": wts, "fill": fill}
    p = lo.params("onnxc_resize_p", fields, hint)
    lo.step(node, node.op_type, [x], [y], [Call("onnxc_resize", [lo.ref(x), Arg.t(y), p])])


def _permuted_copy(lo: Lowerer, node: onnx.NodeProto, x: str, y: str, shape: list[int], perm: list[int]) -> None:
    """`y` = transpose(reshape(x, shape), perm), flattened: one strided copy."""
    st = strides_of(tuple(shape))
    call = strided_call(lo, x, y, [shape[p] for p in perm], [st[p] for p in perm], 0, node.name or y)
    lo.step(node, node.op_type, [x], [y], [call])


@handles("DepthToSpace")
def depth_to_space(lo: Lowerer, node: onnx.NodeProto) -> None:
    x, y = node.input[0], lo.out(node)
    n, c, h, w = lo.shape(x)
    b = attr(node, "blocksize")
    mode = text_attr(node, "mode", "DCR")
    if mode == "CRD":
        _permuted_copy(lo, node, x, y, [n, c // (b * b), b, b, h, w], [0, 1, 4, 2, 5, 3])
    else:
        _permuted_copy(lo, node, x, y, [n, b, b, c // (b * b), h, w], [0, 3, 4, 1, 5, 2])


@handles("SpaceToDepth")
def space_to_depth(lo: Lowerer, node: onnx.NodeProto) -> None:
    x, y = node.input[0], lo.out(node)
    n, c, h, w = lo.shape(x)
    b = attr(node, "blocksize")
    mode = text_attr(node, "mode", "DCR")
    perm = [0, 1, 3, 5, 2, 4] if mode == "CRD" else [0, 3, 5, 1, 2, 4]
    _permuted_copy(lo, node, x, y, [n, c, h // b, b, w // b, b], perm)


@handles("Tile")
def tile(lo: Lowerer, node: onnx.NodeProto) -> None:
    x, y = node.input[0], lo.out(node)
    xs, ys = lo.shape(x), lo.shape(y)
    st = strides_of(xs)
    tables = [(np.arange(ys[d]) % max(xs[d], 1)) * st[d] for d in range(len(xs))]
    lo.step(node, "Tile", [x], [y], [gather_call(lo, x, y, tables, 0.0, node.name or y)])


@handles("Gather")
def gather(lo: Lowerer, node: onnx.NodeProto) -> None:
    """Gather of constant indices from run-time data: a table gather along `axis` (indices of any
    rank index one merged output dim)."""
    x, idx_name, y = node.input[0], node.input[1], lo.out(node)
    idx = lo.const(idx_name)
    if idx is None:
        raise lo.unsupported(node, "indices computed at run time")
    xs = lo.shape(x)
    axis = _axis(attr(node, "axis", 0), len(xs))
    idx = np.where(idx < 0, idx + xs[axis], idx).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= xs[axis]):
        raise lo.unsupported(node, "index out of range")
    st = strides_of(xs)
    dims = list(xs[:axis]) + [idx.size] + list(xs[axis + 1:])
    tables = [np.arange(dims[d]) * st[d] for d in range(axis)] + [idx * st[axis]]
    tables += [np.arange(xs[d]) * st[d] for d in range(axis + 1, len(xs))]
    lo.step(node, "Gather", [x], [y], [gather_call(lo, x, y, tables, 0.0, node.name or y, dims)])
