"""Fidelity of a candidate model against a reference on the same inputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxc.compiler import runtime
from onnxc.compiler.samples import Samples
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
    if isinstance(ref, Samples) and not ref.is_uniform:
        return _compare_groups(ref, Samples.of(got))
    outputs = [output_fidelity(name, ref[name], got[name]) for name in ref]
    samples = runtime.sample_count(ref) if ref else 0
    return Fidelity(outputs, samples)


def compare(reference: onnx.ModelProto, candidate: onnx.ModelProto,
            inputs: Mapping[str, np.ndarray]) -> Fidelity:
    """Run both models on `inputs` and measure every output of the reference."""
    ref_names = [o.name for o in reference.graph.output]
    cand_names = [o.name for o in candidate.graph.output]
    if ref_names != cand_names:
        raise UsageError(f"models have different outputs: {ref_names} vs {cand_names}")
    return compare_outputs(runtime.run(reference, inputs), runtime.run(candidate, inputs))


def _compare_groups(ref: Samples, got: Samples) -> Fidelity:
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
        for rg, gg in zip(ref.groups, got.groups):
            r, g = rg[name], gg[name]
            one = output_fidelity(name, r, g)
            n = len(r) if r.ndim else 1
            samples += n
            max_abs = max(max_abs, one.max_abs)
            if one.top1 is None:
                has_top1 = False
            else:
                weighted_top1 += one.top1 * n
            if r.dtype.kind in "fc":
                r64, g64 = r.astype(np.float64), g.astype(np.float64)
                diff2 += float(np.sum((r64 - g64) ** 2))
                norm2 += float(np.sum(r64 ** 2))
                got2 += float(np.sum(g64 ** 2))
                dot += float(np.sum(r64 * g64))
            else:
                weighted_same += one.cosine * n
        if ref.groups[0][name].dtype.kind in "fc":
            rel = float(np.sqrt(diff2 / norm2)) if norm2 > 0 else float(np.sqrt(diff2))
            cosine = dot / np.sqrt(norm2 * got2) if norm2 > 0 and got2 > 0 else float(norm2 == got2)
        else:
            same = weighted_same / max(samples, 1)
            rel, cosine = 1.0 - same, same
        top1 = weighted_top1 / max(samples, 1) if has_top1 else None
        outputs.append(OutputFidelity(name, rel, max_abs, float(cosine), top1))
    return Fidelity(outputs, ref.count)


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
    return compare_outputs(reference_outputs, runtime.run(session, inputs)).rel_l2
