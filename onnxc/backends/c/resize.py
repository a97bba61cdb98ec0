"""Resize/Upsample as per-dim tables, computed at export time.

Resizing is separable. Nearest: output index i along a dim reads input index src[i] along that
dim; the tables follow onnxruntime's float32 arithmetic for every coordinate transformation and
nearest mode, -1 marking an extrapolated position (tf_crop_and_resize) that takes the fill value.
Linear and cubic (antialiased or not): output index i mixes a few input indices with weights;
the weights are the ONNX reference implementation's own, obtained by resizing an identity
matrix along one axis (interpolation is linear in the data), so every mode and option follows
the specification exactly.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnxc.backends.c.lowering import text_attr
from onnxc.compiler.graph import attr


def _const_input(lo, node: onnx.NodeProto, i: int) -> np.ndarray | None:
    """Input i (roi, scales or sizes) flattened, None when absent; it must be known at export time."""
    if len(node.input) <= i or not node.input[i]:
        return None
    value = lo.const(node.input[i])
    if value is None:
        raise lo.unsupported(node, "roi/scales/sizes computed at run time")
    return value.reshape(-1)


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

    roi, scales_in, sizes = (_const_input(lo, node, i) for i in (1, 2, 3))
    axes = attr(node, "axes")
    axes = [a + r if a < 0 else a for a in axes] if axes is not None else list(range(r))
    ctm = text_attr(node, "coordinate_transformation_mode", "half_pixel")
    nearest = text_attr(node, "nearest_mode", "round_prefer_floor")
    policy = text_attr(node, "keep_aspect_ratio_policy", "stretch")
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


def interpolation_tables(lo, node: onnx.NodeProto, xs: tuple[int, ...], ys: tuple[int, ...]):
    """Per dim (source indices [out, taps], weights [out, taps]); index -1: extrapolated."""
    from onnx.reference.ops import op_resize as ref

    r = len(xs)
    mode = text_attr(node, "mode", "nearest")
    antialias = bool(attr(node, "antialias", 0))
    if mode == "cubic":
        cubic_a = attr(node, "cubic_coeff_a", -0.75)
        fn = ref._cubic_coeffs_antialias if antialias else ref._cubic_coeffs

        def coeffs(x, scale):
            return fn(x, scale, A=cubic_a)
    else:
        coeffs = ref._linear_coeffs_antialias if antialias else ref._linear_coeffs

    def const_input(i):
        value = _const_input(lo, node, i)
        return None if value is None else value.astype(np.float64)

    if node.op_type == "Upsample" or lo.opset < 11:
        scales = attr(node, "scales")
        scales = list(scales) if scales is not None else list(const_input(1))
        roi, sizes = None, None
        ctm = "asymmetric"
        axes = list(range(r))
    else:
        roi, scales, sizes = const_input(1), const_input(2), const_input(3)
        scales = None if scales is None or not scales.size else list(scales)
        sizes = None if sizes is None or not sizes.size else [int(v) for v in sizes]
        roi = None if roi is None or not roi.size else list(roi)
        ctm = text_attr(node, "coordinate_transformation_mode", "half_pixel")
        axes = attr(node, "axes")
        axes = [a + r if a < 0 else a for a in axes] if axes is not None else list(range(r))
    per_axis_scale = [1.0] * r
    full_roi = [0.0] * r + [1.0] * r
    n = len(axes)
    for i, a in enumerate(axes):
        if sizes is not None:
            per_axis_scale[a] = sizes[i] / xs[a]
        elif scales is not None:
            per_axis_scale[a] = float(scales[i])
        if roi is not None:
            full_roi[a], full_roi[r + a] = roi[i], roi[n + i]
    policy = text_attr(node, "keep_aspect_ratio_policy", "stretch")
    if sizes is not None and policy in ("not_larger", "not_smaller"):
        pick = min if policy == "not_larger" else max
        common = pick(per_axis_scale[a] for a in axes)
        per_axis_scale = [common if d in axes else 1.0 for d in range(r)]
    fill = float(attr(node, "extrapolation_value", 0.0))
    exclude = bool(attr(node, "exclude_outside", 0))
    tables = []
    for d in range(r):
        axis_roi = [full_roi[d], full_roi[d + r]]
        identity = (math.isclose(per_axis_scale[d], 1.0) and ys[d] == xs[d]
                    and math.isclose(axis_roi[0], 0.0) and math.isclose(axis_roi[1], 1.0))
        if identity or d not in axes:
            tables.append((np.arange(ys[d])[:, None], np.ones((ys[d], 1))))
            continue
        kw = {"roi": axis_roi, "coordinate_transformation_mode": ctm, "exclude_outside": exclude}
        w = ref._interpolate_1d_along_axis(np.eye(xs[d]), 0, per_axis_scale[d], ys[d], coeffs,
                                          extrapolation_value=0.0, **kw)
        outside = ref._interpolate_1d_along_axis(np.zeros((xs[d], 1)), 0, per_axis_scale[d], ys[d], coeffs,
                                                extrapolation_value=1.0, **kw)[:, 0] != 0
        taps = max(1, int((w != 0).sum(axis=1).max()))
        src = np.zeros((ys[d], taps), np.int64)
        wt = np.zeros((ys[d], taps))
        for i in range(ys[d]):
            nz = np.flatnonzero(w[i])
            src[i, :nz.size], wt[i, :nz.size] = nz, w[i, nz]
            if outside[i]:
                src[i, 0] = -1
        tables.append((src, wt))
    return tables, fill
