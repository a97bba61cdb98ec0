"""Per-candidate sensitivity: the model-output error of each rewrite applied alone, and its saving.

A technique (prune, svd, tucker, cluster) offers candidates (a channel group, a layer, a weight)
at levels (prune: fraction of channels removed; svd/tucker: fraction of the layer's MACs kept;
cluster: code bits). Each candidate-level is applied alone to the canonical model, fitted on the
calibration split's fitting part, and measured on its held-out part (an in-sample measure would
hide a refit that does not generalize): the error on the model's outputs (the user metric, else
`verify`'s fidelity) and what it saves (MACs, params, bytes). The table is cached on disk keyed by
the model bytes, the calibration data, the techniques' options and the metric, so a second run
with another target only reads it.

A candidate is not timed alone: it saves 1-5% of a model's time, less than the run-to-run spread
of onnxruntime on a shared machine, and timing a 3 GMAC detector 60 times per candidate-level
would take hours. A latency target is planned on the MACs saved (levels are rounded to the
runtime's channel block, so a MAC saved is time saved) and the allocator times whole models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from onnxc.compiler import runtime
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.cost import model_cost
from onnxc.compiler.graph import GraphView
from onnxc.compiler.holdout import in_sample
from onnxc.compiler.model import clone
from onnxc.compiler.passes import Pass, PassContext, create
from onnxc.compiler.samples import Samples
from onnxc.compiler.verify import compare_outputs

log = logging.getLogger("onnxc.sensitivity")

CACHE_VERSION = 4  # bump when what a measurement computes changes (3: held-out refits, per-batch positions;
# 4: probabilities judged as logits)
# Levels offered per technique, mildest first.
LEVELS: dict[str, tuple[float, ...]] = {
    "prune": (0.25, 0.5, 0.75),  # fraction of the group's channels removed
    "svd": (0.5, 0.25, 0.125),  # fraction of the layer's MACs kept
    "tucker": (0.5, 0.25, 0.125),
    "cluster": (8, 6, 4),  # code bits
}
# Deeper levels, offered when a target keeps under DEEP_TARGET of the model's cost. Pruning r of the
# channels on both sides of a layer keeps (1 - r)^2 of it, so a target t needs r = 1 - sqrt(t) on
# average (0.61 at t = 0.15) and the allocator needs levels well past that to spare the sensitive
# groups: on the document-orientation classifier at macs=0.15, prune stopped at 0.75 (0.17x MACs)
# and the rest came from Tucker ranks of 4 stacked on pruned layers (4 pages in 80 flipped), where
# 0.875 on the wide late groups reaches 0.14x with every page kept. Under 0.3 (average r 0.45)
# 0.75 leaves no such room; above it, a deeper level would only cost measurements.
DEEP_LEVELS: dict[str, tuple[float, ...]] = {"prune": (0.875,)}
DEEP_TARGET = 0.3


def levels_for(technique: str, target_ratio: float | None = None) -> tuple[float, ...]:
    """The levels measured for `technique` when the target keeps `target_ratio` (None: a budget only)."""
    deep = target_ratio is not None and target_ratio < DEEP_TARGET
    return LEVELS[technique] + (DEEP_LEVELS.get(technique, ()) if deep else ())


ORDER = ("prune", "tucker", "svd", "cluster")  # how a plan is applied: structure first, codes last
SAVES = {"prune": {"macs", "params", "size", "latency"}, "svd": {"macs", "params", "size", "latency"},
         "tucker": {"macs", "params", "size", "latency"}, "cluster": {"size"}}
DEFAULT_TECHNIQUES = ("prune", "svd", "tucker", "cluster")
# Channel counts and ranks the allocator asks for are rounded up to onnxruntime's channel block on
# the machine that compiles (unless the spec sets round_to to another value than the pass's
# default): its blocked (NCHWc) convolutions run
# only counts that are a multiple of it, 8 with AVX2 and 16 with AVX-512 (`runtime.channel_block`).
# Measured here (AMD EPYC, AVX2; benchmarks/channel_block.py): in a 64->C->64 pointwise pair with a
# depthwise conv between, every C that is not a multiple of 4 costs 1.2-1.9x the time of C = 64
# and multiples of 8 are the fastest counts around them (C = 48: 0.8x); rounding to 16 there would
# only take away levels.


def round_to() -> int:
    """The channel/rank multiple the allocator's levels use on this machine's onnxruntime."""
    return runtime.channel_multiple()


@dataclass(frozen=True)
class Candidate:
    technique: str
    name: str  # group name (prune) or node name (svd, tucker, cluster)
    levels: tuple[float, ...]


@dataclass
class Measurement:
    technique: str
    name: str
    level: float
    error: float  # model-output error with only this rewrite
    saving: dict = field(default_factory=dict)  # {"macs":, "params":, "bytes":}
    seconds: float = 0.0
    applied: bool = True  # False when the technique left the candidate alone at this level
    fit_error: float | None = None  # the same error on as many of the samples it was fitted to (in-sample)

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

    def for_candidate(self, technique: str, name: str) -> list[Measurement]:
        return [m for m in self.measurements if m.technique == technique and m.name == name]

    def to_dict(self) -> dict:
        return {"base": self.base, "cache": self.cache_path, "cache_hits": self.cache_hits,
                "measured": self.measured, "seconds": self.seconds,
                "measurements": [asdict(m) for m in self.measurements]}


# ---- plans: apply a subset of candidates, each at its own level ------------------------------------
Plan = dict[tuple[str, str], float]  # (technique, candidate name) -> level


def technique_pass(techniques: dict[str, Pass], technique: str, levels: dict[str, float]) -> Pass:
    """A copy of the user's pass for `technique`, restricted to `levels` (candidate -> level)."""
    base = techniques[technique]
    if technique == "prune":
        return replace(base, _levels=dict(levels))
    if technique in ("svd", "tucker"):
        return replace(base, _levels=dict(levels))
    raise ValueError(technique)


def apply_plan(model: onnx.ModelProto, plan: Plan, techniques: dict[str, Pass], ctx: PassContext,
               input_shapes: dict | None = None) -> tuple[onnx.ModelProto, list]:
    """`model` with every candidate of `plan` rewritten at its level; returns (model, pass results)."""
    results = []
    current = model
    for technique in ORDER:
        chosen = {name: level for (t, name), level in plan.items() if t == technique and level}
        if not chosen:
            continue
        if technique == "cluster":
            runs = [replace(techniques[technique], bits=int(bits), _layers={n for n, b in chosen.items() if b == bits})
                    for bits in sorted(set(chosen.values()), reverse=True)]
        else:
            runs = [technique_pass(techniques, technique, chosen)]
        for p in runs:
            result = p.run(clone(current), ctx)
            results.append((technique, result))
            if result.modified:
                current = canonicalize(result.model, input_shapes)
    return current, results


# ---- candidates ----------------------------------------------------------------------------------
# A structural candidate (a channel group, a layer) whose nodes hold less than this fraction of the
# model's MACs (or parameters) is not measured: it cannot move a target much, and measuring it
# costs as much as measuring a large one (the layout detector has 20 such groups of 50).
MIN_SHARE = 0.01


def node_costs(model: onnx.ModelProto, cal, kind: str) -> dict[str, float]:
    """Each node's MACs (parameters for a params target) at the first calibration sample's shapes."""
    shapes = cal.shapes() if cal is not None else []
    field_ = "params" if kind == "params" else "macs"
    return {n.name: float(getattr(n, field_)) for n in model_cost(model, shapes[0] if shapes else None).layers}


def candidates(model: onnx.ModelProto, techniques: dict[str, Pass], kind: str, cal=None,
               target_ratio: float | None = None) -> list[Candidate]:
    """Every candidate of every technique that can save `kind` (macs, params, size, latency); for
    all but size, those holding at least MIN_SHARE of the model's cost; at `levels_for` the target."""
    costs = node_costs(model, cal, kind) if kind != "size" else {}
    total = sum(costs.values())

    def large(nodes: Iterable[str]) -> bool:
        return not total or sum(costs.get(n, 0.0) for n in set(nodes)) >= MIN_SHARE * total

    found = []
    for technique in ORDER:
        if technique not in techniques or kind not in SAVES[technique]:
            continue
        p = techniques[technique]
        levels = levels_for(technique, target_ratio)
        if technique == "prune":
            names = [g.name for g in p.candidates(clone(model)) if large(g.nodes)]
        elif technique == "cluster":
            names = [t.nodes[0].name for t in p.candidates(model)]
        else:
            names = [layer.name for layer in p.candidates(model, GraphView(model.graph))[0] if large([layer.name])]
        found += [Candidate(technique, n, levels) for n in names]
    return found


def make_techniques(specs: Iterable[Pass | str] | None) -> dict[str, Pass]:
    """The allocator's techniques: the user's configured passes (options kept), default all four."""
    out: dict[str, Pass] = {}
    for p in specs or DEFAULT_TECHNIQUES:
        if isinstance(p, str):
            from onnxc.compiler.recipe import parse_spec

            pass_id, options = parse_spec(p)
            if pass_id in ("prune", "svd", "tucker"):
                options.setdefault("round_to", str(round_to()))
            p = create(pass_id, options)
        if p.id not in LEVELS:
            from onnxc.errors import UsageError

            raise UsageError(f"--target allocates across {', '.join(LEVELS)}; '{p.id}' has no per-layer levels")
        if p.id == "cluster" and p.packing == "auto":  # 5-7 bit codes in bytes would save nothing over 8 bits
            p = replace(p, packing="tight")
        if p.id in ("prune", "svd", "tucker") and p.round_to == type(p)().round_to:  # parsed specs: at the default
            p = replace(p, round_to=round_to())
        out[p.id] = p
    return out


# ---- measuring -----------------------------------------------------------------------------------
def _measure_one(item: tuple[str, str, float], *, model: onnx.ModelProto, specs: dict[str, str],
                 train: list, validation: list, source: str, seed: int, metric, reference: list,
                 fit_reference: list, base: dict, input_shapes: dict | None) -> Measurement:
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
    rewritten, results = apply_plan(model, {(technique, name): level}, techniques, ctx, input_shapes)
    applied = any(r.modified for _, r in results)
    if not applied:
        return Measurement(technique, name, level, 0.0, {"macs": 0, "params": 0, "bytes": 0}, 0.0, False)
    sess = runtime.session(rewritten)  # one session for both splits (building one costs ~15% of a task)
    error = _error(compare_outputs(Samples(reference), runtime.run(sess, cal.validation), metric))
    fitted = in_sample(cal.train, cal.validation)
    fit_error = _error(compare_outputs(Samples(fit_reference), runtime.run(sess, fitted), metric))
    after = totals(rewritten, cal)
    saving = {k: int(base[k] - after[k]) for k in ("macs", "params", "bytes")}
    return Measurement(technique, name, level, error, saving, time.perf_counter() - start, True, fit_error)


def totals(model: onnx.ModelProto, cal) -> dict:
    """Per-sample cost at the first calibration sample's shapes (as the report counts it)."""
    shapes = cal.shapes() if cal is not None else []
    return model_cost(model, shapes[0] if shapes else None).totals()


def _error(fid) -> float:
    return float(fid.error) if np.isfinite(fid.rel_l2) else float("inf")


def first_sample(samples) -> dict[str, np.ndarray]:
    """A one-sample feed (latency is timed at batch 1)."""
    return {k: v[:1] for k, v in Samples.of(samples).groups[0].items()}


def latency_ratio(base: onnx.ModelProto, candidate: onnx.ModelProto, feed: dict, runs: int = 30) -> float:
    """The candidate's onnxruntime time over the base's (one thread, interleaved runs), on the 10th
    percentiles: on a shared machine other processes lengthen some runs of both models, and the
    fastest runs are the model's own time (as benchmarks/channel_block.py compares). Medians of
    the same runs read the layout detector's plan at 0.985 while the benchmark read 0.909."""
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
    cands = candidates(model, techniques, kind, ctx.calibration, target_ratio)
    items = [(c.technique, c.name, float(level)) for c in cands for level in c.levels]
    path = cache_file(model, ctx, techniques, cache_dir)
    cached = _read_cache(path) if path else {}
    known = {key: m for key, m in cached.items() if key in set(items)}
    missing = [i for i in items if i not in known]
    cal = ctx.calibration
    if missing:
        values = {"model": model, "specs": {t: p.spec() for t, p in techniques.items()},
                  "train": Samples.of(cal.train).groups, "validation": Samples.of(cal.validation).groups,
                  "source": cal.source, "seed": ctx.seed, "metric": ctx.metric,
                  "reference": Samples.of(reference).groups,
                  "fit_reference": Samples.of(runtime.run(model, in_sample(cal.train, cal.validation))).groups,
                  "base": base, "input_shapes": input_shapes}
        shared = {k: ctx.executor.put(v) for k, v in values.items()}
        for m in ctx.executor.map(_measure_one, missing, shared=shared, label="sensitivity", progress=ctx.progress):
            known[m.key] = m
    if path and missing:
        _write_cache(path, {**cached, **known})
    table = Table([known[i] for i in items], base, str(path) if path else None,
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

