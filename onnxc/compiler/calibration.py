"""Calibration inputs and activation capture.

Calibration data is read by `calibration_data.py` (`.npz`, `.npy`, folders of samples or images,
arrays or feed dicts in the library) into `Samples`, whose dynamic dims may differ between
samples. Without data, inputs are drawn at random from the input spec (and reports say so). Samples are
split into a calibration part (what passes fit to) and a held-out validation part (what the
PassManager verifies on), so a refit is never judged on the data it was fitted to.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from onnxc.compiler import calibration_data, layout, memo, runtime, selectors
from onnxc.compiler.calibration_data import InputSpec, Source, fmt_shape, input_specs, load_npz  # noqa: F401
from onnxc.compiler.graph import GraphView, node_inputs_with_subgraphs, upstream
from onnxc.compiler.model import fingerprint
from onnxc.compiler.samples import Samples
from onnxc.compiler.samples import fingerprint as data_fingerprint
from onnxc.errors import OnnxcError

DEFAULT_RANDOM_SAMPLES = 32
DEFAULT_CAPTURE_BYTES = 256 * 2**20


@dataclass
class Calibration:
    """`train` is what passes fit to; `validation` is held out for verification."""

    train: Samples
    validation: Samples
    source: str  # the file or folder, "random", or what the library was given
    axes: dict[str, int | None] = field(default_factory=dict)  # each input's batch axis in the model

    def __post_init__(self) -> None:
        # A library caller may hand feed dicts; every use (shapes, batches, subsets) needs Samples.
        # The same data given as both splits stays one object: that is how "no held-out part" reads.
        same = self.validation is self.train
        self.train = Samples.of(self.train)
        self.validation = self.train if same else Samples.of(self.validation)

    @property
    def is_random(self) -> bool:
        return self.source == "random"

    def shapes(self) -> list[dict[str, list[int]]]:
        """One sample's input shapes per shape group in the model's layout, the batch dim as 1
        (what verification and cost ran at)."""
        return [{k: layout.sample_shape(v.shape, self.axes.get(k, 0)) for k, v in g.items()}
                for g in self.train.groups]

    def cost_shapes(self) -> dict[str, list[int]] | None:
        """Costs are per sample at the first calibration sample's shapes (batch 1)."""
        shapes = self.shapes()
        return shapes[0] if shapes else None


def random_inputs(model: onnx.ModelProto, count: int = DEFAULT_RANDOM_SAMPLES, seed: int = 0,
                  input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Inputs drawn from N(0, 1) (floats) or {0, 1} (ints, bools): `count` samples on axis 0.

    Models with a fixed batch dim still get `count` samples; `runtime.run` feeds them in batches
    of that size. An input without a batch axis (a state, a table) is drawn once and shared by
    every sample; an integer scalar that selects an `If` branch takes a value the model compares
    it with (`selectors`).
    """
    rng = np.random.default_rng(seed)
    specs = input_specs(model)
    chosen = selectors.selector_values(model, [s.name for s in specs])
    out = {}
    for spec in specs:
        dims = list(input_shapes[spec.name]) if input_shapes and spec.name in input_shapes else list(spec.shape)
        body = layout.internal_dims(dims, spec.batch_axis) if len(dims) == len(spec.shape) else dims[1:]
        if any(not (isinstance(d, int) and d > 0) for d in body):
            raise OnnxcError(f"input '{spec.name}' has symbolic dims {fmt_shape(dims)}: pass --input-shape "
                             f"{spec.name}=... or a calibration file")
        if spec.name in chosen:
            value = chosen[spec.name].reshape(body)
        elif spec.batch_axis is None:
            value = draw(rng, spec.name, spec.dtype, body)
        else:
            out[spec.name] = draw(rng, spec.name, spec.dtype, (count, *body))
            continue
        out[spec.name] = np.broadcast_to(value[None], (count, *value.shape)).copy()
    return out


def draw(rng: np.random.Generator, name: str, dtype: np.dtype, shape: Sequence[int]) -> np.ndarray:
    """One random input: N(0, 1) floats, or 0/1 for ints and bools (safe indices and masks)."""
    if dtype.kind == "f":
        return rng.standard_normal(tuple(shape)).astype(dtype)
    if dtype.kind in "iub":
        return rng.integers(0, 2, size=tuple(shape)).astype(dtype)
    raise OnnxcError(f"input '{name}' has dtype {dtype}: give a calibration file")


def make_calibration(model: onnx.ModelProto, source: Source | None = None, *, seed: int = 0,
                     validation_fraction: float = 0.25, random_count: int = DEFAULT_RANDOM_SAMPLES,
                     input_shapes: Mapping[str, Sequence[int]] | None = None,
                     preprocess: str | None = None) -> Calibration:
    """Load `source` (a file, a folder, arrays or feed dicts; or draw random inputs when None) and
    split off a held-out validation part."""
    if isinstance(source, Calibration):
        return source
    calibration_data.check_preprocess(source, preprocess)
    if source is not None:
        samples, label = calibration_data.load(source, model, preprocess)
    else:
        from onnxc.compiler.shapes import resolve_input_shapes  # shapes.py captures through this module

        shapes, _ = resolve_input_shapes(model, input_shapes)  # symbolic dims: the stated defaults
        samples, label = Samples([random_inputs(model, random_count, seed, shapes)]), "random"
    n = samples.count
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * validation_fraction)) if n > 1 else 0
    n_val = min(max(n_val, 1 if n > 1 else 0), n - 1)
    train = samples.subset(order[n_val:])
    validation = samples.subset(order[:n_val]) if n_val else train
    return Calibration(train, validation, label, layout.model_input_axes(model))


def working_shapes(model: onnx.ModelProto, cal: Calibration,
                   given: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[int | None]]:
    """Input shapes the compiler works at inside (cost, shape inference), never written out.

    `--input-shape` wins; else, when all calibration samples share their shapes, the dims other
    than the batch come from them. The batch dim stays as declared (`None`): it carries the samples.
    """
    if given:
        return layout.free_batch(model, given)
    if not cal.train.is_uniform:
        return {}
    shapes = {}
    for spec in input_specs(model):
        if not spec.shape or all(isinstance(d, int) for d in spec.sample_dims()):
            continue
        body = list(cal.train[spec.name].shape[1:])
        axis = spec.batch_axis
        shapes[spec.name] = body if axis is None else [*body[:axis], None, *body[axis:]]
    return shapes


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph outputs are exactly `names` (intermediate tensors allowed),
    without the nodes and initializers those outputs do not need."""
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
    nodes = upstream(copy.graph, names)
    if len(nodes) < len(copy.graph.node):
        used = {i for n in nodes for i in node_inputs_with_subgraphs(n)}
        dropped = {t.name for t in copy.graph.initializer} - used - set(names)
        inits = [t for t in copy.graph.initializer if t.name not in dropped]
        inputs = [v for v in copy.graph.input if v.name not in dropped]  # IR < 4 lists initializers too
        del copy.graph.node[:], copy.graph.initializer[:], copy.graph.input[:]
        copy.graph.node.extend(nodes)
        copy.graph.initializer.extend(inits)
        copy.graph.input.extend(inputs)
    return copy


class CaptureSession:
    """A session over a model whose outputs are intermediate tensors, at onnxruntime's full
    optimization level (its NCHWc kernels run convolution-heavy captures faster than
    ORT_ENABLE_EXTENDED) unless that fails: onnxruntime's NCHWc layout pass was once seen to
    fuse a Conv into the Add after it although the Conv's output was requested (channel counts
    not a multiple of 8), and the session then failed to find that output. Then it falls back
    to ORT_ENABLE_EXTENDED, which captures never need more than, for good."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.sess = self._build(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        self.full = self.sess is not None
        if self.sess is None:
            self.sess = self._build(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, strict=True)

    def _build(self, level, strict: bool = False) -> ort.InferenceSession | None:
        try:
            return runtime.session(self.model, optimization=level)
        except OnnxcError:
            if strict:
                raise
            return None

    def run(self, names: Sequence[str], feed: Mapping[str, np.ndarray], **kwargs) -> dict[str, np.ndarray]:
        """`runtime.run` of `names` over the samples of `feed` (keyword arguments passed on)."""
        return self._call(lambda sess: runtime.run(sess, feed, names, **kwargs))

    def run_once(self, names: Sequence[str], feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One `InferenceSession.run` on `feed` as it is (no batching: tensors need no batch axis)."""
        return self._call(lambda sess: dict(zip(names, sess.run(list(names), dict(feed)))))

    def _call(self, fn):
        try:
            return fn(self.sess)
        except Exception:
            if not self.full:
                raise
            self.full = False
            self.sess = self._build(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, strict=True)
            return fn(self.sess)


CAPTURE_BYTES = 256 * 2**20  # the captured tensors of one batch, with the prefetched one and a working copy


def capture_batch(view: GraphView, names: Sequence[str], budget: int = CAPTURE_BYTES, most: int = 64) -> int:
    """Samples per batch so that three batches of the tensors `names` (the one being read, the
    one prefetched, the caller's working copy) stay within `budget`, from their static shapes
    (a fixed batch dim is handled by `runtime.run`, which feeds the batch piece by piece)."""
    per_sample = 0
    for n in names:
        s = view.static_shape(n)
        per_sample += 4 * int(np.prod(s[1:], dtype=np.int64)) if s else 0
    return int(max(1, min(most, budget // max(per_sample * 3, 1))))


MEMO_BYTES = 512 * 2**20  # a capture larger than this is not kept for the next probe (`memo`)


def iter_activations(model: onnx.ModelProto, names: Sequence[str], inputs: Mapping[str, np.ndarray],
                     batch_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield the tensors `names` batch by batch (for passes that reduce on the fly); the next
    batch runs through onnxruntime while the caller works on this one (`runtime.prefetch`).
    The default batch size keeps a batch's tensors within CAPTURE_BYTES (`capture_batch`).
    The arrays are read-only: inside the sensitivity sweep a capture of the same tensors hands
    them out again (`memo`)."""
    if batch_size is None:
        batch_size = capture_batch(GraphView(model.graph), names)
    names = list(names)
    key = (fingerprint(model), tuple(names), data_fingerprint(inputs), batch_size) if memo.active() else None
    kept = memo.get("capture", key) if key is not None else None
    if kept is not None:
        yield from kept
        return
    memo.drop("capture")
    sess = CaptureSession(with_outputs(model, names))
    kept = [] if key is not None else None
    size = 0
    for batch in runtime.prefetch(sess.run(names, batch, batch_size=batch_size)
                                  for batch in runtime.batches(inputs, batch_size)):
        for value in batch.values():
            value.flags.writeable = False
        if kept is not None:
            size += sum(v.nbytes for v in batch.values())
            if size <= MEMO_BYTES:
                kept.append(batch)
            else:
                kept = None
        yield batch
    if kept is not None:
        memo.put("capture", key, kept)


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
    variable = isinstance(inputs, Samples) and not inputs.is_uniform  # maps of several sizes: sample them
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    budget_per_sample: dict[str, int] = {}
    for batch_values in iter_activations(model, names, inputs, batch_size):
        for name, value in batch_values.items():
            if name not in budget_per_sample:
                per_sample = value[0].nbytes if len(value) else 0
                budget_per_sample[name] = per_sample
            if value.ndim >= 4 and budget_per_sample[name] * n > max_bytes or variable and value.ndim >= 3:
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
