"""ONNX execution forms of a block-circulant layer (see `_circulant_fit` for the notation).

Every form stores the q * p * b parameters (O(b) per block) and computes x @ dense(c) + bias:

- `shift`: gathers the b circular shifts of every input block, [..., K] -> [..., b, K], and
  multiplies by the [K, q] parameter matrix: one plain MatMul with a weight b times smaller than
  the dense one (same MACs, b times fewer weight bytes to stream). The gather runs along the
  element axis of a [..., b, p] view so every gathered slice is a row of p values; its index is
  the [b, b] shift pattern (int32, shared by all layers of that block size).
- `fft`: DFT of the input blocks, one complex [p, q] product per frequency (batched MatMul),
  inverse real DFT: 2b + 4 MACs per block instead of b * b. The weight spectrum is computed in the
  graph from the stored parameters (onnxruntime folds it once per session). Needs opset 17 (DFT);
  opset 20 moved DFT's axis from an attribute to an input.
- `expand`: gathers the parameters into the dense [K, N] weight inside the graph and runs the
  dense MatMul. onnxruntime constant-folds that gather at session start, so the file is small but
  the runtime memory and speed are those of the dense layer.

A pointwise Conv ([N, C, ...] input, features on axis 1) has two forms. `expand` (the default):
the [C_out, C_in, 1, ...] Conv weight is gathered from the parameters in the graph (and sliced
when the features were padded), so the activation is never transposed and onnxruntime folds the
weight once per session: the file stores b numbers per block, the session runs the dense conv.
`fft`: the channels are moved to the last axis, the layer runs in the fft form above, and they
are moved back: the only form that removes multiply-accumulates of a conv, for a MACs target,
at the price of two transposes of the feature map and the DFTs. The shift form would gather b
shifted copies of the whole feature map for the same MACs as the dense conv.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxc.compiler.graph import GraphView
from onnxc.passes._circulant_fit import Layout, pattern

FORMS = ("shift", "fft", "expand")
CONV_FORMS = ("expand", "fft")
FFT_OPSET = 17
PATTERN = "onnxc_circulant_pattern"  # name of the shared [b, b] shift pattern initializers


@dataclass
class CirculantLayer:
    """Fitted parameters of one layer plus its unpadded feature counts."""

    c: np.ndarray  # [q, p, b] float32
    bias: np.ndarray | None  # [N] float32, unpadded
    layout: Layout
    in_features: int
    out_features: int

    @property
    def stored(self) -> int:
        """Parameters the file stores for this layer (weights and bias)."""
        return int(self.c.size + (self.bias.size if self.bias is not None else 0))


class _Builder:
    """Appends nodes and constants to a GraphView; constants keyed in `shared` are made once."""

    def __init__(self, view: GraphView, opset: int, name: str, shared: dict):
        self.view, self.opset, self.name, self.shared = view, opset, name, shared
        self.nodes: list[onnx.NodeProto] = []

    def const(self, base: str, value: np.ndarray, key: tuple | None = None) -> str:
        if key is not None and key in self.shared:
            return self.shared[key]
        name = self.view.add_const(f"{self.name}_{base}" if key is None else base, value)
        if key is not None:
            self.shared[key] = name
        return name

    def ints(self, values, key_prefix: str = "shape") -> str:
        arr = np.asarray(values, dtype=np.int64)
        return self.const(f"onnxc_{key_prefix}", arr, key=(key_prefix, arr.shape, tuple(arr.reshape(-1))))

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        node = self.view.make_node(op_type, inputs, 1, name=f"{self.name}/{op_type}", **attrs)
        self.nodes.append(node)
        return node.output[0]

    def pad_last(self, x: str, rank: int, amount: int) -> str:
        pads = [0] * (2 * rank)
        pads[2 * rank - 1] = amount
        if self.opset >= 11:
            return self.op("Pad", [x, self.ints(pads, "pads")])
        return self.op("Pad", [x], pads=pads)

    def slice_last(self, x: str, rank: int, end: int) -> str:
        if self.opset >= 10:
            return self.op("Slice", [x, self.ints([0], "idx"), self.ints([end], "idx"), self.ints([rank - 1], "idx")])
        return self.op("Slice", [x], starts=[0], ends=[end], axes=[rank - 1])

    def dft(self, x: str, length: int, axis: int, inverse: int = 0) -> str:
        n = self.const("onnxc_dft_length", np.array(length, np.int64), key=("dft_length", length))
        if self.opset >= 20:
            a = self.const("onnxc_axis", np.array(axis, np.int64), key=("axis", axis))
            return self.op("DFT", [x, n, a], inverse=inverse, onesided=1)
        return self.op("DFT", [x, n], axis=axis, inverse=inverse, onesided=1)


def emit(form: str, view: GraphView, layer: CirculantLayer, x: str, y: str, rank: int, opset: int,
         name: str, shared: dict) -> list[onnx.NodeProto]:
    """Nodes computing y = x @ dense(layer) + bias for an input of static rank `rank` >= 2."""
    b = _Builder(view, opset, name, shared)
    _dense(b, form, layer, x, rank)
    b.nodes[-1].output[0] = y
    return b.nodes


def _dense(b: _Builder, form: str, layer: CirculantLayer, x: str, rank: int) -> str:
    """x @ dense(layer) + bias over the last axis of x, in `form`."""
    lay = layer.layout
    if lay.in_features > layer.in_features:
        x = b.pad_last(x, rank, lay.in_features - layer.in_features)
    out = {"shift": _shift, "fft": _fft, "expand": _expand}[form](b, layer, x, rank)
    if lay.out_features > layer.out_features:
        out = b.slice_last(out, rank, layer.out_features)
    if layer.bias is not None:
        out = b.op("Add", [out, b.const("bias", layer.bias.astype(np.float32))])
    return out


def _shift(b: _Builder, layer: CirculantLayer, x: str, rank: int) -> str:
    lay = layer.layout
    blk, p = lay.block, lay.p
    lead = [0] * (rank - 1)
    if lay.in_strided:  # feature k * p + j -> [..., k, j]
        xb = b.op("Reshape", [x, b.ints([*lead, blk, p])])
    else:  # feature j * b + k -> [..., j, k] -> [..., k, j]
        xb = b.op("Reshape", [x, b.ints([*lead, p, blk])])
        xb = b.op("Transpose", [xb], perm=[*range(rank - 1), rank, rank - 1])
    # shifted[..., r, d, j] = x_j[(r - d) mod b]: each gathered slice is a whole row of p values
    shifted = b.op("Gather", [xb, _pattern(b, blk)], axis=rank - 1)
    flat = b.op("Reshape", [shifted, b.ints([*lead, blk, lay.in_features])])  # column d * p + j
    weight = layer.c.transpose(2, 1, 0).reshape(lay.in_features, lay.q)  # row d * p + j, column i
    y = b.op("MatMul", [flat, b.const("circulant", weight.astype(np.float32))])  # [..., r, i]
    if not lay.out_strided:
        y = b.op("Transpose", [y], perm=[*range(rank - 1), rank, rank - 1])
    return b.op("Reshape", [y, b.ints([*lead, lay.out_features])])


def emit_conv(view: GraphView, layer: CirculantLayer, x: str, y: str, rank: int, opset: int, name: str,
              shared: dict, form: str = "expand") -> list[onnx.NodeProto]:
    """Nodes computing the pointwise Conv y = conv(x, W) + bias of rank `rank`, W the dense
    [C_out, C_in, 1, ...] of `layer`: in `expand` gathered from the parameters in the graph; in
    `fft` the channels of every position multiplied in the fft form (see the module docstring)."""
    b = _Builder(view, opset, name, shared)
    if form == "fft":
        last = b.op("Transpose", [x], perm=[0, *range(2, rank), 1])
        out = _dense(b, "fft", layer, last, rank)
        b.op("Transpose", [out], perm=[0, rank - 1, *range(1, rank - 1)])
        b.nodes[-1].output[0] = y
        return b.nodes
    lay = layer.layout
    params = b.const("circulant", layer.c.astype(np.float32))
    blocks = b.op("Gather", [params, _pattern(b, lay.block)], axis=2)  # [q, p, r, k]
    rows = [2, 0] if lay.out_strided else [0, 2]  # output channel (i, r)
    cols = [3, 1] if lay.in_strided else [1, 3]  # input channel (j, k)
    dense = b.op("Transpose", [blocks], perm=rows + cols)
    weight = b.op("Reshape", [dense, b.ints([lay.out_features, lay.in_features] + [1] * (rank - 2))])
    if (lay.out_features, lay.in_features) != (layer.out_features, layer.in_features):
        ends = [layer.out_features, layer.in_features]
        if opset >= 10:
            weight = b.op("Slice", [weight, b.ints([0, 0], "idx"), b.ints(ends, "idx"), b.ints([0, 1], "idx")])
        else:
            weight = b.op("Slice", [weight], starts=[0, 0], ends=ends, axes=[0, 1])
    inputs = [x, weight]
    if layer.bias is not None:
        inputs.append(b.const("bias", layer.bias.astype(np.float32)))
    b.op("Conv", inputs, kernel_shape=[1] * (rank - 2))
    b.nodes[-1].output[0] = y
    return b.nodes


def _pattern(b: _Builder, block: int) -> str:
    return b.const(PATTERN, pattern(block).astype(np.int32), key=("pattern", block))


def _expand(b: _Builder, layer: CirculantLayer, x: str, rank: int) -> str:
    lay = layer.layout
    params = b.const("circulant", layer.c.astype(np.float32))
    blocks = b.op("Gather", [params, _pattern(b, lay.block)], axis=2)  # [q, p, r, k]
    rows = [3, 1] if lay.in_strided else [1, 3]
    cols = [2, 0] if lay.out_strided else [0, 2]
    dense = b.op("Transpose", [blocks], perm=rows + cols)
    weight = b.op("Reshape", [dense, b.ints([lay.in_features, lay.out_features])])
    return b.op("MatMul", [x, weight])


def _fft(b: _Builder, layer: CirculantLayer, x: str, rank: int) -> str:
    lay = layer.layout
    blk, p, q = lay.block, lay.p, lay.q
    # weight spectrum [F, 2p, 2q] = [[Re, Im], [-Im, Re]] from the stored [b, p, q, 1] parameters
    stored = b.const("circulant", layer.c.transpose(2, 1, 0)[..., None].astype(np.float32))
    spec = b.dft(stored, blk, axis=0)  # [F, p, q, 2]
    re = b.op("Gather", [spec, b.const("onnxc_zero", np.array(0, np.int64), key=("scalar", 0))], axis=3)
    im = b.op("Gather", [spec, b.const("onnxc_one", np.array(1, np.int64), key=("scalar", 1))], axis=3)
    top = b.op("Concat", [re, im], axis=2)
    bottom = b.op("Concat", [b.op("Neg", [im]), re], axis=2)
    weight = b.op("Concat", [top, bottom], axis=1)
    flat = x if rank == 2 else b.op("Reshape", [x, b.ints([-1, lay.in_features])])
    if lay.in_strided:  # [n, b, p, 1] -> DFT over axis 1 -> [n, F, p, 2]
        xb = b.op("Reshape", [flat, b.ints([-1, blk, p, 1])])
        xf = b.op("Transpose", [b.dft(xb, blk, axis=1)], perm=[1, 0, 3, 2])
    else:  # [n, p, b, 1] -> DFT over axis 2 -> [n, p, F, 2]
        xb = b.op("Reshape", [flat, b.ints([-1, p, blk, 1])])
        xf = b.op("Transpose", [b.dft(xb, blk, axis=2)], perm=[2, 0, 3, 1])
    xm = b.op("Reshape", [xf, b.ints([0, 0, 2 * p])])  # [F, n, 2p]: (real, imag) x blocks
    ym = b.op("Reshape", [b.op("MatMul", [xm, weight]), b.ints([0, 0, 2, q])])  # [F, n, 2, q]
    if lay.out_strided:  # [n, F, q, 2] -> inverse over axis 1 -> [n, b, q, 1]
        y = b.dft(b.op("Transpose", [ym], perm=[1, 0, 3, 2]), blk, axis=1, inverse=1)
    else:  # [n, q, F, 2] -> inverse over axis 2 -> [n, q, b, 1]
        y = b.dft(b.op("Transpose", [ym], perm=[1, 3, 0, 2]), blk, axis=2, inverse=1)
    if rank == 2:
        return b.op("Reshape", [y, b.ints([-1, lay.out_features])])
    lead = b.op("Shape", [x], start=0, end=rank - 1)
    shape = b.op("Concat", [lead, b.ints([lay.out_features])], axis=0)
    return b.op("Reshape", [y, shape])


def standalone(form: str, layer: CirculantLayer, x_shape: list[int], opset: int,
               ir_version: int, conv: bool = False) -> onnx.ModelProto:
    """A one-layer model of `form` at a fixed input shape (for timing the forms against each other;
    `conv`: a pointwise Conv over axis 1 of x)."""
    y_shape = [x_shape[0], layer.out_features, *x_shape[2:]] if conv else [*x_shape[:-1], layer.out_features]
    graph = helper.make_graph([], "circulant_layer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)])
    view = GraphView(graph)
    if conv:
        nodes = emit_conv(view, layer, "x", "y", len(x_shape), opset, "layer", {}, form)
    else:
        nodes = emit(form, view, layer, "x", "y", len(x_shape), opset, "layer", {})
    graph.node.extend(nodes)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def dense_standalone(weight: np.ndarray, bias: np.ndarray | None, x_shape: list[int], opset: int,
                     ir_version: int, conv: bool = False) -> onnx.ModelProto:
    """The dense reference layer x @ weight + bias as a one-layer model (`conv`: a pointwise Conv)."""
    n = weight.shape[1]
    y_shape = [x_shape[0], n, *x_shape[2:]] if conv else [*x_shape[:-1], n]
    graph = helper.make_graph([], "dense_layer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)])
    view = GraphView(graph)
    if conv:
        kernel = weight.T.reshape(n, weight.shape[0], *[1] * (len(x_shape) - 2))
        inputs = ["x", view.add_const("weight", kernel.astype(np.float32))]
        if bias is not None:
            inputs.append(view.add_const("bias", bias.astype(np.float32)))
        graph.node.append(helper.make_node("Conv", inputs, ["y"]))
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    w = view.add_const("weight", weight.astype(np.float32))
    if bias is None:
        graph.node.append(helper.make_node("MatMul", ["x", w], ["y"]))
    else:
        graph.node.append(helper.make_node("MatMul", ["x", w], ["xw"]))
        graph.node.append(helper.make_node("Add", ["xw", view.add_const("bias", bias.astype(np.float32))], ["y"]))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
