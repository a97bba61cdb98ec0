"""The MLPerf Tiny models in int8 for the C backend, for tests and benchmarks (no torch needed).

Each model of `onnxc.backends.c.reference_models.MLPERF_TINY` (random weights) is quantized as
`onnxc export --backend c --int8` does without a calibration file (ranges from random inputs) and
lowered; it is checked on standard-normal inputs against onnxruntime running the same QDQ model.

Import from a test module in ``tests/`` as ``from mlperf_tiny import int8_build, ...``.
"""

from __future__ import annotations

import platform

import numpy as np
import onnx
import onnxruntime as ort

from onnxc.backends import ExportOptions
from onnxc.backends.c import GeneratedModel, compile_model, quantize_for_c
from onnxc.backends.c.reference_models import MLPERF_TINY
from onnxc.compiler.calibration import make_calibration
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.cost import model_cost


def int8_build(name: str) -> tuple[onnx.ModelProto, onnx.ModelProto, GeneratedModel]:
    """(canonical float model, its QDQ model, the int8 C build named `name`)."""
    model = canonicalize(MLPERF_TINY[name][0](seed=0))
    cal = make_calibration(model, None, seed=0)
    qdq, _ = quantize_for_c(model, ExportOptions(int8="static", calibration=cal))
    return model, qdq, compile_model(qdq, name)


def inputs(name: str, count: int, seed: int = 1) -> np.ndarray:
    """`count` standard-normal inputs [count, *input shape], each a whole graph input (held out:
    calibration draws seed 0)."""
    return np.random.default_rng(seed).standard_normal((count, *MLPERF_TINY[name][1])).astype(np.float32)


def macs(model: onnx.ModelProto) -> int:
    return model_cost(model).macs


def qdq_reference(qdq: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnxruntime running the QDQ model as its int8 model (`int8_session`), one sample at a time;
    [count, outputs]."""
    sess = int8_session(qdq)
    return np.concatenate([sess.run(None, {"input": xi})[0].reshape(1, -1) for xi in x])


# onnxruntime's x86-64 integer kernels requantize in float32 (MLAS MlasRequantizeOutput), as ours
# do; its arm64 build may use a fixed-point form of its own, which ours follows to one step.
MLAS_FLOAT_REQUANT = platform.machine().lower() in ("x86_64", "amd64")


def int8_session(qdq: onnx.ModelProto) -> ort.InferenceSession:
    """onnxruntime's int8 model: all graph optimizations, so that the QDQ groups run as its integer
    kernels (QLinearConv, QGemm, QLinearGlobalAveragePool, ...), with exact int32 sums on every x86
    CPU (`session.x64quantprecision`: without VNNI the default u8s8 kernels saturate int16 pair
    sums; this makes them u8u8, the same integers as the QDQ semantics and as ours)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.x64quantprecision", "1")
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(qdq.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def agreement(gen: GeneratedModel, ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """How far our outputs [count, n] are from onnxruntime's, in output quantization steps."""
    steps = np.abs(ours.reshape(ref.shape) - ref) / gen.prog.entry_int8.output_scale
    top1 = float(np.mean(ours.reshape(ref.shape).argmax(1) == ref.argmax(1)))
    return {"max_steps": float(steps.max()), "within_one": float(np.mean(steps <= 1.001)),
            "exact": float(np.mean(ours.reshape(ref.shape) == ref)), "top1": top1}
