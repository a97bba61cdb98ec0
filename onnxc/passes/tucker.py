"""`tucker`: a k x k Conv becomes 1x1 (C_in -> R1), k x k (R1 -> R2), 1x1 (R2 -> C_out, bias).

Tucker-2 on the two channel modes (Kim et al. 2016), computed with tensorly's `partial_tucker`:
W ~ core x_0 U_out x_1 U_in. The k x k core keeps the original stride, pads, dilations and
auto_pad; the 1x1 convs have no padding (a 1x1 conv of zero padding is zero, so the chain is
exact). With calibration data the input factor comes from Tucker-2 of the weight whitened by the
input channel second moment, and then the core and the output factor (plus bias) are refitted by
reduced-rank least squares on the layer's im2col moments, minimizing the output error. A 1x1 Conv
has no spatial core: it becomes two 1x1 convs (an SVD). Grouped/depthwise convs are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from tensorly.decomposition import partial_tucker

from onnxc.compiler.graph import GraphView
from onnxc.compiler.passes import Change, PassContext, register
from onnxc.passes import _whiten
from onnxc.passes._factor import (
    ConvGeometry,
    FactorPass,
    Fitted,
    Layer,
    conv,
    conv_layer,
    cost,
    output_error,
    parse_conv,
)
from onnxc.passes._rank import choose_ranks


@register
@dataclass
class TuckerPass(FactorPass):
    id = "tucker"
    plan_order = 10
    planned_by_default = True
    summary = "Tucker-2 of Conv weights: 1x1, small kxk core, 1x1 (fitted to the layer's inputs)"
    option_help = {**FactorPass.common_help, "n_iter_max": "Tucker (HOOI) iterations at most"}

    ratio: float = 0.5
    n_iter_max: int = 50

    def candidate(self, node: onnx.NodeProto, view: GraphView, model: onnx.ModelProto) -> Layer | str | None:
        if node.op_type != "Conv":
            return None
        geo = parse_conv(node, view)
        return geo if isinstance(geo, str) else conv_layer(node, geo)

    def fit(self, layer: Layer, view: GraphView, moments: _whiten.Moments | None, ctx: PassContext) -> Fitted | str:
        geo: ConvGeometry = layer.info["geo"]
        if geo.taps == 1:
            return self._fit_pointwise(layer, view, geo, moments)
        w = geo.weight.astype(np.float64)
        c_out, c_in, taps = geo.c_out, geo.c_in, geo.taps
        w_aug = geo.w_aug()
        # with data: whiten the input mode by the channel moment, so the input factor keeps what the
        # inputs actually excite; the output mode's energy is the output covariance's spectrum
        w_fit, inv_root = _whiten.whiten_input_channels(w, moments) if moments is not None else (w, None)

        def spectra():
            out_mat = w.reshape(c_out, -1)
            if moments is not None:
                out_s = np.sqrt(np.maximum(np.linalg.eigvalsh(out_mat @ moments.cov @ out_mat.T), 0))
            else:
                out_s = np.linalg.svd(out_mat, compute_uv=False)
            in_s = np.linalg.svd(np.moveaxis(w_fit, 1, 0).reshape(c_in, -1), compute_uv=False)
            return [(in_s, (c_in, c_out * taps)), (out_s, (c_out, c_in * taps))]

        def macs(r: tuple[int, ...]) -> int:
            return c_in * r[0] * geo.p_in + r[0] * r[1] * taps * geo.p_out + r[1] * c_out * geo.p_out

        ranks, reason = choose_ranks(self.rule(), macs, geo.macs, (c_in, c_out), spectra=spectra)
        if ranks is None:
            return reason
        r1, r2 = ranks
        # a Tucker core [r2, r1, taps] has rank at most r1 * taps on its output mode (and r2 * taps
        # on its input mode): more would only be zero columns (tensorly clamps them with a warning)
        r2, r1 = min(r2, r1 * taps), min(r1, r2 * taps)
        (core, (u_out, u_in)), _ = partial_tucker(w_fit, rank=[r2, r1], modes=[0, 1], init="svd",
                                                   n_iter_max=self.n_iter_max, tol=1e-5)
        core, u_out, u_in = np.asarray(core), np.asarray(u_out), np.asarray(u_in)
        if inv_root is not None:
            first = inv_root @ u_in  # [C_in, R1]: z = first^T x sees the whitened input's subspace
            proj = np.kron(first.T, np.eye(taps))  # [R1 * taps, C_in * taps] acting on patches
            u_out, g, bias = _whiten.reduced_rank_fit(w_aug, proj, moments, r2)
            core = g.reshape(r2, r1, *geo.kernel)
        else:
            first, bias = u_in, geo.bias
        dtype = geo.weight.dtype
        w_first = first.T.reshape(r1, c_in, *([1] * len(geo.kernel))).astype(dtype)
        w_core = core.astype(dtype)
        w_last = u_out.reshape(c_out, r2, *([1] * len(geo.kernel))).astype(dtype)
        b_last = bias.astype(dtype) if bias is not None else None
        effective = np.einsum("or,rs...,sc->oc...", w_last.reshape(c_out, r2).astype(np.float64),
                              w_core.astype(np.float64), w_first.reshape(r1, c_in).astype(np.float64),
                              optimize=True)
        new_aug = np.column_stack([effective.reshape(c_out, -1),
                                   b_last.astype(np.float64) if b_last is not None else np.zeros(c_out)])
        error, kind = output_error(w_aug, new_aug, moments)
        name, x, out = layer.name, layer.node.input[0], layer.node.output[0]
        n1 = conv(view, f"{name}/tucker_in", x, w_first, None, dtype)
        n2 = conv(view, f"{name}/tucker_core", n1.output[0], w_core, None, dtype, strides=geo.strides,
                  pads=geo.pads, dilations=geo.dilations, auto_pad=geo.auto_pad if geo.pads is None else None)
        n3 = conv(view, f"{name}/tucker_out", n2.output[0], w_last, b_last, dtype, output=out)
        item = np.dtype(dtype).itemsize
        params_after = w_first.size + w_core.size + w_last.size + (b_last.size if b_last is not None else 0)
        change = Change(name, "Conv", f"tucker-2 ranks {r1}x{r2}", before=cost(geo.params, geo.macs, item),
                        after=cost(params_after, macs(ranks), item), error=error,
                        detail={"ranks": [r1, r2], "kernel": list(geo.kernel), "channels": [c_in, c_out],
                                "error_kind": kind, "data_aware": moments is not None})
        return Fitted([n1, n2, n3], change, aug=(w_aug, new_aug))

    def _fit_pointwise(self, layer: Layer, view: GraphView, geo: ConvGeometry,
                       moments: _whiten.Moments | None) -> Fitted | str:
        """A 1x1 conv is a matrix on channels: two 1x1 convs of rank R (stride and pads on the first)."""
        c_out, c_in = geo.c_out, geo.c_in
        w_aug = geo.w_aug()
        w = w_aug[:, :-1]
        dec = _whiten.matrix_svd(w, moments, centered=True)

        def macs(r: tuple[int, ...]) -> int:
            return r[0] * (c_in + c_out) * geo.p_out

        ranks, reason = choose_ranks(self.rule(), macs, geo.macs, (min(c_in, c_out),),
                                     spectra=lambda: [(dec.s, w.shape)])
        if ranks is None:
            return reason
        rank = ranks[0]
        u, v = dec.factors(rank)
        dtype = geo.weight.dtype
        bias = w_aug[:, -1]
        if moments is not None:
            bias = bias + (w - u @ v) @ moments.mean
        has_bias = geo.bias is not None or moments is not None
        spatial = [1] * len(geo.kernel)
        w_first, w_last = v.reshape(rank, c_in, *spatial).astype(dtype), u.reshape(c_out, rank, *spatial).astype(dtype)
        b_last = bias.astype(dtype) if has_bias else None
        new_aug = np.column_stack([w_last.reshape(c_out, rank).astype(np.float64)
                                   @ w_first.reshape(rank, c_in).astype(np.float64),
                                   b_last.astype(np.float64) if b_last is not None else np.zeros(c_out)])
        error, kind = output_error(w_aug, new_aug, moments)
        name, x, out = layer.name, layer.node.input[0], layer.node.output[0]
        n1 = conv(view, f"{name}/svd_in", x, w_first, None, dtype, strides=geo.strides, pads=geo.pads,
                  auto_pad=geo.auto_pad if geo.pads is None else None)
        n2 = conv(view, f"{name}/svd_out", n1.output[0], w_last, b_last, dtype, output=out)
        item = np.dtype(dtype).itemsize
        params_after = w_first.size + w_last.size + (b_last.size if b_last is not None else 0)
        change = Change(name, "Conv", f"1x1 svd rank {rank}", before=cost(geo.params, geo.macs, item),
                        after=cost(params_after, macs(ranks), item), error=error,
                        detail={"ranks": [rank], "kernel": list(geo.kernel), "channels": [c_in, c_out],
                                "error_kind": kind, "data_aware": moments is not None})
        return Fitted([n1, n2], change, aug=(w_aug, new_aug))
