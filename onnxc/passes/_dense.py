"""What svd and circulant both read around a dense layer (Gemm/MatMul with a constant weight)."""

from __future__ import annotations

import numpy as np
import onnx

from onnxc.compiler.graph import GraphView


def opset_version(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


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
