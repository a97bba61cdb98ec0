"""Small models the C backend's claims are measured on (built with onnx.helper, random weights).

`ds_cnn`: the keyword-spotting depthwise-separable CNN of ARM's ML-KWS (Zhang et al., "Hello
Edge", 2017): MFCC input 1x1x49x10, a 10x4 stride-2 convolution to 64 channels padded to keep
25x5, four depthwise-separable blocks of 64 channels (3x3 depthwise + BN + ReLU, 1x1 pointwise
+ BN + ReLU), global average pooling and a 12-way fully connected layer. onnx2c needs a 64,000
byte activation buffer for it (two 64x25x5 float tensors).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def ds_cnn(seed: int = 0, opset: int = 13) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def conv(x: str, name: str, cin: int, cout: int, k: tuple[int, int], group: int = 1, **attrs) -> str:
        fan_in = cin // group * k[0] * k[1]
        w = rng.standard_normal((cout, cin // group, *k)) * np.sqrt(2.0 / fan_in)
        nodes.append(helper.make_node("Conv", [x, const(f"{name}.w", w), const(f"{name}.b", rng.normal(0, 0.1, cout))],
                                      [f"{name}.out"], name=name, kernel_shape=list(k), group=group, **attrs))
        return f"{name}.out"

    def bn_relu(x: str, name: str, c: int) -> str:
        params = [const(f"{name}.scale", rng.uniform(0.5, 1.5, c)), const(f"{name}.shift", rng.normal(0, 0.1, c)),
                  const(f"{name}.mean", rng.normal(0, 0.1, c)), const(f"{name}.var", rng.uniform(0.5, 1.5, c))]
        nodes.append(helper.make_node("BatchNormalization", [x, *params], [f"{name}.bn"], name=f"{name}_bn"))
        nodes.append(helper.make_node("Relu", [f"{name}.bn"], [f"{name}.relu"], name=f"{name}_relu"))
        return f"{name}.relu"

    x = bn_relu(conv("input", "conv1", 1, 64, (10, 4), strides=[2, 2], pads=[4, 1, 5, 1]), "conv1", 64)
    for i in range(1, 5):
        x = bn_relu(conv(x, f"dw{i}", 64, 64, (3, 3), group=64, pads=[1, 1, 1, 1]), f"dw{i}", 64)
        x = bn_relu(conv(x, f"pw{i}", 64, 64, (1, 1)), f"pw{i}", 64)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    w = rng.standard_normal((12, 64)) * np.sqrt(1.0 / 64)
    nodes.append(helper.make_node("Gemm", ["flat", const("fc.w", w), const("fc.b", rng.normal(0, 0.1, 12))],
                                  ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "ds_cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                [1, 1, 49, 10])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def onnx2c_reference_bytes() -> int:
    """Activation memory onnx2c reports for the DS-CNN: two live 64x25x5 float tensors."""
    return 2 * 64 * 25 * 5 * 4
