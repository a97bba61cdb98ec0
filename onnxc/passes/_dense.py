"""What svd and circulant both read around a dense layer (Gemm/MatMul with a constant weight).

The bias helpers live with `LinearLayer` in `compiler/linear.py`; they are re-exported here for
the passes that import them from this module."""

from __future__ import annotations

import onnx

from onnxc.compiler.linear import bias_add, bias_vector

__all__ = ["bias_add", "bias_vector", "opset_version"]


def opset_version(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
