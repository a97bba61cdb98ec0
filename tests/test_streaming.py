"""Streaming models with state inputs (issue 22.1): tests/models/streaming_vad.onnx takes audio
chunks `input [batch, sequence]`, its LSTM state `state [2, batch, 128]` (the batch on axis 1) and
an int64 scalar `sr` whose value selects an `If` branch; it returns a score and the next state."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import model as make_model
from onnx import TensorProto, helper

from onnxc.api import inspect, optimize
from onnxc.backends.c import compile_model
from onnxc.backends.c.toolchain import build_generated, max_rel_error, run_generated
from onnxc.compiler import calibration_data, layout, runtime, selectors, shapes
from onnxc.compiler.calibration import make_calibration
from onnxc.compiler.interface import interface_differences
from onnxc.errors import OnnxcError

MODEL = Path(__file__).resolve().parent / "models" / "streaming_vad.onnx"


def _stream(path_or_model, chunks: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores of each chunk, the state carried from one chunk to the next, and the last state."""
    sess = runtime.session(path_or_model)
    state = np.zeros((2, 1, 128), np.float32)
    scores = []
    for chunk in chunks:
        out, state = sess.run(None, {"input": chunk[None], "state": state, "sr": np.array(sr, np.int64)})
        scores.append(out.reshape(-1))
    return np.concatenate(scores), state


def _chunks(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 512)).astype(np.float32)


def test_batch_axes_follow_the_shared_dim_name():
    m = onnx.load(MODEL)
    assert layout.model_input_axes(m) == {"input": 0, "state": 1, "sr": None}
    # sequence-first inputs: the named batch is found wherever it is
    assert layout.input_axes([("x", ["time", "batch", 80]), ("h", [1, "batch", 64])]) == {"x": 1, "h": 1}
    # unnamed dims keep the leading axis as the batch
    assert layout.input_axes([("x", [None, 3, 32, 32])]) == {"x": 0}
    assert selectors.selector_values(m) == {"sr": np.array(16000)}


def test_inspect_and_lossless_without_flags(tmp_path):
    cost = inspect(MODEL)
    assert cost.input_shapes["state"] == [2, 1, 128]  # the batch is 1 in both inputs that name it
    assert cost.input_shapes["input"][0] == 1 and cost.input_shapes["sr"] == []
    assert not cost.unknown_dims  # every MAC counted at those shapes
    out = tmp_path / "vad.onnx"
    result = optimize(MODEL, preset="lossless", output=out)
    assert result.report.fidelity["rel_l2"] == 0
    assert interface_differences(onnx.load(MODEL), onnx.load(out)) == []


def test_input_shape_and_streaming_match(tmp_path):
    out = tmp_path / "vad.onnx"
    result = optimize(MODEL, preset="lossless", output=out, input_shapes={"input": [1, 512]})
    assert result.report.shapes[0] == {"input": [1, 512], "state": [2, 1, 128], "sr": []}
    assert interface_differences(onnx.load(MODEL), onnx.load(out)) == []
    chunks = _chunks()
    for sr in (16000, 8000):  # both branches kept
        want, want_state = _stream(str(MODEL), chunks, sr)
        got, got_state = _stream(str(out), chunks, sr)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_state, want_state)
    a, _ = _stream(str(MODEL), chunks, 16000)
    b, _ = _stream(str(MODEL), chunks, 8000)
    assert not np.allclose(a, b)  # the branches differ: the selector value matters


def test_shared_dim_takes_the_given_value():
    m = onnx.load(MODEL)
    used, _ = shapes.resolve_input_shapes(m, {"input": [4, 512]})
    assert used["state"] == [2, 4, 128]
    with pytest.raises(OnnxcError, match="'batch' is one dim"):
        shapes.resolve_input_shapes(m, {"input": [4, 512], "state": [2, 3, 128]})


def test_calibration_in_the_model_layout_runs_batched():
    """Arrays as a pipeline feeds them (the state's samples on axis 1, the rate once) are run in
    batches, and every output matches one run per sample."""
    m = onnx.load(MODEL)
    rng = np.random.default_rng(1)
    n = 5
    data = {"input": rng.standard_normal((n, 512)).astype(np.float32),
            "state": rng.standard_normal((2, n, 128)).astype(np.float32), "sr": np.array(8000, np.int64)}
    samples, _ = calibration_data.load(data, m)
    assert samples["state"].shape == (n, 2, 128) and samples["sr"].shape == (n,)
    assert make_calibration(m, data).shapes()[0] == {"input": [1, 512], "state": [2, 1, 128], "sr": []}
    batched = runtime.run(m, samples)
    assert batched["stateN"].shape == (n, 2, 128)
    sess = runtime.session(m)
    for i in range(n):
        feed = {"input": data["input"][i:i + 1], "state": data["state"][:, i:i + 1], "sr": data["sr"]}
        out, state = sess.run(None, feed)
        np.testing.assert_allclose(batched["output"][i], out[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batched["stateN"][i], state[:, 0], rtol=1e-5, atol=1e-6)
    with pytest.raises(OnnxcError, match="disagree on the number of samples"):
        make_calibration(m, {**data, "state": data["state"][:, :3]})


def test_selector_without_constant_is_asked_for_by_name():
    """An If on an integer scalar compared with another input: no value to take, one line."""
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["a"])], "then", [],
                             [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["b"])], "else", [],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4])])
    nodes = [helper.make_node("Equal", ["mode", "limit"], ["c"]),
             helper.make_node("If", ["c"], ["y"], name="pick", then_branch=then, else_branch=other)]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                           helper.make_tensor_value_info("mode", TensorProto.INT64, []),
                           helper.make_tensor_value_info("limit", TensorProto.INT64, [])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [])
    with pytest.raises(OnnxcError, match="input 'mode' selects the branch of If 'pick'"):
        make_calibration(m, None)
    cal = make_calibration(m, {"x": np.ones((3, 4), np.float32), "mode": np.array(2), "limit": np.array(2)})
    assert runtime.run(m, cal.validation)["y"].tolist() == [[1.0] * 4]


def test_cli_input_shape_works(tmp_path):
    out = tmp_path / "vad.onnx"
    run = subprocess.run([sys.executable, "-m", "onnxc", "optimize", str(MODEL), "--preset", "lossless",
                          "-o", str(out), "--input-shape", "input=1x512", "-q"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "" and out.exists()


def test_c_export_carries_the_state_and_matches(tmp_path):
    """Host build: state in and out, the rate pinned to the value the model tests, chunk after chunk."""
    gen = compile_model(onnx.load(MODEL), "vad", {"input": (1, 512)})
    assert gen.prog.inputs == ["input", "state"] and gen.prog.outputs == ["output", "stateN"]
    exe = build_generated([gen], tmp_path)
    header = (tmp_path / "vad.h").read_text()
    assert re.search(r"#define VAD_SR_VALUE 16000\b", header)
    sess = runtime.session(str(MODEL))
    state = np.zeros((2, 1, 128), np.float32)
    for chunk in _chunks(3, seed=4):
        got = run_generated(exe, 0, gen, {"input": chunk[None], "state": state})
        out, state_next = sess.run(None, {"input": chunk[None], "state": state, "sr": np.array(16000)})
        assert max_rel_error(got["output"], out) <= 1e-5 and max_rel_error(got["stateN"], state_next) <= 1e-5
        state = got["stateN"].reshape(2, 1, 128)
    gen8 = compile_model(onnx.load(MODEL), "vad8", {"input": (1, 512)}, values={"sr": np.array(8000)})
    assert gen8.prog.pinned == {"sr": 8000}


def test_folder_of_chunks_calibrates_and_picks_the_c_branch(tmp_path):
    """One .npz per chunk as a pipeline saves them (state [2, 1, 128], the rate a scalar): the
    samples stack on each input's batch axis, and the C export takes the data's rate."""
    from onnxc.api import export

    rng = np.random.default_rng(2)
    folder = tmp_path / "chunks"
    folder.mkdir()
    for i in range(6):
        np.savez(folder / f"c{i}.npz", input=rng.standard_normal((1, 512)).astype(np.float32),
                 state=rng.standard_normal((2, 1, 128)).astype(np.float32), sr=np.array(8000))
    samples, _ = calibration_data.load(folder, onnx.load(MODEL))
    assert samples["state"].shape == (6, 2, 128) and set(samples["sr"].tolist()) == {8000}
    report = export(MODEL, "c", tmp_path / "c", calibration=folder, input_shapes={"input": [1, 512]})
    assert report["pinned_inputs"] == {"sr": 8000}
    assert "#define NET_SR_VALUE 8000" in (tmp_path / "c" / "net.h").read_text()


def test_layer_captures_feed_a_state_on_its_own_axis():
    """Refit captures (`Resumable`) and int8 calibration feed the model as it is fed: a state
    `[2, batch, 8]` gets its samples on axis 1, not 0."""
    from graphs import f32, init

    from onnxc.backends.ort_quant import _Reader
    from onnxc.compiler.resumable import Resumable
    from onnxc.compiler.samples import Samples

    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Gather", ["state", "zero"], ["s0"]),
             helper.make_node("Add", ["h", "s0"], ["y"])]
    m = make_model(nodes, [f32("x", ["batch", 4]), f32("state", [2, "batch", 8])], [f32("y", ["batch", 8])],
                   [init("w", rng.standard_normal((4, 8)).astype(np.float32)), init("zero", np.array(0))])
    samples = Samples([{"x": rng.standard_normal((5, 4)).astype(np.float32),
                        "state": rng.standard_normal((5, 2, 8)).astype(np.float32)}])
    want = runtime.run(m, samples)["y"]
    np.testing.assert_allclose(want, samples["x"] @ numpy_w(m) + samples["state"][:, 0], rtol=1e-5)
    got = np.concatenate([b["y"] for b in Resumable(m, samples, batch_size=2).capture(m, ["y"])])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    feeds = list(iter(_Reader(samples, 2, axes=layout.model_input_axes(m)).get_next, None))
    assert [f["state"].shape for f in feeds] == [(2, 2, 8), (2, 2, 8), (2, 1, 8)]


def numpy_w(m: onnx.ModelProto) -> np.ndarray:
    return onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w"))
