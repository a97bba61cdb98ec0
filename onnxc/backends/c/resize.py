"""Nearest-neighbour Resize/Upsample as per-dim source index tables.

Nearest resizing is separable: output index i along a dim reads input index src[i] along that
dim. The tables follow onnxruntime's arithmetic (float32) for every coordinate transformation
and nearest mode; -1 marks an extrapolated position (tf_crop_and_resize) that takes the fill
value.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxc.compiler.graph import attr


def _text(value, default: str) -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else value


def nearest_tables(lo, node: onnx.NodeProto, xs: tuple[int, ...], ys: tuple[int, ...]) -> tuple[list[np.ndarray],
                                                                                                  float]:
    r = len(xs)
    legacy = node.op_type == "Upsample" or lo.opset < 11
    f32 = np.float32
    if legacy:
        if attr(node, "scales") is not None:
            scales = [float(s) for s in attr(node, "scales")]
        else:
            value = lo.const(node.input[1]) if len(node.input) > 1 else None
            if value is None:
                raise lo.unsupported(node, "scales computed at run time")
            scales = [float(s) for s in value.reshape(-1)]
        tables = []
        for d in range(r):
            x = np.arange(ys[d], dtype=f32) / f32(scales[d])
            src = np.ceil(x) if scales[d] < 1 else np.floor(x)
            tables.append(np.clip(src.astype(np.int64), 0, max(xs[d] - 1, 0)))
        return tables, 0.0

    def const_input(i):
        if len(node.input) <= i or not node.input[i]:
            return None
        value = lo.const(node.input[i])
        if value is None:
            raise lo.unsupported(node, "roi/scales/sizes computed at run time")
        return value.reshape(-1)

    roi, scales_in, sizes = const_input(1), const_input(2), const_input(3)
    axes = attr(node, "axes")
    axes = [a + r if a < 0 else a for a in axes] if axes is not None else list(range(r))
    ctm = _text(attr(node, "coordinate_transformation_mode"), "half_pixel")
    nearest = _text(attr(node, "nearest_mode"), "round_prefer_floor")
    policy = _text(attr(node, "keep_aspect_ratio_policy"), "stretch")
    fill = float(attr(node, "extrapolation_value", 0.0))
    scales = [f32(1.0)] * r
    if sizes is not None and sizes.size:
        ratios = {a: f32(sizes[i]) / f32(xs[a]) for i, a in enumerate(axes)}
        if policy in ("not_larger", "not_smaller"):
            common = min(ratios.values()) if policy == "not_larger" else max(ratios.values())
            ratios = dict.fromkeys(axes, common)
        for a, s in ratios.items():
            scales[a] = f32(s)
    elif scales_in is not None and scales_in.size:
        for i, a in enumerate(axes):
            scales[a] = f32(scales_in[i])
    roi_start, roi_end = [f32(0)] * r, [f32(1)] * r
    if roi is not None and roi.size and ctm == "tf_crop_and_resize":
        n = len(axes)
        for i, a in enumerate(axes):
            roi_start[a], roi_end[a] = f32(roi[i]), f32(roi[i + n])
    tables = []
    for d in range(r):
        tables.append(_source(ys[d], xs[d], scales[d], ctm, nearest, roi_start[d], roi_end[d]))
    return tables, fill


def _source(out_len: int, in_len: int, scale, ctm: str, nearest: str, start, end) -> np.ndarray:
    f32 = np.float32
    x = np.arange(out_len, dtype=f32)
    if ctm == "half_pixel":
        orig = (x + f32(0.5)) / scale - f32(0.5)
    elif ctm == "half_pixel_symmetric":
        adjustment = f32(out_len) / (scale * f32(in_len))
        center = f32(in_len) / f32(2)
        offset = center * (f32(1) - adjustment)
        orig = offset + (x + f32(0.5)) / scale - f32(0.5)
    elif ctm == "pytorch_half_pixel":
        orig = (x + f32(0.5)) / scale - f32(0.5) if out_len > 1 else np.zeros_like(x)
    elif ctm == "align_corners":
        orig = x * f32(in_len - 1) / f32(out_len - 1) if out_len > 1 else np.zeros_like(x)
    elif ctm == "asymmetric":
        orig = x / scale
    elif ctm == "tf_half_pixel_for_nn":
        orig = (x + f32(0.5)) / scale
    elif ctm == "tf_crop_and_resize":
        if out_len > 1:
            orig = start * f32(in_len - 1) + x * (end - start) * f32(in_len - 1) / f32(out_len - 1)
        else:
            orig = np.full_like(x, f32(0.5) * (start + end) * f32(in_len - 1))
    else:
        raise ValueError(f"coordinate_transformation_mode {ctm}")
    orig = orig.astype(f32)
    if nearest == "round_prefer_floor":
        src = np.where(orig == np.floor(orig) + f32(0.5), np.floor(orig), np.round(orig))
    elif nearest == "round_prefer_ceil":
        src = np.where(orig == np.floor(orig) + f32(0.5), np.ceil(orig), np.round(orig))
    elif nearest == "floor":
        src = np.floor(orig)
    elif nearest == "ceil":
        src = np.ceil(orig)
    else:
        raise ValueError(f"nearest_mode {nearest}")
    src = src.astype(np.int64)
    if ctm == "tf_crop_and_resize":
        outside = (orig < 0) | (orig > f32(in_len - 1))
        return np.where(outside, -1, np.clip(src, 0, in_len - 1))
    return np.clip(src, 0, max(in_len - 1, 0))
