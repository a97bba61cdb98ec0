"""The lowered program: kernel calls over named tensors, constants and parameter structs.

Lowering produces it, the planner gives every run-time tensor a place (graph input or output
pointer, or an offset in the arena), and the emitter prints it. Keeping the three apart is what
lets the planner reason about lifetimes, views and in-place execution without knowing any op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Bytes per element of each run-time tensor type (C type names; float unless Program.dtypes says).
ELEM_BYTES = {"float": 4, "int8_t": 1, "uint8_t": 1, "int32_t": 4}

# Argument kinds of a kernel call.
TENSOR, CONST, WEIGHT, PARAMS, SCRATCH, LIT = "tensor", "const", "weight", "params", "scratch", "lit"


@dataclass(frozen=True)
class Arg:
    kind: str
    value: str = ""
    offset: int = 0  # elements added to a tensor or const pointer

    @staticmethod
    def t(name: str, offset: int = 0) -> Arg:
        return Arg(TENSOR, name, offset)


@dataclass
class Call:
    fn: str
    args: list[Arg]


@dataclass
class Step:
    """One ONNX node (after fusion) as kernel calls.

    `view=(i, offset)`: the output is input i seen from element `offset` (Reshape, Squeeze,
    contiguous Split/Slice): no code, the planner shares the storage. `inplace`: the input
    index whose storage the output may take when that input dies here, with the calls (and
    scratch, in 4-byte words) to use then; None for the same calls as out-of-place.
    """

    node: str
    op: str
    inputs: list[str]
    outputs: list[str]
    calls: list[Call] = field(default_factory=list)
    view: tuple[int, int] | None = None
    inplace: int | None = None
    inplace_calls: list[Call] | None = None
    inplace_scratch: int = 0
    scratch: int = 0  # scratch (4-byte words) the out-of-place calls use
    fused: list[str] = field(default_factory=list)
    # Concat along a contiguous axis: (input, element offset in the output, index of its copy call).
    # The planner may let the producer of such an input write straight into the output instead.
    pieces: list[tuple[str, int, int]] | None = None


@dataclass
class ConstArray:
    cname: str
    array: np.ndarray  # float32, int32 or uint8, already in the layout the kernel reads

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


@dataclass
class WeightRef:
    """An `onnxc_weight`: a dense float array, or packed codes plus codebook (+ row bases)."""

    cname: str
    dense: str | None = None
    codes: str | None = None
    codebook: str | None = None
    row_base: str | None = None
    bits: int = 0


@dataclass
class Params:
    cname: str
    struct: str
    fields: list[tuple[str, object]]  # values: int, float, str (a C expression) or list of those


@dataclass
class Int8Entry:
    """`NAME_run_int8`: the program without its steps up to `first` (quantizing the float input
    into `input`, after views of it) and its last (dequantizing `output` into the float output)."""

    first: int
    input: str
    output: str
    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int


@dataclass
class Program:
    name: str
    inputs: list[str]
    outputs: list[str]
    shapes: dict[str, tuple[int, ...]]
    steps: list[Step] = field(default_factory=list)
    consts: dict[str, ConstArray] = field(default_factory=dict)
    weights: dict[str, WeightRef] = field(default_factory=dict)
    params: dict[str, Params] = field(default_factory=dict)
    const_of: dict[str, str] = field(default_factory=dict)  # ONNX initializer name -> cname
    kernel_files: set[str] = field(default_factory=set)
    source_ops: dict[str, int] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)  # run-time tensor -> C type, when not float
    qparams: dict[str, tuple[float, int]] = field(default_factory=dict)  # int8 tensor -> (scale, zero point)
    coded_int8: list[str] = field(default_factory=list)  # int8 layers whose weights are 4-bit codes (qcodes)
    entry_int8: Int8Entry | None = None
    pinned: dict[str, int | float] = field(default_factory=dict)  # inputs fixed at export (branch selectors)

    def size(self, tensor: str) -> int:
        return int(np.prod(self.shapes[tensor], dtype=np.int64))

    def ctype(self, tensor: str) -> str:
        return self.dtypes.get(tensor, "float")

    def nbytes(self, tensor: str) -> int:
        return self.size(tensor) * ELEM_BYTES[self.ctype(tensor)]

    def runtime_tensors(self) -> list[str]:
        seen: dict[str, None] = dict.fromkeys(self.inputs)
        for step in self.steps:
            for name in step.inputs + step.outputs:
                if name not in self.const_of:
                    seen.setdefault(name)
        return list(seen)


def c_float(value: float) -> str:
    """An exact C float literal (hex float of the float32 value; INFINITY/NAN from math.h)."""
    v = float(np.float32(value))
    if np.isnan(v):
        return "NAN"
    if np.isinf(v):
        return "INFINITY" if v > 0 else "-INFINITY"
    if v == 0.0:
        return "-0.0f" if np.signbit(v) else "0.0f"
    text = v.hex()  # e.g. 0x1.99999a0000000p-4
    mant, exp = text.split("p")
    if "." in mant:
        mant = mant.rstrip("0").rstrip(".")
    return f"{mant}p{exp}f"


def c_literal(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return c_float(float(value))
