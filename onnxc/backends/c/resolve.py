"""What a static model still needs once the inputs are fixed: `If`s folded and every shape known.

- An `If` whose condition became a constant (it usually tests an input's shape) is replaced by
  the nodes of the branch it takes; an integer scalar input that selects a branch (a sample
  rate) is pinned to one value first; an If whose condition is computed from other run-time
  data stops the export with one line naming the node.
- Shapes that ONNX shape inference leaves symbolic even with data propagation (shape arithmetic
  it cannot follow) are read from one onnxruntime run at the fixed input shapes
  (`compiler.shapes.infer`); a Reshape whose target was computed at run time then gets that
  target as a constant.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxc.compiler.graph import GraphView, attr
from onnxc.errors import OnnxcError


# ---- If ----------------------------------------------------------------------------------
def pin_selectors(model: onnx.ModelProto, values: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Integer scalar inputs that select an `If` branch become constants (the firmware is built for
    one branch: one sample rate): the value of the calibration data (`values`), else the one the
    model compares it with (`compiler.selectors`). Returns the pinned values by input name."""
    from onnxc.compiler import selectors

    uses = selectors.selector_inputs(model)
    if not uses:
        return {}
    defaults = selectors.selector_values(model, list(uses))
    pinned = {}
    for name in uses:
        value = (values or {}).get(name)
        value = np.asarray(value) if value is not None else defaults.get(name)
        if value is None:
            continue  # a float or tensor condition input: refuse_ifs names the If
        tensor = numpy_helper.from_array(np.asarray(value).reshape(_declared(model, name)).astype(value.dtype), name)
        model.graph.initializer.append(tensor)
        for vi in [v for v in model.graph.input if v.name == name]:
            model.graph.input.remove(vi)
        pinned[name] = np.asarray(value)
    return pinned


def _declared(model: onnx.ModelProto, name: str) -> list[int]:
    vi = next(v for v in model.graph.input if v.name == name)
    return [d.dim_value for d in vi.type.tensor_type.shape.dim]


def fold_ifs(model: onnx.ModelProto) -> int:
    """Inline every top-level `If` whose condition is an initializer; returns how many."""
    graph = model.graph
    view = GraphView(graph)
    nodes: list[onnx.NodeProto] = []
    folded = 0
    for node in graph.node:
        cond = view.const(node.input[0]) if node.op_type == "If" and node.domain in ("", "ai.onnx") else None
        if cond is None:
            nodes.append(node)
            continue
        branch = attr(node, "then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch")
        nodes.extend(_inline(node, branch, graph))
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(nodes)
    return folded


def _inline(node: onnx.NodeProto, branch: onnx.GraphProto, graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The branch's nodes with its outputs renamed to the If's and its own tensors made unique."""
    prefix = f"{node.name or node.output[0]}/"
    local = {o for n in branch.node for o in n.output if o} | {t.name for t in branch.initializer}
    rename = {name: prefix + name for name in local}
    outs = [o.name for o in branch.output]
    for src, dst in zip(outs, node.output):
        if src in local and dst and outs.count(src) == 1:
            rename[src] = dst
    for t in branch.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        copy.name = rename[t.name]
        graph.initializer.append(copy)
    inlined = []
    for n in branch.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        copy.name = prefix + (n.name or n.output[0])
        copy.input[:] = [rename.get(i, i) for i in n.input]
        copy.output[:] = [rename.get(o, o) for o in n.output]
        inlined.append(copy)
    for src, dst in zip(outs, node.output):  # an output read from outside the branch, or twice
        if dst and rename.get(src) != dst:
            inlined.append(helper.make_node("Identity", [rename.get(src, src)], [dst], name=prefix + dst))
    return inlined


def refuse_ifs(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if node.op_type == "If":
            raise OnnxcError(f"C backend: If node '{node.name or node.output[0]}' has a condition computed at run "
                             "time; only an If whose condition is constant once the input shapes are fixed is "
                             "folded")


# ---- shapes from onnxruntime -------------------------------------------------------------
def unknown_shapes(model: onnx.ModelProto) -> list[str]:
    """Node outputs without a fully static shape."""
    view = GraphView(model.graph)
    missing = []
    for node in model.graph.node:
        for name in node.output:
            if name and name not in view.initializers:
                shape = view.static_shape(name, symbolic=-1)
                if shape is None or any(d < 0 for d in shape):
                    missing.append(name)
    return missing


def shapes_from_onnxruntime(model: onnx.ModelProto, names: list[str]) -> int:
    """Record in value_info the concrete shapes of `names` that `compiler.shapes.infer` finds
    (one onnxruntime run at the model's fixed input shapes); returns how many."""
    from onnxc.compiler import shapes

    fixed = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in shapes.graph_inputs(model)}
    info = shapes.infer(model, fixed, needed=names)
    if info.method != "onnx+onnxruntime":  # symbolic guesses are no ground for C buffers
        return 0
    outputs = {o.name: o for o in model.graph.output}
    found = 0
    for vi in info.value_infos():
        if vi.name not in names or info.unknown_dims(vi.name):
            continue
        if vi.name in outputs:
            outputs[vi.name].CopyFrom(vi)
        else:
            for old in [v for v in model.graph.value_info if v.name == vi.name]:
                model.graph.value_info.remove(old)
            model.graph.value_info.append(vi)
        found += 1
    return found


def pin_shape_inputs(model: onnx.ModelProto) -> int:
    """Reshape targets computed at run time become constants where the output shape is known
    (from onnxruntime): the computation feeding them is then dead and dropped."""
    view = GraphView(model.graph)
    pinned = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or view.const(node.input[1]) is not None:
            continue
        shape = view.static_shape(node.output[0], symbolic=-1)
        if shape is None or any(d < 0 for d in shape):
            continue
        name = view.add_const(f"{node.name or node.output[0]}/shape", np.array(shape, np.int64))
        node.input[1] = name
        pinned += 1
    if pinned:
        GraphView(model.graph).remove_unused()
    return pinned
