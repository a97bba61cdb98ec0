"""Decomposition passes (svd, tucker, cp): accuracy vs kept fraction, data-aware vs weight-only,
and onnxruntime latency side by side.

Run from the repository root::

    python benchmarks/low_rank.py            # full sweep (several minutes: CP-ALS dominates)
    python benchmarks/low_rank.py --quick    # fewer ratios, fewer timing runs

Prints, for svd on the MLP sample and tucker/cp on the VGG sample:
1. for each ratio, data-aware (default with a real calibration file) and weight-only: kept
   parameters and MACs of the whole model, held-out accuracy, and whether the pass applied;
2. onnxruntime latency of the original and the factorized models, measured interleaved with
   `onnxc.compiler.bench.bench` (threads=1), as ratios to the original, for the issue's settings
   (svd:ratio=0.25, tucker:ratio=0.4, cp:ratio=0.4), with ranks rounded to 8 (default) and to 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from sample_data import CALIBRATION, accuracy, load_test_set, sample_path  # noqa: E402

from onnxc.api import optimize  # noqa: E402
from onnxc.compiler.bench import bench  # noqa: E402
from onnxc.compiler.canonical import canonicalize  # noqa: E402
from onnxc.compiler.cost import model_cost  # noqa: E402

METHODS = {"svd": "mlp", "tucker": "vgg", "cp": "vgg"}


def sweep(method: str, ratios: list[float]) -> None:
    sample = METHODS[method]
    original = onnx.load(sample_path(sample))
    base = model_cost(canonicalize(original))
    print(f"\n== {method} on {sample}: original accuracy {accuracy(original):.2f}%, "
          f"{base.params} params, {base.macs} MACs")
    print(f"{'ratio':>6} {'fitting':>12} {'params':>7} {'MACs':>7} {'accuracy':>9} {'seconds':>8}  status")
    for ratio in ratios:
        for aware in (True, False):
            spec = f"{method}:ratio={ratio}" + ("" if aware else ",data_aware=false")
            start = time.perf_counter()
            result = optimize(original, passes=[spec], calibration=CALIBRATION)
            seconds = time.perf_counter() - start
            record = result.report.passes[0]
            cost = model_cost(result.model)
            status = record.status + (f" ({record.reason})" if record.reason else "")
            dropped = [s for s in record.skipped if "too small" not in s.reason]
            if dropped:
                status += f"; {len(dropped)} layer(s) kept: " + "; ".join(sorted({s.reason for s in dropped}))
            print(f"{ratio:>6.2f} {'data-aware' if aware else 'weight-only':>12} {cost.params / base.params:>7.3f} "
                  f"{cost.macs / base.macs:>7.3f} {accuracy(result.model):>8.2f}% {seconds:>8.1f}  {status}")


def latency(batch: int, runs: int) -> None:
    x, _ = load_test_set()
    feed = {"input": np.ascontiguousarray(x[:batch])}
    print(f"\n== onnxruntime latency, batch {batch}, threads=1, {runs} interleaved runs (ratio = model / original)")
    for sample, specs in (("mlp", ["svd:ratio=0.25", "svd:ratio=0.25,round_to=1"]),
                          ("vgg", ["tucker:ratio=0.4", "tucker:ratio=0.4,round_to=1",
                                   "cp:ratio=0.4", "cp:ratio=0.4,round_to=1"])):
        original = canonicalize(onnx.load(sample_path(sample)))
        models, labels = [original], [f"{sample} original"]
        for spec in specs:
            result = optimize(original, passes=[spec], calibration=CALIBRATION)
            kept = model_cost(result.model).macs / model_cost(original).macs
            models.append(result.model)
            labels.append(f"{spec} (MACs {kept:.2f}x, acc {accuracy(result.model):.1f}%)")
        for timing in bench(models, feed, labels, runs=runs, warmup=5, threads=1):
            speedup = 1 / timing.ratio if timing.ratio > 0 else float("inf")
            print(f"  {timing.label:<58} {timing.median_ms:8.3f} ms  ratio {timing.ratio:.3f}  "
                  f"speed-up {speedup:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ratios 0.25 and 0.4 only, 30 timing runs")
    parser.add_argument("--methods", default="svd,tucker,cp", help="comma-separated subset of svd,tucker,cp")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-latency", action="store_true")
    args = parser.parse_args()
    ratios = [0.25, 0.4] if args.quick else [0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7]
    for method in [m for m in args.methods.split(",") if m]:
        sweep(method, ratios)
    if not args.no_latency:
        latency(args.batch, 30 if args.quick else 100)


if __name__ == "__main__":
    main()
