"""Side-by-side onnxruntime latency: warm-up, alternating runs, medians and ratios."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxc.compiler import runtime


@dataclass
class Timing:
    label: str
    median_ms: float
    ratio: float  # median / first model's median


def bench(models: Sequence[onnx.ModelProto], inputs: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
          labels: Sequence[str] | None = None, *, runs: int = 50, warmup: int = 5, threads: int = 1,
          ) -> list[Timing]:
    """Time each model on its inputs with runs interleaved, so machine noise hits all alike."""
    sessions = [runtime.session(m, threads=threads) for m in models]
    feeds = list(inputs) if isinstance(inputs, Sequence) else [inputs] * len(models)
    feeds = [{i.name: f[i.name] for i in s.get_inputs()} for s, f in zip(sessions, feeds)]
    for s, f in zip(sessions, feeds):
        for _ in range(warmup):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            t = time.perf_counter()
            s.run(None, f)
            times[i].append(time.perf_counter() - t)
    medians = [float(np.median(t)) * 1000 for t in times]
    labels = list(labels) if labels else [f"model{i}" for i in range(len(models))]
    return [Timing(label, m, m / medians[0]) for label, m in zip(labels, medians)]
