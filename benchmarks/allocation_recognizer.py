"""Twice as fast under a task budget: the PP-OCRv4 text-line recognizer at a latency target.

The public `ppocr_rec` (scripts/fetch_corpus.py) is calibrated on 128 rendered lines
(tests/text_lines.py, seed 0) and read on 200 lines of another seed. Rows, side by side:

- `export --int8`: onnxruntime's static int8 of every layer (our plain export);
- `target`: `optimize --target latency=R --max-error E --metric text_lines:line_error --backend
  onnxruntime` with a cold sensitivity cache (the techniques: the defaults plus int8);

Printed per row: the lines read exactly (the original reads ~98-100%), the lines read as the
original reads them, the onnxruntime latency ratio (one thread, batch 1, 10th percentiles of
interleaved runs), the file ratio, the wall time, and for the target the plan per technique and
the allocator's verified rounds (steps, error on the calibration lines, its own latency reading).

    python benchmarks/allocation_recognizer.py [--target latency=0.5] [--max-error 0.01] [--jobs N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import corpus  # noqa: E402
import numpy as np  # noqa: E402
import text_lines  # noqa: E402

from onnxc.api import export, optimize  # noqa: E402
from onnxc.compiler import runtime  # noqa: E402
from onnxc.compiler.bench import bench  # noqa: E402
from onnxc.compiler.model import load  # noqa: E402
from onnxc.compiler.report import plan_summary  # noqa: E402


def _progress():
    """Phase lines on stderr (one per phase and about every 30 s), as a redirected CLI run prints them."""
    from onnxc.progress import PlainProgress

    return PlainProgress(sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="latency=0.5")
    parser.add_argument("--max-error", type=float, default=0.01)
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="worker processes (default: the CPU's "
                        "cores, as the CLI's --target uses)")
    parser.add_argument("--passes", default="", help="comma-separated techniques (default: the defaults + int8)")
    args = parser.parse_args(argv)
    source = corpus.path("ppocr_rec")
    original = load(source)
    alphabet = text_lines.characters(original)
    x_cal, _ = text_lines.dataset(args.calibration, seed=0)
    x_test, texts = text_lines.dataset(args.test, seed=1)
    reference = runtime.run(original, {"x": x_test})
    ref_read = text_lines.decode(next(iter(reference.values())), alphabet)
    feed = {"x": x_test[:1]}

    def row(label: str, path: Path, seconds: float, extra: str = "") -> None:
        out = runtime.run(load(path), {"x": x_test})
        read = text_lines.decode(next(iter(out.values())), alphabet)
        same = float(np.mean([a == b for a, b in zip(read, ref_read)]))
        timings = bench([original, load(path)], feed, runs=40, warmup=3, threads=1)
        latency = timings[1].p10_ms / timings[0].p10_ms
        size = path.stat().st_size / Path(source).stat().st_size
        print(f"{label:14} {100 * text_lines.line_accuracy(read, texts):6.1f}% {100 * same:6.1f}% "
              f"{latency:7.3f}x {size:6.3f}x {seconds:8.1f}  {extra}", flush=True)

    print(f"ppocr_rec: {args.calibration} calibration lines, {args.test} test lines of another seed; the original "
          f"reads {100 * text_lines.line_accuracy(ref_read, texts):.1f}%")
    print(f"{'how':14} {'lines':>7} {'as orig':>7} {'latency':>8} {'file':>7} {'seconds':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        export(source, "onnxruntime", tmp / "int8.onnx", int8="static", calibration={"x": x_cal})
        row("export --int8", tmp / "int8.onnx", time.perf_counter() - start)
        start = time.perf_counter()
        passes = args.passes.split(",") if args.passes else None
        with _progress() as progress:  # entered: it also prints a line per phase every 30 s
            result = optimize(source, passes=passes, calibration={"x": x_cal}, target=args.target,
                              max_error=args.max_error, metric="text_lines:line_error", output=tmp / "target.onnx",
                              backend="onnxruntime", cache_dir=tmp / "cache", jobs=args.jobs, progress=progress)
        seconds = time.perf_counter() - start
        alloc = result.report.allocation
        row(f"{args.target}", tmp / "target.onnx", seconds,
            f"met={alloc['met']} held-out metric {result.report.fidelity['error']:.4f}")
        for technique, line in plan_summary(alloc).items():
            print(f"    {technique}: {line}")
        table = alloc["sensitivity"]
        print(f"    sensitivity: {len(table['measurements'])} candidate-levels in {table['seconds']:.0f} s; "
              f"{len(alloc['rounds'])} verified rounds:")
        for r in alloc["rounds"]:
            print(f"      {r['steps']:3d} steps: error {r['error']:.4f}, latency {r['ratio']:.3f}x; {r['action']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
