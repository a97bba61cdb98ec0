#!/usr/bin/env python3
"""Write the four MLPerf Tiny models (random weights, onnxc/backends/c/reference_models.py) as
ONNX files, for the command line: `onnxc export DIR/resnet8.onnx --backend c --int8 static -o OUT`
(without --calibration the int8 ranges come from random inputs). No torch needed; the same seed
gives the same bytes.

    python scripts/mlperf_tiny_models.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's onnxc

from onnxc.backends.c.reference_models import MLPERF_TINY  # noqa: E402


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/mlperf_tiny_models.py OUT_DIR")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, (build, _) in MLPERF_TINY.items():
        path = out / f"{name}.onnx"
        onnx.save(build(seed=0), path)
        print(name, path)


if __name__ == "__main__":
    main()
