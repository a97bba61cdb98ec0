"""Per-tensor activation ranges for static int8, each chosen by its error on held-out samples.

onnxruntime's calibrators give every tensor the same rule: min/max (every outlier inside the
range, so the step is as coarse as the rarest value needs), a percentile, or an entropy/MSE
search. Which loses least depends on the tensor: a Relu output with a long tail loses most of
its resolution to min/max, while a tensor whose few large values carry the signal (an attention
logit, a class score) must not be clipped. Here each tensor's values are histogrammed on the
fitting samples and on the held-out ones; candidate ranges (min/max, two percentiles, the range
minimizing the expected squared error of quantization plus clipping) come from the fitting
histogram, and each tensor takes the candidate whose expected error is lowest on the held-out
histogram, among the kinds a variant allows (`RangeChoice.pick`). The caller judges each
variant at the model's outputs, against min/max: the squared error of one tensor is not what
the outputs feel (clipping a tensor's rare large values can matter more than its rounding).

The error model is uint8 asymmetric quantization as onnxruntime computes its parameters: the
range widened to hold zero, 255 steps, rounding error step^2 / 12 inside, the distance to the
nearer bound outside.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxc.backends import Progress, no_progress
from onnxc.compiler import runtime
from onnxc.compiler.calibration import iter_activations

BINS = 2048
LEVELS = 255
MAX_VALUES = 1 << 13  # values per tensor per batch that go into its histogram (a strided subsample)
PERCENTILES = (1e-4, 1e-5)  # tail mass clipped on each side
GRID = np.geomspace(1e-3, 1.0, 40)  # fractions of each side of the min/max range the MSE search tries


@dataclass
class _Histogram:
    """Counts over [lo, hi] in BINS bins, plus count, sum and sum of squares of the distances
    beyond each bound (held-out values may pass the fitting range)."""

    lo: float
    hi: float
    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS))
    over: np.ndarray = field(default_factory=lambda: np.zeros((2, 3)))  # [low, high] x [n, s1, s2]

    def add(self, values: np.ndarray) -> None:
        flat = values.reshape(-1).astype(np.float64)
        if flat.size > MAX_VALUES:
            flat = flat[:: flat.size // MAX_VALUES]
        flat = flat[np.isfinite(flat)]
        if self.hi > self.lo:
            inside = flat[(flat >= self.lo) & (flat <= self.hi)]
            self.counts += np.histogram(inside, bins=BINS, range=(self.lo, self.hi))[0]
        else:
            self.counts[0] += np.count_nonzero(flat == self.lo)
        for side, beyond in ((0, self.lo - flat[flat < self.lo]), (1, flat[flat > self.hi] - self.hi)):
            self.over[side] += (beyond.size, beyond.sum(), np.square(beyond).sum())

    def centers(self) -> np.ndarray:
        edges = np.linspace(self.lo, self.hi, BINS + 1)
        return (edges[:-1] + edges[1:]) / 2

    def error(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Expected mean squared error for each range [a_k, b_k] (arrays of candidates)."""
        a, b = np.minimum(a, 0.0), np.maximum(b, 0.0)
        step = (b - a) / LEVELS
        c = self.centers()[None, :]
        n = self.counts[None, :]
        below = np.clip(a[:, None] - c, 0, None)
        above = np.clip(c - b[:, None], 0, None)
        inside = (c >= a[:, None]) & (c <= b[:, None])
        total = np.sum(n * (below ** 2 + above ** 2), axis=1) + np.sum(n * inside, axis=1) * step ** 2 / 12
        (nl, s1l, s2l), (nh, s1h, s2h) = self.over
        # Beyond the fitting range, a value x = lo - d (or hi + d) is clipped at a (or b), which lie
        # inside it: (d + a - lo)^2 summed from n, sum d, sum d^2. Zero widened past a positive lo
        # (or a negative hi) holds those values instead: rounding error only.
        dl, dh = a - self.lo, self.hi - b
        low = np.where(a >= self.lo, s2l + 2 * dl * s1l + nl * dl ** 2, nl * step ** 2 / 12)
        high = np.where(b <= self.hi, s2h + 2 * dh * s1h + nh * dh ** 2, nh * step ** 2 / 12)
        return (total + low + high) / max(float(self.counts.sum() + nl + nh), 1.0)

    def quantile(self, q: float) -> float:
        cdf = np.cumsum(self.counts)
        if not cdf[-1]:
            return self.lo
        edges = np.linspace(self.lo, self.hi, BINS + 1)
        return float(edges[min(int(np.searchsorted(cdf, q * cdf[-1])), BINS - 1) + 1])


@dataclass
class RangeChoice:
    """Each tensor's candidate ranges and their expected error on the held-out histogram."""

    options: dict[str, dict[str, tuple[float, float]]]  # tensor -> candidate name -> (low, high)
    errors: dict[str, dict[str, float]]  # tensor -> candidate name -> held-out mean squared error

    def pick(self, allowed: tuple[str, ...]) -> tuple[dict[str, tuple[float, float]], dict[str, int]]:
        """Per tensor, the allowed candidate (by prefix: "percentile" allows both) with the least
        held-out error; and how many tensors took each kind."""
        ranges, counts = {}, {}
        for name, errors in self.errors.items():
            keys = [k for k in errors if k.startswith(allowed)]
            best = min(keys, key=lambda k: (errors[k], k != "minmax"))
            ranges[name] = self.options[name][best]
            kind = best.rstrip("0123456789")
            counts[kind] = counts.get(kind, 0) + 1
        return ranges, dict(sorted(counts.items()))


def candidates(hist: _Histogram) -> dict[str, tuple[float, float]]:
    """Named candidate ranges from a fitting histogram."""
    out = {"minmax": (hist.lo, hist.hi)}
    for i, tail in enumerate(PERCENTILES):
        lo = hist.quantile(tail) if hist.lo < 0 else hist.lo
        hi = hist.quantile(1 - tail) if hist.hi > 0 else hist.hi
        out[f"percentile{i}"] = (min(lo, 0.0) if hist.lo < 0 else hist.lo, hi)
    # One side at a time (the high side, then the low one given it): each side's clipping error
    # barely depends on the other's bound, only through the shared step.
    lo, hi = hist.lo, hist.hi
    if hi > 0:
        b = hi * GRID
        hi = float(b[int(np.argmin(hist.error(np.full(len(b), lo), b)))])
    if lo < 0:
        a = lo * GRID
        lo = float(a[int(np.argmin(hist.error(a, np.full(len(a), hi))))])
    out["mse"] = (lo, hi)
    return out


def choose_ranges(model: onnx.ModelProto, minmax: Mapping[str, tuple[float, float]],
                  train: Mapping[str, np.ndarray], held_out: Mapping[str, np.ndarray], batch_size: int = 1,
                  progress: Progress = no_progress) -> RangeChoice:
    """For each tensor of `minmax` (its min/max on `train`), the candidate range with the least
    expected quantization error on `held_out` (the graph's inputs are kept at min/max). Every
    tensor of a batch is captured at once: `batch_size` keeps that within memory."""
    inputs = {i.name for i in model.graph.input}
    names = [n for n, (lo, hi) in minmax.items() if n not in inputs and np.isfinite(lo) and np.isfinite(hi)]
    fit = {n: _Histogram(float(minmax[n][0]), float(minmax[n][1])) for n in names}
    check = {n: _Histogram(float(minmax[n][0]), float(minmax[n][1])) for n in names}
    total = runtime.sample_count(train) + runtime.sample_count(held_out)
    done = 0
    for hists, inputs_ in ((fit, train), (check, held_out)):
        for batch in iter_activations(model, names, inputs_, batch_size):
            for name, value in batch.items():
                hists[name].add(value)
            done += max((len(v) for v in batch.values() if np.ndim(v)), default=1)
            progress("int8: ranges", min(done, total), total)
    options, errors = {}, {}
    for name in names:
        options[name] = candidates(fit[name])
        keys = list(options[name])
        a = np.array([options[name][k][0] for k in keys])
        b = np.array([options[name][k][1] for k in keys])
        errors[name] = dict(zip(keys, (float(e) for e in check[name].error(a, b))))
    return RangeChoice(options, errors)
