"""The skeleton shared by the decomposition passes (svd, tucker, cp).

Each pass finds its candidate layers, gathers the input moments of all of them in one streaming
pass over the calibration data (when fitting to data), then replaces each layer by a chain of
smaller layers with an activation tensor between them (so no runtime can fold the factors back
into one weight), and reports rank, cost and local error per layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx

from onnxc.compiler import holdout, runtime
from onnxc.compiler.canonical import infer_shapes
from onnxc.compiler.graph import GraphView, attr
from onnxc.compiler.linear import LinearLayer, float_const  # float_const: also imported from here
from onnxc.compiler.model import clone
from onnxc.compiler.passes import Change, Pass, PassContext, PassResult, Skip, matches_any
from onnxc.compiler.technique import Candidate, Technique
from onnxc.passes import _whiten
from onnxc.passes._rank import RankRule, validate_rule

RECAPTURE_RIDGE = 1e-2  # the recapture refit's ridge and patch rows per layer: prune's defaults
RECAPTURE_SAMPLES = 8192
MAX_STATS_DIM = 4096  # larger input rows fall back to weight-only fitting (a D x D float64 moment)


@dataclass
class Layer:
    """A candidate: the node, its input rows for statistics, and what the pass needs to fit it."""

    node: onnx.NodeProto
    rows: tuple[str, int, _whiten.Rows] | None  # (tensor, row dim, rows function) or None
    info: dict = field(default_factory=dict)  # pass-specific; "weights": the weight count

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]

    def __post_init__(self) -> None:
        if "w" in self.info:
            self.info.setdefault("weights", int(self.info["w"].size))


@dataclass
class Fitted:
    """A rewrite ready to apply: the nodes replacing the layer and its report entry. It is plain
    data (it may come back from a worker process): `updates` are edits outside the new nodes, made
    only if the rewrite is kept, as (output of the node to edit, input index, new constant)."""

    nodes: list[onnx.NodeProto]
    change: Change
    updates: list[tuple[str, int, np.ndarray]] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)  # the new nodes' constants
    aug: tuple[np.ndarray, np.ndarray] | None = None  # the layer's [W b] and the rewrite's, for held-out errors


# Levels offered to the allocator: the fraction of a layer's MACs kept, mildest first.
LEVELS = (0.5, 0.25, 0.125)


@dataclass
class FactorPass(Pass, Technique):
    """Options and the run loop common to svd, tucker and cp; subclasses define the layer logic.
    Each candidate of the allocator is one layer; its levels are MAC ratios (`ratio` per layer)."""

    uses_calibration = True
    default_error_limits: ClassVar[dict[str, float]] = {}  # max_layer_error when unset, by error kind

    rank: int | None = None
    energy: float | None = None
    auto: bool = False
    ratio: float = 0.5
    round_to: int = 8
    data_aware: bool | None = None
    min_params: int = 4096
    max_layer_error: float | None = None
    layers: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    recapture: bool = True
    judge: bool = True
    # Set by the allocator (not a CLI option): node name -> its own MAC ratio; only these layers change.
    _levels: dict[str, float] | None = None

    common_help = {
        "rank": "fixed rank for every layer (clamped to what the layer allows)",
        "energy": "keep this fraction of the (whitened) singular-value energy, e.g. 0.95",
        "auto": "choose ranks by empirical VBMF (noise level estimated from the spectrum)",
        "ratio": "fraction of each layer's MACs kept (the default rule)",
        "round_to": "round ranks to a multiple of this (8: blocked conv/GEMM kernels run them faster)",
        "data_aware": "fit to the layer inputs' covariance (default: on with real calibration data)",
        "min_params": "leave layers with fewer weights alone",
        "max_layer_error": "drop a layer's rewrite when its local relative error exceeds this",
        "layers": "only these node names (globs, |-separated)",
        "exclude": "skip these node names (globs, |-separated)",
        "judge": "run the model with and without the fits to data on held-out samples and keep the weights' own "
                 "factors where the fits read them worse (off: trust the per-layer held-out checks alone; faster)",
        "recapture": "with data, refit each rewrite's last layer (and bias) layer by layer to the original "
                     "outputs from the inputs it sees in the factorized model, so errors upstream are "
                     "compensated instead of carried (kept where it helps held-out samples)",
    }

    def rule(self) -> RankRule:
        return RankRule(self.rank, self.energy, self.auto, self.ratio, self.round_to)

    def validate(self) -> None:
        validate_rule(self.id, self.rule())
        if self.max_layer_error is not None and self.max_layer_error <= 0:
            from onnxc.errors import UsageError

            raise UsageError(f"pass '{self.id}': max_layer_error must be > 0")

    # ---- to be provided by each pass ------------------------------------------------------------
    def candidate(self, node: onnx.NodeProto, view: GraphView, model: onnx.ModelProto) -> Layer | str | None:
        """A Layer, a skip reason, or None when the node is not this pass's kind of layer."""
        raise NotImplementedError

    def fit(self, layer: Layer, view: GraphView, moments: _whiten.Moments | None, ctx: PassContext,
            ) -> Fitted | str:
        """The replacement for one layer, or the reason it is left alone."""
        raise NotImplementedError

    # ---- the loop -------------------------------------------------------------------------------
    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        with runtime.single_threaded_blas():
            return self._run(model, ctx)

    def _run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        original = clone(model)
        layers, skipped = self.candidates(model, GraphView(model.graph))
        aware = self.use_data(ctx)
        stats = self.moments(model, layers, ctx) if aware else {}
        fits = self._fit_all(model, layers, stats, ctx)
        info = {"rule": self.rule().name, "data_aware": bool(aware and stats)}
        held = self.moments(model, layers, ctx, ctx.calibration.validation) \
            if stats and holdout.has_held_out(ctx.calibration) else {}
        if held:  # the fits to data against the weights' own factors, on held-out samples
            plain = self._fit_all(model, layers, {}, ctx)
            chosen = [_judge(layer, fit, alt, stats, held) for layer, fit, alt in zip(layers, fits, plain)]
            kept = [c for c, fit in zip(chosen, fits) if c is fit and isinstance(fit, Fitted)]
            if kept and self.judge:
                # the same layers rewritten on both sides: where a layer's weights-only factors are
                # refused (over max_layer_error), the fallback keeps its fit to data, so the judge
                # compares fits, not a model with fewer layers rewritten
                fallback = [alt if isinstance(alt, Fitted) and _within(self, alt) else c
                            for c, alt in zip(chosen, plain)]
                refit_model, _, _ = self._apply(clone(original), layers, chosen, stats, ctx)
                plain_model, _, _ = self._apply(clone(original), layers, fallback, stats, ctx)
                verdict = holdout.judge_model(holdout.Reference(original, ctx.calibration, ctx.metric),
                                              refit_model, plain_model)
                info["model_refit"] = verdict.detail()
                if not verdict.kept:
                    chosen = fallback
            fits = chosen
        model, changes, more = self._apply(model, layers, fits, stats, ctx)
        skipped += more
        if changes and stats and self.recapture:
            model = self._recapture(original, model, layers, changes, ctx, info)
        info.update(ranks={c.node: c.detail.get("rank", c.detail.get("ranks")) for c in changes},
                    layers_rewritten=len(changes))
        return PassResult(model, bool(changes), changes, skipped, info)

    def _recapture(self, original: onnx.ModelProto, model: onnx.ModelProto, layers: list[Layer],
                   changes: list[Change], ctx: PassContext, info: dict) -> onnx.ModelProto:
        """Sequential refit: the last layer of every rewrite (a 1x1 Conv, MatMul or Gemm from the
        rank-r activations) is refit with prune's machinery to the original layer's output, from
        the inputs it sees in the rewritten model, wave by wave; each layer keeps its factor where
        the refit is worse on held-out samples, and the pass keeps the unrefitted model where the
        refits are worse at its outputs."""
        from onnxc.passes import _reconstruct as rec

        model = infer_shapes(model)
        view = GraphView(model.graph)
        done = {c.node for c in changes}
        jobs: dict[str, rec.RefitJob] = {}  # layer name -> the refit of its rewrite's last node
        for layer in layers:
            last = view.producers.get(layer.node.output[0])
            lin = LinearLayer.read(last, view) if last is not None and layer.name in done else None
            if not isinstance(lin, LinearLayer) or lin.trans_a:
                continue
            if lin.kind == "MatMul" and any(u.op_type == "Add" for u in view.consumers.get(lin.node.output[0], [])):
                continue  # its bias lives in the Add, which the refit would not see (nor refit)
            shape = view.static_shape(lin.x)
            if shape is None or (lin.kind == "Gemm" and len(shape) != 2):
                continue
            features = shape[1] if lin.kind == "Conv" else shape[-1]
            jobs[layer.name] = rec.RefitJob(last.name, last.input[0], last.output[0], np.arange(features), None)
        if not jobs:
            return model
        held = ctx.calibration.validation if holdout.has_held_out(ctx.calibration) else None
        plain = clone(model)
        model = rec.refit(original, model, list(jobs.values()), ctx.calibration.train, ridge=RECAPTURE_RIDGE,
                          samples=RECAPTURE_SAMPLES, recapture=True, rng=lambda s: ctx.rng(f"{self.id}-refit:{s}"),
                          progress=ctx.progress, held_out=held)
        for change in changes:
            job = jobs.get(change.node)
            if job is not None and job.verdict is not None:
                change.detail.update(job.verdict.detail("recapture_"))
        kept = sum(1 for j in jobs.values() if j.verdict is not None and j.verdict.kept)
        info["recapture"] = {"layers": len(jobs), "kept": kept}
        if held is not None and kept and self.judge:
            verdict = holdout.judge_model(holdout.Reference(original, ctx.calibration, ctx.metric), model, plain)
            info["model_recapture"] = verdict.detail()
            if not verdict.kept:
                return plain
        return model

    def _apply(self, model: onnx.ModelProto, layers: list[Layer], fits: list[Fitted | str],
               stats: dict[str, _whiten.Moments], ctx: PassContext) -> tuple[onnx.ModelProto, list[Change], list[Skip]]:
        """`model` with every fitted rewrite in place (layers whose fit failed or is over the limit skipped)."""
        view = GraphView(model.graph)
        changes: list[Change] = []
        skipped: list[Skip] = []
        for layer, fitted in zip(layers, fits):
            name = layer.name
            # replace_node rebuilds the node list (protobuf copies): find the live node again
            layer.node = view.producers[layer.node.output[0]]
            if not isinstance(fitted, str) and _clashes(view, layer, fitted):
                # a name an earlier rewrite took: fit again against the live graph (same numbers)
                moments = stats.get(layer.node.output[0]) if fitted.change.detail.get("data_aware") else None
                detail = {k: v for k, v in fitted.change.detail.items() if k not in ("rank", "ranks")}
                fitted = _fit_isolated(self.for_layer(name), layer, view, moments, ctx.seed)
                if isinstance(fitted, Fitted):
                    fitted.change.detail = {**detail, **fitted.change.detail}
            if not isinstance(fitted, str) and not _within(self, fitted):
                err, kind = fitted.change.error, fitted.change.detail.get("error_kind", "weight")
                limit = self.max_layer_error if self.max_layer_error is not None else \
                    self.default_error_limits.get(kind)
                fitted = f"local {kind} error {err:.3g} above max_layer_error={limit:g}"
            if isinstance(fitted, str):
                skipped.append(Skip(name, fitted))
                continue
            model.graph.initializer.extend(fitted.initializers)
            view.replace_node(layer.node, fitted.nodes)
            for output, index, value in fitted.updates:
                view.set_input_const(view.producers[output], index, value)
            changes.append(fitted.change)
        ctx.progress(f"{self.id}: fits", len(layers), len(layers))
        if changes:
            view.remove_unused()
        return model, changes, skipped

    def candidates(self, model: onnx.ModelProto, view: GraphView) -> tuple[list[Layer], list[Skip]]:
        """The layers this pass would fit, and the skips of the others with their reasons."""
        skipped: list[Skip] = []
        layers: list[Layer] = []
        for node in list(model.graph.node):
            name = node.name or node.output[0]
            if self.layers and not matches_any(name, self.layers):
                continue
            if self._levels is not None and name not in self._levels:
                continue
            found = self.candidate(node, view, model)
            if found is None:
                continue
            if matches_any(name, self.exclude):
                skipped.append(Skip(name, "excluded by option"))
            elif isinstance(found, str):
                skipped.append(Skip(name, found))
            elif found.info.get("weights", self.min_params) < self.min_params:
                skipped.append(Skip(name, f"layer too small ({found.info['weights']} weights < "
                                          f"min_params={self.min_params})"))
            else:
                layers.append(found)
        return layers, skipped

    # ---- the Technique protocol ----------------------------------------------------------------
    def plan_candidates(self, model: onnx.ModelProto, shapes: dict | None = None) -> list[Candidate]:
        return [Candidate(layer.name, (layer.name,)) for layer in self.candidates(model, GraphView(model.graph))[0]]

    def levels(self, target_ratio: float | None = None) -> tuple[float, ...]:
        return LEVELS

    def restricted(self, levels) -> list[Pass]:
        return [dataclasses.replace(self, _levels=dict(levels))]

    def probe(self) -> FactorPass:
        """One layer rewritten alone, judged per layer on held-out samples, without the layer-by-layer
        refit of what follows it or two more runs of the model: a probe measures the layer, and
        the final plan runs with the user's settings and is verified."""
        return dataclasses.replace(self, recapture=False, judge=False)

    def planned(self, explicit, kind=None) -> FactorPass:
        """Ranks at a multiple of the machine's channel block (unless round_to was set)."""
        return self if "round_to" in explicit else dataclasses.replace(self, round_to=runtime.channel_multiple())

    def moments(self, model: onnx.ModelProto, layers: list[Layer], ctx: PassContext,
                data=None) -> dict[str, _whiten.Moments]:
        """Input moments of the layers, keyed by layer output, in one pass over `data` (default:
        the calibration's fitting samples)."""
        requests = [(layer.node.output[0], *layer.rows) for layer in layers
                    if layer.rows is not None and layer.rows[1] <= MAX_STATS_DIM]
        if not requests:
            return {}
        return _whiten.collect(model, requests, ctx.calibration.train if data is None else data, seed=ctx.seed,
                               progress=lambda _, done, total: ctx.progress(f"{self.id}: capture", done, total))

    def _fit_all(self, model: onnx.ModelProto, layers: list[Layer], stats: dict[str, _whiten.Moments],
                 ctx: PassContext) -> list[Fitted | str]:
        """Every layer's fit, on the executor: each against the original model (shared once), so the
        fits are independent of each other and of the order and place they run in."""
        if not layers:
            return []
        executor = ctx.executor
        shared = {"model": executor.put(model), "moments": executor.put(stats)}
        items = [(self.for_layer(layer.name), Layer(layer.node, None, layer.info), ctx.seed) for layer in layers]
        global _TASK_VIEW
        try:
            return executor.map(fit_task, items, shared=shared, label=f"{self.id}: fits", progress=ctx.progress)
        finally:
            _TASK_VIEW = None  # in-process runs: do not keep the model copy alive

    def for_layer(self, name: str) -> FactorPass:
        """The pass as it fits layer `name`: with the allocator's ratio for it, when it chose one."""
        if self._levels is None or name not in self._levels:
            return self
        return dataclasses.replace(self, ratio=self._levels[name], _levels=None)

    def use_data(self, ctx: PassContext) -> bool:
        if ctx.calibration is None:
            return False
        if self.data_aware is None:
            return not ctx.calibration.is_random
        return bool(self.data_aware)


def _within(fitter: FactorPass, fitted: Fitted) -> bool:
    """Whether `_apply` would keep this fit (its local error within the pass's limit)."""
    err, kind = fitted.change.error, fitted.change.detail.get("error_kind", "weight")
    limit = fitter.max_layer_error if fitter.max_layer_error is not None else fitter.default_error_limits.get(kind)
    return limit is None or err is None or err <= limit


def fit_task(item: tuple[FactorPass, Layer, int], *, model: onnx.ModelProto,
             moments: dict[str, _whiten.Moments]) -> Fitted | str:
    """One layer's fit as an executor task: item = (pass, layer without its rows function, seed);
    shared: the model the layer belongs to and the moments from `FactorPass.moments`."""
    global _TASK_VIEW
    fitter, layer, seed = item
    if _TASK_VIEW is None or _TASK_VIEW[0] is not model:  # index the shared model once per process
        _TASK_VIEW = (model, GraphView(model.graph))
    return _fit_isolated(fitter, layer, _TASK_VIEW[1].fork(), moments.get(layer.node.output[0]), seed)


_TASK_VIEW: tuple[onnx.ModelProto, GraphView] | None = None


def _fit_isolated(fitter: FactorPass, layer: Layer, view: GraphView, moments: _whiten.Moments | None,
                  seed: int) -> Fitted | str:
    """Fit one layer, moving the constants it adds out of `view`'s graph into the result (the graph
    is left as it was). The context holds only the seed: fits draw their randomness from it."""
    graph = view.graph
    count = len(graph.initializer)
    try:
        fitted = fitter.fit(layer, view, moments, PassContext(seed=seed))
    except (np.linalg.LinAlgError, ValueError, FloatingPointError) as exc:
        fitted = f"fit failed: {exc}"
    added = []
    for tensor in graph.initializer[count:]:
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        added.append(copy)
    del graph.initializer[count:]
    for tensor in added:
        view.initializers.pop(tensor.name, None)
    if isinstance(fitted, Fitted):
        fitted.initializers = added
    return fitted


def _judge(layer: Layer, fit: Fitted | str, plain: Fitted | str, stats: dict[str, _whiten.Moments],
           held: dict[str, _whiten.Moments]) -> Fitted | str:
    """The fit to data, or the weights' own factors where those reproduce the layer's output on
    held-out samples better (`holdout.choose`); the verdict goes into the change's detail."""
    key = layer.node.output[0]
    if isinstance(fit, str) or isinstance(plain, str) or fit.aug is None or plain.aug is None \
            or key not in stats or key not in held:
        return fit

    def errors(f: Fitted) -> holdout.Errors:
        return holdout.Errors(*(_whiten.relative_output_error(*f.aug, m[key].augmented()) for m in (stats, held)))

    verdict = holdout.choose(errors(fit), errors(plain))
    chosen = fit if verdict.kept else plain
    chosen.change.detail.update(verdict.detail())
    return chosen


def _clashes(view: GraphView, layer: Layer, fitted: Fitted) -> bool:
    """Whether the fitted nodes or constants reuse a name the live graph already has."""
    names = {t.name for t in fitted.initializers} | {n.name for n in fitted.nodes}
    names |= {o for n in fitted.nodes for o in n.output} - set(layer.node.output)
    return bool(names & view._names)




# ---- helpers used by the passes -----------------------------------------------------------------
def cost(params: int, macs: int, itemsize: int) -> dict:
    return {"params": int(params), "macs": int(macs), "bytes": int(params) * itemsize}


def numel(shape: Sequence[int]) -> int:
    return int(math.prod(int(d) for d in shape))


def output_error(w_aug: np.ndarray, new_aug: np.ndarray, moments: _whiten.Moments | None) -> tuple[float, str]:
    """The local relative error: of the outputs on calibration when moments exist, else of the weights."""
    if moments is not None:
        return _whiten.relative_output_error(w_aug, new_aug, moments.augmented()), "output"
    return _whiten.relative_weight_error(w_aug[:, :-1], new_aug[:, :-1]), "weight"


# ---- convolutions -------------------------------------------------------------------------------
@dataclass
class ConvGeometry:
    """A Conv's weight, bias and geometry with pads made explicit where the input size is known."""

    weight: np.ndarray  # [C_out, C_in, k...]
    bias: np.ndarray | None
    strides: list[int]
    dilations: list[int]
    pads: list[int] | None  # explicit [begin..., end...]; None when auto_pad needs unknown sizes
    auto_pad: str
    in_spatial: tuple[int, ...] | None
    out_spatial: tuple[int, ...] | None

    @property
    def c_out(self) -> int:
        return self.weight.shape[0]

    @property
    def c_in(self) -> int:
        return self.weight.shape[1]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def taps(self) -> int:
        return numel(self.kernel)

    @property
    def p_in(self) -> int:
        return numel(self.in_spatial) if self.in_spatial else 1

    @property
    def p_out(self) -> int:
        return numel(self.out_spatial) if self.out_spatial else 1

    @property
    def macs(self) -> int:
        return self.c_out * self.c_in * self.taps * self.p_out

    @property
    def params(self) -> int:
        return self.weight.size + (self.bias.size if self.bias is not None else 0)

    def w_aug(self) -> np.ndarray:
        """[C_out, C_in * taps + 1]: the layer as a matrix on patches, bias as the last column."""
        w = self.weight.reshape(self.c_out, -1).astype(np.float64)
        b = self.bias.astype(np.float64) if self.bias is not None else np.zeros(self.c_out)
        return np.concatenate([w, b[:, None]], axis=1)


def parse_conv(node: onnx.NodeProto, view: GraphView) -> ConvGeometry | str:
    """The geometry of a plain (group 1, constant float weight) Conv, or why it is not one."""
    weight = float_const(view, node.input[1]) if len(node.input) > 1 else None
    if weight is None:
        return "weight is not a constant float tensor"
    if weight.ndim < 3:
        return "weight has no spatial dims"
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = float_const(view, node.input[2])
        if bias is None:
            return "bias is not a constant float tensor"
    group = int(attr(node, "group", 1))
    if group != 1:
        kind = "depthwise" if weight.shape[1] == 1 else "grouped"
        return f"{kind} conv (group={group}) not supported"
    n = weight.ndim - 2
    strides = list(attr(node, "strides", None) or [1] * n)
    dilations = list(attr(node, "dilations", None) or [1] * n)
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    x_shape, y_shape = view.shape(node.input[0]), view.shape(node.output[0])
    in_spatial = _known(x_shape[2:]) if x_shape and len(x_shape) == n + 2 else None
    out_spatial = _known(y_shape[2:]) if y_shape and len(y_shape) == n + 2 else None
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _whiten.conv_pads(in_spatial, weight.shape[2:], strides, dilations, None, auto_pad) \
            if in_spatial else None
    else:
        pads = _whiten.conv_pads([0] * n, weight.shape[2:], strides, dilations, attr(node, "pads", None), auto_pad)
    return ConvGeometry(weight, bias, strides, dilations, pads, auto_pad, in_spatial, out_spatial)


def _known(dims: Sequence) -> tuple[int, ...] | None:
    return tuple(int(d) for d in dims) if all(isinstance(d, int) and d > 0 for d in dims) else None


def conv_layer(node: onnx.NodeProto, geo: ConvGeometry) -> Layer:
    """A Conv candidate with its im2col statistics request (none when pads are unknown)."""
    rows = None
    if geo.pads is not None:
        rows = (node.input[0], geo.c_in * geo.taps,
                _whiten.im2col_rows(geo.kernel, geo.strides, geo.dilations, geo.pads))
    return Layer(node, rows, {"geo": geo, "weights": geo.weight.size})


def conv(view: GraphView, name: str, x: str, weight: np.ndarray, bias: np.ndarray | None, dtype: np.dtype, *,
         output: str | None = None, group: int = 1, strides: Sequence[int] | None = None,
         pads: Sequence[int] | None = None, dilations: Sequence[int] | None = None,
         auto_pad: str | None = None) -> onnx.NodeProto:
    """A Conv node with fresh initializers for its weight (and bias)."""
    inputs = [x, view.add_const(f"{name}.weight", weight.astype(dtype))]
    if bias is not None:
        inputs.append(view.add_const(f"{name}.bias", bias.astype(dtype)))
    attrs: dict = {"kernel_shape": list(weight.shape[2:])}
    if group != 1:
        attrs["group"] = group
    if strides is not None and any(s != 1 for s in strides):
        attrs["strides"] = list(strides)
    if dilations is not None and any(d != 1 for d in dilations):
        attrs["dilations"] = list(dilations)
    if auto_pad and auto_pad != "NOTSET":
        attrs["auto_pad"] = auto_pad
    elif pads is not None and any(pads):
        attrs["pads"] = list(pads)
    node = view.make_node("Conv", inputs, [output] if output else 1, name=name, **attrs)
    return node
