"""Calibration inputs and activation capture.

A calibration `.npz` holds one array per graph input, keyed by input name, samples on axis 0.
Without one, inputs are drawn at random from the input spec (and reports say so). Samples are
split into a calibration part (what passes fit to) and a held-out validation part (what the
PassManager verifies on), so a refit is never judged on the data it was fitted to.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxc.compiler import runtime
from onnxc.errors import OnnxcError

DEFAULT_RANDOM_SAMPLES = 32
DEFAULT_CAPTURE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype


@dataclass
class Calibration:
    """`train` is what passes fit to; `validation` is held out for verification."""

    train: dict[str, np.ndarray]
    validation: dict[str, np.ndarray]
    source: str  # the .npz path, or "random"

    @property
    def is_random(self) -> bool:
        return self.source == "random"


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph's real inputs (initializers excluded), with shapes and numpy dtypes."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype(np.float32)
        specs.append(InputSpec(vi.name, dims, dtype))
    return specs


def load_npz(path: str | Path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Read and validate a calibration file against the model's inputs (keys, ranks, dims, dtypes)."""
    path = Path(path)
    if not path.exists():
        raise OnnxcError(f"{path}: no such calibration file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise OnnxcError(f"{path}: not a readable .npz calibration file ({exc})") from None
    specs = {s.name: s for s in input_specs(model)}
    if set(arrays) != set(specs):
        missing = sorted(set(specs) - set(arrays))
        extra = sorted(set(arrays) - set(specs))
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected {', '.join(extra)}")
        raise OnnxcError(f"{path}: calibration keys must be the model inputs "
                         f"({', '.join(specs)}): {'; '.join(parts)}")
    counts = set()
    for name, arr in arrays.items():
        spec = specs[name]
        if arr.dtype != spec.dtype:
            if arr.dtype.kind == spec.dtype.kind == "f":
                arr = arr.astype(spec.dtype)
                arrays[name] = arr
            else:
                raise OnnxcError(f"{path}: '{name}' has dtype {arr.dtype}, the model expects {spec.dtype}")
        if spec.shape and arr.ndim != len(spec.shape):
            raise OnnxcError(f"{path}: '{name}' has shape {arr.shape}, the model expects rank "
                             f"{len(spec.shape)} ({_fmt(spec.shape)}) with samples on axis 0")
        for i, d in enumerate(spec.shape[1:], start=1):
            if isinstance(d, int) and d > 0 and arr.shape[i] != d:
                raise OnnxcError(f"{path}: '{name}' has shape {arr.shape}, the model expects {_fmt(spec.shape)}")
        if arr.shape[0] == 0:
            raise OnnxcError(f"{path}: '{name}' holds no samples")
        counts.add(arr.shape[0])
    if len(counts) > 1:
        raise OnnxcError(f"{path}: inputs disagree on the number of samples ({sorted(counts)})")
    return arrays


def _fmt(shape: Sequence) -> str:
    return "x".join(str(d) if d not in (None, "") else "?" for d in shape)


def random_inputs(model: onnx.ModelProto, count: int = DEFAULT_RANDOM_SAMPLES, seed: int = 0,
                  input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Inputs drawn from N(0, 1) (floats) or {0, 1} (ints, bools): `count` samples on axis 0.

    Models with a fixed batch dim still get `count` samples; `runtime.run` feeds them in batches
    of that size.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for spec in input_specs(model):
        dims = list(input_shapes[spec.name]) if input_shapes and spec.name in input_shapes else list(spec.shape)
        unknown = [i for i, d in enumerate(dims[1:], 1) if not (isinstance(d, int) and d > 0)]
        if unknown:
            raise OnnxcError(f"input '{spec.name}' has symbolic dims {_fmt(dims)}: pass --input-shape "
                             f"{spec.name}=... or a calibration file")
        if not dims:
            shape: tuple[int, ...] = ()
        else:
            shape = (count, *dims[1:])
        if spec.dtype.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind in "iu":
            out[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            out[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise OnnxcError(f"input '{spec.name}' has dtype {spec.dtype}: give a calibration file")
    return out


def make_calibration(model: onnx.ModelProto, path: str | Path | None = None, *, seed: int = 0,
                     validation_fraction: float = 0.25, random_count: int = DEFAULT_RANDOM_SAMPLES,
                     input_shapes: Mapping[str, Sequence[int]] | None = None) -> Calibration:
    """Load `path` (or draw random inputs) and split off a held-out validation part."""
    if path is not None:
        arrays, source = load_npz(path, model), str(path)
    else:
        arrays, source = random_inputs(model, random_count, seed, input_shapes), "random"
    n = runtime.sample_count(arrays)
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * validation_fraction)) if n > 1 else 0
    n_val = min(max(n_val, 1 if n > 1 else 0), n - 1)
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    train = {k: v[train_idx] for k, v in arrays.items()}
    validation = {k: v[val_idx] for k, v in arrays.items()} if n_val else dict(train)
    return Calibration(train, validation, source)


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph outputs are exactly `names` (intermediate tensors allowed)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    known = {v.name: v for v in list(copy.graph.value_info) + list(copy.graph.output) + list(copy.graph.input)}
    del copy.graph.output[:]
    for name in names:
        vi = onnx.ValueInfoProto()
        if name in known:
            vi.CopyFrom(known[name])
        else:
            vi.name = name
        copy.graph.output.append(vi)
    return copy


def iter_activations(model: onnx.ModelProto, names: Sequence[str], inputs: Mapping[str, np.ndarray],
                     batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
    """Yield the tensors `names` batch by batch (for passes that reduce on the fly)."""
    # One level below ORT_ENABLE_ALL: onnxruntime 1.32's NCHWc layout pass fuses a Conv into the
    # Add after it even when the Conv's output is requested as a graph output (seen with channel
    # counts not a multiple of 8), and the session then fails with "Failed to find node output".
    # Captures never need that pass.
    sess = runtime.session(with_outputs(model, names), optimization=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    names = list(names)
    for batch in runtime.batches(inputs, batch_size):
        yield runtime.run(sess, batch, names, batch_size=batch_size)


def capture(model: onnx.ModelProto, names: Sequence[str], inputs: Mapping[str, np.ndarray], *,
            batch_size: int = 32, max_bytes: int = DEFAULT_CAPTURE_BYTES, seed: int = 0,
            ) -> dict[str, np.ndarray]:
    """Intermediate tensors on all samples, concatenated on axis 0.

    A feature map whose full capture would pass `max_bytes` is sampled instead: for a
    [N, C, H, W...] map (rank >= 4; sequences [N, T, D] are always kept whole) we keep the channel
    vectors at random spatial positions and return shape [S, C] (each row one position of one
    sample). Passes that need neighbourhoods (patches) should use `iter_activations` and reduce
    per batch.
    """
    names = list(dict.fromkeys(names))
    if not names:
        return {}
    n = runtime.sample_count(inputs)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    budget_per_sample: dict[str, int] = {}
    for batch_values in iter_activations(model, names, inputs, batch_size):
        for name, value in batch_values.items():
            if name not in budget_per_sample:
                per_sample = value[0].nbytes if len(value) else 0
                budget_per_sample[name] = per_sample
            if value.ndim >= 4 and budget_per_sample[name] * n > max_bytes:
                parts[name].append(_sample_positions(value, n, max_bytes, rng))
            else:
                parts[name].append(value)
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


def _sample_positions(value: np.ndarray, total_samples: int, max_bytes: int,
                      rng: np.random.Generator) -> np.ndarray:
    b, c = value.shape[:2]
    flat = value.reshape(b, c, -1)
    positions = flat.shape[2]
    keep = max(1, int(max_bytes / (total_samples * c * value.itemsize)))
    keep = min(keep, positions)
    rows = []
    for i in range(b):
        idx = rng.choice(positions, size=keep, replace=False)
        rows.append(flat[i][:, idx].T)
    return np.concatenate(rows, axis=0)
