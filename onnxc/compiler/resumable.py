"""Captures that resume where the last one stopped, for passes that rewrite a model front to back.

Layer-by-layer refits (prune's recapture, factorization and circulant fits) capture the inputs
of wave after wave of layers, each time from a model rewritten upstream of them. Run from the
graph inputs every time, a chain of N waves costs N/2 passes over the model
(`benchmarks/compile_time.py` shows what that is on a deep model). A `Resumable` keeps, for every
calibration batch, the tensors on the frontier of what it has computed (the tensors computed so
far that a node not yet computed reads) and runs only the nodes between that frontier and the
tensors asked for next: the whole sequence of waves costs about one pass.

That is exact as long as nothing already computed is rewritten afterwards. A pass that rewrites
a node says so with `modified`; when that node was already computed, the capture starts over
from the graph inputs. Refit waves never do: a wave's layers read what was computed, they are
not part of it. The frontier is kept in memory for every sample; past `max_bytes` it is not
kept and the next capture starts over from the inputs (as slow as before, never more memory).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from onnxc.compiler import layout, runtime
from onnxc.compiler.calibration import CaptureSession
from onnxc.compiler.graph import node_inputs_with_subgraphs

DEFAULT_MAX_BYTES = 768 * 2**20  # the frontier of every calibration sample, kept between captures


class Resumable:
    """Intermediate tensors of a model, batch by batch, resumed from the last capture's frontier.

    `batch_size` is fixed for the life of the object: every capture yields the same batches in the
    same order (callers that draw random positions per batch rely on it). A model whose batch dim
    is fixed gets batches of exactly that size, the last one padded by repeating its first sample
    (as `runtime.run` does), and what is yielded is trimmed back."""

    def __init__(self, model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], batch_size: int, *,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        fixed = runtime.fixed_batch(model)
        batch_size = fixed or batch_size
        axes = layout.model_input_axes(model)
        self.batches, self.sizes = [], []
        for batch in runtime.batches(inputs, batch_size):
            for start, stop, feed in layout.feeds(batch, axes):  # in the model's layout, as sessions take them
                size = stop - start
                short = batch_size - size if fixed else 0
                self.batches.append({k: runtime.pad_batch(v, short, axes.get(k, 0)) if short else v
                                     for k, v in feed.items()})
                self.sizes.append(size)
        self.batch_size, self.max_bytes, self.padded = batch_size, max_bytes, bool(fixed)
        self._reset()

    def _trim(self, value: np.ndarray, size: int) -> np.ndarray:
        return value[:size] if self.padded and value.ndim and len(value) == self.batch_size else value

    def _reset(self) -> None:
        self.store: list[dict[str, np.ndarray]] = [dict(b) for b in self.batches]
        self.done: set[str] = set()  # outputs of the nodes computed so far

    def modified(self, nodes: Iterable[onnx.NodeProto]) -> None:
        """`nodes` were rewritten: start over if any of them was part of what was computed."""
        if any(o in self.done for n in nodes for o in n.output):
            self._reset()

    def capture(self, model: onnx.ModelProto, names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        """Yield `names` for every batch, running only the nodes not computed yet (the next batch
        runs while the caller works on this one; the frontier is kept once every batch is read)."""
        return runtime.prefetch(self._capture(model, names))

    def _capture(self, model: onnx.ModelProto, names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        names = list(dict.fromkeys(names))
        if not self.store:  # no samples
            return
        graph = model.graph
        nodes = self._needed(graph, names)
        if nodes is None:  # a tensor computed before but not kept: start over from the inputs
            self._reset()
            nodes = self._needed(graph, names) or []
        if not nodes:
            for stored, size in zip(self.store, self.sizes):
                yield {n: self._trim(stored[n], size) for n in names}
            return
        produced = {o for n in nodes for o in n.output if o}
        done = self.done | produced
        frontier = _frontier(graph, done, set(self.store[0]))
        outputs = [t for t in dict.fromkeys(names + frontier) if t in produced]
        sub, feeds = _submodel(model, nodes, outputs, self.store[0])
        sess = CaptureSession(sub)
        keep = set(frontier)
        kept: list[dict[str, np.ndarray]] = []
        used = 0
        for stored, size in zip(self.store, self.sizes):
            values = sess.run_once(outputs, {k: stored[k] for k in feeds})
            yield {n: self._trim(values[n] if n in values else stored[n], size) for n in names}
            if used <= self.max_bytes:
                merged = {k: v for k, v in {**stored, **values}.items() if k in keep}
                used += sum(v.nbytes for v in merged.values())
                kept.append(merged)
        if used <= self.max_bytes:
            self.store, self.done = kept, done
        else:
            self._reset()

    def _needed(self, graph: onnx.GraphProto, names: Sequence[str]) -> list[onnx.NodeProto] | None:
        """The nodes between the stored frontier and `names`, in graph order; None when a tensor
        on the way was computed but not kept."""
        available = set(self.store[0])
        producer = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
        todo = [n for n in names if n not in available]
        keep: set[int] = set()
        while todo:
            name = todo.pop()
            if name in available or name not in producer:
                continue  # stored, or an initializer / graph input
            if name in self.done:
                return None
            i = producer[name]
            if i not in keep:
                keep.add(i)
                todo.extend(node_inputs_with_subgraphs(graph.node[i]))
        return [node for i, node in enumerate(graph.node) if i in keep]


def _frontier(graph: onnx.GraphProto, done: set[str], stored: set[str]) -> list[str]:
    """Tensors computed or stored that a node outside `done` reads (in graph order)."""
    out: list[str] = []
    for node in graph.node:
        if any(o in done for o in node.output):
            continue
        out.extend(t for t in node_inputs_with_subgraphs(node) if t in done or t in stored)
    return list(dict.fromkeys(out))


def _submodel(model: onnx.ModelProto, nodes: list[onnx.NodeProto], outputs: list[str],
              stored: Mapping[str, np.ndarray]) -> tuple[onnx.ModelProto, list[str]]:
    """A model of `nodes` reading the stored tensors they need as graph inputs; and those names."""
    graph = model.graph
    produced = {o for n in nodes for o in n.output}
    reads = list(dict.fromkeys(t for n in nodes for t in node_inputs_with_subgraphs(n)))
    feeds = [t for t in reads if t in stored and t not in produced]
    constant = set(reads) - set(feeds) - produced
    inits = [t for t in graph.initializer if t.name in constant]
    known = {v.name: v for v in list(graph.value_info) + list(graph.output) + list(graph.input)}
    inputs = [_value_info(t, stored[t]) for t in feeds]
    outs = []
    for name in outputs:
        vi = onnx.ValueInfoProto()
        if name in known:
            vi.CopyFrom(known[name])
        else:
            vi.name = name
        outs.append(vi)
    value_info = [v for v in graph.value_info if v.name in produced and v.name not in set(outputs)]
    sub = helper.make_graph(list(nodes), graph.name or "resumed", inputs, outs, initializer=inits,
                            value_info=value_info)
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    m.graph.CopyFrom(sub)
    return m, feeds


def _value_info(name: str, value: np.ndarray) -> onnx.ValueInfoProto:
    """A graph input for a stored tensor: its element type, its rank, every dim symbolic."""
    elem = helper.np_dtype_to_tensor_dtype(value.dtype)
    return helper.make_tensor_value_info(name, elem, [f"{name}_d{i}" for i in range(value.ndim)])
