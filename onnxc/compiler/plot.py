"""`--plot`: the sensitivity table as a picture (matplotlib, the optional `onnxc[plot]` extra).

Left: each candidate's error against what it saves at each level, one line per candidate, the
chosen level ringed. Right: the model's predicted error-vs-cost curve along the allocator's
steps, with every verified round and the chosen point.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from onnxc.errors import UsageError


def check(path: str | os.PathLike) -> None:
    """Refuse a `--plot` that cannot be drawn (suffix, matplotlib missing) before the allocation
    runs, not after the minutes it takes."""
    if Path(path).suffix.lower() not in (".png", ".svg"):
        raise UsageError(f"--plot writes .png or .svg, got '{Path(path).name}'")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'onnxc[plot]'") from None


def plot_allocation(alloc, path: str | os.PathLike) -> None:
    """Write the figure to `path` (.png or .svg)."""
    from onnxc.compiler.allocation import ordered_steps, saving_of

    check(path)
    path = Path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from onnxc.compiler.allocation import planned_kind

    kind = planned_kind(alloc.target)  # a measured target (--fit) is drawn in what it is planned on
    kind = "macs" if kind == "latency" else kind  # planned on MACs; the rounds show measured latency
    base = alloc.table.base.get("bytes" if kind == "size" else kind) or 1
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    by_candidate: dict = {}
    for m in alloc.table.measurements:
        if m.applied:
            by_candidate.setdefault((m.technique, m.name), []).append(m)
    for (technique, name), rows in sorted(by_candidate.items()):
        rows = sorted(rows, key=lambda r: saving_of(r.saving, kind))
        xs = [1 - saving_of(r.saving, kind) / base for r in rows]
        ys = [r.error for r in rows]
        line, = left.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=f"{technique}:{name}"[-40:])
        for r, x, y in zip(rows, xs, ys):
            if alloc.plan.get((technique, name)) == r.level:
                left.plot([x], [y], marker="o", markersize=10, fillstyle="none", color=line.get_color())
    left.set_xlabel(f"model {kind} left with this rewrite alone (fraction)")
    left.set_ylabel("model-output error")
    left.set_yscale("symlog", linthresh=1e-3)
    left.set_title("per-candidate sensitivity (ringed: chosen)")
    if len(by_candidate) <= 16:
        left.legend(fontsize=6)
    steps = alloc.steps or ordered_steps(alloc.table, kind)
    saved = alloc.costs.savings(steps) if alloc.costs is not None else [0.0] + [s.saving for s in steps]
    err2, xs, ys = 0.0, [1.0], [0.0]
    for s, total in zip(steps, saved[1:] if alloc.costs is not None else np.cumsum(saved)[1:]):
        err2 += s.error2
        xs.append(max(1 - total / base, 0.0))
        ys.append(math.sqrt(err2))
    right.plot(xs, ys, color="gray", label="predicted (sum of squares)")
    right.scatter([r.ratio for r in alloc.rounds], [r.error for r in alloc.rounds], color="tab:blue", s=15,
                  label="verified rounds")
    right.scatter([alloc.achieved], [alloc.fidelity.error if alloc.fidelity else 0], color="tab:red", s=60,
                  marker="*", label="chosen", zorder=3)
    right.axhline(alloc.budget, color="tab:red", linestyle="--", linewidth=0.8, label=f"budget {alloc.budget:g}")
    if alloc.target:
        right.axvline(alloc.target.ratio, color="black", linestyle=":", linewidth=0.8, label=f"target {alloc.target}")
    right.set_xlabel(f"model {alloc.target.kind if alloc.target else kind} (fraction of the original)")
    right.set_ylabel("model-output error")
    right.set_title("error against cost")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
