"""Access to the shipped digits samples for tests and benchmarks (no torch needed).

Import from a test module in ``tests/`` as ``from sample_data import SAMPLES, accuracy, ...``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
SAMPLE_MODELS = ["mlp", "vgg", "resnet", "mobilenet"]
CALIBRATION = SAMPLES / "digits_calib.npz"
TEST_INPUTS = SAMPLES / "digits_test.npz"
TEST_LABELS = SAMPLES / "digits_test_labels.npy"


def sample_path(name: str) -> Path:
    """Path of ``samples/<name>.onnx``."""
    return SAMPLES / f"{name}.onnx"


def load_test_set() -> tuple[np.ndarray, np.ndarray]:
    """The held-out split: inputs float32 [N,1,16,16] and int64 labels [N]."""
    with np.load(TEST_INPUTS) as data:
        x = data["input"]
    return x, np.load(TEST_LABELS)


def load_calibration() -> dict[str, np.ndarray]:
    """The calibration set, keyed by graph input name (``{"input": float32 [256,1,16,16]}``)."""
    with np.load(CALIBRATION) as data:
        return {key: data[key] for key in data.files}


def _session(model: str | Path | onnx.ModelProto) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def predict(model: str | Path | onnx.ModelProto, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Logits of ``model`` (path or ModelProto, one input, first output) on ``x``, run in batches."""
    session = _session(model)
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    chunks = [session.run([output_name], {input_name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(chunks, axis=0)


def accuracy(model: str | Path | onnx.ModelProto, batch_size: int = 128) -> float:
    """Top-1 accuracy in percent of ``model`` on the held-out digits test split."""
    x, labels = load_test_set()
    logits = predict(model, x, batch_size)
    return 100.0 * float(np.mean(logits.argmax(axis=1) == labels))
