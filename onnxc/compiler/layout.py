"""Where each input and output of a model holds its samples: the batch axis, or none.

Inside the compiler every input and output array holds its samples on axis 0 (what `Samples`
splits, batches and subsets). Models do not all agree: a streaming model takes its audio as
`input [batch, sequence]` and its recurrent state as `state [2, batch, 128]`, sequence-first
recognizers put the batch on axis 1, and a scalar such as a sample rate has no batch axis at all.
This module finds each tensor's batch axis from the declared dims and moves arrays between the
model's layout (what a session is fed and returns, and what users save) and ours.

Which symbolic dim is the batch: a dim named like one (`batch`, `batch_size`, `N`, `B`, ...), else
the leading dim of the first input. A dim name shared by several tensors is one dim: the batch is
at its position in each of them. An input without it has no batch axis (every sample of a run
reads the same value), unless the batch is only known by position (unnamed), where the leading
axis is the batch, as it always was. Outputs without the batch name keep samples on axis 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx

Dim = int | str | None
Axes = dict[str, int | None]

_BATCH_NAME = re.compile(r"batch|^(n|b|bs|num_samples)$", re.I)


def _dims(vi: onnx.ValueInfoProto) -> list[Dim] | None:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None) for d in tt.shape.dim]


def batch_name(inputs: Sequence[tuple[str, Sequence[Dim] | None]]) -> str | None:
    """The name of the batch dim among the inputs' dims (None when it is unnamed or fixed)."""
    for _, dims in inputs:
        for d in dims or []:
            if isinstance(d, str) and _BATCH_NAME.search(d):
                return d
    first = next((dims for _, dims in inputs if dims), None)
    return first[0] if first and isinstance(first[0], str) else None


def input_axes(inputs: Sequence[tuple[str, Sequence[Dim] | None]]) -> Axes:
    """Batch axis of each input (None: no batch axis; scalars and inputs without the batch dim)."""
    name = batch_name(inputs)
    axes: Axes = {}
    for key, dims in inputs:
        if dims is None:
            axes[key] = 0
        elif not dims:
            axes[key] = None
        elif name is not None and name in dims:
            axes[key] = list(dims).index(name)
        elif name is not None and isinstance(dims[0], int):
            axes[key] = None  # a fixed leading dim beside a named batch: a state or a table
        else:
            axes[key] = 0
    return axes


def output_axes(outputs: Sequence[tuple[str, Sequence[Dim] | None]], name: str | None) -> Axes:
    return {key: list(dims).index(name) if dims and name is not None and name in dims else 0
            for key, dims in outputs}


def model_inputs(model: onnx.ModelProto) -> list[tuple[str, list[Dim] | None]]:
    inits = {t.name for t in model.graph.initializer}
    return [(vi.name, _dims(vi)) for vi in model.graph.input if vi.name not in inits]


def model_input_axes(model: onnx.ModelProto) -> Axes:
    return input_axes(model_inputs(model))


def session_axes(sess) -> tuple[Axes, Axes]:
    """Input and output batch axes of an onnxruntime session (its NodeArgs name symbolic dims)."""
    ins = [(i.name, [d if isinstance(d, (int, str)) else None for d in i.shape]) for i in sess.get_inputs()]
    outs = [(o.name, [d if isinstance(d, (int, str)) else None for d in o.shape]) for o in sess.get_outputs()]
    return input_axes(ins), output_axes(outs, batch_name(ins))


def free_batch(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int | None]]) -> dict[str, list[int | None]]:
    """`shapes` with each input's batch dim left as declared (None): shapes fixed inside the
    compiler must not pin the batch, which is what carries the samples."""
    axes = model_input_axes(model)
    out = {}
    for key, dims in shapes.items():
        dims = list(dims)
        axis = axes.get(key)
        if axis is not None and axis < len(dims):
            dims[axis] = None
        out[key] = dims
    return out


# ---- arrays ------------------------------------------------------------------------------
def sample_shape(dims: Sequence[int], axis: int | None) -> list[int]:
    """One sample's dims in the model's layout (the batch dim as 1) from the internal array's."""
    rest = list(dims[1:])
    return rest if axis is None else [*rest[:axis], 1, *rest[axis:]]


def internal_dims(dims: Sequence[Dim], axis: int | None) -> list[Dim]:
    """A model-layout shape without its batch axis (what follows the sample axis inside)."""
    return list(dims) if axis is None else [d for i, d in enumerate(dims) if i != axis]


def to_internal(value: np.ndarray, axis: int | None, count: int | None = None) -> np.ndarray:
    """A model-layout array to samples on axis 0; an input without a batch axis is repeated for
    `count` samples (already one per sample when it has one more dim than the model's)."""
    if axis is None:
        return np.broadcast_to(value[None], (count or 1, *value.shape)).copy()
    return np.moveaxis(value, axis, 0) if axis else value


def feeds(batch: Mapping[str, np.ndarray], axes: Axes) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """(start, stop, feed) in the model's layout for a batch of internal arrays. Inputs without a
    batch axis are fed once per run of samples that share their value."""
    n = next((len(v) for v in batch.values()), 0)
    shared = [k for k in batch if axes.get(k, 0) is None]
    start = 0
    while start < n:
        stop = start + 1
        while stop < n and all(np.array_equal(batch[k][stop], batch[k][start]) for k in shared):
            stop += 1
        feed = {}
        for k, v in batch.items():
            axis = axes.get(k, 0)
            if axis is None:
                feed[k] = np.asarray(v[start])
            else:
                feed[k] = np.moveaxis(v[start:stop], 0, axis) if axis else v[start:stop]
        yield start, stop, feed
        start = stop


def from_output(value: np.ndarray, axis: int, count: int) -> np.ndarray:
    """An output of a run of `count` samples to samples on axis 0."""
    if value.ndim == 0 or axis >= value.ndim:
        return value
    if axis and value.shape[axis] == count:
        return np.moveaxis(value, axis, 0)
    return value
