"""Generated C on a Cortex-M4: cross-compiled with arm-none-eabi-gcc (-mcpu=cortex-m4 -mthumb
-mfloat-abi=hard -mfpu=fpv4-sp-d16 -O2, -Werror) with our vector table, reset handler and
linker script for QEMU's mps2-an386, run under qemu-system-arm with semihosting; the printed
output bits are compared with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from onnxc.backends.c import compile_model, mps2
from onnxc.backends.c.reference_models import ds_cnn
from onnxc.backends.c.toolchain import max_rel_error
from onnxc.compiler import runtime

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


def test_mobilenet_ds_cnn_and_lstm_run_on_cortex_m4(tmp_path):
    x = np.load(ROOT / "samples" / "digits_test.npz")["input"][:1]
    kws_x = np.random.default_rng(0).standard_normal((1, 1, 49, 10)).astype(np.float32)
    seq_x = np.random.default_rng(1).standard_normal((1, 4, 12)).astype(np.float32)
    models = {"mobilenet": (onnx.load(ROOT / "samples" / "mobilenet.onnx"), "input", x),
              "kws": (ds_cnn(seed=0), "input", kws_x),
              "seq": (onnx.load(ROOT / "tests" / "models" / "cnn_lstm_gru.onnx"), "x", seq_x)}  # LSTM + GRU
    entries = []
    for name, (model, inp, value) in models.items():
        gen = compile_model(model, name, {inp: value.shape})
        gen.write(tmp_path)
        entries.append((name, [value], [gen.prog.size(o) for o in gen.prog.outputs]))
    (tmp_path / "main.c").write_text(mps2.firmware_main(entries))
    sources = sorted(tmp_path.glob("*.c"))
    elf = mps2.build(sources, tmp_path, include=[tmp_path])
    sizes = mps2.size([elf])
    assert sizes["text"] < 4 << 20 and sizes["data"] + sizes["bss"] < 4 << 20  # fits the AN386 memories
    printed = mps2.parse_outputs(mps2.run_qemu(elf, timeout=120))
    for name, (model, inp, value) in models.items():
        ref = list(runtime.run(model, {inp: value}).values())[0].reshape(-1)
        got = printed[f"{name}.out0"]
        assert got.shape == ref.shape
        assert max_rel_error(got, ref) <= TOL, name


def test_streaming_vad_carries_its_state_on_cortex_m4(tmp_path):
    """tests/models/streaming_vad.onnx (state in and out, the sample rate pinned at export) over a
    sequence of chunks, the state copied from output to input between chunks as firmware would."""
    model = onnx.load(ROOT / "tests" / "models" / "streaming_vad.onnx")
    gen = compile_model(model, "vad", {"input": (1, 512)})
    gen.write(tmp_path)
    rng = np.random.default_rng(5)
    steps = 4
    chunks = [[rng.standard_normal((1, 512)).astype(np.float32), np.zeros((2, 1, 128), np.float32)]
              for _ in range(steps)]
    sizes = [gen.prog.size(o) for o in gen.prog.outputs]
    (tmp_path / "main.c").write_text(mps2.streaming_main("vad", chunks, sizes, carry={1: 1}))
    elf = mps2.build(sorted(tmp_path.glob("*.c")), tmp_path, include=[tmp_path])
    printed = mps2.parse_outputs(mps2.run_qemu(elf, timeout=120))
    sess = runtime.session(model)
    state = chunks[0][1]
    for i, (chunk, _) in enumerate(chunks):
        out, state = sess.run(None, {"input": chunk, "state": state, "sr": np.array(16000, np.int64)})
        assert max_rel_error(printed[f"vad{i}.out0"], out.reshape(-1)) <= TOL, i
        assert max_rel_error(printed[f"vad{i}.out1"], state.reshape(-1)) <= TOL, i
    assert not np.allclose(printed["vad0.out1"], printed[f"vad{steps - 1}.out1"])  # the state moved
