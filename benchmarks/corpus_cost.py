"""Per corpus model: inspect's MACs against an independent count, and the lossless error.

The independent count is onnxruntime's per-node profile of one run of the original model at the
same input shapes (tests/profiled_macs.py, no code shared with onnxc.compiler.cost). The lossless
error is `--preset lossless` against the original on its held-out inputs, beside the original's
own float noise (itself with onnxruntime's optimizations off).

    python benchmarks/corpus_cost.py [NAME...]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import corpus  # noqa: E402
from profiled_macs import profiled_macs  # noqa: E402

import onnxc  # noqa: E402
from onnxc.compiler import runtime, shapes, verify  # noqa: E402
from onnxc.compiler.calibration import make_calibration  # noqa: E402


def main(names: list[str]) -> None:
    print(f"{'model':<18} {'input shapes':<24} {'inspect MACs':>14} {'profiled MACs':>14} {'ratio':>7} "
          f"{'lossless err':>12} {'own noise':>10}")
    for name in names or corpus.ALL:
        path = corpus.path(name)
        model = onnxc.load(path)
        cost = onnxc.inspect(path)
        used = cost.input_shapes
        independent = profiled_macs(str(path), shapes.random_feed(model, used))
        result = onnxc.optimize(path, preset="lossless", max_error=1.0)  # measure, do not judge
        report = result.report
        noise = report.reference_noise
        if noise is None:
            cal = make_calibration(model, None, input_shapes=used)
            ref = runtime.run(model, cal.validation)
            noise = verify.reference_noise(model, cal.validation, ref)
        print(f"{name:<18} {shapes.format_shapes(used):<24} {cost.macs:>14,} {independent:>14,} "
              f"{cost.macs / independent:>7.4f} {report.fidelity['rel_l2']:>12.3g} {noise:>10.3g}")


if __name__ == "__main__":
    main(sys.argv[1:])
