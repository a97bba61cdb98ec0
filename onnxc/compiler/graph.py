"""A thin, index-keeping view over a GraphProto that every pass uses to read and rewrite.

Why not onnx-graphsurgeon: it drops metadata on export, recurses in toposort and shares one
Constant object between all consumers. Here initializers are copied on write: `set_input_const`
gives a node its own tensor when the initializer is shared, so pruning one consumer never changes
another.
"""

from __future__ import annotations

import copy
import itertools
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphView:
    """Producer/consumer/initializer indexes over one graph, rebuilt by `refresh()` after edits."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self._counter = itertools.count()
        self.refresh()

    # ---- indexes -------------------------------------------------------------------------
    def refresh(self) -> None:
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producers[out] = node
            for name in node_inputs_with_subgraphs(node):
                self.consumers[name].append(node)
        self.graph_inputs = {v.name for v in self.graph.input} - set(self.initializers)
        self.graph_outputs = {v.name for v in self.graph.output}
        self.value_info = {v.name: v for v in itertools.chain(self.graph.input, self.graph.value_info,
                                                              self.graph.output)}
        self._names = set(self.producers) | set(self.initializers) | {v.name for v in self.graph.input}
        self._names |= {n.name for n in self.graph.node}

    def fork(self) -> GraphView:
        """A view of the same graph with its own name reservations and initializer index, as a
        fresh `GraphView` would have them but without re-indexing the graph: for work that adds
        constants and names and then withdraws them (each of many independent fits)."""
        other = copy.copy(self)
        other.initializers = dict(self.initializers)
        other._names = set(self._names)
        other._counter = itertools.count()
        return other

    def node_by_name(self, name: str) -> onnx.NodeProto | None:
        for node in self.graph.node:
            if node.name == name:
                return node
        return None

    # ---- constants -----------------------------------------------------------------------
    def is_const(self, name: str) -> bool:
        return name in self.initializers

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer, or None for anything computed at run time."""
        tensor = self.initializers.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def add_const(self, base: str, value: np.ndarray) -> str:
        """Add a new initializer under a fresh name derived from `base`; returns the name."""
        name = self.unique_name(base)
        tensor = numpy_helper.from_array(np.require(value, requirements="C"), name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = self.graph.initializer[-1]
        return name

    def set_input_const(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> str:
        """Give `node.input[index]` the value `value`, copying the initializer if others share it."""
        old = node.input[index]
        users = [n for n in self.consumers.get(old, []) if n is not node]
        shared = bool(users) or old in self.graph_outputs or sum(1 for i in node.input if i == old) > 1
        if old in self.initializers and not shared:
            new_tensor = numpy_helper.from_array(np.require(value, requirements="C"), old)
            self.initializers[old].CopyFrom(new_tensor)
            self._drop_input_decl(old)
            return old
        name = self.add_const(old or f"{node.name}_const", value)
        node.input[index] = name
        self.consumers[name].append(node)
        if old not in node.input:
            self.consumers[old] = users
        return name

    def _drop_input_decl(self, name: str) -> None:
        """An initializer also listed as a graph input (IR < 4 style) would carry a stale shape."""
        for i, vi in enumerate(self.graph.input):
            if vi.name == name:
                del self.graph.input[i]
                return

    # ---- names and edits -----------------------------------------------------------------
    def unique_name(self, base: str) -> str:
        base = base or "onnxc"
        if base not in self._names:
            self._names.add(base)
            return base
        while True:
            candidate = f"{base}__{next(self._counter)}"
            if candidate not in self._names:
                self._names.add(candidate)
                return candidate

    def make_node(self, op_type: str, inputs: list[str], outputs: list[str] | int = 1, *, name: str,
                  domain: str = "", **attrs) -> onnx.NodeProto:
        """Create a node with a unique name (and fresh output names when `outputs` is a count)."""
        node_name = self.unique_name(name)
        if isinstance(outputs, int):
            outputs = [self.unique_name(f"{node_name}_out{i}" if i else f"{node_name}_out")
                       for i in range(outputs)]
        return helper.make_node(op_type, inputs, outputs, name=node_name, domain=domain or None, **attrs)

    def replace_node(self, old: onnx.NodeProto, new_nodes: Iterable[onnx.NodeProto]) -> None:
        """Put `new_nodes` where `old` was (keeps a valid topological order when they are sorted)."""
        nodes = list(self.graph.node)
        index = next(i for i, n in enumerate(nodes) if n is old)
        del self.graph.node[:]
        self.graph.node.extend(nodes[:index] + list(new_nodes) + nodes[index + 1:])
        self.refresh()

    def remove_unused(self) -> int:
        """Drop nodes whose outputs nobody reads and initializers nobody uses; returns the count."""
        removed = 0
        changed = True
        while changed:
            changed = False
            used = set(self.graph_outputs)
            for node in self.graph.node:
                used.update(node_inputs_with_subgraphs(node))
            keep = []
            for node in self.graph.node:
                if any(o in used for o in node.output if o) or not any(node.output):
                    keep.append(node)
                else:
                    removed += 1
                    changed = True
            if changed:
                del self.graph.node[:]
                self.graph.node.extend(keep)
        used = set(self.graph_outputs)
        for node in self.graph.node:
            used.update(node_inputs_with_subgraphs(node))
        kept_init = [t for t in self.graph.initializer if t.name in used]
        removed += len(self.graph.initializer) - len(kept_init)
        if len(kept_init) != len(self.graph.initializer):
            del self.graph.initializer[:]
            self.graph.initializer.extend(kept_init)
            names = {t.name for t in kept_init}
            stale = [v for v in self.graph.input if v.name in self.initializers and v.name not in names]
            for v in stale:
                self.graph.input.remove(v)
        self.refresh()
        return removed

    # ---- shapes --------------------------------------------------------------------------
    def shape(self, name: str) -> list[int | str | None] | None:
        """Inferred shape of a tensor (ints, symbolic names, or None per dim); None if unknown."""
        if name in self.initializers:
            return list(self.initializers[name].dims)
        vi = self.value_info.get(name)
        if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in vi.type.tensor_type.shape.dim]

    def static_shape(self, name: str, symbolic: int = 1) -> tuple[int, ...] | None:
        """The shape with symbolic dims replaced by `symbolic` (batch 1 for costs); None if unknown."""
        shape = self.shape(name)
        if shape is None:
            return None
        return tuple(d if isinstance(d, int) and d > 0 else symbolic for d in shape)

    def dtype(self, name: str) -> int | None:
        if name in self.initializers:
            return self.initializers[name].data_type
        vi = self.value_info.get(name)
        if vi is None or not vi.type.HasField("tensor_type"):
            return None
        return vi.type.tensor_type.elem_type or None


def attr(node: onnx.NodeProto, name: str, default=None):
    """An attribute's Python value, or `default` when the node does not set it."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def outer_scope_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes (not defined inside it)."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        defined.update(o for o in node.output if o)
    for node in graph.node:
        used.update(i for i in node.input if i)
        for g in subgraphs(node):
            used |= outer_scope_inputs(g)
    used.update(v.name for v in graph.output)
    return used - defined


def node_inputs_with_subgraphs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs plus the outer-scope names its subgraphs read (If/Loop/Scan bodies)."""
    names = [i for i in node.input if i]
    for g in subgraphs(node):
        names.extend(sorted(outer_scope_inputs(g)))
    return names


def upstream(graph: onnx.GraphProto, names: Iterable[str]) -> list[onnx.NodeProto]:
    """The nodes `names` depend on, in graph order: a capture of early tensors then costs only the
    early part of the model (onnxruntime runs every node of a session, needed or not)."""
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
    todo = [producer[n] for n in names if n in producer]
    keep: set[int] = set()
    while todo:
        i = todo.pop()
        if i not in keep:
            keep.add(i)
            todo.extend(producer[n] for n in node_inputs_with_subgraphs(graph.node[i]) if n in producer)
    return [node for i, node in enumerate(graph.node) if i in keep]
