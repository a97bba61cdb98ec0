"""The Technique protocol: all the sensitivity sweep and the allocator know of a technique.

The allocator picks one level per candidate across techniques to meet a target with the least
error. It must not know any technique by name, or every new technique costs edits in the
compiler and options of one pass end up set from another module. So a plannable pass answers,
in its own module:

- `plan_candidates(model, shapes)`: what it could rewrite, each a name and the nodes it reshapes,
  found without touching the model it is given (the allocator keeps using that model); `shapes`
  are one sample's input shapes, at which a technique that weighs its layers reads their cost
  (a model with dynamic dims has none of its own);
- `levels(target_ratio)`: the levels it offers, mildest first, for a target that keeps that
  fraction of the model's cost (None: a budget alone);
- `saves`: the target kinds a level can save (macs, params, size, latency, activations: the peak
  activation bytes of `activations.peak_bytes`, what a RAM budget is planned on; a property where it
  depends on the pass's options, as circulant's form decides whether MACs drop); what a level
  saves is measured by applying it (`probe`), so rounding and layers it declines are in it;
  `latency_saving` says what of the layer's time that is (the MACs removed, unless the
  technique makes the remaining ones cheaper, as int8 does);
- `restricted(levels)`: the passes that rewrite exactly the chosen candidate-levels, in order;
- `probe()`: the pass as the sweep measures one candidate-level alone (it may trade some
  accuracy for speed there; the final plan runs `restricted` and is verified);
- `planned(explicit, kind)`: the pass as the allocator uses it, given which options the user set
  and the kind of saving the run plans on (macs, params, size, latency). A technique whose
  options trade one kind of saving for another picks the ones that save the planned kind, as
  circulant takes its fft form (the only one that removes multiply-accumulates) for a MACs
  target; options the user set win. The kind is known before candidates are found, so `saves`
  and `plan_candidates` already answer for the configured pass.

How a technique combines with others on one node is declared, not special-cased:

- `slot`: what of a node it changes: `structure` (channels, factors, blocks) or `storage` (codes,
  precision). One node takes one technique per slot: a level measured on the original layer
  means something else on a layer another technique of the same slot already rewrote (ranks of
  a pruned layer; int8 of a weight already stored as codes), while a pruned layer in int8 is
  what both measured.
- `composes`: several of its own candidates may share a node, and what each keeps multiplies
  there (two channel groups around a conv).
- `plan_order`: where its rewrites run in a plan (structure first, storage and precision last).
- `planned_by_default`: part of a `--target` run when the user names no technique.

A new technique is one module in `onnxc/passes/`: a registered pass that also subclasses
`Technique`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import ClassVar

import onnx

KINDS = frozenset({"macs", "params", "size", "latency", "activations"})
STRUCTURE = KINDS  # a technique that removes computation saves every kind


# A structural candidate (a channel group, a layer) whose nodes hold less than this fraction of the
# model's MACs (or parameters) is not measured: it cannot move a target much, and measuring it
# costs as much as measuring a large one (detectors have many such small groups). A technique may
# fold such small layers into a larger candidate instead, as int8 does with its regions.
MIN_SHARE = 0.01


@dataclass(frozen=True)
class Candidate:
    """One thing a technique can rewrite: its name in plans and reports, and the nodes whose
    structure or storage the rewrite changes (for combining savings and resolving conflicts)."""

    name: str
    nodes: tuple[str, ...]


class Technique:
    """Mixin for passes the allocator can plan (see the module docstring)."""

    plan_order: ClassVar[int] = 50
    saves: ClassVar[frozenset[str]] = STRUCTURE
    slot: ClassVar[str] = "structure"
    composes: ClassVar[bool] = False
    planned_by_default: ClassVar[bool] = False

    def plan_candidates(self, model: onnx.ModelProto,
                        shapes: dict | None = None) -> list[Candidate]:  # pragma: no cover
        raise NotImplementedError

    def levels(self, target_ratio: float | None = None) -> tuple[float, ...]:  # pragma: no cover
        raise NotImplementedError

    def restricted(self, levels: Mapping[str, float]) -> list:  # pragma: no cover
        """Passes that rewrite exactly the candidates in `levels` (name -> level), in order."""
        raise NotImplementedError

    def latency_saving(self, macs_saved: float, candidate_macs: float, level: float) -> float:
        """The time `level` saves, in MACs of the original layer's speed: by default the MACs it
        removes (`macs_saved`); `candidate_macs` is what the candidate's nodes hold."""
        return macs_saved

    def probe(self):
        """The pass as the sensitivity sweep runs it for one candidate-level alone."""
        return self

    def planned(self, explicit: Collection[str], kind: str | None = None):
        """The pass as the allocator uses it; `explicit`: the options the user set; `kind`: the
        saving the run plans on (None: not known). By default the pass as configured."""
        return self


def is_technique(p: object) -> bool:
    return isinstance(p, Technique)


def by_plan_order(techniques: Mapping[str, Technique]) -> list[str]:
    """Technique ids in the order a plan applies them."""
    return sorted(techniques, key=lambda t: (techniques[t].plan_order, t))
