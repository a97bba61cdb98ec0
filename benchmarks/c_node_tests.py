"""ONNX node conformance cases through the C backend: pass counts per op, every failure named
and explained.

Each single-node case (`onnx.backend.test.case.node.collect_testcases`) of an op the C backend
supports is exported, compiled (-std=c99 -Wall -Wextra -Werror -O1, all cases in one program)
and run; outputs are compared with the case's expected values at rtol=1e-4, atol=1e-5. Non-float
inputs and weight-like inputs (Conv W/B, BatchNorm statistics, Clip bounds, Pad value, Resize
roi/scales/sizes) are fixed to the case's values at export time, as a static-shape MCU compiler
needs. "direct": the node reads and writes the caller's buffers; "arena": its inputs and
outputs pass through exact Mul(t, 1) nodes so the arena, in-place, view and fused-activation
variants run. A failing comparison is checked against onnxruntime too.

    python benchmarks/c_node_tests.py [--op Conv --op Resize] [-v]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from onnxc.backends.c.conformance import ATOL, RTOL, run_conformance, supported_ops
from onnxc.compiler import runtime


def explain(reason: str) -> str:
    """A short category for a failure reason."""
    m = re.search(r"is (U?INT\d+|FLOAT16|BFLOAT16|DOUBLE|BOOL|STRING|float16|float64|u?int\d+)", reason)
    if m:
        return "non-float32 data type: the C backend computes float32 only"
    if "mode linear" in reason or "mode cubic" in reason:
        return "Resize linear/cubic: only nearest is implemented"
    if "training mode" in reason:
        return "training mode (batch statistics / random dropout) is not inference"
    if "mask output" in reason:
        return "Dropout mask output (bool) is not produced"
    if "Indices output" in reason:
        return "MaxPool Indices output (int64) is not produced"
    m = re.search(r"unsupported op \w+ \((\d-D [\w ]+)\)", reason)
    if m:
        return f"{m.group(1)}: only 1-D and 2-D are implemented"
    if "no known rank" in reason:
        return "sequence/optional input types are not tensors"
    if reason.startswith("output"):
        return "numeric mismatch"
    return reason.split(":")[0]


def ort_check(unit) -> str:
    """How onnxruntime compares with the expected values and with us on a mismatching case."""
    try:
        case = unit.source
        sess = runtime.session(case.model)
        inputs = case.data_sets[0][0]
        feed = {vi.name: v for vi, v in zip(case.model.graph.input, inputs)}
        ref = sess.run(None, feed)
    except Exception as exc:  # onnxruntime may not implement the case
        return f"onnxruntime cannot run it ({type(exc).__name__})"
    ours = [g.reshape(np.shape(r)) for g, r in zip(unit.got, ref)]
    vs_expected = max(float(np.max(np.abs(r.astype(np.float64) - e))) for r, e in zip(ref, unit.expected))
    vs_us = max(float(np.max(np.abs(r.astype(np.float64) - o))) for r, o in zip(ref, ours))
    return f"onnxruntime differs from the expected values by {vs_expected:.3g} and from us by {vs_us:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", action="append", help="only these ops")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the full reason of every failure")
    args = ap.parse_args()
    ops = set(args.op) if args.op else supported_ops()
    results = {}
    t0 = time.time()
    for mode in ("direct", "arena"):
        with tempfile.TemporaryDirectory(prefix="onnxc_nodes_") as tmp:
            results[mode] = run_conformance(ops, Path(tmp), arena=mode == "arena")
    elapsed = time.time() - t0
    direct, arena = results["direct"], results["arena"]
    print(f"{'op':20s} {'direct':>9s} {'arena':>9s}")
    totals = Counter()
    for op in sorted(direct):
        d, a = direct[op], arena[op]
        totals.update(passed=len(d.passed), arena=len(a.passed), total=d.total)
        print(f"{op:20s} {len(d.passed):4d}/{d.total:<4d} {len(a.passed):4d}/{a.total:<4d}")
    print(f"{'total':20s} {totals['passed']:4d}/{totals['total']:<4d} {totals['arena']:4d}/{totals['total']:<4d}"
          f"   ({len(direct)} ops, rtol={RTOL:g} atol={ATOL:g}, {elapsed:.0f}s)")
    print("\nfailures (direct; arena-only failures marked):")
    categories = Counter()
    for op in sorted(direct):
        for case, reason in direct[op].failed.items():
            why = explain(reason)
            categories[why] += 1
            extra = f" -- {ort_check(direct[op].units[case])}" if why == "numeric mismatch" else ""
            dtype = re.search(r"is (\w+)", reason) if why.startswith("non-float32") else None
            detail = reason if args.verbose or why == "numeric mismatch" else (
                f"{dtype.group(1).upper()}: {why}" if dtype else why)
            print(f"  {op:18s} {case}: {detail}{extra}")
        for case, reason in arena[op].failed.items():
            if case not in direct[op].failed:
                print(f"  {op:18s} {case} [arena only]: {reason}")
    print("\nby cause:")
    for why, n in categories.most_common():
        print(f"  {n:4d}  {why}")


if __name__ == "__main__":
    main()
