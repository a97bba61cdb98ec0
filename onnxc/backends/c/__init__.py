"""C code generator for microcontrollers: `onnxc export MODEL --backend c -o DIR --name NAME`.

Pipeline: `prepare` (static shapes, export-time folding, clustered weights recognised) ->
`lowering` (kernel calls, activation fusion) -> `planner` (one static arena: lifetimes, views,
in-place execution, greedy-by-size offsets) -> `emitter` (NAME.h, NAME.c, kernel files). The
output directory is built beside the target and renamed into place, so a failed export leaves
nothing behind.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import onnx

from onnxc.backends import ExportOptions, register_backend
from onnxc.backends.c import emitter
from onnxc.backends.c.lower_quant import int8_entry
from onnxc.backends.c.lowering import lower
from onnxc.backends.c.planner import Plan, naive_peak, plan
from onnxc.backends.c.prepare import prepare
from onnxc.backends.c.program import Program
from onnxc.backends.c.scale_snap import snap_weight_scales
from onnxc.backends.c.weights import weight_bytes
from onnxc.errors import OnnxcError, UsageError

__all__ = ["export_c", "compile_model", "GeneratedModel"]


class GeneratedModel:
    """A lowered and planned model (what `export_c` writes), for tests and benchmarks."""

    def __init__(self, prog: Program, plan: Plan, source: str):
        self.prog, self.plan, self.source = prog, plan, source

    @property
    def arena_bytes(self) -> int:
        return self.plan.arena

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self.prog.consts)

    def write(self, out_dir: Path) -> list[str]:
        """Write NAME.h, NAME.c and the kernel files into an existing directory."""
        name = self.prog.name
        (out_dir / f"{name}.h").write_text(emitter.header(self.prog, self.plan, self.weight_bytes, self.source))
        (out_dir / f"{name}.c").write_text(emitter.source(self.prog, self.plan, self.source))
        return [f"{name}.h", f"{name}.c"] + emitter.copy_kernels(self.prog, out_dir, self.plan)

    def report(self) -> dict:
        prog, pl = self.prog, self.plan
        tensors = []
        for name, loc in pl.locations.items():
            tensors.append({"name": name, "location": loc.root, "offset": pl.address(name),
                            "bytes": prog.nbytes(name), "first_step": pl.first_use.get(name, 0),
                            "last_step": pl.last_use.get(name, 0),
                            "buffer": loc.index if loc.root == "arena" else None})
        return {"backend": "c", "name": prog.name, "arena_bytes": self.arena_bytes,
                "weight_bytes": self.weight_bytes, "naive_peak_bytes": naive_peak(prog),
                "steps": len(prog.steps), "ops": dict(sorted(prog.source_ops.items())),
                "in_place_steps": sorted(pl.inplace | _same_storage_steps(prog, pl)),
                "clustered_weights": sum(1 for w in prog.weights.values() if w.codes) + len(prog.coded_int8),
                "scratch_bytes": {str(s): b.size for s, b in pl.scratch.items()},
                "pinned_inputs": dict(prog.pinned), "tensors": tensors}


def _same_storage_steps(prog: Program, pl: Plan) -> set[int]:
    """Computing steps whose output took their first input's place in the arena."""
    return {s for s, step in enumerate(prog.steps)
            if step.view is None and pl.same_storage(step) and pl.locations[step.inputs[0]].root == "arena"}


def compile_model(model: onnx.ModelProto, name: str = "net", input_shapes=None,
                  source: str = "model", values=None) -> GeneratedModel:
    """Prepare, lower and plan `model` (canonical or not); raises OnnxcError on unsupported ops.
    `values`: input values the firmware is built for (branch selectors such as a sample rate)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name or ""):
        raise UsageError(f"--name '{name}' is not a C identifier")
    static, clustered, pinned = prepare(model, dict(input_shapes or {}), values)
    prog = lower(static, clustered, name)
    prog.pinned = {k: v.reshape(-1)[0].item() for k, v in pinned.items()}
    prog.entry_int8 = int8_entry(prog)
    return GeneratedModel(prog, plan(prog), source)


@register_backend("c")
def export_c(model: onnx.ModelProto, out: Path, options: ExportOptions) -> dict:
    source = model.graph.name or "model"
    quant = {}
    if options.int8:
        model, quant = quantize_for_c(model, options)
    options.progress("compile", 0, 2)
    values = None
    if options.calibration is not None:  # the firmware's branch: the one the data takes
        first = next(options.calibration.train.batches(1), {})
        values = {k: v[0] for k, v in first.items()}
    gen = compile_model(model, options.name, options.input_shapes, source, values)
    options.progress("compile", 1, 2)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OnnxcError(f"{out}: exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files = gen.write(tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "dir")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    options.progress("compile", 2, 2)
    report = gen.report()
    report["files"] = files
    report["output"] = str(out)
    if quant:
        report["int8"] = {**quant, "entry_point": f"{options.name}_run_int8" if gen.prog.entry_int8 else None}
    return report


def quantize_for_c(model: onnx.ModelProto, options: ExportOptions) -> tuple[onnx.ModelProto, dict]:
    """The QDQ model of our onnxruntime int8 flow (same calibration, per-channel weights, per-node
    sensitivity exclusion under --max-error), which the C backend lowers to integer kernels, with
    its weight scales snapped for exact packing (`scale_snap`)."""
    from onnxc.backends.ort import codebook_weights
    from onnxc.backends.ort_quant import quantize
    from onnxc.compiler.calibration import make_calibration

    if options.int8 != "static":
        raise UsageError("C backend: --int8 dynamic is not supported (scales computed at run time); use static")
    calibration = options.calibration or make_calibration(model, None, seed=options.seed,
                                                          input_shapes=options.input_shapes)
    notes = []
    if calibration.is_random:
        notes.append("no calibration file: int8 ranges come from random inputs")
    clustered = codebook_weights(model)
    if clustered:
        notes.append(f"{len(clustered)} clustered weights quantized to int8 per output channel; the int8 kernels keep "
                     "those whose rows hold at most 16 values as 4-bit codes with an int8 codebook per output channel "
                     "(report: clustered_weights)")
    reference = options.reference if calibration is options.calibration else None
    q = quantize(model, "static", calibration, max_error=options.max_error, metric=options.metric,
                 reference=reference, exact=True, progress=options.progress)
    snapped = snap_weight_scales(q.model)
    if snapped:
        notes.append(f"{len(snapped)} layers: weight scales moved by < 2^-12 so that each channel's bias and "
                     "float32 requantization scale pack exactly in one word")
    return q.model, {"quant_format": q.quant_format, "per_channel": q.per_channel, "excluded_nodes": q.excluded,
                     "rel_l2_onnxruntime": q.rel_l2, "int8_budget": q.budget, "int8_improvements": q.improvements,
                     "notes": notes + q.notes}
