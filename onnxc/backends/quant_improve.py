"""Post-training steps that make int8 lose less, each tried on the prepared float model and kept
only where it lowers the int8 error on the held-out samples (the caller's `Scorer`):

- `try_equalize`: affine folding and cross-layer equalization (`quant_equalize`), lossless in float;
- `try_ranges`: per-tensor activation ranges (`quant_ranges`) instead of min/max;
- `try_bias`: bias correction of the weights' rounding (`quant_bias`).

Each records what it did and both errors in the report's `int8_improvements`, and returns the
new (prepared model,) quantizer, quantized model and score, or None when it is not kept.
`make(...)` builds a quantizer (`ort_quant.static_quantizer`) for a prepared model and a
calibration cache; `batch_for(model, calibration)` sizes capture batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from onnxc.backends import Progress
from onnxc.backends.quant_bias import correct_biases
from onnxc.backends.quant_budget import Score, Scorer
from onnxc.backends.quant_equalize import equalize as equalize_model
from onnxc.backends.quant_ranges import choose_ranges as select_ranges
from onnxc.compiler import verify
from onnxc.compiler.calibration import Calibration
from onnxc.compiler.model import save

log = logging.getLogger("onnxc.ort")
LOSSLESS = 1e-5  # relative L2 a float rewrite (affine folding, equalization) may move the outputs


def lap(improvements: dict, key: str, start: float) -> float:
    """Record the seconds a step took in its report entry (when it ran); the time now."""
    now = time.perf_counter()
    if key in improvements:
        improvements[key]["seconds"] = round(now - start, 2)
        log.info("int8 %s: %.1f s", key, now - start)
    return now


def score_dict(s: Score) -> dict:
    return {"error": s.error, "per_channel_error": s.surrogate}


def equalized(pre: Path, work: Path, scorer: Scorer, improvements: dict, notes: list[str]) -> Path | None:
    """Affine folding + cross-layer equalization of the pre-processed model, saved when lossless
    in float (its path), else None; recorded in `improvements["equalization"]`."""
    eq = equalize_model(onnx.load(str(pre)))
    if not eq.changed:
        return None
    drift = scorer.self_error(eq.model)
    entry = {"folded": len(eq.folded), "pairs": [list(p) for p in eq.pairs], "float_rel_l2": drift}
    improvements["equalization"] = entry
    if drift > LOSSLESS:  # a model's float noise can pass 1e-5 (reordered sums): allow twice its own
        noise = verify.reference_noise(onnx.load(str(pre)), scorer.inputs, scorer.float_outputs)
        entry["float_noise"] = noise
        if drift > verify.NOISE_MARGIN * noise:
            entry["kept"] = False
            notes.append(f"equalization moved the float outputs by {drift:.2g} (relative L2; the model's own float "
                         f"noise: {noise:.2g}): not used")
            return None
    return save(eq.model, work / "pre_eq.onnx")


def try_equalize(pre: Path, work: Path, scorer: Scorer, make: Callable, baseline: Score, improvements: dict,
                 notes: list[str]):
    """`equalized`, kept when better in int8 on the held-out samples than `baseline`:
    (pre, quantizer, model, score) or None."""
    path = equalized(pre, work, scorer, improvements, notes)
    if path is None:
        return None
    entry = improvements["equalization"]
    quantizer = make(path)
    model = quantizer(None, [])
    s = scorer(model)
    entry.update(score_dict(s))
    entry["kept"] = s.key() < baseline.key()
    notes.append(f"{entry['folded']} elementwise ops folded into convs and {len(entry['pairs'])} conv pairs "
                 f"equalized: int8 error {baseline.error:.3g} -> {s.error:.3g}"
                 + ("" if entry["kept"] else " (not kept)"))
    return (path, quantizer, model, s) if entry["kept"] else None


def try_bias(pre: Path, work: Path, calibration: Calibration, scorer: Scorer, quantizer: Callable,
             quantized: onnx.ModelProto, make: Callable, batch_for: Callable, baseline: Score, improvements: dict,
             notes: list[str]):
    """Bias correction of the weights' rounding (quant_bias), quantized with the same ranges and
    kept when better on the held-out samples: (quantizer, model, score) or None."""
    cache = getattr(quantizer, "cache", None)
    if cache is None:
        return None
    prepared = onnx.load(str(pre))
    corrected, layers = correct_biases(prepared, quantized, calibration.train,
                                       max(1, batch_for(prepared, calibration)))
    if not layers:
        return None
    path = save(corrected, work / f"{pre.stem}_bias.onnx")
    candidate = make(path, cache.name)
    model = candidate(None, [])
    s = scorer(model)
    kept = s.key() < baseline.key()
    improvements["bias_correction"] = {"layers": len(layers), **score_dict(s), "kept": kept}
    notes.append(f"bias correction of {len(layers)} layers: int8 error {baseline.error:.3g} -> {s.error:.3g}"
                 + ("" if kept else " (not kept)"))
    return (candidate, model, s) if kept else None


# Range variants tried at the model's outputs: each tensor picks among these kinds by its own
# held-out error (percentile alone clips only a tail's last samples; mse may clip far more).
RANGE_VARIANTS = (("minmax", "percentile"), ("minmax", "percentile", "mse"))


def range_files(pre: Path, calibration: Calibration, cache: Path, batch_for: Callable, progress: Progress,
                variants: tuple[tuple[str, ...], ...]) -> list[tuple[Path, dict]]:
    """Per variant, a calibration file beside `cache` (onnxruntime's min/max ranges) whose
    per-tensor ranges are chosen by `quant_ranges` among the variant's kinds; and how many
    tensors took each kind."""
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        TensorData,
        TensorsData,
        load_tensors_data,
        save_tensors_data,
    )

    minmax = load_tensors_data(cache)
    ranges = {}
    for name in minmax:
        lo, hi = (np.asarray(v).reshape(-1) for v in minmax[name].range_value)
        if lo.size == 1 and hi.size == 1:  # per-tensor ranges (the only kind chosen here)
            ranges[name] = (float(lo[0]), float(hi[0]))
    prepared = onnx.load(str(pre))
    choice = select_ranges(prepared, ranges, calibration.train, calibration.validation,
                           max(1, batch_for(prepared, calibration) // 2), progress)
    out = []
    for index, allowed in enumerate(variants):
        picked, counts = choice.pick(allowed)
        data = dict(minmax.items())
        for name, (lo, hi) in picked.items():  # the same shapes as onnxruntime's own entries
            old_lo, old_hi = minmax[name].range_value
            data[name] = TensorData(lowest=np.full(np.shape(old_lo), lo, np.float32),
                                    highest=np.full(np.shape(old_hi), hi, np.float32))
        path = cache.with_name(f"{cache.stem}_ranges{index}.json")
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)
        out.append((path, counts))
    return out


def try_ranges(pre: Path, calibration: Calibration, scorer: Scorer, quantizer: Callable, make: Callable,
               batch_for: Callable, baseline: Score, improvements: dict, notes: list[str], progress: Progress,
               variants: tuple[tuple[str, ...], ...] | None = None):
    """Per-tensor activation ranges (quant_ranges) instead of min/max, in each of `variants`
    (default RANGE_VARIANTS), the best kept when better than min/max on the held-out samples:
    (quantizer, model, score) or None."""
    cache = getattr(quantizer, "cache", None)
    if cache is None or not cache.exists():
        return None
    best, tried = None, []
    variants = variants or RANGE_VARIANTS
    for index, (path, counts) in enumerate(range_files(pre, calibration, cache, batch_for, progress, variants)):
        candidate = make(path.name)
        model = candidate(None, [])
        s = scorer(model)
        tried.append({"allowed": list(variants[index]), "methods": counts, **score_dict(s)})
        if best is None or s.key() < best[2].key():
            best = (candidate, model, s, index)
    kept = best is not None and best[2].key() < baseline.key()
    improvements["ranges"] = {"variants": tried, "kept": variants[best[3]] if kept else None}
    text = "; ".join(f"{'+'.join(t['allowed'])}: {t['error']:.3g}" for t in tried)
    notes.append(f"per-tensor activation ranges, int8 error {baseline.error:.3g} with min/max; {text}"
                 + (f" (kept {'+'.join(variants[best[3]])})" if kept else " (min/max kept)"))
    return best[:3] if kept else None
