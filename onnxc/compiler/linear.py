"""One view of a linear layer's weight and bias, whatever node holds them.

A dense or convolutional layer y = W x + b reaches the passes as a Conv, a Gemm (with transA,
transB, alpha, beta and a C of several shapes) or a MatMul with a constant right-hand weight,
maybe followed by an Add of a constant bias vector. Every pass that reads or rewrites weights
(prune slices them, svd factors them, the refit and cluster's bias correction replace them) used
to decode each variant itself, and each decoding was a place to get one variant wrong.
`LinearLayer` decodes them once: `weight` is always [out, in] (a Conv's [out, in/group, *kernel]),
`bias` always a vector of `out` values or None, and `write` puts new values back in the node's
own form (transposed, divided by alpha or beta, reshaped to the constant it replaces, a bias
input created when there was none). Canonicalization (`canonical.orient_gemms`) writes Gemms in
the orientation this view reads without arithmetic (transB=1, alpha=beta=1), so on canonical
graphs reading and writing a Gemm is exact; other forms are still read and written correctly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxc.compiler.graph import GraphView, attr, set_attr

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
LINEAR_OPS = ("Conv", "Gemm", "MatMul")


def float_const(view: GraphView, name: str) -> np.ndarray | None:
    """A float initializer's value (None for activations and non-float data)."""
    if not name or name not in view.initializers or view.initializers[name].data_type not in FLOAT_TYPES:
        return None
    return view.const(name)


def bias_vector(value: np.ndarray | None, n: int) -> np.ndarray | None:
    """A constant that broadcasts as a per-feature bias over the last axis (a scalar, or n values
    on the last axis), as [n] float64; None for anything else."""
    if value is None:
        return None
    if value.size == 1 or (value.ndim >= 1 and value.shape[-1] == n and value.size == n):
        return np.broadcast_to(value.reshape(-1).astype(np.float64), (n,)).copy()
    return None


def bias_add(node: onnx.NodeProto, view: GraphView) -> tuple[onnx.NodeProto, int] | None:
    """(Add, index of its constant input) when the only reader of `node`'s output adds a constant
    to it (and the output is not also a graph output), so the Add can be taken as the layer's bias."""
    out = node.output[0]
    users = view.consumers.get(out, [])
    if len(users) != 1 or users[0].op_type != "Add" or out in view.graph_outputs:
        return None
    add = users[0]
    idx = 1 if add.input[0] == out else 0
    if add.input[1 - idx] != out or not view.is_const(add.input[idx]):
        return None
    return add, idx


def weight_out_axis(node: onnx.NodeProto, rank: int = 2) -> int:
    """The axis of a Conv/ConvTranspose/Gemm/MatMul's stored weight (of `rank` dims) that indexes
    output channels (a ConvTranspose's first axis: the rows it is sliced and clustered by). It
    needs no weight value: for weights that are no longer initializers (clustered)."""
    if node.op_type == "MatMul" or (node.op_type == "Gemm" and not attr(node, "transB", 0)):
        return rank - 1
    return 0


def stored_to_bias(node: onnx.NodeProto) -> float | None:
    """The factor from a product with the stored weight to the units of the node's own bias
    constant (a Gemm's alpha / beta; None when beta = 0 ignores C); 1 for the other layers."""
    if node.op_type != "Gemm":
        return 1.0
    beta = float(attr(node, "beta", 1.0))
    return float(attr(node, "alpha", 1.0)) / beta if beta else None


def is_linear(node: onnx.NodeProto, view: GraphView) -> bool:
    """Whether `LinearLayer.read` gives a layer for `node` (without decoding its weight)."""
    return node.op_type in LINEAR_OPS and node.domain in ("", "ai.onnx") and not _not_linear(node, view)


def _not_linear(node: onnx.NodeProto, view: GraphView) -> str:
    if len(node.input) < 2 or view.is_const(node.input[0]):
        return "input is constant"
    tensor = view.initializers.get(node.input[1])
    if tensor is None or tensor.data_type not in FLOAT_TYPES:
        return "weight is not a constant float tensor"
    rank = len(tensor.dims)
    if node.op_type == "Conv":
        return "" if rank >= 3 else "weight has no spatial dims"
    return "" if rank == 2 else f"weight is {rank}-D"


@dataclass
class LinearLayer:
    """A Conv, a Gemm with constant float B, or a MatMul with a constant 2-D float right-hand
    weight (and the Add of a bias vector that is its output's only reader), seen as y = W x + b."""

    node: onnx.NodeProto
    weight: np.ndarray  # [out, in] (Conv: [out, in/group, *kernel]), in the stored dtype
    bias: np.ndarray | None  # [out] in the stored dtype, or None
    x: str  # the activation input
    y: str  # the tensor holding W x + b: the bias Add's output when there is one
    bias_add: onnx.NodeProto | None = None  # the MatMul's following Add that holds the bias
    fixed_c: str = ""  # a Gemm C that is no bias vector (per row, or computed): carried as it is
    fixed_c_scale: float = 1.0  # the beta that multiplies `fixed_c`

    @property
    def kind(self) -> str:
        return self.node.op_type

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]

    @property
    def dtype(self) -> np.dtype:
        return self.weight.dtype

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def trans_a(self) -> bool:
        """A Gemm reading its activation transposed ([K, M]: features on axis 0)."""
        return self.kind == "Gemm" and bool(attr(self.node, "transA", 0))

    # ---- reading ---------------------------------------------------------------------------------
    @classmethod
    def read(cls, node: onnx.NodeProto, view: GraphView, *, with_add: bool = True) -> LinearLayer | str | None:
        """The node's layer; a reason when it is a Conv/Gemm/MatMul that is not a constant-weight
        linear layer; None for other ops. `with_add=False` leaves a MatMul's bias Add out (a
        caller that handles the Add as an op of its own)."""
        if node.op_type not in LINEAR_OPS or node.domain not in ("", "ai.onnx"):
            return None
        reason = _not_linear(node, view)
        if reason:
            return reason
        weight = view.const(node.input[1])
        if node.op_type == "Conv":
            return cls._conv(node, view, weight)
        if node.op_type == "Gemm":
            return cls._gemm(node, view, weight)
        return cls._matmul(node, view, weight, with_add)

    @classmethod
    def _conv(cls, node: onnx.NodeProto, view: GraphView, weight: np.ndarray) -> LinearLayer | str:
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = float_const(view, node.input[2])
            if bias is None:
                return "bias is not a constant float tensor"
        return cls(node, weight, bias, node.input[0], node.output[0])

    @classmethod
    def _gemm(cls, node: onnx.NodeProto, view: GraphView, b: np.ndarray) -> LinearLayer:
        alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
        weight = b if weight_out_axis(node) == 0 else b.T
        if alpha != 1.0:
            weight = (alpha * weight.astype(np.float64)).astype(b.dtype)
        layer = cls(node, weight, None, node.input[0], node.output[0])
        c = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        if not c:
            return layer
        value = float_const(view, c)
        vector = bias_vector(value, layer.out_features) if value is not None and value.ndim <= 2 else None
        if vector is None:
            layer.fixed_c, layer.fixed_c_scale = c, beta
        elif beta == 1.0 and value.size == layer.out_features:
            layer.bias = value.reshape(-1)
        else:
            layer.bias = (beta * vector).astype(b.dtype)
        return layer

    @classmethod
    def _matmul(cls, node: onnx.NodeProto, view: GraphView, b: np.ndarray, with_add: bool) -> LinearLayer:
        layer = cls(node, b.T, None, node.input[0], node.output[0])
        found = bias_add(node, view) if with_add else None
        if found is None:
            return layer
        add, idx = found
        value = float_const(view, add.input[idx])
        y_shape = view.shape(node.output[0]) or view.shape(node.input[0])  # the same rank for a 2-D weight
        n = layer.out_features
        if value is None or value.size != n or value.shape[-1] != n or y_shape is None or value.ndim > len(y_shape):
            return layer  # a scalar or broadcast Add: not written back as this layer's bias
        layer.bias, layer.bias_add, layer.y = value.reshape(-1), add, add.output[0]
        return layer

    # ---- writing ---------------------------------------------------------------------------------
    def write(self, view: GraphView, weight: np.ndarray, bias: np.ndarray | None = None) -> None:
        """Put `weight` ([out, in], or a Conv's [out, in/group, *kernel]) and `bias` ([out]) into
        the node in its own form (shared initializers are copied, never changed under another
        node). `bias=None` leaves the bias as it is (none stays none). A MatMul without a bias Add
        cannot take a bias (ValueError): adding an Add node is the caller's choice."""
        node, dtype = self.node, self.dtype
        if bias is not None and self.kind == "MatMul" and self.bias_add is None:
            raise ValueError(f"MatMul '{self.name}' has no bias Add to hold a bias")
        if bias is not None and self.fixed_c:
            raise ValueError(f"Gemm '{self.name}' has a C that is not a bias vector")
        if self.kind == "Gemm":
            stored = weight if weight_out_axis(node) == 0 else weight.T
            alpha = float(attr(node, "alpha", 1.0))
            if alpha != 1.0:
                stored = stored.astype(np.float64) / alpha
            view.set_input_const(node, 1, np.asarray(stored).astype(dtype))
        elif self.kind == "MatMul":
            view.set_input_const(node, 1, np.asarray(weight).T.astype(dtype))
        else:
            view.set_input_const(node, 1, np.asarray(weight).astype(dtype))
        self.weight = np.asarray(weight).astype(dtype)
        if bias is None:
            return
        bias = np.asarray(bias).reshape(-1)
        self.bias = bias.astype(dtype)
        if self.kind == "MatMul":
            idx = 1 if self.bias_add.input[0] == node.output[0] else 0
            old = view.const(self.bias_add.input[idx])
            shape = old.shape if old.size == bias.size else (-1,)
            view.set_input_const(self.bias_add, idx, bias.reshape(shape).astype(old.dtype))
        elif self.kind == "Gemm":
            beta = float(attr(node, "beta", 1.0))
            if beta == 0.0:
                set_attr(node, "beta", 1.0)
            elif beta != 1.0:
                bias = bias.astype(np.float64) / beta
            self._set_bias(view, bias.astype(dtype))
        else:
            self._set_bias(view, bias.astype(dtype))

    def _set_bias(self, view: GraphView, bias: np.ndarray) -> None:
        node = self.node
        if len(node.input) > 2 and node.input[2]:
            old = view.initializers.get(node.input[2])
            shape = tuple(old.dims) if old is not None and int(np.prod(old.dims)) == bias.size else (-1,)
            view.set_input_const(node, 2, bias.reshape(shape))
            return
        name = view.add_const(f"{self.name}_bias", bias)
        while len(node.input) < 2:
            node.input.append("")
        if len(node.input) == 2:
            node.input.append(name)
        else:
            node.input[2] = name
        view.consumers[name].append(node)
