"""`--preset lossless` on real architectures and on the graph features of third-party exports:
the result must run in onnxruntime with outputs equal to the original within 1e-5 relative."""

from __future__ import annotations

import os

import graphs
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxc
from onnxc.compiler import canonical, runtime
from onnxc.compiler.calibration import random_inputs

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
LIGHT_MODELS = sorted(f[:-5] for f in os.listdir(LIGHT) if f.endswith(".onnx"))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(a.astype(np.float64)), 1e-30))


def _check_lossless(src, out_path, input_shapes=None, inputs=None, calibration=None):
    result = onnxc.optimize(src, preset="lossless", output=out_path, input_shapes=input_shapes,
                            calibration=calibration)
    original = onnxc.load(src)
    optimized = onnx.load(str(out_path))
    onnx.checker.check_model(optimized)
    if inputs is None:
        inputs = random_inputs(onnxc.canonicalize(original, input_shapes, infer=False), 2, seed=1,
                               input_shapes=input_shapes)
    ref, got = runtime.run(original, inputs), runtime.run(optimized, inputs)
    assert list(ref) == list(got)
    for name in ref:
        assert ref[name].shape == got[name].shape
        assert _rel(ref[name], got[name]) <= 1e-5, name
    return result, original, optimized


def _light_with_random_weights(name: str, tmp_path) -> str:
    """The light models are constant-filled; random weights make the equality check meaningful."""
    m = onnx.load(os.path.join(LIGHT, f"{name}.onnx"))
    canonical._initializers_out_of_inputs(m)
    canonical.fold_constants(m.graph)  # weights become initializers; BatchNormalization stays
    graphs.randomize_weights(m)
    path = tmp_path / f"{name}_random.onnx"
    onnx.save(m, str(path))
    return str(path)


def original_bn(m: onnx.ModelProto) -> int:
    return sum(1 for n in m.graph.node if n.op_type == "BatchNormalization")


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_architectures_stay_exact(name, tmp_path):
    # The shipped (constant-weight) model itself, exactly as a user would pass it.
    _check_lossless(os.path.join(LIGHT, f"{name}.onnx"), tmp_path / "out.onnx")


@pytest.mark.parametrize("name", ["light_resnet50", "light_densenet121", "light_inception_v2", "light_shufflenet"])
def test_light_random_weights_with_batchnorm_fold(name, tmp_path):
    src = _light_with_random_weights(name, tmp_path)
    result, original, optimized = _check_lossless(src, tmp_path / "out.onnx")
    ops = [n.op_type for n in optimized.graph.node]
    convs_then_bn = sum(1 for n in original.graph.node if n.op_type == "BatchNormalization"
                        and any(p.op_type == "Conv" and p.output[0] == n.input[0] for p in original.graph.node))
    assert convs_then_bn > 0
    assert ops.count("BatchNormalization") == original_bn(original) - convs_then_bn


def test_constant_node_weights_symbolic_batch(tmp_path):
    src = tmp_path / "paddle.onnx"
    onnx.save(graphs.constant_node_cnn(), str(src))
    _, _, optimized = _check_lossless(src, tmp_path / "out.onnx")
    ops = [n.op_type for n in optimized.graph.node]
    assert "Constant" not in ops and "BatchNormalization" not in ops
    assert "Dropout" not in ops and "Identity" not in ops
    assert optimized.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert optimized.producer_name == "paddle-like" and optimized.doc_string == "built in tests"


def test_if_subgraph_passes_through(tmp_path):
    src = tmp_path / "if.onnx"
    onnx.save(graphs.if_model(), str(src))
    x = np.array([[1.0, -2.0, 3.0, 0.5]], np.float32)
    _check_lossless(src, tmp_path / "out.onnx", inputs={"x": x})
    _check_lossless(src, tmp_path / "out2.onnx", inputs={"x": -x})
    optimized = onnx.load(str(tmp_path / "out.onnx"))
    assert any(n.op_type == "If" for n in optimized.graph.node)


def test_quantized_conv_integer_untouched(tmp_path):
    src = tmp_path / "q.onnx"
    onnx.save(graphs.conv_integer_model(), str(src))
    _, original, optimized = _check_lossless(src, tmp_path / "out.onnx")
    assert [n.op_type for n in optimized.graph.node] == [n.op_type for n in original.graph.node]


def test_lstm(tmp_path):
    src = tmp_path / "lstm.onnx"
    onnx.save(graphs.lstm_model(), str(src))
    # Time and batch stay symbolic: the calibration file provides concrete samples.
    x = np.random.default_rng(0).standard_normal((4, 2, 5)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x)
    _check_lossless(src, tmp_path / "out.onnx", inputs={"x": x[:3]}, calibration=tmp_path / "cal.npz")


def test_input_shape_is_used_inside_and_not_written(tmp_path):
    """--input-shape fixes the dims the compiler works at; the written model keeps the source's
    symbolic batch (the interface contract), and still runs at the given and at other sizes."""
    src = tmp_path / "paddle.onnx"
    onnx.save(graphs.constant_node_cnn(), str(src))
    result, _, _ = _check_lossless(src, tmp_path / "out.onnx", input_shapes={"x": [2, 3, 8, 8]})
    optimized = onnx.load(str(tmp_path / "out.onnx"))
    dim0 = optimized.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "N" and not dim0.HasField("dim_value")
    assert result.report.shapes == [{"x": [1, 3, 8, 8]}]
    sess = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    for n in (2, 5):
        assert sess.run(None, {"x": np.zeros((n, 3, 8, 8), np.float32)})[0].shape == (n, 5)


def test_metadata_survives(tmp_path):
    m = graphs.constant_node_cnn()
    onnx.helper.set_model_props(m, {"author": "me", "license": "MIT"})
    m.model_version = 7
    m.graph.doc_string = "graph doc"
    src = tmp_path / "meta.onnx"
    onnx.save(m, str(src))
    onnxc.optimize(src, preset="lossless", output=tmp_path / "out.onnx")
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert {p.key: p.value for p in out.metadata_props} == {"author": "me", "license": "MIT"}
    assert out.model_version == 7 and out.graph.doc_string == "graph doc"
    assert out.ir_version == m.ir_version and [(o.domain, o.version) for o in out.opset_import] == [("", 17)]


def test_output_is_byte_identical_across_runs(tmp_path):
    src = tmp_path / "paddle.onnx"
    onnx.save(graphs.constant_node_cnn(), str(src))
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnxc.optimize(src, preset="lossless", output=a, seed=3)
    onnxc.optimize(src, preset="lossless", output=b, seed=3)
    assert a.read_bytes() == b.read_bytes()
