"""Per-node cost: parameters, multiply-accumulates and the bytes of constant data a node owns.

Symbolic dims count as 1 (costs are per sample). A weight computed from constants (a clustered
layer's `Gather(codebook, codes)`, a `DequantizeLinear` of int8 weights) is charged to the node
that consumes it: params are the elements it sees, bytes what its constant sources store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnxc.compiler.graph import GraphView, attr
from onnxc.compiler.model import tensor_nbytes

MAC_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QLinearConv",
           "QLinearMatMul", "FusedConv", "FusedGemm", "FusedMatMul"}


@dataclass
class NodeCost:
    name: str
    op: str
    params: int = 0
    macs: int = 0
    bytes: int = 0
    shape: list = field(default_factory=list)  # output shape (batch 1)


@dataclass
class ModelCost:
    layers: list[NodeCost]

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
        return {"totals": self.totals(), "layers": [asdict(layer) for layer in self.layers]}

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


def model_cost(model: onnx.ModelProto) -> ModelCost:
    """Cost of every node of the main graph (shapes must be inferred; see `canonicalize`)."""
    view = GraphView(model.graph)
    sources = _constant_sources(view)
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
        layers.append(cost)
    return ModelCost(layers)


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
            m, k = (a[1], a[0]) if attr(node, "transA", 0) else (a[0], a[1])
            n = b[0] if attr(node, "transB", 0) else b[1]
            return m * k * n
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
