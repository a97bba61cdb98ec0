"""Per-candidate sensitivity: the model-output error of each rewrite applied alone, and its saving.

A technique (any pass implementing `technique.Technique`) offers candidates (a channel group, a
layer, a weight) at levels. Each candidate-level is applied alone to the canonical model, fitted
on the calibration split's fitting part, and measured on its held-out part (an in-sample measure
would hide a refit that does not generalize): the error on the model's outputs (the user metric,
else `verify`'s fidelity) and what it saves (MACs, params, bytes). The table is cached on disk
keyed by the model bytes, the calibration data, the techniques' options and the metric, so a
second run with another target only reads it. The levels are not run on the fitted samples as
well: that only showed the overfit beside the held-out error, at a third of the sweep's model
runs; the passes of the chosen plan report their refits' in-sample and held-out errors.

A candidate is not timed alone: one rewrite saves less time than onnxruntime's run-to-run spread
on a shared machine, and timing every candidate-level of a large model many times would take
longer than the rest of the compile. A latency target is planned on the MACs saved (levels are
rounded to the runtime's channel block, so a MAC saved is time saved) and the allocator times
whole models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxc.compiler import memo, runtime
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.cost import model_cost
from onnxc.compiler.model import clone
from onnxc.compiler.passes import Pass, PassContext, available, create
from onnxc.compiler.samples import Samples
from onnxc.compiler.technique import MIN_SHARE, Technique, by_plan_order, is_technique
from onnxc.compiler.verify import TIE_BREAK, amplified_metric, compare_outputs

log = logging.getLogger("onnxc.sensitivity")

# Kinds whose saving is measured whole-model (bytes), not spread over nodes' MACs or params.
BYTE_KINDS = ("size", "activations")
CACHE_VERSION = 8  # bump when what a measurement computes changes (5: the surrogate error; 6: activations;
# 7: the surrogate is the stretched metric; 8: no in-sample error)


def round_to() -> int:
    """The channel/rank multiple the allocator's levels use on this machine's onnxruntime."""
    return runtime.channel_multiple()


@dataclass(frozen=True)
class Candidate:
    technique: str
    name: str  # the technique's name for it (a channel group, a layer)
    levels: tuple[float, ...]
    nodes: tuple[str, ...] = ()  # the nodes it rewrites


@dataclass
class Measurement:
    technique: str
    name: str
    level: float
    error: float  # model-output error with only this rewrite
    saving: dict = field(default_factory=dict)  # {"macs":, "params":, "bytes":}
    seconds: float = 0.0
    applied: bool = True  # False when the technique left the candidate alone at this level
    surrogate: float | None = None  # the default error on the same outputs, when a user metric judges

    @property
    def key(self) -> tuple[str, str, float]:
        return self.technique, self.name, self.level


@dataclass
class Table:
    """Every measurement, the base model's totals, and whether it came from the cache."""

    measurements: list[Measurement]
    base: dict
    cache_path: str | None = None
    cache_hits: int = 0
    measured: int = 0
    seconds: float = 0.0
    nodes: dict = field(default_factory=dict)  # (technique, candidate) -> the nodes it rewrites

    def for_candidate(self, technique: str, name: str) -> list[Measurement]:
        return [m for m in self.measurements if m.technique == technique and m.name == name]

    def to_dict(self) -> dict:
        return {"base": self.base, "cache": self.cache_path, "cache_hits": self.cache_hits,
                "measured": self.measured, "seconds": self.seconds,
                "measurements": [asdict(m) for m in self.measurements]}


# ---- plans: apply a subset of candidates, each at its own level ------------------------------------
Plan = dict[tuple[str, str], float]  # (technique, candidate name) -> level


def apply_plan(model: onnx.ModelProto, plan: Plan, techniques: dict[str, Pass], ctx: PassContext,
               input_shapes: dict | None = None) -> tuple[onnx.ModelProto, list]:
    """`model` with every candidate of `plan` rewritten at its level; returns (model, pass results)."""
    results = []
    current = model
    for technique in by_plan_order(techniques):
        chosen = {name: level for (t, name), level in plan.items() if t == technique and level}
        if not chosen:
            continue
        for p in techniques[technique].restricted(chosen):
            result = p.run(clone(current), ctx)
            results.append((technique, result))
            if result.modified:
                current = canonicalize(result.model, input_shapes)
    return current, results


# ---- candidates ----------------------------------------------------------------------------------


def node_costs(model: onnx.ModelProto, cal, kind: str) -> dict[str, float]:
    """Each node's MACs (parameters for a params target) at the first calibration sample's shapes."""
    field_ = "params" if kind == "params" else "macs"
    return {n.name: float(getattr(n, field_)) for n in model_cost(model, _cost_shapes(cal)).layers}


def candidates(model: onnx.ModelProto, techniques: dict[str, Pass], kind: str, cal=None,
               target_ratio: float | None = None) -> list[Candidate]:
    """Every candidate of every technique that can save `kind` (macs, params, size, latency); for
    all but size, those holding at least MIN_SHARE of the model's cost; at the levels each
    technique offers for the target."""
    costs = node_costs(model, cal, kind) if kind not in BYTE_KINDS else {}
    total = sum(costs.values())

    def large(nodes: Iterable[str]) -> bool:
        return not total or sum(costs.get(n, 0.0) for n in set(nodes)) >= MIN_SHARE * total

    found = []
    for technique in by_plan_order(techniques):
        p = techniques[technique]
        if kind not in p.saves:
            continue
        levels = tuple(p.levels(target_ratio))
        found += [Candidate(technique, c.name, levels, tuple(c.nodes))
                  for c in p.plan_candidates(model, _cost_shapes(cal))
                  if kind in BYTE_KINDS or large(c.nodes)]
    return found


def default_techniques() -> list[Pass]:
    """The techniques of a `--target` run that names none: every registered one planned by default."""
    return [cls() for cls in available().values() if issubclass(cls, Technique) and cls.planned_by_default]


def make_techniques(specs: Iterable[Pass | str] | None, kind: str | None = None) -> dict[str, Pass]:
    """The allocator's techniques, configured for planning a saving of `kind` (`Technique.planned`):
    the user's passes (the options they set kept), or the default ones."""
    from onnxc.compiler.recipe import parse_spec
    from onnxc.errors import UsageError

    out: dict[str, Pass] = {}
    for p in specs or default_techniques():
        if isinstance(p, str):
            p = create(*parse_spec(p))
        if not is_technique(p):
            plannable = ", ".join(k for k, cls in available().items() if issubclass(cls, Technique))
            raise UsageError(f"--target allocates across {plannable}; '{p.id}' has no per-layer levels")
        out[p.id] = p.planned(p.explicit_options(), kind)
    return out


# ---- measuring -----------------------------------------------------------------------------------
def _measure_one(item: tuple[str, str, float], *, model: onnx.ModelProto, specs: dict[str, str],
                 train: list, validation: list, source: str, seed: int, metric, reference: list,
                 base: dict, input_shapes: dict | None, candidate_macs: dict) -> Measurement:
    """One candidate-level applied alone and measured (module level, plain arguments: any executor
    can run it and gets the same result)."""
    from onnxc.compiler import layout
    from onnxc.compiler.calibration import Calibration
    from onnxc.compiler.recipe import parse_spec
    from onnxc.compiler.samples import Samples

    technique, name, level = item
    start = time.perf_counter()
    techniques = {t: create(*parse_spec(spec)) for t, spec in specs.items()}
    cal = Calibration(Samples(train), Samples(validation), source, layout.model_input_axes(model))
    ctx = PassContext(calibration=cal, seed=seed, metric=metric)
    with memo.keeping():  # the next probe captures the same tensors of the same model (`memo`)
        rewritten, results = apply_plan(model, {(technique, name): level}, techniques, ctx, input_shapes)
    applied = any(r.modified for _, r in results)
    if not applied:
        return Measurement(technique, name, level, 0.0, {"macs": 0, "params": 0, "bytes": 0}, 0.0, False)
    outputs = runtime.run(rewritten, cal.validation)
    fid = compare_outputs(Samples(reference), outputs, metric)
    error = _error(fid)
    surrogate = _surrogate(fid, metric, Samples(reference), outputs)
    after = totals(rewritten, cal)
    saving = {k: int(base[k] - after[k]) for k in ("macs", "params", "bytes")}
    saving["latency"] = int(techniques[technique].latency_saving(saving["macs"], candidate_macs[f"{technique}:{name}"],
                                                                level))
    if "activations" in base:
        saving["activations"] = int(base["activations"] - activation_bytes(rewritten, cal))
    return Measurement(technique, name, level, error, saving, time.perf_counter() - start, True, surrogate)


def _surrogate(fid, metric, reference: Samples, outputs) -> float | None:
    """What ranks a candidate when the user metric is starved (`steps.planning_errors`): the
    metric on the candidate's change stretched (`verify.amplified_metric`), its ties broken by
    the per-channel error; the per-channel error alone where the metric cannot read stretched
    outputs. None without a user metric."""
    if metric is None or not np.isfinite(fid.rel_l2):
        return None
    stretched = amplified_metric(metric, reference, outputs)
    if stretched is None:
        return float(fid.surrogate)
    return stretched + TIE_BREAK * float(fid.surrogate)


def activation_bytes(model: onnx.ModelProto, cal) -> int:
    """Peak activation bytes per sample at the first calibration sample's shapes."""
    from onnxc.compiler.activations import peak_bytes

    return peak_bytes(model, _cost_shapes(cal))


def totals(model: onnx.ModelProto, cal) -> dict:
    """Per-sample cost at the first calibration sample's shapes (as the report counts it)."""
    return model_cost(model, _cost_shapes(cal)).totals()


def _cost_shapes(cal) -> dict | None:
    """The first calibration sample's input shapes (`Calibration.cost_shapes`), None without data."""
    return cal.cost_shapes() if cal is not None else None


def _error(fid) -> float:
    return float(fid.error) if np.isfinite(fid.rel_l2) else float("inf")


def first_sample(samples) -> dict[str, np.ndarray]:
    """A one-sample feed (latency is timed at batch 1)."""
    return {k: v[:1] for k, v in Samples.of(samples).groups[0].items()}


def latency_ratio(base: onnx.ModelProto, candidate: onnx.ModelProto, feed: dict, runs: int = 30) -> float:
    """The candidate's onnxruntime time over the base's (one thread, interleaved runs), on the 10th
    percentiles: on a shared machine other processes lengthen some runs of both models, and the
    fastest runs are the model's own time (as benchmarks/channel_block.py compares); medians of
    the same runs carry the other processes' load into the ratio."""
    from onnxc.compiler.bench import bench

    timings = bench([base, candidate], feed, runs=runs, warmup=3, threads=1)
    return float(timings[1].p10_ms / timings[0].p10_ms) if timings[0].p10_ms > 0 else 1.0


def measure(model: onnx.ModelProto, techniques: dict[str, Pass], ctx: PassContext, kind: str, *,
            input_shapes: dict | None = None, cache_dir: str | os.PathLike | None = None,
            target_ratio: float | None = None) -> Table:
    """The sensitivity table of `model` for target `kind` (keeping `target_ratio`), read from or
    added to the disk cache (keyed per candidate-level: a deeper target measures only its new levels)."""
    start = time.perf_counter()
    reference = runtime.run(model, ctx.calibration.validation)
    base = totals(model, ctx.calibration)
    if kind == "activations":  # measured only for this kind (a shape inference per candidate-level)
        base["activations"] = activation_bytes(model, ctx.calibration)
    cands = candidates(model, techniques, kind, ctx.calibration, target_ratio)
    macs = node_costs(model, ctx.calibration, "macs")
    candidate_macs = {f"{c.technique}:{c.name}": sum(macs.get(n, 0.0) for n in set(c.nodes)) for c in cands}
    items = [(c.technique, c.name, float(level)) for c in cands for level in c.levels]
    path = cache_file(model, ctx, techniques, cache_dir)
    cached = _read_cache(path) if path else {}
    known = {key: m for key, m in cached.items() if key in set(items)
             and (kind != "activations" or "activations" in m.saving or not m.applied)}
    missing = [i for i in items if i not in known]
    cal = ctx.calibration
    if missing:
        values = {"model": model, "specs": {t: p.spec() for t, p in techniques.items()},
                  "train": Samples.of(cal.train).groups, "validation": Samples.of(cal.validation).groups,
                  "source": cal.source, "seed": ctx.seed, "metric": ctx.metric,
                  "reference": Samples.of(reference).groups,
                  "base": base, "input_shapes": input_shapes, "candidate_macs": candidate_macs}
        shared = {k: ctx.executor.put(v) for k, v in values.items()}
        for m in ctx.executor.map(_measure_one, missing, shared=shared, label="sensitivity", progress=ctx.progress):
            known[m.key] = m
    memo.clear()
    if path and missing:
        _write_cache(path, {**cached, **known})
    table = Table([known[i] for i in items], base, str(path) if path else None,
                  nodes={(c.technique, c.name): list(dict.fromkeys(c.nodes)) for c in cands},
                  cache_hits=len(items) - len(missing), measured=len(missing))
    table.seconds = time.perf_counter() - start
    return table


# ---- the disk cache --------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    root = os.environ.get("ONNXC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "onnxc")
    return Path(root) / "sensitivity"


def cache_file(model: onnx.ModelProto, ctx: PassContext, techniques: dict[str, Pass],
               cache_dir: str | os.PathLike | None) -> Path | None:
    """<dir>/<sha256 of model bytes, calibration, options, metric, seed>.json (None: caching off)."""
    if cache_dir is False or os.environ.get("ONNXC_NO_CACHE"):
        return None
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}".encode())
    h.update(model.SerializeToString(deterministic=True))
    parts = [(split, group) for split, data in (("train", ctx.calibration.train),
                                                ("validation", ctx.calibration.validation))
             for group in Samples.of(data).groups]
    for (split, arrays), name in ((p, n) for p in parts for n in sorted(p[1])):
        value = arrays[name]
        h.update(f"{split}/{name}".encode())
        h.update(str(value.shape).encode() + str(value.dtype).encode())
        h.update(np.ascontiguousarray(value).tobytes())
    h.update(json.dumps({k: p.spec() for k, p in sorted(techniques.items())}).encode())
    metric = ctx.metric
    h.update(f"{getattr(metric, '__module__', '')}:{getattr(metric, '__qualname__', '')}:{ctx.seed}".encode())
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / f"{h.hexdigest()[:32]}.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if data.get("version") != CACHE_VERSION:
        return {}
    out = {}
    for row in data.get("measurements", []):
        m = Measurement(**row)
        out[m.key] = m
    return out


def _write_cache(path: Path, known: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        from onnxc.compiler.report import write_text_atomic

        rows = [asdict(m) for m in known.values()]
        write_text_atomic(path, json.dumps({"version": CACHE_VERSION, "measurements": rows}))
    except OSError as exc:  # a read-only home must not fail the compile
        log.warning("sensitivity cache not written: %s", exc)

