"""Allocation to a target: per-candidate levels across techniques, verified, rolled back per candidate.

From the sensitivity table, each candidate's (saving, error^2) points form a lower convex hull
starting at "untouched"; its segments are the steps from one level to the next with their
error-per-saving. Taking steps in increasing error-per-saving order over all candidates is the
Lagrangian solution of "most saving for least error" when errors add in quadrature (independent
perturbations of the outputs). Steps are taken until the predicted saving reaches the target
(or, with only a budget, until the predicted error fills it); the plan is applied as a whole
and verified on held-out samples. When the verified error leaves the budget, the steps with the
worst error-per-saving are given back first (one candidate's level at a time, never a whole
technique); when the target is missed because rewrites overlap (a pruned layer saves less when
factorized too), more steps are taken.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnxc.compiler import runtime
from onnxc.compiler.model import serialized_bytes
from onnxc.compiler.passes import DEFAULT_BUDGET, Pass, PassContext
from onnxc.compiler.sensitivity import Plan, Table, apply_plan, first_sample, latency_saving, measure, totals
from onnxc.compiler.verify import Fidelity, compare_outputs
from onnxc.errors import UsageError

log = logging.getLogger("onnxc.allocation")

KINDS = ("macs", "params", "size", "latency")
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
    groups: dict = field(default_factory=dict)  # prune candidate -> the nodes it scales (for predictions)

    def to_dict(self) -> dict:
        chosen = {f"{t}:{n}": level for (t, n), level in sorted(self.plan.items())}
        rows = [{**asdict(m), "chosen": self.plan.get((m.technique, m.name)) == m.level}
                for m in self.table.measurements]
        return {"target": str(self.target) if self.target else None, "budget": self.budget,
                "budget_source": self.budget_source, "achieved": self.achieved, "met": self.met,
                "chosen": chosen, "rounds": [asdict(r) for r in self.rounds], "realization": self.realization,
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
    return float(row_saving.get("bytes" if kind == "size" else kind, 0) or 0)


def ordered_steps(table: Table, kind: str) -> list[Step]:
    """Every candidate's hull steps, in increasing error-per-saving order."""
    by_candidate: dict[tuple[str, str], list] = {}
    for m in table.measurements:
        if m.applied:
            by_candidate.setdefault((m.technique, m.name), []).append((saving_of(m.saving, kind), m.error ** 2,
                                                                       m.level))
    steps = []
    for (technique, name), points in by_candidate.items():
        steps += hull_steps(points, technique, name)
    return sorted(steps, key=lambda s: s.slope)


def pruned_nodes(model: onnx.ModelProto, techniques: dict[str, Pass]) -> dict[str, list[str]]:
    """Prune candidate name -> the nodes whose MACs its ratio scales (producers and consumers)."""
    if "prune" not in techniques:
        return {}
    from onnxc.compiler.model import clone

    groups = techniques["prune"].candidates(clone(model))
    return {g.name: list(dict.fromkeys(g.producers + g.consumers)) for g in groups}


def predicted_savings(steps: list[Step], groups: dict[str, list[str]]) -> np.ndarray:
    """Cumulative saving after each step, rewrites of one layer combined: a layer factorized to keep
    t of its MACs after a group of its channels lost r saves (1 - r) times what it saves alone."""
    out = [0.0]
    plan: Plan = {}
    for s in steps:
        plan[(s.technique, s.name)] = s.level
        total = 0.0
        for step in steps[:len(out)]:
            if plan.get((step.technique, step.name)) is None:
                continue
            scale = 1.0
            if step.technique in ("svd", "tucker"):
                for (t, name), level in plan.items():
                    if t == "prune" and step.name in groups.get(name, ()):
                        scale *= 1 - level
            total += step.saving * scale
        out.append(total)
    return np.array(out)


def plan_of(steps: list[Step]) -> Plan:
    plan: Plan = {}
    for s in steps:
        plan[(s.technique, s.name)] = s.level
    return plan


def allocate(model: onnx.ModelProto, techniques: dict[str, Pass], ctx: PassContext, target: Target | None,
             budget: float | None, *, input_shapes: dict | None = None, reference_outputs: dict | None = None,
             cache_dir=None) -> Allocation:
    """Choose per-candidate levels of `techniques` that meet `target` within `budget` on `model`."""
    from onnxc.passes._factor import _single_threaded_blas

    source = "--max-error" if budget is not None else "default"
    budget = budget if budget is not None else DEFAULT_BUDGET
    kind = target.kind if target else "macs"
    with _single_threaded_blas():
        table = measure(model, _probes(techniques), ctx, kind, input_shapes=input_shapes, cache_dir=cache_dir)
        return _allocate(model, techniques, ctx, target, budget, source, table, kind, input_shapes,
                         reference_outputs)


def _probes(techniques: dict[str, Pass]) -> dict[str, Pass]:
    """The techniques as measured: prune refits only the direct consumers on the original model's
    activations and ranks channels by ThiNet instead of the greedy least-squares search (together
    about 20x faster on the samples; the final apply uses the user's settings and is verified)."""
    from dataclasses import replace

    out = dict(techniques)
    if "prune" in out:
        p = out["prune"]
        out["prune"] = replace(p, recapture=False, downstream=False, samples=min(p.samples, 2048),
                               criterion="thinet" if p.criterion == "lsq" else p.criterion)
    return out


def _allocate(model, techniques, ctx, target, budget, source, table, kind, input_shapes, reference_outputs):
    val = ctx.calibration.validation
    ref = reference_outputs if reference_outputs is not None else runtime.run(model, val)
    steps = ordered_steps(table, kind)
    groups = pruned_nodes(model, techniques)
    cum_save = predicted_savings(steps, groups) if kind != "size" else \
        np.cumsum([0.0] + [s.saving for s in steps])
    cum_err2 = np.cumsum([0.0] + [s.error2 for s in steps])
    base_latency = None
    feed = first_sample(val)
    if kind == "latency":
        from onnxc.compiler.bench import bench

        base_latency = bench([model], feed, runs=30, warmup=3, threads=1)[0].median_ms
    base_value = _value(model, kind, ctx.calibration, base_latency)

    def count_for(saving_needed: float) -> int:
        return int(min(np.searchsorted(cum_save, saving_needed - 1e-9), len(steps)))

    if target is not None:
        k = count_for((1 - target.ratio) * base_value)
    else:
        k = int(np.searchsorted(cum_err2, (0.8 * budget) ** 2, side="right") - 1)
    rounds: list[Round] = []
    best = None  # (ranking key, allocation pieces)
    backed_off = False
    short, enough = -1, None  # the most steps known short of the target, the fewest known to meet it
    seen: set[int] = set()
    for _ in range(MAX_ROUNDS):
        if k in seen:
            break
        seen.add(k)
        plan = plan_of(steps[:k])
        candidate, results = apply_plan(model, plan, techniques, ctx, input_shapes)
        fid = compare_outputs(ref, runtime.run(candidate, val), ctx.metric)
        error = fid.error if np.isfinite(fid.rel_l2) else math.inf
        if kind == "latency":
            value = base_latency - latency_saving(model, candidate, feed)
        else:
            value = _value(candidate, kind, ctx.calibration, None)
        ratio = value / base_value if base_value else 1.0
        met = target is None or ratio <= target.ratio + TOLERANCE
        round_ = Round(k, float(math.sqrt(cum_err2[k])), float(error), float(ratio))
        rounds.append(round_)
        within = error <= budget
        if within:
            key = (met, -error if met else -ratio)
            if best is None or key > best[0]:
                best = (key, candidate, plan, fid, ratio, met, results)
        if not within and k > 0:
            # give back the steps with the worst error-per-saving until the prediction fits
            goal = cum_err2[k] * (budget / max(error, 1e-30)) ** 2 * 0.8
            k_new = int(np.searchsorted(cum_err2, goal, side="right") - 1)
            k = max(0, min(k - 1, k_new))
            round_.action = f"error {error:.3g} over budget {budget:g}: back off to {k} steps"
            backed_off = True
            continue
        if target is not None and not backed_off:
            if met:
                enough = k if enough is None else min(enough, k)
            else:
                short = max(short, k)
            if met and short < 0 and k > 0 and ratio < target.ratio - 0.05:
                # overshot with nothing known short: ask for proportionally less
                achieved_saving = max(base_value - value, 1e-9)
                k = min(k - 1, count_for(cum_save[k] * (1 - target.ratio) * base_value / achieved_saving))
                round_.action = f"ratio {ratio:.3f} well under {target.ratio:g}: try {k} steps"
                continue
            if not met and enough is None and k < len(steps):
                # overlapping rewrites saved less than predicted: ask for proportionally more
                achieved_saving = max(base_value - value, 1e-9)
                wanted = (1 - target.ratio) * base_value
                k = max(k + 1, count_for(cum_save[k] * wanted / achieved_saving))
                round_.action = f"ratio {ratio:.3f} short of {target.ratio:g}: take {k} steps"
                continue
            if enough is not None and short >= 0 and enough - short > 1:
                k = (short + enough) // 2  # the fewest steps that meet the target: bisect
                round_.action = f"between {short} (short) and {enough} (met) steps: try {k}"
                continue
        if target is None and within and k < len(steps) and not backed_off and error < 0.8 * budget:
            goal = cum_err2[k] * (0.9 * budget / max(error, 1e-30)) ** 2
            k_new = int(np.searchsorted(cum_err2, goal, side="right") - 1)
            if k_new > k:
                k = k_new
                round_.action = f"error {error:.3g} leaves room: take {k} steps"
                continue
        break
    if best is None:
        fid = compare_outputs(ref, runtime.run(model, val), ctx.metric)
        best = (None, model, {}, fid, 1.0, target is None, [])
    _, out, plan, fid, ratio, met, results = best
    alloc = Allocation(out, plan, fid, target, budget, source, float(ratio), bool(met), table, rounds, results,
                       groups=groups)
    if plan:
        alloc.realization = realization(model, out, ctx.calibration, feed)
    return alloc


def realization(before: onnx.ModelProto, after: onnx.ModelProto, cal, feed: dict) -> dict:
    """Measured onnxruntime speedup against the MAC reduction (1.0: every MAC saved is time saved)."""
    from onnxc.compiler.bench import bench

    timings = bench([before, after], feed, runs=30, warmup=3, threads=1)
    macs = totals(after, cal)["macs"] / max(totals(before, cal)["macs"], 1)
    latency = timings[1].ratio
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
