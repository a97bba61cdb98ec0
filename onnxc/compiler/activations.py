"""Peak activation bytes: what a static arena must hold at once, predicted from the graph.

A microcontroller's RAM is mostly the activation arena, and what shrinks it is not what shrinks
the file: pruning a layer's channels narrows the tensors around it, int8 stores each activation
in one byte instead of four, while int8 or clustered weights (flash) leave it as it is. A RAM
budget is therefore planned on this measure (the allocator's `activations` kind), and judged on
the linked firmware.

The measure walks the nodes in graph order as an arena planner does: a tensor lives from its
producer to its last consumer (graph inputs from the start, graph outputs to the end), an
activation function or a view whose input dies there writes over it, and the peak of the live
bytes is the answer. A peak is a maximum: one layer's rewrite may leave it where another pair of
tensors holds it, so savings planned on it are a prediction that the firmware's measure corrects.
Quantized groups count as an integer backend runs them: a DequantizeLinear output and a float
result whose only consumer is a QuantizeLinear are fused into the integer kernel (no buffer of
their own), so an int8 tensor costs one byte an element. Initializers and tensors computed from
them alone are constants, not activations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx
from onnx import TensorProto

from onnxc.compiler import shapes as shape_mod
from onnxc.compiler.graph import GraphView

# One input, an output of its size that may overwrite it where the input dies: activations an
# arena planner fuses into the layer before or runs in place, and views of the same bytes.
IN_PLACE = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus",
            "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}
ELEMENT_BYTES = {TensorProto.FLOAT: 4, TensorProto.UINT8: 1, TensorProto.INT8: 1, TensorProto.INT32: 4,
                 TensorProto.INT64: 8, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.DOUBLE: 8,
                 TensorProto.BOOL: 1, TensorProto.INT16: 2, TensorProto.UINT16: 2}


def peak_bytes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> int:
    """The most activation bytes live at once over the node order, per sample (a symbolic or
    unknown dim counts as 1), at `input_shapes` (default: the model's own)."""
    fresh = onnx.ModelProto()
    fresh.CopyFrom(model)
    del fresh.graph.value_info[:]  # a rewritten model may carry the shapes of the layers it replaced
    model = fresh
    view = GraphView(model.graph)
    info = shape_mod.infer(model, input_shapes)
    view.value_info.update({vi.name: vi for vi in info.value_infos()})
    consts = set(view.initializers)
    for node in model.graph.node:
        if all(i in consts for i in node.input if i) and not any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            consts.update(o for o in node.output if o)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    last_use: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            if name and name not in consts:
                consumers.setdefault(name, []).append(node)
                last_use[name] = i
    end = len(model.graph.node)
    for out in model.graph.output:
        last_use[out.name] = end

    def size(name: str) -> int:
        if name in consts:
            return 0
        producer = view.producers.get(name)
        users = consumers.get(name, [])
        if producer is not None and producer.op_type == "DequantizeLinear" and last_use.get(name, -1) != end:
            return 0  # read as integers by the kernel that consumes it
        if producer is not None and len(users) == 1 and users[0].op_type == "QuantizeLinear" \
                and last_use.get(name, -1) != end:
            return 0  # requantized inside the kernel that makes it
        shape = view.static_shape(name)
        count = 1
        for d in shape or ():
            count *= d
        return count * ELEMENT_BYTES.get(view.dtype(name) or TensorProto.FLOAT, 4)

    live = {name: size(name) for name in (i.name for i in model.graph.input) if name not in consts}
    total = peak = sum(live.values())
    for i, node in enumerate(model.graph.node):
        x = node.input[0] if node.input else ""
        if node.op_type in IN_PLACE and x in live and last_use.get(x) == i and node.output[0] not in live:
            live[node.output[0]] = live.pop(x)  # written over its input (a fused activation, a view)
            continue
        for out in node.output:
            if out and out not in consts and out not in live:
                live[out] = size(out)
                total += live[out]
        peak = max(peak, total)
        for name in [n for n in live if last_use.get(n, -1) <= i]:
            total -= live.pop(name)
    return int(peak)
