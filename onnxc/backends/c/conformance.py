"""Run the ONNX node conformance cases (`onnx.backend.test.case.node`) through the C backend.

Each single-node case of a supported op becomes one generated model (one per data set when its
frozen parameters differ). Inputs that the C backend takes as export-time constants -- every
non-float input (shapes, axes, pads, indices) and the weight-like float inputs listed in
`FROZEN` (Conv weights, BatchNorm statistics, Clip bounds, Resize scales...) -- become
initializers with the case's values; the others stay run-time inputs. All models go into one C
program (every symbol is prefixed with the model name), compiled once, and each case runs as
`./prog K`; outputs are compared with the case's expected outputs at rtol=1e-4, atol=1e-5
(same shape, NaN where NaN).
"""

from __future__ import annotations

import io
import warnings
from collections import defaultdict
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxc.backends.c import compile_model
from onnxc.backends.c.toolchain import HarnessModel, ToolError, build_host, harness, harness_model, run_host
from onnxc.compiler.model import clone
from onnxc.errors import OnnxcError

RTOL, ATOL = 1e-4, 1e-5

# Float inputs the C backend needs at export time, by op: input positions.
FROZEN = {"Conv": {1, 2}, "ConvTranspose": {1, 2}, "BatchNormalization": {1, 2, 3, 4}, "Clip": {1, 2},
          "Pad": {2}, "Resize": {1, 2, 3}, "Upsample": {1}, "LSTM": {1, 2, 3, 7}, "GRU": {1, 2, 3},
          "QuantizeLinear": {1, 2}, "DequantizeLinear": {1, 2}, "QLinearConv": {1, 2, 3, 4, 5, 6, 7, 8},
          "QLinearMatMul": {1, 2, 4, 5, 6, 7}, "ConvInteger": {1, 2, 3}, "MatMulInteger": {2, 3}}
# Integer data inputs that stay run-time inputs (other non-float inputs are parameters).
RUNTIME = {"QuantizeLinear": {0}, "DequantizeLinear": {0}, "QLinearConv": {0}, "QLinearMatMul": {0, 3},
           "ConvInteger": {0}, "MatMulInteger": {0, 1}}


@dataclass
class Unit:
    """One generated model: a case (and data set) ready to run."""

    op: str
    case: str
    name: str
    inputs: list[np.ndarray]
    expected: list[np.ndarray]
    model: onnx.ModelProto | None = None
    error: str | None = None
    harness: HarnessModel | None = None
    got: list[np.ndarray] | None = None
    source: object = None  # the conformance TestCase


@dataclass
class OpResult:
    op: str
    passed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # case -> reason
    units: dict[str, Unit] = field(default_factory=dict)   # case -> what ran (inputs, outputs)

    @property
    def total(self) -> int:
        return len(self.passed) + len(self.failed)


def collect(ops: set[str]) -> dict[str, list]:
    """Single-node conformance cases per op (the expanded function-body variants are left out)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    by_op: dict[str, list] = defaultdict(list)
    for case in cases:
        if case.model is None or len(case.model.graph.node) != 1:
            continue
        op = case.model.graph.node[0].op_type
        if op in ops and case.model.graph.node[0].domain in ("", "ai.onnx"):
            by_op[op].append(case)
    return dict(by_op)


def _freeze(model: onnx.ModelProto, values: list[np.ndarray]) -> tuple[onnx.ModelProto, list[int]]:
    """The model with parameter inputs turned into initializers; returns it and the kept inputs."""
    node = model.graph.node[0]
    frozen_pos = FROZEN.get(node.op_type, set())
    m = clone(model)
    params = _parameter_positions(node, model) - RUNTIME.get(node.op_type, set())
    keep, kept_idx = [], []
    for i, vi in enumerate(model.graph.input):
        pos = [k for k, name in enumerate(node.input) if name == vi.name]
        if any(p in frozen_pos or p in params for p in pos):
            m.graph.initializer.append(_tensor(values[i], vi.name))
        else:
            keep.append(vi)
            kept_idx.append(i)
    del m.graph.input[:]
    m.graph.input.extend(keep)
    return m, kept_idx


def _tensor(value, name: str) -> onnx.TensorProto:
    """An initializer from a case's value (numpy, or a TensorProto for types numpy lacks)."""
    if isinstance(value, onnx.TensorProto):
        t = onnx.TensorProto()
        t.CopyFrom(value)
        t.name = name
        return t
    return numpy_helper.from_array(np.asarray(value), name)


def _parameter_positions(node: onnx.NodeProto, model: onnx.ModelProto) -> set[int]:
    """Inputs whose schema allows no float type (shapes, axes, pads, indices, flags)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except Exception:
        return set()
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    out = set()
    for i in range(len(node.input)):
        formal = schema.inputs[min(i, len(schema.inputs) - 1)]
        types = allowed.get(formal.type_str, {formal.type_str})
        if "tensor(float)" not in types:
            out.add(i)
    return out


def through_arena(model: onnx.ModelProto) -> onnx.ModelProto:
    """The node fed from and feeding exact `Mul(t, 1)` nodes, so its inputs and outputs live in
    the arena and the in-place, view and fused variants run instead of the I/O-pointer ones."""
    m = clone(model)
    node = m.graph.node[0]
    float_io = {v.name for v in list(m.graph.input) + list(m.graph.output)
                if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    m.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "onnxc_one"))
    before, after = [], []
    for vi in m.graph.input:
        if vi.name in float_io and vi.name in node.input:
            before.append(onnx.helper.make_node("Mul", [vi.name, "onnxc_one"], [vi.name + "__a"]))
            for i, name in enumerate(node.input):
                if name == vi.name:
                    node.input[i] = vi.name + "__a"
    for vo in m.graph.output:
        if vo.name in float_io and vo.name in node.output:
            node.output[list(node.output).index(vo.name)] = vo.name + "__a"
            after.append(onnx.helper.make_node("Mul", [vo.name + "__a", "onnxc_one"], [vo.name]))
    nodes = before + [node] + after
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def units_for(op: str, cases: list, start: int, arena: bool = False) -> list[Unit]:
    units = []
    for case in cases:
        for d, (inputs, outputs) in enumerate(case.data_sets or []):
            model, kept = _freeze(case.model, inputs)
            if arena:
                model = through_arena(model)
            name = f"c{start + len(units)}"
            label = case.name if len(case.data_sets) == 1 else f"{case.name}[{d}]"
            units.append(Unit(op, label, name, [np.asarray(inputs[i]) for i in kept],
                              [np.asarray(o) for o in outputs], model, source=case))
    return units


def generate(units: list[Unit], workdir: Path) -> list[Unit]:
    """Export every unit into `workdir`; returns the units that exported."""
    ok = []
    for u in units:
        try:
            gen = compile_model(u.model, u.name, source=u.case)
        except OnnxcError as exc:
            u.error = f"export: {exc}"
            continue
        except Exception as exc:  # a crash in the generator is a failure to report, not to hide
            u.error = f"export crashed: {type(exc).__name__}: {exc}"
            continue
        gen.write(workdir)
        prog = gen.prog
        u.harness = harness_model(prog)
        if [x.size for x in u.inputs] != u.harness.input_sizes:
            u.error = f"input sizes {[x.size for x in u.inputs]} != generated {u.harness.input_sizes}"
            continue
        ok.append(u)
    return ok


def _build(units: list[Unit], workdir: Path, tag: str, opt: str) -> Path:
    main = workdir / f"main_{tag}.c"
    body = harness([u.harness for u in units])
    includes = "".join(f'#include "{u.name}.c"\n' for u in units)
    main.write_text(includes + body)
    kernels = sorted(p for p in workdir.glob("onnxc_*.c"))
    return build_host([main, *kernels], workdir / f"prog_{tag}", opt=opt, include=[workdir])


def build(units: list[Unit], workdir: Path, opt: str = "-O1") -> dict[str, tuple[Path, int]]:
    """One program for all units; when it does not compile, split until the culprits are isolated."""
    where: dict[str, tuple[Path, int]] = {}

    def attempt(group: list[Unit], tag: str) -> None:
        if not group:
            return
        try:
            exe = _build(group, workdir, tag, opt)
        except ToolError as exc:
            if len(group) == 1:
                group[0].error = "compile: " + _first_error(str(exc))
                return
            half = len(group) // 2
            attempt(group[:half], tag + "a")
            attempt(group[half:], tag + "b")
            return
        for i, u in enumerate(group):
            where[u.name] = (exe, i)

    attempt(units, "all")
    return where


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error:" in line or "undefined reference" in line:
            return line.strip()[:300]
    return text.strip().splitlines()[-1][:300] if text.strip() else "unknown"


def compare(got: list[np.ndarray], expected: list[np.ndarray]) -> str | None:
    """None when equal within RTOL/ATOL, else the reason."""
    for k, (g, e) in enumerate(zip(got, expected)):
        e = np.asarray(e)
        if g.size != e.size:
            return f"output {k}: {g.size} values, expected {e.size}"
        g = g.reshape(e.shape).astype(np.float64)
        e = e.astype(np.float64)
        nan = np.isnan(e)
        if (np.isnan(g) != nan).any():
            return f"output {k}: NaN at different positions"
        bad = ~nan & ~np.isclose(g, e, rtol=RTOL, atol=ATOL)
        if bad.any():
            i = int(np.argmax(bad.reshape(-1)))
            err = float(np.max(np.abs(g - e)[~nan]))
            return (f"output {k}: {int(bad.sum())}/{e.size} values differ (max abs err {err:.3g}; "
                    f"first at {i}: got {g.reshape(-1)[i]:.7g}, expected {e.reshape(-1)[i]:.7g})")
    return None


def run_conformance(ops: set[str], workdir: Path, opt: str = "-O1",
                    arena: bool = False) -> dict[str, OpResult]:
    """Pass/fail per case for every op in `ops` that has conformance cases; with `arena`, every
    case runs through `through_arena`."""
    workdir.mkdir(parents=True, exist_ok=True)
    units: list[Unit] = []
    for op, cases in sorted(collect(ops).items()):
        units += units_for(op, cases, len(units), arena)
    exported = generate(units, workdir)
    where = build(exported, workdir, opt)
    for u in exported:
        if u.error is not None:
            continue
        exe, index = where[u.name]
        try:
            got = run_host(exe, index, u.inputs, u.harness.output_sizes, timeout=60,
                           input_types=u.harness.input_types, output_types=u.harness.output_types)
        except ToolError as exc:
            u.error = "run: " + str(exc).splitlines()[0][:200]
            continue
        u.got = got
        u.error = compare(got, u.expected)
    results: dict[str, OpResult] = {}
    for u in units:
        r = results.setdefault(u.op, OpResult(u.op))
        r.units[u.case] = u
        if u.error is None:
            r.passed.append(u.case)
        else:
            r.failed[u.case] = u.error
    return results


def supported_ops() -> set[str]:
    from onnxc.backends.c import (  # noqa: F401  (register)
        lower_elementwise,
        lower_layout,
        lower_nn,
        lower_quant,
        lower_rnn,
    )
    from onnxc.backends.c.lowering import HANDLERS

    return set(HANDLERS)
