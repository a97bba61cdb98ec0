"""`--fit flash=SIZE --fit ram=SIZE --fit instructions=N`: what a model takes on the device,
measured on the firmware itself.

A microcontroller's budget is the linked firmware: code, kernels, constant tables and weights
in flash; the activation arena, static buffers and the data section in RAM; and the time of one
inference. Estimates from tensor sizes miss the kernels a model pulls in, alignment and libm, and
MACs miss what each kernel spends per MAC, so every plan the allocator verifies is built as
Cortex-M4 firmware (`mps2.footprint`: arm-none-eabi-gcc, gc-sections, minus the same firmware
without the model) and measured with arm-none-eabi-size; with an `instructions` limit it is also
run once on the emulated Cortex-M4 (qemu mps2-an386, `-icount shift=0`: `mps2.count_instructions`)
on the first calibration sample.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from onnxc.errors import UsageError

KINDS = ("flash", "ram", "instructions")
_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2, "MIB": 1024**2}
_COUNTS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3}  # instructions: decimal multiples


def parse_fit(specs: list[str] | tuple[str, ...] | dict | None) -> dict[str, int]:
    """`["flash=256K", "ram=64K", "instructions=4.5M"]` -> {"flash": 262144, "ram": 65536,
    "instructions": 4500000}; bad specs are one usage line."""
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
            raise UsageError(f"--fit expects flash=SIZE, ram=SIZE or instructions=COUNT (e.g. flash=256K, "
                             f"instructions=4.5M), got '{kind}={value}'")
        units = _COUNTS if kind == "instructions" else _UNITS
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in units or int(float(match.group(1)) * units[unit]) <= 0:
            what = ("a positive count, K or M (thousands, millions: e.g. 4.5M)" if kind == "instructions"
                    else "a positive number of bytes, K or M (e.g. 256K)")
            raise UsageError(f"--fit {kind}: must be {what}, got '{value}'")
        out[kind] = int(float(match.group(1)) * units[unit])
    return out


def measure(model: onnx.ModelProto, input_shapes: dict | None, name: str = "net",
            sample: Mapping[str, np.ndarray] | None = None) -> dict[str, int]:
    """Flash and RAM in bytes of `model` as Cortex-M4 firmware (float layers float, QDQ layers int8);
    given one `sample` (an array per graph input), also the instructions of one inference on it."""
    from onnxc.backends.c import compile_model, mps2

    if not mps2.available():
        raise UsageError("--fit measures the firmware: it needs arm-none-eabi-gcc with newlib and qemu-system-arm "
                         "(sh scripts/install-toolchains.sh)")
    gen = compile_model(model, name, input_shapes)
    work = Path(tempfile.mkdtemp(prefix="onnxc-fit-"))
    try:
        gen.write(work)
        prog = gen.prog
        sources = [work / f"{name}.c"] + sorted(work.glob("onnxc_*.c"))
        outs = [prog.size(n) for n in prog.outputs]
        result = mps2.footprint(name, [prog.size(n) for n in prog.inputs], outs, sources, work, include=[work])
        if sample is not None:
            ins = [np.asarray(sample[n], dtype=np.float32).reshape(-1) for n in prog.inputs]
            timed = work / "timed"
            timed.mkdir()
            (timed / "main.c").write_text(mps2.firmware_main([(name, ins, outs)], timed=True))
            elf = mps2.build([timed / "main.c", *sources], timed, include=[work])
            result["instructions"] = mps2.count_instructions(mps2.run_qemu(elf, timeout=900, icount=True))[name]
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Firmware:
    """Footprints of models as firmware, each model built once (keyed by its digest): the
    allocator measures every plan it verifies, and the plan it keeps is checked again after."""

    def __init__(self, input_shapes: dict | None, name: str = "net", sample: Mapping[str, np.ndarray] | None = None):
        """`sample`: one input per graph input, run to count instructions (None: not run)."""
        self.input_shapes, self.name, self.sample = input_shapes, name, sample
        self.built: dict[bytes, dict[str, int]] = {}

    def __call__(self, model: onnx.ModelProto) -> dict[str, int]:
        from onnxc.compiler.model import fingerprint

        key = fingerprint(model)
        if key not in self.built:
            self.built[key] = measure(model, self.input_shapes, self.name, self.sample)
        return self.built[key]


def over(footprint: dict[str, int], limits: dict[str, int]) -> float:
    """How far a footprint is from fitting: the largest footprint / limit over the limits (<= 1 fits)."""
    return max(footprint[k] / limits[k] for k in limits)


def describe(footprint: dict[str, int], limits: dict[str, int]) -> str:
    return ", ".join(f"{k} {footprint[k]:,}{'' if k == 'instructions' else ' B'} of {limits[k]:,}" for k in limits)


def binding(footprint: dict[str, int], limits: dict[str, int]) -> str:
    """The limit the footprint is furthest from (the one a plan must shrink most)."""
    return max(limits, key=lambda k: footprint[k] / limits[k])
