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

What a region saves: its weights' bytes (measured), and time. Time is planned from the layer's
MACs at `INT8_TIME` of their float cost (a prior per CPU kind); the allocator's verified rounds
time whole models and correct it, as they correct every prediction.
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
from onnxc.compiler.technique import Candidate, Technique
from onnxc.errors import UsageError

if TYPE_CHECKING:
    from onnxc.backends.ort_quant import Prepared

WEIGHT_OPS = {"Conv", "Gemm", "MatMul"}  # the layers offered in int8
LAYER_OPS = WEIGHT_OPS | {"ConvTranspose"}  # with a constant operand: a layer, which joins no region
# Time of an int8 layer over its float time, planned before any model is timed: integer dot
# products (VNNI, Arm's SDOT) do four multiply-adds where float does one; without them the 16-bit
# pair sums still halve the float work. Verified rounds time whole models and correct this.
INT8_TIME = {True: 0.5, False: 0.75}


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

    def validate(self) -> None:
        if self.reduce_range not in ("auto", "on", "off"):
            raise UsageError("pass 'int8': reduce_range must be auto, on or off")

    # ---- candidates ---------------------------------------------------------------------------
    def regions(self, model: onnx.ModelProto) -> tuple[list[Candidate], list[Skip]]:
        """Each quantizable weight layer with the nodes the quantizer keeps int8 after it, up to
        the next layers (`compiler.int8_regions`), named by the layer."""
        from onnxc.backends.ort_quant import static_op_types

        view = GraphView(model.graph)
        macs = {n.name: n.macs for n in model_cost(model).layers}
        layers, starts, skipped = set(), set(), []
        for node in model.graph.node:
            if node.op_type not in LAYER_OPS or node.domain not in ("", "ai.onnx") or not node.name:
                continue
            if any(view.is_const(i) for i in node.input[:2]):
                layers.add(node.name)  # a weight of its own: it never joins another layer's region
            if node.op_type not in WEIGHT_OPS or len(node.input) < 2 or not view.is_const(node.input[1]) \
                    or view.is_const(node.input[0]):
                continue
            if matches_any(node.name, self.exclude):
                skipped.append(Skip(node.name, "excluded"))
            elif macs.get(node.name, 0) < self.min_macs:
                skipped.append(Skip(node.name, f"{macs.get(node.name, 0)} MACs < min_macs={self.min_macs}"))
            else:
                starts.add(node.name)
        quantized = static_op_types()
        found = int8_regions.regions(model.graph, opens=lambda n: n.name in starts,
                                     joins=lambda n: n.op_type in quantized and n.domain in ("", "ai.onnx")
                                     and bool(n.name) and n.name not in layers)
        return [Candidate(name, tuple(n.name for n in nodes)) for name, nodes in found.items()], skipped

    # ---- the Technique protocol ---------------------------------------------------------------
    def plan_candidates(self, model: onnx.ModelProto) -> list[Candidate]:
        return self.regions(model)[0]

    def levels(self, target_ratio: float | None = None) -> tuple[float, ...]:
        return (8,)

    def restricted(self, levels: Mapping[str, float]) -> list[Pass]:
        return [replace(self, _levels=dict(levels))]

    def latency_saving(self, macs_saved: float, candidate_macs: float) -> float:
        return candidate_macs * (1.0 - INT8_TIME[runtime.integer_dot_product()])

    # ---- the rewrite --------------------------------------------------------------------------
    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        self.validate()
        regions, skipped = self.regions(model)
        if self._levels is not None:
            regions = [r for r in regions if r.name in self._levels]
        if not regions:
            return PassResult(model, False, skipped=skipped)
        if ctx.calibration is None:
            return PassResult(model, False, skipped=skipped + [Skip(r.name, "int8 needs calibration inputs")
                                                                for r in regions])
        reduce = {"on": True, "off": False}.get(self.reduce_range)
        nodes = list(dict.fromkeys(n for r in regions for n in r.nodes))
        quantized, prepared = quantize_nodes(model, ctx.calibration, nodes, reduce_range=reduce)
        per_channel, reduce = prepared.per_channel, prepared.reduce_range
        before = {n.name: n for n in model_cost(model).layers}
        after = {n.name: n for n in model_cost(quantized).layers}
        changes = [Change(r.name, before[r.name].op if r.name in before else "", "int8",
                          before=cost_dict(before.get(r.name)), after=cost_dict(after.get(r.name)),
                          detail={"region": list(r.nodes), "per_channel": per_channel,
                                  "weight_bits": 7 if reduce else 8})
                   for r in regions]
        info = {"regions": len(regions), "nodes": len(nodes), "per_channel": per_channel, "reduce_range": reduce,
                "preparation": prepared.notes}
        return PassResult(quantized, True, changes, skipped, info)


def quantize_nodes(model: onnx.ModelProto, calibration, nodes: list[str], *,
                   reduce_range: bool | None = None) -> tuple[onnx.ModelProto, Prepared]:
    """`model` with `nodes` quantized, and the preparation it went through.

    The quantizer is the int8 export's (`ort_quant.prepare`: per-channel opset, onnxruntime's
    pre-processing, equalization and per-tensor ranges where they lower the held-out error),
    prepared once per process for a model and its data: the sensitivity sweep quantizes one
    candidate at a time of one model. Bias correction is left out: it rewrites the float biases
    of every layer for the all-int8 model, which a layer the plan keeps float must not inherit."""
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
                                     correct_bias=False)
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
