"""int8 as a technique of the allocator: regions, a plan that mixes precision and structure, and
the backends taking that plan as it is."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sample_data import CALIBRATION, accuracy, sample_path

from onnxc.api import optimize
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.cost import model_cost
from onnxc.compiler.model import load
from onnxc.compiler.passes import create
from onnxc.compiler.technique import MIN_SHARE


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sensitivity")


def test_regions_carry_the_ops_after_each_layer():
    model = canonicalize(load(sample_path("resnet")))
    regions = create("int8").plan_candidates(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert {ops[r.nodes[0]] for r in regions} <= {"Conv", "Gemm", "MatMul"}
    assert any(ops[n] == "Relu" for r in regions for n in r.nodes[1:])  # conv + relu quantized together
    weight_layers = {n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    placed = [n for r in regions for n in r.nodes if n in weight_layers]
    assert sorted(placed) == sorted(weight_layers)  # every layer in exactly one region
    macs = {n.name: n.macs for n in model_cost(model).layers}
    assert len(regions) < len(weight_layers)  # the small ones (a 1x1 shortcut, the head) planned with others
    assert all(sum(macs.get(n, 0) for n in r.nodes) >= MIN_SHARE * sum(macs.values()) for r in regions)


def test_a_layer_alone_leaves_its_chain_float():
    """Level LAYER quantizes the region's layers and nothing after them; REGION the whole chain."""
    from onnxc.compiler.calibration import make_calibration
    from onnxc.compiler.passes import PassContext
    from onnxc.passes.int8 import LAYER, REGION

    model = canonicalize(load(sample_path("resnet")))
    technique = create("int8")
    ops = {n.name: n.op_type for n in model.graph.node}
    region = next(r for r in technique.plan_candidates(model) if "Add" in {ops[n] for n in r.nodes})  # a residual
    cal = make_calibration(model, CALIBRATION, seed=0)
    ctx = PassContext(calibration=cal)

    def quantized(level: float) -> tuple[set[str], set[str]]:
        """The nodes that run int8 (int8 in, int8 out) and all nodes."""
        (restricted,) = technique.restricted({region.name: level})
        out = restricted.run(model, ctx).model
        made = {o: n for n in out.graph.node for o in n.output}
        readers = {}
        for n in out.graph.node:
            for i in n.input:
                readers.setdefault(i, []).append(n.op_type)
        return {n.name for n in out.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                and any(made.get(i) is not None and made[i].op_type == "DequantizeLinear" for i in n.input)
                and all(readers.get(o) == ["QuantizeLinear"] for o in n.output)}, {n.name for n in out.graph.node}

    layers = {n for n in region.nodes if ops[n] in ("Conv", "Gemm")}
    int8, present = quantized(LAYER)
    assert int8 == layers and set(region.nodes) <= present  # the chain is there, float
    int8, present = quantized(REGION)
    assert set(region.nodes) & present <= int8  # what the quantizer did not fold into the layer runs int8
    assert any(ops[n] == "Add" for n in int8)


def test_int8_pass_alone_quantizes_and_keeps_accuracy():
    result = optimize(sample_path("vgg"), passes=["int8"], calibration=CALIBRATION)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("QuantizeLinear") >= 5 and "DequantizeLinear" in ops
    assert result.report.after["bytes"] < 0.3 * result.report.before["bytes"]
    assert accuracy(result.model) >= accuracy(sample_path("vgg")) - 0.5


def test_size_target_mixes_int8_and_codes(cache):
    """int8 and clustering both store a weight: one node takes one of them, and the plan meets the
    size target (bytes, deterministic) within the budget."""
    result = optimize(sample_path("mlp"), passes=["int8", "cluster"], calibration=CALIBRATION, target="size=0.2",
                      cache_dir=cache)
    alloc = result.report.allocation
    assert alloc["met"] and result.report.fidelity["error"] <= alloc["budget"]
    chosen = alloc["chosen"]
    layers = [k.split(":", 1)[1] for k in chosen]
    assert len(layers) == len(set(layers)), chosen  # no weight both clustered and in int8
    assert accuracy(result.model) >= accuracy(sample_path("mlp")) - 1.0


def test_latency_target_mixes_precision_and_structure(cache, tmp_path):
    """The allocator's int8 is written as planned by the onnxruntime backend (not re-quantized)."""
    out = tmp_path / "m.onnx"
    result = optimize(sample_path("mobilenet"), passes=["int8", "prune"], calibration=CALIBRATION,
                      target="latency=0.5", cache_dir=cache, output=out, backend="onnxruntime")
    alloc = result.report.allocation
    techniques = {k.split(":")[0] for k in alloc["chosen"]}
    assert "int8" in techniques
    assert result.report.fidelity["error"] <= alloc["budget"]
    written = onnx.load(str(out))
    assert sum(n.op_type == "QuantizeLinear" for n in written.graph.node) >= 1
    assert any("as it is" in note for note in result.report.notes)
    assert accuracy(out) >= accuracy(sample_path("mobilenet")) - 0.5


def _fragile_model() -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv -> y, fed inputs whose channel 0 is 1000x the others (`_fragile_data`)
    and read by the first conv at 1/1000: int8 of the first conv's input spends its range on that
    channel and wipes out the others, which no weight equalization can fix; the second conv is
    harmless in int8."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w1[:, 0] *= 1e-3
    w2 = rng.standard_normal((8, 8, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu1"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "fragile",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8, 8, 8])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_budget_keeps_the_layers_int8_destroys_float(tmp_path):
    """With a budget, a layer whose int8 error alone is over it stays float; the others go int8."""
    rng = np.random.default_rng(1)
    data = {"x": rng.standard_normal((64, 4, 8, 8)).astype(np.float32)}
    data["x"][:, 0] *= 1000
    model = _fragile_model()
    alone = optimize(model, passes=["int8"], calibration=data, max_error=float("inf"))
    assert alone.report.fidelity["error"] > 0.05  # int8 everywhere destroys it
    result = optimize(model, passes=["int8"], calibration=data, max_error=0.05, target="size=0.9",
                      cache_dir=tmp_path)
    assert result.report.fidelity["error"] <= 0.05
    chosen = result.report.allocation["chosen"]
    rows = {r["name"]: r["error"] for r in result.report.allocation["sensitivity"]["measurements"]}
    assert set(rows) == {"conv1", "conv2"}
    assert all(rows[name.split(":")[1]] <= 0.05 for name in chosen)
    assert len(chosen) < 2
    left = result.report.allocation["untouched"]["int8"]  # the report lists the layers kept float
    assert left and set(left) | {name.split(":")[1] for name in chosen} == {"conv1", "conv2"}


def test_c_backend_lowers_the_planned_mix_as_it_is(tmp_path):
    """`--backend c --int8` with a target: the allocator's int8 layers run as integer kernels, the
    layers it kept float stay float, and the build matches onnxruntime running the same model."""
    from sample_data import load_test_set

    from onnxc.backends import ExportOptions
    from onnxc.backends.c import compile_model
    from onnxc.backends.c.toolchain import build_generated, run_samples
    from onnxc.compiler import runtime

    result = optimize(sample_path("mlp"), passes=["int8"], calibration=CALIBRATION, target="size=0.7",
                      backend="c", export_options=ExportOptions(int8="static", name="net"), output=tmp_path / "c",
                      cache_dir=tmp_path / "cache")
    chosen = result.report.allocation["chosen"]
    left = result.report.allocation["untouched"].get("int8", [])
    assert chosen and left, (chosen, left)  # a mix: some layers int8, some float
    ops = result.report.backend["ops"]
    assert ops.get("QuantizeLinear") and ops.get("Gemm")  # integer kernels and float ones in one program
    x, _ = load_test_set()
    gen = compile_model(result.model, "mix", {"input": [1, 1, 16, 16]})
    exe = build_generated([gen], tmp_path / "host", opt="-O2")
    ours = run_samples(exe, 0, gen, {"input": x[:100]})["logits"].reshape(100, -1)
    ref = runtime.run(result.model, {"input": x[:100]})["logits"]
    assert np.mean(ours.argmax(1) == ref.argmax(1)) >= 0.99
    assert np.max(np.abs(ours - ref)) <= 0.05 * np.max(np.abs(ref))


def test_fixed_batch_models_calibrate(tmp_path):
    """A model whose batch dim is fixed at 1 (as microcontroller exports are) is fed one sample at a time."""
    from onnxc.backends.c.reference_models import ds_cnn

    model = ds_cnn(seed=0)
    x = np.random.default_rng(1).standard_normal((16, 1, 49, 10)).astype(np.float32)
    result = optimize(model, passes=["int8"], calibration={model.graph.input[0].name: x})
    assert sum(n.op_type == "QuantizeLinear" for n in result.model.graph.node) >= 3


def test_a_latency_plan_stores_the_weights_it_leaves_float_as_codes():
    """What a latency plan keeps float is stored by the technique that costs no time (cluster's
    codes, decoded once at session start): the int8 layers are left alone, every float layer's
    weight becomes codes, the file shrinks and the outputs stay close. Should that leave the
    budget, the next attempt stores the largest weights only, holding most of the bytes."""
    from onnxc.compiler import runtime
    from onnxc.compiler.allocation import LARGEST_SHARE, _store_float_weights
    from onnxc.compiler.calibration import make_calibration
    from onnxc.compiler.model import serialized_bytes
    from onnxc.compiler.passes import PassContext
    from onnxc.compiler.sensitivity import make_techniques
    from onnxc.passes._codes import read_clustered

    model = canonicalize(load(sample_path("resnet")))
    cal = make_calibration(model, CALIBRATION, seed=0)
    ctx = PassContext(calibration=cal)
    techniques = make_techniques(["prune", "cluster", "int8"], "latency")
    region = techniques["int8"].plan_candidates(model)[1]
    (int8,) = techniques["int8"].restricted({region.name: 1.0})
    plan = canonicalize(int8.run(model, ctx).model)
    judged = []
    attempts = list(_store_float_weights(plan, techniques, ctx, None, lambda m: judged.append(m) or len(judged)))
    assert [a[4] for a in attempts] == [1, 2]  # every attempt judged, in order
    (technique, levels, stored, _, _), (_, largest, _, _, _) = attempts
    assert technique == "cluster" and set(levels.values()) == {8}
    layers = {n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    # the float layers (those cluster takes: not the smallest), never the int8 ones
    assert set(levels) == {c.name for c in techniques["cluster"].plan_candidates(model)} - set(region.nodes)
    assert set(levels) <= layers and len(levels) >= 4
    assert len(read_clustered(stored)) == len(levels)
    assert serialized_bytes(stored) < 0.5 * serialized_bytes(plan)
    a, b = runtime.run(plan, cal.validation), runtime.run(stored, cal.validation)
    for name in a:
        assert np.linalg.norm(a[name] - b[name]) <= 0.05 * np.linalg.norm(a[name])
    weights = {t.name: t for t in plan.graph.initializer}
    nbytes = {n.name: onnx.numpy_helper.to_array(weights[n.input[1]]).nbytes for n in plan.graph.node
              if n.name in levels}
    assert set(largest) < set(levels)
    assert sum(nbytes[n] for n in largest) >= LARGEST_SHARE * sum(nbytes.values())
    assert min(nbytes[n] for n in largest) >= max(nbytes[n] for n in set(levels) - set(largest))
    assert not list(_store_float_weights(plan, make_techniques(["prune", "int8"], "latency"), ctx, None, len))
