"""Constant arrays as C source: exact and compact.

Floats are written as their IEEE-754 bit patterns (`0x3e4ccccd`, zero as `0`) through a union
with a float view, which is exact by construction (no decimal round trip) and shorter than hex
float literals; int32 tables, int8 weights and uint8 codes are written in decimal. Everything is
`static const`, so it goes to .rodata (flash on a microcontroller); byte arrays start on a word
(kernels read their weights a word or two at a time).
"""

from __future__ import annotations

from onnxc.backends.c.program import ConstArray

PER_LINE = 12


def _lines(tokens: list[str]) -> str:
    return ",\n".join("    " + ",".join(tokens[i:i + PER_LINE]) for i in range(0, len(tokens), PER_LINE))


def array_definition(const: ConstArray) -> str:
    a = const.array.reshape(-1)
    n = max(a.size, 1)  # C has no empty arrays
    if a.dtype.kind == "f":
        bits = a.astype("<f4").view("<u4").tolist() or [0]
        body = _lines([hex(v) if v else "0" for v in bits])
        return (f"static const union {{ uint32_t u[{n}]; float f[{n}]; }} {const.cname} = {{{{\n{body}\n}}}};")
    ctype = {"i4": "int32_t", "i1": "int8_t", "u1": "uint8_t"}.get(f"{a.dtype.kind}{a.dtype.itemsize}")
    if ctype is None:
        raise ValueError(f"unexpected constant dtype {a.dtype}")
    body = _lines([str(v) for v in (a.tolist() or [0])])
    align = " ONNXC_WORD_ALIGNED" if a.dtype.itemsize == 1 else ""  # (onnxc_kernels.h)
    return f"static const {ctype} {const.cname}[{n}]{align} = {{\n{body}\n}};"


def weight_bytes(consts: dict[str, ConstArray]) -> int:
    return int(sum(c.nbytes for c in consts.values()))

