"""Per-node cost: parameters, multiply-accumulates and the bytes of constant data a node owns.

Costs are per sample at concrete input shapes: the `input_shapes` given, else the model's own with
a symbolic leading batch as 1. Shapes lost behind shape-computing subgraphs are recovered by
`shapes.infer` (an onnxruntime run at those shapes). A dim that stays unknown is counted as 1 and
reported: the node lists it in `unknown` and the model in `unknown_dims`. A weight computed from constants (a clustered
layer's `Gather(codebook, codes)`, a `DequantizeLinear` of int8 weights) is charged to the node
that consumes it: params are the elements it sees, bytes what its constant sources store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnxc.compiler import shapes as shape_mod
from onnxc.compiler.graph import GraphView, attr
from onnxc.compiler.model import tensor_nbytes

MAC_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QLinearConv",
           "QLinearMatMul", "FusedConv", "FusedGemm", "FusedMatMul", "LSTM", "GRU", "RNN"}


@dataclass
class NodeCost:
    name: str
    op: str
    params: int = 0
    macs: int = 0
    bytes: int = 0
    shape: list = field(default_factory=list)  # output shape (batch 1)
    unknown: list[str] = field(default_factory=list)  # dims counted as 1 because nothing fixed them


@dataclass
class ModelCost:
    layers: list[NodeCost]
    input_shapes: dict[str, list[int]] | None = None  # the shapes costs were computed at
    shape_method: str = "onnx"  # how intermediate shapes were found (see shapes.infer)
    shapes_origin: str = ""  # where input_shapes came from ("given", "default: ...")

    @property
    def unknown_dims(self) -> list[str]:
        """Dims some MAC count took as 1 (empty when every count is exact)."""
        return sorted({d for layer in self.layers for d in layer.unknown})

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    def totals(self) -> dict:
        return {"params": self.params, "macs": self.macs, "bytes": self.bytes, "nodes": len(self.layers)}

    def to_dict(self) -> dict:
        return {"totals": self.totals(), "input_shapes": self.input_shapes, "shapes_origin": self.shapes_origin,
                "shape_method": self.shape_method,
                "unknown_dims": self.unknown_dims, "layers": [asdict(layer) for layer in self.layers]}

    def by_name(self) -> dict[str, NodeCost]:
        return {layer.name: layer for layer in self.layers}


def _numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape is not None else 0


def _constant_sources(view: GraphView) -> dict[str, set[str]]:
    """For every tensor computable from initializers alone, the initializers it derives from."""
    sources: dict[str, set[str]] = {name: {name} for name in view.initializers}
    for node in view.graph.node:
        ins = [i for i in node.input if i]
        if node.op_type in ("Constant",) and not ins:
            for o in node.output:
                sources[o] = set()
            continue
        if ins and all(i in sources for i in ins) and not any(a.type in (onnx.AttributeProto.GRAPH,
                                                                         onnx.AttributeProto.GRAPHS)
                                                              for a in node.attribute):
            merged = set().union(*(sources[i] for i in ins))
            for o in node.output:
                if o:
                    sources[o] = merged
    return sources


def model_cost(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None, *,
               shapes: shape_mod.ShapeInfo | None = None) -> ModelCost:
    """Cost of every node of the main graph at `input_shapes` (or the shapes `shapes` found).

    The model's inferred shapes are used as they are when they fix every tensor a MAC count reads;
    otherwise `shapes.infer` recovers the rest.
    """
    view = GraphView(model.graph)
    sources = _constant_sources(view)
    needed = [n for node in model.graph.node if node.op_type in MAC_OPS
              and not all(o in sources for o in node.output if o) for n in _mac_tensors(node)]
    declared = shape_mod.concrete_input_shapes(model, input_shapes)
    news = input_shapes and declared != shape_mod.concrete_input_shapes(model)  # shapes the graph does not carry
    if shapes is None and (news or any(_unknown(view, n, batch_ok=True) for n in needed)):
        shapes = shape_mod.infer(model, input_shapes, needed=needed)
    if shapes is not None:
        view.value_info.update({vi.name: vi for vi in shapes.value_infos()})
        declared = shapes.input_shapes
    # A symbolic leading dim is the batch (1 by definition) unless concrete inputs should have fixed it.
    batch_ok = shapes is None or shapes.input_shapes is None
    charged: set[str] = set()
    layers = []
    for node in model.graph.node:
        if all(o in sources for o in node.output if o) and node.output:
            continue  # part of a constant subexpression: charged to whoever consumes it
        cost = NodeCost(node.name or node.output[0], node.op_type)
        out_shape = view.static_shape(node.output[0]) if node.output else None
        cost.shape = list(out_shape) if out_shape is not None else []
        for index, name in enumerate(node.input):
            if name and name in sources:
                shape = view.static_shape(name)
                if shape is not None and _is_weight(node, name, index):
                    # A weight computed from constants (circulant expansion, codebook lookup) has at
                    # most as many parameters as its sources store.
                    stored = sum(_numel(list(view.initializers[s].dims)) for s in sources[name])
                    cost.params += min(_numel(shape), stored) if stored else _numel(shape)
                for init in sources[name] - charged:
                    cost.bytes += tensor_nbytes(view.initializers[init])
                    charged.add(init)
        cost.macs = node_macs(node, view)
        if cost.macs or node.op_type in MAC_OPS:
            cost.unknown = sorted({d for n in _mac_tensors(node) for d in _unknown(view, n, batch_ok)})
        layers.append(cost)
    return ModelCost(layers, declared, shapes.method if shapes is not None else "onnx")


def _mac_tensors(node: onnx.NodeProto) -> list[str]:
    """The tensors whose shapes a MAC count reads (data input, weight, output)."""
    w = 3 if node.op_type in ("QLinearConv", "QLinearMatMul") else 1
    return [n for n in (node.input[0] if node.input else "", node.input[w] if len(node.input) > w else "",
                        node.output[0] if node.output else "") if n]


def _unknown(view: GraphView, name: str, batch_ok: bool) -> list[str]:
    """Names of the dims of `name` that are not concrete ('?' for unnamed, 'rank' for no shape).
    With `batch_ok`, a symbolic leading dim is the batch (1 by definition, not unknown)."""
    shape = view.shape(name)
    if shape is None:
        return [f"shape of {name}"]
    return [str(d) if d else "?" for i, d in enumerate(shape)
            if not (isinstance(d, int) and d > 0) and not (batch_ok and i == 0)]


def _is_weight(node: onnx.NodeProto, name: str, index: int = 0) -> bool:
    """Shape and index operands (Reshape's shape, Resize's scales, Gather's indices) are not parameters."""
    if index >= 1 and node.op_type in ("Gather", "GatherElements", "GatherND", "DFT", "STFT"):
        return False
    if node.op_type in ("Reshape", "Expand", "Tile", "Slice", "Pad", "Resize", "Upsample", "Squeeze",
                        "Unsqueeze", "ConstantOfShape", "Split", "ReduceMean", "ReduceSum", "TopK", "Range"):
        return False
    return True


def node_macs(node: onnx.NodeProto, view: GraphView) -> int:
    """Multiply-accumulates of one sample through `node` (0 for ops without a dot product)."""
    op = node.op_type
    if op not in MAC_OPS:
        return 0
    try:
        if op in ("Conv", "ConvInteger", "FusedConv", "QLinearConv"):
            w_idx = 3 if op == "QLinearConv" else 1
            w = view.static_shape(node.input[w_idx])
            y = view.static_shape(node.output[0])
            if w is None or y is None:
                return 0
            return _numel(y) * _numel(w[1:])
        if op == "ConvTranspose":
            w = view.static_shape(node.input[1])
            x = view.static_shape(node.input[0])
            if w is None or x is None:
                return 0
            return _numel(x) * _numel(w[1:])  # every input element meets (C_out/g) * k of the weights
        if op in ("Gemm", "FusedGemm"):
            a = view.static_shape(node.input[0])
            b = view.static_shape(node.input[1])
            if a is None or b is None:
                return 0
            m = a[1] if attr(node, "transA", 0) else a[0]
            return m * _numel(b)  # M x K x N, whichever way B is stored
        if op in ("LSTM", "GRU", "RNN"):
            # Every step of every sequence multiplies the input by W and the state by R (all gates,
            # all directions): [T*N] x (numel(W) + numel(R)), whatever the layout.
            x, w, r = (view.static_shape(node.input[i]) for i in range(3))
            if x is None or w is None or r is None or not x:
                return 0
            return _numel(x) // x[-1] * (_numel(w) + _numel(r))
        if op in ("MatMul", "MatMulInteger", "FusedMatMul", "QLinearMatMul"):
            a_idx, b_idx = (0, 3) if op == "QLinearMatMul" else (0, 1)
            y = view.static_shape(node.output[0])
            a = view.static_shape(node.input[a_idx])
            if y is None or a is None or not a:
                return 0
            return _numel(y) * a[-1]
    except (IndexError, TypeError):
        return 0
    return 0
