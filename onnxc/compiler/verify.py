"""Fidelity of a candidate model against a reference on the same inputs.

One number decides every budget and target (`Fidelity.error`): a user metric when one is given
(`metric(reference_outputs, candidate_outputs) -> float`, lists in graph-output order, samples on
axis 0, 0 when identical), else the worst output's error. An output's error is its relative L2,
except that an output of rank >= 3 is first normalized per channel by the reference's own scale,
so a detector's class scores (0-1) weigh as much as its box coordinates (0-640), and that a
classifier's probabilities ([N, classes], every reference row a distribution) are compared as the
logits the softmax was given (centered log-probabilities; see `logit_error`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxc.compiler import runtime
from onnxc.compiler.samples import Samples
from onnxc.errors import OnnxcError, UsageError

Metric = Callable[[list, list], float]
MAX_CHANNELS = 100_000  # past this, an axis is not a channel axis
# Probabilities under this are one "impossible" (27.6 nats below certainty): log-probabilities are
# clipped there, so float32 underflow in a far tail class (0 against 1e-30) is not an error.
PROBABILITY_FLOOR = 1e-12


@dataclass
class OutputFidelity:
    name: str
    rel_l2: float
    max_abs: float
    cosine: float
    top1: float | None  # fraction of samples (or sequence positions) whose argmax agrees
    channel_rel_l2: float | None = None  # RMS over channels of each channel's relative L2
    logit_rel_l2: float | None = None  # probabilities: relative L2 of the centered log-probabilities

    @property
    def error(self) -> float:
        """What budgets see for this output: per-channel error where channels exist, the logits'
        error for probabilities, else the relative L2."""
        if self.channel_rel_l2 is not None:
            return self.channel_rel_l2
        return self.logit_rel_l2 if self.logit_rel_l2 is not None else self.rel_l2


@dataclass
class Fidelity:
    outputs: list[OutputFidelity]
    samples: int
    metric: float | None = None  # the user metric's value, when one was given

    @property
    def rel_l2(self) -> float:
        """The worst relative L2 error over all outputs."""
        return max((o.rel_l2 for o in self.outputs), default=0.0)

    @property
    def error(self) -> float:
        """The number `--max-error` bounds and targets minimize: the user metric, else the worst output."""
        if self.metric is not None:
            return self.metric
        return max((o.error for o in self.outputs), default=0.0)

    @property
    def surrogate(self) -> float:
        """The default error (worst output, per channel, probabilities as logits) even when a user
        metric judges: continuous where a metric over a few samples moves in whole steps."""
        return max((o.error for o in self.outputs), default=0.0)

    @property
    def top1(self) -> float | None:
        values = [o.top1 for o in self.outputs if o.top1 is not None]
        return min(values) if values else None

    def to_dict(self) -> dict:
        outputs = [{**asdict(o), "error": o.error} for o in self.outputs]
        return {"samples": self.samples, "error": self.error, "metric": self.metric, "rel_l2": self.rel_l2,
                "top1": self.top1, "outputs": outputs}


def channel_axis(shape: Sequence[int]) -> int | None:
    """The channel axis of an output: 1 for [N, C, spatial...] maps, the shorter of axes 1 and 2
    for rank 3 ([N, boxes, 4 + classes] and [N, 4 + classes, boxes] both give the classes), none
    for [N, features]."""
    if len(shape) < 3:
        return None
    if len(shape) == 3:
        axis = 1 if shape[1] <= shape[2] else 2
    else:
        axis = 1
    return axis if 1 < shape[axis] <= MAX_CHANNELS else None


def channel_error(ref: np.ndarray, got: np.ndarray, axis: int) -> float:
    """sqrt(mean over channels of (|r_c - g_c| / |r_c|)^2); channels that are zero in the reference
    are measured against the mean channel norm instead."""
    return _channel_error(*_channel_sums(ref.astype(np.float64) - got, ref.astype(np.float64), axis))


def _channel_sums(d: np.ndarray, r: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel of `axis`: sum of d^2 and of r^2 (no transposed copies: (pre, C, post) views)."""
    shape = (int(np.prod(d.shape[:axis])), d.shape[axis], -1)
    d3, r3 = d.reshape(shape), r.reshape(shape)
    return np.einsum("ijk,ijk->j", d3, d3), np.einsum("ijk,ijk->j", r3, r3)


def _channel_error(dd: np.ndarray, rr: np.ndarray) -> float:
    diff, norm = np.sqrt(dd), np.sqrt(rr)
    floor = max(float(np.mean(norm)) * 1e-3, 1e-30)
    return float(np.sqrt(np.mean((diff / np.maximum(norm, floor)) ** 2)))


def is_distribution(ref: np.ndarray) -> bool:
    """A classifier's probabilities: [N, classes] floats whose every row is non-negative and sums to 1."""
    if ref.ndim != 2 or ref.dtype.kind != "f" or not 1 < ref.shape[1] <= MAX_CHANNELS or not ref.size:
        return False
    return bool(np.all(ref >= 0) and np.allclose(ref.sum(axis=1, dtype=np.float64), 1.0, atol=1e-3))


def centered_logits(p: np.ndarray) -> np.ndarray:
    """log(p) minus its row mean: the logits a softmax was given, up to nothing (softmax is
    invariant to a per-row constant, and the centering removes it)."""
    z = np.log(np.maximum(p.astype(np.float64), PROBABILITY_FLOOR))
    return z - z.mean(axis=1, keepdims=True)


def logit_sums(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(|z_ref - z_got|^2, |z_ref|^2) of the centered log-probabilities.

    Why probabilities are judged as logits: a confident softmax saturates, so its output barely
    moves while the margin between the top class and the next shrinks, until a prediction flips:
    a rewrite can move confident probabilities by a third of what it moves their logits; and
    errors of rewrites that combine add up in the logits (a linear perturbation), not in the
    saturated probabilities. A classifier exported with logits is
    judged on them already; one exported with its softmax is now judged the same way.
    """
    zr, zg = centered_logits(ref), centered_logits(got)
    return float(np.sum((zr - zg) ** 2)), float(np.sum(zr ** 2))


def logit_error(ref: np.ndarray, got: np.ndarray) -> float:
    diff2, norm2 = logit_sums(ref, got)
    return float(np.sqrt(diff2 / norm2)) if norm2 > 0 else float(np.sqrt(diff2))


def output_fidelity(name: str, ref: np.ndarray, got: np.ndarray) -> OutputFidelity:
    return _output_fidelity(name, ref, got)[0]


def _output_fidelity(name: str, ref: np.ndarray, got: np.ndarray) -> tuple[OutputFidelity, tuple | None]:
    """The fidelity of one output and, for floats, its sums (|r-g|^2, |r|^2, |g|^2, r.g and, for
    probabilities, `logit_sums`), which `_compare_groups` adds up across shape groups."""
    if ref.shape != got.shape:
        raise OnnxcError(f"output '{name}' changed shape: {ref.shape} -> {got.shape}")
    if ref.dtype.kind not in "fc":
        same = float(np.mean(ref == got)) if ref.size else 1.0
        max_abs = float(np.max(np.abs(ref.astype(np.float64) - got))) if ref.size else 0.0
        return OutputFidelity(name, 1.0 - same, max_abs, same, None), None
    r64, g64 = ref.astype(np.float64), got.astype(np.float64)
    d = r64 - g64
    rf, gf, df = r64.reshape(-1), g64.reshape(-1), d.reshape(-1)
    dd, rr, gg, dot = float(df @ df), float(rf @ rf), float(gf @ gf), float(rf @ gf)
    diff, norm, gn = np.sqrt(dd), np.sqrt(rr), np.sqrt(gg)
    rel = float(diff / norm) if norm > 0 else float(diff)
    max_abs = float(np.max(np.abs(df))) if df.size else 0.0
    cosine = float(dot / (norm * gn)) if norm > 0 and gn > 0 else float(norm == gn)
    top1 = None
    if ref.ndim in (2, 3) and 1 < ref.shape[-1] <= MAX_CHANNELS and ref.size:
        # [N, classes]: per sample; [N, T, classes] (CTC, token logits): per position
        top1 = float(np.mean(np.argmax(ref, axis=-1) == np.argmax(got, axis=-1)))
    axis = channel_axis(ref.shape)
    per_channel = _channel_error(*_channel_sums(d, r64, axis)) if axis is not None and ref.size else None
    logit = logit_sums(ref, got) if is_distribution(ref) else None
    sums = (dd, rr, gg, dot, logit)
    logit_rel = None
    if logit is not None:
        logit_rel = float(np.sqrt(logit[0] / logit[1])) if logit[1] > 0 else float(np.sqrt(logit[0]))
    return OutputFidelity(name, rel, max_abs, cosine, top1, per_channel, logit_rel), sums


def compare_outputs(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
                    metric: Metric | None = None) -> Fidelity:
    if isinstance(ref, Samples) and not ref.is_uniform:
        return _compare_groups(ref, Samples.of(got), metric)
    outputs = [output_fidelity(name, ref[name], got[name]) for name in ref]
    samples = runtime.sample_count(ref) if ref else 0
    value = None
    if metric is not None:
        value = call_metric(metric, [ref[n] for n in ref], [got[n] for n in ref])
    return Fidelity(outputs, samples, value)


def call_metric(metric: Metric, ref: list, got: list) -> float:
    """The user metric's value as a float; a metric that raises or returns a non-number is bad input."""
    try:
        value = float(metric(ref, got))
    except Exception as exc:
        name = getattr(metric, "__name__", repr(metric))
        raise UsageError(f"metric {name} failed: {type(exc).__name__}: {exc}") from None
    if np.isnan(value):
        raise UsageError(f"metric {getattr(metric, '__name__', 'metric')} returned NaN")
    return value


# How far a candidate's output change is stretched to see how near a discrete metric is to moving
# (see `amplified_metric`): powers of two, so a change of any size meets its flips at some factor.
AMPLIFICATIONS = (2, 4, 8, 16, 32, 64, 128)
# The per-channel error's weight in the surrogate when the amplified metric ties: far under one
# sample's step at any factor, so it only orders candidates the metric cannot.
TIE_BREAK = 1e-3


def amplified_metric(metric: Metric, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
                     factors: Sequence[float] = AMPLIFICATIONS) -> float | None:
    """The user metric on outputs whose change from the reference is stretched k times, averaged
    over `factors` (None where the metric cannot read stretched outputs).

    Why: a metric that counts samples (lines decoded differently, labels flipped) reads 0 for
    nearly every single rewrite on a few held-out samples, and the per-channel error that stands
    in for it does not know which changes the metric cares about (a CTC decoder ignores a
    blank/repeat flip that moves the probabilities a lot; a detector ignores a box's jitter but
    not a class score crossing its threshold). Stretching the change, ref + k (got - ref), moves
    each sample along the direction the rewrite pushed it until its decision flips: the fraction
    flipped at k counts the samples whose margin is under k times the change, in the metric's
    own terms. The average over factors is continuous enough to rank candidates, and it ranks
    them as the metric will see them combined."""
    ref_s, got_s = Samples.of(ref), Samples.of(got)
    names = list(ref_s)
    total = max(ref_s.count, 1)
    values = []
    for k in factors:
        value = 0.0
        for rg, gg in zip(ref_s.groups, got_s.groups):
            stretched = [_stretch(rg[n], gg[n], k) for n in names]
            try:
                with np.errstate(all="ignore"):
                    one = float(metric([rg[n] for n in names], stretched))
            except Exception:  # a metric that takes logarithms of stretched probabilities, say
                return None
            if not np.isfinite(one):
                return None
            value += one * runtime.sample_count(rg)
        values.append(value / total)
    return float(np.mean(values))


def _stretch(ref: np.ndarray, got: np.ndarray, k: float) -> np.ndarray:
    """ref + k (got - ref) for float outputs (in their dtype); other outputs as they are."""
    if ref.dtype.kind != "f":
        return got
    out = got - ref
    out *= ref.dtype.type(k)
    out += ref
    return out


def load_metric(spec: str) -> Metric:
    """`package.module:function` -> the function (one clear error when it cannot be found)."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise UsageError(f"--metric expects package.module:function, got '{spec}'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--metric {spec}: cannot import {module_name} ({exc})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UsageError(f"--metric {spec}: {module_name} has no function {func_name}")
    return func


def compare(reference: onnx.ModelProto, candidate: onnx.ModelProto,
            inputs: Mapping[str, np.ndarray], metric: Metric | None = None) -> Fidelity:
    """Run both models on `inputs` and measure every output of the reference."""
    ref_names = [o.name for o in reference.graph.output]
    cand_names = [o.name for o in candidate.graph.output]
    if ref_names != cand_names:
        raise UsageError(f"models have different outputs: {ref_names} vs {cand_names}")
    return compare_outputs(runtime.run(reference, inputs), runtime.run(candidate, inputs), metric)


def _compare_groups(ref: Samples, got: Samples, metric: Metric | None = None) -> Fidelity:
    """Fidelity over variable-shape outputs, aggregated exactly across shape groups.

    Relative L2 and cosine come from sums of squares and dot products over all groups; top-1
    and equality fractions are weighted by the samples of each group.
    """
    if len(ref.groups) != len(got.groups):
        raise OnnxcError(f"outputs come in {len(got.groups)} shape groups, expected {len(ref.groups)}")
    outputs = []
    for name in ref:
        diff2 = norm2 = got2 = dot = max_abs = 0.0
        weighted_top1, weighted_same, samples, has_top1 = 0.0, 0.0, 0, True
        channel2, has_channel = 0.0, True
        logit_diff2, logit_norm2, has_logit = 0.0, 0.0, True
        for rg, gg in zip(ref.groups, got.groups):
            r, g = rg[name], gg[name]
            one, sums = _output_fidelity(name, r, g)
            n = len(r) if r.ndim else 1
            samples += n
            max_abs = max(max_abs, one.max_abs)
            if one.channel_rel_l2 is None:
                has_channel = False
            else:
                channel2 += one.channel_rel_l2 ** 2 * n
            if one.top1 is None:
                has_top1 = False
            else:
                weighted_top1 += one.top1 * n
            if sums is not None:
                diff2, norm2, got2, dot = (a + b for a, b in zip((diff2, norm2, got2, dot), sums[:4]))
                if sums[4] is None:
                    has_logit = False
                else:
                    logit_diff2, logit_norm2 = logit_diff2 + sums[4][0], logit_norm2 + sums[4][1]
            else:
                has_logit = False
                weighted_same += one.cosine * n
        if ref.groups[0][name].dtype.kind in "fc":
            rel = float(np.sqrt(diff2 / norm2)) if norm2 > 0 else float(np.sqrt(diff2))
            cosine = dot / np.sqrt(norm2 * got2) if norm2 > 0 and got2 > 0 else float(norm2 == got2)
        else:
            same = weighted_same / max(samples, 1)
            rel, cosine = 1.0 - same, same
        top1 = weighted_top1 / max(samples, 1) if has_top1 else None
        channel = float(np.sqrt(channel2 / max(samples, 1))) if has_channel else None
        logit = None
        if has_logit:
            logit = float(np.sqrt(logit_diff2 / logit_norm2)) if logit_norm2 > 0 else float(np.sqrt(logit_diff2))
        outputs.append(OutputFidelity(name, rel, max_abs, float(cosine), top1, channel, logit))
    value = None
    if metric is not None:  # per shape group, weighted by its samples
        names = list(ref)
        value = sum(call_metric(metric, [rg[n] for n in names], [gg[n] for n in names]) * runtime.sample_count(rg)
                    for rg, gg in zip(ref.groups, got.groups)) / max(ref.count, 1)
    return Fidelity(outputs, ref.count, value)


# An error within this many times the reference's own float noise cannot be told from no change.
NOISE_MARGIN = 2.0


def reference_noise(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray],
                    reference_outputs: Mapping[str, np.ndarray]) -> float:
    """How far `model` is from itself: the worst relative L2 error between its outputs at
    onnxruntime's default optimization level (`reference_outputs`) and with optimizations off.

    The optimizations only reorder float32 arithmetic (Conv+BatchNormalization fusion, NCHWc
    layouts), so the distance is the float noise floor of the reference run: the public layout
    detector measures 1.57e-5 against itself on random inputs, over a 1e-5 lossless budget.
    """
    session = runtime.session(model, optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return compare_outputs(reference_outputs, runtime.run(session, inputs)).error
