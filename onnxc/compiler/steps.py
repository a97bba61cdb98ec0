"""The allocator's steps: each candidate's levels as steps along its error-for-saving hull, the
conflicts between techniques on one node, and the predicted saving of a list of steps.

From the sensitivity table, each candidate's (saving, error^2) points form a lower convex hull
starting at "untouched"; its segments are the steps from one level to the next with their
error-per-saving. Taking steps in increasing error-per-saving order over all candidates is the
Lagrangian solution of "most saving for least error" when errors add in quadrature; `allocation`
verifies prefixes of that order and `search` picks which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxc.compiler.sensitivity import Plan, Table, node_costs
from onnxc.compiler.technique import Technique


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


def candidate_nodes(table: Table) -> dict[tuple[str, str], list[str]]:
    """The nodes each measured candidate rewrites, as the sweep found them (a layer: itself)."""
    touches = {key: list(nodes) for key, nodes in table.nodes.items()}
    for m in table.measurements:
        touches.setdefault((m.technique, m.name), [m.name])
    return touches


# A user metric that reads 0 on at least this share of the rewrites its surrogate sees is starved:
# the ties at 0 leave that many candidates in no order (a metric that counts a few samples can
# move on half the rewrites, its heaviest levels, and still tie on every mild one the plan needs).
STARVED = 0.25


def planning_errors(table: Table) -> tuple[dict[tuple[str, str, float], float], float | None]:
    """The error each measurement is planned with, and the surrogate's scale when it replaces a
    starved metric (None: the measured errors as they are).

    A user metric over a few held-out samples moves in whole steps (1/N of the samples): most
    single rewrites read 0 and the search has nothing to rank by, predicting 0 for every plan.
    Then candidates are ranked by the surrogate measured in the same runs (the metric on each
    candidate's change stretched, `verify.amplified_metric`: it counts how many samples a change
    brings near their decision, as the metric decides it), scaled to the metric by the ratio of
    their sums where both are non-zero. The budget is still judged by the metric on every verified
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
    def of(cls, model: onnx.ModelProto, table: Table, kind: str, cal) -> CostModel:
        node_cost = node_costs(model, cal, kind)
        nodes_of = candidate_nodes(table)
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
