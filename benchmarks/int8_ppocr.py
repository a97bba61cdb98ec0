"""int8 on the PP-OCRv4 text-line recognizer, judged by lines read exactly on unseen lines.

`ppocr_rec` (scripts/fetch_corpus.py) is calibrated on 128 rendered lines (tests/text_lines.py,
seed 0; 96 fit, 32 held out) and read on 200 lines of another seed. Rows:

- `float`: the original;
- `export --int8 (plain)`: onnxruntime's static quantizer with min/max ranges alone (what
  `export --int8` did before equalization and range choice);
- `export --int8`: ours, with affine folding + cross-layer equalization and per-tensor range
  choice, each kept only where it lowers the held-out error;
- `export --int8 --metric line_error --max-error E`: the int8 stage alone held to a line budget;
- `optimize --int8 --metric line_error --max-error E`: the allocator (or the `--optimize-pass`
  passes), then int8, one budget (row `optimize`; slow: the allocator's sensitivity sweep).

Printed: line accuracy on the unseen lines, onnxruntime latency ratio (batch 1, interleaved,
one thread), file ratio, nodes left float, seconds.

    python benchmarks/int8_ppocr.py [--max-error 0.015] [--rows plain,ours,budget,optimize]
                                    [--optimize-pass cluster:bits=8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import corpus  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import text_lines  # noqa: E402

from onnxc.backends import ExportOptions  # noqa: E402
from onnxc.backends import export as backend_export  # noqa: E402
from onnxc.compiler import calibration as calib  # noqa: E402
from onnxc.compiler import runtime  # noqa: E402
from onnxc.compiler.bench import bench  # noqa: E402
from onnxc.compiler.canonical import canonicalize  # noqa: E402
from onnxc.compiler.interface import keep_interface  # noqa: E402


def read(path: Path, x: np.ndarray, alphabet: list[str], texts: list[str]) -> float:
    out = runtime.run(runtime.session(path), {"x": x})
    return text_lines.line_accuracy(text_lines.decode(next(iter(out.values())), alphabet), texts)


def size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--max-error", type=float, default=0.015)
    parser.add_argument("--rows", default="plain,ours,budget", help="of plain, ours, budget, optimize")
    parser.add_argument("--optimize", action="store_true", help="also run optimize (the allocator, then int8)")
    parser.add_argument("--optimize-pass", action="append", default=[], metavar="SPEC",
                        help="optimize with these passes instead of the allocator (-p SPEC)")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args(argv)
    source = corpus.path("ppocr_rec")
    original = onnx.load(str(source))
    alphabet = text_lines.characters(original)
    x_cal, _ = text_lines.dataset(args.calibration, seed=0)
    x_test, texts = text_lines.dataset(args.test, seed=1)
    work = Path(tempfile.mkdtemp(prefix="int8_ppocr."))
    np.savez(work / "cal.npz", x=x_cal)
    canonical = keep_interface(canonicalize(original, {}), original)
    cal = calib.make_calibration(canonical, {"x": x_cal}, seed=0)
    metric = "text_lines:line_error"
    rows: list[tuple[str, Path, dict, float]] = []

    def export(label: str, name: str, **options) -> None:
        start = time.perf_counter()
        out = work / name
        report = backend_export("onnxruntime", canonical, out, ExportOptions(int8="static", calibration=cal, **options))
        rows.append((label, out, report, time.perf_counter() - start))
        print(f"  {label}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    from text_lines import line_error

    rows_asked = args.rows.split(",") + (["optimize"] if args.optimize else [])
    if "plain" in rows_asked:
        export("export --int8 (plain min/max)", "plain.onnx", int8_prepare=False)
    if "ours" in rows_asked:
        export("export --int8", "ours.onnx")
    if "budget" in rows_asked:
        export(f"export --int8 --metric --max-error {args.max_error:g}", "budget.onnx", metric=line_error,
               max_error=args.max_error)
    if "optimize" in rows_asked:
        start = time.perf_counter()
        out = work / "optimize.onnx"
        cmd = [sys.executable, "-m", "onnxc", "optimize", str(source), "-o", str(out), "--backend", "onnxruntime",
               "--int8", "--calibration", str(work / "cal.npz"), "--metric", metric, "--max-error",
               str(args.max_error), "--report", str(work / "optimize.json"), "-q"]
        cmd += [x for spec in args.optimize_pass for x in ("-p", spec)]
        done = subprocess.run(cmd, cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "tests")},
                              capture_output=True, text=True)
        if done.returncode == 0:
            import json

            report = json.loads((work / "optimize.json").read_text())["backend"]
            passes = "".join(f" -p {spec}" for spec in args.optimize_pass)
            rows.append((f"optimize{passes} --int8 --metric --max-error {args.max_error:g}", out, report,
                         time.perf_counter() - start))
        else:
            print(f"optimize exited {done.returncode}: {done.stderr.strip()}", file=sys.stderr)

    base_acc = read(source, x_test, alphabet, texts)
    timings = bench([source] + [r[1] for r in rows], {"x": x_test[:1]}, runs=args.runs, warmup=3)
    print(f"ppocr_rec: {args.calibration} calibration lines ({cal.train.count} fit, {cal.validation.count} held out), "
          f"{args.test} unseen lines")
    print(f"{'':48} {'lines':>7} {'latency':>8} {'file':>6} {'float nodes':>11} {'held-out err':>12} {'s':>5}")
    print(f"{'float (original)':48} {100 * base_acc:6.1f}% {1.0:7.3f}x {1.0:5.3f}x {'-':>11} {'-':>12} {'-':>5}")
    for (label, out, report, seconds), timing in zip(rows, timings[1:]):
        budget = report.get("int8_budget") or {}
        print(f"{label:48} {100 * read(out, x_test, alphabet, texts):6.1f}% {timing.ratio:7.3f}x "
              f"{size(out) / size(source):5.3f}x {len(report.get('excluded_nodes') or []):11d} "
              f"{budget.get('error_after', float('nan')):12.3g} {seconds:5.0f}")
        for key, entry in (report.get("int8_improvements") or {}).items():
            if key != "plain":
                print(f"    {key}: {entry}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
