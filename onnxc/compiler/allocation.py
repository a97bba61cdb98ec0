"""Allocation to a target: per-candidate levels across techniques, verified, rolled back per candidate.

Each candidate's levels become steps along its error-for-saving hull (`steps`), taken in
increasing error-per-saving order until the predicted saving reaches the target (or, with only a
budget, until the predicted error fills it); the plan is applied as a whole and verified on
held-out samples. Errors do not add in quadrature in practice (refits downstream compensate
some, rewrites of neighbouring layers compound others), so every verified round bounds the step
count and corrects the predictions for the next (`search.Search`): the steps with the worst
error-per-saving are given back first when the budget is left, more are taken when the target
is missed, and one step that breaks the budget with the others is skipped (one candidate's level
at a time, never a whole technique). A plan that meets the target with room to spare gives back
the top levels the target does not need, costliest error first (`steps.trimmed`; verified, kept
only if better). One node takes one technique per slot (`steps.one_technique_per_node`).
A latency plan then stores the weights it left float (too sensitive or too small for int8) by a
technique that costs no time, at its mildest level, when the budget holds (`_store_float_weights`):
the written file ships, and its float layers need not keep the original's bytes.
Techniques are known only through `technique.Technique`; none is named here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnxc.compiler import runtime
from onnxc.compiler.cost import model_cost
from onnxc.compiler.model import serialized_bytes
from onnxc.compiler.passes import DEFAULT_BUDGET, PassContext
from onnxc.compiler.samples import Samples
from onnxc.compiler.search import Search
from onnxc.compiler.sensitivity import (
    BYTE_KINDS,
    Plan,
    Table,
    activation_bytes,
    apply_plan,
    first_sample,
    latency_ratio,
    measure,
    totals,
)
from onnxc.compiler.steps import (  # noqa: F401  (the allocator's public names, as tests and plot use them)
    STARVED,
    CostModel,
    Step,
    candidate_nodes,
    hull_steps,
    one_technique_per_node,
    ordered_steps,
    plan_of,
    planning_errors,
    saving_of,
    trimmed,
)
from onnxc.compiler.technique import Technique
from onnxc.compiler.verify import Fidelity, compare_outputs
from onnxc.errors import UsageError

log = logging.getLogger("onnxc.allocation")

KINDS = ("macs", "params", "size", "latency")
# Targets judged by a value the caller measures (`allocate(value_of=...)`, e.g. the linked firmware
# of a microcontroller backend) are planned on the saving that tracks it most closely: its bytes
# on size, its instructions per inference on time (MACs saved, int8 at its speedup), its RAM on
# the peak activation bytes (what pruning and int8 activations shrink, and int8 weights do not).
PLANNED_AS = {"device": "size", "device_instructions": "latency", "device_ram": "activations"}
MAX_ROUNDS = 8
TOLERANCE = 0.01  # a target counts as met within this much of its ratio
# Two models whose interleaved onnxruntime times differ by less than this share run as fast (the
# run-to-run spread of one model on a shared machine).
SAME_SPEED = 0.03
LARGEST_SHARE = 0.8  # a latency plan's float weights stored as codes: the largest ones holding this share


@dataclass(frozen=True)
class Target:
    kind: str
    ratio: float

    def __str__(self) -> str:
        return f"{self.kind}={self.ratio:g}"


def planned_kind(target: Target | None) -> str:
    """The saving a run plans on: the target's kind, the one tracking a measured kind
    (`PLANNED_AS`), or MACs when only a budget is given."""
    kind = target.kind if target else "macs"
    return PLANNED_AS.get(kind, kind)


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
    surrogate_scale: float | None = None  # set when a starved metric was planned on its surrogate

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


def allocate(model: onnx.ModelProto, techniques: dict[str, Technique], ctx: PassContext, target: Target | None,
             budget: float | None, *, input_shapes: dict | None = None, reference_outputs: dict | None = None,
             cache_dir=None, value_of: Callable[[onnx.ModelProto], float] | None = None,
             baseline: onnx.ModelProto | None = None) -> Allocation:
    """Choose per-candidate levels of `techniques` that meet `target` within `budget` on `model`.

    `baseline` is the model a latency ratio is relative to when `model` is not it: the user's
    file, when `model` is its canonical form (whose folded ops can make it faster already; that
    gain counts towards the target, as the user compares with the file they gave).

    `value_of` measures a target kind the compiler does not compute (one of PLANNED_AS: the
    caller's own measure of a model, such as its linked firmware), planned on the saving that
    tracks it and judged on the measured value of every verified plan."""
    source = "--max-error" if budget is not None else "default"
    budget = budget if budget is not None else DEFAULT_BUDGET
    kind = target.kind if target else "macs"
    with runtime.single_threaded_blas():
        table = measure(model, _probes(techniques), ctx, planned_kind(target), input_shapes=input_shapes,
                        cache_dir=cache_dir, target_ratio=target.ratio if target else None)
        return _allocate(model, techniques, ctx, target, budget, source, table, kind, input_shapes,
                         reference_outputs, value_of, baseline)


def _probes(techniques: dict[str, Technique]) -> dict[str, Technique]:
    """The techniques as the sensitivity sweep runs them (`Technique.probe`)."""
    return {t: p.probe() for t, p in techniques.items()}


def _allocate(model, techniques, ctx, target, budget, source, table, kind, input_shapes, reference_outputs,
              value_of=None, baseline=None):
    val = ctx.calibration.validation
    nodes_of = candidate_nodes(table)
    errors, surrogate_scale = planning_errors(table)
    judged = val
    if surrogate_scale is not None and ctx.metric is not None and ctx.calibration.train.count:
        # A starved metric counts too few held-out samples to see what a plan changes (one step
        # can be several times the budget): plans are judged on every calibration sample, the
        # fitted ones too, whose steps are finer (the report's fidelity says on how many).
        judged = Samples(list(ctx.calibration.train.groups) + list(val.groups))
        ref = runtime.run(baseline if baseline is not None else model, judged)
    else:
        ref = reference_outputs if reference_outputs is not None else runtime.run(model, val)
    planned = planned_kind(target)
    steps = ordered_steps(table, planned, errors)
    costs = CostModel.of(model, table, planned, ctx.calibration) if planned not in BYTE_KINDS else None
    base_latency = baseline_latency = None
    feed = first_sample(val)
    if kind == "latency":
        from onnxc.compiler.bench import bench

        timed = bench([model] if baseline is None else [model, baseline], feed, runs=30, warmup=3, threads=1)
        base_latency, baseline_latency = timed[0].p10_ms, timed[-1].p10_ms
    base_value = value_of(model) if value_of is not None else _value(model, kind, ctx.calibration, base_latency)
    # savings are planned in another unit than the target's: latency in MACs, a measured value in
    # what tracks it; one unit of the plan is worth this much of the target at the model's rate
    per_unit = 1.0
    if planned == "latency":
        per_unit = base_value / max(_value(model, "macs", ctx.calibration, None), 1.0)
    elif planned != kind:
        per_unit = base_value / max(_value(model, planned, ctx.calibration, None), 1.0)
    # ratios are to the baseline's latency: what `model` already gains on it is saved before any step
    head_start = 0.0
    if baseline_latency is not None and value_of is None:
        head_start, base_value = baseline_latency - base_latency, baseline_latency

    def predictions(steps: list[Step]) -> tuple[np.ndarray, np.ndarray]:
        """Predicted saving (of the target kind) and squared error after each prefix of `steps`;
        latency as MACs saved at the model's milliseconds per MAC."""
        saved = costs.savings(steps) if costs is not None else np.cumsum([0.0] + [s.saving for s in steps])
        saved = saved * per_unit + head_start
        return saved, np.cumsum([0.0] + [s.error2 for s in steps])

    if steps:
        k = Search(*predictions(steps), base_value, target, budget).first()
        steps = one_technique_per_node(steps, nodes_of, steps[max(k, 1) - 1].slope, techniques)
    cum_save, cum_err2 = predictions(steps)
    search = Search(cum_save, cum_err2, base_value, target, budget)
    k = search.first()

    def fidelity(candidate: onnx.ModelProto) -> tuple[Fidelity, float]:
        """The candidate's fidelity on the judged samples and its error (inf when it does not run)."""
        fid = compare_outputs(ref, runtime.run(candidate, judged), ctx.metric)
        return fid, (fid.error if np.isfinite(fid.rel_l2) else math.inf)

    def verify(plan: Plan):
        """The plan applied and judged: the model, the passes' results, fidelity, error, the
        achieved value of the target kind, its ratio to the original's, whether the target is met."""
        candidate, results = apply_plan(model, plan, techniques, ctx, input_shapes)
        fid, error = fidelity(candidate)
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
    for index in range(MAX_ROUNDS):
        # a log shows where a long run is between the sweep's ETA and the end (an upper bound:
        # the search often stops sooner, and the phase then jumps to its end)
        ctx.progress("allocation: rounds", index, MAX_ROUNDS)
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
    ctx.progress("allocation: rounds", MAX_ROUNDS, MAX_ROUNDS)
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
                best_steps = kept
    if best is not None and kind == "latency" and value_of is None:
        def judge(candidate: onnx.ModelProto) -> tuple[Fidelity, float, float]:
            """Fidelity and error on the judged samples, and time over the plan's (interleaved)."""
            return (*fidelity(candidate), latency_ratio(best[1], candidate, feed))

        predicted = float(math.sqrt(predictions(best_steps)[1][-1]))
        for technique, levels, candidate, results, (fid, error, slower) in _store_float_weights(
                best[1], techniques, ctx, input_shapes, judge):
            # a difference within the timing noise leaves the plan's measured ratio standing
            kept = error <= budget and slower <= 1.0 + SAME_SPEED
            rounds.append(Round(len(best_steps), predicted, float(error), float(best[4] * slower),
                                f"{technique} on {len(levels)} layers left float ({slower:.3f}x the plan's time): "
                                + ("kept" if kept else "not kept")))
            if kept:
                plan = {**best[2], **{(technique, name): level for name, level in levels.items()}}
                best = (best[0], candidate, plan, fid, best[4], best[5], best[6] + results)
                break
    if best is None:
        fid, _ = fidelity(model)
        ratio = 1.0 - head_start / base_value if base_value else 1.0
        best = (None, model, {}, fid, ratio, target is None or ratio <= target.ratio + TOLERANCE, [])
    _, out, plan, fid, ratio, met, results = best
    alloc = Allocation(out, plan, fid, target, budget, source, float(ratio), bool(met), table, rounds, results,
                       costs=costs, steps=steps, surrogate_scale=surrogate_scale)
    if plan and value_of is None:
        alloc.realization = realization(model, out, ctx.calibration, feed)
    return alloc


def _store_float_weights(model: onnx.ModelProto, techniques: dict[str, Technique], ctx: PassContext,
                         input_shapes: dict | None, judge: Callable) -> Iterator[tuple]:
    """The weights a latency plan leaves float (a layer too sensitive or too small for int8, or
    no int8 at all), stored by a technique that costs no time (codes onnxruntime decodes once, at
    session start) at its mildest level, applied as any plan is (`apply_plan`): the written model
    is as fast, and smaller. Yields (technique, {candidate: level}, model, [(technique, pass
    result)], judge(model)) for every float weight, then for the largest ones holding
    LARGEST_SHARE of their bytes (a network's most sensitive layers, its first and last, tend to
    be small), until the caller stops (it keeps the first one within the budget and as fast).
    Nothing when no such technique or weight is there."""
    storage = [t for t, p in techniques.items() if p.slot == "storage" and "size" in p.saves
               and "latency" not in p.saves]
    if not storage:
        return
    technique = techniques[storage[0]]
    shapes = ctx.cost_shapes()
    names = [c.name for c in technique.plan_candidates(model, shapes)]
    weight = {n.name: n.bytes for n in model_cost(model, shapes).layers}
    names.sort(key=lambda n: -weight.get(n, 0))
    held = np.cumsum([weight.get(n, 0) for n in names])
    largest = names[:int(np.searchsorted(held, LARGEST_SHARE * held[-1])) + 1] if names else []
    for chosen in (names, largest) if len(largest) < len(names) else (names,):
        levels = {name: technique.levels()[0] for name in chosen}
        stored, results = apply_plan(model, {(storage[0], name): level for name, level in levels.items()},
                                     {storage[0]: technique}, ctx, input_shapes)
        if any(result.modified for _, result in results):
            yield storage[0], levels, stored, results, judge(stored)


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
    if kind == "activations":
        return float(activation_bytes(model, cal))
    return float(totals(model, cal)[kind])
