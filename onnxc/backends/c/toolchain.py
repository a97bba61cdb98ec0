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


class ToolError(RuntimeError):
    pass


@dataclass
class HarnessModel:
    """What the harness needs to know of a generated model."""

    name: str
    input_sizes: list[int]
    output_sizes: list[int]


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
    """C source of a main() that dispatches to the models' NAME_run on argv[1]."""
    lines = ["#include <stdio.h>", "#include <stdlib.h>"]
    lines += [f'#include "{m.name}.h"' for m in models]
    total = max([sum(m.input_sizes) + sum(m.output_sizes) for m in models] + [1])
    lines += [f"static float io_buf[{total}];", "",
              "static int read_floats(float *p, long n) { return fread(p, sizeof(float), (size_t)n, stdin)"
              " == (size_t)n || n == 0; }",
              "static void write_floats(const float *p, long n) { fwrite(p, sizeof(float), (size_t)n, stdout); }",
              "", "int main(int argc, char **argv)", "{",
              "    int k = argc > 1 ? atoi(argv[1]) : 0;", "    float *p = io_buf;", "    switch (k) {"]
    for i, m in enumerate(models):
        ptrs, off = [], 0
        for n in m.input_sizes + m.output_sizes:
            ptrs.append(f"p + {off}")
            off += n
        lines.append(f"    case {i}:")
        lines.append(f"        if (!read_floats(p, {sum(m.input_sizes)})) return 2;")
        lines.append(f"        if ({m.name}_run({', '.join(ptrs)}) != 0) return 3;")
        lines.append(f"        write_floats(p + {sum(m.input_sizes)}, {sum(m.output_sizes)});")
        lines.append("        return 0;")
    lines += ["    default: return 1;", "    }", "}", ""]
    return "\n".join(lines)


def build_host(sources: list[Path], exe: Path, *, opt: str = "-O1", include: list[Path] = (),
               extra: list[str] = ()) -> Path:
    cmd = [host_cc(), *STRICT, opt, *[f"-I{d}" for d in include], *map(str, sources), "-o", str(exe), "-lm",
           *extra]
    run(cmd)
    return exe


def run_host(exe: Path, index: int, inputs: list[np.ndarray], output_sizes: list[int],
             timeout: float = 120) -> list[np.ndarray]:
    data = b"".join(np.ascontiguousarray(x, dtype="<f4").tobytes() for x in inputs)
    raw = run([str(exe), str(index)], input=data, timeout=timeout)
    flat = np.frombuffer(raw, dtype="<f4")
    if flat.size != sum(output_sizes):
        raise ToolError(f"{exe.name} {index}: expected {sum(output_sizes)} floats, got {flat.size}")
    outs, off = [], 0
    for n in output_sizes:
        outs.append(flat[off:off + n].copy())
        off += n
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
    models = [HarnessModel(g.prog.name, [g.prog.size(n) for n in g.prog.inputs],
                           [g.prog.size(n) for n in g.prog.outputs]) for g in gens]
    (workdir / "main.c").write_text(harness(models))
    sources = [workdir / "main.c"] + [workdir / f"{g.prog.name}.c" for g in gens]
    sources += sorted(p for p in workdir.glob("onnxc_*.c"))
    return build_host(sources, workdir / "prog", opt=opt, include=[workdir])


def run_generated(exe: Path, index: int, gen, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run model `index` of a `build_generated` program on named inputs; outputs by name, shaped."""
    prog = gen.prog
    outs = run_host(exe, index, [feeds[n] for n in prog.inputs], [prog.size(n) for n in prog.outputs])
    return {n: o.reshape(prog.shapes[n]) for n, o in zip(prog.outputs, outs)}


def max_rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref|: the error relative to the output's scale."""
    ref = np.asarray(ref, dtype=np.float64)
    scale = float(np.abs(ref).max()) or 1.0
    return float(np.abs(np.asarray(got, dtype=np.float64) - ref).max() / scale)
