"""`--fit flash=SIZE --fit ram=SIZE`: what a model takes on the device, measured by linking it.

A microcontroller's budget is the linked firmware: code, kernels, constant tables and weights
in flash; the activation arena, static buffers and the data section in RAM. Estimates from
tensor sizes miss the kernels a model pulls in, alignment and libm, so every plan the allocator
verifies is built as Cortex-M4 firmware (`mps2.footprint`: arm-none-eabi-gcc, gc-sections,
minus the same firmware without the model) and measured with arm-none-eabi-size.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import onnx

from onnxc.errors import UsageError

KINDS = ("flash", "ram")
_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2, "MIB": 1024**2}


def parse_fit(specs: list[str] | tuple[str, ...] | dict | None) -> dict[str, int]:
    """`["flash=256K", "ram=64K"]` -> {"flash": 262144, "ram": 65536}; bad specs are one usage line."""
    if not specs:
        return {}
    if isinstance(specs, dict):
        items = [(str(k), str(v)) for k, v in specs.items()]
    else:
        items = [tuple(s.split("=", 1)) if "=" in s else (s, "") for s in specs]
    out = {}
    for kind, value in items:
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise UsageError(f"--fit expects flash=SIZE or ram=SIZE (e.g. flash=256K), got '{kind}={value}'")
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
            raise UsageError(f"--fit {kind}: size must be a positive number of bytes, K or M (e.g. 256K), "
                             f"got '{value}'")
        out[kind] = int(float(match.group(1)) * _UNITS[unit])
    return out


def measure(model: onnx.ModelProto, input_shapes: dict | None, name: str = "net") -> dict[str, int]:
    """Flash and RAM in bytes of `model` as Cortex-M4 firmware (float layers float, QDQ layers int8)."""
    from onnxc.backends.c import compile_model, mps2

    if not mps2.available():
        raise UsageError("--fit measures the linked firmware: it needs arm-none-eabi-gcc with newlib "
                         "(sh scripts/install-toolchains.sh)")
    gen = compile_model(model, name, input_shapes)
    work = Path(tempfile.mkdtemp(prefix="onnxc-fit-"))
    try:
        gen.write(work)
        prog = gen.prog
        sources = [work / f"{name}.c"] + sorted(work.glob("onnxc_*.c"))
        return mps2.footprint(name, [prog.size(n) for n in prog.inputs], [prog.size(n) for n in prog.outputs],
                              sources, work, include=[work])
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Firmware:
    """Footprints of models as firmware, each model built once (keyed by its digest): the
    allocator measures every plan it verifies, and the plan it keeps is checked again after."""

    def __init__(self, input_shapes: dict | None, name: str = "net"):
        self.input_shapes, self.name = input_shapes, name
        self.built: dict[bytes, dict[str, int]] = {}

    def __call__(self, model: onnx.ModelProto) -> dict[str, int]:
        from onnxc.compiler.model import fingerprint

        key = fingerprint(model)
        if key not in self.built:
            self.built[key] = measure(model, self.input_shapes, self.name)
        return self.built[key]


def over(footprint: dict[str, int], limits: dict[str, int]) -> float:
    """How far a footprint is from fitting: the largest footprint / limit over the limits (<= 1 fits)."""
    return max(footprint[k] / limits[k] for k in limits)


def describe(footprint: dict[str, int], limits: dict[str, int]) -> str:
    return ", ".join(f"{k} {footprint[k]:,} B of {limits[k]:,}" for k in limits)
