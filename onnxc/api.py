"""The library API: what the CLI calls and what build pipelines import."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from onnxc.backends import ExportOptions
from onnxc.backends import export as backend_export
from onnxc.compiler import calibration as calib
from onnxc.compiler import layout, runtime, shapes, verify
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.cost import ModelCost, model_cost
from onnxc.compiler.executor import Executor, executor_kind, make_executor
from onnxc.compiler.interface import keep_interface
from onnxc.compiler.model import load, save, tensor_bytes
from onnxc.compiler.passes import DEFAULT_BUDGET, Pass, PassContext, PassManager
from onnxc.compiler.recipe import build
from onnxc.compiler.report import Report, budget_text, layer_diff
from onnxc.compiler.verify import Fidelity, Metric, compare_outputs, load_metric
from onnxc.errors import UsageError, VerificationError

log = logging.getLogger("onnxc")

PathLike = str | os.PathLike
CalibrationLike = PathLike | Mapping[str, Any] | Iterable[Mapping[str, Any]] | None


@dataclass
class OptimizeResult:
    model: onnx.ModelProto
    report: Report


def _passes(passes: Sequence[Pass | str] | None, preset: str | None, recipe: PathLike | None):
    specs = [p for p in passes or [] if isinstance(p, str)]
    objects = [p for p in passes or [] if not isinstance(p, str)]
    built = build(specs, preset, recipe)
    return objects + built.passes, built.max_error, built.seed, built.target


def optimize(model: onnx.ModelProto | PathLike, *, passes: Sequence[Pass | str] | None = None,
             preset: str | None = None, recipe: PathLike | None = None, calibration: CalibrationLike = None,
             preprocess: str | None = None,
             input_shapes: Mapping[str, Sequence[int]] | None = None, max_error: float | None = None,
             seed: int | None = None, output: PathLike | None = None, backend: str | None = None,
             export_options: ExportOptions | None = None,
             progress: Callable[[str, int, int], None] | None = None, jobs: int | None = None,
             executor: str | None = None, ray_address: str | None = None, target: str | None = None,
             metric: Metric | str | None = None, plot: PathLike | None = None,
             cache_dir: PathLike | None = None, fit: Sequence[str] | Mapping[str, int] | None = None,
             ) -> OptimizeResult:
    """Canonicalize, run the passes with verification, and optionally save and lower the result.

    `passes` are pass objects or specs (`"prune:ratio=0.5"`). `calibration` is a `.npz`/`.npy`
    file, a folder of samples or images (with `preprocess`), a mapping of arrays or any iterable
    of feed dicts; samples may differ in their dynamic dims. Fidelity is always measured against
    the original model on held-out inputs. The result keeps the source's interface (input and
    output names, types and dims, symbolic ones included, and metadata). With `output`, it is
    written atomically (or lowered by `backend`).
    Per-layer work runs in-process, on `jobs` local processes (`executor="local"`, or `jobs` > 1
    alone) or as Ray tasks (`executor="ray"`, on the cluster at `ray_address` or a local one); the
    output is the same whichever runs it.

    With `target` (`"macs=0.5"`, `params=`, `size=`, `latency=`), or with only `max_error` and no
    passes, the passes are the allocator's techniques (default prune, svd, tucker, cluster): it
    measures every candidate's sensitivity and picks per-candidate levels (see `allocation`).
    `metric(reference_outputs, candidate_outputs) -> float` (or `"module:function"`) replaces the
    default fidelity wherever a budget or target is judged. `plot` writes error against cost.
    """
    from onnxc.compiler import allocation

    metric = load_metric(metric) if isinstance(metric, str) else metric
    goal = allocation.parse_target(target) if isinstance(target, str) else target
    kind = executor_kind(executor, jobs, ray_address)
    with make_executor(kind, jobs or ((os.cpu_count() or 1) if kind != "inline" else 1), ray_address) as workers, \
            runtime.single_threaded_blas():
        return _optimize(model, passes=passes, preset=preset, recipe=recipe, calibration=calibration,
                         preprocess=preprocess, input_shapes=input_shapes, max_error=max_error, seed=seed,
                         output=output, backend=backend, export_options=export_options,
                         progress=progress, executor=workers, goal=goal, metric=metric, plot=plot,
                         cache_dir=cache_dir, fit=fit)


def _optimize(model, *, passes, preset, recipe, calibration, preprocess, input_shapes, max_error, seed, output,
              backend, export_options, progress, executor: Executor, goal, metric, plot, cache_dir, fit=None,
              ) -> OptimizeResult:
    from onnxc.backends.c import fit as device
    from onnxc.compiler import allocation

    pass_list, preset_budget, recipe_seed, preset_target = _passes(passes, preset, recipe)
    if goal is None and preset_target is not None:  # a preset is a target with a budget
        goal = allocation.parse_target(preset_target)
    limits = device.parse_fit(fit)
    if limits and backend != "c":
        raise UsageError("--fit measures the linked microcontroller firmware: it needs --backend c")
    if limits and goal is not None:
        raise UsageError("--fit is the target: give either --fit or --target")
    allocating = goal is not None or bool(limits) or (max_error is not None and not pass_list)
    if plot is not None and not allocating:
        raise UsageError("--plot needs --target (or --max-error without passes): it draws the sensitivity table")
    if plot is not None:
        from onnxc.compiler.plot import check as check_plot

        check_plot(plot)
    seed = seed if seed is not None else (recipe_seed if recipe_seed is not None else 0)
    budget, budget_source = _budget(max_error, preset_budget, preset, recipe)
    source = str(model) if not isinstance(model, onnx.ModelProto) else "<ModelProto>"
    original = load(model)
    file_before = os.path.getsize(model) if not isinstance(model, onnx.ModelProto) else tensor_bytes(original)
    given = dict(input_shapes or {})
    cal = calib.make_calibration(canonicalize(original, layout.free_batch(original, given), infer=False),
                                 calibration, seed=seed, input_shapes=given, preprocess=preprocess)
    shapes = calib.working_shapes(original, cal, given)
    canonical = canonicalize(original, shapes)
    ctx = PassContext(calibration=cal, seed=seed, max_error=budget,
                      progress=progress or (lambda label, done, total: None), executor=executor, metric=metric)
    report = Report(input=source, calibration=cal.source, seed=seed, max_error=budget, budget_source=budget_source,
                    shapes=cal.shapes()[:8])
    if cal.is_random:
        report.notes.append("no calibration file: inputs drawn at random from the input spec; "
                            "lossy passes are fitted to and verified on random data")
    if metric is not None:
        _metric_notes(report, runtime.sample_count(cal.validation), budget, budget_source)
    ref_out = runtime.run(original, cal.validation)
    canon_fid = compare_outputs(ref_out, runtime.run(canonical, cal.validation), metric)
    report.canonical_fidelity = canon_fid.to_dict()
    value_of = None
    if limits:
        from onnxc.compiler.sensitivity import first_sample

        firmware = device.Firmware(shapes, sample=first_sample(cal.validation) if "instructions" in limits else None)
        goal, value_of = _fit_target(canonical, firmware, limits, report)
        allocating = goal is not None or (max_error is not None and not pass_list)
    if allocating:
        int8_backend = backend == "onnxruntime" or (backend == "c" and bool(export_options and export_options.int8))
        result, fidelity, budget = _allocate(canonical, pass_list, ctx, goal, budget, shapes, ref_out, report,
                                             cache_dir, plot, int8_backend=int8_backend, exact=backend == "c",
                                             value_of=value_of, baseline=original)
        if limits and goal is not None:
            _check_fit(result, firmware, limits, report, fidelity)
    else:
        manager = PassManager(pass_list, ctx, input_shapes=shapes)
        result, records = manager.run(canonical, reference_outputs=ref_out)
        report.passes = records
        # The manager verified every applied pass on the validation inputs: reuse its last outputs.
        fidelity = compare_outputs(ref_out, manager.last_outputs, metric) if manager.last_outputs is not None \
            else canon_fid
    report.fidelity = fidelity.to_dict()
    cost_at = cal.cost_shapes()
    before, after = model_cost(canonical, cost_at), model_cost(result, cost_at)
    if before.unknown_dims or after.unknown_dims:
        report.notes.append("MACs count dims no shape fixes as 1: "
                            + ", ".join(sorted(set(before.unknown_dims) | set(after.unknown_dims))))
    report.before, report.after = before.totals(), after.totals()
    report.layers = layer_diff(before, after)
    result = keep_interface(result, original)  # costs above ran at the working shapes; the file keeps the source's
    if budget is not None and fidelity.error > budget:
        report.reference_noise = verify.reference_noise(original, cal.validation, ref_out)
        budget = _noise_budget(report, budget, fidelity.error)
    if budget is not None and fidelity.error > budget:
        what = "by the metric" if metric is not None else "(relative L2, per output channel)"
        raise VerificationError(f"optimized model differs from the original by {fidelity.error:.3g} "
                                f"{what}, over the {budget_text(budget, report.budget_source)}"
                                + (f" (the original's own float noise: {report.reference_noise:.3g})"
                                   if report.reference_noise is not None else ""))
    if output is not None:
        out = Path(output)
        report.output = str(out)
        if backend:
            opts = export_options or ExportOptions()
            # The backend's own stages (int8) are held to the same budget and metric, measured
            # from the original's outputs: what the passes spent is already spent.
            same_data = opts.calibration is None
            opts = replace(opts, calibration=opts.calibration or cal, input_shapes=opts.input_shapes or given,
                           seed=seed, progress=ctx.progress, max_error=budget if opts.max_error is None else
                           opts.max_error, metric=opts.metric or metric,
                           reference=ref_out if same_data else opts.reference)
            if allocating and "int8" in report.allocation.get("techniques", ()) or \
                    planned_int8(result) and not planned_int8(canonical):  # the plan chose what runs in int8
                opts = replace(opts, int8=None)
                report.notes.append("int8 chosen per layer by the passes (verified within the budget): the "
                                    "backend lowers the model as it is, float layers stay float")
            report.backend = backend_export(backend, result, out, opts)
        else:
            save(result, out)
        report.file_bytes = {"before": file_before, "after": _size_on_disk(out)}
    return OptimizeResult(result, report)


def _budget(max_error: float | None, preset_budget: float | None, preset: str | None,
            recipe: PathLike | None) -> tuple[float | None, str]:
    """The fidelity budget and where it comes from (both go into the report): --max-error, else
    the preset's or recipe's, else DEFAULT_BUDGET; --max-error inf means none."""
    if max_error is not None:
        if math.isnan(max_error) or max_error < 0:
            raise UsageError(f"--max-error must be at least 0 (inf for no budget), got {max_error:g}")
        return (None, "none") if math.isinf(max_error) else (max_error, "--max-error")
    if preset_budget is not None:
        return preset_budget, "recipe" if recipe is not None else f"preset {preset}"
    return DEFAULT_BUDGET, "default"


def _metric_notes(report: Report, held_out: int, budget: float | None, source: str) -> None:
    """What a user metric can resolve on the held-out samples, and what that means for the budget.

    A metric that counts samples (lines misread, labels changed) moves in steps of 1/N on N
    held-out samples: a budget below one step admits only a plan the metric cannot tell from the
    original there, and the default budget was chosen for the relative L2, not for the metric."""
    resolution = 1.0 / max(held_out, 1)
    report.metric_resolution = resolution
    if source == "default":
        report.notes.append(f"--metric without --max-error: the default budget {DEFAULT_BUDGET:g} bounds the "
                            "metric's value; set --max-error in the metric's own units")
    elif budget is not None and 0 < budget < resolution:
        report.notes.append(f"warning: --max-error {budget:g} is below the resolution of a metric that counts "
                            f"samples (1/{held_out} = {resolution:.3g} on {held_out} held-out samples): only plans "
                            "it cannot tell from the original there fit; more calibration samples refine it")


def _noise_budget(report: Report, budget: float, error: float) -> float:
    """The budget, widened to the reference run's own float noise when that is what we measured."""
    floor = report.reference_noise or 0.0
    if error <= verify.NOISE_MARGIN * floor:
        report.notes.append(f"error {error:.3g} is over the budget {budget:g} but within {verify.NOISE_MARGIN:g}x "
                            f"the original's own float noise ({floor:.3g}: the original against itself at "
                            "onnxruntime's optimization levels); judged as within the budget")
        return max(budget, verify.NOISE_MARGIN * floor)
    return budget


def _allocate(canonical, pass_list, ctx, goal, budget, shapes, ref_out, report, cache_dir, plot, *,
              int8_backend: bool = False, exact: bool = False, value_of=None, baseline=None):
    """The allocation mode of `optimize`: (model, fidelity, budget) and the report filled in.

    Without passes, the techniques are the default ones, plus int8 where the backend runs it
    (onnxruntime; C with --int8). For the C backend, int8 weights keep all 8 bits: its kernels
    sum in int32 and cannot saturate as onnxruntime's x86 kernels without VNNI do."""
    from onnxc.compiler import allocation
    from onnxc.compiler.passes import PassRecord
    from onnxc.compiler.sensitivity import default_techniques, make_techniques

    specs = list(pass_list) if pass_list else default_techniques() + (["int8"] if int8_backend else [])
    techniques = make_techniques(specs, allocation.planned_kind(goal))
    if exact and "int8" in techniques and techniques["int8"].reduce_range == "auto":
        techniques["int8"] = replace(techniques["int8"], reduce_range="off")
    source = report.budget_source
    asked = None if source == "default" else (math.inf if budget is None else budget)  # None: the default
    alloc = allocation.allocate(canonical, techniques, ctx, goal, asked, input_shapes=shapes,
                                reference_outputs=ref_out, cache_dir=cache_dir, value_of=value_of,
                                baseline=baseline)
    report.allocation = {**alloc.to_dict(), "techniques": list(techniques)}
    report.max_error = alloc.budget if math.isfinite(alloc.budget) else None
    if goal is not None and not alloc.met:
        report.notes.append(f"target {goal} not met within the budget: reached {alloc.achieved:.3f}")
    held_out = runtime.sample_count(ctx.calibration.validation)
    if alloc.fidelity.samples > held_out:
        report.notes.append(f"the metric reads 0 for most single rewrites on {held_out} held-out samples: candidates "
                            f"were ranked by the metric on their changes stretched (how near they bring samples to "
                            f"a different reading), and plans judged on all {alloc.fidelity.samples} "
                            f"calibration samples (the fitted ones too), whose steps are finer")
    table = alloc.table
    report.notes.append(f"sensitivity: {len(table.measurements)} candidate-levels, {table.cache_hits} from the cache, "
                        f"{table.measured} measured in {table.seconds:.1f} s")
    for technique, result in alloc.results:
        p = techniques[technique]
        report.passes.append(PassRecord(p.id, p.spec(), "applied" if result.modified else "unchanged",
                                        changes=result.changes, skipped=result.skipped, info=result.info,
                                        label=p.short_spec()))
    if plot is not None:
        from onnxc.compiler.plot import plot_allocation

        plot_allocation(alloc, plot)
    return alloc.model, alloc.fidelity, report.max_error


def _fit_target(canonical: onnx.ModelProto, firmware, limits: dict[str, int], report: Report):
    """The allocator's target for `--fit`: the firmware's flash, RAM and instructions against the
    limits, as one value (the largest footprint / limit: 1 fits), measured on every verified plan;
    planned on what tracks the limit the model is furthest from (allocation.PLANNED_AS: instructions
    as time, in MACs with int8's speedup; RAM as peak activation bytes; flash as size). Returns
    (None, None) when the model fits as it is."""
    from onnxc.backends.c import fit as device
    from onnxc.compiler.allocation import TOLERANCE, Target

    base = firmware(canonical)
    report.device = {"limits": limits, "before": base}
    start = device.over(base, limits)
    if start <= 1.0:
        report.notes.append(f"--fit: the model fits as it is ({device.describe(base, limits)})")
        return None, None
    # met when value / start <= ratio + the allocator's tolerance: exactly when the firmware fits
    ratio = max(1.0 / start - TOLERANCE, 1e-6)
    kind = {"instructions": "device_instructions", "ram": "device_ram"}.get(device.binding(base, limits), "device")
    return Target(kind, ratio), lambda m: device.over(firmware(m), limits)


def _check_fit(result: onnx.ModelProto, firmware, limits: dict[str, int], report: Report, fidelity) -> None:
    """The chosen plan's firmware (built when the allocator verified it); one line when nothing
    within the budget fits."""
    from onnxc.backends.c import fit as device

    after = firmware(result)
    report.device["after"] = after
    if device.over(after, limits) > 1.0:
        raise VerificationError(f"--fit: the best plan within the budget takes {device.describe(after, limits)} "
                                f"({device.over(after, limits):.2f}x the limit) at error {fidelity.error:.3g}; "
                                "raise --max-error, add techniques (-p int8 with --int8, prune, cluster) or the limits")


def planned_int8(model: onnx.ModelProto) -> bool:
    """Whether `model` already holds quantized layers (QuantizeLinear/DequantizeLinear pairs)."""
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def _size_on_disk(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    size = path.stat().st_size if path.exists() else 0
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.exists() else 0)


def export(model: onnx.ModelProto | PathLike, backend: str, output: PathLike, *, int8: str | None = None,
           calibration: CalibrationLike = None, preprocess: str | None = None,
           input_shapes: Mapping[str, Sequence[int]] | None = None,
           name: str = "net", seed: int = 0, max_error: float | None = None, level: str = "portable",
           metric: Metric | str | None = None,
           progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Lower a model with a backend; returns the backend's report.

    The onnxruntime backend writes a model with the source's interface (dynamic dims stay
    dynamic); the C backend needs, and keeps, the concrete shapes `input_shapes` fixes.
    With `max_error`, the written model is held to it against the source model on held-out
    calibration samples, judged per output channel or by `metric` (`"module:function"` or a
    function); int8 leaves its most sensitive nodes float to stay within it.
    `progress(phase, done, total)` follows int8 calibration, sensitivity and exclusion, the
    compile and the verification.
    """
    calib.calibration_data.check_preprocess(calibration, preprocess)
    metric = load_metric(metric) if isinstance(metric, str) else metric
    if max_error is not None and (math.isnan(max_error) or max_error < 0):
        raise UsageError(f"--max-error must be at least 0 (inf for no budget), got {max_error:g}")
    if max_error is not None and math.isinf(max_error):
        max_error = None
    original = load(model)
    shapes = dict(input_shapes or {})
    canonical = canonicalize(original, layout.free_batch(original, shapes))  # the C backend fixes `shapes`
    if backend == "onnxruntime":
        canonical = keep_interface(canonical, original)
    cal = None
    if int8 or calibration:
        cal = calib.make_calibration(canonical, calibration, seed=seed, input_shapes=shapes, preprocess=preprocess)
    opts = ExportOptions(int8=int8, calibration=cal, name=name, input_shapes=shapes, seed=seed,
                         max_error=max_error, metric=metric, level=level)
    if progress is not None:
        opts.progress = progress
    return backend_export(backend, canonical, Path(output), opts)


def compare(reference: onnx.ModelProto | PathLike, candidate: onnx.ModelProto | PathLike, *,
            calibration: CalibrationLike = None, preprocess: str | None = None,
            input_shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0,
            metric: Metric | str | None = None) -> Fidelity:
    """Fidelity of `candidate` against `reference` on calibration (or random) inputs."""
    calib.calibration_data.check_preprocess(calibration, preprocess)
    metric = load_metric(metric) if isinstance(metric, str) else metric
    a, b = load(reference), load(candidate)
    if calibration is not None:
        inputs, _ = calib.calibration_data.load(calibration, a, preprocess)
    else:
        inputs = calib.random_inputs(canonicalize(a, layout.free_batch(a, input_shapes or {}), infer=False),
                                     seed=seed, input_shapes=input_shapes)
    return verify.compare(a, b, inputs, metric)


def inspect(model: onnx.ModelProto | PathLike, input_shapes: Mapping[str, Sequence[int]] | None = None):
    """Per-layer cost of the canonical model at `input_shapes`, else at the stated default shapes."""
    return inspect_model(model, input_shapes)[1]


def inspect_model(model: onnx.ModelProto | PathLike, input_shapes: Mapping[str, Sequence[int]] | None = None,
                  ) -> tuple[onnx.ModelProto, ModelCost]:
    """The canonical model with every shape found at the input shapes used, and its cost."""
    original = load(model)
    used, origin = shapes.resolve_input_shapes(original, input_shapes)
    canonical = canonicalize(original)
    info = shapes.infer(canonical, used)
    cost = model_cost(canonical, shapes=info)
    cost.shapes_origin = origin
    return shapes.with_shapes(canonical, info), cost
