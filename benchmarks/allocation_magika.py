"""Allocation to a size target on magika's content-type model, against uniform clustering.

    python scripts/fetch_corpus.py magika && python benchmarks/allocation_magika.py [--target size=0.3]

Real files found on this machine (the Python install, /usr/share, /usr/lib; `tests/file_types.py`)
become magika's model inputs as magika builds them; calibration and test files come from disjoint
directories. Per setting it prints, on the test files: how often magika's output label agrees with
the original model's, accuracy against the extension's label where the extension names one type,
the file's size on disk against the original's, the verified error on the calibration's held-out
part (relative L2 of the probabilities, or the type-disagreement metric where the run used it) and
seconds. The sensitivity cache is a fresh folder, so every `--target` run measures from scratch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import corpus  # noqa: E402
import file_types  # noqa: E402

from onnxc.api import optimize
from onnxc.compiler.model import load
from onnxc.compiler.runtime import run


def outputs(model, x: np.ndarray) -> list[np.ndarray]:
    return list(run(model, {"bytes": x}).values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="size=0.3")
    parser.add_argument("--per-type", type=int, default=6, help="files per type in each split")
    parser.add_argument("--int8", action="store_true",
                        help="also the target with --backend onnxruntime (int8 among the default techniques)")
    parser.add_argument("--uniform", default="cluster:bits=8,cluster:bits=4",
                        help="uniform settings to compare, comma-separated specs")
    parser.add_argument("--rows", default="",
                        help="only these target rows, comma-separated: default, cluster, cluster+metric, "
                             "int8 (the defaults with --backend onnxruntime, where int8 is one), int8+metric "
                             "(default: all but the int8 ones unless --int8)")
    args = parser.parse_args()
    model_path = str(corpus.path("magika"))
    data = file_types.dataset(per_type=args.per_type)
    cal, test = data.subset("calibration"), data.subset("test")
    print(f"{len(cal.paths)} calibration and {len(test.paths)} test files, {len(data.counts())} types "
          f"({', '.join(f'{t} {n}' for t, n in sorted(data.counts().items()))})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="onnxc-magika-") as folder:
        rows = compare(model_path, Path(folder), cal, test, args)
    print(f"{'magika (' + str(len(test.paths)) + ' test files)':<34} {'agree':>7} {'ext.acc':>7} {'file':>6} "
          f"{'error':>7} {'seconds':>7}  chosen")
    for how, agree, right, size, error, seconds, note in rows:
        print(f"{how:<34} {agree:>6.2f}% {right:>6.2f}% {size:>5.3f}x {error:>7.4f} {seconds:>7.1f}  {note}")
    print(f"agree: magika's output label equals the original model's; ext.acc: equals the extension's label "
          f"({sum(1 for e in test.expected if e)} files whose extension names one type)")


def compare(model_path: str, tmp: Path, cal, test, args) -> list[tuple]:
    """One row per setting: (name, agreement %, extension accuracy %, file ratio, error, seconds, chosen)."""
    np.savez(tmp / "cal.npz", bytes=cal.features)
    original = load(model_path)
    ref_labels = file_types.labels(outputs(original, test.features))
    known = [i for i, e in enumerate(test.expected) if e]

    def scores(labels: list[str]) -> tuple[float, float]:
        agree = 100.0 * float(np.mean([a == b for a, b in zip(labels, ref_labels)]))
        right = 100.0 * float(np.mean([labels[i] == test.expected[i] for i in known]))
        return agree, right

    size_before = os.path.getsize(model_path)
    metric = {"metric": "file_types:type_error"}
    named = {"default": (f"target {args.target}", {"target": args.target}),
             "cluster": (f"target {args.target} -p cluster", {"target": args.target, "passes": ["cluster"]}),
             "cluster+metric": ("  + --metric type_error", {"target": args.target, "passes": ["cluster"], **metric}),
             "int8": (f"target {args.target} --backend onnxruntime", {"target": args.target,
                                                                        "backend": "onnxruntime"}),
             "int8+metric": ("  + --metric type_error", {"target": args.target, "backend": "onnxruntime", **metric})}
    wanted = args.rows.split(",") if args.rows else ["default", "cluster", "cluster+metric"] + (
        ["int8", "int8+metric"] if args.int8 else [])
    unknown = [w for w in wanted if w not in named]
    if unknown:
        raise SystemExit(f"--rows: unknown {', '.join(unknown)} (choose from {', '.join(named)})")
    runs = [named[w] for w in wanted]
    runs += [(spec, {"passes": [spec]}) for spec in args.uniform.split(",") if spec]
    rows = [("original", *scores(ref_labels), 1.0, 0.0, 0.0, "")]
    for i, (how, kwargs) in enumerate(runs):
        out = tmp / f"run{i}.onnx"
        start = time.perf_counter()
        r = optimize(model_path, calibration=tmp / "cal.npz", output=out, cache_dir=tmp / f"cache{i}", **kwargs)
        seconds = time.perf_counter() - start
        labels = file_types.labels(outputs(r.model, test.features))
        alloc = r.report.allocation
        note = ""
        if alloc:
            note = f"{'met' if alloc['met'] else 'missed'}: " + ", ".join(
                f"{k.split('/')[-2]}@{v:g}" for k, v in sorted(alloc["chosen"].items()))
        rows.append((how, *scores(labels), os.path.getsize(out) / size_before, r.report.fidelity["error"],
                     seconds, note))
    return rows


if __name__ == "__main__":
    main()
