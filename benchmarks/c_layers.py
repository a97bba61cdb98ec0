"""Cortex-M4 instructions per layer of the MLPerf Tiny models in int8, and per MAC.

Each model (onnxc/backends/c/reference_models.py, random weights, calibrated on random inputs) is
quantized as `onnxc export --backend c --int8` does, lowered, and its generated NAME_core is
instrumented: SysTick is read after every step (qemu -icount shift=0 on mps2-an386, 40 instructions
a tick, about 20 instructions of timer reads per step included). Printed per step: the kernel, the
node, instructions, the node's MACs and instructions per MAC; then per kernel over the model.

    python benchmarks/c_layers.py [ds_cnn,mobilenet_vww,resnet8,autoencoder]
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's onnxc

from onnxc.backends import ExportOptions  # noqa: E402
from onnxc.backends.c import compile_model, mps2, quantize_for_c  # noqa: E402
from onnxc.backends.c.reference_models import MLPERF_TINY  # noqa: E402
from onnxc.compiler.calibration import make_calibration  # noqa: E402
from onnxc.compiler.canonical import canonicalize  # noqa: E402
from onnxc.compiler.cost import model_cost  # noqa: E402

STEP = re.compile(r"^    /\* (\d+): (\S+) \((\w+)\)")


def instrument(source: str, name: str) -> tuple[str, list[tuple[str, str]]]:
    """NAME.c with a SysTick read after each step of NAME_core; the (node, kernel) of each step."""
    out, steps, inside, label = [], [], False, None
    for line in source.splitlines():
        if line.startswith(f"static void {name}_core("):
            inside = True
        elif inside and line == "}":
            inside = False
        m = STEP.match(line) if inside else None
        if m:
            label = m.group(2)
        out.append(line)
        if inside and label and line.startswith("    onnxc_") and line.endswith(");"):
            steps.append((label, line.split("(")[0].strip()))
            out.append(f"    onnxc_prof[{len(steps)}] = onnxc_prof_now();")
        if inside and line == "{":
            out.append("    onnxc_prof[0] = onnxc_prof_now();")
    decl = "extern unsigned long long onnxc_prof[];\nunsigned long long onnxc_prof_now(void);\n"
    text = "\n".join(out) + "\n"
    return text.replace("/* ---- constants (flash) ---- */", decl + "/* ---- constants (flash) ---- */", 1), steps


def firmware(name: str, x: np.ndarray, out_size: int, nsteps: int) -> str:
    main = mps2.firmware_main([(name, [x], [out_size])], timed=True)
    prof = (f"unsigned long long onnxc_prof[{nsteps + 1}];\n"
            "static unsigned long long timer_ticks(void);\n"
            "unsigned long long onnxc_prof_now(void) { return timer_ticks(); }\n")
    dump = "".join(f'    printf("prof {k} %llu\\n", onnxc_prof[{k}]);\n' for k in range(nsteps + 1))
    main = main.replace("int main(void)\n{", prof + "int main(void)\n{", 1)
    return main.replace("    return 0;\n}", dump + "    return 0;\n}", 1)


def profile(name: str, work: Path) -> list[tuple[str, str, int, int]]:
    """(node, kernel, instructions, MACs) of each step of the int8 model on the Cortex-M4."""
    build, shape = MLPERF_TINY[name]
    model = canonicalize(build(seed=0))
    cal = make_calibration(model, None, seed=0)
    qdq, _ = quantize_for_c(model, ExportOptions(int8="static", calibration=cal))
    gen = compile_model(qdq, name)
    gen.write(work)
    text, steps = instrument((work / f"{name}.c").read_text(), name)
    (work / f"{name}.c").write_text(text)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    (work / "main.c").write_text(firmware(name, x, gen.prog.size(gen.prog.outputs[0]), len(steps)))
    elf = mps2.build(sorted(work.glob("*.c")), work, include=[work])
    ticks = [int(v) for v in re.findall(r"^prof \d+ (\d+)\s*$", mps2.run_qemu(elf, timeout=600, icount=True), re.M)]
    macs = {c.name: c.macs for c in model_cost(model).layers}
    return [(node, fn, (ticks[k + 1] - ticks[k]) * mps2.INSTRUCTIONS_PER_TICK, macs.get(node, 0))
            for k, (node, fn) in enumerate(steps)]


def main() -> None:
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(MLPERF_TINY)
    work = Path(tempfile.mkdtemp(prefix="onnxc_layers_"))
    try:
        for name in names:
            d = work / name
            d.mkdir()
            rows = profile(name, d)
            print(f"\n{name}: {sum(r[2] for r in rows):,} instructions in NAME_core, {sum(r[3] for r in rows):,} MACs")
            print(f"{'node':14s} {'kernel':26s} {'instr':>10s} {'MACs':>10s} {'instr/MAC':>9s}")
            per_kernel: dict[str, list[int]] = defaultdict(lambda: [0, 0])
            for node, fn, ins, macs in rows:
                per_kernel[fn][0] += ins
                per_kernel[fn][1] += macs
                print(f"{node:14s} {fn:26s} {ins:10,} {macs:10,} {ins / macs if macs else float('nan'):9.2f}")
            for fn, (ins, macs) in per_kernel.items():
                print(f"  {fn:26s} {ins:10,} {macs:10,} {ins / macs if macs else float('nan'):9.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
