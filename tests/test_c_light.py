"""C backend on real architectures (onnx's `light` models: SqueezeNet, ShuffleNet, Inception-v1)
with random weights: the generated C compiles with -Werror and matches onnxruntime within 1e-4
of the output scale, on the logits (Softmax input, exported as an extra output) and the
probabilities.

The others lower too, but are too big for a test: DenseNet-121, Inception-v2 and ResNet-50
(8M-25M weights: 90-280 MB of C) and VGG19, AlexNet and ZFNet (60M-140M weights);
`benchmarks/c_backend.py --light NAME,...` runs any of them.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from graphs import randomize_weights
from onnx import helper

from onnxc.backends.c import compile_model
from onnxc.backends.c.toolchain import build_generated, max_rel_error, run_generated
from onnxc.compiler import runtime
from onnxc.compiler.canonical import canonicalize

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
TOL = 1e-4


def light_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """Canonical light model with He-scaled random weights and the Softmax input as a 2nd output."""
    model = randomize_weights(canonicalize(onnx.load(os.path.join(LIGHT, f"light_{name}.onnx"))), seed)
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    if softmax:
        model.graph.output.append(helper.make_tensor_value_info(softmax[-1].input[0], onnx.TensorProto.FLOAT, None))
    return canonicalize(model)


@pytest.mark.parametrize("name", ["squeezenet", "shufflenet", "inception_v1"])
def test_light_architecture_matches_onnxruntime(name, tmp_path):
    model = light_model(name)
    gen = compile_model(model, name)
    assert gen.arena_bytes <= gen.report()["naive_peak_bytes"]
    exe = build_generated([gen], tmp_path)
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    feed = {gen.prog.inputs[0]: x}
    got = run_generated(exe, 0, gen, feed)
    ref = runtime.run(model, feed)
    assert set(got) == set(ref) and len(got) == 2
    for out in ref:
        assert max_rel_error(got[out], ref[out]) <= TOL, out
