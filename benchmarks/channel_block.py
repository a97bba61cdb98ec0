"""Which channel counts onnxruntime runs fastest on this machine (why levels round to its block).

    python benchmarks/channel_block.py [--runs 60]

Prints onnxruntime's NCHWc channel block as `runtime.channel_block` reads it (8 with AVX2, 16
with AVX-512) and, for C from 40 to 64, the time of two small convolution blocks of C middle
channels against C = 64, beside their MAC ratio: a 64 -> C 1x1, a 3x3 depthwise conv over C, and
a C -> 64 1x1 at 28x28 (a MobileNet/PP-LCNet block), and a 64 -> C -> 64 pair of 3x3 convs at
16x16. Runs are interleaved and short (well under a scheduler slice), and the 10th percentile is
compared, so time other processes take from the core falls out. Measured on the AMD EPYC (AVX2)
machine this project runs on (two runs): in the pointwise block every count that is not a multiple
of 4 takes 1.2-1.9x the time of C = 64, multiples of 8 and of 4 take 0.8-1.1x (C = 48: 0.79-0.86x,
C = 56: 0.91-1.06x); in the 3x3 pair multiples of 8 are the local minima (C = 48, 56: 0.81, 0.83x
against 0.97x at C = 52 and 1.2x at C = 61-63). Rounding to 8 keeps every fast count and twice
as many levels as the 16 an AVX-512 machine wants.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxc.compiler.bench import bench
from onnxc.compiler.runtime import channel_block

BASE = 64


def block(c: int, kernel: int, depthwise: bool, size: int) -> onnx.ModelProto:
    """64 -> c (kernel x kernel), [depthwise 3x3 over c], c -> 64 (kernel x kernel)."""
    rng = np.random.default_rng(0)
    inits: list[onnx.TensorProto] = []

    def weight(name: str, *shape: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name))
        return name

    pad = [kernel // 2] * 4
    nodes = [helper.make_node("Conv", ["x", weight("w1", c, BASE, kernel, kernel), weight("b1", c)], ["a"], pads=pad),
             helper.make_node("Relu", ["a"], ["r"])]
    last = "r"
    if depthwise:
        nodes.append(helper.make_node("Conv", ["r", weight("wd", c, 1, 3, 3), weight("bd", c)], ["d"], pads=[1] * 4,
                                      group=c))
        last = "d"
    nodes.append(helper.make_node("Conv", [last, weight("w2", BASE, c, kernel, kernel), weight("b2", BASE)], ["y"],
                                  pads=pad))
    shape = [1, BASE, size, size]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()
    print(f"onnxruntime channel block here: {channel_block()}")
    counts = list(range(40, BASE + 1))
    for title, kernel, depthwise, size in (("1x1, depthwise 3x3, 1x1 at 28x28", 1, True, 28),
                                           ("3x3, 3x3 at 16x16", 3, False, 16)):
        models = [block(c, kernel, depthwise, size) for c in counts]
        feed = {"x": np.random.default_rng(1).random((1, BASE, size, size), dtype=np.float32)}
        timings = bench(models, feed, runs=args.runs, warmup=5, threads=1)
        top = timings[-1].p10_ms
        print(f"{title}: C, time / time at C={BASE} (10th percentile), MACs ratio")
        print("  " + "  ".join(f"{c}:{t.p10_ms / top:.2f}/{c / BASE:.2f}" for c, t in zip(counts, timings)))


if __name__ == "__main__":
    main()
