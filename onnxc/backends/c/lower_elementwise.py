"""Elementwise ops: unary activations (also fused into the op that feeds them) and binary ops
with numpy broadcasting (Add, Sub, Mul, Div, Max, Min, PRelu, Pow, variadic Sum)."""

from __future__ import annotations

import numpy as np
import onnx

from onnxc.backends.c.lowering import Lowerer, broadcast_strides, collapse, handles, text_attr
from onnxc.backends.c.program import Arg, Call
from onnxc.compiler.graph import attr

# Codes of the kernels' ONNXC_OP_* enum.
UNARY = {"Relu": 1, "Clip": 2, "LeakyRelu": 3, "Sigmoid": 4, "HardSigmoid": 5, "HardSwish": 6, "Tanh": 7,
         "Elu": 8, "Selu": 9, "Softplus": 10, "Softsign": 11, "Abs": 12, "Neg": 13, "Exp": 14, "Log": 15,
         "Sqrt": 16, "Reciprocal": 17, "Floor": 18, "Ceil": 19,
         # onnxc_unary_math
         "Erf": 32, "Gelu": 33, "Mish": 35, "Sin": 36, "Cos": 37, "Tan": 38, "Asin": 39, "Acos": 40, "Atan": 41,
         "Sinh": 42, "Cosh": 43, "Asinh": 44, "Acosh": 45, "Atanh": 46, "Sign": 47, "Round": 48,
         "ThresholdedRelu": 49, "Shrink": 50, "Celu": 51, "Swish": 52}
MATH = 32  # codes from here on are computed by onnxc_unary_math
BINARY = {"Add": 0, "Sub": 1, "Mul": 2, "Div": 3, "Max": 4, "Min": 5, "PRelu": 6, "Pow": 7}
VARIADIC = {"Sum": "Add", "Max": "Max", "Min": "Min"}


def unary_spec(lo: Lowerer, node: onnx.NodeProto) -> tuple[int, float, float] | None:
    """(op code, a, b) of a unary node whose parameters are known at export time, else None."""
    op = node.op_type
    if op not in UNARY or node.domain not in ("", "ai.onnx") or len([o for o in node.output if o]) != 1:
        return None
    a = b = 0.0
    if op == "Clip":
        a, b = -np.inf, np.inf
        if lo.opset < 11:
            a, b = attr(node, "min", a), attr(node, "max", b)
        else:
            bounds = [a, b]
            for i in (1, 2):
                if len(node.input) > i and node.input[i]:
                    value = lo.const(node.input[i])
                    if value is None or value.size != 1:
                        return None
                    bounds[i - 1] = float(value.reshape(-1)[0])
            a, b = bounds
    elif op == "LeakyRelu":
        a = attr(node, "alpha", 0.01)
    elif op == "HardSigmoid":
        a, b = attr(node, "alpha", 0.2), attr(node, "beta", 0.5)
    elif op == "Elu":
        a = attr(node, "alpha", 1.0)
    elif op == "Selu":
        a, b = attr(node, "alpha", 1.67326319217681884765625), attr(node, "gamma", 1.05070102214813232421875)
    elif op in ("ThresholdedRelu", "Celu", "Swish"):
        a = attr(node, "alpha", 1.0)
    elif op == "Shrink":
        a, b = attr(node, "lambd", 0.5), attr(node, "bias", 0.0)
    elif op == "Gelu":
        if text_attr(node, "approximate", "none") == "tanh":
            return UNARY["Gelu"] + 1, 0.0, 0.0
    return UNARY[op], float(a), float(b)


def unary_call(lo: Lowerer, x: Arg, y: str, spec: tuple[int, float, float]) -> Call:
    code, a, b = spec
    fn = "onnxc_unary_math" if code >= MATH else "onnxc_unary"
    return Call(fn, [x, Arg.t(y), lo.lit(lo.size(y)), lo.lit(code), lo.lit(a), lo.lit(b)])


@handles(*UNARY)
def unary(lo: Lowerer, node: onnx.NodeProto) -> None:
    spec = unary_spec(lo, node)
    if spec is None:
        raise lo.unsupported(node, "bounds computed at run time")
    x, y = node.input[0], lo.out(node)
    lo.step(node, node.op_type, [x], [y], [unary_call(lo, lo.ref(x), y, spec)], inplace=0)


def binary_call(lo: Lowerer, op: str, a: str, b: str, y: str, act: dict, hint: str,
                a_arg: Arg | None = None) -> Call:
    out = lo.shape(y)
    dims, (sa, sb) = collapse(list(out), [broadcast_strides(lo.shape(a), out), broadcast_strides(lo.shape(b), out)])
    if len(dims) > 6:
        raise lo.unsupported(lo.view.producers[y] if y in lo.view.producers else None, "broadcast over > 6 dims")
    fields = {"op": BINARY[op], "rank": len(dims), "dims": dims, "sa": sa, "sb": sb, **act}
    return Call("onnxc_binary", [a_arg or lo.ref(a), lo.ref(b), Arg.t(y), lo.params("onnxc_binary_p", fields, hint)])


NO_ACT = {"act": 0, "act_a": 0.0, "act_b": 0.0}


def fold_calls(lo: Lowerer, op: str, inputs: list[str], y: str, act: dict, hint: str) -> list[Call]:
    """`y = op(op(in0, in1), in2)...`: later calls accumulate into `y`; `act` applies to the last."""
    calls = []
    for k in range(1, len(inputs)):
        a, a_arg = (inputs[0], None) if k == 1 else (y, Arg.t(y))
        calls.append(binary_call(lo, op, a, inputs[k], y, act if k == len(inputs) - 1 else NO_ACT, hint, a_arg))
    return calls


@handles("Mean")
def mean(lo: Lowerer, node: onnx.NodeProto) -> None:
    """Sum of the inputs (as Sum), then divided by their count in place."""
    inputs = [i for i in node.input if i]
    y = lo.out(node)
    if len(inputs) == 1:
        lo.view_step(node, inputs[0], y)
        return
    calls = fold_calls(lo, "Add", inputs, y, NO_ACT, node.name or y)
    count = lo.float_const(np.array([len(inputs)], np.float32), f"{node.name or y}_n")
    out = lo.shape(y)
    fields = {"op": BINARY["Div"], "rank": 1, "dims": [max(int(np.prod(out)), 1)], "sa": [1], "sb": [0], **NO_ACT}
    calls.append(Call("onnxc_binary", [Arg.t(y), count, Arg.t(y), lo.params("onnxc_binary_p", fields, node.name or y)]))
    lo.step(node, "Mean", inputs, [y], calls)


@handles(*BINARY, "Sum")
def binary(lo: Lowerer, node: onnx.NodeProto) -> None:
    inputs = [i for i in node.input if i]
    y = lo.out(node)
    out = lo.shape(y)
    op = VARIADIC.get(node.op_type, node.op_type) if len(inputs) != 2 else (
        "Add" if node.op_type == "Sum" else node.op_type)
    if len(inputs) == 1:  # Sum/Max/Min of one tensor: itself
        lo.view_step(node, inputs[0], y)
        return
    calls = fold_calls(lo, op, inputs, y, lo.act(node), node.name or y)
    # In place on an input with the output's shape (not one read again by a later call).
    same = [i for i, name in enumerate(inputs[:2]) if lo.shape(name) == out and not lo.is_const(name)]
    runtime = [i for i in inputs if not lo.is_const(i)]
    inplace = runtime.index(inputs[same[0]]) if same and inputs.count(inputs[same[0]]) == 1 else None
    lo.step(node, node.op_type, inputs, [y], calls, inplace=inplace)
