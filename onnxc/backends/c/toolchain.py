"""Compile and run generated C on the host (gcc, valgrind), for tests and benchmarks.

`harness` writes a `main.c` that links one or more generated models: `./prog K` runs model K,
reading its inputs from stdin and writing its outputs to stdout as raw little-endian float32.
The generated code itself never does I/O; only this test harness does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STRICT = ["-std=c99", "-Wall", "-Wextra", "-Werror"]
# numpy dtype of each C element type a generated entry point reads or writes.
NUMPY_TYPES = {"float": "<f4", "int8_t": "i1", "uint8_t": "u1", "int32_t": "<i4"}


class ToolError(RuntimeError):
    pass


@dataclass
class HarnessModel:
    """What the harness needs to know of a generated model."""

    name: str
    input_sizes: list[int]
    output_sizes: list[int]
    input_types: list[str] | None = None   # C element types (None: all float)
    output_types: list[str] | None = None

    def types(self) -> list[str]:
        return ((self.input_types or ["float"] * len(self.input_sizes))
                + (self.output_types or ["float"] * len(self.output_sizes)))


def host_cc() -> str:
    return os.environ.get("CC", "gcc")


def run(cmd: list[str], *, cwd: Path | None = None, input: bytes | None = None, timeout: float = 600) -> bytes:
    try:
        proc = subprocess.run(cmd, cwd=cwd, input=input, capture_output=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise ToolError(f"{cmd[0]} not found ({exc})") from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")[-4000:]
        raise ToolError(f"{' '.join(map(str, cmd[:6]))} ... failed ({proc.returncode}):\n{err}")
    return proc.stdout


def harness(models: list[HarnessModel]) -> str:
    """C source of a main() that dispatches to the models' NAME_run on argv[1], once per sample
    on stdin."""
    lines = ["#include <stdint.h>", "#include <stdio.h>", "#include <stdlib.h>"]
    lines += [f'#include "{m.name}.h"' for m in models]
    layouts = [_io_layout(m) for m in models]
    total = max([words for _, words in layouts] + [1])
    lines += [f"static float io_buf[{total}];", "",
              "static int read_bytes(void *p, long n) { return fread(p, 1, (size_t)n, stdin) == (size_t)n || n == 0; }",
              "static void write_bytes(const void *p, long n) { fwrite(p, 1, (size_t)n, stdout); }",
              "", "int main(int argc, char **argv)", "{",
              "    int k = argc > 1 ? atoi(argv[1]) : 0;", "    long n;", "    float *p = io_buf;", "    switch (k) {"]
    for i, (m, (offsets, _)) in enumerate(zip(models, layouts)):
        types, sizes = m.types(), m.input_sizes + m.output_sizes
        ptrs = [f"p + {off}" if t == "float" else f"({t} *)(p + {off})" for t, off in zip(types, offsets)]
        nbytes = [n * np.dtype(NUMPY_TYPES[t]).itemsize for t, n in zip(types, sizes)]
        lines.append(f"    case {i}:")
        lines.append("        for (n = 0;; n++) { /* one sample after another, until the input ends */")
        for k in range(len(m.input_sizes)):
            lines.append(f"            if (!read_bytes(p + {offsets[k]}, {nbytes[k]})) return n > 0 ? 0 : 2;")
        lines.append(f"            if ({m.name}_run({', '.join(ptrs)}) != 0) return 3;")
        for k in range(len(m.input_sizes), len(sizes)):
            lines.append(f"            write_bytes(p + {offsets[k]}, {nbytes[k]});")
        # inputs of no bytes at all (no inputs, or only empty tensors): one run, not an endless loop
        lines += ["            return 0;"] if not sum(nbytes[:len(m.input_sizes)]) else []
        lines.append("        }")
    lines += ["    default: return 1;", "    }", "}", ""]
    return "\n".join(lines)


def _io_layout(m: HarnessModel) -> tuple[list[int], int]:
    """Offsets (in floats, so every buffer is aligned) of each input and output, and the total."""
    offsets, off = [], 0
    for t, n in zip(m.types(), m.input_sizes + m.output_sizes):
        offsets.append(off)
        off += -(-n * np.dtype(NUMPY_TYPES[t]).itemsize // 4)
    return offsets, off


def build_host(sources: list[Path], exe: Path, *, opt: str = "-O1", include: list[Path] = (),
               extra: list[str] = ()) -> Path:
    cmd = [host_cc(), *STRICT, opt, *[f"-I{d}" for d in include], *map(str, sources), "-o", str(exe), "-lm",
           *extra]
    run(cmd)
    return exe


def run_host(exe: Path, index: int, inputs: list[np.ndarray], output_sizes: list[int],
             timeout: float = 120, input_types: list[str] | None = None,
             output_types: list[str] | None = None) -> list[np.ndarray]:
    """Run model `index` of a harness program: inputs and outputs as the given C types (float)."""
    in_types = input_types or ["float"] * len(inputs)
    out_types = [np.dtype(NUMPY_TYPES[t]) for t in (output_types or ["float"] * len(output_sizes))]
    data = b"".join(np.ascontiguousarray(x, dtype=NUMPY_TYPES[t]).tobytes() for x, t in zip(inputs, in_types))
    raw = run([str(exe), str(index)], input=data, timeout=timeout)
    expected = sum(n * t.itemsize for n, t in zip(output_sizes, out_types))
    if len(raw) != expected:
        raise ToolError(f"{exe.name} {index}: expected {expected} output bytes, got {len(raw)}")
    outs, off = [], 0
    for n, t in zip(output_sizes, out_types):
        outs.append(np.frombuffer(raw, dtype=t, count=n, offset=off).copy())
        off += n * t.itemsize
    return outs


def callgrind_instructions(exe: Path, index: int, inputs: list[np.ndarray], function: str,
                           workdir: Path) -> int:
    """Instructions executed inside `function` (and its callees), counted by callgrind."""
    if shutil.which("valgrind") is None:
        raise ToolError("valgrind not found")
    out_file = workdir / "callgrind.out"
    data = b"".join(np.ascontiguousarray(x, dtype="<f4").tobytes() for x in inputs)
    proc = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}",
                           f"--toggle-collect={function}", str(exe), str(index)],
                          input=data, capture_output=True, timeout=1800)
    if proc.returncode != 0:
        raise ToolError(proc.stderr.decode(errors="replace")[-2000:])
    text = proc.stderr.decode(errors="replace")
    m = re.search(r"Collected\s*:\s*(\d+)", text)
    if not m:
        raise ToolError(f"no callgrind total in:\n{text[-1000:]}")
    return int(m.group(1))


def build_generated(gens: list, workdir: Path, *, opt: str = "-O1") -> Path:
    """Write GeneratedModels (distinct names) into `workdir` and build one host program for them."""
    workdir.mkdir(parents=True, exist_ok=True)
    for gen in gens:
        gen.write(workdir)
    models = [harness_model(g.prog) for g in gens]
    (workdir / "main.c").write_text(harness(models))
    sources = [workdir / "main.c"] + [workdir / f"{g.prog.name}.c" for g in gens]
    sources += sorted(p for p in workdir.glob("onnxc_*.c"))
    return build_host(sources, workdir / "prog", opt=opt, include=[workdir])


def harness_model(prog) -> HarnessModel:
    return HarnessModel(prog.name, [prog.size(n) for n in prog.inputs], [prog.size(n) for n in prog.outputs],
                        [prog.ctype(n) for n in prog.inputs], [prog.ctype(n) for n in prog.outputs])


def run_samples(exe: Path, index: int, gen, feeds: dict[str, np.ndarray], timeout: float = 300) -> dict[str,
                                                                                                     np.ndarray]:
    """Run model `index` once per sample (axis 0 of every feed) in one process; outputs stacked."""
    prog = gen.prog
    count = len(feeds[prog.inputs[0]])
    types = [prog.ctype(n) for n in prog.inputs]
    data = b"".join(np.ascontiguousarray(feeds[n][i], dtype=NUMPY_TYPES[t]).tobytes()
                    for i in range(count) for n, t in zip(prog.inputs, types))
    raw = run([str(exe), str(index)], input=data, timeout=timeout)
    out_types = [np.dtype(NUMPY_TYPES[prog.ctype(n)]) for n in prog.outputs]
    per = [prog.size(n) * t.itemsize for n, t in zip(prog.outputs, out_types)]
    if len(raw) != count * sum(per):
        raise ToolError(f"{exe.name} {index}: expected {count * sum(per)} output bytes, got {len(raw)}")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(count, sum(per))
    outs, off = {}, 0
    for n, t, size in zip(prog.outputs, out_types, per):
        outs[n] = rows[:, off:off + size].copy().view(t).reshape((count,) + tuple(prog.shapes[n][1:]))
        off += size
    return outs


def run_generated(exe: Path, index: int, gen, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run model `index` of a `build_generated` program on named inputs; outputs by name, shaped."""
    prog = gen.prog
    outs = run_host(exe, index, [feeds[n] for n in prog.inputs], [prog.size(n) for n in prog.outputs],
                    input_types=[prog.ctype(n) for n in prog.inputs],
                    output_types=[prog.ctype(n) for n in prog.outputs])
    return {n: o.reshape(prog.shapes[n]) for n, o in zip(prog.outputs, outs)}


def max_rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref|: the error relative to the output's scale."""
    ref = np.asarray(ref, dtype=np.float64)
    scale = float(np.abs(ref).max()) or 1.0
    return float(np.abs(np.asarray(got, dtype=np.float64) - ref).max() / scale)
