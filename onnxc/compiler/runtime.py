"""One way to run a ModelProto in onnxruntime, used by verification, capture and benchmarks."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort

from onnxc.compiler import layout
from onnxc.compiler.model import EXTERNAL_DATA_THRESHOLD, save, tensor_bytes
from onnxc.compiler.samples import Samples
from onnxc.errors import OnnxcError

T = TypeVar("T")
_THREADS = 0  # intra-op threads of sessions that do not ask (0: onnxruntime's default, every core)


@contextmanager
def default_threads(threads: int) -> Iterator[None]:
    """Sessions built inside use `threads` intra-op threads unless they ask for a count (the
    executor's tasks run with a fixed count: onnxruntime's numerics depend on it)."""
    global _THREADS
    before, _THREADS = _THREADS, threads
    try:
        yield
    finally:
        _THREADS = before


def single_threaded_blas():
    """One BLAS thread for the compiler's own numpy work (a context manager).

    The matrices of a fit are small to medium: multi-threaded OpenBLAS mostly spins, and on a
    shared machine, where its threads wait for busy cores, far slower than one thread. One
    thread also makes the results independent of the machine's core count (OpenBLAS splits
    reductions by thread). The cores go to onnxruntime, whose captures overlap the fits
    (`prefetch`), and to `--jobs`."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # it is a dependency; without it BLAS keeps its default threads
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def prefetch(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """Yield `items`, computing the next `depth` of them on a background thread meanwhile.

    For captures: onnxruntime releases the GIL, so the next batch runs through the model while
    the caller reduces this one with numpy. The iterator is driven from one thread only, in
    order, so what it computes and yields is exactly what a plain loop would; an exception is
    raised where the item would have been."""
    import queue
    import threading

    done = object()
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((True, item))
            q.put((True, done))
        except BaseException as exc:  # handed to the consumer
            q.put((False, exc))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue, then let it finish
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)


def session(model: onnx.ModelProto | str | os.PathLike[str], *, threads: int | None = None,
            optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            spinning: bool = False) -> ort.InferenceSession:
    """A CPU InferenceSession (`threads`: intra-op threads, 0 for every core, None for the
    process default); models past 2 GB go through a temporary file.

    `spinning`: onnxruntime's pool threads busy-wait between parallel sections by default. The
    compiler's sessions run beside its own numpy work (captures are prefetched while the fits
    run), where spinning threads only take the core the fits need; latency benchmarks turn it back on, as
    deployments run."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = optimization
    opts.log_severity_level = 4  # fatal only: a failing run raises, and we report it in one line
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    threads = _THREADS if threads is None else threads
    if threads:
        opts.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    try:
        if isinstance(model, onnx.ModelProto):
            if tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD:
                with tempfile.TemporaryDirectory() as tmp:
                    path = save(model, os.path.join(tmp, "model.onnx"))
                    return ort.InferenceSession(str(path), opts, providers=providers)
            return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        return ort.InferenceSession(str(model), opts, providers=providers)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxcError(f"onnxruntime cannot load the model: {msg}") from None


@functools.cache
def channel_block() -> int:
    """The channel block of onnxruntime's blocked (NCHWc) convolutions on this machine: 8 with
    AVX2, 16 with AVX-512, 1 where the build has no NCHWc kernels.

    Asked of onnxruntime itself: its NCHWc rewrite pads a Conv's output channels up to a whole
    block, so the filter of a 3 -> 1 channel Conv in the optimized graph has one block of rows.
    A Conv runs blocked only when its input channels are a multiple of the block (depthwise:
    its channels); other counts fall back to slower kernels (benchmarks/channel_block.py).
    """
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.zeros((1, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])], [weight])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    probe.ir_version = 8
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(opts.optimized_model_filepath)
    blocked = {n.input[1] for n in optimized.graph.node if n.op_type == "Conv" and n.domain == "com.microsoft.nchwc"}
    rows = [int(t.dims[0]) for t in optimized.graph.initializer if t.name in blocked and t.dims]
    return max(rows, default=1)


FALLBACK_CHANNEL_MULTIPLE = 8  # a build without blocked kernels: vector GEMMs still like multiples of 8


@functools.lru_cache(maxsize=1)
def integer_dot_product() -> bool:
    """Whether this CPU has integer dot-product instructions (x86 VNNI, Arm SDOT), which
    onnxruntime's int8 kernels use: without them x86 kernels sum pairs of products in saturating
    16-bit arithmetic, and int8 gains less time."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(text.split())
    return bool(flags & {"avx512_vnni", "avx_vnni", "avx_vnni_int8", "asimddp"})


def channel_multiple() -> int:
    """The channel/rank multiple onnxruntime runs fastest on this machine: its channel block, else
    8. What the prune pass rounds kept channels to by default and the allocator's levels use."""
    block = channel_block()
    return block if block > 1 else FALLBACK_CHANNEL_MULTIPLE


def batches(inputs: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Split samples on axis 0 into batches (all inputs share the sample count).

    Variable-shape `Samples` are batched group by group: one batch never mixes shapes.
    """
    if isinstance(inputs, Samples):
        yield from inputs.batches(batch_size)
        return
    n = sample_count(inputs)
    for start in range(0, n, batch_size):
        yield {k: v[start:start + batch_size] for k, v in inputs.items()}


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The smallest fixed batch dim among the model's real inputs (None when every one is free);
    the batch axis is each input's own (`layout`), the leading one unless a named batch says."""
    axes = layout.model_input_axes(model)
    dims = []
    for name, shape in layout.model_inputs(model):
        axis = axes.get(name)
        if shape and axis is not None and axis < len(shape) and isinstance(shape[axis], int):
            dims.append(shape[axis])
    return min(dims) if dims else None


def sample_count(inputs: Mapping[str, np.ndarray]) -> int:
    if isinstance(inputs, Samples):
        return inputs.count
    counts = {len(v) for v in inputs.values()}
    if len(counts) != 1:
        raise OnnxcError(f"inputs disagree on the number of samples: {sorted(counts)}")
    return counts.pop()


def run(model: onnx.ModelProto | ort.InferenceSession, inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None, *, batch_size: int = 64,
        progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Run all samples through the model in batches; returns the concatenated outputs.

    Models whose batch dim is fixed (e.g. 1) are run one sample at a time. Variable-shape
    `Samples` give `Samples` of outputs, one group per input group. `progress(done, total)` is
    called with sample counts after every batch.
    """
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    if isinstance(inputs, Samples) and not inputs.is_uniform:
        total, before, parts = sample_count(inputs), 0, []
        for g in inputs.groups:
            step = (lambda d, _t, b=before: progress(b + d, total)) if progress else None
            parts.append(run(sess, g, outputs, batch_size=batch_size, progress=step))
            before += sample_count(g)
        return Samples(parts)
    names = list(outputs) if outputs is not None else [o.name for o in sess.get_outputs()]
    in_axes, out_axes = layout.session_axes(sess)
    fixed = [i.shape[in_axes[i.name]] for i in sess.get_inputs()
             if in_axes.get(i.name) is not None and isinstance(i.shape[in_axes[i.name]], int)]
    if fixed:
        batch_size = min(batch_size, min(fixed))
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    feed_names = {i.name for i in sess.get_inputs()}
    total, done = sample_count(inputs), 0
    for batch in batches(inputs, batch_size):
        for start, stop, feed in layout.feeds({k: v for k, v in batch.items() if k in feed_names}, in_axes):
            count = stop - start
            short = batch_size - count if fixed and feed else 0
            if short > 0:  # a fixed batch dim: pad the run by repeating samples, then trim
                feed = {k: pad_batch(v, short, in_axes.get(k, 0)) for k, v in feed.items()}
            for name, value in zip(names, sess.run(names, feed)):
                value = layout.from_output(value, out_axes.get(name, 0), count + max(short, 0))
                collected[name].append(value[: len(value) - short] if short > 0 and value.ndim else value)
        if progress is not None:
            done += sample_count(batch)
            progress(done, total)
    return {n: np.concatenate(v, axis=0) if v and v[0].ndim else (v[0] if v else np.array([]))
            for n, v in collected.items()}


def pad_batch(value: np.ndarray, short: int, axis: int | None) -> np.ndarray:
    """`value` with its first sample repeated `short` more times on its batch `axis` (a fixed batch)."""
    if axis is None:
        return value
    first = np.take(value, [0], axis=axis)
    return np.concatenate([value] + [first] * short, axis=axis)
