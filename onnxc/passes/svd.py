"""`svd`: a dense layer y = W x + b becomes two thin ones, y = U (V x) + b, with rank r.

Covers Gemm (any transA/transB, alpha, beta, with or without C: `LinearLayer` reads them all as
[out, in] and a bias) and MatMul with a constant 2-D weight on either side, including batched
activations such as [B, T, D] @ [D, F] in transformers
(a MatMul followed by an Add of a bias vector has that bias refitted too). With calibration data
the factors minimize the layer's output error (SVD of W C^(1/2), mapped back by C^(-1/2), and the
bias absorbs the input mean), otherwise the weight error (plain truncated SVD). The rank-r form
costs r (K + N) instead of K N per row, so it is only emitted when r < K N / (K + N).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxc.compiler.graph import GraphView
from onnxc.compiler.linear import LinearLayer, float_const
from onnxc.compiler.passes import Change, PassContext, register
from onnxc.passes import _whiten
from onnxc.passes._dense import opset_version
from onnxc.passes._factor import FactorPass, Fitted, Layer, cost, numel, output_error
from onnxc.passes._rank import choose_ranks


@register
@dataclass
class SvdPass(FactorPass):
    id = "svd"
    plan_order = 20
    planned_by_default = True
    summary = "low-rank SVD of Gemm/MatMul weights (two thin layers), fitted to the layer's inputs"
    option_help = FactorPass.common_help

    ratio: float = 0.5

    # ---- candidates ----------------------------------------------------------------------------
    def candidate(self, node: onnx.NodeProto, view: GraphView, model: onnx.ModelProto) -> Layer | str | None:
        if node.op_type not in ("Gemm", "MatMul"):
            return None
        if node.op_type == "MatMul":
            wa, wb = float_const(view, node.input[0]), float_const(view, node.input[1])
            if (wa is None) == (wb is None):
                return None if wa is None else "both inputs are constant"
            if wa is not None:
                return self._left(node, view, wa)
        layer = LinearLayer.read(node, view)
        return layer if isinstance(layer, str) else self._dense(layer, view, model)

    @staticmethod
    def _dense(layer: LinearLayer, view: GraphView, model: onnx.ModelProto) -> Layer:
        """x W^T + b: a Gemm (rows of A, maybe transposed) or x[..., K] @ W[K, N] (+ a bias Add)."""
        w = layer.weight.astype(np.float64)  # [N, K]
        k = w.shape[1]
        shape = view.static_shape(layer.x)
        if layer.kind == "Gemm":
            m = (shape[1] if layer.trans_a else shape[0]) if shape and len(shape) == 2 else 1
            rows = _whiten.axis_rows(0, k) if layer.trans_a else _whiten.last_axis_rows(k)
            info = {"kind": "gemm", "trans_a": layer.trans_a, "c": layer.fixed_c, "beta": layer.fixed_c_scale,
                    "opset": opset_version(model)}
            # a C that is no bias vector stays as it is on the second Gemm; no C: a bias is free
            mode = "vector" if layer.bias is not None else "keep" if layer.fixed_c else "free"
        else:
            m = numel(shape[:-1]) if shape else 1
            rows = _whiten.last_axis_rows(k)
            add = layer.bias_add
            info = {"kind": "right", "add": (add.output[0], 1 if add.input[0] == layer.node.output[0] else 0)
                    if add is not None else None}
            mode = "add" if add is not None else "none"
        bias = layer.bias.astype(np.float64) if layer.bias is not None else None
        info.update(w=w, bias=bias, mode=mode, m=m, dtype=layer.dtype)
        return Layer(layer.node, (layer.x, k, rows), info)

    @staticmethod
    def _left(node: onnx.NodeProto, view: GraphView, weight: np.ndarray) -> Layer | str:
        """W[M, K] @ x[..., K, N]: the weight multiplies from the left (no bias)."""
        if weight.ndim != 2:
            return f"weight is {weight.ndim}-D (only 2-D weights are factorized)"
        shape = view.static_shape(node.input[1])
        if shape is None or len(shape) < 2:
            return "activation rank unknown or 1-D"
        k = weight.shape[1]
        return Layer(node, (node.input[1], k, _whiten.axis_rows(-2, k)),
                     {"kind": "left", "w": weight.astype(np.float64), "bias": None, "mode": "none",
                      "m": numel(shape) // k, "dtype": weight.dtype})

    # ---- fitting -------------------------------------------------------------------------------
    def fit(self, layer: Layer, view: GraphView, moments: _whiten.Moments | None, ctx: PassContext) -> Fitted | str:
        info = layer.info
        w, m = info["w"], info["m"]
        n_out, k = w.shape
        free_bias = info["mode"] in ("vector", "add", "free")
        dec = _whiten.matrix_svd(w, moments, centered=free_bias)
        macs_before = m * k * n_out
        ranks, reason = choose_ranks(self.rule(), lambda r: m * r[0] * (k + n_out), macs_before, (min(k, n_out),),
                                     spectra=lambda: [(dec.s, w.shape)])
        if ranks is None:
            return reason
        rank = ranks[0]
        u, v = dec.factors(rank)
        dtype = info["dtype"]
        u, v = u.astype(dtype), v.astype(dtype)
        w_new = u.astype(np.float64) @ v.astype(np.float64)
        bias = info["bias"]
        b_old = bias if bias is not None else np.zeros(n_out)
        b_new = bias
        if moments is not None and free_bias:
            b_new = b_old + (w - w_new) @ moments.mean
        b_new = b_new.astype(dtype) if b_new is not None else None
        aug = (np.column_stack([w, b_old]),
               np.column_stack([w_new, b_new.astype(np.float64) if b_new is not None else np.zeros(n_out)]))
        error, kind = output_error(*aug, moments)
        nodes = self._emit(layer, view, u, v, b_new)
        updates = []
        if info["mode"] == "add" and b_new is not None:  # the refitted bias lives in the following Add
            add_out, idx = info["add"]
            old = view.const(view.producers[add_out].input[idx])
            updates.append((add_out, idx, b_new.reshape(old.shape).astype(old.dtype)))
        bias_params = bias.size if bias is not None and info["kind"] == "gemm" else 0
        new_bias_params = b_new.size if b_new is not None and info["kind"] == "gemm" else 0
        item = np.dtype(dtype).itemsize
        change = Change(layer.name, layer.node.op_type, f"svd rank {rank}",
                        before=cost(k * n_out + bias_params, macs_before, item),
                        after=cost(rank * (k + n_out) + new_bias_params, m * rank * (k + n_out), item),
                        error=error, detail={"rank": rank, "max_rank": min(k, n_out), "shape": [k, n_out],
                                             "error_kind": kind, "data_aware": moments is not None})
        return Fitted(nodes, change, updates, aug=aug)

    # ---- emission ------------------------------------------------------------------------------
    def _emit(self, layer: Layer, view: GraphView, u: np.ndarray, v: np.ndarray,
              b_new: np.ndarray | None) -> list[onnx.NodeProto]:
        node, info = layer.node, layer.info
        name, out = node.name or node.output[0], node.output[0]
        if info["kind"] == "left":  # W @ x = U (V @ x)
            first = view.make_node("MatMul", [view.add_const(f"{name}.svd_v", v), node.input[1]],
                                   name=f"{name}/svd_v")
            second = view.make_node("MatMul", [view.add_const(f"{name}.svd_u", u), first.output[0]], [out],
                                    name=f"{name}/svd_u")
            return [first, second]
        x = node.input[0]
        if info["kind"] == "right":
            first = view.make_node("MatMul", [x, view.add_const(f"{name}.svd_v", np.ascontiguousarray(v.T))],
                                   name=f"{name}/svd_v")
            second = view.make_node("MatMul", [first.output[0], view.add_const(f"{name}.svd_u",
                                                                               np.ascontiguousarray(u.T))],
                                    [out], name=f"{name}/svd_u")
            return [first, second]
        # Gemm: first factor keeps transA; both in the canonical form (transB=1, alpha and beta folded)
        old_opset = info["opset"] < 11
        if info["trans_a"]:
            inputs = [x, view.add_const(f"{name}.svd_v", np.ascontiguousarray(v))]  # [r, K]: [out, in]
            if old_opset:
                inputs.append(view.add_const(f"{name}.svd_zero", np.zeros(v.shape[0], dtype=v.dtype)))
            first = view.make_node("Gemm", inputs, name=f"{name}/svd_v", transA=1, transB=1)
        else:
            first = view.make_node("MatMul", [x, view.add_const(f"{name}.svd_v", np.ascontiguousarray(v.T))],
                                   name=f"{name}/svd_v")
        z, u_name = first.output[0], view.add_const(f"{name}.svd_u", u)
        if info["mode"] == "keep":
            second = view.make_node("Gemm", [z, u_name, info["c"]], [out], name=f"{name}/svd_u", transB=1,
                                    beta=info["beta"])
        elif b_new is not None:
            second = view.make_node("Gemm", [z, u_name, view.add_const(f"{name}.bias", b_new)], [out],
                                    name=f"{name}/svd_u", transB=1)
        elif old_opset:
            zero = view.add_const(f"{name}.svd_zero", np.zeros(u.shape[0], dtype=u.dtype))
            second = view.make_node("Gemm", [z, u_name, zero], [out], name=f"{name}/svd_u", transB=1)
        else:
            second = view.make_node("Gemm", [z, u_name], [out], name=f"{name}/svd_u", transB=1)
        return [first, second]
