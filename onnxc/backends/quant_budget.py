"""The int8 stage's side of the budget promise: score a quantized model as the rest of the
compiler scores a rewrite, and leave the most sensitive regions float until it is within budget.

Scoring: `compare_outputs` against the reference outputs (the original model's, when earlier
stages already spent part of the budget; else the float model's), with per-channel fidelity and
the user's metric when given. The budget judges `Fidelity.error` (the metric, else the worst
output's per-channel error); rankings and tie-breaks use the continuous per-channel error (the
surrogate), since a discrete metric (a fraction of lines read differently) is a multiple of
1/N on N held-out samples and cannot tell two small changes apart.

Back-off works on int8 regions (`compiler.int8_regions`): a node with a weight (Conv, Gemm, MatMul)
and the nodes that follow it (its activation, an affine block, a residual add) fall back together,
since a float island of one elementwise op between two quantized layers only adds Q/DQ boundaries.
Each region is quantized alone and scored (on a few held-out samples); the smallest k such that leaving the k most
sensitive regions float meets the budget is found by bisection. If none does, the float model
is returned: it is within the budget by construction (the stages before int8 were verified).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxc.backends import Progress
from onnxc.compiler import int8_regions, runtime
from onnxc.compiler.int8_regions import QDQ_OPS
from onnxc.compiler.samples import Samples
from onnxc.compiler.verify import Fidelity, Metric, compare_outputs

# The dynamic quantizer's integer layers (their weights are int8 initializers behind no DQ).
INTEGER_LAYERS = ("MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul")
# Regions are ranked on this many held-out samples (evenly spaced): the surrogate is continuous, so
# a few samples rank them, while the budget is judged on all of them.
RANKING_SAMPLES = 8


@dataclass
class Score:
    error: float  # what the budget judges (the metric when given)
    surrogate: float  # the worst output's per-channel error: continuous, for ranking
    fidelity: Fidelity

    def key(self) -> tuple[float, float]:
        """Lower is better: the budget's number first, the surrogate breaks its ties."""
        return self.error, self.surrogate


def score(reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], metric: Metric | None) -> Score:
    fidelity = compare_outputs(reference, outputs, metric)
    surrogate = max((o.error for o in fidelity.outputs), default=0.0)
    return Score(fidelity.error, surrogate, fidelity)


class Scorer:
    """Scores of candidates against `reference` outputs (default: `model`'s own) on `inputs`, as
    onnxruntime runs them (fused integer kernels) or, with `exact`, in the QDQ arithmetic."""

    def __init__(self, model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], *, exact: bool = False,
                 metric: Metric | None = None, reference: Mapping[str, np.ndarray] | None = None):
        self.inputs = inputs
        self.float_outputs = runtime.run(model, inputs)
        self.reference = reference if reference is not None else self.float_outputs
        self.metric = metric
        self.exact_only = exact
        self.float_score = score(self.reference, self.float_outputs, metric)

    @property
    def samples(self) -> int:
        return runtime.sample_count(self.inputs)

    def __call__(self, candidate: onnx.ModelProto) -> Score:
        if self.exact_only:
            return self.exact(candidate)
        return score(self.reference, runtime.run(candidate, self.inputs), self.metric)

    def exact(self, candidate: onnx.ModelProto) -> Score:
        """The QDQ arithmetic itself: onnxruntime without fusing Q/DQ into integer ops."""
        import onnxruntime as ort

        sess = runtime.session(candidate, optimization=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        return score(self.reference, runtime.run(sess, self.inputs), self.metric)

    def subset(self, count: int) -> Scorer:
        """The same scorer on `count` evenly spaced samples (itself when it has no more)."""
        total = self.samples
        if total <= count:
            return self
        picked = np.unique(np.linspace(0, total - 1, count).round().astype(int))
        copy = object.__new__(Scorer)
        copy.inputs = Samples.of(self.inputs).subset(picked)
        copy.float_outputs = Samples.of(self.float_outputs).subset(picked)
        copy.reference = Samples.of(self.reference).subset(picked)
        copy.metric, copy.exact_only = self.metric, self.exact_only
        copy.float_score = score(copy.reference, copy.float_outputs, self.metric)
        return copy

    def self_error(self, candidate: onnx.ModelProto) -> float:
        """Relative L2 of a float rewrite against the float model: a lossless check."""
        return compare_outputs(self.float_outputs, runtime.run(candidate, self.inputs)).rel_l2


def regions(model: onnx.ModelProto, candidates: Sequence[str], name_of: Callable[[str], str] = str,
            ) -> dict[str, list[str]]:
    """Candidate nodes grouped into int8 regions (`compiler.int8_regions`), keyed by the node that
    opens each, in graph order. `model` is the quantized model: Q/DQ nodes are looked through,
    every node but a layer may join, a candidate that joins none opens its own region, and
    `name_of` maps a quantized node's name to the candidate's."""
    wanted = set(candidates)
    producer = {o: n for n in model.graph.node for o in n.output}
    weights = {t.name for t in model.graph.initializer if len(t.dims) >= 2}

    def layer(node: onnx.NodeProto) -> bool:
        """A node with a weight: an initializer of rank 2 or more behind its Q/DQ nodes."""
        for i in node.input:
            p = producer.get(i)
            while p is not None and p.op_type in QDQ_OPS:
                i, p = p.input[0], producer.get(p.input[0])
            if p is None and i in weights:
                return True
        return node.op_type in INTEGER_LAYERS

    found = int8_regions.regions(model.graph, opens=lambda n: name_of(n.name) in wanted,
                                 joins=lambda n: not layer(n), through=QDQ_OPS)
    groups: dict[str, list[str]] = {}
    for owner, nodes in found.items():
        groups.setdefault(name_of(owner), []).extend(name_of(n.name) for n in nodes if name_of(n.name) in wanted)
    return {k: list(dict.fromkeys(v)) for k, v in groups.items()}


@dataclass
class BackOff:
    model: onnx.ModelProto
    score: Score
    excluded: list[str]  # nodes left float
    regions_float: list[str]  # the regions they form
    sensitivity: dict[str, float]  # region -> surrogate error when quantized alone
    all_float: bool = False  # no partial quantization met the budget: the float model


def back_off(quantizer: Callable[[Sequence[str] | None, Sequence[str]], onnx.ModelProto], scorer: Scorer,
             groups: Mapping[str, Sequence[str]], budget: float, float_model: onnx.ModelProto,
             progress: Progress) -> BackOff:
    """Leave the most sensitive regions float until `scorer` finds the model within `budget`."""
    sensitivity: dict[str, float] = {}
    names = list(groups)
    ranker = scorer.subset(RANKING_SAMPLES)
    for index, region in enumerate(names):
        progress("int8: sensitivity", index, len(names))
        sensitivity[region] = ranker(quantizer(list(groups[region]), [])).surrogate
    progress("int8: sensitivity", len(names), len(names))
    ranked = sorted(names, key=lambda r: (-sensitivity[r], r))

    def excluded(k: int) -> list[str]:
        return [n for r in ranked[:k] for n in groups[r]]

    best: tuple[int, onnx.ModelProto, Score] | None = None
    lo, hi = 1, len(ranked)
    steps, step = max(1, len(ranked)).bit_length(), 0
    while lo <= hi:
        progress("int8: exclusion", step, steps)
        step += 1
        k = (lo + hi) // 2
        model = quantizer(None, excluded(k))
        s = scorer(model)
        if s.error <= budget:
            best, hi = (k, model, s), k - 1
        else:
            lo = k + 1
    progress("int8: exclusion", steps, steps)
    if best is None:
        return BackOff(float_model, scorer.float_score, excluded(len(ranked)), ranked, sensitivity, all_float=True)
    k, model, s = best
    return BackOff(model, s, excluded(k), ranked[:k], sensitivity)


def resolution_note(metric: Metric | None, samples: int, budget: float | None) -> tuple[float | None, str | None]:
    """A user metric over N held-out samples moves in steps of about 1/N when it counts samples:
    its resolution, and a warning when the budget is finer than that."""
    if metric is None or not samples:
        return None, None
    step = 1.0 / samples
    if budget is not None and 0 < budget < step:
        return step, (f"--max-error {budget:g} is below the metric's resolution on {samples} held-out samples "
                      f"(1/{samples} = {step:.3g}): only a metric of 0 there (no sample changed) is within it; "
                      "more calibration samples make it finer")
    return step, None
