"""onnxruntime backend: an offline-optimized `.onnx`, or the `.ort` format, optionally int8.

Everything is done by onnxruntime's own tools: graph optimizations are those of an
InferenceSession saving `optimized_model_filepath`; the ORT flatbuffer comes from
`onnxruntime.tools.convert_onnx_models_to_ort`; int8 from `onnxruntime.quantization`
(see `ort_quant`). Levels: "portable" applies the basic (hardware-independent) optimizations, so
the file runs on any machine; "machine" applies all of them, including layout changes
specialised for this CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxc.backends import ExportOptions, register_backend
from onnxc.backends.ort_quant import first_line, quantize
from onnxc.compiler import runtime
from onnxc.compiler.calibration import make_calibration, random_inputs
from onnxc.compiler.interface import MODEL_FIELDS
from onnxc.compiler.model import EXTERNAL_DATA_THRESHOLD, save, serialized_bytes, tensor_bytes
from onnxc.compiler.verify import compare_outputs
from onnxc.errors import OnnxcError, UsageError, VerificationError

# (.onnx level, .ort level). An .onnx file is optimized again when a session loads it, so
# "portable" saves only the basic rewrites; an .ort file is run as saved (no optimizer at load),
# so "portable" saves the extended ones too (operator fusions, QDQ -> integer kernels), which
# are specific to the CPU execution provider but not to the CPU; only "machine" adds the NCHWc
# layouts tuned for this processor's vector width.
LEVELS = {"portable": ("basic", "extended"), "machine": ("all", "all")}
ORT_LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
FORMATS = {".onnx": "onnx", ".ort": "ort"}


@register_backend("onnxruntime")
def export_onnxruntime(model: onnx.ModelProto, out: Path, options: ExportOptions) -> dict:
    """Lower a canonical float model to `out` (.onnx or .ort); returns the report entry."""
    out = Path(out)
    fmt = _check(out, options)
    notes: list[str] = []
    calibration = options.calibration
    if calibration is None and options.int8:
        calibration = make_calibration(model, None, seed=options.seed, input_shapes=options.input_shapes)
    if calibration is not None and calibration.is_random:
        notes.append("no calibration file: int8 ranges and fidelity come from random inputs" if options.int8
                     else "no calibration file: fidelity measured on random inputs")
    lowered, report = model, {}
    decoded = codebook_weights(model)
    if decoded:
        notes.append(_codebook_note(len(decoded), fmt, options.int8))
    if options.int8:
        q = quantize(model, options.int8, calibration, max_error=options.max_error, metric=options.metric,
                     reference=_reference(options, calibration), equalize=options.int8_prepare,
                     choose_ranges=options.int8_prepare, correct_bias=options.int8_prepare,
                     progress=options.progress)
        lowered = q.model
        notes += q.notes
        report = {"quant_format": q.quant_format, "per_channel": q.per_channel,
                  "excluded_nodes": q.excluded, "sensitivity": q.sensitivity, "reduce_range": q.reduce_range,
                  "int8_budget": q.budget, "int8_improvements": q.improvements}
    level_name = LEVELS[options.level][fmt == "ort"]
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        options.progress("compile", 0, 1)
        if fmt == "ort":
            _write_ort(lowered, staged, level_name)
        else:
            # Constant folding would decode codebook weights into dense float in the file.
            keep_codes = bool(codebook_weights(lowered))
            _write_optimized(lowered, staged, ORT_LEVELS[level_name], ["ConstantFolding"] if keep_codes else [])
            if not staged.with_name(staged.name + ".data").exists():
                _tidy_saved(staged, model)
        options.progress("compile", 1, 1)
        fidelity = _fidelity(model, staged, calibration, options)
        if options.max_error is not None and fidelity.error > options.max_error:
            what = "by the metric" if fidelity.metric is not None else "(relative L2, per output channel)"
            against = "original" if _reference(options, calibration) is not None else "float model"
            raise VerificationError(f"the exported model differs from the {against} by {fidelity.error:.3g} "
                                    f"{what}, over the budget {options.max_error:g}")
        size = _size(staged)
        for path in _with_data(staged):
            os.replace(path, out.parent / path.name)
    float_bytes = serialized_bytes(model)
    return {
        "backend": "onnxruntime", "onnxruntime": ort.__version__, "output": str(out), "format": fmt,
        "level": options.level, "optimization": f"ORT_ENABLE_{level_name.upper()}",
        "int8": options.int8, **report,
        "file_bytes": size, "float_bytes": float_bytes, "size_ratio": size / max(float_bytes, 1),
        "fidelity": fidelity.to_dict(), "fidelity_inputs": "validation" if calibration else "random",
        "notes": notes,
    }


def _check(out: Path, options: ExportOptions) -> str:
    """One clear line for every option or path we cannot honour, before any work is done."""
    if out.suffix.lower() not in FORMATS:
        raise UsageError(f"{out}: the onnxruntime backend writes .onnx or .ort files")
    if options.level not in LEVELS:
        raise UsageError(f"unknown optimization level '{options.level}' (choose {' or '.join(LEVELS)})")
    if options.int8 not in (None, "static", "dynamic"):
        raise UsageError(f"--int8 must be static or dynamic (got '{options.int8}')")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxcError(f"{folder}: output folder does not exist")
    if out.is_dir():
        raise OnnxcError(f"{out}: is a directory")
    return FORMATS[out.suffix.lower()]


def codebook_weights(model: onnx.ModelProto) -> list[str]:
    """Outputs of Gather(codebook, codes) computed from initializers only: clustered weights."""
    const = {t.name for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.input and all(i in const for i in node.input if i):
            if node.op_type == "Gather" and node.input[0] in const:
                found.append(node.output[0])
            const.update(node.output)
    return found


def _codebook_note(count: int, fmt: str, int8: str | None) -> str:
    if int8 == "static":
        return (f"{count} codebook (clustered) weights decoded and re-quantized to int8 per channel: "
                "int8 kernels need constant weights to run fast")
    if int8:
        return f"{count} codebook (clustered) weights decoded by the quantization pre-processing"
    if fmt == "ort":
        return (f"{count} codebook (clustered) weights stored decoded: the ORT format holds no uint4 "
                "and runs no optimizer at load")
    return (f"{count} codebook (clustered) weights kept as codes in the file (constant folding disabled "
            "offline); onnxruntime decodes them at session start")


def _write_optimized(model: onnx.ModelProto, target: Path, level: ort.GraphOptimizationLevel,
                     disabled: list[str]) -> None:
    """Let an InferenceSession apply its graph optimizations and save the result."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.optimized_model_filepath = str(target)
    opts.log_severity_level = 3
    if tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                      f"{target.name}.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = save(model, Path(tmp) / "model.onnx")  # a path: external data past 2 GB
        try:
            ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=disabled or None)
        except Exception as exc:
            raise OnnxcError(f"onnxruntime cannot optimize the model: {first_line(exc)}") from None
    if not target.exists():
        raise OnnxcError("onnxruntime did not write the optimized model")


def _tidy_saved(path: Path, source: onnx.ModelProto) -> None:
    """onnxruntime declares every domain it knows when saving (keep the ones the graph uses) and
    stamps itself as producer without the metadata: give the model back the source's fields."""
    model = onnx.load(str(path))
    used = {n.domain or "" for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if (o.domain or "") in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    for name in MODEL_FIELDS:
        setattr(model, name, getattr(source, name))
    # quantization's symbolic shape inference renames dynamic dims: declare the source's I/O again
    declared = {v.name: v for v in [*source.graph.input, *source.graph.output]}
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.name in declared:
            vi.CopyFrom(declared[vi.name])
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)
    save(model, path)


def _write_ort(model: onnx.ModelProto, target: Path, level: str) -> None:
    """onnxruntime's converter to the ORT flatbuffer format (for mobile and minimal builds)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    if tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        raise OnnxcError("the ORT format holds at most 2 GB of weights: export to .onnx instead")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "src" / "model.onnx"
        source.parent.mkdir()
        save(model, source)
        # The converter takes its level from the environment; NCHWc layouts only for "machine" on x86.
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        try:
            with _env("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL", level), \
                    open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), \
                    _log_level("ort_format_model.utils", logging.WARNING):
                convert_onnx_models_to_ort(source, output_dir=Path(tmp) / "out",
                                           optimization_styles=[OptimizationStyle.Fixed],
                                           target_platform="amd64" if level == "all" and x86 else None)
        except Exception as exc:
            raise OnnxcError(f"onnxruntime cannot convert the model to ORT format: {first_line(exc)}") from None
        produced = sorted((Path(tmp) / "out").glob("*.ort"))
        if len(produced) != 1:
            raise OnnxcError("onnxruntime's ORT converter did not produce one .ort file")
        shutil.move(str(produced[0]), target)


def _reference(options: ExportOptions, calibration):
    """The outputs the budget is measured from, when they are for these validation inputs."""
    return options.reference if calibration is not None and calibration is options.calibration else None


def _fidelity(model: onnx.ModelProto, staged: Path, calibration, options: ExportOptions):
    """Outputs of the written file against the reference outputs (else the float model's), on
    held-out (or random) inputs, with the user's metric (progress: "verification", samples)."""
    if calibration is not None:
        inputs = calibration.validation
    else:
        inputs = random_inputs(model, seed=options.seed, input_shapes=options.input_shapes)
    total = 2 * runtime.sample_count(inputs)
    reference = _reference(options, calibration)
    if reference is None:
        reference = runtime.run(model, inputs, progress=lambda done, _: options.progress("verification", done, total))
    written = runtime.run(runtime.session(staged), inputs,
                          progress=lambda done, _: options.progress("verification", total // 2 + done, total))
    return compare_outputs(reference, written, options.metric if calibration is not None else None)


@contextlib.contextmanager
def _log_level(name: str, level: int) -> Iterator[None]:
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _with_data(path: Path) -> list[Path]:
    data = path.with_name(path.name + ".data")
    return [data, path] if data.exists() else [path]  # data first: the model never points at nothing


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in _with_data(path))
