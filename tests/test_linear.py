"""One Gemm form: canonicalization writes every constant-weight Gemm as transB=1, alpha=beta=1
with a bias vector, exactly; `LinearLayer` reads and writes back every linear-layer variant."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import f32, init, model
from onnx import helper

from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.graph import GraphView, attr
from onnxc.compiler.linear import LinearLayer

M, K, N = 6, 12, 10


def _run(m: onnx.ModelProto, feed: dict) -> dict[str, np.ndarray]:
    """onnxruntime on the whole feed at once (inputs here are not batches of samples)."""
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def gemm_model(trans_a: int, trans_b: int, alpha: float | None, beta: float | None, c: str,
               shared: bool = False, opset: int = 17, seed: int = 0) -> tuple[onnx.ModelProto, dict]:
    """x -> Gemm(x, W, C) -> y, with `shared`: a MatMul that also reads W (as a [K, N] or [N, K]
    weight, whichever W's stored shape is) into a second output."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    inits, inputs = [init("W", w)], ["x", "W"]
    c_values = {"vector": (N,), "row": (1, N), "scalar": (), "one": (1,), "matrix": (M, N), "column": (M, 1)}
    if c in c_values:
        inits.append(init("C", rng.standard_normal(c_values[c]).astype(np.float32)))
        inputs.append("C")
    graph_inputs = [f32("x", [K, M] if trans_a else [M, K])]
    if c == "computed":
        graph_inputs.append(f32("c_in", [M, N]))
        inputs.append("c_in")
    attrs = {"transA": trans_a, "transB": trans_b}
    if alpha is not None:
        attrs["alpha"] = alpha
    if beta is not None:
        attrs["beta"] = beta
    nodes = [helper.make_node("Gemm", inputs, ["y"], name="fc", **attrs)]
    outputs = [f32("y", [M, N])]
    if shared:
        nodes.append(helper.make_node("MatMul", ["z", "W"], ["y2"], name="other"))
        graph_inputs.append(f32("z", [3, w.shape[0]]))
        outputs.append(f32("y2", [3, w.shape[1]]))
    m = model(nodes, graph_inputs, outputs, inits, opset=opset, ir=8 if opset >= 9 else 4)
    feed = {v.name: rng.standard_normal([d.dim_value for d in v.type.tensor_type.shape.dim]).astype(np.float32)
            for v in graph_inputs}
    return m, feed


def _gemm(m: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in m.graph.node if n.op_type == "Gemm")


VARIANTS = [(0, 0, None, None, "none"), (0, 0, 2.5, 0.5, "vector"), (1, 0, 0.5, 2.0, "row"),
            (0, 1, 1.5, 3.0, "scalar"), (1, 1, None, 0.25, "one"), (0, 0, 0.7, 1.3, "matrix"),
            (0, 1, 1.0, 2.0, "column"), (0, 0, 3.0, 0.5, "computed"), (0, 1, None, None, "vector"),
            (0, 0, 1.0, 0.0, "vector")]


@pytest.mark.parametrize("trans_a,trans_b,alpha,beta,c", VARIANTS)
@pytest.mark.parametrize("shared", [False, True])
def test_canonical_gemm_is_one_form_and_output_equal(trans_a, trans_b, alpha, beta, c, shared):
    m, feed = gemm_model(trans_a, trans_b, alpha, beta, c, shared)
    w_before = onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "W")).copy()
    canon = canonicalize(m)
    onnx.checker.check_model(canon, full_check=True)
    node = _gemm(canon)
    assert attr(node, "transB", 0) == 1 and attr(node, "alpha", 1.0) == 1.0
    assert attr(node, "transA", 0) == trans_a  # an activation's transA stays (it would need a Transpose)
    view = GraphView(canon.graph)
    assert view.const(node.input[1]).shape == (N, K)  # [out, in]
    if c in ("vector", "row", "scalar", "one"):
        assert view.const(node.input[2]).shape == (N,) and attr(node, "beta", 1.0) == 1.0
    elif c in ("matrix", "column"):  # not a bias vector: kept in its shape, beta folded in
        assert view.const(node.input[2]).ndim == 2 and attr(node, "beta", 1.0) == 1.0
    elif c == "computed":  # beta on a computed C stays (folding it would need a Mul)
        assert attr(node, "beta", 1.0) == beta
    assert [o.version for o in canon.opset_import] == [o.version for o in m.opset_import]
    assert canon.ir_version == m.ir_version
    ref, got = _run(m, feed), _run(canon, feed)
    for name in ref:
        assert _rel(ref[name], got[name]) <= 1e-6, name
    if shared:  # the other reader still sees the original W, untouched
        other = next(n for n in canon.graph.node if n.op_type == "MatMul")
        assert np.array_equal(view.const(other.input[1]), w_before)
        assert other.input[1] != node.input[1] or trans_b == 1 and alpha in (None, 1.0)


def test_canonical_gemm_opset9_keeps_c_shape_and_is_idempotent():
    m, feed = gemm_model(0, 0, 2.0, 0.5, "row", opset=9)
    canon = canonicalize(m)
    node = _gemm(canon)
    assert attr(node, "transB", 0) == 1 and attr(node, "beta", 1.0) == 1.0 and len(node.input) == 3
    assert _rel(_run(m, feed)["y"], _run(canon, feed)["y"]) <= 1e-6
    again = canonicalize(canon)
    assert again.SerializeToString(deterministic=True) == canon.SerializeToString(deterministic=True)


def test_canonical_leaves_computed_b_alone():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Gemm", ["x", "w_in"], ["y"], name="fc", alpha=2.0)]
    m = model(nodes, [f32("x", [M, K]), f32("w_in", [K, N])], [f32("y", [M, N])])
    canon = canonicalize(m)
    node = _gemm(canon)
    assert attr(node, "alpha") == 2.0 and attr(node, "transB") is None
    feed = {"x": rng.standard_normal((M, K)).astype(np.float32), "w_in": rng.standard_normal((K, N)).astype(np.float32)}
    assert np.array_equal(_run(m, feed)["y"], _run(canon, feed)["y"])


# ---- LinearLayer: read, then write back ----------------------------------------------------------
def conv_model(bias: bool, group: int = 1) -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(4)
    inits = [init("W", rng.standard_normal((8, 4 // group, 3, 3)).astype(np.float32))]
    inputs = ["x", "W"]
    if bias:
        inits.append(init("B", rng.standard_normal(8).astype(np.float32)))
        inputs.append("B")
    nodes = [helper.make_node("Conv", inputs, ["y"], name="conv", pads=[1, 1, 1, 1], group=group)]
    m = model(nodes, [f32("x", [2, 4, 5, 5])], [f32("y", [2, 8, 5, 5])], inits)
    return m, {"x": rng.standard_normal((2, 4, 5, 5)).astype(np.float32)}


def matmul_model(add: str) -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(5)
    inits = [init("W", rng.standard_normal((K, N)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h" if add else "y"], name="mm")]
    if add:
        shape = {"vector": (N,), "row": (1, 1, N), "scalar": ()}[add]
        inits.append(init("b", rng.standard_normal(shape).astype(np.float32)))
        nodes.append(helper.make_node("Add", ["b", "h"], ["y"], name="add"))
    m = model(nodes, [f32("x", [2, M, K])], [f32("y", [2, M, N])], inits)
    return m, {"x": rng.standard_normal((2, M, K)).astype(np.float32)}


def _direct(layer: LinearLayer, x: np.ndarray) -> np.ndarray:
    """y = W x + b from the view's weight and bias (dense layers; activation features last)."""
    y = x.astype(np.float64) @ layer.weight.astype(np.float64).T
    return y + (layer.bias.astype(np.float64) if layer.bias is not None else 0)


CASES = [("gemm", v) for v in VARIANTS] + [("conv", (True, 1)), ("conv", (False, 1)), ("conv", (True, 2)),
                                             ("matmul", ""), ("matmul", "vector"), ("matmul", "row"),
                                             ("matmul", "scalar")]


def _build(kind, args):
    if kind == "gemm":
        return gemm_model(*args)
    if kind == "conv":
        return conv_model(*args)
    return matmul_model(args)


@pytest.mark.parametrize("kind,args", CASES)
@pytest.mark.parametrize("canonical", [False, True])
def test_linear_layer_write_of_read_keeps_outputs(kind, args, canonical):
    m, feed = _build(kind, args)
    if canonical:
        m = canonicalize(m)
    ref = _run(m, feed)
    view = GraphView(m.graph)
    node = next(n for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul"))
    layer = LinearLayer.read(node, view)
    assert isinstance(layer, LinearLayer)
    assert layer.out_features == 8 if kind == "conv" else N
    if kind == "gemm" and not layer.trans_a and not layer.fixed_c:  # the view is the layer
        assert _rel(ref["y"], _direct(layer, feed["x"])) <= 1e-6
    if kind == "matmul":
        assert (layer.bias is not None) == (args in ("vector", "row"))
        assert layer.y == ("y" if layer.bias is not None or not args else "h")
        assert _rel(ref["y"], _direct(layer, feed["x"])) <= 1e-6 if layer.bias is not None or not args else True
    layer.write(view, layer.weight, layer.bias)
    onnx.checker.check_model(m)
    got = _run(m, feed)
    assert _rel(ref["y"], got["y"]) <= 1e-6
    # A changed weight and bias land where the layer reads them.
    if (layer.bias is not None or kind != "matmul") and not layer.fixed_c:
        weight, bias = 2 * layer.weight, np.arange(layer.out_features, dtype=np.float32)
        layer.write(view, weight, bias)
        assert np.array_equal(layer.weight, weight) and np.array_equal(layer.bias, bias)
        again = LinearLayer.read(node, view)
        assert np.allclose(again.weight, weight, rtol=1e-6) and np.allclose(again.bias, bias, rtol=1e-6)
        if kind == "gemm" and not layer.trans_a and not layer.fixed_c:
            assert _rel(_run(m, feed)["y"], _direct(again, feed["x"])) <= 1e-6


def test_linear_layer_write_copies_a_shared_weight():
    m, feed = gemm_model(0, 0, 2.0, 1.0, "vector", shared=True)
    view = GraphView(m.graph)
    before = view.const("W").copy()
    layer = LinearLayer.read(_gemm(m), view)
    layer.write(view, np.zeros_like(layer.weight), np.zeros(N, np.float32))
    assert np.array_equal(view.const("W"), before) and _gemm(m).input[1] != "W"
    assert np.abs(_run(m, feed)["y"]).max() == 0


def test_linear_layer_reasons_and_limits():
    m, _ = matmul_model("")
    view = GraphView(m.graph)
    layer = LinearLayer.read(m.graph.node[0], view)
    with pytest.raises(ValueError, match="no bias Add"):
        layer.write(view, layer.weight, np.zeros(N, np.float32))
    m, _ = gemm_model(0, 0, None, None, "computed")
    view = GraphView(m.graph)
    layer = LinearLayer.read(_gemm(m), view)
    assert layer.fixed_c == "c_in" and layer.bias is None
    with pytest.raises(ValueError, match="not a bias vector"):
        layer.write(view, layer.weight, np.zeros(N, np.float32))
    relu = helper.make_node("Relu", ["x"], ["r"])
    assert LinearLayer.read(relu, view) is None
    left = helper.make_node("MatMul", ["W", "x"], ["q"])
    assert LinearLayer.read(left, view) == "input is constant"


def test_canonical_tied_gemm_weights_stay_one_tensor():
    """Two transB=0 Gemms reading one W (tied weights) read one transposed copy, not two."""
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["h"], name="a", alpha=0.5),
             helper.make_node("Gemm", ["h", "W", "C"], ["y"], name="b", alpha=0.5)]
    inits = [init("W", rng.standard_normal((K, K)).astype(np.float32)),
             init("C", rng.standard_normal((1, K)).astype(np.float32))]
    m = model(nodes, [f32("x", [M, K])], [f32("y", [M, K])], inits)
    canon = canonicalize(m)
    a, b = canon.graph.node
    assert a.input[1] == b.input[1] and a.input[2] == b.input[2]
    assert len(canon.graph.initializer) == 2
    feed = {"x": rng.standard_normal((M, K)).astype(np.float32)}
    assert _rel(_run(m, feed)["y"], _run(canon, feed)["y"]) <= 1e-6
