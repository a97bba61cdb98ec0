"""Peak activation bytes (`compiler.activations`), the measure a RAM budget is planned on."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sample_data import CALIBRATION, sample_path

import onnxc
from onnxc.compiler.activations import peak_bytes
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.model import load

SHAPES = {"input": [1, 1, 16, 16]}


def _chain(channels: tuple[int, int], quantized: bool = False) -> onnx.ModelProto:
    """input [1,1,8,8] -> Conv(c0) -> Relu -> Conv(c1) -> output; with `quantized` the second conv's
    input and output go through QuantizeLinear/DequantizeLinear (uint8)."""
    rng = np.random.default_rng(0)
    c0, c1 = channels
    inits = [numpy_helper.from_array(rng.standard_normal((c0, 1, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.standard_normal((c1, c0, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "z")]
    nodes = [helper.make_node("Conv", ["input", "w0"], ["a"], pads=[1] * 4), helper.make_node("Relu", ["a"], ["r"])]
    if quantized:
        nodes += [helper.make_node("QuantizeLinear", ["r", "s", "z"], ["rq"]),
                  helper.make_node("DequantizeLinear", ["rq", "s", "z"], ["rd"]),
                  helper.make_node("Conv", ["rd", "w1"], ["b"], pads=[1] * 4),
                  helper.make_node("QuantizeLinear", ["b", "s", "z"], ["bq"]),
                  helper.make_node("DequantizeLinear", ["bq", "s", "z"], ["output"])]
    else:
        nodes.append(helper.make_node("Conv", ["r", "w1"], ["output"], pads=[1] * 4))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, c1, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_peak_is_the_largest_pair_of_live_tensors():
    """At the second conv the Relu output (written over the first conv's) and the second conv's
    output are live: (c0 + c1) * 64 floats; int8 tensors count a byte, a DequantizeLinear output
    and a float result requantized at once none."""
    assert peak_bytes(_chain((8, 4))) == (8 + 4) * 64 * 4
    assert peak_bytes(_chain((4, 8))) == (4 + 8) * 64 * 4
    assert peak_bytes(_chain((2, 2))) == (2 + 2) * 64 * 4
    # quantized: the Relu output (8 * 64 floats) and its int8 copy at the QuantizeLinear; the second
    # conv runs on integers (its DQ input and float output take no buffer): 8 * 64 + 4 * 64 bytes
    assert peak_bytes(_chain((8, 4), quantized=True)) == 8 * 64 * 4 + 8 * 64


def test_pruning_shrinks_the_peak_of_a_sample():
    model = canonicalize(load(sample_path("vgg")), SHAPES)
    pruned = canonicalize(onnxc.optimize(sample_path("vgg"), passes=["prune:ratio=0.5"],
                                         calibration=CALIBRATION).model, SHAPES)
    before, after = peak_bytes(model, SHAPES), peak_bytes(pruned, SHAPES)
    assert 0.4 * before <= after <= 0.6 * before, (before, after)
