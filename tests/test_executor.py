"""The executor: the same results, in item order, in-process, on local processes and as Ray tasks;
shared values reach tasks read-only; a failing task is one OnnxcError line."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from sample_data import CALIBRATION, sample_path

from onnxc.compiler.executor import ExecutorError, InlineExecutor, executor_kind, make_executor
from onnxc.errors import OnnxcError, UsageError

TESTS = Path(__file__).resolve().parent


# ---- tasks (module-level: workers import them by name) -------------------------------------------
def weighted_sum(item: int, arrays: dict, model: onnx.ModelProto) -> tuple[int, float, str]:
    """Reads both shared values; the seed comes from the item, never from global state."""
    rng = np.random.default_rng([item])
    row = np.asarray(arrays["w"][item], dtype=np.float64)
    return item, float(row @ rng.standard_normal(row.shape[0])), model.graph.node[item % 3].name


def fail_on_three(item: int) -> int:
    if item == 3:
        raise ValueError("three is not allowed\nsecond line")
    return item


def write_shared(item: int, arrays: dict) -> None:
    arrays["w"][item] = 0.0


@pytest.fixture(scope="module")
def ray_cluster():
    """One local 2-CPU Ray cluster for the module (starting one takes seconds)."""
    ray = pytest.importorskip("ray")
    path = os.pathsep.join(p for p in (str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


KINDS = ["inline", "local", "ray"]


@pytest.fixture(params=KINDS)
def executor(request):
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    with make_executor(request.param, 2) as ex:
        yield ex


def test_results_in_item_order_with_shared_values(executor):
    model = onnx.load(sample_path("vgg"))
    w = np.random.default_rng(0).standard_normal((12, 50)).astype(np.float32)
    shared = {"arrays": executor.put({"w": w}), "model": executor.put(model)}
    seen = []
    got = executor.map(weighted_sum, range(12), shared=shared, label="sum",
                       progress=lambda label, done, total: seen.append((label, done, total)))
    want = InlineExecutor().map(weighted_sum, range(12), shared={"arrays": InlineExecutor().put({"w": w}),
                                                                 "model": InlineExecutor().put(model)})
    assert got == want
    assert [g[0] for g in got] == list(range(12))
    assert seen[0] == ("sum", 0, 12) and seen[-1] == ("sum", 12, 12)
    # a second map reuses the shared values (workers keep them) and gives the same answer again
    assert executor.map(weighted_sum, range(12), shared=shared) == want


def test_task_error_is_one_onnxc_error_line(executor):
    with pytest.raises(OnnxcError) as info:
        executor.map(fail_on_three, range(6), label="refit")
    message = str(info.value)
    assert "\n" not in message
    assert message == "refit: task 3 (3) failed: ValueError: three is not allowed"


def test_shared_values_are_read_only(executor):
    w = np.ones((2, 3), np.float32)
    with pytest.raises(OnnxcError, match="read-only"):
        executor.map(write_shared, [0], shared={"arrays": executor.put({"w": w})})
    assert w.sum() == 6


def test_lambdas_are_refused_everywhere():
    with pytest.raises(TypeError, match="module-level"):
        InlineExecutor().map(lambda x: x, [1])


def test_kind_and_usage_errors():
    assert executor_kind(None, None, None) == "inline"
    assert executor_kind(None, 1, None) == "inline"
    assert executor_kind(None, 3, None) == "local"
    assert executor_kind(None, None, "auto") == "ray"
    assert executor_kind("ray", 2, None) == "ray"
    with pytest.raises(UsageError, match="unknown executor"):
        make_executor("threads")
    with pytest.raises(UsageError, match="--jobs"):
        make_executor("local", 0)
    with pytest.raises(UsageError, match="--ray-address needs --executor ray"):
        make_executor("local", 2, "127.0.0.1:6379")


def test_cli_rejects_bad_jobs(tmp_path):
    from click.testing import CliRunner

    from onnxc.cli import cli

    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(cli, ["optimize", str(sample_path("mlp")), "-o", str(out), "--jobs", "0",
                                      "--calibration", str(CALIBRATION)])
    assert result.exit_code == 2 and not out.exists()


# ---- passes on the executor: the same optimized model whoever runs the per-layer fits -------------
SPECS = ["tucker:ratio=0.5", "cluster:bits=4,per_channel=true"]


def _optimized(kind: str) -> tuple[bytes, list]:
    from onnxc.api import optimize

    result = optimize(sample_path("resnet"), passes=SPECS, calibration=CALIBRATION, executor=kind, jobs=2)
    return result.model.SerializeToString(), result.report.passes


@pytest.fixture(scope="module")
def inline_model():
    model, records = _optimized("inline")
    # the fits really ran (so the comparison below exercises the executor)
    assert [(r.id, r.status) for r in records] == [("tucker", "applied"), ("cluster", "applied")]
    assert all(len(r.changes) >= 3 for r in records)
    return model


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_optimized_model_is_byte_identical(kind, inline_model, request):
    if kind == "ray":
        request.getfixturevalue("ray_cluster")
    model, _ = _optimized(kind)
    assert model == inline_model


def test_circulant_fits_are_byte_identical(executor):
    """circulant's per-layout fits (normal equations and solve) as tasks: the same layers whoever runs them."""
    from onnxc.compiler import calibration as calib
    from onnxc.compiler.canonical import canonicalize
    from onnxc.compiler.model import clone
    from onnxc.compiler.passes import PassContext, create

    model = canonicalize(onnx.load(sample_path("mlp")), {})
    cal = calib.make_calibration(model, CALIBRATION)
    circulant = create("circulant", {"block": "8"})
    got = circulant.run(clone(model), PassContext(calibration=cal, executor=executor))
    want = circulant.run(clone(model), PassContext(calibration=cal))
    assert len(got.changes) == 2 and got.info["data_aware"]  # fitted to the data, four layouts each
    assert got.model.SerializeToString() == want.model.SerializeToString()
    assert [c.error for c in got.changes] == [c.error for c in want.changes]


def test_missing_ray_is_one_clear_error(monkeypatch):
    import sys

    from onnxc.compiler import executor as executor_module

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'onnxc\[ray\]'"):
        executor_module.make_executor("ray", 2)


def test_cli_jobs_gives_the_in_process_output(tmp_path, inline_model):
    from click.testing import CliRunner

    from onnxc.cli import cli

    out = tmp_path / "out.onnx"
    args = ["optimize", str(sample_path("resnet")), "-o", str(out), "--calibration", str(CALIBRATION), "-q"]
    for spec in SPECS:
        args += ["-p", spec]
    result = CliRunner().invoke(cli, [*args, "--jobs", "2"])
    assert result.exit_code == 0, result.output
    assert onnx.load(out).SerializeToString() == onnx.load_from_string(inline_model).SerializeToString()


def test_a_dead_worker_is_one_clear_error():
    with make_executor("local", 1) as executor:
        with pytest.raises(OnnxcError, match="crash: a worker process died"):
            executor.map(os._exit, [3], label="crash")


class _GoneExecutor(InlineExecutor):
    def put(self, value):
        raise ExecutorError("could not reach the Ray cluster at 10.0.0.1:6379: Connection refused")


def test_executor_failure_stops_the_compile_a_task_failure_only_the_pass():
    from onnxc.compiler import calibration as calib
    from onnxc.compiler.canonical import canonicalize
    from onnxc.compiler.passes import PassContext, PassManager, create

    model = canonicalize(onnx.load(sample_path("resnet")), {})
    cal = calib.make_calibration(model, CALIBRATION)
    tucker = create("tucker")
    with pytest.raises(ExecutorError, match="could not reach"):
        PassManager([tucker], PassContext(calibration=cal, executor=_GoneExecutor())).run(model)
    _, records = PassManager([tucker], PassContext(calibration=cal)).run(model)
    assert records[0].status == "applied"


def test_unreachable_ray_address_fails_fast():
    import socket
    import time

    from onnxc.compiler.executor import _probe

    with socket.socket() as s:  # a port nobody listens on: bind, then close
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(ExecutorError, match=f"could not reach the Ray cluster at 127.0.0.1:{port}"):
        _probe(f"127.0.0.1:{port}")
    assert time.perf_counter() - start < 6
