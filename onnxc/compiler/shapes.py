"""Tensor shapes that survive shape-computing subgraphs, and the default input shapes of a model.

ONNX shape inference with data propagation loses every shape behind a Reshape whose target is
computed at run time by ops it does not evaluate (`Shape -> Cast -> Div -> Concat`, `Range`,
...). Costs computed from such a graph count the lost dims as 1: a recognizer doing 651 MMAC was
reported as 1.41 MMAC. `infer` recovers them, cheapest first:

1. onnx shape inference with data propagation (symbolic dims kept);
2. with concrete input shapes: one onnxruntime run on one random sample that returns every tensor
   still unknown, so we read the real shape (cheap for one sample);
3. otherwise onnxruntime's symbolic shape inference (dims become expressions of the input symbols).

What stays unknown is reported by the callers (`?` in `onnxc inspect`), never silently taken as 1.

`default_input_shapes` is the stated default when the user gives neither calibration data nor
`--input-shape`: a leading symbolic batch is 1, other symbolic dims are tried from common sizes
until the graph runs in onnxruntime.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, shape_inference

from onnxc.compiler import layout, runtime, selectors
from onnxc.compiler.calibration import draw, with_outputs
from onnxc.compiler.model import clone, tensor_nbytes
from onnxc.errors import OnnxcError

log = logging.getLogger("onnxc.shapes")

Dims = list[int | str | None]

# Sizes tried for symbolic non-batch dims, most common first (image sides, sequence lengths).
CANDIDATE_SIZES = (224, 320, 640, 32, 48, 64, 128, 256, 512, 16, 8, 96, 160, 384, 1)
LARGE_INITIALIZER = 4096


@dataclass
class ShapeInfo:
    """Shape of every tensor we could find, how we found it, and the input shapes used."""

    shapes: dict[str, Dims] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    input_shapes: dict[str, list[int]] | None = None
    method: str = "onnx"

    def get(self, name: str) -> Dims | None:
        return self.shapes.get(name)

    def unknown_dims(self, name: str) -> list[int]:
        """Indices of the dims of `name` that are not concrete ([-1] when the rank is unknown). A 0
        here is a real empty dim: declared 0 dims (Paddle's "unknown") were read as None."""
        shape = self.shapes.get(name)
        if shape is None:
            return [-1]
        return [i for i, d in enumerate(shape) if not (isinstance(d, (int, np.integer)) and d >= 0)]

    def value_infos(self) -> list[onnx.ValueInfoProto]:
        """The shapes as ValueInfoProtos (for a GraphView or a model's value_info)."""
        out = []
        for name, dims in self.shapes.items():
            if name in self.dtypes:
                out.append(helper.make_tensor_value_info(name, self.dtypes[name],
                                                         [d if d is not None and d != -1 else None for d in dims]))
        return out


def _concrete(d) -> bool:
    return isinstance(d, (int, np.integer)) and d > 0


def _dims_of(vi: onnx.ValueInfoProto) -> Dims | None:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
            for d in tt.shape.dim]


def _collect(graph: onnx.GraphProto, info: ShapeInfo) -> None:
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = _dims_of(vi)
        if dims is None:
            continue
        old = info.shapes.get(vi.name)
        if old is None or sum(map(_concrete, dims)) >= sum(map(_concrete, old)):
            info.shapes[vi.name] = dims
            if vi.type.tensor_type.elem_type:
                info.dtypes[vi.name] = vi.type.tensor_type.elem_type


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def concrete_input_shapes(model: onnx.ModelProto,
                          input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[int]] | None:
    """Input shapes from `input_shapes`, else from the model with a symbolic batch as 1; None when
    some other dim is unknown."""
    out = {}
    axes = layout.model_input_axes(model)
    for vi in graph_inputs(model):
        dims = _dims_of(vi)
        if input_shapes and vi.name in input_shapes:  # a None in a given shape keeps the model's dim
            given = list(input_shapes[vi.name])
            dims = [g if _concrete(g) else (dims[i] if dims and i < len(dims) else None) for i, g in enumerate(given)]
        if dims is None:
            return None
        axis = axes.get(vi.name)
        if axis is not None and axis < len(dims) and not _concrete(dims[axis]):
            dims = [1 if i == axis else d for i, d in enumerate(dims)]
        if not all(_concrete(d) for d in dims):
            return None
        out[vi.name] = [int(d) for d in dims]
    return out


# ---- inference ---------------------------------------------------------------------------------
def infer(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None, *,
          needed: Iterable[str] | None = None) -> ShapeInfo:
    """Shapes of the main graph's tensors at `input_shapes` (default: the model's own inputs, a
    symbolic leading batch as 1). Only when a tensor of `needed` (default: every node output) is
    still unknown after onnx inference do we run onnxruntime or its symbolic inference."""
    concrete = concrete_input_shapes(model, input_shapes)
    info = ShapeInfo(input_shapes=concrete)
    light = _skeleton(model, concrete or input_shapes or {})
    try:
        inferred = shape_inference.infer_shapes(light, data_prop=True)
        _collect(inferred.graph, info)
    except Exception as exc:
        log.debug("onnx shape inference failed: %s", exc)
        _collect(light.graph, info)
    for t in model.graph.initializer:
        info.shapes[t.name] = list(t.dims)
        info.dtypes[t.name] = t.data_type
    wanted = list(needed) if needed is not None else [o for n in model.graph.node for o in n.output if o]
    missing = [n for n in dict.fromkeys(wanted) if info.unknown_dims(n)]
    if not missing:
        return info
    if concrete is not None:
        try:
            _profile_shapes(model, concrete, info)
            still = [n for n in missing if info.unknown_dims(n)]
            if still:
                _run_shapes(model, concrete, still, info)
            info.method = "onnx+onnxruntime"
            return info
        except Exception as exc:  # a model onnxruntime cannot run still gets the symbolic pass
            log.info("onnxruntime could not run the model for shapes (%s)", str(exc).splitlines()[0])
    _symbolic(model, input_shapes or {}, info)
    return info


def _profile_shapes(model: onnx.ModelProto, shapes: Mapping[str, list[int]], info: ShapeInfo) -> None:
    """Every node's output shapes from onnxruntime's profile of one run on one random sample.

    The profile records shapes without keeping the tensors, so memory stays that of one inference
    (requesting every intermediate tensor as an output would hold them all at once). Optimizations
    are off so the profiled nodes are the model's own; they are renamed uniquely in a copy.
    """
    probe = clone(model)
    _set_dims(probe, shapes)
    nodes = {}
    for i, node in enumerate(probe.graph.node):
        node.name = f"onnxc_shape_probe_{i}"
        nodes[node.name] = [o for o in node.output if o]
        value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR),
                     None)
        if node.op_type == "Constant" and value is not None:  # folded at load, never profiled
            info.shapes[node.output[0]] = list(value.dims)
            info.dtypes[node.output[0]] = value.data_type
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "shapes")
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        sess.run(None, random_feed(model, shapes))
        with open(sess.end_profiling()) as fh:
            events = json.load(fh)
    for event in events:
        args = event.get("args", {})
        outputs = nodes.get(event.get("name", "").removesuffix("_kernel_time"))
        found = args.get("output_type_shape")
        if event.get("cat") != "Node" or outputs is None or found is None or len(found) != len(outputs):
            continue  # optional outputs left out of the profile: the names would not line up
        for name, entry in zip(outputs, found):
            [(type_name, dims)] = entry.items()
            elem = info.dtypes.get(name) or _PROFILE_TYPES.get(type_name)
            if elem:
                info.shapes[name] = [int(d) for d in dims]
                info.dtypes[name] = elem


_PROFILE_TYPES = {"float": onnx.TensorProto.FLOAT, "double": onnx.TensorProto.DOUBLE,
                  "float16": onnx.TensorProto.FLOAT16, "int64": onnx.TensorProto.INT64,
                  "int32": onnx.TensorProto.INT32, "int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8,
                  "bool": onnx.TensorProto.BOOL}


def _run_shapes(model: onnx.ModelProto, shapes: Mapping[str, list[int]], names: list[str], info: ShapeInfo) -> None:
    """One onnxruntime run on one random sample that returns `names`: their real shapes (for the
    few tensors the profile does not name).

    ORT_ENABLE_EXTENDED, not ALL: the NCHWc layout pass fuses a Conv into the Add after it even when
    the Conv's output is requested (see calibration.iter_activations).
    """
    probe = with_outputs(model, names)
    _set_dims(probe, shapes)  # onnxruntime rejects any size for a dim written as 0
    sess = runtime.session(probe, optimization=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    values = sess.run(names, random_feed(model, shapes))
    for name, value in zip(names, values):
        if isinstance(value, np.ndarray):
            info.shapes[name] = [int(d) for d in value.shape]
            info.dtypes[name] = helper.np_dtype_to_tensor_dtype(value.dtype)


def _symbolic(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]], info: ShapeInfo) -> None:
    """onnxruntime's symbolic shape inference (sympy): dims as expressions of the input symbols."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        source = clone(model)
        _set_dims(source, input_shapes)
        del source.graph.value_info[:]
        out = SymbolicShapeInference.infer_shapes(source, auto_merge=True, guess_output_rank=False)
    except Exception as exc:
        log.info("symbolic shape inference failed (%s)", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return
    if out is not None:
        _collect(out.graph, info)
        info.method = "onnx+symbolic"


def _set_dims(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> None:
    """Write `input_shapes` over the graph inputs whatever the model declared (-1, 0, named); a None
    keeps the model's dim (symbolic where it was -1 or 0)."""
    for vi in model.graph.input:
        if vi.name in input_shapes:
            shape = vi.type.tensor_type.shape
            old = [onnx.TensorShapeProto.Dimension(dim_value=d.dim_value) if d.HasField("dim_value")
                   else onnx.TensorShapeProto.Dimension(dim_param=d.dim_param) for d in shape.dim]
            del shape.dim[:]
            for i, d in enumerate(input_shapes[vi.name]):
                if _concrete(d):
                    shape.dim.add().dim_value = int(d)
                elif i < len(old) and (old[i].dim_param or old[i].dim_value > 0):
                    shape.dim.add().CopyFrom(old[i])  # None keeps the model's own dim
                else:
                    shape.dim.add().dim_param = f"{vi.name}_dim{i}"


def _skeleton(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """Nodes, I/O, opsets and only the small initializers (Reshape targets): cheap to infer on.
    Large initializers become typed graph inputs; their values never matter for shapes."""
    light = onnx.ModelProto()
    light.ir_version = max(model.ir_version, 4)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = light.graph
    g.node.extend(model.graph.node)
    g.input.extend(graph_inputs(model))
    g.output.extend(model.graph.output)
    _set_dims(light, input_shapes)
    for t in model.graph.initializer:
        if tensor_nbytes(t) > LARGE_INITIALIZER or t.data_location == onnx.TensorProto.EXTERNAL:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            g.initializer.append(t)
    return light


# ---- default input shapes ------------------------------------------------------------------------
def random_feed(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], seed: int = 0) -> dict[str, np.ndarray]:
    """One random input per graph input at `shapes` (ints and bools 0/1: safe indices and masks)."""
    rng = np.random.default_rng(seed)
    chosen = selectors.selector_values(model)
    feed = {}
    for vi in graph_inputs(model):
        elem = vi.type.tensor_type.elem_type or onnx.TensorProto.FLOAT
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
        value = chosen.get(vi.name)
        if value is not None and value.size == int(np.prod(shapes[vi.name])):
            feed[vi.name] = value.reshape(shapes[vi.name])
        else:
            feed[vi.name] = draw(rng, vi.name, dtype, shapes[vi.name])
    return feed


def default_input_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Concrete input shapes for a model whose inputs may have symbolic dims.

    The batch dim (`layout`: named like one, else the leading dim; wherever its name appears)
    becomes 1. Other symbolic dims (named, `?`, or written as -1 or 0 as Paddle does) all take one
    size from CANDIDATE_SIZES, tried in order until the model runs in onnxruntime on random
    inputs; a name shared by several inputs is one dim. Models with no such dims are not run.
    """
    base: dict[str, Dims] = {}
    axes = layout.model_input_axes(model)
    batch = layout.batch_name(layout.model_inputs(model))
    for vi in graph_inputs(model):
        if not vi.type.HasField("tensor_type"):
            raise OnnxcError(f"input '{vi.name}' is not a tensor: pass calibration data")
        dims = _dims_of(vi)
        if dims is None:
            raise OnnxcError(f"input '{vi.name}' has no declared shape: pass --input-shape {vi.name}=...")
        axis = axes.get(vi.name)
        base[vi.name] = [1 if not _concrete(d) and (i == axis or batch is not None and d == batch) else d
                         for i, d in enumerate(dims)]
    if all(all(_concrete(d) for d in dims) for dims in base.values()):
        return {k: [int(d) for d in v] for k, v in base.items()}
    sess = runtime.session(_free_dims(model), optimization=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    errors = []
    for size in CANDIDATE_SIZES:
        shapes = {k: [int(d) if _concrete(d) else size for d in v] for k, v in base.items()}
        try:
            sess.run(None, random_feed(model, shapes))
            return shapes
        except Exception as exc:
            errors.append(f"{size}: {str(exc).splitlines()[0][:120]}")
    symbolic = ", ".join(f"{k}={_fmt(v)}" for k, v in base.items() if not all(_concrete(d) for d in v))
    raise OnnxcError(f"no default shape runs this model ({symbolic}; tried sizes "
                     f"{', '.join(map(str, CANDIDATE_SIZES))}): pass --input-shape or calibration data")


def _free_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose input dims written as 0 or -1 are symbolic (onnxruntime insists a 0 is 0)."""
    out = clone(model)
    for vi in out.graph.input:
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.dim_param = f"{vi.name}_dim{i}"
    return out


def _fmt(dims: Dims) -> str:
    return "x".join(str(d) if _concrete(d) else "?" for d in dims)


def format_shapes(shapes: Mapping[str, Sequence[int]]) -> str:
    """`x=1x3x224x224, y=1x10`: how reports and inspect state the shapes they used."""
    return ", ".join(f"{k}={'x'.join(map(str, v)) or 'scalar'}" for k, v in shapes.items())


def resolve_input_shapes(model: onnx.ModelProto, given: Mapping[str, Sequence[int]] | None = None,
                         ) -> tuple[dict[str, list[int]], str]:
    """The concrete input shapes to compute with, and a sentence saying where they came from.

    `given` (from `--input-shape`) is checked against the model: known names, same rank, and equal
    to every dim the model fixes (dims written as -1, 0, `?` or a name are free). Inputs it leaves
    out get `default_input_shapes`.
    """
    given = {k: [int(d) for d in v] for k, v in (given or {}).items()}
    inputs = {vi.name: vi for vi in graph_inputs(model)}
    named: dict[str, int] = {}  # a dim name shared by several inputs is one dim: one value
    shared: dict[str, list[int | None]] = {}

    for name, dims in given.items():
        if name not in inputs:
            raise OnnxcError(f"--input-shape: model has no input '{name}' (inputs: {', '.join(inputs)})")
        declared = _dims_of(inputs[name])
        if declared is not None and declared and len(declared) != len(dims):
            raise OnnxcError(f"--input-shape {name}: model input has rank {len(declared)}, got {len(dims)} dims")
        for i, d in enumerate(declared or []):
            if _concrete(d) and d != dims[i]:
                raise OnnxcError(f"--input-shape {name}: dim {i} is fixed to {d} in the model, got {dims[i]}")
            if isinstance(d, str) and named.setdefault(d, dims[i]) != dims[i]:
                raise OnnxcError(f"--input-shape: dim '{d}' is one dim of several inputs, given as {named[d]} "
                                 f"and {dims[i]}")
    for name, vi in inputs.items():  # inputs left out take the values of the dims they share
        declared = _dims_of(vi) or []
        if name not in given and any(isinstance(d, str) and d in named for d in declared):
            given_partial = [named.get(d) if isinstance(d, str) else None for d in declared]
            shared.setdefault(name, given_partial)
    if set(given) >= set(inputs):
        return {k: given[k] for k in inputs}, "given"
    probe = clone(model) if given else model
    if given:
        _set_dims(probe, {**shared, **given})
    try:
        shapes = default_input_shapes(probe)
    except OnnxcError as exc:  # costs can still be counted symbolically, with the unknown dims named
        log.warning("%s", exc)
        return given, f"none found ({exc}); symbolic dims are reported as unknown"
    dims = [(_dims_of(vi) or [None]) for name, vi in inputs.items() if name not in given]
    parts = []
    if any(d and not _concrete(d[0]) for d in dims):
        parts.append("default: symbolic batch -> 1")
    if any(not _concrete(x) for d in dims for x in d[1:]):
        parts.append("other symbolic dims: the first of the common sizes "
                     f"{', '.join(map(str, CANDIDATE_SIZES[:4]))}, ... that runs in onnxruntime")
    how = "; ".join(parts) or "the model's"
    return {**shapes, **given}, ("given and " + how if given else how)


def with_shapes(model: onnx.ModelProto, info: ShapeInfo) -> onnx.ModelProto:
    """A copy of `model` whose inputs and value_info carry the shapes `info` found (for analyses
    that read shapes from the graph, such as the channel groups)."""
    out = clone(model)
    if info.input_shapes:
        _set_dims(out, info.input_shapes)
    io = {v.name for v in out.graph.input} | {v.name for v in out.graph.output}
    inits = {t.name for t in out.graph.initializer}
    del out.graph.value_info[:]
    out.graph.value_info.extend(v for v in info.value_infos() if v.name not in io and v.name not in inits)
    return out
