"""Bring a canonical model to the static form the C generator needs.

- every graph input gets concrete dims (batch 1 for symbolic dims unless `--input-shape` says
  otherwise) and the canonical form is recomputed at those shapes;
- clustered weights (`Gather(codebook, Cast(codes) [+ row_offsets])` feeding a Conv/Gemm/MatMul
  weight) are recognised and kept as codes: they must not be folded to a dense array;
- int8 weights and biases (`DequantizeLinear` of constants) that ops run on integers read
  (`qdq.kept_dequantize`) are kept quantized; other constant DQs fold to float;
- an `If` whose condition became constant is replaced by its branch (`resolve`), and shapes
  ONNX inference leaves symbolic are read from one onnxruntime run;
- everything else that is computable at export time (shape arithmetic: Shape, Gather, Concat,
  Cast... over constants and static shapes) is evaluated with the ONNX reference evaluator and
  becomes an initializer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxc.backends.c import qdq
from onnxc.backends.c.resolve import (
    fold_ifs,
    pin_selectors,
    pin_shape_inputs,
    refuse_ifs,
    shapes_from_onnxruntime,
    unknown_shapes,
)
from onnxc.compiler.canonical import canonicalize, infer_shapes
from onnxc.compiler.graph import GraphView, attr
from onnxc.errors import OnnxcError

log = logging.getLogger("onnxc.c")

WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


@dataclass
class Clustered:
    """A weight kept as k-means codes: W = codebook[row_base + codes]."""

    name: str                    # the Gather output (the weight the consumers read)
    codes: np.ndarray            # uint8 code per weight element, W's shape
    bits: int                    # 4 or 8
    codebook: np.ndarray         # float32 [K] or [rows * K]
    row_offsets: np.ndarray | None  # int32, broadcastable to W's shape, or None
    nodes: list[str]             # first outputs of the Gather/Cast/Add nodes the pattern replaces

    def dense(self) -> np.ndarray:
        """The weight expanded (for kernels that cannot read codes)."""
        base = 0 if self.row_offsets is None else self.row_offsets.astype(np.int64)
        return self.codebook[base + self.codes]


def static_inputs(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Concrete dims for every graph input: `input_shapes` first (canonicalize checks them against
    the model), then the values given for the dim names they share, other symbolic dims -> 1."""
    inits = {t.name for t in model.graph.initializer}
    shapes = {name: [int(d) for d in dims] for name, dims in input_shapes.items()}
    named: dict[str, int] = {}  # a dim name shared by several inputs is one dim: the given value
    for vi in model.graph.input:
        if vi.name in shapes:
            for d, value in zip(vi.type.tensor_type.shape.dim, shapes[vi.name]):
                if d.dim_param:
                    named.setdefault(d.dim_param, value)
    for vi in model.graph.input:
        if vi.name in inits or vi.name in shapes:
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            raise OnnxcError(f"C backend: input '{vi.name}' has no known rank; give it with --input-shape "
                             f"{vi.name}=DIMS")
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else named.get(d.dim_param, 1) for d in tt.shape.dim]
    return shapes


def prepare(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]],
            values: Mapping[str, np.ndarray] | None = None,
            ) -> tuple[onnx.ModelProto, dict[str, Clustered], dict[str, np.ndarray]]:
    """The static model, its clustered weights (keyed by the weight tensor name) and the branch
    selector inputs pinned to constants (`values` gives theirs, else the model's)."""
    model = canonicalize(model, static_inputs(model, input_shapes))
    pinned = pin_selectors(model, values)
    asked: list[str] = []
    for _ in range(8):
        clustered = find_clustered(model)
        skip = {n for c in clustered.values() for n in c.nodes} | qdq.kept_dequantize(model)
        if fold_static(model, skip) + fold_ifs(model):
            model = infer_shapes(model)
            continue
        missing = unknown_shapes(model)  # left symbolic by ONNX inference: ask onnxruntime once per set
        if not missing or missing == asked or not shapes_from_onnxruntime(model, missing):
            break
        asked = missing
        pin_shape_inputs(model)
    refuse_ifs(model)
    return model, clustered, pinned


# ---- clustered weights ------------------------------------------------------------------
def find_clustered(model: onnx.ModelProto) -> dict[str, Clustered]:
    view = GraphView(model.graph)
    opsets = {o.domain or "": o.version for o in model.opset_import}
    found: dict[str, Clustered] = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        match = _match_cluster(node, view, opsets)
        if match is not None:
            found[match.name] = match
    return found


def _match_cluster(gather: onnx.NodeProto, view: GraphView, opsets: dict[str, int]) -> Clustered | None:
    """`W = Gather(codebook, idx [+ row_offsets])` feeding only weight inputs, with `idx` computed
    from initializers alone (a Cast of UINT4/UINT8 codes, or the nibble-unpacking fallback): the
    index subgraph is evaluated here, its values become the codes we store packed."""
    out = gather.output[0]
    users = view.consumers.get(out, [])
    if not users or out in view.graph_outputs or attr(gather, "axis", 0) != 0:
        return None
    if any(WEIGHT_INPUT.get(u.op_type) is None or list(u.input).index(out) != WEIGHT_INPUT[u.op_type]
           or list(u.input).count(out) != 1 for u in users):
        return None
    codebook = view.const(gather.input[0])
    if codebook is None or codebook.dtype != np.float32 or codebook.ndim != 1:
        return None
    nodes = [out]
    idx = gather.input[1]
    offsets = None
    add = view.producers.get(idx)
    if add is not None and add.op_type == "Add" and view.const(add.input[1]) is not None \
            and view.const(add.input[0]) is None:
        offsets = view.const(add.input[1])
        if offsets.dtype.kind not in "iu" or len(view.consumers.get(add.output[0], [])) != 1:
            return None
        nodes.append(add.output[0])
        idx = add.input[0]
    sub = _constant_subgraph(idx, view, set(nodes))
    if sub is None:
        return None
    codes = _evaluate(idx, sub, view, opsets)
    if codes is None or codes.dtype.kind not in "iu" or codes.size == 0:
        return None
    if codes.min() < 0 or codes.max() > 255:
        return None
    if offsets is not None:
        try:
            flat = np.broadcast_to(offsets, codes.shape).astype(np.int64) + codes
        except ValueError:
            return None
    else:
        flat = codes.astype(np.int64)
    if flat.min() < 0 or flat.max() >= codebook.size:
        return None
    bits = 4 if codes.max() < 16 else 8
    offsets32 = None if offsets is None else offsets.astype(np.int32)
    return Clustered(out, codes.astype(np.uint8), bits, codebook, offsets32, nodes + [n.output[0] for n in sub])


def _constant_subgraph(name: str, view: GraphView, users: set[str], limit: int = 32) -> list[onnx.NodeProto] | None:
    """Nodes computing `name` from initializers only, used by nothing else; [] when `name` is one."""
    if name in view.initializers:
        return []
    order: list[onnx.NodeProto] = []
    seen: set[str] = set()
    stack = [name]
    while stack:
        tensor = stack.pop()
        if tensor in view.initializers or tensor in seen:
            continue
        node = view.producers.get(tensor)
        if node is None or len(order) >= limit or node.domain not in ("", "ai.onnx"):
            return None
        seen.update(o for o in node.output if o)
        order.append(node)
        stack.extend(i for i in node.input if i)
    inside = {o for n in order for o in n.output if o} | users
    for node in order:  # every intermediate stays private to the pattern
        for o in node.output:
            if o and (o in view.graph_outputs or any(c.output[0] not in inside for c in view.consumers.get(o, []))):
                return None
    position = {id(n): i for i, n in enumerate(view.graph.node)}
    return sorted(order, key=lambda n: position[id(n)])


def _evaluate(name: str, nodes: list[onnx.NodeProto], view: GraphView, opsets: dict[str, int]) -> np.ndarray | None:
    if not nodes:
        return view.const(name)
    values: dict[str, np.ndarray] = {}
    for node in nodes:
        outs = _static_value(node, view, values, opsets)
        if outs is None:
            return None
        for o, v in zip(node.output, outs):
            values[o] = v
    return values.get(name)


# ---- static evaluation ------------------------------------------------------------------
def fold_static(model: onnx.ModelProto, skip: set[str]) -> int:
    """Replace nodes computable at export time by initializers; returns how many."""
    graph = model.graph
    view = GraphView(graph)
    opsets = {o.domain or "": o.version for o in model.opset_import}
    values: dict[str, np.ndarray] = {}
    keep: list[onnx.NodeProto] = []
    folded = 0
    for node in graph.node:
        outs = None if node.output[0] in skip else _static_value(node, view, values, opsets)
        if outs is None:
            keep.append(node)
            continue
        for name, value in zip(node.output, outs):
            if name:
                values[name] = value
        folded += 1
    if not folded:
        return 0
    needed = {i for n in keep for i in n.input} | view.graph_outputs
    for name, value in values.items():
        if name in needed:
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    del graph.node[:]
    graph.node.extend(keep)
    names = {t.name for t in graph.initializer}
    stale = [v for v in graph.value_info if v.name in names]
    for v in stale:
        graph.value_info.remove(v)
    GraphView(graph).remove_unused()
    return folded


def _static_value(node: onnx.NodeProto, view: GraphView, values: dict[str, np.ndarray],
                  opsets: dict[str, int]) -> list[np.ndarray] | None:
    if node.domain not in ("", "ai.onnx") or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                 for a in node.attribute):
        return None
    if node.op_type in ("Shape", "Size"):
        shape = view.static_shape(node.input[0], symbolic=-1) if node.input[0] not in values else \
            values[node.input[0]].shape
        if shape is None or any(d < 0 for d in shape):
            return None
        if node.op_type == "Size":
            return [np.array(int(np.prod(shape)), dtype=np.int64)]
        start, end = attr(node, "start", 0), attr(node, "end", None)
        return [np.array(list(shape)[start:end], dtype=np.int64)]
    inputs = [i for i in node.input if i]
    if not inputs or node.op_type in ("RandomNormalLike", "RandomUniformLike", "Multinomial"):
        return None
    args = {}
    for name in inputs:
        if name in values:
            args[name] = values[name]
        elif name in view.initializers:
            args[name] = view.const(name)
        else:
            return None
    try:
        outs = evaluate_node(node, args, opsets.get("", 13))
    except Exception as exc:  # left for the lowering to report as unsupported
        log.debug("cannot evaluate %s (%s) at export time: %s", node.name, node.op_type, exc)
        return None
    return [np.asarray(o) for o in outs]


def evaluate_node(node: onnx.NodeProto, args: Mapping[str, np.ndarray], opset: int) -> list[np.ndarray]:
    """`node` run by the ONNX reference evaluator at the model's opset.

    Wrapped in a one-node model: an evaluator built from a bare NodeProto runs the newest version
    of the op whatever `opsets` says, which cannot read the attributes older exports use
    (`Unsqueeze`/`Squeeze` axes before opset 13, as torch writes at opset 11)."""
    names = [i for i in node.input if i]
    graph = onnx.helper.make_graph([node], "fold", [onnx.helper.make_empty_tensor_value_info(n) for n in names],
                                   [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    return list(ReferenceEvaluator(model).run(None, {n: args[n] for n in names}))
