"""The MLPerf Tiny models in int8 for the C backend, for tests and benchmarks (no torch needed).

Each model of `onnxc.backends.c.reference_models.MLPERF_TINY` (random weights) is quantized as
`onnxc export --backend c --int8` does without a calibration file (ranges from random inputs) and
lowered; it is checked on standard-normal inputs against onnxruntime running the same QDQ model.

Import from a test module in ``tests/`` as ``from mlperf_tiny import int8_build, ...``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from onnxc.backends import ExportOptions
from onnxc.backends.c import GeneratedModel, compile_model, quantize_for_c
from onnxc.backends.c.reference_models import MLPERF_TINY
from onnxc.compiler import runtime
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
    """onnxruntime running the QDQ model as written (DQ, float op, Q: basic optimizations only, as
    tests/test_c_int8.py explains), one sample at a time; [count, outputs]."""
    sess = runtime.session(qdq, optimization=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    return np.concatenate([runtime.run(sess, {"input": xi})["logits"].reshape(1, -1) for xi in x])


def agreement(gen: GeneratedModel, ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """How far our outputs [count, n] are from onnxruntime's, in output quantization steps."""
    steps = np.abs(ours.reshape(ref.shape) - ref) / gen.prog.entry_int8.output_scale
    top1 = float(np.mean(ours.reshape(ref.shape).argmax(1) == ref.argmax(1)))
    return {"max_steps": float(steps.max()), "within_one": float(np.mean(steps <= 1.001)), "top1": top1}
