"""Small models the C backend's claims are measured on (built with onnx.helper, random weights).

The four MLPerf Tiny (v1.0) inference tasks, public architectures with seeded random weights, so
that footprint and instruction counts can be compared with other microcontroller runtimes
without shipping trained weights:

`ds_cnn` (keyword spotting): the depthwise-separable CNN of ARM's ML-KWS (Zhang et al., "Hello
Edge", 2017): MFCC input 1x1x49x10, a 10x4 stride-2 convolution to 64 channels padded to keep
25x5, four depthwise-separable blocks of 64 channels (3x3 depthwise + BN + ReLU, 1x1 pointwise
+ BN + ReLU), global average pooling and a 12-way fully connected layer. onnx2c needs a 64,000
byte activation buffer for it (two 64x25x5 float tensors).

`mobilenet_vww` (visual wake words): MobileNetV1 with width 0.25 on 1x3x96x96, a 3x3 stride-2
convolution to 8 channels then 13 depthwise-separable blocks (16 .. 256 channels, five of them
stride 2, padded after as TensorFlow's 'same'), global average pooling and a 2-way classifier.

`resnet8` (image classification, CIFAR-10): 1x3x32x32, a 3x3 convolution to 16 channels and three
residual stacks (16, 32, 64 channels; the last two start with stride 2 and a 1x1 stride-2
convolution on the shortcut), global average pooling and a 10-way classifier.

`autoencoder` (anomaly detection, ToyADMOS): a fully connected autoencoder over 1x640 log-mel
frames, 640-128-128-128-128-8-128-128-128-128-640, each hidden layer followed by BatchNorm and
ReLU. Its BatchNorms are folded into the dense layers here (as a deployment export does), since
only convolutions take a BatchNorm in the canonical form.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    """Nodes and initializers of one NCHW model with seeded random weights (He initialization)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.inits: list[onnx.TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [f"{name}.out"], name=name, **attrs))
        return f"{name}.out"

    def conv(self, x: str, name: str, cin: int, cout: int, k: tuple[int, int], group: int = 1, **attrs) -> str:
        fan_in = cin // group * k[0] * k[1]
        w = self.rng.standard_normal((cout, cin // group, *k)) * np.sqrt(2.0 / fan_in)
        b = self.rng.normal(0, 0.1, cout)
        return self.node("Conv", [x, self.const(f"{name}.w", w), self.const(f"{name}.b", b)], name,
                         kernel_shape=list(k), group=group, **attrs)

    def bn(self, x: str, name: str, c: int) -> str:
        rng = self.rng
        params = [self.const(f"{name}.scale", rng.uniform(0.5, 1.5, c)),
                  self.const(f"{name}.shift", rng.normal(0, 0.1, c)),
                  self.const(f"{name}.mean", rng.normal(0, 0.1, c)),
                  self.const(f"{name}.var", rng.uniform(0.5, 1.5, c))]
        return self.node("BatchNormalization", [x, *params], f"{name}_bn")

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], f"{name}_relu")

    def bn_relu(self, x: str, name: str, c: int) -> str:
        return self.relu(self.bn(x, name, c), name)

    def dense(self, x: str, name: str, cin: int, cout: int, *, bn_relu: bool = False) -> str:
        """Gemm (transB); with bn_relu a BatchNorm folded into its weights and bias, then ReLU."""
        w = self.rng.standard_normal((cout, cin)) * np.sqrt((2.0 if bn_relu else 1.0) / cin)
        b = self.rng.normal(0, 0.1, cout)
        if bn_relu:
            scale, shift = self.rng.uniform(0.5, 1.5, cout), self.rng.normal(0, 0.1, cout)
            mean, var = self.rng.normal(0, 0.1, cout), self.rng.uniform(0.5, 1.5, cout)
            g = scale / np.sqrt(var + 1e-5)
            w, b = w * g[:, None], (b - mean) * g + shift
        y = self.node("Gemm", [x, self.const(f"{name}.w", w), self.const(f"{name}.b", b)], name, transB=1)
        return self.relu(y, name) if bn_relu else y

    def head(self, x: str, cin: int, classes: int) -> str:
        """Global average pooling, flatten, the classifier."""
        x = self.node("GlobalAveragePool", [x], "gap")
        x = self.node("Flatten", [x], "flatten", axis=1)
        return self.dense(x, "fc", cin, classes)

    def model(self, name: str, x: str, in_shape: list[int], y: str, out_shape: list[int],
              opset: int) -> onnx.ModelProto:
        last = self.nodes[-1]
        assert last.output[0] == y
        last.output[0] = "logits"
        graph = helper.make_graph(self.nodes, name, [helper.make_tensor_value_info(x, TensorProto.FLOAT, in_shape)],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
        onnx.checker.check_model(model)
        return model


def _same(k: int, stride: int, size: int) -> list[int]:
    """TensorFlow 'same' padding of one axis as (before, after): the odd pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return [total // 2, total - total // 2]


def _pads(k: int, stride: int, size: int) -> list[int]:
    b, a = _same(k, stride, size)
    return [b, b, a, a]


def ds_cnn(seed: int = 0, opset: int = 13) -> onnx.ModelProto:
    b = _Builder(seed)
    x = b.bn_relu(b.conv("input", "conv1", 1, 64, (10, 4), strides=[2, 2], pads=[4, 1, 5, 1]), "conv1", 64)
    for i in range(1, 5):
        x = b.bn_relu(b.conv(x, f"dw{i}", 64, 64, (3, 3), group=64, pads=[1, 1, 1, 1]), f"dw{i}", 64)
        x = b.bn_relu(b.conv(x, f"pw{i}", 64, 64, (1, 1)), f"pw{i}", 64)
    return b.model("ds_cnn", "input", [1, 1, 49, 10], b.head(x, 64, 12), [1, 12], opset)


# MobileNetV1's depthwise-separable blocks at width 1: (output channels, stride of the depthwise).
MOBILENET_V1_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5, (1024, 2),
                       (1024, 1)]


def mobilenet_vww(seed: int = 0, opset: int = 13, alpha: float = 0.25, size: int = 96) -> onnx.ModelProto:
    b = _Builder(seed)
    c = int(32 * alpha)
    x = b.bn_relu(b.conv("input", "conv1", 3, c, (3, 3), strides=[2, 2], pads=_pads(3, 2, size)), "conv1", c)
    size = -(-size // 2)
    for i, (width, stride) in enumerate(MOBILENET_V1_BLOCKS, 1):
        x = b.bn_relu(b.conv(x, f"dw{i}", c, c, (3, 3), group=c, strides=[stride] * 2,
                             pads=_pads(3, stride, size)), f"dw{i}", c)
        size = -(-size // stride)
        out = int(width * alpha)
        x = b.bn_relu(b.conv(x, f"pw{i}", c, out, (1, 1)), f"pw{i}", out)
        c = out
    return b.model("mobilenet_vww", "input", [1, 3, 96, 96], b.head(x, c, 2), [1, 2], opset)


def resnet8(seed: int = 0, opset: int = 13) -> onnx.ModelProto:
    b = _Builder(seed)
    x = b.bn_relu(b.conv("input", "conv1", 3, 16, (3, 3), pads=[1, 1, 1, 1]), "conv1", 16)
    c, size = 16, 32
    for i, width in enumerate((16, 32, 64), 1):
        stride = 1 if width == c else 2
        y = b.bn_relu(b.conv(x, f"s{i}a", c, width, (3, 3), strides=[stride] * 2, pads=_pads(3, stride, size)),
                      f"s{i}a", width)
        size = -(-size // stride)
        y = b.bn(b.conv(y, f"s{i}b", width, width, (3, 3), pads=[1, 1, 1, 1]), f"s{i}b", width)
        if stride != 1:
            x = b.conv(x, f"s{i}sc", c, width, (1, 1), strides=[stride] * 2)
        x = b.relu(b.node("Add", [x, y], f"s{i}add"), f"s{i}")
        c = width
    return b.model("resnet8", "input", [1, 3, 32, 32], b.head(x, c, 10), [1, 10], opset)


AUTOENCODER_WIDTHS = [640, 128, 128, 128, 128, 8, 128, 128, 128, 128, 640]


def autoencoder(seed: int = 0, opset: int = 13) -> onnx.ModelProto:
    b = _Builder(seed)
    x, widths = "input", AUTOENCODER_WIDTHS
    for i in range(len(widths) - 1):
        x = b.dense(x, f"fc{i + 1}", widths[i], widths[i + 1], bn_relu=i + 2 < len(widths))
    return b.model("autoencoder", "input", [1, 640], x, [1, 640], opset)


# name -> (builder, input shape): the MLPerf Tiny models, keyword spotting first.
MLPERF_TINY = {"ds_cnn": (ds_cnn, (1, 1, 49, 10)), "mobilenet_vww": (mobilenet_vww, (1, 3, 96, 96)),
               "resnet8": (resnet8, (1, 3, 32, 32)), "autoencoder": (autoencoder, (1, 640))}


def onnx2c_reference_bytes() -> int:
    """Activation memory onnx2c reports for the DS-CNN: two live 64x25x5 float tensors."""
    return 2 * 64 * 25 * 5 * 4
