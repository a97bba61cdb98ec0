"""Backends lower a (compressed) canonical model to something a target runs.

A backend is a function `(model, out_path, options) -> dict` registered under a name; the dict
goes into the report. Modules are imported lazily so a missing optional tool only matters to
the backend that needs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from onnxc.compiler.calibration import Calibration
from onnxc.errors import UsageError

BACKEND_MODULES = {"onnxruntime": "onnxc.backends.ort", "c": "onnxc.backends.c"}
Progress = Callable[[str, int, int], None]


def no_progress(label: str, done: int, total: int) -> None:
    """The default progress callback: nothing to show."""


@dataclass
class ExportOptions:
    int8: str | None = None  # None, "static" or "dynamic"
    calibration: Calibration | None = None
    name: str = "net"
    input_shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)
    seed: int = 0
    max_error: float | None = None  # the budget the written model is held to (None: none)
    metric: Callable[[list, list], float] | None = None  # judges that budget instead of the per-channel error
    # Outputs the budget is measured from, on `calibration.validation` (optimize: the original
    # model's, since earlier stages spent part of it); None: the model being exported.
    reference: Mapping[str, object] | None = field(default=None, repr=False)
    int8_prepare: bool = True  # int8: equalization, range choice, bias correction (False: onnxruntime alone)
    level: str = "portable"  # onnxruntime: "portable" (basic) or "machine" (all, this CPU)
    progress: Progress = field(default=no_progress, repr=False)  # (phase, done, total), as PassContext's


BackendFn = Callable[[onnx.ModelProto, Path, ExportOptions], dict]
BACKENDS: dict[str, BackendFn] = {}


def register_backend(name: str) -> Callable[[BackendFn], BackendFn]:
    def wrap(fn: BackendFn) -> BackendFn:
        BACKENDS[name] = fn
        return fn

    return wrap


def export(backend: str, model: onnx.ModelProto, out: Path, options: ExportOptions) -> dict:
    if backend not in BACKEND_MODULES:
        raise UsageError(f"unknown backend '{backend}' (available: {', '.join(BACKEND_MODULES)})")
    importlib.import_module(BACKEND_MODULES[backend])
    if backend not in BACKENDS:
        raise UsageError(f"backend '{backend}' is not available in this build")
    return BACKENDS[backend](model, Path(out), options)
