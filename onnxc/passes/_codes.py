"""How clustered weights are stored in ONNX: code containers, the Gather pattern, Huffman size.

A clustered weight `W` becomes small integer codes plus a float codebook, rebuilt in the graph
by `Gather(codebook, idx)` (the node pattern is documented in `onnxc.passes.cluster`).

Containers for the codes:

- `uint4`: an ONNX UINT4 initializer with W's shape (two codes per byte, low nibble first).
  UINT4 needs IR >= 10 and `Cast` from uint4 needs default-domain opset >= 21, so the model's
  opset is raised to 21 when every op in the graph means the same thing there
  (`upgrade_for_uint4`); otherwise
- `nibbles`: the very same bytes in a UINT8 initializer of shape [N // 2, 1], unpacked in the
  graph with integer Cast/Div/Mul/Sub/Concat/Reshape (ops valid from opset 7, so any model);
- `uint8`: one code per byte (5 to 8 bits).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, defs, helper, numpy_helper

from onnxc.compiler.graph import GraphView, attr, set_attr, subgraphs
from onnxc.compiler.model import tensor_nbytes

UINT4_OPSET = 21
UINT4_IR = 10
CONTAINERS = ("uint4", "nibbles", "uint8", "tight")


# ---- sizes ----------------------------------------------------------------------------------
def huffman_bits(counts: Iterable[int]) -> int:
    """Total bits of the codes if Huffman-coded with these symbol frequencies (table excluded).

    The cost of a Huffman code is the sum of the weights of its internal nodes, so the lengths
    never need to be materialized. A single used symbol still costs one bit per occurrence.
    """
    heap = [int(c) for c in counts if c > 0]
    if len(heap) <= 1:
        return sum(heap)
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte, low nibble first (ONNX's UINT4 layout); odd length padded with 0."""
    flat = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] & 0x0F) | (flat[1::2] << 4)


def pack_bits(codes: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """A little-endian bit stream of `bits`-bit codes as [M, bits] bytes (8 codes per row), and the
    N mod 8 codes left over. Code i occupies stream bits [i*bits, (i+1)*bits), so for 4 bits the
    bytes are exactly a UINT4 tensor's raw_data."""
    flat = np.asarray(codes, dtype=np.uint8).reshape(-1)
    m = flat.size // 8
    body = flat[: 8 * m].reshape(m, 8, 1)
    planes = np.unpackbits(body, axis=2, bitorder="little")[:, :, :bits]  # [M, 8, bits]
    return np.packbits(planes.reshape(m, 8 * bits), axis=1, bitorder="little"), flat[8 * m:]


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `pack_bits` for the [M, bits] body: 8 * M codes."""
    planes = np.unpackbits(packed, axis=1, bitorder="little").reshape(-1, 8, bits).astype(np.int64)
    return (planes << np.arange(bits)).sum(axis=2).reshape(-1)


def uint4_tensor(name: str, codes: np.ndarray) -> TensorProto:
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = TensorProto.UINT4
    tensor.dims.extend(codes.shape)
    tensor.raw_data = pack_nibbles(codes).tobytes()
    return tensor


# ---- the pattern ----------------------------------------------------------------------------
@dataclass
class Encoded:
    """Nodes and initializers that rebuild one weight, and the bytes they store."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[TensorProto] = field(default_factory=list)
    container: str = ""
    shared: set[str] = field(default_factory=set)  # SharedConstants this encoding reads

    @property
    def nbytes(self) -> int:
        return sum(tensor_nbytes(t) for t in self.initializers)

    def code_bytes(self) -> int:
        return sum(tensor_nbytes(t) for t in self.initializers if "codes" in t.name or "tail" in t.name)

    def serialized_size(self) -> int:
        """Bytes in the file (tensors, nodes, names and the value_info shape inference adds for
        every intermediate, ~24 bytes besides its name), shared constants excluded."""
        values = sum(len(o) + 24 for n in self.nodes for o in n.output)
        return sum(t.ByteSize() for t in self.initializers) + sum(n.ByteSize() for n in self.nodes) + values


class SharedConstants:
    """The small constants of the unpack subgraphs, stored once per model, not once per layer."""

    def __init__(self, view: GraphView):
        self.view = view
        self.names: dict[str, str] = {}
        self.tensors: dict[str, TensorProto] = {}

    def get(self, key: str, value: np.ndarray) -> str:
        if key not in self.names:
            name = self.view.unique_name(f"onnxc_cluster_{key}")
            self.names[key] = name
            self.tensors[name] = numpy_helper.from_array(value, name)
        return self.names[key]

    def used_by(self, encodings: list[Encoded]) -> list[TensorProto]:
        used = set().union(*(e.shared for e in encodings)) if encodings else set()
        return [t for name, t in self.tensors.items() if name in used]


def encode(view: GraphView, output: str, codes: np.ndarray, codebook: np.ndarray,
           offsets: np.ndarray | None, container: str, base: str, bits: int = 8,
           shared: SharedConstants | None = None) -> Encoded:
    """Build `output = Gather(codebook, [Add(] idx [, offsets)])` with idx from the codes.

    `codes` has the weight's shape; `codebook` is 1-D ([K], or [C*K] with `offsets` holding c*K
    along the channel axis). Nothing is added to the graph: the caller inserts the result.
    """
    if container not in CONTAINERS:
        raise ValueError(f"unknown container {container}")
    enc = Encoded(container=container)
    name = view.unique_name
    cb = numpy_helper.from_array(np.ascontiguousarray(codebook), name(f"{base}_codebook"))
    enc.initializers.append(cb)
    if container == "nibbles":
        idx = _unpack_nibbles(view, enc, codes, base, shared)
    elif container == "tight":
        idx = _unpack_tight(view, enc, codes, bits, base, shared)
    else:
        codes_name = name(f"{base}_codes")
        if container == "uint4":
            enc.initializers.append(uint4_tensor(codes_name, codes))
        else:
            enc.initializers.append(numpy_helper.from_array(np.ascontiguousarray(codes, dtype=np.uint8), codes_name))
        idx = name(f"{base}_idx")
        enc.nodes.append(helper.make_node("Cast", [codes_name], [idx], name=name(f"{base}_cast"),
                                          to=TensorProto.INT32))
    if offsets is not None:
        off = numpy_helper.from_array(np.ascontiguousarray(offsets, dtype=np.int32), name(f"{base}_row_offsets"))
        enc.initializers.append(off)
        shifted = name(f"{base}_idx_rows")
        enc.nodes.append(helper.make_node("Add", [idx, off.name], [shifted], name=name(f"{base}_add_rows")))
        idx = shifted
    enc.nodes.append(helper.make_node("Gather", [cb.name, idx], [output], name=name(f"{base}_gather"), axis=0))
    return enc


def _const(view: GraphView, enc: Encoded, shared: SharedConstants | None, key: str, value: np.ndarray,
           base: str) -> str:
    """A model-wide shared constant, or (without `shared`) one of this layer's own."""
    if shared is not None:
        name = shared.get(key, value)
        enc.shared.add(name)
        return name
    tensor = numpy_helper.from_array(value, view.unique_name(f"{base}_{key.split('_', 1)[-1]}"))
    enc.initializers.append(tensor)
    return tensor.name


def _unpack_tight(view: GraphView, enc: Encoded, codes: np.ndarray, bits: int, base: str,
                  shared: SharedConstants | None) -> str:
    """int32 codes from a bit stream stored as [M, bits] bytes (8 codes per row, `pack_bits`).

    Code p of a row starts at bit p*bits, inside byte j = p*bits // 8 at offset o = p*bits % 8 and
    never spans more than two bytes: code = ((B[j] + 256 * B[j+1]) / 2^o) mod 2^bits, with the
    per-position j, 2^o and the 256 (0 where byte j+1 is past the row) as [8] constants.
    """
    name = view.unique_name
    packed, tail = pack_bits(codes, bits)
    start = np.arange(8) * bits
    j_lo = start // 8
    j_hi = np.minimum(j_lo + 1, bits - 1)
    own = {"codes": packed, "shape": np.array(codes.shape, dtype=np.int64)}
    c = {k: name(f"{base}_{k}") for k in own}
    enc.initializers += [numpy_helper.from_array(v, c[k]) for k, v in own.items()]
    common = {
        "jlo": j_lo.astype(np.int64),
        "jhi": j_hi.astype(np.int64),
        "hscale": np.where(j_lo + 1 < bits, 256, 0).astype(np.int32),
        "shift": (1 << (start % 8)).astype(np.int32),
        "modulus": np.array(1 << bits, dtype=np.int32),
    }
    c.update({k: _const(view, enc, shared, f"bits{bits}_{k}", v, base) for k, v in common.items()})
    c["flat_shape"] = _const(view, enc, shared, "flat_shape", np.array([-1], dtype=np.int64), base)
    t = {k: name(f"{base}_{k}") for k in ("bytes", "lo", "hi", "hi256", "pair", "shifted", "q", "qm", "code", "flat")}
    enc.nodes += [
        helper.make_node("Cast", [c["codes"]], [t["bytes"]], name=name(f"{base}_cast"), to=TensorProto.INT32),
        helper.make_node("Gather", [t["bytes"], c["jlo"]], [t["lo"]], name=name(f"{base}_lo_byte"), axis=1),
        helper.make_node("Gather", [t["bytes"], c["jhi"]], [t["hi"]], name=name(f"{base}_hi_byte"), axis=1),
        helper.make_node("Mul", [t["hi"], c["hscale"]], [t["hi256"]], name=name(f"{base}_hi_scale")),
        helper.make_node("Add", [t["lo"], t["hi256"]], [t["pair"]], name=name(f"{base}_pair")),
        helper.make_node("Div", [t["pair"], c["shift"]], [t["shifted"]], name=name(f"{base}_shift")),
        helper.make_node("Div", [t["shifted"], c["modulus"]], [t["q"]], name=name(f"{base}_div")),
        helper.make_node("Mul", [t["q"], c["modulus"]], [t["qm"]], name=name(f"{base}_mul")),
        helper.make_node("Sub", [t["shifted"], t["qm"]], [t["code"]], name=name(f"{base}_mod")),
        helper.make_node("Reshape", [t["code"], c["flat_shape"]], [t["flat"]], name=name(f"{base}_flatten")),
    ]
    return _finish_flat(view, enc, t["flat"], tail, c["shape"], base)


def _finish_flat(view: GraphView, enc: Encoded, flat_name: str, tail: np.ndarray, shape_name: str,
                 base: str) -> str:
    """Append the leftover codes (if any) and reshape the flat codes to the weight's shape."""
    name = view.unique_name
    if tail.size:
        tail_t = numpy_helper.from_array(tail.astype(np.int32), name(f"{base}_tail"))
        enc.initializers.append(tail_t)
        joined = name(f"{base}_joined")
        enc.nodes.append(helper.make_node("Concat", [flat_name, tail_t.name], [joined], name=name(f"{base}_append"),
                                          axis=0))
        flat_name = joined
    idx = name(f"{base}_idx")
    enc.nodes.append(helper.make_node("Reshape", [flat_name, shape_name], [idx], name=name(f"{base}_reshape")))
    return idx


def _unpack_nibbles(view: GraphView, enc: Encoded, codes: np.ndarray, base: str,
                    shared: SharedConstants | None) -> str:
    """int32 codes from bytes holding two codes each: lo = b - 16 * (b / 16), hi = b / 16."""
    name = view.unique_name
    flat = np.asarray(codes, dtype=np.uint8).reshape(-1)
    pairs = flat.size // 2
    packed = pack_nibbles(flat[: 2 * pairs]).reshape(pairs, 1)
    packed_name = name(f"{base}_codes")
    enc.initializers.append(numpy_helper.from_array(packed, packed_name))
    sixteen = _const(view, enc, shared, "sixteen", np.array(16, dtype=np.int32), base)
    flat_shape = _const(view, enc, shared, "flat_shape", np.array([-1], dtype=np.int64), base)
    w_shape = numpy_helper.from_array(np.array(codes.shape, dtype=np.int64), name(f"{base}_shape"))
    enc.initializers.append(w_shape)
    t = [name(f"{base}_{s}") for s in ("bytes", "hi", "hi16", "lo", "pairs", "flat")]
    enc.nodes += [
        helper.make_node("Cast", [packed_name], [t[0]], name=name(f"{base}_cast"), to=TensorProto.INT32),
        helper.make_node("Div", [t[0], sixteen], [t[1]], name=name(f"{base}_div")),
        helper.make_node("Mul", [t[1], sixteen], [t[2]], name=name(f"{base}_mul")),
        helper.make_node("Sub", [t[0], t[2]], [t[3]], name=name(f"{base}_sub")),
        helper.make_node("Concat", [t[3], t[1]], [t[4]], name=name(f"{base}_interleave"), axis=1),
        helper.make_node("Reshape", [t[4], flat_shape], [t[5]], name=name(f"{base}_flatten")),
    ]
    return _finish_flat(view, enc, t[5], flat[2 * pairs:], w_shape.name, base)


# ---- opset upgrade for UINT4 ----------------------------------------------------------------
# Versions that changed an op's meaning without changing its signature (checked by hand from
# the ONNX changelog); signature changes are found by comparing the schemas.
_SEMANTIC_BREAKS = {"Softmax": 13, "LogSoftmax": 13, "Hardmax": 13, "Resize": 11, "GridSample": 20,
                    "GroupNormalization": 21, "Split": 18}


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


def upgrade_for_uint4(model: onnx.ModelProto, *, check_only: bool = False) -> str:
    """Raise the default opset to 21 and IR to 10 in place when that keeps every op's meaning.

    Returns "" on success (or when nothing was needed), else why the upgrade is unsafe (the
    model is then untouched). `check_only` answers without changing the model.
    """
    old = default_opset(model)
    fixups: list = []
    if old < UINT4_OPSET:
        if len(model.functions):
            return "model has local functions"
        view = GraphView(model.graph)
        reason = _check_graph(model.graph, view, old, fixups)
        if reason:
            return reason
    if check_only:
        return ""
    for fix in fixups:
        fix()
    if old < UINT4_OPSET:
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = UINT4_OPSET
                break
        else:
            model.opset_import.append(helper.make_opsetid("", UINT4_OPSET))
    model.ir_version = max(model.ir_version, UINT4_IR)
    return ""


def _check_graph(graph: onnx.GraphProto, view: GraphView, old: int, fixups: list) -> str:
    for node in graph.node:
        for g in subgraphs(node):
            reason = _check_graph(g, view, old, fixups)
            if reason:
                return reason
        if node.domain not in ("", "ai.onnx"):
            continue
        reason = _check_node(node, view, old, fixups)
        if reason:
            return f"{node.op_type} '{node.name}': {reason}"
    return ""


def _check_node(node: onnx.NodeProto, view: GraphView, old: int, fixups: list) -> str:
    try:
        before = defs.get_schema(node.op_type, old, "")
        after = defs.get_schema(node.op_type, UINT4_OPSET, "")
    except Exception:
        return f"no schema at opset {old}"
    if before.since_version == after.since_version:
        return ""
    if after.deprecated:
        return f"deprecated at opset {after.since_version}"
    used = {a.name for a in node.attribute}
    if node.op_type == "Dropout" and "ratio" in used and len(node.input) < 2:
        used.discard("ratio")  # becomes an input at opset 12: moved there by a fixup
        fixups.append(lambda: _dropout_ratio_to_input(node, view))
    for a in used:
        if a not in after.attributes:
            return f"attribute '{a}' removed after opset {before.since_version}"
    for a, spec in after.attributes.items():
        if spec.required and a not in used:
            return f"attribute '{a}' required at opset {after.since_version}"
    for a, spec in before.attributes.items():
        if a in used or a not in after.attributes:
            continue
        old_default = _default(spec)
        if old_default is not None and old_default != _default(after.attributes[a]):
            fixups.append(lambda node=node, a=a, v=old_default: set_attr(node, a, v))
    for i, spec in enumerate(after.inputs):
        if spec.option == defs.OpSchema.FormalParameterOption.Single and (i >= len(node.input) or not node.input[i]):
            return f"input '{spec.name}' required at opset {after.since_version}"
    variadic_out = after.outputs and after.outputs[-1].option == defs.OpSchema.FormalParameterOption.Variadic
    if not variadic_out and len([o for o in node.output if o]) > len(after.outputs):
        return f"uses outputs removed after opset {before.since_version}"
    since = _SEMANTIC_BREAKS.get(node.op_type)
    if since is not None and old < since <= UINT4_OPSET:
        return _semantic_fix(node, view, fixups)
    return ""


def _semantic_fix(node: onnx.NodeProto, view: GraphView, fixups: list) -> str:
    op = node.op_type
    if op in ("Softmax", "LogSoftmax", "Hardmax"):
        shape = view.shape(node.input[0])
        if shape is None:
            return "input rank unknown (softmax axis semantics changed at opset 13)"
        rank = len(shape)
        axis = attr(node, "axis", 1)
        axis = axis + rank if axis < 0 else axis
        # Before 13 the op ran over the flattened dims [axis:], since 13 over `axis` alone: the
        # same thing when every later dim is 1.
        if any(d != 1 for d in shape[axis + 1:]):
            return "softmax over a non-last axis changed meaning at opset 13"
        fixups.append(lambda: set_attr(node, "axis", axis))
        return ""
    if op == "Split":
        if len(node.input) > 1 and node.input[1]:
            return ""
        outputs = len(node.output)
        fixups.append(lambda: set_attr(node, "num_outputs", outputs))
        return ""
    return f"meaning changed at opset {_SEMANTIC_BREAKS[op]}"


def _dropout_ratio_to_input(node: onnx.NodeProto, view: GraphView) -> None:
    ratio = np.array(attr(node, "ratio", 0.5), dtype=np.float32)
    for i, a in enumerate(node.attribute):
        if a.name == "ratio":
            del node.attribute[i]
            break
    node.input.append(view.add_const(f"{node.name or node.output[0]}_ratio", ratio))


def _default(spec) -> object | None:
    if not spec.default_value.type:
        return None
    return helper.get_attribute_value(spec.default_value)


# ---- reading the pattern back ---------------------------------------------------------------
@dataclass
class ClusteredWeight:
    """A weight stored as codes + codebook, decoded from the graph."""

    name: str  # the tensor the Gather produces (the former weight initializer)
    codebook: np.ndarray  # [K] or [C*K]
    codes: np.ndarray  # the weight's shape, int64 index into the row's codebook
    offsets: np.ndarray | None  # row offsets (per-channel codebooks)
    container: str  # "uint4", "uint8" or "nibbles"
    codes_tensor: str  # name of the initializer holding the codes

    def weights(self) -> np.ndarray:
        idx = self.codes if self.offsets is None else self.codes + self.offsets
        return self.codebook[idx]


def read_clustered(model: onnx.ModelProto) -> dict[str, ClusteredWeight]:
    """Every `Gather(codebook, idx)` of the documented pattern, decoded (keyed by output name)."""
    view = GraphView(model.graph)
    found = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or node.input[0] not in view.initializers or attr(node, "axis", 0) != 0:
            continue
        idx = view.producers.get(node.input[1])
        offsets = None
        if idx is not None and idx.op_type == "Add" and idx.input[1] in view.initializers:
            offsets = view.const(idx.input[1]).astype(np.int64)
            idx = view.producers.get(idx.input[0])
        decoded = _decode_index(idx, view) if idx is not None else None
        if decoded is None:
            continue
        codes, container, tensor = decoded
        found[node.output[0]] = ClusteredWeight(node.output[0], view.const(node.input[0]), codes, offsets,
                                                container, tensor)
    return found


def _decode_index(node: onnx.NodeProto, view: GraphView) -> tuple[np.ndarray, str, str] | None:
    if node.op_type == "Cast" and node.input[0] in view.initializers:
        tensor = view.initializers[node.input[0]]
        kind = {TensorProto.UINT4: "uint4", TensorProto.UINT8: "uint8"}.get(tensor.data_type)
        return (view.const(node.input[0]).astype(np.int64), kind, tensor.name) if kind else None
    if node.op_type != "Reshape" or node.input[1] not in view.initializers:
        return None
    shape = tuple(int(d) for d in view.const(node.input[1]))
    flat = view.producers.get(node.input[0])
    tail = np.zeros(0, dtype=np.int64)
    if flat is not None and flat.op_type == "Concat" and flat.input[1] in view.initializers:
        tail = view.const(flat.input[1]).astype(np.int64).reshape(-1)
        flat = view.producers.get(flat.input[0])
    cast = flat
    for _ in range(16):  # follow first inputs back to the Cast of the packed bytes
        if cast is None or (cast.op_type == "Cast" and cast.input[0] in view.initializers):
            break
        cast = view.producers.get(cast.input[0])
    if cast is None or cast.op_type != "Cast" or cast.input[0] not in view.initializers:
        return None
    packed = view.const(cast.input[0]).astype(np.uint8)
    body = int(np.prod(shape)) - tail.size
    if packed.ndim != 2 or not packed.shape[0]:
        return None
    per_row = body // packed.shape[0]
    if per_row == 2 and packed.shape[1] == 1:
        codes, kind = np.stack([packed[:, 0] & 0x0F, packed[:, 0] >> 4], axis=1).reshape(-1), "nibbles"
    elif per_row == 8:
        codes, kind = unpack_bits(packed, packed.shape[1]), "tight"
    else:
        return None
    codes = np.concatenate([codes.astype(np.int64), tail])
    return codes.reshape(shape), kind, cast.input[0]
