"""Side-by-side onnxruntime latency: warm-up, alternating runs, medians and ratios.

Models are timed in rounds; each round runs every model once, starting from a different model
each time, so drift and noise from other work on the machine (and any advantage of running right
after another model) fall on all models alike. The median of each model's runs is compared with
the first model's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxc.compiler import runtime
from onnxc.errors import OnnxcError

ModelLike = onnx.ModelProto | str | os.PathLike
Feed = Mapping[str, np.ndarray]


@dataclass
class Timing:
    label: str
    median_ms: float
    ratio: float  # median / first model's median
    p10_ms: float = 0.0
    p90_ms: float = 0.0
    runs: int = 0


def bench(models: Sequence[ModelLike], inputs: Feed | Sequence[Feed], labels: Sequence[str] | None = None,
          runs: int = 50, warmup: int = 5, threads: int = 1) -> list[Timing]:
    """Time each model (ModelProto, or a path to an .onnx/.ort file) on its inputs.

    `inputs` is one feed for all models or one per model; each feed gives every input of its
    model (extra keys are ignored; a model with a fixed batch dim gets the first rows).
    `threads` is onnxruntime's intra-op thread count (0: onnxruntime's default).
    """
    if not models:
        raise OnnxcError("bench: no models given")
    if runs < 1 or warmup < 0:
        raise OnnxcError("bench: runs must be at least 1 and warmup at least 0")
    feeds_in = list(inputs) if isinstance(inputs, Sequence) else [inputs] * len(models)
    if len(feeds_in) != len(models):
        raise OnnxcError(f"bench: {len(models)} models but {len(feeds_in)} input sets")
    labels = list(labels) if labels else [_label(m, i) for i, m in enumerate(models)]
    sessions = [runtime.session(m, threads=threads, spinning=True) for m in models]
    feeds = [_feed(s, f, label) for s, f, label in zip(sessions, feeds_in, labels)]
    for s, f in zip(sessions, feeds):
        for _ in range(warmup):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    n = len(sessions)
    for r in range(runs):
        for i in [(r + k) % n for k in range(n)]:
            start = time.perf_counter()
            sessions[i].run(None, feeds[i])
            times[i].append(time.perf_counter() - start)
    ms = [np.asarray(t) * 1000 for t in times]
    first = float(np.median(ms[0]))
    return [Timing(label, float(np.median(t)), float(np.median(t)) / first if first > 0 else float("nan"),
                   float(np.percentile(t, 10)), float(np.percentile(t, 90)), len(t))
            for label, t in zip(labels, ms)]


def _feed(sess: ort.InferenceSession, inputs: Feed, label: str) -> dict[str, np.ndarray]:
    feed = {}
    for spec in sess.get_inputs():
        if spec.name not in inputs:
            raise OnnxcError(f"bench: no input '{spec.name}' given for {label} "
                             f"(given: {', '.join(inputs) or 'none'})")
        value = inputs[spec.name]
        if spec.shape and isinstance(spec.shape[0], int) and value.ndim and len(value) > spec.shape[0]:
            value = value[: spec.shape[0]]
        feed[spec.name] = value
    return feed


def _label(model: ModelLike, index: int) -> str:
    return os.path.basename(os.fspath(model)) if not isinstance(model, onnx.ModelProto) else f"model{index}"


def table(timings: Sequence[Timing]) -> str:
    """Plain-text table (label, median ms, p10-p90 ms, ratio vs the first)."""
    width = max(len("model"), *(len(t.label) for t in timings))
    lines = [f"{'model':<{width}}  {'median ms':>10}  {'p10-p90 ms':>15}  {'ratio':>6}"]
    for t in timings:
        spread = f"{t.p10_ms:.3f}-{t.p90_ms:.3f}"
        lines.append(f"{t.label:<{width}}  {t.median_ms:>10.3f}  {spread:>15}  {t.ratio:>5.2f}x")
    return "\n".join(lines)
