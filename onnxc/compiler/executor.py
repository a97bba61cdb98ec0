"""One executor for per-layer and per-candidate work: in-process, local processes, or Ray.

A caller shares large inputs once with `put` (a ModelProto, numpy arrays, dicts of them) and
maps a module-level function over small items: `fn(item, **shared_values)`. Results come back in
item order whatever the executor, and every task runs under the same conditions (one onnxruntime
and one BLAS thread, see TASK_THREADS; shared values read-only; no global RNG: a task derives its
seed from its item), so a compile gives byte-identical output with 1 or N workers, in-process or
on a Ray cluster (of one machine type: the kernels a CPU runs are part of the numerics).

How shared values travel:
- inline: by reference (arrays as read-only views, C-contiguous as workers get them: numpy and
  BLAS choose kernels by layout; a ModelProto is parsed once into a copy).
- local: written once to a RAM-backed temp folder (/dev/shm when present): arrays as raw files
  that workers memory-map, a ModelProto as its serialized bytes; each worker loads a value once
  and keeps it while the tasks it runs keep asking for it.
- ray: `ray.put` once; each Ray worker fetches a value once (arrays zero-copy from the object
  store) and keeps it the same way.

Workers import task functions by name: local workers are spawned (a script calling this needs the
`if __name__ == "__main__":` guard), and the nodes of a remote Ray cluster need onnxc installed.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import os
import pickle
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxc.errors import OnnxcError, UsageError

Progress = Callable[[str, int, int], None]
KINDS = ("inline", "local", "ray")


class ExecutorError(OnnxcError):
    """The executor itself failed (no Ray, cluster unreachable, a worker died): the compile stops,
    where a task's own error only fails the pass that ran it."""


@dataclass(frozen=True)
class Ref:
    """A shared value: `key` names it in worker caches, `handle` is what the executor keeps."""

    key: str
    handle: Any


class Executor:
    """Base: `put` shares a value once; `map` runs `fn(item, **shared)` per item, in item order."""

    kind = "inline"
    workers = 1

    def put(self, value: object) -> Ref:
        raise NotImplementedError

    def map(self, fn: Callable, items: Sequence, *, shared: Mapping[str, Ref] | None = None,
            label: str = "", progress: Progress | None = None) -> list:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers and shared values (the executor cannot be used afterwards)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(workers={self.workers})"


# ---- what every task runs ------------------------------------------------------------------------
def _check_fn(fn: Callable) -> None:
    """Workers import `fn` by name: a lambda or nested function would only work in-process, so it is
    refused everywhere (a bug found with the inline executor, not first on a cluster)."""
    qualname = getattr(fn, "__qualname__", "")
    if not getattr(fn, "__module__", None) or "<" in qualname:
        raise TypeError(f"executor tasks must be module-level functions, got {qualname or fn!r}")


def _run_task(fn: Callable, item: Any, kwargs: dict) -> tuple[bool, Any]:
    """(True, result) or (False, one-line reason): exceptions never cross process boundaries raw."""
    try:
        return True, fn(item, **kwargs)
    except Exception as exc:  # reported to the caller as one OnnxcError line
        text = str(exc).strip().splitlines()
        return False, f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# Every task runs with TASK_THREADS onnxruntime intra-op threads and BLAS threads, whichever
# executor runs it and however many workers it has. onnxruntime's CPU kernels choose their
# algorithm by the size of the session's thread pool (ReduceSum takes its KRK fast path only when
# the batch is at least the thread count, its RK one only past 256 x the thread count), so a
# count that followed the worker count would change results once the thread count exceeds the
# batch (`benchmarks/executor.py --threads` shows by how much, per model). BLAS is held to the
# same count for the same reason. Parallelism is therefore across tasks (`--jobs N` runs N at
# once), the only kind that scales with cores anyway: a task is a small model run or one layer's
# fit. The compiler's own work outside tasks (capture, verification) keeps every core.
TASK_THREADS = 1


@contextmanager
def _task_threads() -> Iterator[None]:
    """TASK_THREADS for BLAS and for the onnxruntime sessions tasks build (in-process: around the
    map, not per task, as threadpoolctl rescans the loaded libraries on every call, ~5 ms)."""
    from threadpoolctl import threadpool_limits

    from onnxc.compiler import runtime

    with threadpool_limits(TASK_THREADS, user_api="blas"), runtime.default_threads(TASK_THREADS):
        yield


_WORKER_THREADS = None


def _init_worker() -> None:
    """In a worker process, for good: TASK_THREADS (libraries loaded later read the variables)."""
    global _WORKER_THREADS
    if _WORKER_THREADS is None:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(TASK_THREADS)
        _WORKER_THREADS = _task_threads()
        _WORKER_THREADS.__enter__()


def _task_error(label: str, fn: Callable, index: int, item: Any, reason: str) -> OnnxcError:
    what = label or fn.__name__
    shown = " ".join(repr(item).split())
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return OnnxcError(f"{what}: task {index} ({shown}) failed: {reason}")


def _report(progress: Progress | None, label: str, done: int, total: int) -> None:
    if progress is not None:
        progress(label or "tasks", done, total)


# ---- values: frozen in-process, packed to files for processes -----------------------------------
class _Model:
    """A serialized ModelProto inside a shared value (parsed where it is used)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


def _freeze(value: Any) -> Any:
    """In-process sharing: arrays become read-only views, models serialized copies (so a task that
    writes to a shared value fails the same way in every executor)."""
    if isinstance(value, np.ndarray):
        view = np.ascontiguousarray(value).view()  # the layout workers get (BLAS picks kernels by it)
        view.flags.writeable = False
        return view
    if isinstance(value, onnx.ModelProto):
        return _Model(value.SerializeToString())
    return _children(value, _freeze)


def _thaw(value: Any) -> Any:
    """The value a task sees: models parsed, everything else as stored."""
    if isinstance(value, _Model):
        model = onnx.ModelProto()
        model.ParseFromString(value.data)
        return model
    return _children(value, _thaw)


def _children(value: Any, fn: Callable[[Any], Any]) -> Any:
    """`value` with `fn` applied to what it holds: dicts, lists, tuples and dataclass fields
    (so e.g. a dict of moment objects shares its arrays too); anything else as it is."""
    if isinstance(value, dict):
        return {k: fn(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(fn(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and not isinstance(value, _Leaf):
        out = copy.copy(value)
        for f in dataclasses.fields(value):
            object.__setattr__(out, f.name, fn(getattr(value, f.name)))
        return out
    return value


class _Leaf:
    """Marks the executor's own records, which `_children` must not open."""


@dataclass(frozen=True)
class _ArrayFile(_Leaf):
    path: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _ModelFile(_Leaf):
    path: str


def _pack(value: Any, folder: str, counter: itertools.count) -> Any:
    """Arrays and model bytes to files in `folder`; the returned skeleton is small to pickle."""
    if isinstance(value, np.ndarray) and value.dtype != object:
        path = os.path.join(folder, f"{next(counter)}.npy")
        data = np.ascontiguousarray(value)
        data.tofile(path)
        return _ArrayFile(path, data.dtype.str, data.shape)
    if isinstance(value, onnx.ModelProto):
        path = os.path.join(folder, f"{next(counter)}.onnx")
        with open(path, "wb") as f:
            f.write(value.SerializeToString())
        return _ModelFile(path)
    return _children(value, lambda v: _pack(v, folder, counter))


def _unpack(value: Any) -> Any:
    if isinstance(value, _ArrayFile):
        if 0 in value.shape:
            return np.empty(value.shape, np.dtype(value.dtype))
        return np.memmap(value.path, dtype=np.dtype(value.dtype), mode="r", shape=value.shape)
    if isinstance(value, _ModelFile):
        with open(value.path, "rb") as f:
            return _Model(f.read())
    return _children(value, _unpack)


# Worker-side cache: the shared values the tasks of the current map use, loaded once per worker.
_CACHE: dict[str, Any] = {}


def _cached(refs: Mapping[str, tuple[str, Callable[[], Any]]]) -> dict[str, Any]:
    """{name: value} for `refs` = {name: (key, loader)}; values not asked for any more are dropped."""
    keys = {key for key, _ in refs.values()}
    for key in [k for k in _CACHE if k not in keys]:
        del _CACHE[key]
    out = {}
    for name, (key, load) in refs.items():
        if key not in _CACHE:
            _CACHE[key] = _thaw(load())
        out[name] = _CACHE[key]
    return out


# ---- inline ------------------------------------------------------------------------------------
class InlineExecutor(Executor):
    """Runs tasks one after another in this process (the default)."""

    kind = "inline"

    def put(self, value: object) -> Ref:
        return Ref(uuid.uuid4().hex, _freeze(value))

    def map(self, fn, items, *, shared=None, label="", progress=None) -> list:
        _check_fn(fn)
        kwargs = {name: _thaw(ref.handle) for name, ref in (shared or {}).items()}
        results = []
        with _task_threads():
            for index, item in enumerate(items):
                _report(progress, label, index, len(items))
                ok, value = _run_task(fn, item, kwargs)
                if not ok:
                    raise _task_error(label, fn, index, item, value)
                results.append(value)
        _report(progress, label, len(items), len(items))
        return results


# ---- local processes ---------------------------------------------------------------------------
def _process_task(fn: Callable, item: Any, refs: dict[str, tuple[str, str]]) -> tuple[bool, Any]:
    """Runs in a worker process: shared values come from the packed skeleton files."""
    try:
        kwargs = _cached({name: (key, _skeleton_loader(path)) for name, (key, path) in refs.items()})
    except Exception as exc:
        return False, f"could not load shared values: {type(exc).__name__}: {exc}"
    return _run_task(fn, item, kwargs)


def _skeleton_loader(path: str) -> Callable[[], Any]:
    def load() -> Any:
        with open(path, "rb") as f:
            return _unpack(pickle.load(f))

    return load


def _shared_folder() -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="onnxc-executor-", dir=base)


class ProcessExecutor(Executor):
    """`jobs` worker processes (spawn: no inherited locks or BLAS thread pools)."""

    kind = "local"

    def __init__(self, jobs: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.workers = jobs
        self.folder = _shared_folder()
        self._counter = itertools.count()
        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init_worker)

    def put(self, value: object) -> Ref:
        key = uuid.uuid4().hex
        path = os.path.join(self.folder, f"{key}.pkl")
        skeleton = _pack(value, self.folder, self._counter)
        with open(path, "wb") as f:
            pickle.dump(skeleton, f, protocol=pickle.HIGHEST_PROTOCOL)
        return Ref(key, path)

    def map(self, fn, items, *, shared=None, label="", progress=None) -> list:
        from concurrent.futures import wait
        from concurrent.futures.process import BrokenProcessPool

        _check_fn(fn)
        refs = {name: (ref.key, ref.handle) for name, ref in (shared or {}).items()}
        futures = [self.pool.submit(_process_task, fn, item, refs) for item in items]
        try:
            return _collect(futures, fn, items, label, progress)
        except BrokenProcessPool:
            raise ExecutorError(f"{label or fn.__name__}: a worker process died (out of memory?)") from None
        finally:
            for future in futures:
                future.cancel()
            wait(futures)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.folder, ignore_errors=True)


def _collect(futures: list, fn: Callable, items: Sequence, label: str, progress: Progress | None) -> list:
    """Results in item order; the first failed task (in item order among those done) raises."""
    from concurrent.futures import as_completed

    _report(progress, label, 0, len(items))
    index = {id(f): i for i, f in enumerate(futures)}
    for done, future in enumerate(as_completed(futures), 1):
        ok, value = future.result()
        if not ok:
            i = index[id(future)]
            raise _task_error(label, fn, i, items[i], value)
        _report(progress, label, done, len(items))
    return [f.result()[1] for f in futures]


class _MissingRay(UsageError, ExecutorError):
    """Ray is not installed: a usage error (exit 2) that also stops the compile."""


# ---- Ray ---------------------------------------------------------------------------------------
_RAY_TASK = None


def _ray():
    try:
        import ray
    except ImportError:
        raise _MissingRay("--executor ray needs Ray: pip install 'onnxc[ray]'") from None
    return ray


def _ray_task(fn: Callable, item: Any, refs: dict[str, tuple[str, list]]) -> tuple[bool, Any]:
    """Runs in a Ray worker: each shared value is fetched from the object store once per worker
    (ObjectRefs arrive wrapped in a list, so Ray does not resolve them for every task)."""
    import ray

    _init_worker()
    try:
        kwargs = _cached({name: (key, lambda box=box: ray.get(box[0])) for name, (key, box) in refs.items()})
    except Exception as exc:
        return False, f"could not load shared values: {type(exc).__name__}: {exc}"
    return _run_task(fn, item, kwargs)


class RayExecutor(Executor):
    """Tasks as Ray tasks: on the cluster at `address`, or a local one started here (and stopped
    on close). A Ray session that is already initialized is used as it is and left running."""

    kind = "ray"

    def __init__(self, jobs: int | None = None, address: str | None = None):
        self.ray = _ray()  # a missing extra is reported before any work starts
        self.jobs, self.address = jobs, address
        self.owned = False
        self.task = None

    def _connect(self):
        """Start or join the cluster on first use (bad input fails fast, without a cluster)."""
        global _RAY_TASK
        if self.task is not None:
            return self.task
        ray, address = self.ray, self.address
        if not ray.is_initialized():
            quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
            try:
                if address:
                    _probe(address)  # ray.init retries an unreachable address for minutes
                    ray.init(address=address, **quiet)
                else:
                    ray.init(num_cpus=self.jobs or os.cpu_count() or 1, **quiet)
            except ExecutorError:
                raise
            except Exception as exc:  # connection refused, bad address, ...
                where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ExecutorError(f"could not start or reach {where}: {first}") from None
            self.owned = True
        self.workers = int(ray.cluster_resources().get("CPU", 1))
        if _RAY_TASK is None:
            _RAY_TASK = ray.remote(num_cpus=1, max_retries=0)(_ray_task)
        self.task = _RAY_TASK
        return self.task

    def put(self, value: object) -> Ref:
        self._connect()
        return Ref(uuid.uuid4().hex, [self.ray.put(_freeze(value))])

    def map(self, fn, items, *, shared=None, label="", progress=None) -> list:
        _check_fn(fn)
        ray, task = self.ray, self._connect()
        refs = {name: (ref.key, ref.handle) for name, ref in (shared or {}).items()}
        pending = [task.remote(fn, item, refs) for item in items]
        index = {p: i for i, p in enumerate(pending)}
        results: list = [None] * len(items)
        _report(progress, label, 0, len(items))
        remaining, done = list(pending), 0
        try:
            while remaining:
                ready, remaining = ray.wait(remaining, num_returns=1)
                for ref in ready:
                    i = index[ref]
                    try:
                        ok, value = ray.get(ref)
                    except ray.exceptions.RayError as exc:  # the worker or the cluster, not the task
                        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                        raise ExecutorError(f"{label or fn.__name__}: Ray failed: {first}") from None
                    if not ok:
                        raise _task_error(label, fn, i, items[i], value)
                    results[i] = value
                    done += 1
                    _report(progress, label, done, len(items))
        finally:
            for ref in remaining:
                ray.cancel(ref)
        return results

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast when a `host:port` (or `ray://host:port`) cluster address does not answer."""
    import socket

    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return  # "auto" and other forms: left to Ray
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ExecutorError(f"could not reach the Ray cluster at {address}: {reason}") from None


# ---- choosing one ------------------------------------------------------------------------------
def make_executor(kind: str = "inline", jobs: int = 1, address: str | None = None) -> Executor:
    """The executor for `--executor KIND --jobs N [--ray-address A]`."""
    if kind not in KINDS:
        raise UsageError(f"unknown executor '{kind}' (choose from {', '.join(KINDS)})")
    if jobs is None or jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    if address and kind != "ray":
        raise UsageError("--ray-address needs --executor ray")
    if kind == "local":
        return ProcessExecutor(jobs)
    if kind == "ray":
        return RayExecutor(jobs, address)
    return InlineExecutor()


def executor_kind(executor: str | None, jobs: int | None, address: str | None) -> str:
    """What the CLI options mean together: `--jobs N` alone (N > 1) is local processes, a Ray
    address alone is Ray, nothing is in-process."""
    if executor:
        return executor
    if address:
        return "ray"
    return "local" if jobs and jobs > 1 else "inline"
