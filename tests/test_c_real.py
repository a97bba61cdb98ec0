"""C backend on real-export shapes of graphs (issue 11.7): a torch CNN+LSTM with a dynamic sequence
length, a streaming GRU with a state input and output, `If`s folded or refused, and shapes that
only onnxruntime can tell. Every C result is compared with onnxruntime on the same inputs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import f32, if_model, init, model, rand
from onnx import TensorProto, helper

from onnxc.backends.c import compile_model
from onnxc.backends.c.toolchain import build_generated, max_rel_error, run_generated
from onnxc.compiler import runtime
from onnxc.errors import OnnxcError

TOL = 1e-5
MODELS = Path(__file__).resolve().parent / "models"


def _c_matches_onnxruntime(m: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path, **kw):
    gen = compile_model(m, "net", input_shapes={k: v.shape for k, v in feeds.items()}, **kw)
    exe = build_generated([gen], tmp_path)
    got = run_generated(exe, 0, gen, feeds)
    sess = runtime.session(m)  # one run: inputs need not share a leading sample axis
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    for name, value in ref.items():
        assert got[name].shape == value.shape, name
        assert max_rel_error(got[name], value) <= TOL, name
    return gen


def test_torch_cnn_lstm_with_dynamic_length(tmp_path):
    """scripts/export_test_models.py's torch export: Conv1d, a Shape -> Gather -> Concat -> Reshape
    chain, a bidirectional LSTM and a GRU, with the sequence length dynamic."""
    m = onnx.load(str(MODELS / "cnn_lstm_gru.onnx"))
    assert m.graph.input[0].type.tensor_type.shape.dim[2].dim_param == "seqlen"
    assert {"LSTM", "GRU", "Shape", "Reshape"} <= {n.op_type for n in m.graph.node}
    x = np.random.default_rng(1).standard_normal((1, 4, 13)).astype(np.float32)
    gen = _c_matches_onnxruntime(m, {"x": x}, tmp_path)
    assert gen.prog.shapes["y"] == (13, 1, 3)
    assert {"LSTM", "GRU"} <= set(gen.prog.source_ops)


def _streaming_gru() -> onnx.ModelProto:
    """A voice-activity style cell: frame features and the state in, score and new state out."""
    rng = np.random.default_rng(2)
    hidden = 6
    nodes = [helper.make_node("GRU", ["x", "W", "R", "B", "", "h"], ["", "hn"], name="gru", hidden_size=hidden,
                              linear_before_reset=1),
             helper.make_node("Reshape", ["hn", "flat"], ["hf"], name="flatten"),
             helper.make_node("Gemm", ["hf", "fw"], ["logit"], name="fc"),
             helper.make_node("Sigmoid", ["logit"], ["prob"], name="sigmoid")]
    inits = [init("W", rand(rng, 1, 3 * hidden, 5)), init("R", rand(rng, 1, 3 * hidden, hidden)),
             init("B", rand(rng, 1, 6 * hidden)), init("flat", np.array([1, hidden], np.int64)),
             init("fw", rand(rng, hidden, 1))]
    outputs = [f32("prob", [1, 1]), f32("hn", [1, 1, hidden])]
    return model(nodes, [f32("x", [4, 1, 5]), f32("h", [1, 1, hidden])], outputs, inits)


def test_state_input_and_output(tmp_path):
    m = _streaming_gru()
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((4, 1, 5)).astype(np.float32),
             "h": rng.standard_normal((1, 1, 6)).astype(np.float32)}
    gen = _c_matches_onnxruntime(m, feeds, tmp_path)
    header = (tmp_path / "net.h").read_text()
    assert "int net_run(const float *in0, const float *in1, float *out0, float *out1);" in header
    sizes = dict(re.findall(r"#define (NET_\w+_SIZE) (\d+)", header))
    assert (sizes["NET_X_SIZE"], sizes["NET_H_SIZE"], sizes["NET_PROB_SIZE"], sizes["NET_HN_SIZE"]) == \
        ("20", "6", "1", "6")
    assert gen.prog.inputs == ["x", "h"] and gen.prog.outputs == ["prob", "hn"]


def _if_on_shape() -> onnx.ModelProto:
    """An If whose condition tests the input's width: constant once the shape is fixed."""
    then_nodes = [helper.make_node("Mul", ["h", "two"], ["t"]), helper.make_node("Relu", ["t"], ["t_out"])]
    then_g = helper.make_graph(then_nodes, "then", [], [f32("t_out", None)], initializer=[init("two", np.float32(2))])
    else_g = helper.make_graph([helper.make_node("Neg", ["h"], ["e_out"])], "else", [], [f32("e_out", None)])
    nodes = [helper.make_node("Sigmoid", ["x"], ["h"], name="act"),
             helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "one"], ["w"], name="width", axis=0),
             helper.make_node("Greater", ["w", "eight"], ["wide"], name="wide"),
             helper.make_node("If", ["wide"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    return model(nodes, [f32("x", [1, "W"])], [f32("y", [1, "W"])],
                 [init("one", np.array(1, np.int64)), init("eight", np.array(8, np.int64))])


@pytest.mark.parametrize("width", [4, 12])
def test_if_with_constant_condition_is_folded(tmp_path, width):
    m = _if_on_shape()
    x = np.random.default_rng(width).standard_normal((1, width)).astype(np.float32)
    gen = _c_matches_onnxruntime(m, {"x": x}, tmp_path)
    assert ("Mul" in gen.prog.source_ops) == (width > 8) and ("Neg" in gen.prog.source_ops) == (width <= 8)


def test_if_on_run_time_data_is_refused_naming_the_node():
    with pytest.raises(OnnxcError, match=r"If node 'if' has a condition computed at run time"):
        compile_model(if_model(), "net")


def _shape_from_data() -> onnx.ModelProto:
    """A Reshape target computed from run-time values (here always 12), which ONNX shape
    inference cannot follow but onnxruntime shows."""
    nodes = [helper.make_node("Mul", ["x", "zero"], ["z"], name="zero_x"),
             helper.make_node("ReduceSum", ["z"], ["zs"], name="sum", keepdims=0),
             helper.make_node("Add", ["zs", "twelve"], ["n"], name="plus"),
             helper.make_node("Cast", ["n"], ["ni"], name="cast", to=TensorProto.INT64),
             helper.make_node("Unsqueeze", ["ni", "ax0"], ["n1"], name="unsq"),
             helper.make_node("Concat", ["one", "n1"], ["target"], name="concat", axis=0),
             helper.make_node("Reshape", ["x", "target"], ["r"], name="reshape"),
             helper.make_node("Softmax", ["r"], ["y"], name="softmax", axis=-1)]
    inits = [init("zero", np.float32(0)), init("twelve", np.float32(12)), init("ax0", np.array([0], np.int64)),
             init("one", np.array([1], np.int64))]
    return model(nodes, [f32("x", [1, 3, 4])], [f32("y", None)], inits)


def test_shapes_onnx_cannot_infer_come_from_onnxruntime(tmp_path):
    m = _shape_from_data()
    inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    shapes = {v.name: v.type.tensor_type.shape for v in inferred.graph.value_info}
    assert "r" not in shapes or any(not d.HasField("dim_value") for d in shapes["r"].dim)
    x = np.random.default_rng(5).standard_normal((1, 3, 4)).astype(np.float32)
    gen = _c_matches_onnxruntime(m, {"x": x}, tmp_path)
    assert gen.prog.shapes["y"] == (1, 12)


def test_recognizer_with_shape_computed_states_at_opset_11(tmp_path):
    """tests/models/crnn_shapes.onnx: a torch CNN + BiLSTM at opset 11 whose LSTM initial states
    come from Shape -> Gather -> Unsqueeze -> Concat -> ConstantOfShape and whose Reshape targets
    are computed from the dynamic width: all constant once the width is fixed, folded at export."""
    m = onnx.load(str(MODELS / "crnn_shapes.onnx"))
    ops = {n.op_type for n in m.graph.node}
    assert {"Shape", "Gather", "Unsqueeze", "Concat", "ConstantOfShape", "LSTM", "Reshape"} <= ops
    assert m.opset_import[0].version == 11
    x = np.random.default_rng(6).standard_normal((1, 1, 64, 256)).astype(np.float32)
    gen = _c_matches_onnxruntime(m, {"input1": x}, tmp_path)  # built with -Werror
    assert gen.prog.shapes["output"] == (1, 64, 11)
    assert not {"Shape", "Gather", "Concat", "ConstantOfShape"} & set(gen.prog.source_ops)  # all folded


def test_export_time_evaluation_reads_old_opset_attributes():
    """Unsqueeze/Squeeze took their axes as attributes before opset 13: evaluated at the model's
    opset, not the newest (which reads them from a second input)."""
    from onnxc.backends.c.prepare import evaluate_node

    node = helper.make_node("Unsqueeze", ["a"], ["b"], axes=[0])
    assert evaluate_node(node, {"a": np.array(3, np.int64)}, 11)[0].tolist() == [3]
    node = helper.make_node("Squeeze", ["a"], ["b"], axes=[1])
    assert evaluate_node(node, {"a": np.zeros((2, 1), np.int64)}, 11)[0].shape == (2,)


def test_int64_computed_from_data_names_the_node(tmp_path):
    """int64 arithmetic on run-time data is not folded: one line naming the node."""
    nodes = [helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT64, name="to_int"),
             helper.make_node("Add", ["xi", "one"], ["yi"], name="add_int"),
             helper.make_node("Cast", ["yi"], ["y"], to=TensorProto.FLOAT, name="to_float")]
    m = model(nodes, [f32("x", [1, 4])], [f32("y", [1, 4])], [init("one", np.array([1], np.int64))])
    with pytest.raises(OnnxcError, match=r"node '(to_int|add_int)'"):
        compile_model(m, "net", {"x": (1, 4)})
