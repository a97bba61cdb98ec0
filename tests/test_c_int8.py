"""The C backend in int8: the QDQ model of our onnxruntime int8 flow lowered to integer kernels.

DS-CNN and the four digits samples are quantized once (static QDQ, per-channel weights, the
calibration set), lowered, built into one host program (-O2, -Werror) and run on the test set
against onnxruntime running the same QDQ model as its int8 model: every output equal, digits
accuracy against the float model, and flash/arena against the float build. Two
digits samples clustered to 4 bits keep their codes (int8 codebooks) and must take less flash
than the unclustered int8 build, with the same agreement. The int8 DS-CNN, MobileNet and the
clustered MobileNet also run on the emulated Cortex-M4 and must match the host build bit for bit.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from mlperf_tiny import MLAS_FLOAT_REQUANT, int8_session
from sample_data import CALIBRATION, SAMPLE_MODELS, load_test_set, sample_path

import onnxc
from onnxc.backends import ExportOptions
from onnxc.backends.c import compile_model, mps2, quantize_for_c
from onnxc.backends.c.reference_models import ds_cnn
from onnxc.backends.c.requant import channel_table, mlas_scale, requantize, room, unpack
from onnxc.backends.c.toolchain import build_generated, run_samples
from onnxc.compiler import runtime
from onnxc.compiler.calibration import make_calibration
from onnxc.compiler.canonical import canonicalize

KWS_SAMPLES = 300
# Per output channel an int8 layer stores its bias and float32 requantization scale besides its weights,
# packed in one word where they fit (requant.channel_table): layers with few weights per channel
# (DS-CNN's and MobileNet's 3x3 depthwise convolutions: 9) pay it most. Dense layers keep two words
# per channel: the input zero point folded into their bias leaves too few bits to pack the scale.
WEIGHT_RATIO = 0.271
CLUSTERED = ("mlp", "mobilenet")  # 4-bit clustered in int8: codes in dense layers and in 1x1 convolutions


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(name -> float model, QDQ model, float build, int8 build, inputs), and the host program."""
    x_test, _ = load_test_set()
    kws = np.random.default_rng(1).standard_normal((KWS_SAMPLES, 1, 1, 49, 10)).astype(np.float32)
    entries = {}
    for name in SAMPLE_MODELS + ["ds_cnn"]:
        model = canonicalize(ds_cnn(seed=0) if name == "ds_cnn" else onnx.load(sample_path(name)))
        cal = make_calibration(model, None if name == "ds_cnn" else CALIBRATION, seed=0)
        qdq, _ = quantize_for_c(model, ExportOptions(int8="static", calibration=cal))
        inputs = kws[:, 0] if name == "ds_cnn" else x_test
        entries[name] = (model, qdq, compile_model(model, f"{name}_f"), compile_model(qdq, name), inputs)
    gens = [e[3] for e in entries.values()]
    exe = build_generated(gens, tmp_path_factory.mktemp("int8"), opt="-O2")
    outputs = {name: run_samples(exe, k, e[3], {"input": e[4]})["logits"].reshape(len(e[4]), -1)
               for k, (name, e) in enumerate(entries.items())}
    return entries, exe, outputs


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """(name -> QDQ model of the 4-bit clustered sample, its int8 build), and their test-set outputs."""
    x_test, _ = load_test_set()
    entries = {}
    for name in CLUSTERED:
        res = onnxc.optimize(sample_path(name), passes=["cluster:bits=4"], calibration=CALIBRATION)
        model = canonicalize(res.model)
        cal = make_calibration(model, CALIBRATION, seed=0)
        qdq, _ = quantize_for_c(model, ExportOptions(int8="static", calibration=cal))
        entries[name] = (qdq, compile_model(qdq, f"{name}_c4"))
    exe = build_generated([g for _, g in entries.values()], tmp_path_factory.mktemp("int8_c4"), opt="-O2")
    outputs = {name: run_samples(exe, k, g, {"input": x_test})["logits"].reshape(len(x_test), -1)
               for k, (name, (_, g)) in enumerate(entries.items())}
    return entries, outputs


def qdq_reference(qdq: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnxruntime's int8 model (its integer kernels, exact int32 sums: mlperf_tiny.int8_session)."""
    return runtime.run(int8_session(qdq), {"input": x})["logits"].reshape(len(x), -1)


def assert_matches(name: str, gen, qdq: onnx.ModelProto, x: np.ndarray, ours: np.ndarray) -> None:
    """Every output equal to onnxruntime's int8 model's (the same integer sums and float32
    requantization: requant.py); within one output step where the model adds int8 tensors
    (onnxruntime's x86 QLinearAdd computes a fused multiply-add of its own, which ours follows to
    the step, not to the bit)."""
    ref = qdq_reference(qdq, x)
    assert ours.shape == ref.shape, name
    steps = np.abs(ours - ref) / gen.prog.entry_int8.output_scale
    if any(n.op_type == "Add" for n in qdq.graph.node) or not MLAS_FLOAT_REQUANT:
        assert steps.max() <= 1.001, (name, float(steps.max()))
    else:
        assert np.array_equal(ours, ref), (name, float(np.mean(ours == ref)), float(steps.max()))


def test_int8_matches_onnxruntime_on_the_test_sets(built):
    entries, _, outputs = built
    for name, (_, qdq, _, gen, x) in entries.items():
        assert_matches(name, gen, qdq, x, outputs[name])


def test_clustered_int8_keeps_codes_in_less_flash(built, clustered, tmp_path):
    """Clustered layers are stored as 4-bit codes with int8 codebooks (decoded in the kernels):
    less flash than the unclustered int8 build, the same agreement with onnxruntime; and so
    through `onnxc optimize -p cluster:bits=4 --backend c --int8`."""
    entries, outputs = clustered
    x_test, _ = load_test_set()
    for name, (qdq, gen) in entries.items():
        dense = built[0][name][3]
        assert gen.prog.coded_int8, name
        assert gen.weight_bytes < 0.8 * dense.weight_bytes, (name, gen.weight_bytes, dense.weight_bytes)
        assert_matches(name, gen, qdq, x_test, outputs[name])
    out = tmp_path / "net"
    cmd = [sys.executable, "-m", "onnxc", "optimize", str(sample_path("mlp")), "-p", "cluster:bits=4", "--backend",
           "c", "--int8", "static", "--calibration", str(CALIBRATION), "-o", str(out), "--name", "net"]
    subprocess.run(cmd, check=True, capture_output=True)
    header = (out / "net.h").read_text()
    assert f"#define NET_WEIGHT_BYTES {entries['mlp'][1].weight_bytes}" in header


def test_int8_digits_accuracy_within_one_point_of_float(built):
    entries, _, outputs = built
    _, labels = load_test_set()
    for name, (model, _, _, _, x) in entries.items():
        if name == "ds_cnn":
            continue
        ours = outputs[name]
        float_acc = 100 * np.mean(runtime.run(model, {"input": x})["logits"].argmax(1) == labels)
        int8_acc = 100 * np.mean(ours.argmax(1) == labels)
        assert int8_acc >= float_acc - 1.0, (name, float_acc, int8_acc)


def test_int8_weights_and_arena_against_the_float_build(built):
    entries, _, _ = built
    for name, (_, _, fgen, gen, _) in entries.items():
        assert gen.weight_bytes <= WEIGHT_RATIO * fgen.weight_bytes, (name, gen.weight_bytes, fgen.weight_bytes)
        assert gen.arena_bytes <= 0.3 * fgen.arena_bytes, (name, gen.arena_bytes, fgen.arena_bytes)
        assert gen.prog.entry_int8 is not None, name


@pytest.mark.skipif(not mps2.available(), reason="arm-none-eabi-gcc / qemu-system-arm not installed")
def test_int8_on_cortex_m4_matches_host_bit_for_bit(built, clustered, tmp_path):
    """On the Cortex-M4 the GEMM and depthwise kernels take their DSP-extension (SMLAD) variant,
    on the host the portable one: DS-CNN, MobileNet (stride 1 and 2 depthwise, residual Add) and
    the clustered MobileNet (codes decoded in the GEMM) must agree bit for bit, in one firmware."""
    entries, _, outputs = built
    x_digit = entries["mobilenet"][4][:1]
    gens = {"ds_cnn": (entries["ds_cnn"][3], entries["ds_cnn"][4][:1]),
            "mobilenet": (entries["mobilenet"][3], x_digit), "mobilenet_c4": (clustered[0]["mobilenet"][1], x_digit)}
    outputs = {**outputs, "mobilenet_c4": clustered[1]["mobilenet"]}
    models = []
    for name, (gen, x) in gens.items():
        gen.write(tmp_path)
        models.append((name, [x], [gen.prog.size("logits")]))
    (tmp_path / "main.c").write_text(mps2.firmware_main(models, timed=True))
    elf = mps2.build(sorted(tmp_path.glob("*.c")), tmp_path, include=[tmp_path])
    text = mps2.run_qemu(elf, timeout=120, icount=True)
    printed, counts = mps2.parse_outputs(text), mps2.count_instructions(text)
    for name, _, _ in models:
        assert printed[f"{name}.out0"].view("<u4").tolist() == outputs[name][0].view("<u4").tolist(), name
        assert 0 < counts[name] < 20_000_000, (name, counts[name])


def test_channel_table_packs_scales_that_fit_only():
    """One word per channel holds the bias and a float32 scale whose mantissa fits the bits the bias
    leaves (what scale_snap makes of the flow's scales), read back as the same float32; arbitrary
    scales keep {bias, scale} pairs, also read back exactly."""
    rng = np.random.default_rng(0)
    bias = rng.integers(-3000, 3000, 64)
    scale = rng.uniform(2.0 ** -9, 2.0 ** -6, 64).astype(np.float32)
    table = channel_table(bias, scale)
    assert not table.packed and table.words.size == 128
    b, s = unpack(table)
    assert np.array_equal(b, bias) and np.array_equal(s.view(np.uint32), scale.view(np.uint32))
    lay = room(bias, scale)
    assert lay is not None and lay.mantissa_bits >= 15
    keep = ~np.uint32((1 << (23 - lay.mantissa_bits)) - 1)
    snapped = (scale.view(np.uint32) & keep).view(np.float32)
    table = channel_table(bias, snapped)
    assert table.packed and table.words.size == 64
    b, s = unpack(table)
    assert np.array_equal(b, bias) and np.array_equal(s.view(np.uint32), snapped.view(np.uint32))


def _qlinear_conv(rng, y_scale: float, k: int, group: int) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """A QLinearConv (uint8, 6 -> 6 channels, 7x5) and its result on 3 inputs as onnxruntime
    defines it: exact integer sums, then requant.requantize (float32 scale and product, ties to even)."""
    from onnx import TensorProto, helper, numpy_helper

    c, h, w_ = 6, 7, 5
    w = rng.integers(-127, 128, (c, c // group, k, k)).astype(np.int8)
    b = rng.integers(-500, 500, c).astype(np.int32)
    ws = (0.01 * rng.uniform(0.5, 2, c)).astype(np.float32)
    inits = [numpy_helper.from_array(v, n) for v, n in (
        (np.array(0.05, np.float32), "xs"), (np.array(3, np.uint8), "xz"), (w, "w"), (ws, "ws"),
        (np.zeros(c, np.int8), "wz"), (np.array(y_scale, np.float32), "ys"), (np.array(128, np.uint8), "yz"),
        (b, "b"))]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                            pads=[k // 2] * 4, group=group)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, c, h, w_])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, c, h, w_])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x = rng.integers(0, 256, (3, 1, c, h, w_)).astype(np.uint8)
    xp = np.pad(x[:, 0].astype(np.int64) - 3, ((0, 0), (0, 0), (k // 2,) * 2, (k // 2,) * 2))
    acc = np.zeros((3, c, h, w_), np.int64) + b[None, :, None, None]
    cg = c // group
    for o in range(c):
        g = o // cg
        for i in range(k * k):
            win = xp[:, g * cg:(g + 1) * cg, i // k:i // k + h, i % k:i % k + w_]
            acc[:, o] += np.einsum("nchw,c->nhw", win, w[o, :, i // k, i % k].astype(np.int64))
    scale = mlas_scale(0.05, ws, y_scale)[None, :, None, None]
    return model, x, (requantize(acc, scale, 0, -128, 127) + 128).astype(np.uint8)


def test_int8_fast_kernels_are_exact_at_any_multiplier(tmp_path):
    """1x1, im2col and depthwise kernels with multipliers from 5 down to 2e-8 equal onnxruntime's
    arithmetic (exact sums, float32 requantization), and so does onnxruntime's int8 model."""
    rng = np.random.default_rng(0)
    cases = [(ys, k, group) for ys in (1e-4, 0.02, 40.0, 2e4) for k, group in ((1, 1), (3, 1), (3, 6))]
    built = [_qlinear_conv(rng, *case) for case in cases]
    gens = [compile_model(model, f"q{i}") for i, (model, _, _) in enumerate(built)]
    exe = build_generated(gens, tmp_path, opt="-O2")
    for i, ((_, x, ref), gen) in enumerate(zip(built, gens)):
        out = run_samples(exe, i, gen, {"x": x[:, 0]})["y"].reshape(ref.shape)
        assert np.array_equal(out, ref), cases[i]
        if MLAS_FLOAT_REQUANT:
            ort_out = np.stack([int8_session(built[i][0]).run(None, {"x": xi})[0][0] for xi in x])
            assert np.array_equal(ort_out, ref), cases[i]


def test_export_c_int8(tmp_path):
    out = tmp_path / "net"
    report = onnxc.export(sample_path("mlp"), "c", out, int8="static", calibration=CALIBRATION, name="net")
    assert report["int8"]["entry_point"] == "net_run_int8" and report["int8"]["quant_format"] == "QDQ"
    header = (out / "net.h").read_text()
    for macro in ("NET_INPUT_SCALE", "NET_INPUT_ZERO_POINT", "NET_OUTPUT_SCALE", "NET_OUTPUT_ZERO_POINT"):
        assert f"#define {macro} " in header
    assert "int net_run(const float *input, float *output);" in header
    assert "int net_run_int8(const int8_t *input, int8_t *output);" in header
    assert (out / "onnxc_int8.c").exists()
    cmd = [sys.executable, "-m", "onnxc", "export", str(sample_path("mlp")), "--backend", "c", "--int8", "dynamic",
           "-o", str(tmp_path / "dyn")]
    dynamic = subprocess.run(cmd, capture_output=True, text=True)
    assert dynamic.returncode == 2 and "static" in dynamic.stderr and not (tmp_path / "dyn").exists()
