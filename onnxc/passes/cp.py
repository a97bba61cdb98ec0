"""`cp`: a k x k Conv becomes 1x1 (C_in -> R), depthwise k x 1, depthwise 1 x k, 1x1 (R -> C_out).

Lebedev et al. 2015: a rank-R CP decomposition W[o, c, i, j] ~ sum_r B[o, r] A[c, r] Kh[i, r]
Kw[j, r] (tensorly `parafac`, SVD init, iteration cap and tolerance) is exactly that chain. Each
depthwise conv takes its own axis's stride, pads and dilation (pads and stride of an axis with
kernel 1 ride on the first depthwise conv); the chain is exact because the first 1x1 conv has no
bias (a conv of zero padding is zero). The same holds in 1-D and 3-D (one depthwise conv per
spatial axis). With calibration data the input mode is whitened by the input channel moment
before the decomposition and the last 1x1 conv and bias are refitted by least squares on the
layer's im2col moments, so the output error is what is minimized. CP-ALS can stall or degenerate
(components of huge norm cancelling each other): such layers, and layers whose local error stays
above `max_layer_error`, keep their original conv.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import tensorly as tl
from tensorly.decomposition import parafac
from tensorly.tenalg.core_tenalg import CoreTenalgBackend

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
    numel,
    output_error,
    parse_conv,
)
from onnxc.passes._rank import choose_ranks


def _mttkrp(tensor: np.ndarray, cp_tensor, mode: int) -> np.ndarray:
    """Unfolded tensor times the Khatri-Rao product of the other factors, without forming it.

    tensorly's default builds the Khatri-Rao matrix explicitly; for a conv kernel's spatial modes
    that is a (C_out * C_in * k) x R matrix per call. Here the largest other mode is contracted
    first with one GEMM, then the small ones elementwise: same numbers, ~10x faster."""
    weights, factors = cp_tensor
    others = sorted((i for i in range(tensor.ndim) if i != mode), key=lambda i: -tensor.shape[i])
    first = others[0]
    axes = [i for i in range(tensor.ndim) if i != first]
    rest = [tensor.shape[i] for i in axes]
    out = (np.moveaxis(tensor, first, -1).reshape(-1, tensor.shape[first]) @ factors[first]).reshape(*rest, -1)
    for m in others[1:]:
        pos = axes.index(m)
        shape = [1] * len(axes) + [factors[m].shape[1]]
        shape[pos] = factors[m].shape[0]
        out = (out * factors[m].reshape(shape)).sum(axis=pos)
        axes.pop(pos)
    return out * weights if weights is not None else out


class _ConvCpBackend(CoreTenalgBackend, backend_name="onnxc_cp"):
    """tensorly's core tensor algebra with the faster MTTKRP above (used only around `parafac`)."""


_ConvCpBackend.register_method("unfolding_dot_khatri_rao", _mttkrp)

STALL = 0.01  # at the iteration cap, a relative error still falling by more than this over 5 iterations
DEGENERATE = 10.0  # root-sum-square of component norms / weight norm above this: cancelling components


@register
@dataclass
class CpPass(FactorPass):
    id = "cp"
    plan_order = 15
    summary = "CP of Conv weights: 1x1, depthwise kx1, depthwise 1xk, 1x1 (Lebedev et al.)"
    option_help = {**FactorPass.common_help,
                   "max_layer_error": "drop a layer whose local relative error exceeds this (default 0.5 "
                                      "of the output error when fitting to data, 0.8 of the weight error otherwise)",
                   "max_rank": "cap on the CP rank (default: only the MACs budget)",
                   "n_iter_max": "CP-ALS iterations at most",
                   "tol": "CP-ALS stops when the relative error improves less than this per iteration"}

    ratio: float = 0.5
    default_error_limits = {"output": 0.5, "weight": 0.8}
    max_rank: int | None = None
    n_iter_max: int = 60
    tol: float = 1e-5

    def candidate(self, node: onnx.NodeProto, view: GraphView, model: onnx.ModelProto) -> Layer | str | None:
        if node.op_type != "Conv":
            return None
        geo = parse_conv(node, view)
        if isinstance(geo, str):
            return geo
        if geo.taps == 1:
            return "1x1 kernel: its CP is an SVD (use tucker or svd)"
        if geo.pads is None:
            return "auto_pad with an unknown input size (pads must be split per axis)"
        return conv_layer(node, geo)

    def fit(self, layer: Layer, view: GraphView, moments: _whiten.Moments | None, ctx: PassContext) -> Fitted | str:
        geo: ConvGeometry = layer.info["geo"]
        w = geo.weight.astype(np.float64)
        c_out, c_in = geo.c_out, geo.c_in
        plan = _plan(geo)
        # with data, the input mode is whitened by the channel moment (what the inputs excite counts);
        # CP-ALS is non-convex, so the plain weight is a second start and the lower output error wins
        starts: list[tuple[np.ndarray, np.ndarray | None]] = []
        if moments is not None:
            starts.append(_whiten.whiten_input_channels(w, moments))
        starts.append((w, None))

        def spectra():
            w_fit = starts[0][0]
            return [(np.linalg.svd(np.moveaxis(w_fit, mode, 0).reshape(w.shape[mode], -1), compute_uv=False),
                     (w.shape[mode], w.size // w.shape[mode])) for mode in (0, 1)]

        cap = self.max_rank or c_out * c_in * geo.taps
        ranks, reason = choose_ranks(self.rule(), lambda r: _macs(geo, plan, r[0]), geo.macs, (cap,),
                                     spectra=spectra)
        if ranks is None:
            return reason
        rank = ranks[0]
        seed = int(ctx.rng(f"cp:{layer.name}").integers(2**31 - 1))
        w_aug, dtype = geo.w_aug(), geo.weight.dtype
        best, failures = None, []
        for w_fit, inv_root in starts:
            found = self._decompose(w_fit, rank, seed)
            if isinstance(found, str):
                failures.append(found)
                continue
            (out_f, in_f, spatial), info = found
            first, kernels, out_f = _balance(inv_root @ in_f if inv_root is not None else in_f, spatial, out_f)
            first = first.astype(dtype).astype(np.float64)
            kernels = [k.astype(dtype).astype(np.float64) for k in kernels]
            chain = _chain_matrix(first, kernels)  # [R, C_in * taps]: what the first convs compute from a patch
            if moments is not None:  # refit the last 1x1 conv and bias to the layer's outputs
                u, g, bias = _whiten.reduced_rank_fit(w_aug, chain, moments, c_out)
                last = u @ g
            else:
                last, bias = out_f, geo.bias
            last = last.astype(dtype)
            b_last = bias.astype(dtype) if bias is not None else None
            new_aug = np.column_stack([last.astype(np.float64) @ chain,
                                       b_last.astype(np.float64) if b_last is not None else np.zeros(c_out)])
            error, kind = output_error(w_aug, new_aug, moments)
            info["whitened"] = inv_root is not None
            if best is None or error < best[0]:
                best = (error, kind, first, kernels, last, b_last, info, new_aug)
        if best is None:
            return failures[0]
        error, kind, first, kernels, last, b_last, info, new_aug = best
        nodes = self._emit(layer, view, geo, plan, first, kernels, last, b_last)
        item = np.dtype(dtype).itemsize
        params_after = rank * (c_in + sum(geo.kernel) + c_out) + (b_last.size if b_last is not None else 0)
        change = Change(layer.name, "Conv", f"cp rank {rank}", before=cost(geo.params, geo.macs, item),
                        after=cost(params_after, _macs(geo, plan, rank), item), error=error,
                        detail={"rank": rank, "kernel": list(geo.kernel), "channels": [c_in, c_out], **info,
                                "error_kind": kind, "data_aware": moments is not None})
        return Fitted(nodes, change, aug=(w_aug, new_aug))

    def _decompose(self, w_fit: np.ndarray, rank: int, seed: int) -> tuple[tuple, dict] | str:
        """CP-ALS (tensorly parafac, SVD init, line search): ((out, in, spatial factors), info) or why not."""
        trace: list[float] = []  # relative error after init and after every iteration
        with warnings.catch_warnings(), tl.tenalg.backend_context(_ConvCpBackend(), local_threadsafe=True):
            warnings.simplefilter("ignore")  # tensorly warns when the rank exceeds a mode's size
            weights, factors = parafac(w_fit, rank, init="svd", n_iter_max=self.n_iter_max, tol=self.tol,
                                       random_state=seed, linesearch=True,
                                       callback=lambda _cp, err: trace.append(float(err)))
        factors = [np.asarray(f, dtype=np.float64) for f in factors]
        weights = np.asarray(weights, dtype=np.float64)
        iterations = len(trace) - 1
        if not all(np.isfinite(f).all() for f in factors) or not np.isfinite(trace).all():
            return "CP-ALS diverged (non-finite factors)"
        still_falling = trace[-6:][0] - trace[-1]
        if iterations >= self.n_iter_max and still_falling > STALL:
            return (f"CP-ALS did not converge in {iterations} iterations (relative error {trace[-1]:.3g} still "
                    f"falling by {still_falling:.3g} over the last 5)")
        out_f = factors[0] * weights
        norms = np.prod([np.linalg.norm(f, axis=0) for f in [out_f, *factors[1:]]], axis=0)
        spread = float(np.sqrt(np.sum(norms**2)) / np.linalg.norm(w_fit))  # ~1 for well-separated components
        if spread > DEGENERATE:
            return f"CP-ALS degenerate (components {spread:.1f}x the weight's norm cancel)"
        return (out_f, factors[1], factors[2:]), {"iterations": iterations, "cp_fit_error": trace[-1],
                                                  "spread": spread}

    def _emit(self, layer: Layer, view: GraphView, geo: ConvGeometry, plan: list[list[int]], first: np.ndarray,
              kernels: list[np.ndarray], last: np.ndarray, bias: np.ndarray | None) -> list[onnx.NodeProto]:
        name, dtype, n = layer.name, geo.weight.dtype, len(geo.kernel)
        rank = first.shape[1]
        ones = [1] * n
        nodes = [conv(view, f"{name}/cp_in", layer.node.input[0], first.T.reshape(rank, geo.c_in, *ones), None, dtype)]
        for axes in plan:
            kernel_axis = axes[0]
            shape = [geo.kernel[kernel_axis] if a == kernel_axis else 1 for a in range(n)]
            weight = kernels[kernel_axis].T.reshape(rank, 1, *shape)
            strides = [geo.strides[a] if a in axes else 1 for a in range(n)]
            dilations = [geo.dilations[a] if a == kernel_axis else 1 for a in range(n)]
            pads = [geo.pads[a] if a in axes else 0 for a in range(n)] + \
                   [geo.pads[a + n] if a in axes else 0 for a in range(n)]
            nodes.append(conv(view, f"{name}/cp_k{kernel_axis}", nodes[-1].output[0], weight, None, dtype,
                              group=rank, strides=strides, pads=pads, dilations=dilations))
        nodes.append(conv(view, f"{name}/cp_out", nodes[-1].output[0], last.reshape(geo.c_out, rank, *ones), bias,
                          dtype, output=layer.node.output[0]))
        return nodes


def _balance(first: np.ndarray, spatial: list[np.ndarray], out_f: np.ndarray):
    """Unit-norm first and depthwise factors (the scale moves to the last conv), so that every
    intermediate activation stays at a sane scale in float32. A k=1 axis has no conv: its factor
    is folded entirely into the last conv."""
    scale = np.linalg.norm(first, axis=0)
    first = first / np.where(scale > 0, scale, 1)
    out_f = out_f * scale
    kernels = []
    for f in spatial:
        s = f[0] if len(f) == 1 else np.linalg.norm(f, axis=0)
        kernels.append(f / np.where(s != 0, s, 1))
        out_f = out_f * s
    return first, kernels, out_f


def _plan(geo: ConvGeometry) -> list[list[int]]:
    """Spatial axes per depthwise conv: each axis with k > 1 gets one; axes with k = 1 (whose
    stride or pads still apply) ride on the first."""
    real = [a for a, k in enumerate(geo.kernel) if k > 1]
    rest = [a for a, k in enumerate(geo.kernel) if k == 1]
    plan = [[a] for a in real]
    plan[0].extend(rest)
    return plan


def _macs(geo: ConvGeometry, plan: list[list[int]], rank: int) -> int:
    """MACs of the chain: the 1x1 at the input size, each depthwise conv at its output size."""
    n = len(geo.kernel)
    size = list(geo.in_spatial) if geo.in_spatial else [1] * n
    out = list(geo.out_spatial) if geo.out_spatial else [1] * n
    total = geo.c_in * rank * numel(size)
    for axes in plan:
        for a in axes:
            size[a] = out[a]
        total += rank * geo.kernel[axes[0]] * numel(size)
    return total + rank * geo.c_out * numel(out)


def _chain_matrix(first: np.ndarray, kernels: list[np.ndarray]) -> np.ndarray:
    """F[r, (c, i, j, ...)] = first[c, r] * prod_a kernel_a[i_a, r]: the rank-R map from a patch."""
    out = first.T  # [R, C]
    for k in kernels:
        out = (out[..., None] * k.T.reshape(k.shape[1], *([1] * (out.ndim - 1)), k.shape[0]))
    return out.reshape(first.shape[1], -1)
