"""Channel pruning, side by side.

1. A YOLOv8-style detector (built in code, random weights, random calibration) pruned at
   ratio=0.3: onnxruntime latency of the original and the pruned model, interleaved runs.
2. The digit samples: held-out accuracy against MACs for ratios 0.1..0.7, for the magnitude-only
   baseline (l1, no refit), the same channels with the refit, and the default lsq criterion with
   the refit (per group and with global ranking).

    python benchmarks/prune.py [--quick] [--skip-yolo] [--skip-digits] [--size 320] [--widths s]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from sample_data import CALIBRATION, accuracy, sample_path  # noqa: E402
from test_prune_yolo import YOLOV8N, YOLOV8S, yolo_like  # noqa: E402

from onnxc.compiler.bench import bench  # noqa: E402
from onnxc.compiler.calibration import make_calibration, random_inputs  # noqa: E402
from onnxc.compiler.canonical import canonicalize  # noqa: E402
from onnxc.compiler.cost import model_cost  # noqa: E402
from onnxc.compiler.model import load, tensor_bytes  # noqa: E402
from onnxc.compiler.passes import PassContext, create  # noqa: E402

DIGIT_CONFIGS = {
    "l1, sliced (baseline)": "criterion=l1,reconstruct=false",
    "l1 + refit": "criterion=l1",
    "lsq, sliced": "criterion=lsq,reconstruct=false",
    "lsq + refit": "criterion=lsq",
    "lsq + refit, global": "criterion=lsq,scope=global",
}


def options(spec: str) -> dict:
    return dict(kv.split("=") for kv in spec.split(",") if kv)


def run_pass(model, cal, spec: str, seed: int = 0):
    start = time.perf_counter()
    result = create("prune", options(spec)).run(canonicalize(model), PassContext(calibration=cal, seed=seed))
    return canonicalize(result.model), result, time.perf_counter() - start


def yolo(size: int, widths: tuple, runs: int, variants: list[str]) -> None:
    model = yolo_like(widths, size=size)
    cal = make_calibration(model, None, seed=0, random_count=8)
    feed = random_inputs(model, 1, seed=1)
    models, labels = [model], ["original"]
    base = model_cost(model)
    print(f"\nYOLOv8-style detector, widths {widths}, input 1x3x{size}x{size}, "
          f"{base.macs / 1e9:.2f} GMAC, {base.params / 1e6:.2f} M params")
    for spec in variants:
        pruned, result, seconds = run_pass(model, cal, spec)
        models.append(pruned)
        labels.append(f"prune:{spec}")
        cost = model_cost(pruned)
        print(f"  prune:{spec}: {len(result.changes)} groups pruned, {len(result.skipped)} skipped, "
              f"MACs x{cost.macs / base.macs:.3f}, params x{cost.params / base.params:.3f}, "
              f"bytes x{tensor_bytes(pruned) / tensor_bytes(model):.3f}, pass {seconds:.1f}s")
    timings = bench(models, feed, labels, runs=runs, warmup=5, threads=1)
    print(f"  {'model':44s} {'median ms':>10s} {'ratio':>7s}")
    for t in timings:
        print(f"  {t.label:44s} {t.median_ms:10.2f} {t.ratio:7.3f}")


def digits(ratios: list[float], names: list[str]) -> None:
    for name in names:
        path = sample_path(name)
        model = canonicalize(load(path))
        cal = make_calibration(model, str(CALIBRATION), seed=0)
        base_acc, base_macs = accuracy(model), model_cost(model).macs
        print(f"\n{name}: original held-out accuracy {base_acc:.2f}%  (cells: accuracy % / MACs ratio)")
        print(f"  {'ratio':>5s} " + " ".join(f"{label:>22s}" for label in DIGIT_CONFIGS))
        for ratio in ratios:
            cells = []
            for spec in DIGIT_CONFIGS.values():
                pruned, _, _ = run_pass(model, cal, f"ratio={ratio},{spec}")
                cells.append(f"{accuracy(pruned):6.2f} / {model_cost(pruned).macs / base_macs:5.3f}")
            print(f"  {ratio:5.2f} " + " ".join(f"{c:>22s}" for c in cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="ratios 0.3, 0.5, 0.7 only; fewer timing runs")
    ap.add_argument("--skip-yolo", action="store_true")
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--widths", choices=["n", "s"], default="s")
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    np.set_printoptions(precision=3)
    if not args.skip_yolo:
        yolo(args.size, YOLOV8S if args.widths == "s" else YOLOV8N, 10 if args.quick else args.runs,
             ["ratio=0.3,round_to=1", "ratio=0.3"])  # unrounded against the automatic channel block
    if not args.skip_digits:
        ratios = [0.3, 0.5, 0.7] if args.quick else [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
        digits(ratios, ["vgg", "resnet", "mobilenet"])


if __name__ == "__main__":
    main()
