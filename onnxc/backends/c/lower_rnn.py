"""Recurrent ops: LSTM and GRU (kernels in onnxc_rnn.c).

Supported: both layouts, forward / reverse / bidirectional, the default activations (sigmoid gates,
tanh cell and hidden), clip, optional bias, initial states (constants or run-time tensors, e.g.
the state inputs of a streaming model), constant sequence lengths and LSTM peepholes.

The kernel keeps the running state in the Y_h (and Y_c) tensors, so they always get storage;
when the model leaves them out, they become private tensors of this step, as does the work
buffer of one time step's gate pre-activations.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxc.backends.c.lowering import Lowerer, handles, text_attr
from onnxc.backends.c.program import Arg, Call
from onnxc.compiler.graph import attr

NULL = Arg("lit", "NULL")
DEFAULT_ACTS = {"LSTM": ["sigmoid", "tanh", "tanh"], "GRU": ["sigmoid", "tanh"]}


def _opt(node: onnx.NodeProto, i: int) -> str | None:
    return node.input[i] if len(node.input) > i and node.input[i] else None


def _const_input(lo: Lowerer, node: onnx.NodeProto, i: int, what: str) -> np.ndarray | None:
    name = _opt(node, i)
    if name is None:
        return None
    value = lo.const(name)
    if value is None:
        raise lo.unsupported(node, f"{what} computed at run time")
    return value


def _private(lo: Lowerer, node: onnx.NodeProto, tag: str, shape: tuple[int, ...]) -> str:
    """A tensor only this step reads and writes (state the model does not output, work space)."""
    name = f"{node.output[0] or node.name}::onnxc_{tag}"
    lo.prog.shapes[name] = shape
    return name


def _check_attrs(lo: Lowerer, node: onnx.NodeProto, dirs: int) -> None:
    if node.op_type == "LSTM" and attr(node, "input_forget", 0):
        raise lo.unsupported(node, "input_forget")
    acts = attr(node, "activations")
    if acts is not None:
        names = [a.decode().lower() if isinstance(a, bytes) else str(a).lower() for a in acts]
        if names != DEFAULT_ACTS[node.op_type] * dirs:
            raise lo.unsupported(node, f"activations {names}")


@handles("LSTM", "GRU")
def rnn(lo: Lowerer, node: onnx.NodeProto) -> None:
    lstm = node.op_type == "LSTM"
    gates = 4 if lstm else 3
    direction = text_attr(node, "direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    _check_attrs(lo, node, dirs)
    hidden = attr(node, "hidden_size")
    x = node.input[0]
    layout = attr(node, "layout", 0)
    seq, batch, inp = lo.shape(x)
    if layout:
        seq, batch = batch, seq
    w, r = _const_input(lo, node, 1, "W"), _const_input(lo, node, 2, "R")
    if w is None or r is None:
        raise lo.unsupported(node, "missing W or R")
    hidden = hidden or r.shape[-1]
    if w.shape != (dirs, gates * hidden, inp) or r.shape != (dirs, gates * hidden, hidden):
        raise lo.unsupported(node, f"W {w.shape} / R {r.shape} do not match hidden_size {hidden}")
    b = _const_input(lo, node, 3, "B")
    lens = _const_input(lo, node, 4, "sequence_lens")
    if lens is not None and (lens.reshape(-1) == seq).all():
        lens = None
    if lens is not None and (lens.min() < 0 or lens.max() > seq):
        raise lo.unsupported(node, f"sequence_lens {lens.tolist()} outside [0, {seq}]")
    peep = _const_input(lo, node, 7, "P") if lstm else None
    hint = node.name or node.output[0] or "rnn"

    def const_or_null(value: np.ndarray | None, tag: str) -> str:
        return "NULL" if value is None else lo.float_const(value, f"{hint}_{tag}").value

    fields = {"seq": seq, "batch": batch, "input": inp, "hidden": hidden, "dirs": dirs,
              "reverse": int(direction == "reverse"),
              "linear_before_reset": 0 if lstm else attr(node, "linear_before_reset", 0), "layout": layout,
              "clip": float(attr(node, "clip", 0.0) or 0.0),
              "w": const_or_null(w, "W"), "r": const_or_null(r, "R"), "b": const_or_null(b, "B"),
              "peep": const_or_null(peep, "P"),
              "lens": "NULL" if lens is None else lo.int_table(lens.reshape(-1), f"{hint}_lens")}
    p = lo.params("onnxc_rnn_p", fields, hint)

    def state_in(i: int) -> tuple[Arg, list[str]]:
        name = _opt(node, i)
        if name is None:
            return NULL, []
        value = lo.const(name)
        if value is not None and not value.any():
            return NULL, []  # zeros: the kernel's default
        return lo.ref(name), [] if lo.is_const(name) else [name]

    def output(i: int, tag: str, shape: tuple[int, ...]) -> str:
        name = node.output[i] if len(node.output) > i else ""
        return name or _private(lo, node, tag, shape)

    y = node.output[0] if node.output and node.output[0] else None
    state = (batch, dirs, hidden) if layout else (dirs, batch, hidden)
    yh = output(1, "h", state)
    h0, h0_in = state_in(5)
    y_arg = Arg.t(y) if y else NULL
    work = _private(lo, node, "work", (4 * hidden,))
    if lstm:
        yc = output(2, "c", state)
        c0, c0_in = state_in(6)
        call = Call("onnxc_lstm", [lo.ref(x), h0, c0, y_arg, Arg.t(yh), Arg.t(yc), Arg.t(work), p])
        outs = [yh, yc, work]
        ins = [x] + h0_in + c0_in
    else:
        call = Call("onnxc_gru", [lo.ref(x), h0, y_arg, Arg.t(yh), Arg.t(work), p])
        outs = [yh, work]
        ins = [x] + h0_in
    lo.step(node, node.op_type, ins, ([y] if y else []) + outs, [call])
