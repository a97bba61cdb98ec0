"""Canonical form: the one shape of graph every pass may assume.

- every static weight is an initializer (`Constant`, constant-only `ConstantOfShape`, and
  size-preserving shape ops on constants are folded; nothing that expands a compressed
  representation, such as `Gather(codebook, codes)` or `DequantizeLinear`, is ever folded);
- initializers are not also listed as graph inputs (IR 3 models are moved to IR 4 for that, the
  smallest version that allows it);
- BatchNormalization that follows a Conv with constant weights is folded into it, and so are
  constant scales and shifts before or after a Conv (`affine.fold_affine`);
- every Gemm with a constant float B has one form: B stored [out, in] (transB=1, like Conv weights
  and most exports), alpha folded into B, beta into a constant C, and a C that is a bias vector
  stored as [out] (`orient_gemms`), so passes read its weight as they read a Conv's;
- Identity and inference-mode Dropout are bypassed;
- nodes are in a topological order found iteratively (graphs with many thousands of nodes);
- shapes are inferred, concrete where `input_shapes` fixes the symbolic dims.

Ops, subgraphs (`If`, `Loop`) and quantized ops are carried through untouched.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from onnxc.compiler.affine import fold_affine, scale_outputs
from onnxc.compiler.graph import GraphView, attr, node_inputs_with_subgraphs, set_attr
from onnxc.compiler.linear import LinearLayer
from onnxc.compiler.model import clone, tensor_nbytes
from onnxc.errors import OnnxcError

log = logging.getLogger("onnxc.canonical")

# Ops folded when all inputs are constant and the output is no larger than the inputs.
SHAPE_OPS = {"Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose"}


def canonicalize(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None,
                 *, infer: bool = True) -> onnx.ModelProto:
    """Return the canonical form of `model` (the input is not modified)."""
    model = clone(model)
    graph = model.graph
    if input_shapes:
        set_input_shapes(model, input_shapes)
    _initializers_out_of_inputs(model)
    toposort(graph)  # first: folding reads producers before consumers; removing nodes keeps the order
    fold_constants(graph)
    fold_batchnorm(graph)
    fold_affine(graph)
    bypass_identities(graph)
    orient_gemms(graph, _opset(model))
    GraphView(graph).remove_unused()
    if infer:
        model = infer_shapes(model)
    return model


def set_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int | None]]) -> None:
    """Fix graph input dims; unknown names are an error that lists the real inputs.

    A dim the model declares dynamic (named, `-1`, `0` or absent) takes any value; `None` in
    `input_shapes` leaves that dim as declared (the batch dim, when shapes come from data).
    """
    inits = {t.name for t in model.graph.initializer}
    inputs = {v.name: v for v in model.graph.input if v.name not in inits}
    for name, dims in input_shapes.items():
        if name not in inputs:
            raise OnnxcError(f"--input-shape: model has no input '{name}' (inputs: {', '.join(inputs)})")
        shape = inputs[name].type.tensor_type.shape
        if len(shape.dim) and len(shape.dim) != len(dims):
            raise OnnxcError(f"--input-shape {name}: model input has rank {len(shape.dim)}, got {len(dims)} dims")
        for i, d in enumerate(shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0 and dims[i] is not None and d.dim_value != dims[i]:
                raise OnnxcError(f"--input-shape {name}: dim {i} is fixed to {d.dim_value} in the model, got {dims[i]}")
        old = [onnx.TensorShapeProto.Dimension() for _ in dims]
        for i, d in enumerate(shape.dim):
            old[i].CopyFrom(d)
        del shape.dim[:]
        for i, d in enumerate(dims):
            new = shape.dim.add()
            if d is None:
                new.CopyFrom(old[i])
            else:
                new.dim_value = int(d)
    # Stale intermediate shapes may carry the old symbolic dims: drop them before re-inference.
    del model.graph.value_info[:]


def _initializers_out_of_inputs(model: onnx.ModelProto) -> None:
    inits = {t.name for t in model.graph.initializer}
    if not any(v.name in inits for v in model.graph.input):
        return
    keep = [v for v in model.graph.input if v.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    if model.ir_version < 4:
        model.ir_version = 4


def fold_constants(graph: onnx.GraphProto) -> int:
    """Turn Constant, ConstantOfShape and shape ops over constants into initializers."""
    view = GraphView(graph)
    folded = 0
    keep: list[onnx.NodeProto] = []
    for node in graph.node:
        value = _constant_value(node, view)
        if value is None:
            keep.append(node)
            continue
        out = node.output[0]
        tensor = numpy_helper.from_array(value, out)
        graph.initializer.append(tensor)
        view.initializers[out] = graph.initializer[-1]
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
        # An initializer that is also a graph output is legal; nothing else to fix.
    return folded


def _constant_value(node: onnx.NodeProto, view: GraphView) -> np.ndarray | None:
    if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    op = node.op_type
    if op == "Constant":
        return _constant_attr(node)
    if not node.input or not all(i in view.initializers for i in node.input if i):
        return None
    args = [view.const(i) if i else None for i in node.input]
    try:
        if op == "ConstantOfShape":
            t = attr(node, "value")
            fill = numpy_helper.to_array(t) if t is not None else np.zeros(1, np.float32)
            return np.full(tuple(int(d) for d in args[0]), fill.reshape(-1)[0], dtype=fill.dtype)
        if op not in SHAPE_OPS:
            return None
        x = args[0]
        if op == "Identity":
            return x
        if op == "Transpose":
            perm = attr(node, "perm")
            return np.transpose(x, perm if perm is not None else None)
        if op == "Flatten":
            axis = attr(node, "axis", 1)
            axis = axis + x.ndim if axis < 0 else axis
            return x.reshape(int(np.prod(x.shape[:axis])), -1)
        if op == "Reshape":
            shape = [int(s) for s in args[1]]
            if attr(node, "allowzero", 0) == 0:
                shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
            return x.reshape(shape)
        axes = attr(node, "axes")
        if axes is None and len(args) > 1 and args[1] is not None:
            axes = [int(a) for a in args[1]]
        if op == "Unsqueeze":
            out = x
            rank = x.ndim + len(axes)
            for a in sorted(a + rank if a < 0 else a for a in axes):
                out = np.expand_dims(out, a)
            return out
        if op == "Squeeze":
            return np.squeeze(x, axis=tuple(axes)) if axes else np.squeeze(x)
    except Exception as exc:  # an op we mis-evaluate is simply left in the graph
        log.debug("not folding %s (%s): %s", node.name, op, exc)
    return None


def _constant_attr(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None  # sparse or string constants stay as nodes


def fold_batchnorm(graph: onnx.GraphProto) -> int:
    """Fold inference BatchNormalization into the Conv that feeds it (exact up to rounding)."""
    view = GraphView(graph)
    folded: set[int] = set()
    for index, bn in enumerate(list(graph.node)):
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
            continue
        if len([o for o in bn.output if o]) != 1 or attr(bn, "training_mode", 0):
            continue
        conv = view.producers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(view.consumers[conv.output[0]]) != 1:
            continue
        if conv.output[0] in view.graph_outputs:
            continue
        params = [view.const(n) for n in bn.input[1:5]]
        layer = LinearLayer.read(conv, view)
        if not isinstance(layer, LinearLayer) or any(p is None for p in params):
            continue
        scale, shift, mean, var = (p.astype(np.float64) for p in params)
        factor = scale / np.sqrt(var + attr(bn, "epsilon", 1e-5))
        scale_outputs(layer, view, scale=factor, shift=shift - mean * factor)
        conv.output[0] = bn.output[0]
        view.producers[bn.output[0]] = conv  # a second BatchNormalization may fold into it too
        folded.add(index)
    return _drop_nodes(graph, folded)


def orient_gemms(graph: onnx.GraphProto, opset: int) -> int:
    """Write every Gemm whose B is a constant float initializer in the one form (`LinearLayer`
    reads it without arithmetic): transB=1 with B stored [N, K] = [out, in], alpha=1 (folded into
    B), beta=1 (folded into a constant C) and a C that broadcasts as a bias vector stored as [N]
    (from opset 7, where C broadcasts unidirectionally; older Gemms keep C's shape). Returns the
    number of Gemms rewritten.

    Exact up to the rounding of the alpha and beta products. A shared B or C is copied, never
    changed under its other readers. Left as they are: transA=1 (on an activation, undoing it
    would need a Transpose node), a beta that scales a computed C (folding it would need a Mul),
    and Gemms whose B is computed or not float (alpha cannot be folded into integers exactly).
    """
    view = GraphView(graph)
    done: dict[tuple, str] = {}  # (input, how it was rewritten) -> the rewritten constant

    def rewrite(node: onnx.NodeProto, index: int, how: tuple, value: Callable[[], np.ndarray]) -> None:
        """Give input `index` its rewritten value; Gemms sharing a constant and a rewrite share
        the result (tied weights stay tied: one copy, not one per reader)."""
        key = (node.input[index], *how)
        if key in done and done[key] in view.initializers:
            node.input[index] = done[key]
            view.consumers[done[key]].append(node)
            return
        done[key] = view.set_input_const(node, index, value())

    rewritten = 0
    for node in graph.node:
        if node.op_type != "Gemm":
            continue
        layer = LinearLayer.read(node, view)
        if not isinstance(layer, LinearLayer):
            continue
        changed = False
        trans_b, alpha = int(attr(node, "transB", 0)), float(attr(node, "alpha", 1.0))
        if not trans_b or alpha != 1.0:
            rewrite(node, 1, ("B", trans_b, alpha), lambda layer=layer: np.ascontiguousarray(layer.weight))
            set_attr(node, "transB", 1)
            _drop_attr(node, "alpha")
            changed = True
        c = node.input[2] if len(node.input) > 2 else ""
        beta = float(attr(node, "beta", 1.0))

        def scaled(c: str = c, beta: float = beta, dtype: np.dtype = layer.dtype) -> np.ndarray:
            return (beta * view.const(c).astype(np.float64)).astype(dtype)

        if layer.bias is not None:
            old = view.initializers[c]
            if beta != 1.0 or (opset >= 7 and tuple(old.dims) != (layer.out_features,)):
                vector = opset >= 7
                rewrite(node, 2, ("C", beta, vector), (lambda b=layer.bias: b) if vector else scaled)
                changed = True
        elif layer.fixed_c and view.is_const(c) and beta != 1.0:
            rewrite(node, 2, ("C", beta, False), scaled)
            changed = True
        if attr(node, "beta") is not None and not (layer.fixed_c and not view.is_const(c)):
            changed |= _drop_attr(node, "beta")
        rewritten += changed
    return rewritten


def _drop_attr(node: onnx.NodeProto, name: str) -> bool:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            return True
    return False


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def bypass_identities(graph: onnx.GraphProto) -> int:
    """Remove Identity and inference Dropout nodes by renaming their consumers' inputs."""
    view = GraphView(graph)
    removed: set[int] = set()
    for index, node in enumerate(list(graph.node)):
        is_dropout = node.op_type == "Dropout" and (len(node.output) < 2 or not node.output[1])
        if node.domain not in ("", "ai.onnx") or node.op_type != "Identity" and not is_dropout:
            continue
        if is_dropout and len(node.input) > 2 and node.input[2]:
            continue  # training_mode given as a tensor: leave it
        src, dst = node.input[0], node.output[0]
        if dst in view.graph_outputs or any(_in_subgraph(c) for c in view.consumers.get(dst, [])):
            continue
        for consumer in view.consumers.get(dst, []):
            for i, name in enumerate(consumer.input):
                if name == dst:
                    consumer.input[i] = src
        removed.add(index)
    return _drop_nodes(graph, removed)


def _drop_nodes(graph: onnx.GraphProto, positions: set[int]) -> int:
    """Remove the nodes at `positions` with one rebuild of the node list (not one per node)."""
    if positions:
        keep = [n for i, n in enumerate(graph.node) if i not in positions]
        del graph.node[:]
        graph.node.extend(keep)
    return len(positions)


def _in_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def toposort(graph: onnx.GraphProto) -> None:
    """Stable iterative topological sort (Kahn's algorithm keyed on the original position)."""
    nodes = list(graph.node)
    produced_by = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if out:
                produced_by[out] = i
    deps: list[set[int]] = []
    users: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        d = {produced_by[n] for n in node_inputs_with_subgraphs(node) if n in produced_by} - {i}
        deps.append(d)
        for j in d:
            users[j].append(i)
    remaining = [len(d) for d in deps]
    ready = [i for i, r in enumerate(remaining) if r == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            remaining[u] -= 1
            if remaining[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise OnnxcError("graph has a cycle; cannot order its nodes")
    if order != list(range(len(nodes))):
        del graph.node[:]
        graph.node.extend(nodes[i] for i in order)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference with data propagation; a model it cannot handle keeps its shapes.

    Large initializers are swapped for typed graph inputs during inference: their values never
    matter for shapes (only small ones, such as Reshape targets, do) and serializing them is what
    makes inference slow on big models and impossible past 2 GB.
    """
    light = _skeleton(model)
    big_names = set()
    for tensor in model.graph.initializer:
        if tensor_nbytes(tensor) > LARGE_INITIALIZER or tensor.data_location == onnx.TensorProto.EXTERNAL:
            big_names.add(tensor.name)
            light.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                                        list(tensor.dims)))
        else:
            light.graph.initializer.append(tensor)
    try:
        inferred = shape_inference.infer_shapes(light, data_prop=True)
    except Exception as exc:
        log.warning("shape inference failed (%s); continuing with the shapes the model declares", exc)
        return model
    del model.graph.value_info[:]
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in big_names)
    outputs = {v.name: v for v in inferred.graph.output}
    for vi in model.graph.output:
        if vi.name in outputs:
            vi.CopyFrom(outputs[vi.name])
    return model


LARGE_INITIALIZER = 4096


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without initializers (nodes, I/O, opsets, functions): cheap to serialize."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = light.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.sparse_initializer.extend(model.graph.sparse_initializer)
    return light
