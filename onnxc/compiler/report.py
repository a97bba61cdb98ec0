"""The optimization report: JSON for machines, a rich summary for people (on stderr)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from onnxc.compiler.cost import ModelCost
from onnxc.compiler.model import set_default_mode
from onnxc.compiler.passes import PassRecord


@dataclass
class Report:
    input: str
    output: str | None = None
    calibration: str = "random"
    shapes: list[dict] = field(default_factory=list)  # input shapes verification ran at (per shape group)
    seed: int = 0
    max_error: float | None = None  # the fidelity budget (None: none)
    budget_source: str | None = None  # --max-error, preset NAME, recipe, default or none (--max-error inf)
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    file_bytes: dict = field(default_factory=dict)
    canonical_fidelity: dict | None = None
    fidelity: dict | None = None
    passes: list[PassRecord] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    backend: dict | None = None
    notes: list[str] = field(default_factory=list)
    reference_noise: float | None = None  # the original against itself across onnxruntime levels
    allocation: dict | None = None  # target, budget, per-candidate sensitivity and the chosen levels
    metric_resolution: float | None = None  # the smallest step of a --metric: 1 / held-out samples
    device: dict | None = None  # --fit: the limits and the linked firmware's flash and RAM before and after

    def to_dict(self) -> dict[str, Any]:
        from onnxc import __version__

        data = dataclasses.asdict(self)
        data["onnxc"] = __version__
        return data

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=2, sort_keys=False, default=_json_default)

    def write(self, path: str | Path) -> None:
        write_text_atomic(Path(path), self.to_json() + "\n")


def _finite(value: Any) -> Any:
    """Infinite and NaN floats as the strings "inf", "-inf", "nan" (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def budget_text(budget: float | None, source: str | None) -> str:
    """How the budget reads in the terminal and in errors: "budget 0.25 (default; set --max-error
    to change)", "budget 0.1 (preset balanced)", "no budget (--max-error inf)"."""
    if budget is None:
        return "no budget (--max-error inf)" if source == "none" else "no budget"
    if source == "default":
        return f"budget {budget:g} (default; set --max-error to change)"
    return f"budget {budget:g} ({source})" if source else f"budget {budget:g}"


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        set_default_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def layer_diff(before: ModelCost, after: ModelCost) -> list[dict]:
    """Per MAC/param-bearing layer of the original: cost before and after (matched by name)."""
    after_by_name = after.by_name()
    rows = []
    for layer in before.layers:
        if not (layer.params or layer.macs):
            continue
        new = after_by_name.get(layer.name)
        rows.append({"name": layer.name, "op": layer.op,
                     "before": {"params": layer.params, "macs": layer.macs, "bytes": layer.bytes},
                     "after": ({"params": new.params, "macs": new.macs, "bytes": new.bytes} if new
                               else None)})
    return rows


def human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.3f}x" if a else "-"


def render(report: Report, console: Console) -> None:
    """A short summary: totals before/after, one line per pass, fidelity.

    Give a console with `markup=False` (as the CLI's): node names, pass specs and notes are
    printed as they are, and rich markup would swallow what they hold in square brackets.
    """
    table = Table(title="onnxc optimize", show_edge=False)
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("ratio", justify="right")
    for key in ("params", "macs", "bytes"):
        a, b = report.before.get(key, 0), report.after.get(key, 0)
        table.add_row(key, human(a), human(b), _ratio(a, b))
    if report.file_bytes:
        a, b = report.file_bytes.get("before", 0), report.file_bytes.get("after", 0)
        table.add_row("file", human(a), human(b), _ratio(a, b))
    console.print(table)
    passes = Table(show_edge=False)
    for col in ("pass", "status", "rewrites", "skipped", "rel. error", "seconds"):
        passes.add_column(col, overflow="fold")
    for rec in report.passes:
        err = rec.fidelity.get("rel_l2") if rec.fidelity else None
        status = rec.status + (f" ({rec.reason})" if rec.reason else "")
        passes.add_row(rec.label or rec.spec, status, str(len(rec.changes)), str(len(rec.skipped)),
                       f"{err:.3g}" if err is not None else "-", f"{rec.seconds:.1f}")
    if report.passes:
        console.print(passes)
    for rec in report.passes:
        line = refit_text(rec.label or rec.spec, (rec.info or {}).get("model_refit"))
        if line:
            console.print(line, highlight=False)
    if report.fidelity:
        top1 = report.fidelity.get("top1")
        text = f"fidelity vs original on {report.fidelity['samples']} held-out inputs: relative L2 error " \
               f"{report.fidelity['rel_l2']:.3g}"
        if top1 is not None:
            text += f", top-1 agreement {100 * top1:.1f}%"
        if report.fidelity.get("metric") is not None:
            text += f"; metric {report.fidelity['metric']:.4g}"
            if report.metric_resolution:
                text += f" (resolution {report.metric_resolution:.3g}: 1 in {round(1 / report.metric_resolution)})"
        console.print(text)
    if report.budget_source is not None:
        console.print(budget_text(report.max_error, report.budget_source), highlight=False)
    if report.shapes:
        groups = ["; ".join(f"{k}={'x'.join(map(str, v)) or 'scalar'}" for k, v in g.items())
                  for g in report.shapes[:3]]
        more = f" (+{len(report.shapes) - 3} more)" if len(report.shapes) > 3 else ""
        console.print(f"input shapes: {' | '.join(groups)}{more}")
    if report.allocation:
        render_allocation(report.allocation, console)
    for line in int8_lines(report.backend or {}):
        console.print(line, highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {note}")


def refit_text(label: str, verdict: dict | None) -> str | None:
    """The model-level refit verdict of a pass, held-out next to in-sample (holdout.Verdict.detail)."""
    if not verdict or verdict.get("error_held_out") is None:
        return None

    def pair(a, b) -> str:
        return f"{a:.3g} refit / {b:.3g} unrefitted" if a is not None and b is not None else "-"

    held_out = pair(verdict["error_held_out"], verdict["unrefitted_held_out"])
    return f"{label}: refit {verdict['refit']} (held-out {held_out}; " \
           f"in-sample {pair(verdict['error_fit'], verdict['unrefitted_fit'])})"


def plan_summary(alloc: dict) -> dict[str, str]:
    """Per technique: how many candidates the plan changed, at which levels, and which it left
    as they were (a layer kept float, a group kept whole)."""
    levels: dict[str, list[float]] = {}
    for key, level in alloc["chosen"].items():
        levels.setdefault(key.split(":", 1)[0], []).append(level)
    out = {}
    for technique in dict.fromkeys([*levels, *alloc.get("untouched", {})]):
        chosen = levels.get(technique, [])
        left = alloc.get("untouched", {}).get(technique, [])
        counts = ", ".join(f"{chosen.count(v)} at {v:g}" for v in sorted(set(chosen)))
        text = f"{len(chosen)} of {len(chosen) + len(left)} candidates changed" + (f" ({counts})" if counts else "")
        if left:
            shown = ", ".join(left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
            text += f"; left as they were: {shown}"
        out[technique] = text
    return out


def render_allocation(alloc: dict, console: Console) -> None:
    """One row per candidate: each level's error alone (the chosen one marked) and the level chosen."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for m in alloc["sensitivity"]["measurements"]:
        rows.setdefault((m["technique"], m["name"]), []).append(m)
    table = Table(title=f"allocation (target {alloc['target'] or 'none'}, budget {alloc['budget']:g})", show_edge=False)
    scale = alloc.get("surrogate_scale")  # a starved metric: each level was planned at its surrogate's error
    errors = "held-out error alone at each level" + (" [planned as]" if scale is not None else "")
    for col in ("technique", "candidate", errors, "chosen"):
        table.add_column(col, overflow="fold")
    for (technique, name), ms in rows.items():
        cells = Text()
        for i, m in enumerate(ms):
            fit = f" [{m['surrogate'] * scale:.2g}]" if scale is not None and m.get("surrogate") is not None else ""
            text = f"{m['level']:g}: {m['error']:.3g}{fit}" if m["applied"] else f"{m['level']:g}: -"
            cells.append(("  " if i else "") + text, style="bold" if m["chosen"] else None)
        chosen = next((f"{m['level']:g}" for m in ms if m["chosen"]), "-")
        table.add_row(technique, name, cells, chosen)
    console.print(table)
    real = alloc.get("realization")
    if real and real.get("efficiency") is not None:
        console.print(f"onnxruntime latency {real['latency_ratio']:.3f}x at {real['macs_ratio']:.3f}x MACs: "
                      f"realization efficiency {real['efficiency']:.2f} (speedup / MAC reduction)", highlight=False)
    for technique, line in plan_summary(alloc).items():
        console.print(f"{technique}: {line}", highlight=False)
    state = "met" if alloc["met"] else "NOT met"
    console.print(f"target {alloc['target'] or 'none'}: {state} (reached {alloc['achieved']:.3f}); "
                  f"{len(alloc['chosen'])} candidates changed; {len(alloc['rounds'])} verified rounds", highlight=False)


def int8_lines(backend: dict) -> list[str]:
    """What the int8 stage of a backend report spent of the budget, and what it left float."""
    section = backend["int8"] if isinstance(backend.get("int8"), dict) else backend  # the C backend nests it
    budget = section.get("int8_budget")
    if not budget:
        return []
    judged = "the metric" if budget["metric_used"] else "per-channel relative L2"
    lines = [f"int8: error {budget['error_before']:.3g} -> {budget['error_after']:.3g} ({judged}, on "
             f"{budget['held_out_samples']} held-out samples; every node int8: {budget['error_all_int8']:.3g})"]
    if budget.get("metric_resolution"):
        lines[0] += f"; metric resolution {budget['metric_resolution']:.3g}"
    if budget.get("resolution_warning"):
        lines.append(f"int8: warning: {budget['resolution_warning']}")
    excluded = section.get("excluded_nodes") or []
    if budget.get("all_float"):
        lines.append("int8: no quantized model met the budget; the model stays float")
    elif excluded:
        shown = ", ".join(excluded[:8]) + (f" (+{len(excluded) - 8} more)" if len(excluded) > 8 else "")
        lines.append(f"int8: {len(excluded)} nodes left float to stay within budget {budget['max_error']:g}: {shown}")
    return lines
