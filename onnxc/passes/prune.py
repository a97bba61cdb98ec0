"""Channel pruning with next-layer reconstruction (pass `prune`).

1. `channel_groups.analyze` finds the groups of channels that must go together.
2. Each group's units are scored: filter norms (`l1`, `l2`), mean |activation| (`activation`), or
   the ThiNet criterion (`thinet`: the Gram matrix of every channel's contribution to the next
   layers' outputs, so the channels chosen are those whose joint removal changes them least).
3. `ratio` of each group's units is removed (or, with `scope=global`, of all units ranked
   together after normalising scores within each group), respecting `min_channels`, `round_to` and
   the equal-per-group rule of grouped convolutions.
4. The weights are sliced so pruned channels are gone from every tensor of the group: producers'
   rows and biases, BN and per-channel constants, depthwise convs, Split sizes, Slice bounds,
   Reshape targets, consumers' columns (Flatten blocks in a Gemm included).
5. With `reconstruct` (default), every layer that reads a pruned group is refit by ridge least
   squares to reproduce the unpruned model's output on calibration data (see `_reconstruct`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import onnx

from onnxc.compiler import holdout, runtime
from onnxc.compiler.canonical import infer_shapes
from onnxc.compiler.cost import model_cost
from onnxc.compiler.graph import GraphView, attr, set_attr
from onnxc.compiler.linear import LinearLayer, is_linear
from onnxc.compiler.model import clone
from onnxc.compiler.passes import Change, Pass, PassContext, PassResult, Skip, matches_any, register
from onnxc.compiler.technique import Candidate, Technique
from onnxc.errors import UsageError
from onnxc.passes import _importance as imp
from onnxc.passes import _reconstruct as rec
from onnxc.passes.channel_groups import ELEMENTWISE, Analysis, ChannelGroup, analyze

# Levels offered to the allocator: the fraction of a group's channels removed, mildest first.
LEVELS = (0.25, 0.5, 0.75)
# Deeper levels, offered when a target keeps under DEEP_TARGET of the model's cost. Pruning r of the
# channels on both sides of a layer keeps (1 - r)^2 of it, so a target t needs r = 1 - sqrt(t) on
# average (0.61 at t = 0.15), and the allocator needs levels well past that to spare the sensitive
# groups; above it, a deeper level would only cost measurements.
DEEP_LEVELS = (0.875,)
DEEP_TARGET = 0.3


@register
@dataclass
class PrunePass(Pass, Technique):
    id = "prune"
    plan_order = 0
    composes = True  # channel groups share the layers between them; what each keeps multiplies
    planned_by_default = True
    summary = "remove whole channels (groups through residuals, concats, splits) and refit the next layers"
    uses_calibration = True
    option_help = {
        "ratio": "fraction of each group's channels removed (0..1)",
        "criterion": "channel importance: l1 | l2 (filter norms), activation (mean |x|), thinet (greedy "
                     "least change of the next layer's output), lsq (greedy least error left after the refit)",
        "reconstruct": "refit the layers after each pruned group by ridge least squares on calibration data",
        "scope": "group: remove `ratio` of every group; global: rank all channels together",
        "exclude": "node names or globs whose weights must not change (their groups are left alone)",
        "min_channels": "never leave a tensor with fewer channels than this",
        "round_to": "round every group's kept channel count up to a multiple of this (0: to the nearest multiple "
                    "of onnxruntime's channel block on this machine, 8 or 16; halved for groups under four blocks)",
        "ridge": "ridge strength of the refit relative to the mean input energy; each layer picks 0.1x..100x "
                 "of it (or keeps its sliced weights) by 2-fold cross-validation over calibration samples",
        "samples": "patch rows per layer for the refit and ThiNet statistics",
        "recapture": "refit layer by layer on the pruned model's own activations (slower, more accurate)",
        "downstream": "with recapture, also refit the unpruned layers after a pruned group (depthwise convs, "
                      "later layers) to absorb what the direct consumers could not",
        "judge": "run the model with and without the refits on held-out samples and keep the sliced weights "
                 "where the refits read them worse (off: trust the per-layer held-out checks alone; faster)",
    }
    ratio: float = 0.3
    criterion: Literal["l1", "l2", "activation", "thinet", "lsq"] = "lsq"
    reconstruct: bool = True
    scope: Literal["group", "global"] = "group"
    exclude: list[str] = field(default_factory=list)
    min_channels: int = 1
    round_to: int = 0
    ridge: float = 1e-2
    samples: int = 8192
    recapture: bool = True
    downstream: bool = True
    judge: bool = True
    # Set by the allocator (not a CLI option): group name -> its own ratio; only these groups are pruned.
    _levels: dict[str, float] | None = None

    def candidates(self, model: onnx.ModelProto) -> list[ChannelGroup]:
        """The groups this pass may prune in `model` (names its unnamed nodes in place)."""
        _name_nodes(model)
        return [g for g in analyze(model).prunable()
                if g.n_units >= 2 and not any(matches_any(n, self.exclude) for n in g.nodes)]

    # ---- the Technique protocol ----------------------------------------------------------------
    def plan_candidates(self, model: onnx.ModelProto, shapes: dict | None = None) -> list[Candidate]:
        return [Candidate(g.name, tuple(dict.fromkeys(g.nodes))) for g in self.candidates(clone(model))]

    def levels(self, target_ratio: float | None = None) -> tuple[float, ...]:
        deep = target_ratio is not None and target_ratio < DEEP_TARGET
        return LEVELS + (DEEP_LEVELS if deep else ())

    def restricted(self, levels) -> list[Pass]:
        return [replace(self, _levels=dict(levels))]

    def probe(self) -> PrunePass:
        """Refit only the direct consumers, on the original model's activations, rank channels by
        ThiNet instead of the greedy least-squares search, and trust the per-layer held-out checks
        without running the model twice more: many times faster per candidate, and the final plan
        runs with the user's settings and is verified."""
        return replace(self, recapture=False, downstream=False, samples=min(self.samples, 2048), judge=False,
                       criterion="thinet" if self.criterion == "lsq" else self.criterion)

    def planned(self, explicit, kind=None) -> PrunePass:
        """Kept counts at a multiple of the machine's channel block (unless round_to was set), so the
        saving the allocator plans on is time the runtime saves."""
        return self if "round_to" in explicit else replace(self, round_to=runtime.channel_multiple())

    def validate(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise UsageError(f"prune: ratio must be in [0, 1), got {self.ratio}")
        if self.min_channels < 1 or self.round_to < 0:
            raise UsageError("prune: min_channels must be at least 1 and round_to at least 0 (0: automatic)")
        if self.ridge < 0 or self.samples < 16:
            raise UsageError("prune: ridge must be >= 0 and samples >= 16")

    # ------------------------------------------------------------------------------------------
    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        _name_nodes(model)  # the analysis and the refit find nodes by name
        original = clone(model)
        analysis = analyze(model)
        skipped: list[Skip] = [Skip(g.name, "; ".join(g.frozen)) for g in analysis.groups
                               if g.producers and g.frozen]
        info: dict = {"criterion": self.criterion, "groups": [], "notes": []}
        candidates = []
        for g in analysis.prunable():
            hit = [n for n in g.nodes if matches_any(n, self.exclude)]
            if hit:
                skipped.append(Skip(g.name, f"excluded by pattern ({hit[0]})"))
            elif g.n_units < 2:
                skipped.append(Skip(g.name, "a single channel"))
            elif self._levels is not None and g.name not in self._levels:
                continue
            else:
                candidates.append(g)
        data = ctx.calibration.train if ctx.calibration is not None else None
        criterion = self.criterion
        if data is None and criterion in ("activation", "thinet", "lsq"):
            info["notes"].append(f"no calibration data: criterion {criterion} replaced by l1, no refit")
            criterion = "l1"
        scores, states = imp.collect(original, candidates, criterion, data, self.samples, self.ridge,
                                     ctx.rng("prune-importance"), progress=ctx.progress)
        counts = self._counts(candidates, scores, states)
        keep: dict[str, np.ndarray] = {}
        pruned_groups: list[tuple[ChannelGroup, np.ndarray]] = []
        for index, g in enumerate(candidates):
            ctx.progress("prune: selection", index, len(candidates))
            kept = imp.select(g, self._round(g, counts[g.id]), scores[g.id], states.get(g.id), self.min_channels)
            if kept is None or kept.all():
                skipped.append(Skip(g.name, "nothing to remove at this ratio"))
                continue
            keep.update(g.keep_channels(kept))
            pruned_groups.append((g, kept))
        ctx.progress("prune: selection", len(candidates), len(candidates))
        for g in analysis.groups:
            if g.producers:
                info["groups"].append(g.describe())
        if not pruned_groups:
            return PassResult(original, False, [], skipped, info)
        rewrite(model, analysis, keep)
        model = _reinfer(model)
        jobs = []
        if self.reconstruct and data is not None:
            jobs = _jobs(original, [g for g, _ in pruned_groups], keep, self.downstream and self.recapture)
            held = ctx.calibration.validation if holdout.has_held_out(ctx.calibration) else None
            sliced = clone(model)
            model = rec.refit(original, model, jobs, data, ridge=self.ridge, samples=self.samples,
                              recapture=self.recapture, rng=lambda s: ctx.rng(f"prune-refit:{s}"),
                              progress=ctx.progress, refresh=_reinfer, held_out=held)
            if self.judge and held is not None and any(j.verdict is not None and j.verdict.kept for j in jobs):
                verdict = holdout.judge_model(holdout.Reference(original, ctx.calibration, ctx.metric), model, sliced)
                info["model_refit"] = verdict.detail()
                if not verdict.kept:
                    info["notes"].append("the refit layers read the held-out samples worse than the sliced ones at "
                                         "the model's outputs: sliced weights kept")
                    model = sliced
        elif self.reconstruct:
            info["notes"].append("no calibration data: layers were sliced, not refit")
        shapes = ctx.cost_shapes()
        changes = _report(original, model, analysis, pruned_groups, jobs, info, shapes)
        for job in jobs:
            if job.skipped:
                skipped.append(Skip(job.node, f"not refit: {job.skipped}"))
        return PassResult(model, True, changes, skipped, info)

    def _counts(self, groups: list[ChannelGroup], scores: dict, states: dict) -> dict[int, int]:
        """Units to remove per group: the local ratio, or a global ranking (a joint greedy run on
        comparable data costs; otherwise one threshold on scores normalised within each group)."""
        if self._levels is not None:
            return {g.id: int(round(self._levels[g.name] * g.n_units)) for g in groups}
        if self.scope == "group" or not groups:
            return {g.id: int(round(self.ratio * g.n_units)) for g in groups}
        n = int(round(self.ratio * sum(g.n_units for g in groups)))
        if all(g.id in states for g in groups):
            return imp.global_counts(groups, states, n, self.min_channels)
        pooled = []
        for g in groups:
            s = scores[g.id] / max(float(np.mean(scores[g.id])), 1e-30)
            pooled += [(float(v), g.id) for v in s]
        pooled.sort()
        counts = {g.id: 0 for g in groups}
        for _, gid in pooled[:n]:
            counts[gid] += 1
        return counts

    def _round(self, g: ChannelGroup, n_remove: int) -> int:
        """How many channels go once the kept count is rounded: up to a multiple of `round_to`, or
        (0, automatic) to the nearest multiple of onnxruntime's channel block, at least one block.

        Its blocked convolutions run only counts that are a multiple of the block, and others fall
        back to slower kernels: an unrounded prune:ratio=0.2 of the layout detector (13, 26, 51,
        102, 205 channels) ran at 1.25x the original's time with 0.66x its MACs. Groups under
        four blocks round to the largest power of two they hold four of (16 channels: to 4), so
        the ratio still means something on small layers."""
        kept = g.n_units - n_remove
        if self.round_to:
            kept = min(g.n_units, int(math.ceil(kept / self.round_to)) * self.round_to)
        elif n_remove > 0:
            step = _automatic_step(g.n_units)
            kept = min(g.n_units, max(step, int(round(kept / step)) * step))
        return g.n_units - kept


def _automatic_step(n_units: int) -> int:
    """The machine's channel block (`runtime.channel_multiple`), halved until the group holds four."""
    step = runtime.channel_multiple()
    while step > 1 and n_units < 4 * step:
        step //= 2
    return step


def _name_nodes(model: onnx.ModelProto) -> None:
    view = GraphView(model.graph)
    seen: set[str] = set()
    for node in model.graph.node:
        if not node.name or node.name in seen:
            node.name = view.unique_name(f"{node.op_type}_{node.output[0] if node.output else ''}")
        seen.add(node.name)


# ---- rewrite -------------------------------------------------------------------------------
def rewrite(model: onnx.ModelProto, analysis: Analysis, keep: dict[str, np.ndarray]) -> None:
    """Slice every weight, size and shape so the channels outside `keep` are gone."""
    view = GraphView(model.graph)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    old = {name: view.static_shape(name) for name in keep}
    for node in list(model.graph.node):
        kin = keep.get(node.input[0]) if node.input else None
        kout = keep.get(node.output[0]) if node.output else None
        if kin is None and kout is None:
            continue
        role = analysis.roles.get(node.name)
        op = node.op_type
        if op in ("Conv", "ConvTranspose"):
            _conv(view, node, kin, kout, role)
        elif op in ("Gemm", "MatMul"):
            _dense(view, node, kin, kout)
        elif op == "BatchNormalization" and kout is not None:
            for i in range(1, 5):
                view.set_input_const(node, i, view.const(node.input[i])[kout])
        elif op == "InstanceNormalization" and kout is not None:
            for i in (1, 2):
                view.set_input_const(node, i, view.const(node.input[i])[kout])
        elif role == "split":
            _split(view, node, keep, opset)
        elif role == "slice" and kin is not None:
            _slice(view, node, kin, len(kout), opset)
        elif role in ("reshape_keep", "reshape_flat", "shuffle_out") and kout is not None:
            _shape_dim(view, node, 1, len(kout), 1)
        elif role == "shuffle_in" and kin is not None:
            groups = int(view.const(node.input[1])[1])
            _shape_dim(view, node, 1, len(kin) // groups, 2)
        elif role == "resize_sizes" and kout is not None:
            _shape_dim(view, node, 3, len(kout), 1)
        elif (op in ELEMENTWISE or op == "Clip") and kout is not None:
            c_old = old[node.output[0]][1]
            rank = len(old[node.output[0]])
            for i, name in enumerate(node.input):
                value = view.const(name) if name else None
                if value is None:
                    continue
                axis = 1 - (rank - value.ndim)
                if axis >= 0 and c_old > 1 and value.shape[axis] == c_old:
                    view.set_input_const(node, i, np.take(value, kout, axis=axis))
    view.remove_unused()


def _conv(view: GraphView, node: onnx.NodeProto, kin, kout, role) -> None:
    w = view.const(node.input[1])
    b = view.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    transpose = node.op_type == "ConvTranspose"
    if role == "depthwise":
        if kout is not None:
            w, b = w[kout], (b[kout] if b is not None else None)
            set_attr(node, "group", len(kin))
    else:
        if kout is not None:
            w = w[:, kout] if transpose else w[kout]
            b = b[kout] if b is not None else None
        if kin is not None:
            if transpose:
                w = w[kin]
            else:
                group = attr(node, "group", 1)
                c_in = view.static_shape(node.input[0])[1]
                if group == 1:
                    w = w[:, kin]
                else:
                    w = _grouped_columns(w, kin, kout, c_in, group, view.const(node.input[1]).shape[0])
    view.set_input_const(node, 1, w)
    if b is not None:
        view.set_input_const(node, 2, b)


def _grouped_columns(w, kin, kout, c_in, group, c_out_old):
    """Columns of a grouped conv: each output row keeps the kept inputs of its own group."""
    per_in, per_out = c_in // group, c_out_old // group
    rows = kout if kout is not None else np.arange(c_out_old)
    local = [kin[kin // per_in == gi] % per_in for gi in range(group)]
    return np.stack([w[i][local[orig // per_out]] for i, orig in enumerate(rows)])


def _dense(view: GraphView, node: onnx.NodeProto, kin, kout) -> None:
    # a MatMul's bias Add is left out: it is sliced as the elementwise op it is
    layer = LinearLayer.read(node, view, with_add=False)
    w, bias = layer.weight, layer.bias
    if kin is not None:
        w = w[:, kin]
    if kout is not None:
        w, bias = w[kout], (bias[kout] if bias is not None else None)
    layer.write(view, w, bias if kout is not None else None)
    if kout is not None and layer.fixed_c and view.is_const(layer.fixed_c):  # a per-row C: its columns
        c = view.const(layer.fixed_c)
        if c.ndim and c.shape[-1] > 1:
            view.set_input_const(node, 2, np.take(c, kout, axis=-1))


def _split(view: GraphView, node: onnx.NodeProto, keep, opset: int) -> None:
    if not all(o in keep for o in node.output if o):
        return
    sizes = np.array([len(keep[o]) for o in node.output], np.int64)
    if opset >= 13:
        if len(node.input) > 1 and node.input[1]:
            view.set_input_const(node, 1, sizes)
        else:
            node.input.append(view.add_const(f"{node.name}_split", sizes))
        for i, a in enumerate(node.attribute):
            if a.name == "num_outputs":
                del node.attribute[i]
                break
    else:
        set_attr(node, "split", [int(s) for s in sizes])


def _slice(view: GraphView, node: onnx.NodeProto, kin, n_out: int, opset: int) -> None:
    c_in = view.static_shape(node.input[0])[1]
    rank = len(view.static_shape(node.input[0]))
    if opset < 10:
        starts, ends = list(attr(node, "starts")), list(attr(node, "ends"))
        axes = list(attr(node, "axes", range(len(starts))))
    else:
        starts = list(view.const(node.input[1]))
        ends = list(view.const(node.input[2]))
        axes = list(view.const(node.input[3])) if len(node.input) > 3 and node.input[3] else list(range(len(starts)))
    k = [a + rank if a < 0 else a for a in axes].index(1)
    idx = np.arange(c_in)[slice(int(starts[k]), int(ends[k]), 1)]
    first = int(np.searchsorted(kin, idx[0])) if len(idx) else 0
    starts[k], ends[k] = first, first + n_out
    if opset < 10:
        set_attr(node, "starts", [int(s) for s in starts])
        set_attr(node, "ends", [int(e) for e in ends])
    else:
        dtype = view.const(node.input[1]).dtype
        view.set_input_const(node, 1, np.array(starts, dtype))
        view.set_input_const(node, 2, np.array(ends, dtype))


def _shape_dim(view: GraphView, node: onnx.NodeProto, index: int, value: int, dim: int) -> None:
    shape = view.const(node.input[index]).copy()
    if shape[dim] > 0:
        shape[dim] = value
        view.set_input_const(node, index, shape)


def _reinfer(model: onnx.ModelProto) -> onnx.ModelProto:
    del model.graph.value_info[:]
    return infer_shapes(model)


# ---- reconstruction jobs and report ----------------------------------------------------------
def _jobs(original: onnx.ModelProto, groups: list[ChannelGroup], keep: dict[str, np.ndarray],
          downstream: bool) -> list[rec.RefitJob]:
    """The layers to refit: every consumer of a pruned group and, with `downstream`, every other
    linear layer whose input the pruning changed (depthwise convs included)."""
    view = GraphView(original.graph)
    jobs = []
    order = {n.name: i for i, n in enumerate(original.graph.node)}
    for g in groups:
        for name in g.consumers:
            node = view.node_by_name(name)
            if not is_linear(node, view) or node.input[0] not in keep:
                continue
            jobs.append(rec.RefitJob(name, node.input[0], node.output[0], keep[node.input[0]],
                                     keep.get(node.output[0])))
    if downstream:
        affected = set(keep)
        chosen = {j.node for j in jobs}
        for node in original.graph.node:
            if not any(i in affected for i in node.input if i):
                continue
            affected.update(o for o in node.output if o)
            x = node.input[0]
            if node.name in chosen or not is_linear(node, view) or x not in affected \
                    or view.static_shape(x) is None:
                continue
            if node.op_type != "Conv" and len(view.static_shape(x)) != 2:
                continue  # a MatMul over [N, T, D]: its features are not on axis 1, which the refit assumes
            keep_in = keep.get(x, np.arange(view.static_shape(x)[1]))
            jobs.append(rec.RefitJob(node.name, x, node.output[0], keep_in, keep.get(node.output[0])))
    jobs.sort(key=lambda j: order[j.node])
    _residual_targets(view, jobs, order)
    for job in jobs:
        job.clip = _clip_after(view, job.y_name)
    return jobs


def _clip_after(view: GraphView, tensor: str) -> tuple[float, float] | None:
    """The range of the Relu/Clip that is the only reader of `tensor` (None if anything else)."""
    users = view.consumers.get(tensor, [])
    if len(users) != 1 or tensor in view.graph_outputs:
        return None
    node = users[0]
    if node.op_type == "Relu":
        return (0.0, np.inf)
    if node.op_type != "Clip":
        return None
    if len(node.input) == 1 and attr(node, "min") is not None:
        return (float(attr(node, "min", -np.inf)), float(attr(node, "max", np.inf)))
    bounds = []
    for i, default in ((1, -np.inf), (2, np.inf)):
        name = node.input[i] if len(node.input) > i else ""
        value = view.const(name) if name else None
        if name and value is None:
            return None
        bounds.append(float(value) if value is not None else default)
    return tuple(bounds)


def _residual_targets(view: GraphView, jobs: list[rec.RefitJob], order: dict[str, int]) -> None:
    """The last refit layer into a residual Add/Sum reproduces the original sum minus the pruned
    model's other branches, so errors along the skip path are compensated rather than carried."""
    feeding: dict[str, list[rec.RefitJob]] = {}
    for job in jobs:
        users = view.consumers.get(job.y_name, [])
        if len(users) != 1 or users[0].op_type not in ("Add", "Sum") or job.y_name in view.graph_outputs:
            continue
        add = users[0]
        shapes = [view.static_shape(i) for i in add.input]
        if any(view.is_const(i) for i in add.input) or len(set(shapes)) != 1 or list(add.input).count(job.y_name) != 1:
            continue
        feeding.setdefault(add.name, []).append(job)
    for add_name, candidates in feeding.items():
        add = view.node_by_name(add_name)
        job = max(candidates, key=lambda j: order[j.node])
        job.residual = [i for i in add.input if i != job.y_name]
        job.target = add.output[0]


def _report(original, pruned, analysis: Analysis, pruned_groups, jobs, info, shapes: dict | None) -> list[Change]:
    """Each pruned group's change, its costs at `shapes` (the calibration's: a dynamic dim read
    as 1 would count a sequence model's MACs per position)."""
    before, after = model_cost(original, shapes).by_name(), model_cost(pruned, shapes).by_name()
    by_job = {j.node: j for j in jobs}
    changes = []
    for g, kept in pruned_groups:
        nodes = [n for n in g.nodes if n in before]
        cost_b = {k: sum(getattr(before[n], k) for n in nodes) for k in ("params", "macs", "bytes")}
        cost_a = {k: sum(getattr(after[n], k) for n in nodes if n in after) for k in ("params", "macs", "bytes")}
        refit = [by_job[c] for c in g.consumers if c in by_job and by_job[c].error_after is not None]
        err = _pooled([(j.error_after if j.verdict is None or j.verdict.kept else j.error_before, j) for j in refit])
        err0 = _pooled([(j.error_before, j) for j in refit])
        judged = [j.verdict for j in refit if j.verdict is not None]
        held = _pooled([(v.refit.held_out, None) for v in judged])
        held0 = _pooled([(v.plain.held_out, None) for v in judged])
        kept_t = {t: int(np.count_nonzero(kept[u])) for t, u in g.tensors.items()}
        detail = {"members": list(g.tensors), "producers": g.producers, "consumers": g.consumers,
                  "units_before": g.n_units, "units_after": int(kept.sum()),
                  "channels_before": g.channels(), "channels_after": kept_t,
                  "macs_before": cost_b["macs"], "macs_after": cost_a["macs"],
                  "error_sliced": err0, "error_refit": err, "error_sliced_held_out": held0,
                  "error_refit_held_out": held, "refits_fell_back": [j.node for j in refit
                                                                     if j.verdict is not None and not j.verdict.kept]}
        changes.append(Change(g.name, "channel group", f"pruned {g.n_units}->{int(kept.sum())} channels",
                              cost_b, cost_a, err, detail))
        for entry in info["groups"]:
            if entry["id"] == g.id:
                entry.update({k: detail[k] for k in ("units_after", "channels_after", "macs_before", "macs_after",
                                                     "error_sliced", "error_refit", "error_sliced_held_out",
                                                     "error_refit_held_out")})
    info["refits"] = [{"node": j.node, **j.verdict.detail()} for j in jobs if j.verdict is not None]
    info["macs_before"] = sum(c.macs for c in before.values())
    info["macs_after"] = sum(c.macs for c in after.values())
    info["pruned_groups"] = len(pruned_groups)
    info["frozen_groups"] = sum(1 for g in analysis.groups if g.producers and g.frozen)
    return changes


def _pooled(pairs) -> float | None:
    """Energy-free average of per-layer relative errors (None when nothing was refit)."""
    values = [v for v, _ in pairs if v is not None]
    return float(np.sqrt(np.mean(np.square(values)))) if values else None
