"""A toy technique in one file: the allocator must plan it with no edit anywhere else.

`toy_rank` replaces a dense layer y = x W^T + b (a Gemm with transB=1, as torch exports it) by two
thin ones, y = (x V^T) U^T + b, from a plain truncated SVD of W (no data). Its levels are the
fraction of the layer's rank kept. It registers itself on import and implements
`onnxc.compiler.technique.Technique`; nothing in onnxc names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxc.compiler.graph import GraphView, attr
from onnxc.compiler.passes import Change, Pass, PassContext, PassResult, register
from onnxc.compiler.technique import Candidate, Technique


@register
@dataclass
class ToyRankPass(Pass, Technique):
    id = "toy_rank"
    summary = "plain truncated SVD of transB=1 Gemm weights (a test of the Technique protocol)"
    plan_order = 30
    keep: float = 0.5  # fraction of the rank kept when run on its own
    _levels: dict[str, float] | None = field(default=None, repr=False)

    def _layers(self, model: onnx.ModelProto) -> list[onnx.NodeProto]:
        view = GraphView(model.graph)
        return [n for n in model.graph.node
                if n.op_type == "Gemm" and attr(n, "transB", 0) == 1 and attr(n, "transA", 0) == 0
                and view.is_const(n.input[1]) and min(view.const(n.input[1]).shape) >= 8]

    # the Technique protocol
    def plan_candidates(self, model: onnx.ModelProto, shapes: dict | None = None) -> list[Candidate]:
        return [Candidate(n.name, (n.name,)) for n in self._layers(model)]

    def levels(self, target_ratio: float | None = None) -> tuple[float, ...]:
        return (0.5, 0.25)

    def restricted(self, levels) -> list[Pass]:
        return [replace(self, _levels=dict(levels))]

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        view = GraphView(model.graph)
        changes = []
        for output in [n.output[0] for n in self._layers(model)]:
            node = view.producers[output]  # replace_node rebuilds the node list: find the live node
            keep = self.keep if self._levels is None else self._levels.get(node.name)
            if keep is None:
                continue
            w = view.const(node.input[1]).astype(np.float64)  # [N, K]
            n_out, k = w.shape
            rank = max(1, int(round(keep * min(n_out, k))))
            if rank * (n_out + k) >= n_out * k:
                continue
            u, s, vt = np.linalg.svd(w, full_matrices=False)
            first = (vt[:rank] * np.sqrt(s[:rank, None])).astype(np.float32)  # [r, K]
            second = (u[:, :rank] * np.sqrt(s[:rank])).astype(np.float32)  # [N, r]
            a, b = f"{node.name}/toy_v", f"{node.name}/toy_u"
            model.graph.initializer.extend([numpy_helper.from_array(first, a), numpy_helper.from_array(second, b)])
            thin = f"{node.name}/toy_rank_out"
            new = [helper.make_node("Gemm", [node.input[0], a], [thin], name=f"{node.name}/toy_1", transB=1),
                   helper.make_node("Gemm", [thin, b, *node.input[2:]], list(node.output), name=node.name,
                                    transB=1)]
            view.replace_node(node, new)
            changes.append(Change(node.name, "Gemm", f"rank {rank}"))
        if changes:
            view.remove_unused()
        return PassResult(model, bool(changes), changes)
