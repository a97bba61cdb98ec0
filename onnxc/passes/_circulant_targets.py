"""Which nodes of a graph are dense layers y = x @ W + bias that `circulant` can rewrite.

Gemm with transA=0 (any transB, alpha, beta; C a constant vector or absent) and MatMul with a
constant 2-D float32 weight on the right (x may be batched, [..., K]); a MatMul whose only user
is an Add of a constant bias vector is taken together with that Add. A pointwise Conv (kernel 1,
group 1, stride 1, no padding; [N, C, ...] input) is a dense layer over channels too: its rows
are the per-position channel vectors (the feature axis is 1 instead of the last). Anything else
is either not a dense layer (None: an activation x activation MatMul, a spatial conv) or a
candidate left alone with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxc.compiler.graph import GraphView, attr
from onnxc.passes._circulant_forms import PATTERN
from onnxc.passes._dense import bias_add, bias_vector


@dataclass
class Target:
    """One dense layer: y = x @ weight + bias, computed today by the nodes producing `outputs`."""

    name: str
    op: str
    outputs: list[str]  # first output of each node replaced (MatMul/Gemm, then a bias Add)
    x: str
    y: str
    weight: np.ndarray  # [K, N] float64
    bias: np.ndarray | None  # [N] float64
    dims: list | None  # input shape: ints, or None/str for symbolic dims; None: unknown until observed
    channels_first: bool = False  # features on axis 1 (a pointwise Conv), else on the last axis

    @property
    def shape(self) -> list[int]:
        """The input shape with symbolic dims as 1."""
        return self.timing_shape(1)

    @property
    def rows(self) -> int:
        """Activation rows per sample (all but the batch and feature dims)."""
        positions = self.shape[2:] if self.channels_first else self.shape[1:-1]
        return int(np.prod(positions, dtype=np.int64))

    def matrix(self, x: np.ndarray) -> np.ndarray:
        """The layer's input rows [rows, K] of an activation batch."""
        k = self.weight.shape[0]
        return (np.moveaxis(x, 1, -1) if self.channels_first else x).reshape(-1, k)

    def timing_shape(self, batch: int) -> list[int]:
        return [d if isinstance(d, int) and d > 0 else batch for d in self.dims]

    def observe(self, x: np.ndarray) -> None:
        """Take the input shape from a captured activation when the graph does not say it (a
        Reshape to a computed shape hides it from shape inference): the batch dim stays symbolic."""
        if self.dims is None:
            self.dims = ["N", *x.shape[1:]]


def find(node: onnx.NodeProto, view: GraphView) -> Target | str | None:
    """The dense layer `node` computes, a reason it cannot be rewritten, or None if it is none."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Gemm":
        return _gemm(node, view)
    if node.op_type == "MatMul":
        return _matmul(node, view)
    if node.op_type == "Conv":
        return _pointwise_conv(node, view)
    return None


def _vector(value: np.ndarray | None, n: int) -> np.ndarray | None:
    """A float32 constant that broadcasts as a per-feature bias over the last axis, as [n] float64."""
    return bias_vector(value, n) if value is not None and value.dtype == np.float32 else None


def _gemm(node: onnx.NodeProto, view: GraphView) -> Target | str:
    name = node.name or node.output[0]
    w = view.const(node.input[1])
    if w is None or w.ndim != 2 or w.dtype != np.float32:
        return "weight (input B) is not a constant 2-D float32 tensor"
    if view.is_const(node.input[0]):
        return "input A is constant"
    if attr(node, "transA", 0):
        return "transA=1 is not supported"
    w = float(attr(node, "alpha", 1.0)) * (w.T if attr(node, "transB", 0) else w).astype(np.float64)
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = _vector(view.const(node.input[2]), w.shape[1])
        if bias is None:
            return "bias C is not a constant vector"
        bias *= float(attr(node, "beta", 1.0))
    dims = view.shape(node.input[0]) or [None, w.shape[0]]  # Gemm's input is 2-D
    if len(dims) != 2:
        return "input is not 2-D"
    return Target(name, "Gemm", [node.output[0]], node.input[0], node.output[0], w, bias, dims)


def _matmul(node: onnx.NodeProto, view: GraphView) -> Target | str | None:
    name = node.name or node.output[0]
    x, wname = node.input
    if view.is_const(x):
        return None if view.is_const(wname) else "constant on the left (W @ x) is not supported"
    w = view.const(wname)
    if w is None:
        return None  # activation x activation (attention): not a dense layer
    if w.ndim != 2 or w.dtype != np.float32:
        return f"weight is not a 2-D float32 tensor ({w.ndim}-D {w.dtype})"
    dims = view.shape(x)  # None: observed on calibration data
    if dims is not None and len(dims) < 2:
        return "input rank below 2"
    if _is_shift_form(x, view):
        return "already block-circulant (shift form)"
    outputs, y, bias = [node.output[0]], node.output[0], None
    found = bias_add(node, view)
    if found is not None:
        add, idx = found
        value = view.const(add.input[idx])
        bias = _vector(value, w.shape[1]) if value.ndim <= (len(dims) if dims else 1) else None
        if bias is not None:
            outputs, y = [y, add.output[0]], add.output[0]
    return Target(name, "MatMul", outputs, x, y, w.astype(np.float64), bias, dims)


def _pointwise_conv(node: onnx.NodeProto, view: GraphView) -> Target | str | None:
    """A 1x1 Conv as y[n, :, pos] = x[n, :, pos] @ W + bias; None for any other conv."""
    name = node.name or node.output[0]
    w = view.const(node.input[1]) if len(node.input) > 1 else None
    if w is None or w.ndim < 3 or any(d != 1 for d in w.shape[2:]):
        return None  # a spatial kernel, or a weight computed at run time (a rewritten layer)
    if w.dtype != np.float32:
        return f"weight is not float32 ({w.dtype})"
    if view.is_const(node.input[0]):
        return "input is constant"
    if attr(node, "group", 1) != 1:
        return "grouped 1x1 conv is not a dense layer over all channels"
    if any(s != 1 for s in attr(node, "strides", None) or []):
        return "strided 1x1 conv (it reads a subset of positions)"
    if any(p != 0 for p in attr(node, "pads", None) or []):
        return "padded 1x1 conv (its border outputs are the bias alone)"
    dims = view.shape(node.input[0])  # None: observed on calibration data
    if dims is not None and len(dims) != w.ndim:
        return "input rank differs from the weight's"
    weight = w.reshape(w.shape[0], w.shape[1]).T.astype(np.float64)  # [C_in, C_out]
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = _vector(view.const(node.input[2]), weight.shape[1])
        if bias is None:
            return "bias is not a constant vector"
    return Target(name, "Conv", [node.output[0]], node.input[0], node.output[0], weight, bias, dims,
                  channels_first=True)


def _is_shift_form(x: str, view: GraphView) -> bool:
    """x = Reshape(Gather(..., shift pattern)): the MatMul of a layer `circulant` already rewrote."""
    reshape = view.producers.get(x)
    gather = view.producers.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
    return gather is not None and gather.op_type == "Gather" and gather.input[1].startswith(PATTERN)
