"""Fidelity of a candidate model against a reference on the same inputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from onnxc.compiler import runtime
from onnxc.errors import OnnxcError, UsageError


@dataclass
class OutputFidelity:
    name: str
    rel_l2: float
    max_abs: float
    cosine: float
    top1: float | None  # fraction of samples whose argmax agrees (logits-like outputs only)


@dataclass
class Fidelity:
    outputs: list[OutputFidelity]
    samples: int

    @property
    def rel_l2(self) -> float:
        """The worst relative L2 error over all outputs (what `--max-error` bounds)."""
        return max((o.rel_l2 for o in self.outputs), default=0.0)

    @property
    def top1(self) -> float | None:
        values = [o.top1 for o in self.outputs if o.top1 is not None]
        return min(values) if values else None

    def to_dict(self) -> dict:
        return {"samples": self.samples, "rel_l2": self.rel_l2, "top1": self.top1,
                "outputs": [asdict(o) for o in self.outputs]}


def output_fidelity(name: str, ref: np.ndarray, got: np.ndarray) -> OutputFidelity:
    if ref.shape != got.shape:
        raise OnnxcError(f"output '{name}' changed shape: {ref.shape} -> {got.shape}")
    if ref.dtype.kind not in "fc":
        same = float(np.mean(ref == got)) if ref.size else 1.0
        max_abs = float(np.max(np.abs(ref.astype(np.float64) - got))) if ref.size else 0.0
        return OutputFidelity(name, 1.0 - same, max_abs, same, None)
    r = ref.astype(np.float64).reshape(len(ref) if ref.ndim else 1, -1)
    g = got.astype(np.float64).reshape(r.shape)
    diff = np.linalg.norm(r - g)
    norm = np.linalg.norm(r)
    rel = float(diff / norm) if norm > 0 else float(diff)
    max_abs = float(np.max(np.abs(r - g))) if r.size else 0.0
    gn = np.linalg.norm(g)
    cosine = float(np.sum(r * g) / (norm * gn)) if norm > 0 and gn > 0 else float(norm == gn)
    top1 = None
    if ref.ndim == 2 and 1 < ref.shape[1] <= 100_000:
        top1 = float(np.mean(np.argmax(ref, axis=1) == np.argmax(got, axis=1)))
    return OutputFidelity(name, rel, max_abs, cosine, top1)


def compare_outputs(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> Fidelity:
    outputs = [output_fidelity(name, ref[name], got[name]) for name in ref]
    samples = len(next(iter(ref.values()))) if ref else 0
    return Fidelity(outputs, samples)


def compare(reference: onnx.ModelProto, candidate: onnx.ModelProto,
            inputs: Mapping[str, np.ndarray]) -> Fidelity:
    """Run both models on `inputs` and measure every output of the reference."""
    ref_names = [o.name for o in reference.graph.output]
    cand_names = [o.name for o in candidate.graph.output]
    if ref_names != cand_names:
        raise UsageError(f"models have different outputs: {ref_names} vs {cand_names}")
    return compare_outputs(runtime.run(reference, inputs), runtime.run(candidate, inputs))
