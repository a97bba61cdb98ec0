"""The interface contract: the model we write is a drop-in replacement for the one we read.

Inside the compiler, inputs may be given concrete shapes (`--input-shape`, calibration data, a
default) so that shapes, costs and the C backend are exact; none of our rewrites depends on batch or
spatial size, so the written model gets back the source's graph inputs and outputs exactly as
declared (names, element types, ranks, named symbolic dims, `-1`/unnamed dynamic dims) and its
model-level fields. Intermediate shapes inferred at a concrete size are dropped and re-inferred
from the restored interface, so no stale concrete dim can pin a later run to one size.
"""

from __future__ import annotations

import onnx

from onnxc.compiler.canonical import infer_shapes

MODEL_FIELDS = ("producer_name", "producer_version", "domain", "model_version", "doc_string")


def keep_interface(model: onnx.ModelProto, source: onnx.ModelProto) -> onnx.ModelProto:
    """Give `model` (in place) the graph inputs/outputs and model metadata of `source`."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in source.graph.input if v.name not in {t.name for t in source.graph.initializer}]
    inputs = [v for v in inputs if v.name not in inits]
    # Keep the source's order; an input the rewrite no longer reads stays declared (pipelines feed it).
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    for name in MODEL_FIELDS:
        setattr(model, name, getattr(source, name))
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)
    model.graph.doc_string = source.graph.doc_string
    model.graph.name = source.graph.name or model.graph.name
    del model.graph.value_info[:]
    model = infer_shapes(model)
    outputs = {v.name: v for v in source.graph.output}  # after inference, which rewrites outputs
    for vi in model.graph.output:
        if vi.name in outputs:
            vi.CopyFrom(outputs[vi.name])
    return model


def interface_differences(source: onnx.ModelProto, model: onnx.ModelProto) -> list[str]:
    """What a pipeline written for `source` would notice in `model` (empty when drop-in)."""
    problems = []
    for kind in ("input", "output"):
        a = _signature(source, kind)
        b = _signature(model, kind)
        if [n for n, _ in a] != [n for n, _ in b]:
            problems.append(f"{kind} names {[n for n, _ in a]} -> {[n for n, _ in b]}")
            continue
        for (name, sa), (_, sb) in zip(a, b):
            if sa != sb:
                problems.append(f"{kind} '{name}': {sa} -> {sb}")
    for name in MODEL_FIELDS:
        if getattr(source, name) != getattr(model, name):
            problems.append(f"{name} changed")
    if {p.key: p.value for p in source.metadata_props} != {p.key: p.value for p in model.metadata_props}:
        problems.append("metadata_props changed")
    return problems


def _signature(model: onnx.ModelProto, kind: str) -> list[tuple[str, tuple]]:
    inits = {t.name for t in model.graph.initializer}
    values = model.graph.input if kind == "input" else model.graph.output
    out = []
    for v in values:
        if kind == "input" and v.name in inits:
            continue
        tt = v.type.tensor_type
        dims = tuple(d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                                                      else "?") for d in tt.shape.dim) if tt.HasField("shape") else None
        out.append((v.name, (tt.elem_type, dims)))
    return out
