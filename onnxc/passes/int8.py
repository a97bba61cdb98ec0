"""`int8`: chosen layers, with the short chains after them, in int8 (QDQ, per-channel weights).

Precision as a technique of the allocator: a plan can keep a sensitive layer (a classifier head,
an attention product) float and run the rest in int8, instead of quantizing the whole model
after the plan is made and hoping the budget survives.

Why regions, not single nodes, and the rule that forms them: `compiler.int8_regions` (the int8
export backs off on the same regions). A candidate is one weight layer (Conv, Gemm, MatMul with a
constant weight) with the nodes the quantizer keeps int8 after it, up to the next weight layers,
branches included: neighbouring chosen candidates form one int8 region with no conversion inside it.

The quantizer is the int8 export's (`ort_quant.prepare`, onnxruntime's `quantize_static` in QDQ
with per-channel weights, the opset raised for them where needed, uint8 activations), with the
equalization and activation ranges that lower the held-out error, so a plan's int8 layers lose
no more than the export's. The model runs in onnxruntime's integer kernels and lowers to the C
backend's int8 kernels. On x86 CPUs without VNNI the fused kernels saturate 16-bit pair sums:
`reduce_range=auto` measures that and then quantizes weights to 7 bits, as the export does.

Two levels per region (`REGION`, `LAYER`): the whole region in int8, or its layers alone, with
the ops after them (an activation of two operands such as hard-swish, an attention product, a
softmax) left float. Quantizing a layer's input and weights costs what rounding a linear map
costs; requantizing every activation after it also costs the nonlinear ops' resolution, which
a sequence or detection head can feel far more. The layer alone pays a conversion back to float
and so saves less time; the allocator weighs both, per region.

What a region saves: its weights' bytes (measured), and time. Time is planned from the layer's
MACs at `INT8_TIME` of their float cost (a prior per CPU kind), the layer alone at `LAYER_SHARE`
of its region's saving; the allocator's verified rounds time whole models and correct both, as
they correct every prediction.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import onnx

from onnxc.compiler import int8_regions, runtime
from onnxc.compiler.cost import model_cost
from onnxc.compiler.graph import GraphView
from onnxc.compiler.model import fingerprint
from onnxc.compiler.passes import Change, Pass, PassContext, PassResult, Skip, cost_dict, matches_any, register
from onnxc.compiler.samples import fingerprint as data_fingerprint
from onnxc.compiler.technique import MIN_SHARE, Candidate, Technique
from onnxc.errors import UsageError

if TYPE_CHECKING:
    from onnxc.backends.ort_quant import Prepared

WEIGHT_OPS = {"Conv", "Gemm", "MatMul"}  # the layers offered in int8
LAYER_OPS = WEIGHT_OPS | {"ConvTranspose"}  # with a constant operand: a layer, which joins no region
# Time of an int8 layer over its float time, planned before any model is timed: integer dot
# products (VNNI, Arm's SDOT) do four multiply-adds where float does one; without them the 16-bit
# pair sums still halve the float work. Verified rounds time whole models and correct this.
INT8_TIME = {True: 0.5, False: 0.75}
# The levels: the share of a region that runs int8, the layer alone or all of it.
LAYER, REGION = 0.5, 1.0
# What of its region's time saving a layer alone keeps (a prior: it converts its output back to
# float and its chain runs float).
LAYER_SHARE = 0.8


@register
@dataclass
class Int8Pass(Pass, Technique):
    id = "int8"
    summary = "int8 (QDQ, per-channel weights) of weight layers and the chains after them, via onnxruntime"
    uses_calibration = True
    plan_order = 100  # precision last: it quantizes whatever structure the plan left
    saves = frozenset({"size", "latency", "activations"})  # int8 activations take one byte
    slot = "storage"  # one storage form per weight: int8 or codes, not both
    option_help = {
        "exclude": "node names or globs to keep float",
        "reduce_range": "7-bit weights: auto (on x86 CPUs without VNNI, whose int8 kernels saturate), on, off",
        "min_macs": "leave layers with fewer MACs per sample float (too small to pay for the conversions)",
    }
    exclude: list[str] = field(default_factory=list)
    reduce_range: Literal["auto", "on", "off"] = "auto"
    min_macs: int = 0
    # Set by `restricted` (not a CLI option): only these candidates are quantized.
    _levels: dict[str, float] | None = None
    # Shared by the passes `restricted` makes of one technique (not copied: `replace` passes the
    # same dict), so each plan the allocator verifies is prepared like the first one was.
    _lineage: dict = field(default_factory=dict, repr=False, compare=False)

    def validate(self) -> None:
        if self.reduce_range not in ("auto", "on", "off"):
            raise UsageError("pass 'int8': reduce_range must be auto, on or off")

    # ---- candidates ---------------------------------------------------------------------------
    def regions(self, model: onnx.ModelProto, shapes: dict | None) -> tuple[list[Candidate], list[Skip]]:
        """Each quantizable weight layer with the nodes the quantizer keeps int8 after it, up to
        the next layers (`compiler.int8_regions`), named by the layer. A layer under MIN_SHARE of
        the model's MACs at `shapes` (a depthwise conv, a squeeze-excite conv, a small projection)
        joins the region upstream like any op after a layer: planned alone, it would not be
        measured, and stay float in every plan though it holds weights a size target needs. A
        region still under MIN_SHARE (one whose chain an op int8 cannot take cut off, as a layer
        norm cuts a transformer block from the conv before it) is planned together with the small
        regions after it, or with the region before (`_grouped`)."""
        from onnxc.backends.ort_quant import static_op_types

        view = GraphView(model.graph)
        macs = {n.name: n.macs for n in model_cost(model, shapes).layers}
        small = MIN_SHARE * sum(macs.values())
        layers, starts, followers, skipped = set(), set(), set(), []
        for node in model.graph.node:
            if node.op_type not in LAYER_OPS or node.domain not in ("", "ai.onnx") or not node.name:
                continue
            if any(view.is_const(i) for i in node.input[:2]):
                layers.add(node.name)  # a weight of its own: it joins no region unless it is small
            if node.name not in _weight_layers(view, (node,)):
                continue
            if matches_any(node.name, self.exclude):
                skipped.append(Skip(node.name, "excluded"))
            elif macs.get(node.name, 0) < self.min_macs:
                skipped.append(Skip(node.name, f"{macs.get(node.name, 0)} MACs < min_macs={self.min_macs}"))
            elif macs.get(node.name, 0) < small:
                followers.add(node.name)  # too small to plan alone: it goes with the region upstream
            else:
                starts.add(node.name)
        quantized = static_op_types()
        found = int8_regions.regions(model.graph, opens=lambda n: n.name in starts or n.name in followers,
                                     joins=lambda n: n.op_type in quantized and n.domain in ("", "ai.onnx")
                                     and bool(n.name) and (n.name not in layers or n.name in followers))
        return _grouped([Candidate(name, tuple(n.name for n in nodes)) for name, nodes in found.items()],
                        macs, small), skipped

    # ---- the Technique protocol ---------------------------------------------------------------
    def plan_candidates(self, model: onnx.ModelProto, shapes: dict | None = None) -> list[Candidate]:
        return self.regions(model, shapes)[0]

    def levels(self, target_ratio: float | None = None) -> tuple[float, ...]:
        return (LAYER, REGION)

    def restricted(self, levels: Mapping[str, float]) -> list[Pass]:
        return [replace(self, _levels=dict(levels))]

    def latency_saving(self, macs_saved: float, candidate_macs: float, level: float) -> float:
        region = candidate_macs * (1.0 - INT8_TIME[runtime.integer_dot_product()])
        return region * (LAYER_SHARE if level < REGION else 1.0)

    # ---- the rewrite --------------------------------------------------------------------------
    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        self.validate()
        shapes = ctx.cost_shapes()
        regions, skipped = self.regions(model, shapes)
        if self._levels is not None:
            layers = _weight_layers(GraphView(model.graph), model.graph.node)
            regions = [r if self._levels[r.name] >= REGION else replace(r, nodes=tuple(n for n in r.nodes
                                                                                       if n in layers))
                       for r in regions if self._levels.get(r.name)]
        if not regions:
            return PassResult(model, False, skipped=skipped)
        if ctx.calibration is None:
            return PassResult(model, False, skipped=skipped + [Skip(r.name, "int8 needs calibration inputs")
                                                                for r in regions])
        reduce = {"on": True, "off": False}.get(self.reduce_range)
        nodes = list(dict.fromkeys(n for r in regions for n in r.nodes))
        quantized, prepared = quantize_nodes(model, ctx.calibration, nodes, reduce_range=reduce,
                                             like=self._lineage.get("first"))
        self._lineage.setdefault("first", prepared)
        per_channel, reduce = prepared.per_channel, prepared.reduce_range

        def alone(name: str) -> bool:
            return self._levels is not None and self._levels[name] < REGION

        before = {n.name: n for n in model_cost(model, shapes).layers}
        after = {n.name: n for n in model_cost(quantized, shapes).layers}
        changes = [Change(r.name, before[r.name].op if r.name in before else "", "int8",
                          before=cost_dict(before.get(r.name)), after=cost_dict(after.get(r.name)),
                          detail={"region": list(r.nodes), "level": "layer" if alone(r.name) else "region",
                                  "per_channel": per_channel,
                                  "weight_bits": 7 if reduce else 8})
                   for r in regions]
        info = {"regions": len(regions), "nodes": len(nodes), "per_channel": per_channel, "reduce_range": reduce,
                "preparation": prepared.notes}
        return PassResult(quantized, True, changes, skipped, info)


def _grouped(regions: list[Candidate], macs: dict[str, float], small: float) -> list[Candidate]:
    """`regions` (in graph order) with those under `small` MACs merged: consecutive small ones
    into one candidate, named by its first; one still small after that into the candidate
    before it (the first region: after it). A candidate is what the allocator turns int8 or
    leaves float as one: its nodes need not be connected."""
    def cost(r: Candidate) -> float:
        return sum(macs.get(n, 0.0) for n in r.nodes)

    runs: list[Candidate] = []
    for r in regions:
        if runs and cost(r) < small and cost(runs[-1]) < small:
            runs[-1] = Candidate(runs[-1].name, runs[-1].nodes + r.nodes)
        else:
            runs.append(r)
    out: list[Candidate] = []
    for r in runs:
        if out and (cost(r) < small or cost(out[-1]) < small):
            out[-1] = Candidate(out[-1].name, out[-1].nodes + r.nodes)
        else:
            out.append(r)
    return out


def _weight_layers(view: GraphView, nodes) -> set[str]:
    """The names of `nodes` that are layers int8 can take: a Conv, Gemm or MatMul of an
    activation and a constant weight."""
    return {n.name for n in nodes if n.op_type in WEIGHT_OPS and n.domain in ("", "ai.onnx") and len(n.input) >= 2
            and view.is_const(n.input[1]) and not view.is_const(n.input[0])}


def quantize_nodes(model: onnx.ModelProto, calibration, nodes: list[str], *, reduce_range: bool | None = None,
                   like: Prepared | None = None) -> tuple[onnx.ModelProto, Prepared]:
    """`model` with `nodes` quantized, and the preparation it went through.

    The quantizer is the int8 export's (`ort_quant.prepare`: per-channel opset, onnxruntime's
    pre-processing, equalization and per-tensor ranges where they lower the held-out error),
    prepared once per process for a model and its data: the sensitivity sweep quantizes one
    candidate at a time of one model. Bias correction is left out: it rewrites the float biases
    of every layer for the all-int8 model, which a layer the plan keeps float must not inherit.
    `like`: a preparation whose measured choices this one takes (`ort_quant.prepare`)."""
    from onnxc.backends.ort_quant import _quiet, _working_directory, prepare
    from onnxc.backends.quant_budget import Scorer

    key = f"{_key(model, calibration.train)}-{reduce_range}"
    work = _work_dir() / key
    work.mkdir(exist_ok=True)
    with _quiet(), _working_directory(str(work)):
        if key not in _PREPARED:
            for stale in list(_PREPARED)[:-(KEPT_PREPARED - 1) or None]:  # the sweep's model and the latest plan
                del _PREPARED[stale]
                shutil.rmtree(_work_dir() / stale, ignore_errors=True)
            scorer = Scorer(model, calibration.validation)
            _PREPARED[key] = prepare(model, "static", calibration, work, scorer, reduce_range=reduce_range,
                                     correct_bias=False, like=like)
        prepared = _PREPARED[key]
        quantized = prepared.quantizer(nodes, [])
    quantized.ir_version = max(quantized.ir_version, model.ir_version)
    return quantized, prepared


_WORK: list[tempfile.TemporaryDirectory] = []  # made on first use, removed at exit
_PREPARED: dict[str, Prepared] = {}  # by model and data, oldest first
KEPT_PREPARED = 2  # each verified plan is a new model: keep memory and disk to the last few


def _work_dir() -> Path:
    if not _WORK:
        _WORK.append(tempfile.TemporaryDirectory(prefix="onnxc-int8-"))
    return Path(_WORK[0].name)


def _key(model: onnx.ModelProto, inputs) -> str:
    return hashlib.sha256(fingerprint(model) + data_fingerprint(inputs)).hexdigest()[:32]
