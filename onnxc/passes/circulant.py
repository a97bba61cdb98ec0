"""`circulant`: dense layers become block-circulant ones (b numbers per b x b block).

Targets Gemm (transA=0, any transB/alpha/beta, bias vector or none) and MatMul with a constant
2-D weight on the right, including batched activations [..., K] @ [K, N] (a following Add of a
constant bias vector is absorbed and refitted), and with `convs` pointwise Convs (1x1, group 1,
stride 1, no padding: a dense layer over the channel vector of every position, as CirCNN treats
them). Each layer is fitted, checked, timed and emitted:

1. Fit (`_circulant_fit`): with real calibration data, a ridge least-squares fit of every block
   row's parameters to the original layer's outputs, pulled towards the Frobenius projection,
   then the bias; with `sequential` the inputs come from the model as rewritten so far, so each
   layer also absorbs the error of the layers before it. Without data (or with random data) the
   projection alone (averaging along wrapped diagonals), the bias kept. The block grouping of the
   features (contiguous or strided, per side) is the one with the lowest local error; with data,
   each grouping's accumulation and solve is one task on the executor (`--jobs`, Ray), the layer's
   sampled inputs shared once. Layers stay one after another (sequential fits need the previous).
2. Guard: a layer whose local relative output error exceeds `max_layer_error` stays dense.
3. Form (`_circulant_forms`): `shift` (the default: the fastest at batch 1 in
   benchmarks/circulant.py), `fft` or `expand`; with `form=auto` each is timed on a standalone
   one-layer model at the layer's shapes and the fastest kept (ties within 10% go to the earlier
   of shift, fft, expand). `auto` is opt-in because a timed choice follows the machine and its
   load, so it breaks "same input, options and seed give the same bytes". `fft` needs opset 17:
   the model's opset is raised with onnx's version converter when it is lower, and fft is not
   offered when that fails. A pointwise Conv is emitted in the `expand` form (its weight gathered
   from the parameters in the graph), or in the fft form over its channels with `form=fft`; see
   `_circulant_forms`.
4. Padding: features that are not a multiple of the block are zero-padded in the graph with
   `pad=true`, otherwise the layer is skipped with the reason.

As a `Technique` for the allocator, each layer (pointwise convs included) is a candidate and its
levels are block sizes. A level saves parameters and file bytes; MACs only in the fft form (the
shift and expand forms run the dense layer's multiply-accumulates, on a smaller weight or on the
weight rebuilt at session start), so only then does the pass offer itself for a MACs target, and
planned for one it takes the fft form unless the user chose a form. It never offers latency: the
forms that save MACs run slower in onnxruntime than the dense layer (benchmarks/circulant.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import version_converter

from onnxc.compiler import calibration as calib
from onnxc.compiler import runtime
from onnxc.compiler.bench import bench
from onnxc.compiler.graph import GraphView
from onnxc.compiler.model import clone, tensor_nbytes
from onnxc.compiler.passes import Change, Pass, PassContext, PassResult, Skip, matches_any, register
from onnxc.compiler.technique import Candidate, Technique
from onnxc.errors import UsageError
from onnxc.passes import _circulant_fit as fit
from onnxc.passes import _circulant_forms as forms
from onnxc.passes import _circulant_targets as targets_
from onnxc.passes._circulant_targets import Target
from onnxc.passes._dense import opset_version

LAYOUTS = {"contiguous": [(False, False)], "strided": [(True, True)],
           "auto": [(False, False), (False, True), (True, False), (True, True)]}
PREFERENCE = ("shift", "fft", "expand")
TIE = 1.10  # a form must be 10% faster than a preferred one to be chosen over it
MAX_ROWS = 16384  # activation rows per layer used for the fit (sampled beyond)
FIT_FLOPS = 10**11  # accumulation budget per layer (about 5 s on one core)
BATCH = 64  # calibration samples per streamed batch (iter_activations clamps to a fixed batch dim)
# Levels offered to the allocator: block sizes, mildest (least saving) first. Block 32 would save
# 1/32 of a layer more than 16 for a much larger error; block 2 (half a layer) only helps mild targets.
LEVELS = (4, 8, 16)
MILD_LEVELS = (2,)
MILD_TARGET = 0.5  # block 2 is offered for targets that keep at least this fraction


@register
@dataclass
class CirculantPass(Pass, Technique):
    id = "circulant"
    plan_order = 25  # structure: after the factorizations, before storage (cluster)
    planned_by_default = False
    summary = ("block-circulant substitution of Gemm/MatMul and pointwise Conv weights (b numbers per b x b "
               "block), data-aware fit")
    uses_calibration = True
    option_help = {
        "block": "block size b: each b x b block is stored as b numbers",
        "convs": "also rewrite pointwise (1x1) convs (on when the allocator plans circulant, which measures one "
                 "layer at a time; a plain run captures each layer's inputs through the model twice)",
        "layers": "only these layers (node-name globs, | separated)",
        "exclude": "never these layers (node-name globs)",
        "min_features": "skip layers with fewer input or output features",
        "max_layer_error": "leave a layer dense when its local relative output error exceeds this",
        "form": "graph form of Gemm/MatMul layers: shift, fft, expand (direct = shift), or auto (fastest when "
                "timed here; not reproducible); pointwise convs: fft with form=fft, else expand. Planned for a MACs "
                "target, fft unless set",
        "layout": "grouping of features into blocks: auto (lowest error), contiguous, strided",
        "pad": "zero-pad features that are not a multiple of block (otherwise skip the layer)",
        "data_aware": "fit to calibration outputs (projection only when false or data is random)",
        "sequential": "fit each layer to the inputs the already rewritten layers produce",
        "ridge": "ridge strength (relative to the mean input energy) towards the projection",
        "timing_batch": "batch size (and other symbolic dims) used to time the forms",
    }

    block: int = 8
    convs: bool = False
    layers: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    min_features: int = 32
    max_layer_error: float = 0.6
    form: str = "shift"
    layout: str = "auto"
    pad: bool = False
    data_aware: bool = True
    sequential: bool = True
    ridge: float = 0.01
    timing_batch: int = 1
    # Set by the allocator (not a CLI option): layer name -> its own block; only these layers change.
    _levels: dict[str, float] | None = None

    # ---- the Technique protocol ----------------------------------------------------------------
    @property
    def saves(self) -> frozenset[str]:  # type: ignore[override]
        """Parameters and bytes always; MACs only in the fft form (see the module docstring)."""
        return frozenset({"params", "size", "macs"} if self.form == "fft" else {"params", "size"})

    def latency_saving(self, macs_saved: float, candidate_macs: float, level: float) -> float:
        """No time: the forms that remove MACs run slower in onnxruntime than the dense layer, and
        the others run its MACs (see the module docstring)."""
        return 0.0

    def plan_candidates(self, model: onnx.ModelProto, shapes: dict | None = None) -> list[Candidate]:
        """Every layer some level can rewrite."""
        view = GraphView(model.graph)
        found = []
        for t in self._targets(view, blocks=self.levels())[0]:
            nodes = tuple(n.name or n.output[0] for n in (view.producers[o] for o in t.outputs))
            found.append(Candidate(t.name, nodes))
        return found

    def levels(self, target_ratio: float | None = None) -> tuple[float, ...]:
        """Block 2 only for mild targets, and never in the fft form (whose two frequencies per
        block cost more multiply-accumulates than the 2 x 2 block)."""
        mild = (target_ratio is None or target_ratio >= MILD_TARGET) and self.form != "fft"
        return (MILD_LEVELS if mild else ()) + LEVELS

    def restricted(self, levels) -> list[Pass]:
        """One run over the chosen layers, each at its own block: the sequential fit then sees
        every layer rewritten before it, whatever its block."""
        return [replace(self, _levels={name: int(b) for name, b in levels.items()})]

    def planned(self, explicit, kind=None) -> CirculantPass:
        """Pointwise convs and padding on (unless set): every dense layer and pointwise conv is a
        candidate, and every one can take every block at a few padded features. For a MACs
        target the fft form (unless a form was set): the only one whose multiply-accumulates drop."""
        options = {k: True for k in ("pad", "convs") if k not in explicit}
        if kind == "macs" and "form" not in explicit:
            options["form"] = "fft"
        return replace(self, **options)

    def _block(self, t: Target) -> int:
        return self.block if self._levels is None else self._levels[t.name]

    def validate(self) -> None:
        if self.block < 2:
            raise UsageError("pass 'circulant': block must be at least 2")
        if self.form == "direct":
            self.form = "shift"
        if self.form not in ("auto", *forms.FORMS):
            raise UsageError(f"pass 'circulant': form must be auto, {', '.join(forms.FORMS)} or direct")
        if self.layout not in LAYOUTS:
            raise UsageError(f"pass 'circulant': layout must be one of {', '.join(LAYOUTS)}")
        if self.ridge < 0 or self.max_layer_error <= 0 or self.min_features < 0 or self.timing_batch < 1:
            raise UsageError("pass 'circulant': ridge >= 0, max_layer_error > 0, min_features >= 0, "
                             "timing_batch >= 1")

    # ---- driver -------------------------------------------------------------------------------
    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        self.validate()
        targets, skipped = self._targets(GraphView(model.graph))
        if self._levels is not None:
            targets = [t for t in targets if t.name in self._levels]
        if not targets:
            return PassResult(model, False, skipped=skipped)
        cal = ctx.calibration
        aware = self.data_aware and cal is not None and not cal.is_random
        sequential = aware and self.sequential  # the projection has nothing to compensate with
        original = clone(model) if sequential else model
        state = _State(opset=opset_version(model))
        changes: list[Change] = []
        rewritten = False
        for index, t in enumerate(targets):
            ctx.progress("circulant: fits", index, len(targets))
            if t.dims is None and cal is None:
                skipped.append(Skip(t.name, "input shape unknown (calibration data would show it)"))
                continue
            stats = None
            if cal is not None:
                current = model if (sequential and rewritten) else original
                stats = self._activations(t, current, original, cal.train, ctx)
            if isinstance(stats, str):
                skipped.append(Skip(t.name, stats))
                continue
            layer, error, proj_error = self._fit(t, stats, aware, ctx)
            if error > self.max_layer_error:
                skipped.append(Skip(t.name, f"local error {error:.3g} exceeds max_layer_error "
                                            f"{self.max_layer_error:g} (left dense)"))
                continue
            choice = self._choose_form(t, layer, state, ctx, model)
            if not isinstance(choice, str) and choice[0] == "fft" and state.opset < forms.FFT_OPSET:
                model = state.raise_opset(model)  # on failure fft is marked unavailable: choose again
                if state.opset < forms.FFT_OPSET:
                    choice = self._choose_form(t, layer, state, ctx, model)
            if isinstance(choice, str):
                skipped.append(Skip(t.name, choice))
                continue
            form, times = choice
            self._apply(model, t, layer, form, state)
            rewritten = True
            changes.append(self._change(t, layer, form, times, error, proj_error, aware, stats is not None))
        ctx.progress("circulant: fits", len(targets), len(targets))
        if not changes:
            return PassResult(model, False, skipped=skipped, info=state.info())
        view = GraphView(model.graph)
        view.remove_unused()
        _drop_stale_value_info(model.graph)
        info = state.info()
        index_bytes = sum(tensor_nbytes(t) for t in model.graph.initializer if t.name.startswith(forms.PATTERN))
        blocks = sorted({c.detail["block"] for c in changes})
        info.update(block=blocks[0] if len(blocks) == 1 else blocks, data_aware=aware, sequential=sequential,
                    stored_params=sum(c.after["params"] for c in changes), shared_index_bytes=index_bytes)
        return PassResult(model, True, changes, skipped, info)

    # ---- candidates ---------------------------------------------------------------------------
    def _targets(self, view: GraphView, blocks=None) -> tuple[list[Target], list[Skip]]:
        """The layers to rewrite (at their own block, or at any of `blocks`) and the skips. Reads
        the graph only."""
        targets, skipped = [], []
        for node in view.graph.node:
            found = targets_.find(node, view)
            if found is None:
                continue
            if isinstance(found, str):
                reason = found
            else:
                reasons = [self._unsuitable(found, int(b)) for b in blocks] if blocks else [self._unsuitable(found)]
                reason = "" if "" in reasons else reasons[0]
            if reason:
                skipped.append(Skip(node.name or node.output[0], reason))
            else:
                targets.append(found)
        return targets, skipped

    def _unsuitable(self, t: Target, block: int | None = None) -> str:
        if t.channels_first and not self.convs:
            return "pointwise conv (convs=true rewrites it)"
        if self.layers and not matches_any(t.name, self.layers):
            return "not selected by layers"
        if matches_any(t.name, self.exclude):
            return "excluded"
        k, n = t.weight.shape
        if min(k, n) < self.min_features:
            return f"{k}x{n} weight has fewer than min_features={self.min_features} features on a side"
        if block is None:
            if self._levels is not None and t.name not in self._levels:
                return ""  # not planned: dropped by run, never reported
            block = self._block(t)
        if not self.pad and (k % block or n % block):
            return f"{k}x{n} weight: features are not multiples of block={block} (pad=true pads them)"
        kp, np_ = _round_up(k, block), _round_up(n, block)
        if kp * np_ // block >= k * n:
            return f"block={block} would not reduce the {k}x{n} weight's parameters"
        return ""

    # ---- fitting ------------------------------------------------------------------------------
    def _layouts(self, t: Target) -> list[fit.Layout]:
        block = self._block(t)
        kp, np_ = _round_up(t.weight.shape[0], block), _round_up(t.weight.shape[1], block)
        return [fit.Layout(block, kp, np_, i, o) for i, o in LAYOUTS[self.layout]]

    def _activations(self, t: Target, current: onnx.ModelProto, original: onnx.ModelProto,
                     inputs: dict[str, np.ndarray], ctx: PassContext) -> tuple[list[fit.Layout], list] | str:
        """The layouts to try and the layer's sampled inputs: batches of (x from `current`, x from
        `original` or None when they are the same model), float32 as the model computes them.

        Memory and time are bounded: past MAX_FIT_BYTES only the contiguous layout is tried, and
        activation rows are sampled so the accumulation stays within FIT_FLOPS.
        """
        layouts = self._layouts(t)
        if sum(map(fit.fit_bytes, layouts)) > fit.MAX_FIT_BYTES:
            layouts = layouts[:1]
        if fit.fit_bytes(layouts[0]) > fit.MAX_FIT_BYTES:
            return f"fit would need {fit.fit_bytes(layouts[0]) / 2**30:.1f} GiB (use a larger block)"
        budget = min(MAX_ROWS, FIT_FLOPS // sum(fit.row_flops(lay) for lay in layouts))
        keep = None  # the fraction of rows sampled (the shape may only be known from the first batch)
        rng = ctx.rng(f"circulant:{t.name}")
        cur = calib.iter_activations(current, [t.x], inputs, batch_size=BATCH)
        ref = calib.iter_activations(original, [t.x], inputs, batch_size=BATCH) if current is not original else None
        batches = []
        for batch in cur:
            t.observe(batch[t.x])
            if keep is None:
                keep = min(1.0, max(1, budget) / max(1, runtime.sample_count(inputs) * t.rows))
            x = t.matrix(batch[t.x])
            x0 = t.matrix(next(ref)[t.x]) if ref is not None else None
            if keep < 1.0:
                rows = rng.random(len(x)) < keep
                x, x0 = x[rows], (x0[rows] if x0 is not None else None)
            batches.append((x, x0))
        return layouts, batches

    def _fit(self, t: Target, stats: tuple | None, aware: bool,
             ctx: PassContext) -> tuple[forms.CirculantLayer, float, float]:
        """The best layout's parameters, their local error and the projection's local error. With
        data, each layout's normal equations are accumulated and solved as one executor task."""
        if stats is None:  # no data at all: the projection, judged by its weight-space error
            layouts = self._layouts(t)
            fits = [fit.project_only(t.weight, t.bias, lay) for lay in layouts]
        else:
            layouts, batches = stats
            executor = ctx.executor
            shared = {"weight": executor.put(t.weight), "bias": executor.put(t.bias), "batches": executor.put(batches)}
            fits = executor.map(fit.fit_task, [(lay, aware, self.ridge) for lay in layouts], shared=shared,
                                label=f"circulant: fit {t.name}")
        best = None
        for lay, (c, bias, error, proj_error) in zip(layouts, fits):
            if best is None or error < best[2]:
                best = (lay, c, error, proj_error, bias)
        lay, c, error, proj_error, bias = best
        k, n = t.weight.shape
        bias = None if bias is None else np.asarray(bias, np.float64)[:n].astype(np.float32)
        return forms.CirculantLayer(c.astype(np.float32), bias, lay, k, n), float(error), float(proj_error)

    # ---- forms --------------------------------------------------------------------------------
    def _choose_form(self, t: Target, layer: forms.CirculantLayer, state: _State, ctx: PassContext,
                     model: onnx.ModelProto) -> tuple[str, dict] | str:
        if t.channels_first:  # expand unless fft was asked for: the others are slower convs, not timed
            if self.form != "fft":
                return "expand", {}
            fft_ok, fft_reason = state.fft_available(model)
            return ("fft", {}) if fft_ok else fft_reason
        wanted = list(forms.FORMS) if self.form == "auto" else [self.form]
        fft_ok, fft_reason = (True, "") if "fft" not in wanted else state.fft_available(model)
        if "fft" in wanted and not fft_ok:
            if self.form == "fft":
                return fft_reason
            wanted.remove("fft")
        times = state.time_forms(t, layer, wanted, t.timing_shape(self.timing_batch), ctx)
        best = min(times[f] for f in wanted)
        form = next(f for f in PREFERENCE if f in wanted and times[f] <= best * TIE)
        return form, times

    def _apply(self, model: onnx.ModelProto, t: Target, layer: forms.CirculantLayer, form: str,
               state: _State) -> None:
        view = GraphView(model.graph)
        old = [view.producers[name] for name in t.outputs]
        rank = len(t.shape)
        if t.channels_first:
            new = forms.emit_conv(view, layer, t.x, t.y, rank, state.opset, t.name, state.shared, form)
        else:
            new = forms.emit(form, view, layer, t.x, t.y, rank, state.opset, t.name, state.shared)
        view.replace_node(old[0], new)
        for node in old[1:]:
            model.graph.node.remove(node)

    def _change(self, t: Target, layer: forms.CirculantLayer, form: str, times: dict, error: float,
                proj_error: float, aware: bool, measured: bool) -> Change:
        k, n = t.weight.shape
        lay = layer.layout
        dense_params = k * n + (n if t.bias is not None else 0)
        rows = t.rows
        after_macs = rows * (_fft_macs(lay) if form == "fft" else k * n if t.channels_first
                             else lay.in_features * lay.out_features)
        return Change(
            t.name, t.op, f"block-circulant b={lay.block} ({form} form)",
            before={"params": dense_params, "macs": rows * k * n, "bytes": 4 * dense_params},
            after={"params": layer.stored, "macs": after_macs, "bytes": 4 * layer.stored},
            error=error,
            detail={"block": lay.block, "form": form, "form_ms": round(times[form], 4) if form in times else None,
                    "timings_ms": {f: round(v, 4) for f, v in times.items()},
                    "layout": lay.name, "features": [k, n], "padded": [lay.in_features, lay.out_features],
                    "fit": "data-aware" if aware else "projection",
                    "error_kind": "output" if measured else "weight",
                    "projection_error": proj_error, "stored_params": layer.stored,
                    "shared_index_ints": lay.block * lay.block if form in ("shift", "expand") else 0})


# ---- per-run state: opset, shared constants, timing cache -----------------------------------------
@dataclass
class _State:
    opset: int
    raised_from: int | None = None
    fft_reason: str | None = None
    shared: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)

    def fft_available(self, model: onnx.ModelProto) -> tuple[bool, str]:
        if self.opset >= forms.FFT_OPSET:
            return True, ""
        if self.fft_reason is None:
            self.fft_reason = _convert(model)[1]
        return not self.fft_reason, self.fft_reason

    def raise_opset(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The model at opset 17 (IR >= 8), or unchanged with fft marked unavailable."""
        converted, reason = _convert(model)
        if converted is None:
            self.fft_reason = reason
            return model
        self.raised_from, self.opset = self.opset, forms.FFT_OPSET
        return converted

    def time_forms(self, t: Target, layer: forms.CirculantLayer, wanted: list[str], shape: list[int],
                   ctx: PassContext) -> dict[str, float]:
        opset = max(self.opset, forms.FFT_OPSET) if "fft" in wanted else self.opset
        ir = 10 if opset >= 21 else 8 if opset >= 17 else 7
        lay = layer.layout
        key = (tuple(shape), lay, layer.out_features, layer.bias is not None, opset >= 20, t.channels_first)
        todo = [f for f in ["dense", *wanted] if (key, f) not in self.cache]
        if todo:
            conv = t.channels_first
            models = [forms.dense_standalone(t.weight, t.bias, shape, opset, ir, conv) if f == "dense"
                      else forms.standalone(f, layer, shape, opset, ir, conv) for f in todo]
            x = {"x": ctx.rng(f"circulant-timing:{t.name}").standard_normal(shape).astype(np.float32)}
            runs = 15 if t.rows * t.weight.size < 2**26 else 7
            for f, timing in zip(todo, bench(models, x, todo, runs=runs, warmup=2, threads=1)):
                self.cache[(key, f)] = timing.median_ms
        return {f: self.cache[(key, f)] for f in ["dense", *wanted]}

    def info(self) -> dict:
        out = {"opset": self.opset}
        if self.raised_from is not None:
            out["opset_raised_from"] = self.raised_from
        if self.fft_reason:
            out["fft_unavailable"] = self.fft_reason
        return out


# ---- helpers ------------------------------------------------------------------------------------
def _convert(model: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str]:
    """The model lifted to opset 17 by onnx's version converter (which knows the breaking op
    changes and rewrites them), or None and why not."""
    try:
        converted = version_converter.convert_version(model, forms.FFT_OPSET)
        converted.ir_version = max(converted.ir_version, 8)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises many kinds of errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, (f"fft form needs opset {forms.FFT_OPSET}; raising opset {opset_version(model)} failed: "
                      f"{first[:120]}")
    return converted, ""


def _round_up(n: int, b: int) -> int:
    return -(-n // b) * b


def _fft_macs(lay: fit.Layout) -> int:
    f = lay.block // 2 + 1
    log = max(1, int(np.ceil(np.log2(lay.block))))
    return 4 * f * lay.p * lay.q + 2 * (lay.p + lay.q) * lay.block * log


def _drop_stale_value_info(graph: onnx.GraphProto) -> None:
    produced = {o for n in graph.node for o in n.output}
    keep = [v for v in graph.value_info if v.name in produced]
    if len(keep) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)
