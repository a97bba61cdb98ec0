"""Cortex-M4 instructions per layer of the MLPerf Tiny models in int8, and per MAC.

Each model (onnxc/backends/c/reference_models.py, random weights, calibrated on random inputs) is
quantized as `onnxc export --backend c --int8` does, lowered, and run with SysTick read after every
step of its NAME_core (`mps2.profile_steps`: qemu -icount shift=0 on mps2-an386, to 40
instructions, each step's count including about 20 instructions of timer reads). Printed per step: the kernel, the
node, instructions, the node's MACs and instructions per MAC; then per kernel over the model.

    python benchmarks/c_layers.py [ds_cnn,mobilenet_vww,resnet8,autoencoder]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's onnxc; the MLPerf Tiny helpers

from mlperf_tiny import inputs, int8_build  # noqa: E402

from onnxc.backends.c import mps2  # noqa: E402
from onnxc.backends.c.reference_models import MLPERF_TINY  # noqa: E402
from onnxc.compiler.cost import model_cost  # noqa: E402


def profile(name: str, work: Path) -> list[tuple[str, str, int, int]]:
    """(node, kernel, instructions, MACs) of each step of the int8 model on the Cortex-M4."""
    model, _, gen = int8_build(name)
    macs = {c.name: c.macs for c in model_cost(model).layers}
    return [(node, fn, ins, macs.get(node, 0)) for node, fn, ins in mps2.profile_steps(gen, [inputs(name, 1)[0]], work)]


def main() -> None:
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(MLPERF_TINY)
    work = Path(tempfile.mkdtemp(prefix="onnxc_layers_"))
    try:
        for name in names:
            d = work / name
            d.mkdir()
            rows = profile(name, d)
            print(f"\n{name}: {sum(r[2] for r in rows):,} instructions in NAME_core, {sum(r[3] for r in rows):,} MACs")
            print(f"{'node':14s} {'kernel':26s} {'instr':>10s} {'MACs':>10s} {'instr/MAC':>9s}")
            per_kernel: dict[str, list[int]] = defaultdict(lambda: [0, 0])
            for node, fn, ins, macs in rows:
                per_kernel[fn][0] += ins
                per_kernel[fn][1] += macs
                print(f"{node:14s} {fn:26s} {ins:10,} {macs:10,} {ins / macs if macs else float('nan'):9.2f}")
            for fn, (ins, macs) in per_kernel.items():
                print(f"  {fn:26s} {ins:10,} {macs:10,} {ins / macs if macs else float('nan'):9.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
