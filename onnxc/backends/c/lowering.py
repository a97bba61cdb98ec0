"""Lower a static canonical model to a `Program` of kernel calls.

The driver walks the nodes in the model's order, fuses an elementwise activation into the
Conv / Gemm / MatMul / binary op that feeds it (the kernel applies it to each output plane while
it is in registers or cache-free SRAM), and hands each node to the handler registered for its op
type in `HANDLERS` (modules `lower_nn`, `lower_elementwise`, `lower_layout`). A node nobody
handles stops the export with one line naming the op and the node.

Constants are collected here: float tensors become flash arrays (deduplicated by content),
weights of Conv/Gemm/MatMul become `onnxc_weight`s, dense or clustered (codes + codebook kept).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto

from onnxc.backends.c.prepare import Clustered
from onnxc.backends.c.program import (
    CONST,
    LIT,
    PARAMS,
    WEIGHT,
    Arg,
    Call,
    ConstArray,
    Params,
    Program,
    Step,
    WeightRef,
    c_literal,
)
from onnxc.backends.c.qcodes import pack_nibbles
from onnxc.compiler.graph import GraphView, attr
from onnxc.errors import OnnxcError

Handler = Callable[["Lowerer", onnx.NodeProto], None]
HANDLERS: dict[str, Handler] = {}

# Which kernel file defines each kernel function (only the files used are written out).
KERNEL_FILES = {
    "onnxc_unary": "onnxc_eltwise.c", "onnxc_binary": "onnxc_eltwise.c",
    "onnxc_conv2d": "onnxc_conv.c",
    "onnxc_conv1x1_inplace": "onnxc_conv.c", "onnxc_conv_transpose2d": "onnxc_conv.c",
    "onnxc_conv1x1": "onnxc_pointwise.c", "onnxc_conv1x1_tiled_inplace": "onnxc_pointwise.c",
    "onnxc_depthwise_inplace": "onnxc_pointwise.c", "onnxc_lstm": "onnxc_rnn.c", "onnxc_gru": "onnxc_rnn.c",
    "onnxc_dense": "onnxc_dense.c", "onnxc_matmul": "onnxc_dense.c",
    "onnxc_pool": "onnxc_pool.c", "onnxc_global_pool": "onnxc_pool.c",
    "onnxc_softmax": "onnxc_norm.c", "onnxc_channel_affine": "onnxc_norm.c", "onnxc_lrn": "onnxc_norm.c",
    "onnxc_copy": "onnxc_layout.c", "onnxc_copy2d": "onnxc_layout.c", "onnxc_strided_copy": "onnxc_layout.c",
    "onnxc_gather_copy": "onnxc_layout.c", "onnxc_resize": "onnxc_resize.c",
    "onnxc_unary_math": "onnxc_math.c", "onnxc_reduce": "onnxc_reduce.c",
}
# Activations compute kernels apply themselves (ONNXC_OP_RELU, _CLIP, _LEAKY_RELU).
INLINE_ACTS = {1, 2, 3}
# Ops whose output an activation may be fused into, by ONNX op.
FUSABLE = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Sum"}


def text_attr(node: onnx.NodeProto, name: str, default: str) -> str:
    """A string attribute as text (onnx hands STRING attributes back as bytes)."""
    value = attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


def handles(*ops: str) -> Callable[[Handler], Handler]:
    def wrap(fn: Handler) -> Handler:
        for op in ops:
            HANDLERS[op] = fn
        return fn

    return wrap


class Lowerer:
    """Lowering state for one model: graph indexes, the program being built, naming."""

    def __init__(self, model: onnx.ModelProto, clustered: dict[str, Clustered], name: str):
        self.model = model
        self.view = GraphView(model.graph)
        self.clustered = clustered
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.skip = {n for c in clustered.values() for n in c.nodes}
        inputs = [v.name for v in model.graph.input if v.name not in self.view.initializers]
        outputs = [v.name for v in model.graph.output]
        self.prog = Program(name=name, inputs=inputs, outputs=outputs, shapes={})
        self.rename: dict[str, str] = {}           # fused producer output -> activation output
        self.acts: dict[str, tuple[int, float, float]] = {}  # producer output -> activation
        self.absorbed: set[str] = set()            # first outputs of fused activation nodes
        self.acts_op: dict[str, str] = {}          # producer output -> fused activation op type
        self._const_hash: dict[tuple, str] = {}
        self._names: Counter[str] = Counter()
        self.special: dict[str, Handler] = {}      # node (first output) -> handler other than its op's (int8)
        self.node: onnx.NodeProto | None = None    # the node being lowered (for error messages)

    # ---- driver ---------------------------------------------------------------------------
    def run(self) -> Program:
        from onnxc.backends.c import (  # noqa: F401  (register)
            lower_elementwise,
            lower_layout,
            lower_nn,
            lower_quant,
            lower_rnn,
        )

        lower_quant.plan(self)
        for name in self.prog.inputs + self.prog.outputs:
            self.prog.shapes[name] = self.shape(name)
        for name in self.prog.inputs:
            self.check_float(name, None)
            if name in self.prog.outputs:
                raise OnnxcError(f"C backend: graph output '{name}' is a graph input; nothing to compute")
        self._plan_fusion()
        for node in self.model.graph.node:
            if node.output[0] in self.skip or node.output[0] in self.absorbed:
                continue
            handler = self.special.get(node.output[0]) or HANDLERS.get(node.op_type)
            if node.domain not in ("", "ai.onnx") or handler is None:
                raise self.unsupported(node)
            self.prog.source_ops[node.op_type] = self.prog.source_ops.get(node.op_type, 0) + 1
            self.node = node
            handler(self, node)
        self.node = None
        for out in self.prog.outputs:
            if out in self.view.initializers:  # an output computed entirely at export time
                self.prog.shapes[out] = self.shape(out)
                self.step(None, "Constant", [], [out], [Call("onnxc_copy", [self.ref(out), Arg.t(out),
                                                                             self.lit(self.size(out))])])
        return self.prog

    def _plan_fusion(self) -> None:
        from onnxc.backends.c.lower_elementwise import unary_spec

        for node in self.model.graph.node:
            spec = unary_spec(self, node)
            if spec is None or len(node.input) < 1:
                continue
            src = node.input[0]
            producer = self.view.producers.get(src)
            if producer is None or producer.op_type not in FUSABLE or producer.output[0] in self.acts:
                continue
            if producer.output[0] != src or producer.output[0] in self.skip or src in self.special:
                continue
            if len(self.view.consumers.get(src, [])) != 1 or src in self.view.graph_outputs:
                continue
            if producer.op_type == "Sum" and len([i for i in producer.input if i]) == 1:
                continue  # lowered as a view: nothing to fuse into
            self.acts[src] = spec
            self.acts_op[src] = node.op_type
            self.rename[src] = node.output[0]
            self.absorbed.add(node.output[0])

    # ---- errors ---------------------------------------------------------------------------
    def unsupported(self, node: onnx.NodeProto, why: str | None = None) -> OnnxcError:
        label = node.name or node.output[0]
        what = f"{node.op_type} ({why})" if why else node.op_type
        return OnnxcError(f"C backend: unsupported op {what} in node '{label}'")

    # ---- tensors --------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        const = self.view.initializers.get(name)
        if const is not None:
            return tuple(int(d) for d in const.dims)
        shape = self.view.shape(name)
        if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
            producer = self.view.producers.get(name)
            where = f" (output of node '{producer.name or name}', {producer.op_type})" if producer else ""
            raise OnnxcError(f"C backend: tensor '{name}'{where} has no static shape {shape}; "
                             "fix the input shapes with --input-shape")
        return tuple(shape)

    def size(self, name: str) -> int:
        return int(np.prod(self.shape(name), dtype=np.int64))

    def const(self, name: str) -> np.ndarray | None:
        return self.view.const(name) if name else None

    def is_const(self, name: str) -> bool:
        return name in self.view.initializers or name in self.clustered

    def out(self, node: onnx.NodeProto, i: int = 0) -> str:
        name = node.output[i] if i < len(node.output) else ""
        return self.rename.get(name, name)

    def act(self, node: onnx.NodeProto) -> dict:
        """The kernel-fused activation of `node` (ReLU, Clip, LeakyReLU), as param fields."""
        code, a, b = self.acts.get(node.output[0], (0, 0.0, 0.0))
        if code not in INLINE_ACTS:
            code, a, b = 0, 0.0, 0.0
        return {"act": code, "act_a": a, "act_b": b}

    def post_act(self, node: onnx.NodeProto) -> list[Call]:
        """Other fused activations: one in-place unary call on the output after the kernel."""
        out = node.output[0]
        if out not in self.acts or self.acts[out][0] in INLINE_ACTS:
            return []
        from onnxc.backends.c.lower_elementwise import unary_call

        y = self.rename[out]
        return [unary_call(self, Arg.t(y), y, self.acts[out])]

    def check_float(self, name: str, node: onnx.NodeProto | None) -> None:
        if name in self.prog.dtypes:  # an integer tensor an int8 handler declared
            return
        dtype = self.view.dtype(name)
        if dtype not in (None, TensorProto.FLOAT):
            where = f" in node '{node.name or node.output[0]}' ({node.op_type})" if node is not None else ""
            raise OnnxcError(f"C backend: tensor '{name}'{where} is {TensorProto.DataType.Name(dtype)}; "
                             "only float32 tensors are supported at run time")

    # ---- constants ------------------------------------------------------------------------
    def cname(self, base: str) -> str:
        base = re.sub(r"\W", "_", base)[:40].strip("_") or "t"
        self._names[base] += 1
        n = self._names[base]
        return f"{self.prog.name}_{base}" + (f"_{n}" if n > 1 else "")

    def const_array(self, array: np.ndarray, hint: str) -> str:
        """A flash array holding `array` (float32, int32 or uint8), shared between equal contents."""
        array = np.ascontiguousarray(array)
        key = (array.dtype.str, hashlib.sha1(array.tobytes()).hexdigest(), array.size)
        if key not in self._const_hash:
            cname = self.cname(f"c_{hint}")
            self.prog.consts[cname] = ConstArray(cname, array)
            self._const_hash[key] = cname
        return self._const_hash[key]

    def ref(self, name: str) -> Arg:
        """An argument for a kernel input: a run-time tensor or a float flash array."""
        if not self.is_const(name):
            return Arg.t(name)
        if name not in self.prog.const_of:
            cl = self.clustered.get(name)
            value = self.const(name) if cl is None else cl.dense()
            if value.dtype != np.float32:
                node = self.node
                where = f" read by node '{node.name or node.output[0]}' ({node.op_type})" if node is not None else ""
                raise OnnxcError(f"C backend: tensor '{name}'{where} is {value.dtype} (constant) and that node is "
                                 "computed from data at run time; only float32 data is supported there")
            self.prog.const_of[name] = self.const_array(value.reshape(-1), name)
        return Arg(CONST, self.prog.const_of[name])

    def float_const(self, array: np.ndarray, hint: str) -> Arg:
        return Arg(CONST, self.const_array(np.asarray(array, dtype=np.float32).reshape(-1), hint))

    def int_table(self, values, hint: str) -> str:
        return self.const_array(np.asarray(values, dtype=np.int32).reshape(-1), hint)

    def weight(self, name: str, rows_first: Callable[[np.ndarray], np.ndarray], scale: float = 1.0) -> Arg:
        """A Conv/Gemm/MatMul weight laid out [rows][...] by `rows_first` (a transpose/reshape of
        the ONNX array). Clustered weights keep their codes when the codebook rows follow the
        output rows; otherwise they are expanded here to a dense flash array."""
        cl = self.clustered.get(name)
        if cl is not None:
            ref = self._clustered_weight(cl, rows_first, scale)
            if ref is not None:
                return ref
            dense = cl.dense()
        else:
            dense = self.const(name)
            if dense is None:
                raise OnnxcError(f"C backend: weight '{name}' is computed at run time; only constant weights "
                                 "are supported")
            if dense.dtype != np.float32:
                raise OnnxcError(f"C backend: weight '{name}' is {dense.dtype}; only float32 is supported")
        w = rows_first(dense)
        if scale != 1.0:
            w = (w * np.float32(scale)).astype(np.float32)
        cname = self.cname(f"w_{name}")
        self.prog.weights[cname] = WeightRef(cname, dense=self.const_array(w.reshape(-1), name))
        return Arg(WEIGHT, cname)

    def _clustered_weight(self, cl: Clustered, rows_first, scale: float) -> Arg | None:
        codes = rows_first(cl.codes)
        row_base = None
        if cl.row_offsets is not None:
            full = rows_first(np.broadcast_to(cl.row_offsets, cl.codes.shape))
            rows = full.reshape(full.shape[0], -1)
            if not (rows == rows[:, :1]).all():
                return None  # codebooks do not follow output rows: expand
            row_base = self.int_table(rows[:, 0], f"{cl.name}_rows")
        flat = codes.reshape(-1).astype(np.uint8)
        packed = pack_nibbles(flat) if cl.bits == 4 else flat
        codebook = cl.codebook if scale == 1.0 else (cl.codebook * np.float32(scale)).astype(np.float32)
        cname = self.cname(f"w_{cl.name}")
        self.prog.weights[cname] = WeightRef(
            cname, codes=self.const_array(packed, f"{cl.name}_codes"),
            codebook=self.const_array(codebook.astype(np.float32), f"{cl.name}_codebook"),
            row_base=row_base, bits=cl.bits)
        return Arg(WEIGHT, cname)

    def weight_shape(self, name: str) -> tuple[int, ...]:
        cl = self.clustered.get(name)
        return tuple(cl.codes.shape) if cl is not None else self.shape(name)

    def params(self, struct: str, fields: dict, hint: str) -> Arg:
        cname = self.cname(f"p_{hint}")
        self.prog.params[cname] = Params(cname, struct, list(fields.items()))
        return Arg(PARAMS, cname)

    @staticmethod
    def lit(value) -> Arg:
        return Arg(LIT, c_literal(value))

    # ---- steps ----------------------------------------------------------------------------
    def step(self, node: onnx.NodeProto | None, op: str, inputs: list[str], outputs: list[str],
             calls: list[Call], **kw) -> Step:
        runtime_in = [i for i in inputs if i and not self.is_const(i)]
        if node is not None:
            for name in runtime_in + outputs:
                self.check_float(name, node)
        for name in runtime_in + outputs:
            if name not in self.prog.shapes:
                self.prog.shapes[name] = self.shape(name)
        label = (node.name or node.output[0]) if node is not None else outputs[0]
        if node is not None and node.output[0] in self.acts:
            post = self.post_act(node)
            calls = calls + post
            if kw.get("inplace_calls") is not None:
                kw["inplace_calls"] = kw["inplace_calls"] + post
        fused = [self.acts_op[o] for o in (node.output if node is not None else []) if o in self.acts_op]
        st = Step(label, op, runtime_in, outputs, calls, fused=fused, **kw)
        for call in calls + (st.inplace_calls or []):
            self.prog.kernel_files.add(KERNEL_FILES[call.fn])
        self.prog.steps.append(st)
        return st

    def view_step(self, node: onnx.NodeProto, src: str, dst: str, offset: int = 0) -> None:
        """`dst` is `src` seen from element `offset` (no code), or a copy when it cannot share storage."""
        n = self.size(dst)
        if dst in self.view.graph_outputs or self.is_const(src):
            ref = self.ref(src)
            ref = Arg(ref.kind, ref.value, offset)
            self.step(node, node.op_type, [src], [dst], [Call("onnxc_copy", [ref, Arg.t(dst), self.lit(n)])])
            return
        self.step(node, node.op_type, [src], [dst], [], view=(0, offset))


def lower(model: onnx.ModelProto, clustered: dict[str, Clustered], name: str) -> Program:
    return Lowerer(model, clustered, name).run()


def broadcast_strides(shape: tuple[int, ...], out: tuple[int, ...]) -> list[int]:
    """Element strides of a tensor of `shape` read at the indices of `out` (numpy broadcasting)."""
    shape = (1,) * (len(out) - len(shape)) + tuple(shape)
    strides, acc = [0] * len(out), 1
    for d in range(len(out) - 1, -1, -1):
        strides[d] = 0 if shape[d] == 1 and out[d] != 1 else acc
        acc *= shape[d]
    return strides


def collapse(dims: list[int], strides: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Merge adjacent dims that every operand walks contiguously (or broadcasts over together)."""
    keep = [d for d in range(len(dims)) if dims[d] != 1]
    dims = [dims[d] for d in keep] or [1]
    strides = [[s[d] for d in keep] or [0] for s in strides]
    out_dims, out_strides = [dims[0]], [[s[0]] for s in strides]
    for d in range(1, len(dims)):
        if all(s[d - 1] == s[d] * dims[d] for s in strides):
            out_dims[-1] *= dims[d]
            for os, s in zip(out_strides, strides):
                os[-1] = s[d]
        else:
            out_dims.append(dims[d])
            for os, s in zip(out_strides, strides):
                os.append(s[d])
    return out_dims, out_strides
