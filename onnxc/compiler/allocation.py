"""Allocation to a target: per-candidate levels across techniques, verified, rolled back per candidate.

From the sensitivity table, each candidate's (saving, error^2) points form a lower convex hull
starting at "untouched"; its segments are the steps from one level to the next with their
error-per-saving. Taking steps in increasing error-per-saving order over all candidates is the
Lagrangian solution of "most saving for least error" when errors add in quadrature (independent
perturbations of the outputs). Steps are taken until the predicted saving reaches the target
(or, with only a budget, until the predicted error fills it); the plan is applied as a whole
and verified on held-out samples. Savings of rewrites that touch one node multiply there
(`CostModel`); errors do not add in quadrature in practice (refits downstream compensate some,
rewrites of neighbouring layers compound others), so every verified round bounds the step count
and corrects the predictions for the next (`_Search`): the steps with the worst error-per-saving are given back
first when the budget is left, more are taken when the target is missed, and one step that
breaks the budget with the others is skipped (one candidate's level at a time, never a whole
technique). A plan that meets the target with room to spare gives back the top levels the
target does not need, costliest error first (`trimmed`; verified, kept only if better): the
search verifies prefixes, and a prefix ends with a whole step. One node is reshaped by one
technique per slot (`one_technique_per_node`): a factorization's error was measured on
the unpruned layer, at ranks that mean something else on a pruned one. Techniques are known only
through `technique.Technique`; none is named here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnxc.compiler import runtime
from onnxc.compiler.model import serialized_bytes
from onnxc.compiler.passes import DEFAULT_BUDGET, PassContext
from onnxc.compiler.sensitivity import (
    Plan,
    Table,
    apply_plan,
    first_sample,
    latency_ratio,
    measure,
    node_costs,
    totals,
)
from onnxc.compiler.technique import Technique
from onnxc.compiler.verify import Fidelity, compare_outputs
from onnxc.errors import UsageError

log = logging.getLogger("onnxc.allocation")

KINDS = ("macs", "params", "size", "latency")
# Targets judged by a value the caller measures (`allocate(value_of=...)`, e.g. the linked firmware
# of a microcontroller backend) are planned on the saving that tracks it most closely.
PLANNED_AS = {"device": "size"}
MAX_ROUNDS = 8
TOLERANCE = 0.01  # a target counts as met within this much of its ratio


@dataclass(frozen=True)
class Target:
    kind: str
    ratio: float

    def __str__(self) -> str:
        return f"{self.kind}={self.ratio:g}"


def parse_target(text: str) -> Target:
    """`macs=0.5` -> Target("macs", 0.5)."""
    kind, eq, value = str(text).partition("=")
    kind = kind.strip().lower()
    if not eq or kind not in KINDS:
        raise UsageError(f"--target expects KIND=RATIO with KIND one of {', '.join(KINDS)}, got '{text}'")
    try:
        ratio = float(value)
    except ValueError:
        raise UsageError(f"--target {kind}: ratio must be a number, got '{value}'") from None
    if not 0 < ratio < 1:
        raise UsageError(f"--target {kind}: ratio must be in (0, 1), got {ratio:g}")
    return Target(kind, ratio)


@dataclass
class Step:
    """Moving one candidate from one level to the next on its hull."""

    technique: str
    name: str
    level: float
    saving: float  # of the target kind, added by this step
    error2: float  # squared error added by this step

    @property
    def slope(self) -> float:
        return self.error2 / self.saving if self.saving > 0 else math.inf


@dataclass
class Round:
    steps: int
    predicted_error: float
    error: float
    ratio: float  # achieved fraction of the target kind
    action: str = ""


@dataclass
class Allocation:
    model: onnx.ModelProto
    plan: Plan
    fidelity: Fidelity | None
    target: Target | None
    budget: float
    budget_source: str
    achieved: float
    met: bool
    table: Table
    rounds: list[Round] = field(default_factory=list)
    results: list = field(default_factory=list)  # (technique, PassResult) of the final apply
    realization: dict | None = None  # measured latency ratio, MACs ratio, speedup / MAC reduction
    costs: CostModel | None = None  # how the predicted savings were combined (macs, params, latency)
    steps: list[Step] = field(default_factory=list)  # the steps searched over, in order (after conflicts)
    surrogate_scale: float | None = None  # set when a starved metric was planned on the default error

    def untouched(self) -> dict[str, list[str]]:
        """Per technique, the measured candidates the plan leaves as they were (layers kept float,
        groups kept whole), so a report says what each technique did not touch and the table why."""
        out: dict[str, list[str]] = {}
        for m in self.table.measurements:
            if (m.technique, m.name) not in self.plan and m.name not in out.setdefault(m.technique, []):
                out[m.technique].append(m.name)
        return out

    def to_dict(self) -> dict:
        chosen = {f"{t}:{n}": level for (t, n), level in sorted(self.plan.items())}
        rows = [{**asdict(m), "chosen": self.plan.get((m.technique, m.name)) == m.level}
                for m in self.table.measurements]
        return {"target": str(self.target) if self.target else None, "budget": self.budget,
                "budget_source": self.budget_source, "achieved": self.achieved, "met": self.met,
                "chosen": chosen, "untouched": self.untouched(), "rounds": [asdict(r) for r in self.rounds],
                "realization": self.realization, "surrogate_scale": self.surrogate_scale,
                "sensitivity": {**{k: v for k, v in self.table.to_dict().items() if k != "measurements"},
                                "measurements": rows}}


def hull_steps(points: list[tuple[float, float, float]], technique: str, name: str) -> list[Step]:
    """Steps along the lower convex hull of (saving, error^2, level) from (0, 0): the levels worth
    taking, each with a larger error-per-saving than the one before."""
    pts = sorted((p for p in points if p[0] > 0 and math.isfinite(p[1])), key=lambda p: (p[0], p[1]))
    hull: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)]
    for p in pts:
        if p[0] == hull[-1][0]:
            continue  # same saving, no less error
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:  # hull[-1] on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return [Step(technique, name, b[2], b[0] - a[0], max(b[1] - a[1], 0.0)) for a, b in zip(hull, hull[1:])]


def saving_of(row_saving: dict, kind: str) -> float:
    """What a measurement saves of `kind`; latency is planned in MACs at the original layers'
    speed (`Technique.latency_saving`; rows without it: the MACs removed)."""
    if kind == "latency":
        return float(row_saving.get("latency", row_saving.get("macs", 0)) or 0)
    return float(row_saving.get("bytes" if kind == "size" else kind, 0) or 0)


def one_technique_per_node(steps: list[Step], nodes_of: dict[tuple[str, str], list[str]], slope: float,
                           techniques: dict[str, Technique]) -> list[Step]:
    """`steps` without the candidates that lose a node shared by two techniques that reshape it.

    Each level's error was measured alone on the original layers. A factorization that keeps t
    of a layer's MACs, applied after pruning that layer, keeps t of what pruning left: ranks far
    below the measured ones, at an error nobody measured, and extra nodes that run slower than
    either rewrite alone. So one node takes one technique per slot (`Technique.slot`: structure,
    storage); candidates of one technique that `composes` (channel groups) may share nodes.

    Which one keeps a contested node is the Lagrangian choice at the plan's marginal
    error-per-saving `slope` (that of the step where the unconstrained plan meets the target):
    each candidate is worth the least of error^2 - slope * saving over its hull levels at or
    under that slope. A candidate of a technique that does not compose (one layer) is kept where
    it is worth more than each other technique's candidates on its nodes together (those are
    dropped), else it is dropped. Taking the steps in order instead would let a cheap first step
    of one layer's factorization block the channel groups around it, which may save far more
    further on.
    """
    value: dict[tuple[str, str], float] = {}
    sums: dict[tuple[str, str], tuple[float, float]] = {}
    for s in steps:  # per candidate, its hull steps come in increasing slope order
        key = (s.technique, s.name)
        e2, saved = sums.get(key, (0.0, 0.0))
        e2, saved = e2 + s.error2, saved + s.saving
        sums[key] = (e2, saved)
        value[key] = min(value.get(key, 0.0), e2 - slope * saved)
    known = [key for key in value if key[0] in techniques]
    at: dict[tuple[str, str], list[tuple[str, str]]] = {}  # (slot, node) -> the candidates there
    for key in known:
        for n in nodes_of.get(key, [key[1]]):
            at.setdefault((techniques[key[0]].slot, n), []).append(key)
    rivals: dict[tuple[str, str], dict[str, list[tuple[str, str]]]] = {}
    for key in sorted(known):
        if techniques[key[0]].composes:
            continue
        found: dict[str, list[tuple[str, str]]] = {}
        for n in nodes_of.get(key, [key[1]]):
            for other in at.get((techniques[key[0]].slot, n), ()):
                if other[0] != key[0] and other not in found.setdefault(other[0], []):
                    found[other[0]].append(other)
        if any(found.values()):
            rivals[key] = {t: keys for t, keys in found.items() if keys}
    dropped: set[tuple[str, str]] = set()

    def advantage(key: tuple[str, str]) -> float:
        return value[key] - sum(value[g] for keys in rivals[key].values() for g in keys)

    for key in sorted(rivals, key=lambda k: (advantage(k), k)):
        if key in dropped:
            continue
        for keys in rivals[key].values():
            left = [g for g in keys if g not in dropped]
            if left and value[key] < sum(value[g] for g in left):
                dropped.update(left)
            elif left:
                dropped.add(key)
                break
    return [s for s in steps if (s.technique, s.name) not in dropped]


def candidate_nodes(model: onnx.ModelProto, techniques: dict[str, Technique], table: Table,
                    ) -> dict[tuple[str, str], list[str]]:
    """The nodes each candidate rewrites, as its technique names them (a layer: itself)."""
    touches: dict[tuple[str, str], list[str]] = {}
    measured = {(m.technique, m.name) for m in table.measurements}
    for technique, p in techniques.items():
        if not any(t == technique for t, _ in measured):
            continue
        for c in p.plan_candidates(model):
            touches[(technique, c.name)] = list(dict.fromkeys(c.nodes))
    for m in table.measurements:
        touches.setdefault((m.technique, m.name), [m.name])
    return touches


# A user metric that reads 0 on at least this share of the rewrites its surrogate sees is starved.
STARVED = 0.5


def planning_errors(table: Table) -> tuple[dict[tuple[str, str, float], float], float | None]:
    """The error each measurement is planned with, and the surrogate's scale when it replaces a
    starved metric (None: the measured errors as they are).

    A user metric over a few held-out samples moves in whole steps (1/N of the samples): most
    single rewrites read 0 and the search has nothing to rank by, predicting 0 for every plan.
    Then candidates are ranked by the default error measured in the same runs (continuous:
    per output channel, probabilities as logits), scaled to the metric by the ratio of their
    sums where both are non-zero. The budget is still judged by the metric on every verified
    plan, and each verified round corrects the scale."""
    errors = {m.key: m.error for m in table.measurements}
    rows = [m for m in table.measurements if m.applied and m.surrogate is not None and math.isfinite(m.error)]
    silent = sum(1 for m in rows if m.error == 0 and m.surrogate > 0)
    if not rows or silent < STARVED * len(rows):
        return errors, None
    both = [(m.error, m.surrogate) for m in rows if m.error > 0 and m.surrogate > 0]
    scale = sum(e for e, _ in both) / sum(s for _, s in both) if both else 1.0
    errors.update({m.key: m.surrogate * scale for m in rows})
    return errors, scale


def ordered_steps(table: Table, kind: str, errors: dict | None = None) -> list[Step]:
    """Every candidate's hull steps, in increasing error-per-saving order (`errors`: the error
    each measurement is planned with, default its own)."""
    by_candidate: dict[tuple[str, str], list] = {}
    for m in table.measurements:
        if m.applied:
            error = errors[m.key] if errors is not None else m.error
            by_candidate.setdefault((m.technique, m.name), []).append((saving_of(m.saving, kind), error ** 2,
                                                                       m.level))
    steps = []
    for (technique, name), points in by_candidate.items():
        steps += hull_steps(points, technique, name)
    return sorted(steps, key=lambda s: s.slope)


@dataclass
class CostModel:
    """The predicted cost of a plan: every node's cost times what each rewrite of the plan keeps
    of it. Rewrites of one node multiply: a 1x1 conv between two groups pruned by r1 and r2 keeps
    (1 - r1)(1 - r2) of its MACs (summing the groups' savings alone would count r1 * r2 twice), and
    a layer factorized to keep t of its MACs after pruning keeps t of what pruning left. What a
    rewrite keeps of its nodes is read from its measured saving alone, so channel rounding and
    levels a technique could not apply are in it."""

    node_cost: dict[str, float]  # node -> its cost of the planned kind
    touches: dict[tuple[str, str], list[str]]  # (technique, candidate) -> the nodes whose cost it scales
    kept: dict[tuple[str, str, float], float] = field(default_factory=dict)  # (technique, name, level) -> kept

    @classmethod
    def of(cls, model: onnx.ModelProto, techniques: dict[str, Technique], table: Table, kind: str, cal,
           nodes_of: dict[tuple[str, str], list[str]] | None = None) -> CostModel:
        node_cost = node_costs(model, cal, kind)
        nodes_of = nodes_of if nodes_of is not None else candidate_nodes(model, techniques, table)
        touches = {key: [n for n in nodes if node_cost.get(n)] for key, nodes in nodes_of.items()}
        costs = cls(node_cost, touches)
        for m in table.measurements:
            nodes = touches.setdefault((m.technique, m.name), [])
            total = sum(node_cost[n] for n in nodes)
            if m.applied and total > 0:
                costs.kept[m.key] = min(max(1.0 - saving_of(m.saving, kind) / total, 0.0), 1.0)
        return costs

    def savings(self, steps: list[Step]) -> np.ndarray:
        """The predicted saving after each prefix of `steps` (0 for none)."""
        scale = dict.fromkeys(self.node_cost, 1.0)
        level: dict[tuple[str, str], float] = {}
        saved, out = 0.0, [0.0]
        for s in steps:
            key = (s.technique, s.name)
            old = self.kept.get((*key, level[key]), 1.0) if key in level else 1.0
            new = self.kept.get((*key, s.level), 1.0)
            level[key] = s.level
            for node in self.touches.get(key, ()):
                before = scale[node]
                scale[node] = before * new / max(old, 1e-12)
                saved += self.node_cost[node] * (before - scale[node])
            out.append(saved)
        return np.array(out)


def trimmed(steps: list[Step], saving_of_steps, wanted: float) -> list[Step]:
    """`steps` without the top levels the target does not need, costliest error first.

    The search verifies prefixes of the steps in error-per-saving order, so the plan that meets
    a target ends with a whole step however little of it the target needed (one large step can
    overshoot the target by far). Giving back a candidate's top
    level (its last step in the plan) while the predicted saving (`saving_of_steps`, corrected
    by the verified round) still covers `wanted` spends less error for the same target; the
    result is verified like any round and kept only if it is better."""
    kept = list(steps)
    while True:
        last = {(s.technique, s.name): i for i, s in enumerate(kept)}
        for i in sorted(last.values(), key=lambda i: -kept[i].error2):
            trial = kept[:i] + kept[i + 1:]
            if saving_of_steps(trial) >= wanted:
                kept = trial
                break
        else:
            return kept


def plan_of(steps: list[Step]) -> Plan:
    plan: Plan = {}
    for s in steps:
        plan[(s.technique, s.name)] = s.level
    return plan


def allocate(model: onnx.ModelProto, techniques: dict[str, Technique], ctx: PassContext, target: Target | None,
             budget: float | None, *, input_shapes: dict | None = None, reference_outputs: dict | None = None,
             cache_dir=None, value_of: Callable[[onnx.ModelProto], float] | None = None) -> Allocation:
    """Choose per-candidate levels of `techniques` that meet `target` within `budget` on `model`.

    `value_of` measures a target kind the compiler does not compute (one of PLANNED_AS: the
    caller's own measure of a model, such as its linked firmware), planned on the saving that
    tracks it and judged on the measured value of every verified plan."""
    source = "--max-error" if budget is not None else "default"
    budget = budget if budget is not None else DEFAULT_BUDGET
    kind = target.kind if target else "macs"
    with runtime.single_threaded_blas():
        table = measure(model, _probes(techniques), ctx, PLANNED_AS.get(kind, kind), input_shapes=input_shapes,
                        cache_dir=cache_dir, target_ratio=target.ratio if target else None)
        return _allocate(model, techniques, ctx, target, budget, source, table, kind, input_shapes,
                         reference_outputs, value_of)


def _probes(techniques: dict[str, Technique]) -> dict[str, Technique]:
    """The techniques as the sensitivity sweep runs them (`Technique.probe`)."""
    return {t: p.probe() for t, p in techniques.items()}


def _allocate(model, techniques, ctx, target, budget, source, table, kind, input_shapes, reference_outputs,
              value_of=None):
    val = ctx.calibration.validation
    ref = reference_outputs if reference_outputs is not None else runtime.run(model, val)
    nodes_of = candidate_nodes(model, techniques, table)
    errors, surrogate_scale = planning_errors(table)
    planned = PLANNED_AS.get(kind, kind)
    steps = ordered_steps(table, planned, errors)
    costs = CostModel.of(model, techniques, table, planned, ctx.calibration, nodes_of) if planned != "size" else None
    base_latency = None
    feed = first_sample(val)
    if kind == "latency":
        from onnxc.compiler.bench import bench

        base_latency = bench([model], feed, runs=30, warmup=3, threads=1)[0].p10_ms
    base_value = value_of(model) if value_of is not None else _value(model, kind, ctx.calibration, base_latency)
    # savings are planned in another unit than the target's: latency in MACs, a measured value in
    # what tracks it; one unit of the plan is worth this much of the target at the original's rate
    per_unit = 1.0
    if kind == "latency":
        per_unit = base_value / max(_value(model, "macs", ctx.calibration, None), 1.0)
    elif planned != kind:
        per_unit = base_value / max(_value(model, planned, ctx.calibration, None), 1.0)

    def predictions(steps: list[Step]) -> tuple[np.ndarray, np.ndarray]:
        """Predicted saving (of the target kind) and squared error after each prefix of `steps`;
        latency as MACs saved at the model's milliseconds per MAC."""
        saved = costs.savings(steps) if costs is not None else np.cumsum([0.0] + [s.saving for s in steps])
        saved = saved * per_unit
        return saved, np.cumsum([0.0] + [s.error2 for s in steps])

    if steps:
        k = _Search(*predictions(steps), base_value, target, budget).first()
        steps = one_technique_per_node(steps, nodes_of, steps[max(k, 1) - 1].slope, techniques)
    cum_save, cum_err2 = predictions(steps)
    search = _Search(cum_save, cum_err2, base_value, target, budget)
    k = search.first()

    def verify(plan: Plan):
        """The plan applied and judged: the model, the passes' results, fidelity, error, the
        achieved value of the target kind, its ratio to the original's, whether the target is met."""
        candidate, results = apply_plan(model, plan, techniques, ctx, input_shapes)
        fid = compare_outputs(ref, runtime.run(candidate, val), ctx.metric)
        error = fid.error if np.isfinite(fid.rel_l2) else math.inf
        if value_of is not None:
            value = value_of(candidate)
        elif kind == "latency":
            value = base_latency * latency_ratio(model, candidate, feed)
        else:
            value = _value(candidate, kind, ctx.calibration, None)
        ratio = value / base_value if base_value else 1.0
        met = target is None or ratio <= target.ratio + TOLERANCE
        return candidate, results, fid, error, value, ratio, met

    rounds: list[Round] = []
    best = None  # (ranking key, allocation pieces)
    best_steps: list[Step] = []
    for _ in range(MAX_ROUNDS):
        plan = plan_of(steps[:k])
        candidate, results, fid, error, value, ratio, met = verify(plan)
        round_ = Round(k, float(math.sqrt(cum_err2[k])), float(error), float(ratio))
        rounds.append(round_)
        if error <= budget:
            key = (met, -error if met else -ratio)
            if best is None or key > best[0]:
                best = (key, candidate, plan, fid, ratio, met, results)
                best_steps = steps[:k]
        k, round_.action = search.next(k, error, base_value - value, met, ratio)
        if k is None and search.blocked():
            # the step after the most within the budget breaks it together with the others (its
            # error alone said otherwise): skip it and what its candidate would take after it
            bad = steps[search.over - 1]
            steps = steps[:search.over - 1] + [s for s in steps[search.over:]
                                               if (s.technique, s.name) != (bad.technique, bad.name)]
            cum_save, cum_err2 = predictions(steps)
            search = search.without_step(cum_save, cum_err2)
            k = search.resume()
            round_.action = (f"{bad.technique}:{bad.name} at {bad.level:g} leaves the budget with the steps before "
                             f"it: skip it, try {k} steps")
        if k is None:
            break
    if best is not None and best[5] and target is not None:  # met: give back what the target does not need
        predicted, saved = predictions(best_steps)[0][-1], base_value * (1.0 - best[4])
        scale = saved / predicted if predicted > 0 and saved > 0 else 1.0
        kept = trimmed(best_steps, lambda trial: predictions(trial)[0][-1] * scale, search.wanted)
        if len(kept) < len(best_steps):
            plan = plan_of(kept)
            candidate, results, fid, error, _, ratio, met = verify(plan)
            better = met and error <= budget and error < best[3].error
            gave = ", ".join(f"{s.technique}:{s.name} at {s.level:g}" for s in best_steps if s not in kept)
            rounds.append(Round(len(kept), float(math.sqrt(predictions(kept)[1][-1])), float(error),
                                float(ratio), f"trimmed {gave}: " + ("kept" if better else "not kept")))
            if better:
                best = ((met, -error), candidate, plan, fid, ratio, met, results)
    if best is None:
        fid = compare_outputs(ref, runtime.run(model, val), ctx.metric)
        best = (None, model, {}, fid, 1.0, target is None, [])
    _, out, plan, fid, ratio, met, results = best
    alloc = Allocation(out, plan, fid, target, budget, source, float(ratio), bool(met), table, rounds, results,
                       costs=costs, steps=steps, surrogate_scale=surrogate_scale)
    if plan and value_of is None:
        alloc.realization = realization(model, out, ctx.calibration, feed)
    return alloc


class _Search:
    """Which step count to verify next. Verified rounds bound it: the most steps known within the
    budget (`ok`) and the fewest known over it (`over`); with a target, the most known short of
    it (`short`) and the fewest known to meet it (`enough`). The next count comes from the
    predictions corrected by the last round (its measured error over the predicted one, its
    measured saving over the predicted one), kept strictly inside the bounds, else from
    bisecting them. Predicted errors add in quadrature and are often far off (refits compensate
    some errors, neighbouring rewrites compound others), so the correction matters.
    The aim: the fewest steps that meet the target within the budget, else the most steps
    within the budget; with only a budget, the most steps within it. When one step after the
    most within the budget breaks it (`blocked`), the allocator takes that step out and searches
    on without it: one rewrite that is harmless alone can compound with the others far beyond
    what its own measurement said, and the steps after it may still reach the target."""

    def __init__(self, cum_save: np.ndarray, cum_err2: np.ndarray, base_value: float, target: Target | None,
                 budget: float):
        self.cum_save, self.cum_err2, self.budget, self.target = cum_save, cum_err2, budget, target
        self.n = len(cum_save) - 1
        self.wanted = (1 - target.ratio) * base_value if target is not None else None
        self.ok, self.over, self.short, self.enough = 0, self.n + 1, 0, None
        self.seen: set[int] = set()
        self.save_scale = 1.0

    def blocked(self) -> bool:
        """The target is out of reach because the one step after the most within the budget breaks it."""
        return (self.target is not None and self.enough is None and self.over == self.ok + 1
                and self.over <= self.n)

    def without_step(self, cum_save: np.ndarray, cum_err2: np.ndarray) -> _Search:
        """The search over a step list with step `over` taken out (the steps up to `ok` are the same)."""
        out = _Search(cum_save, cum_err2, 0.0, self.target, self.budget)
        out.wanted, out.save_scale = self.wanted, self.save_scale
        out.ok, out.short = self.ok, self.short
        out.seen = {k for k in self.seen if k <= self.ok}
        return out

    def resume(self) -> int | None:
        """The first count to verify after `without_step`: the target's, as corrected so far."""
        k = max(self._count_for(self.wanted, self.save_scale), self.ok + 1)
        return k if k <= self.n else None

    def first(self) -> int:
        if self.target is not None:
            return self._count_for(self.wanted, 1.0)
        return self._count_within(0.8 * self.budget, 1.0)

    def _count_for(self, saving: float, scale: float) -> int:
        """The fewest steps predicted (times `scale`) to save `saving`."""
        return int(min(np.searchsorted(self.cum_save * scale, saving - 1e-9), self.n))

    def _count_within(self, error: float, scale: float) -> int:
        """The most steps predicted (times `scale`) to stay within `error`."""
        return int(np.searchsorted(self.cum_err2 * scale ** 2, error ** 2, side="right") - 1)

    def next(self, k: int, error: float, saved: float, met: bool, ratio: float) -> tuple[int | None, str]:
        """The next step count after verifying `k` steps (None: stop), and why."""
        self.seen.add(k)
        predicted_error = math.sqrt(self.cum_err2[k])
        error_scale = error / predicted_error if predicted_error > 0 and math.isfinite(error) else None
        save_scale = saved / self.cum_save[k] if self.cum_save[k] > 0 and saved > 0 else None
        self.save_scale = save_scale or self.save_scale
        within = error <= self.budget
        if within:
            self.ok = max(self.ok, k)
        else:
            self.over = min(self.over, k)
        if self.target is not None and within:
            if met:
                self.enough = k if self.enough is None else min(self.enough, k)
            else:
                self.short = max(self.short, k)
        if self.target is not None and not within:
            lo, hi = self.ok, self.over  # the target needs more than `over` allows: most within
            guess = self._count_within(0.9 * self.budget, error_scale) if error_scale else None
            why = f"error {error:.3g} over budget {self.budget:g}"
        elif self.target is not None and self.enough is None:
            lo, hi = self.short, self.over
            guess = self._count_for(self.wanted, save_scale) if save_scale else None
            why = f"saved {saved / self.wanted:.0%} of what the target needs"
            if guess is not None and guess >= self.over:  # out of reach within the budget: most within it
                if error >= 0.9 * self.budget:
                    return None, ""
                lo, guess = self.ok, self._count_within(self.budget, error_scale) if error_scale else None
                why += f", more than {self.over} steps (over the budget)"
        elif self.target is not None:
            if met and ratio >= self.target.ratio - 0.05:
                return None, ""  # met close to the target: fewer steps would not save much error
            lo, hi = self.short, self.enough  # met: the fewest steps that still meet it
            guess = self._count_for(self.wanted, save_scale) if save_scale else None
            why = "target met" if met else "short of the target"
        else:
            if within and error >= 0.8 * self.budget:
                return None, ""
            lo, hi = self.ok, self.over
            guess = self._count_within(0.9 * self.budget, error_scale) if error_scale else None
            why = f"error {error:.3g} against budget {self.budget:g}"
        if hi - lo <= 1:
            return None, ""
        if guess is None or not lo < guess < hi or guess in self.seen:
            guess = (lo + hi) // 2
        if guess in self.seen:
            return None, ""
        return guess, f"{why}: try {guess} steps (known: {lo} .. {hi})"


def realization(before: onnx.ModelProto, after: onnx.ModelProto, cal, feed: dict) -> dict:
    """Measured onnxruntime speedup against the MAC reduction (1.0: every MAC saved is time saved)."""
    macs = totals(after, cal)["macs"] / max(totals(before, cal)["macs"], 1)
    latency = latency_ratio(before, after, feed)
    efficiency = (1 / latency) / (1 / macs) if latency > 0 and macs > 0 else None
    return {"latency_ratio": latency, "macs_ratio": macs, "efficiency": efficiency}


def _value(model: onnx.ModelProto, kind: str, cal, latency: float | None) -> float:
    """What a target of `kind` is judged on. `size` is the file (tensors plus nodes, names and
    shapes: the unpack subgraphs of clustered weights and their value_info are not free)."""
    if kind == "latency":
        return float(latency)
    if kind == "size":
        return float(serialized_bytes(model))
    return float(totals(model, cal)[kind])
