"""int8 regions: the nodes that go int8, or stay float, together.

Why regions, not single nodes: a quantized layer runs as an integer kernel between a
QuantizeLinear and a DequantizeLinear. A lone int8 layer between float neighbours pays a
quantize/dequantize pair each way and can run slower than float, while the ops chained after it
(activations, pooling, adds, reshapes, ...) stay int8 between layers. So precision is chosen per
region: the allocator's int8 technique offers regions of the float graph as its candidates
(`passes/int8.py`), and the int8 export leaves whole regions of the quantized graph float to stay
within its budget (`backends/quant_budget.py`). Both find them here, with one rule.

The rule: walk the nodes in graph order. A layer (a node with a constant weight: each caller
says which) opens a region when the caller offers it, and never joins one. Any other node that
can be int8 joins, of the regions its inputs come from, the one opened last: the nearest layer
upstream. Q/DQ nodes on an edge are looked through. A node that joins none may open a region of
its own when the caller asks (the export must place every quantized node).

Why this rule, over the two it replaces (the planner gave every op of a fixed list reached
downstream of a layer to the first layer in graph order that reached it; the export gave a node
to the region of its first input that had one):
- What joins is what the quantizer quantizes (on the float graph, the op types it takes; on the
  quantized graph, what it did), any op type (Softmax, Sigmoid, a MatMul between two
  activations), not a fixed list. On the float graph an op it leaves float ends the region, as it
  does in the quantized model, and what follows it is no longer counted as int8.
- Branches stay whole: in x * clip(x + 3) every op has an input from the layer's region.
- A residual Add x + f(x) joins the block f that it closes, whichever input the exporter wrote
  first. Both former rules could give it to the region of the skip path (the first layer along it,
  or the first input), so a block's last layer stood alone in int8 with its Add float: the very
  boundary regions exist to avoid. With the nearest layer, the skip path's region keeps its own
  chain and each block owns its Add.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import onnx

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def regions(graph: onnx.GraphProto, opens: Callable[[onnx.NodeProto], bool],
            joins: Callable[[onnx.NodeProto], bool], through: Collection[str] = ()
            ) -> dict[str, list[onnx.NodeProto]]:
    """The regions of `graph` (see the module docstring), keyed by the name of the node that opens
    each, with their nodes in graph order (the opening node first).

    `joins(node)`: the node may be int8 and is no layer. `opens(node)`: the node opens a region
    when it joins none (named nodes only). `through`: op types looked through (their first input
    is the edge's source), Q/DQ in a quantized graph."""
    owner_of: dict[str, str] = {}  # tensor -> the region that computes it
    found: dict[str, list[onnx.NodeProto]] = {}  # in the order the regions opened
    order: dict[str, int] = {}
    for node in graph.node:
        if node.op_type in through:
            if node.input and node.input[0] in owner_of:
                owner_of.update(dict.fromkeys(node.output, owner_of[node.input[0]]))
            continue
        owner = None
        if joins(node):
            owner = max((owner_of[i] for i in node.input if i in owner_of), key=order.__getitem__, default=None)
        if owner is None and node.name and opens(node):
            owner = node.name
            order.setdefault(owner, len(order))
        if owner is None:
            continue
        found.setdefault(owner, []).append(node)
        owner_of.update(dict.fromkeys(node.output, owner))
    return found
