"""int8 quantization through onnxruntime's own tools, fed by our calibration data.

Static: `quant_pre_process` (shape inference and onnxruntime's basic graph optimizations), then
`quantize_static` in QDQ format with per-channel weights, calibrated (min/max) on the
calibration `.train` samples. Dynamic: `quantize_dynamic` of the MatMul-like layers (Gemm is
lowered to MatMul + Add first, because onnxruntime's dynamic quantizer only handles MatMul).

Before the budget, two things that lose less, each judged on the held-out `.validation` samples
and kept only where it lowers the int8 error there (`quant_improve`): affine folding and
cross-layer equalization of the pre-processed float model (`quant_equalize`, lossless in float),
per-tensor activation ranges chosen by their held-out quantization error (`quant_ranges`), and
bias correction of the weights' rounding (`quant_bias`).

With a fidelity budget (`max_error`, judged as every budget is: per-channel fidelity, or the
user's metric, against the reference outputs) the most sensitive regions stay float
(`nodes_to_exclude`) until the model is within it (`quant_budget`). Calibration runs once per
prepared model and is cached for all of those quantizations.

Saturation: on x86 without VNNI (AVX2, AVX-512F) onnxruntime's fused u8 x s8 kernels add pairs of
products in saturating int16 (vpmaddubsw), so an 8-bit model runs there far from its own QDQ
arithmetic (the digits ResNet: relative L2 0.37 and 4 points of accuracy, against 0.012 unfused).
`reduce_range=None` (auto) scores the quantized model both ways and, when the fused kernels are
that far off, quantizes the weights to 7 bits (onnxruntime's `reduce_range`), which cannot
saturate, and says so. The choice follows the CPU that runs the export, as onnxruntime's own
offline-optimized models do; pass True/False to fix it. `exact=True` (the C backend, whose
kernels sum in int32) scores the QDQ arithmetic itself and never reduces the range.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
from onnx import helper, numpy_helper

from onnxc.backends import Progress, no_progress
from onnxc.backends.quant_budget import Score, Scorer, back_off, regions, resolution_note
from onnxc.backends.quant_improve import (
    equalized,
    lap,
    range_files,
    score_dict,
    try_bias,
    try_equalize,
    try_ranges,
)
from onnxc.compiler import layout, runtime
from onnxc.compiler.calibration import Calibration, input_specs
from onnxc.compiler.int8_regions import QDQ_OPS
from onnxc.compiler.model import EXTERNAL_DATA_THRESHOLD, save, tensor_bytes
from onnxc.compiler.verify import Metric
from onnxc.errors import OnnxcError

log = logging.getLogger("onnxc.ort")

MODES = ("static", "dynamic")
PER_CHANNEL_OPSET = 13  # DequantizeLinear's `axis` (per-channel scales) arrived in opset 13
PER_CHANNEL_IR = 7
# Ops that only move data: quantizing them is exact, so they are not worth a sensitivity run.
DATA_MOVEMENT = {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split",
                 "Identity", "Gather", "Expand", "Tile", "DepthToSpace", "SpaceToDepth"}
DYNAMIC_OP_TYPES = ["MatMul", "Attention", "LSTM"]
# onnxruntime's MinMax calibrator reduces each tensor to its range inside the graph, but its
# session (optimizations off, every tensor an input of a Reduce) keeps every intermediate tensor
# of a batch alive: memory follows the batch times the activations of one sample. Batches are
# sized so that those stay within CALIBRATION_BYTES (ppocr_rec at 1x3x48x320 with 128 lines:
# 3.5 GB peak with batches of 8, 1.14 GB with 2, 0.76 GB with 1, the same quantized bytes).
CALIBRATION_BATCH, CALIBRATION_BYTES = 8, 128 * 2**20


@dataclass
class Quantized:
    """A quantized model and what it took to get it."""

    model: onnx.ModelProto
    mode: str
    quant_format: str
    per_channel: bool = True
    excluded: list[str] = field(default_factory=list)  # nodes left float to stay within the budget
    sensitivity: dict[str, float] = field(default_factory=dict)  # region -> surrogate error when quantized alone
    rel_l2: float | None = None  # per-channel error vs the reference on validation, before lowering
    notes: list[str] = field(default_factory=list)
    reduce_range: bool = False  # weights on 7 bits (see the module docstring)
    budget: dict = field(default_factory=dict)  # what int8 spent: errors before/after, metric, resolution
    improvements: dict = field(default_factory=dict)  # equalization and range choice: errors with and without


# fused error this many times the QDQ arithmetic's (and this much above it) means saturating kernels
SATURATION_RATIO, SATURATION_MARGIN = 2.0, 0.005
# Each improvement costs a calibration or a capture and is kept only where it lowers the held-out
# error: on fewer held-out samples than this, that verdict is noise, so none is tried.
MIN_JUDGING_SAMPLES = 4


def quantize(model: onnx.ModelProto, mode: str, calibration: Calibration, *,
             max_error: float | None = None, metric: Metric | None = None,
             reference: Mapping[str, np.ndarray] | None = None, reduce_range: bool | None = None,
             exact: bool = False, equalize: bool = True, choose_ranges: bool = True, correct_bias: bool = True,
             progress: Progress = no_progress) -> Quantized:
    """Quantize `model` (canonical, float) to int8; the input is not modified.

    Judged on `calibration.validation` against `reference` (outputs of the model the budget is
    measured from, default `model`'s own) with per-channel fidelity and `metric`; with
    `max_error`, the most sensitive regions stay float until within it (`quant_budget`).
    `equalize` tries affine folding and cross-layer equalization, `choose_ranges` per-tensor
    activation ranges, `correct_bias` bias correction (static mode): each is kept only where it
    lowers the held-out error.
    `reduce_range`: None decides from this CPU's onnxruntime kernels (module docstring); `exact`
    scores the QDQ arithmetic instead of onnxruntime's fused kernels (and keeps 8-bit weights).
    `progress` gets the phases "int8: calibration" (samples), "int8: ranges" (samples),
    "int8: sensitivity" (regions scored alone) and "int8: exclusion" (bisection steps), the
    last two only when over `max_error`."""
    if mode not in MODES:
        raise OnnxcError(f"--int8 must be one of {', '.join(MODES)} (got '{mode}')")
    with tempfile.TemporaryDirectory(prefix="onnxc-quant-") as tmp, _quiet(), _working_directory(tmp):
        scorer = Scorer(model, calibration.validation, exact=exact, metric=metric, reference=reference)
        prep = prepare(model, mode, calibration, Path(tmp), scorer, reduce_range=reduce_range, exact=exact,
                       equalize=equalize, choose_ranges=choose_ranges, correct_bias=correct_bias, progress=progress)
        quantizer, full, full_score, notes = prep.quantizer, prep.model, prep.score, prep.notes
        upgraded, reduced, improvements = prep.upgraded, prep.reduce_range, prep.improvements
        result = Quantized(full, mode, "QDQ" if mode == "static" else "QOperator (dynamic)",
                           per_channel=prep.per_channel, notes=notes, reduce_range=reduced, improvements=improvements)
        final, all_float = full_score, False
        if max_error is not None and full_score.error > max_error:
            ops = {n.name: n.op_type for n in full.graph.node}
            candidates = [n for n in quantized_nodes(full) if ops.get(n, ops.get(f"{n}_quant")) not in DATA_MOVEMENT]
            groups = regions(full, candidates, _original_name)
            float_model = upgraded if upgraded is not None else model
            backed = back_off(quantizer, scorer, groups, max_error, float_model, progress)
            result.model, final = backed.model, backed.score
            result.excluded, result.sensitivity = backed.excluded, backed.sensitivity
            all_float = backed.all_float
            if all_float:
                notes.append(f"no int8 model was within --max-error {max_error:g} (every quantized node int8: "
                             f"{full_score.error:.3g}): the model stays float")
            else:
                notes.append(f"left {len(backed.excluded)} of {len(candidates)} quantized nodes float "
                             f"({len(backed.regions_float)} of {len(groups)} regions) to stay within "
                             f"--max-error {max_error:g}")
        result.rel_l2 = final.surrogate
        step, warning = resolution_note(metric, scorer.samples, max_error)
        if warning:
            notes.append(warning)
        result.budget = {
            "max_error": max_error, "metric_used": metric is not None,
            "metric_resolution": step, "resolution_warning": warning, "held_out_samples": scorer.samples,
            "error_before": scorer.float_score.error, "error_all_int8": full_score.error,
            "error_after": final.error, "int8_spent": final.error - scorer.float_score.error,
            "surrogate_before": scorer.float_score.surrogate, "surrogate_after": final.surrogate,
            "all_float": all_float,
        }
        return result


@dataclass
class Prepared:
    """A quantizer for one float model and calibration: `quantizer(only, exclude)` -> QDQ model.

    Its input is the model as quantization prepares it (per-channel opset, onnxruntime's
    pre-processing, and whichever of equalization, chosen ranges and bias correction lowered the
    held-out error); `model`/`score` are every node quantized and how it read (None for a
    preparation `like` another, which quantizes nothing whole)."""

    quantizer: Callable[[Sequence[str] | None, Sequence[str]], onnx.ModelProto]
    model: onnx.ModelProto | None
    score: Score | None
    per_channel: bool
    reduce_range: bool
    upgraded: onnx.ModelProto | None
    notes: list[str] = field(default_factory=list)
    improvements: dict = field(default_factory=dict)


def prepare(model: onnx.ModelProto, mode: str, calibration: Calibration, work: Path, scorer: Scorer, *,
            reduce_range: bool | None = None, exact: bool = False, equalize: bool = True,
            choose_ranges: bool = True, correct_bias: bool = True, progress: Progress = no_progress,
            like: Prepared | None = None) -> Prepared:
    """Everything `quantize` does before the budget, its files in `work` (kept by the caller for
    as long as the quantizer is used; run inside `_quiet()` and `_working_directory`).

    `like`: the preparation of a model this one derives from (the same graph with layers pruned
    or factorized, as each plan the allocator verifies): its measured choices (7-bit weights,
    equalization, which range kinds) are taken again instead of measured against their
    alternatives, which costs a quantization and a held-out run each (`_prepare_like`). The
    ranges and equalization scales themselves are computed for this model. Bias correction
    needs the whole model quantized: with it, the preparation runs whole, trying only what
    `like` kept."""
    notes: list[str] = []
    variants = None
    if like is not None:
        reduce_range = like.reduce_range if reduce_range is None else reduce_range
        equalize = equalize and bool(like.improvements.get("equalization", {}).get("kept"))
        kept_ranges = like.improvements.get("ranges", {}).get("kept")
        choose_ranges = choose_ranges and kept_ranges is not None
        variants = (tuple(kept_ranges),) if kept_ranges is not None else None
        correct_bias = correct_bias and bool(like.improvements.get("bias_correction", {}).get("kept"))
    per_channel = True
    upgraded = upgrade_opset(model, scorer.self_error, notes)
    if upgraded is None:
        per_channel = False
    source = save(_named(upgraded if upgraded is not None else model), work / "float.onnx")
    pre = _preprocess(source, work / "pre.onnx", notes)
    if mode == "dynamic":
        lowered = gemm_to_matmul(onnx.load(str(pre)))
        if lowered is not None:
            pre = save(lowered, work / "pre_matmul.onnx")
        if any(n.op_type == "Conv" for n in model.graph.node):
            notes.append("dynamic mode quantizes MatMul/Gemm layers only: Conv layers stay float "
                         "(use --int8 static for convolutional models)")

    def make(reduced: bool, prepared: Path = pre, cache: str = "calibration.json") -> Callable:
        if mode == "dynamic":
            return _dynamic_quantizer(prepared, work, per_channel, reduced)
        return static_quantizer(model, prepared, work, calibration, per_channel, reduced, progress,
                                 cache=work / cache)

    reduced = bool(reduce_range) and not exact
    if like is not None and mode == "static" and not correct_bias and scorer.samples >= MIN_JUDGING_SAMPLES:
        return _prepare_like(pre, work, calibration, scorer, make, reduced, per_channel, upgraded, notes,
                             equalize, variants[0] if choose_ranges and variants else None, progress)
    quantizer = make(reduced)
    full = quantizer(None, [])
    full_score = scorer(full)
    if reduce_range is None and not exact:
        arithmetic = scorer.exact(full).surrogate
        if full_score.surrogate > SATURATION_RATIO * arithmetic and \
                full_score.surrogate - arithmetic > SATURATION_MARGIN:
            quantizer, reduced = make(True), True
            full, before = quantizer(None, []), full_score.surrogate
            full_score = scorer(full)
            notes.append(f"this CPU's onnxruntime int8 kernels saturate (x86 without VNNI): 8-bit weights gave "
                         f"relative L2 {before:.3g} against {arithmetic:.3g} in exact arithmetic, so weights are "
                         f"quantized to 7 bits (reduce_range): {full_score.surrogate:.3g}")
    improvements: dict = {"plain": score_dict(full_score)}
    if mode == "static" and (equalize or choose_ranges or correct_bias) and scorer.samples < MIN_JUDGING_SAMPLES:
        equalize = choose_ranges = correct_bias = False
        notes.append(f"equalization, range choice and bias correction skipped: {scorer.samples} held-out "
                     f"samples cannot judge them (at least {MIN_JUDGING_SAMPLES} needed)")
    clock = time.perf_counter()
    if mode == "static" and equalize:
        candidate = try_equalize(pre, work, scorer, lambda p: make(reduced, p, "calibration_eq.json"),
                                 full_score, improvements, notes)
        if candidate is not None:
            pre, quantizer, full, full_score = candidate
    clock = lap(improvements, "equalization", clock)
    if mode == "static" and choose_ranges:
        candidate = try_ranges(pre, calibration, scorer, quantizer, lambda cache: make(reduced, pre, cache),
                               _calibration_batch, full_score, improvements, notes, progress, variants)
        if candidate is not None:
            quantizer, full, full_score = candidate
    clock = lap(improvements, "ranges", clock)
    if mode == "static" and correct_bias:
        candidate = try_bias(pre, work, calibration, scorer, quantizer, full,
                             lambda path, cache: make(reduced, path, cache), _calibration_batch, full_score,
                             improvements, notes)
        if candidate is not None:
            quantizer, full, full_score = candidate
    lap(improvements, "bias_correction", clock)
    return Prepared(quantizer, full, full_score, per_channel, reduced, upgraded, notes, improvements)


def _prepare_like(pre: Path, work: Path, calibration: Calibration, scorer: Scorer, make: Callable, reduced: bool,
                  per_channel: bool, upgraded: onnx.ModelProto | None, notes: list[str], equalize: bool,
                  ranges: tuple[str, ...] | None, progress: Progress) -> Prepared:
    """`prepare` taking an earlier preparation's choices as they are: equalization (when still
    lossless in float) and the range kinds it kept, each computed for this model, with nothing
    quantized whole or scored against its alternative (each costs a quantization and a held-out
    run). `model` and `score` are None: what a plan of it reads is judged by its caller."""
    improvements: dict = {}
    if equalize:
        path = equalized(pre, work, scorer, improvements, notes)
        if path is not None:
            pre = path
            improvements["equalization"]["kept"] = True
    quantizer = make(reduced, pre, "calibration_like.json")
    if ranges is not None:
        quantizer.calibrate()
        [(path, counts)] = range_files(pre, calibration, quantizer.cache, _calibration_batch, progress, (ranges,))
        quantizer = make(reduced, pre, path.name)
        improvements["ranges"] = {"variants": [{"allowed": list(ranges), "methods": counts}], "kept": ranges}
    taken = [k for k in ("equalization", "ranges") if improvements.get(k, {}).get("kept")]
    notes.append("prepared like an earlier model: " + (", ".join(taken) or "min/max ranges"))
    return Prepared(quantizer, None, None, per_channel, reduced, upgraded, notes, improvements)


@contextlib.contextmanager
def _working_directory(folder: str) -> Iterator[None]:
    """onnxruntime's quantization tools drop temporary files (`sym_shape_infer_temp.onnx`,
    `<uuid>.data`) into the current directory: keep them in our temporary folder."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def static_op_types() -> frozenset[str]:
    """The op types static quantization quantizes: `quantize_static`'s default when given none."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return frozenset(QDQRegistry) | frozenset(QLinearOpsRegistry)


def quantized_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the compute nodes that read a dequantized tensor or are integer ops (in graph order)."""
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    names = []
    for node in model.graph.node:
        if node.op_type in QDQ_OPS:
            continue
        integer = node.op_type in ("MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul")
        if node.name and (integer or any(i in dq_outputs for i in node.input)):
            names.append(_original_name(node.name))
    return list(dict.fromkeys(names))


def _original_name(name: str) -> str:
    """quantize_dynamic renames MatMul 'x' to 'x_quant'; exclusion lists need the original name."""
    return name[: -len("_quant")] if name.endswith("_quant") else name


# ------------------------------------------------------------------ onnxruntime's tools


def _preprocess(source: Path, target: Path, notes: list[str]) -> Path:
    """`quant_pre_process`; falls back to fewer steps on graphs its symbolic shape inference rejects."""
    from onnxruntime.quantization import quant_pre_process

    external = tensor_bytes(onnx.load(str(source), load_external_data=False)) > EXTERNAL_DATA_THRESHOLD
    attempts = [{}, {"skip_symbolic_shape": True}]
    for kwargs in attempts:
        try:
            quant_pre_process(str(source), str(target), save_as_external_data=external,
                              all_tensors_to_one_file=True, **kwargs)
            if kwargs:
                notes.append("quantization pre-processing ran without symbolic shape inference")
            return target
        except Exception as exc:  # its failures are assorted (shape inference, optimizer)
            last = exc
    notes.append(f"quantization pre-processing failed ({first_line(last)}): quantized the model as is")
    return source


def static_quantizer(model: onnx.ModelProto, pre: Path, work: Path, calibration: Calibration, per_channel: bool,
                      reduce_range: bool, progress: Progress, cache: Path | None = None) -> Callable:
    """`run(only, exclude)` -> the QDQ model; calibration (min/max on `calibration.train`) runs
    once into `cache` (`run.cache`), which later runs read instead."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    cache = cache or work / "calibration.json"
    external = _is_large(pre)
    batch = _calibration_batch(model, calibration)
    counter = iter(range(1 << 30))

    def reader() -> _Reader:
        return _Reader(calibration.train, batch, progress, layout.model_input_axes(model))

    def run(only: Sequence[str] | None, exclude: Sequence[str]) -> onnx.ModelProto:
        out = work / f"q{next(counter)}.onnx"

        def attempt(extra: dict) -> None:
            quantize_static(
                str(pre), str(out), reader() if not cache.exists() else None,
                quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_quantize=list(only) if only else None, nodes_to_exclude=list(exclude),
                use_external_data_format=external, calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=str(cache), extra_options=extra,
            )

        try:
            try:
                attempt({})
            except ValueError as exc:
                # onnxruntime 1.32's per-channel weight-scale adjustment for int32 biases compares an
                # array as a bool on some tf2onnx graphs (magika); the adjustment is optional.
                if "truth value of an array" not in str(exc):
                    raise
                attempt({"QDQDisableWeightAdjustForInt32Bias": True})
        except OnnxcError:
            raise
        except Exception as exc:
            raise OnnxcError(f"onnxruntime's static quantization failed: {first_line(exc)}") from None
        return repair_per_axis(onnx.load(str(out)))

    def calibrate() -> None:
        """Fill `cache` with the min/max ranges as `run` would, without writing a quantized model
        (a preparation that measures nothing against alternatives needs only the ranges)."""
        from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

        if cache.exists():
            return
        try:
            with tempfile.TemporaryDirectory(prefix="onnxc-calib-") as tmp:
                calibrator = create_calibrator(Path(pre), sorted(static_op_types()),
                                               augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                               calibrate_method=CalibrationMethod.MinMax,
                                               use_external_data_format=external)
                calibrator.collect_data(reader())
                save_tensors_data(calibrator.compute_data(), cache)
        except Exception as exc:
            raise OnnxcError(f"onnxruntime's calibration failed: {first_line(exc)}") from None

    run.cache = cache
    run.calibrate = calibrate
    return run


def _dynamic_quantizer(pre: Path, work: Path, per_channel: bool, reduce_range: bool) -> Callable:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = _is_large(pre)
    counter = iter(range(1 << 30))

    def run(only: Sequence[str] | None, exclude: Sequence[str]) -> onnx.ModelProto:
        out = work / f"d{next(counter)}.onnx"
        try:
            quantize_dynamic(str(pre), str(out), op_types_to_quantize=DYNAMIC_OP_TYPES, per_channel=per_channel,
                             reduce_range=reduce_range,
                             weight_type=QuantType.QInt8, nodes_to_quantize=list(only) if only else None,
                             nodes_to_exclude=list(exclude), use_external_data_format=external)
        except Exception as exc:
            raise OnnxcError(f"onnxruntime's dynamic quantization failed: {first_line(exc)}") from None
        return onnx.load(str(out))

    return run


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over our calibration arrays, in batches fed in
    the model's layout (`layout.feeds`: a state's batch on its own axis, shared inputs once)."""

    def __init__(self, inputs: Mapping[str, np.ndarray], batch: int, progress: Progress = no_progress,
                 axes: Mapping[str, int | None] | None = None):
        self._feeds = ((stop - start, feed) for b in runtime.batches(inputs, batch)
                       for start, stop, feed in layout.feeds(b, dict(axes or {})))
        self._progress, self._total, self._done = progress, runtime.sample_count(inputs), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch; progress counts the samples handed out before it (all of them at the end)."""
        self._progress("int8: calibration", self._done, self._total)
        item = next(self._feeds, None)
        if item is None:
            self._progress("int8: calibration", self._total, self._total)
            return None
        self._done += item[0]
        return item[1]

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def _calibration_batch(model: onnx.ModelProto, calibration: Calibration) -> int:
    """Models with a fixed batch dim get batches of exactly that size; others as many samples
    (up to CALIBRATION_BATCH) as keep one batch's activations within CALIBRATION_BYTES, counted
    from every tensor's shape at the largest calibration sample's input shapes."""
    from onnxc.compiler import shapes

    fixed = [s.shape[s.batch_axis] for s in input_specs(model)
             if s.batch_axis is not None and s.shape and isinstance(s.shape[s.batch_axis], int)]
    if fixed:
        return min(fixed)
    groups = calibration.shapes()
    if not groups:
        return CALIBRATION_BATCH
    largest = max(groups, key=lambda g: sum(int(np.prod(v)) for v in g.values()))
    try:
        info = shapes.infer(model, largest)
    except Exception:  # shapes are only an estimate here: fall back to one sample per batch
        return 1
    consts = {t.name for t in model.graph.initializer}
    per_sample = 0
    for name, dims in info.shapes.items():
        if name in consts or not dims:
            continue
        size = np.dtype(helper.tensor_dtype_to_np_dtype(info.dtypes.get(name, onnx.TensorProto.FLOAT))).itemsize
        per_sample += size * int(np.prod([d if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in dims[1:]]))
    return int(max(1, min(CALIBRATION_BATCH, CALIBRATION_BYTES // max(per_sample, 1))))


# ------------------------------------------------------------------ graph preparation


def upgrade_opset(model: onnx.ModelProto, scorer: Callable[[onnx.ModelProto], float], notes: list[str],
                  ) -> onnx.ModelProto | None:
    """The model at an opset with per-channel DequantizeLinear: itself, an upgraded copy that
    computes the same outputs (by `scorer`: relative L2 against the model's own outputs), or None
    when it cannot be upgraded safely (quantize per tensor)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= PER_CHANNEL_OPSET:
        return model
    try:
        upgraded = onnx.version_converter.convert_version(model, PER_CHANNEL_OPSET)
        upgraded.ir_version = max(upgraded.ir_version, PER_CHANNEL_IR)
        error = scorer(upgraded)
    except Exception as exc:  # the converter and onnxruntime raise assorted errors
        notes.append(f"opset {opset} could not be raised to {PER_CHANNEL_OPSET} ({first_line(exc)}): "
                     "weights quantized per tensor")
        return None
    if error > 1e-5:
        notes.append(f"raising opset {opset} to {PER_CHANNEL_OPSET} changed the outputs (relative L2 {error:.2g}): "
                     "weights quantized per tensor")
        return None
    notes.append(f"opset raised from {opset} to {PER_CHANNEL_OPSET} for per-channel weight scales")
    return upgraded


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """Gemm with a constant 2-D weight -> MatMul (+ Add): the form dynamic quantization handles.

    The MatMul keeps the Gemm's name so exclusion lists stay meaningful. Returns None when no
    Gemm qualifies.
    """
    inits = {t.name: t for t in model.graph.initializer}
    nodes, changed = [], False
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        bias = inits.get(node.input[2]) if weight is not None and len(node.input) > 2 and node.input[2] else None
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if weight is None or attrs.get("transA", 0) or (has_bias and bias is None and attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight)
        w = (w.T if attrs.get("transB", 0) else w) * np.float32(attrs.get("alpha", 1.0))
        w_name = _unique(inits, f"{node.input[1]}_matmul")
        inits[w_name] = numpy_helper.from_array(np.ascontiguousarray(w, dtype=w.dtype), w_name)
        model.graph.initializer.append(inits[w_name])
        product = node.output[0] if not has_bias else f"{node.output[0]}_matmul"
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [product], name=node.name))
        if has_bias:
            c_name = node.input[2]
            if bias is not None and attrs.get("beta", 1.0) != 1.0:
                c_name = _unique(inits, f"{node.input[2]}_scaled")
                c = numpy_helper.to_array(bias) * np.float32(attrs["beta"])
                inits[c_name] = numpy_helper.from_array(c.astype(c.dtype), c_name)
                model.graph.initializer.append(inits[c_name])
            nodes.append(helper.make_node("Add", [product, c_name], [node.output[0]], name=f"{node.name}_bias"))
        changed = True
    if not changed:
        return None
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def repair_per_axis(model: onnx.ModelProto) -> onnx.ModelProto:
    """Point each per-channel DequantizeLinear's `axis` at the dim its scales count.

    onnxruntime 1.32's quantizer writes a Gemm bias of shape [1, C] (quant_pre_process fuses
    MatMul + Add into Gemm on tf2onnx graphs such as magika's) with C per-channel scales but
    axis 0: its fused kernels never read the axis, but the model is invalid as written, and any
    run without those fusions (the QDQ arithmetic, other runtimes, our C backend) fails on it.
    The axis is rewritten only where exactly one dim of the tensor has the scales' length."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 2:
            continue
        data, scale = inits.get(node.input[0]), inits.get(node.input[1])
        if data is None or scale is None or len(scale.dims) != 1 or scale.dims[0] <= 1 or len(data.dims) < 2:
            continue
        attr = next((a for a in node.attribute if a.name == "axis"), None)
        axis = attr.i if attr is not None else 1
        axis = axis + len(data.dims) if axis < 0 else axis
        if axis < len(data.dims) and data.dims[axis] == scale.dims[0]:
            continue
        matches = [i for i, d in enumerate(data.dims) if d == scale.dims[0]]
        if len(matches) != 1:
            continue
        if attr is None:
            node.attribute.append(helper.make_attribute("axis", matches[0]))
        else:
            attr.i = matches[0]
    return model


def _unique(taken: Mapping[str, object], base: str) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give unnamed nodes stable names: exclusion lists and reports refer to nodes by name."""
    if all(n.name for n in model.graph.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    taken = {n.name for n in copy.graph.node if n.name}
    for i, node in enumerate(copy.graph.node):
        if not node.name:
            node.name = _unique(taken, f"{node.op_type}_{i}")
            taken.add(node.name)
    return copy


# ------------------------------------------------------------------ plumbing


def _is_large(path: Path) -> bool:
    return path.stat().st_size > EXTERNAL_DATA_THRESHOLD or path.with_name(path.name + ".data").exists()


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (onnxruntime's run to many lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantization tools print to stdout and warn on the root logger: keep stdout
    for data and their advice (already followed) out of the user's way."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        root.setLevel(level)
