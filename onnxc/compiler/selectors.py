"""Scalar integer inputs that select a branch of an `If`, and a value the model accepts for each.

A streaming audio model takes its sample rate as an int64 scalar and branches on it
(`If(Equal(sr, 16000))`): drawing 0 or 1 for it, as for other integer inputs, runs a branch no
real caller ever takes, or none at all. Its value comes from the calibration data when there is
some; else from the constants the model compares it with (the then-branch's); else the user is
asked for it in one line that names the input.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxc.errors import OnnxcError

# Ops a condition passes its input through unchanged in meaning, and the comparisons it ends at.
_PASS = {"Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Not", "Flatten"}
_COMPARE = {"Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual"}


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR),
                         None)
            if value is not None:
                out[node.output[0]] = numpy_helper.to_array(value)
    return out


def _source(name: str, producers: dict[str, onnx.NodeProto]) -> str:
    """The tensor `name` is a pass-through view of."""
    seen = 0
    while name in producers and producers[name].op_type in _PASS and seen < 16:
        name = producers[name].input[0]
        seen += 1
    return name


def selector_inputs(model: onnx.ModelProto) -> dict[str, list[tuple[str, np.ndarray | None]]]:
    """Each graph input that reaches an `If` condition, with (If node, the constant it is compared
    with or None) per If."""
    inits = {t.name for t in model.graph.initializer}
    inputs = {vi.name for vi in model.graph.input if vi.name not in inits}
    producers = {o: n for n in model.graph.node for o in n.output if o}
    consts = _constants(model)
    found: dict[str, list[tuple[str, np.ndarray | None]]] = {}
    for node in model.graph.node:
        if node.op_type != "If":
            continue
        cond = _source(node.input[0], producers)
        label = node.name or node.output[0]
        if cond in inputs:
            found.setdefault(cond, []).append((label, None))
            continue
        compare = producers.get(cond)
        if compare is None or compare.op_type not in _COMPARE:
            continue
        sides = [_source(i, producers) for i in compare.input[:2]]
        for i, side in enumerate(sides):
            other = compare.input[1 - i]
            if side in inputs:
                value = consts.get(other)
                found.setdefault(side, []).append((label, None if value is None else np.asarray(value)))
    return found


def selector_values(model: onnx.ModelProto, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """A value each integer scalar selector input takes when the data gives none: the constant
    the first condition on it compares with; one line naming the input when nothing says."""
    out = {}
    for name, uses in selector_inputs(model).items():
        if names is not None and name not in names:
            continue
        dtype, dims = _spec(model, name)
        if dtype is None or dtype.kind not in "iu" or dims is None or any(d != 1 for d in dims):
            continue
        value = next((v for _, v in uses if v is not None and v.size == 1), None)
        if value is None:
            raise OnnxcError(f"input '{name}' selects the branch of If '{uses[0][0]}' and the model compares it "
                             f"with no constant: give its value in the calibration data ({name} = the value "
                             "your pipeline feeds)")
        out[name] = np.asarray(value).reshape(dims).astype(dtype)
    return out


def _spec(model: onnx.ModelProto, name: str) -> tuple[np.dtype | None, list[int] | None]:
    """The input's dtype and dims (None when its shape is not declared)."""
    for vi in model.graph.input:
        if vi.name == name and vi.type.HasField("tensor_type"):
            tt = vi.type.tensor_type
            dims = [d.dim_value for d in tt.shape.dim] if tt.HasField("shape") else None
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims
    return None, None
