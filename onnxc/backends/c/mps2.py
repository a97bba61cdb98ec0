"""Cross-compile generated C for a Cortex-M4 and run it on QEMU's mps2-an386 board.

The board (ARM application note 386): Cortex-M4 with FPU, 4 MB of code memory at 0x00000000
and 4 MB of SRAM at 0x20000000. We supply the vector table, a reset handler (copy .data, zero
.bss, enable the FPU, call main, exit through semihosting) and the linker script; newlib's
rdimon library provides printf over semihosting, so QEMU prints the results on stdout. Under
`-icount shift=0` SysTick counts instructions: per run (`count_instructions`) and per kernel call
(`profile_steps`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np

from onnxc.backends.c.program import ConstArray
from onnxc.backends.c.toolchain import STRICT, ToolError, run
from onnxc.backends.c.weights import array_definition

CC = "arm-none-eabi-gcc"
CPU_FLAGS = ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"]


def _compile_cmd(opt: str, include: list[Path]) -> list[str]:
    """The cross compiler with the flags every build here uses (-Werror, one section per symbol)."""
    return [CC, *CPU_FLAGS, *STRICT, opt, "-ffunction-sections", "-fdata-sections", *[f"-I{d}" for d in include]]

LINKER_SCRIPT = """\
/* mps2-an386: code memory and SRAM, 4 MB each. */
MEMORY
{
    FLASH (rx)  : ORIGIN = 0x00000000, LENGTH = 4M
    RAM   (rwx) : ORIGIN = 0x20000000, LENGTH = 4M
}
ENTRY(reset_handler)
SECTIONS
{
    .text :
    {
        KEEP(*(.vectors))
        *(.text*)
        *(.rodata*)
        KEEP(*(.init))
        KEEP(*(.fini))
        . = ALIGN(4);
    } > FLASH
    .ARM.exidx : { *(.ARM.exidx*) } > FLASH
    __etext = ALIGN(4);
    .data : AT(__etext)
    {
        __data_start__ = .;
        *(.data*)
        . = ALIGN(4);
        __data_end__ = .;
    } > RAM
    .bss (NOLOAD) :
    {
        __bss_start__ = .;
        *(.bss*)
        *(COMMON)
        . = ALIGN(8);
        __bss_end__ = .;
    } > RAM
    end = .;
    _end = .;
    __stack_top = ORIGIN(RAM) + LENGTH(RAM);
}
"""

STARTUP = """\
/* Vector table and reset handler for the mps2-an386 (Cortex-M4F) under QEMU. */
#include <stdint.h>
#include <stdlib.h>

extern uint32_t __etext, __data_start__, __data_end__, __bss_start__, __bss_end__, __stack_top;
extern int main(void);
extern void initialise_monitor_handles(void);
void reset_handler(void);
void fault_handler(void);
void systick_handler(void);

__attribute__((section(".vectors"), used))
const void *const vector_table[16] = {
    &__stack_top, (const void *)reset_handler, (const void *)fault_handler, (const void *)fault_handler,
    (const void *)fault_handler, (const void *)fault_handler, (const void *)fault_handler, 0, 0, 0, 0,
    (const void *)fault_handler, (const void *)fault_handler, 0, (const void *)fault_handler,
    (const void *)systick_handler,
};

void fault_handler(void)
{
    exit(99);
}

/* SysTick wraps (24-bit counter), for instruction counting (see CYCLES). */
volatile uint32_t onnxc_systick_wraps;
void systick_handler(void)
{
    onnxc_systick_wraps++;
}

void reset_handler(void)
{
    uint32_t *src = &__etext, *dst = &__data_start__;
    while (dst < &__data_end__) *dst++ = *src++;
    for (dst = &__bss_start__; dst < &__bss_end__;) *dst++ = 0;
    /* CPACR: full access to coprocessors 10 and 11 (the FPU). */
    *(volatile uint32_t *)0xE000ED88 |= (0xFu << 20);
    __asm__ volatile("dsb\\n\\tisb");
    initialise_monitor_handles();
    exit(main());
}

/* newlib wants these when crt0 is not linked. */
void _init(void) {}
void _fini(void) {}
"""


def available() -> bool:
    return shutil.which(CC) is not None and shutil.which("qemu-system-arm") is not None


# Instruction counting: under `qemu -icount shift=0` every instruction takes 1 ns of virtual time
# and SysTick counts the 25 MHz core clock of the AN386, so one tick is 40 instructions.
INSTRUCTIONS_PER_TICK = 40
TIMER = """\
#define SYST_CSR (*(volatile uint32_t *)0xE000E010)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018)
extern volatile uint32_t onnxc_systick_wraps;
static void timer_start(void)
{
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0;
    SYST_CSR = 7u; /* core clock, interrupt on wrap, enabled */
    while (SYST_CVR == 0) {
    }
}
static unsigned long long timer_ticks(void)
{
    uint32_t w, v;
    do {
        w = onnxc_systick_wraps;
        v = SYST_CVR;
    } while (w != onnxc_systick_wraps);
    return ((unsigned long long)w << 24) + (0xFFFFFFu - v);
}
"""


def firmware_main(models: list[tuple[str, list[np.ndarray], list[int]]], *, timed: bool = False) -> str:
    """main() that runs each model on embedded inputs and prints every output as hex float bits
    (and, `timed`, the SysTick ticks of each run as `NAME.ticks N`; see `count_instructions`)."""
    lines = ["#include <stdint.h>", "#include <stdio.h>", "#include <string.h>"]
    lines += [f'#include "{name}.h"' for name, _, _ in models]
    lines += [TIMER] if timed else []
    calls = []
    for name, inputs, out_sizes in models:
        args = []
        for k, x in enumerate(inputs):
            lines.append(array_definition(ConstArray(f"{name}_in{k}", np.asarray(x, dtype=np.float32))))
            args.append(f"{name}_in{k}.f")
        for k, n in enumerate(out_sizes):
            lines.append(f"static float {name}_out{k}[{max(n, 1)}];")
            args.append(f"{name}_out{k}")
        calls.append((name, args, out_sizes))
    lines += ["", "static void print_bits(const char *tag, const float *p, int n)", "{", "    int i;",
              '    printf("%s", tag);',
              "    for (i = 0; i < n; i++) {", "        uint32_t b;", "        memcpy(&b, &p[i], 4);",
              '        printf(" %08lx", (unsigned long)b);', "    }", '    printf("\\n");', "}", "",
              "int main(void)", "{"]
    if timed:
        lines.append("    timer_start();")
    for name, args, out_sizes in calls:
        if timed:
            lines.append("    {")
            lines.append("        unsigned long long t0 = timer_ticks(), t1;")
            lines.append(f"        if ({name}_run({', '.join(args)}) != 0) return 1;")
            lines.append("        t1 = timer_ticks();")
            lines.append(f'        printf("{name}.ticks %llu\\n", t1 - t0);')
            lines.append("    }")
        else:
            lines.append(f"    if ({name}_run({', '.join(args)}) != 0) return 1;")
        for k, n in enumerate(out_sizes):
            lines.append(f'    print_bits("{name}.out{k}", {name}_out{k}, {n});')
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def streaming_main(name: str, chunks: list[list[np.ndarray]], out_sizes: list[int],
                   carry: dict[int, int]) -> str:
    """main() that runs a streaming model over a sequence of chunks, as a device would: output k
    is copied into input `carry[k]` before the next chunk (a recurrent state carried from one
    chunk to the next); inputs in `carry` take their first chunk's value only. Every output of
    chunk i is printed as `NAMEi.outK`."""
    steps = len(chunks)
    lines = ["#include <stdint.h>", "#include <stdio.h>", "#include <string.h>", f'#include "{name}.h"']
    fed = [k for k in range(len(chunks[0])) if k not in carry.values()]
    for k in fed:
        stacked = np.stack([np.asarray(c[k], dtype=np.float32).reshape(-1) for c in chunks])
        lines.append(array_definition(ConstArray(f"{name}_in{k}", stacked.reshape(-1))))
    for k in carry.values():
        lines.append(array_definition(ConstArray(f"{name}_init{k}", np.asarray(chunks[0][k], np.float32).reshape(-1))))
        lines.append(f"static float {name}_in{k}_buf[{chunks[0][k].size}];")
    for k, n in enumerate(out_sizes):
        lines.append(f"static float {name}_out{k}[{max(n, 1)}];")
    args = [f"{name}_in{k}.f + i * {chunks[0][k].size}" if k in fed else f"{name}_in{k}_buf"
            for k in range(len(chunks[0]))] + [f"{name}_out{k}" for k in range(len(out_sizes))]
    lines += ["", "static void print_bits(const char *tag, int step, const float *p, int n)", "{", "    int i;",
              '    printf("%s%d.%s", "' + name + '", step, tag);',
              "    for (i = 0; i < n; i++) {", "        uint32_t b;", "        memcpy(&b, &p[i], 4);",
              '        printf(" %08lx", (unsigned long)b);', "    }", '    printf("\\n");', "}", "",
              "int main(void)", "{", "    int i;"]
    for k in carry.values():
        lines.append(f"    memcpy({name}_in{k}_buf, {name}_init{k}.f, sizeof({name}_in{k}_buf));")
    lines += [f"    for (i = 0; i < {steps}; i++) {{", f"        if ({name}_run({', '.join(args)}) != 0) return 1;"]
    for k, n in enumerate(out_sizes):
        lines.append(f'        print_bits("out{k}", i, {name}_out{k}, {n});')
    for out, inp in carry.items():
        lines.append(f"        memcpy({name}_in{inp}_buf, {name}_out{out}, sizeof({name}_in{inp}_buf));")
    lines += ["    }", "    return 0;", "}", ""]
    return "\n".join(lines)


def build(sources: list[Path], workdir: Path, *, opt: str = "-O2", include: list[Path] = (),
          elf_name: str = "app.elf") -> Path:
    """Compile `sources` (generated model + kernels + a main) with the startup code into an ELF."""
    (workdir / "mps2_an386.ld").write_text(LINKER_SCRIPT)
    (workdir / "startup.c").write_text(STARTUP)
    elf = workdir / elf_name
    cmd = [*_compile_cmd(opt, include), *map(str, sources), str(workdir / "startup.c"),
           "--specs=rdimon.specs", "-nostartfiles", f"-T{workdir / 'mps2_an386.ld'}", "-Wl,--gc-sections",
           "-o", str(elf), "-lm"]
    run(cmd)
    return elf


def run_qemu(elf: Path, timeout: float = 300, *, icount: bool = False) -> str:
    """Run firmware; `icount`: one instruction per nanosecond of virtual time (for counting)."""
    extra = ["-icount", "shift=0"] if icount else []
    out = run(["qemu-system-arm", "-M", "mps2-an386", "-nographic", "-monitor", "none", "-serial", "none",
               "-semihosting-config", "enable=on,target=native", *extra, "-kernel", str(elf)], timeout=timeout)
    return out.decode(errors="replace")


def count_instructions(text: str) -> dict[str, int]:
    """Instructions per run (to 40) from the `NAME.ticks N` lines of a timed firmware under icount."""
    return {m.group(1): int(m.group(2)) * INSTRUCTIONS_PER_TICK
            for m in re.finditer(r"^(\w+)\.ticks (\d+)\s*$", text, re.M)}


def parse_outputs(text: str) -> dict[str, np.ndarray]:
    """`name.outK hex hex ...` lines back to float32 arrays."""
    found = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+\.out\d+)((?: [0-9a-f]{8})*)\s*$", line.strip())
        if m:
            bits = [int(h, 16) for h in m.group(2).split()]
            found[m.group(1)] = np.array(bits, dtype="<u4").view("<f4")
    return found


def size(paths: list[Path]) -> dict[str, int]:
    """text (code + rodata), data and bss summed over objects or an ELF (arm-none-eabi-size)."""
    out = run(["arm-none-eabi-size", "-t", *map(str, paths)]).decode()
    last = out.strip().splitlines()[-1].split()
    if len(last) < 3:
        raise ToolError(f"unexpected arm-none-eabi-size output: {out}")
    return {"text": int(last[0]), "data": int(last[1]), "bss": int(last[2])}


SIZE_STARTUP = """\
/* Minimal startup for footprint measurement: no semihosting, no stdio. */
#include <stdint.h>

extern uint32_t __etext, __data_start__, __data_end__, __bss_start__, __bss_end__, __stack_top;
extern int main(void);
void reset_handler(void);

__attribute__((section(".vectors"), used))
const void *const vector_table[2] = {&__stack_top, (const void *)reset_handler};

void reset_handler(void)
{
    uint32_t *src = &__etext, *dst = &__data_start__;
    while (dst < &__data_end__) *dst++ = *src++;
    for (dst = &__bss_start__; dst < &__bss_end__;) *dst++ = 0;
    *(volatile uint32_t *)0xE000ED88 |= (0xFu << 20);
    (void)main();
    for (;;) {
    }
}

void _init(void) {}
void _fini(void) {}
"""


def footprint(name: str, input_sizes: list[int], output_sizes: list[int], sources: list[Path], workdir: Path,
              *, opt: str = "-O2", include: list[Path] = ()) -> dict[str, int]:
    """Flash and RAM of one model as firmware: its code, kernels, weights, arena and the libm
    functions it pulls in, linked with -gc-sections behind a bare main (no stdio), minus the
    same firmware without the model."""
    # Measured, not run: a memory map big enough for any model, so that sizes are always reported.
    (workdir / "size_probe.ld").write_text(LINKER_SCRIPT.replace("LENGTH = 4M", "LENGTH = 256M"))
    (workdir / "size_startup.c").write_text(SIZE_STARTUP)
    bufs = [f"static float io{k}[{max(n, 1)}];" for k, n in enumerate(input_sizes + output_sizes)]
    args = ", ".join(f"io{k}" for k in range(len(input_sizes) + len(output_sizes)))
    with_model = workdir / f"size_main_{name}.c"
    with_model.write_text(f'#include "{name}.h"\n' + "\n".join(bufs)
                          + f"\nint main(void) {{ return {name}_run({args}); }}\n")
    bare = workdir / "size_main_bare.c"
    bare.write_text("int main(void) { return 0; }\n")
    result = {}
    for tag, main, srcs in (("model", with_model, sources), ("bare", bare, [])):
        elf = workdir / f"size_{name}_{tag}.elf"
        run([*_compile_cmd(opt, include), str(main), *map(str, srcs), str(workdir / "size_startup.c"),
             "--specs=nano.specs", "-nostartfiles", f"-T{workdir / 'size_probe.ld'}", "-Wl,--gc-sections", "-o",
             str(elf), "-lm"])
        result[tag] = size([elf])
    diff = {k: result["model"][k] - result["bare"][k] for k in ("text", "data", "bss")}
    io_bytes = 4 * sum(input_sizes + output_sizes)
    return {"flash": diff["text"] + diff["data"], "ram": diff["data"] + diff["bss"] - io_bytes,
            "text": diff["text"], "data": diff["data"], "bss": diff["bss"] - io_bytes}


# ---- instructions per step ------------------------------------------------------------------
_STEP = re.compile(r"^    /\* \d+: (\S+) \(\w+\)")


def _instrument(source: str, name: str) -> tuple[str, list[tuple[str, str]]]:
    """NAME.c with SysTick read at the start of NAME_core and after each of its kernel calls; the
    (node, kernel) of each call, from the generated step comments."""
    out, steps, inside, label = [], [], False, None
    for line in source.splitlines():
        if line.startswith(f"static void {name}_core("):
            inside = True
            out.append("extern unsigned long long onnxc_prof[];\nunsigned long long onnxc_prof_now(void);")
        elif inside and line == "}":
            inside = False
        m = _STEP.match(line) if inside else None
        label = m.group(1) if m else label
        out.append(line)
        if inside and line == "{":
            out.append("    onnxc_prof[0] = onnxc_prof_now();")
        elif inside and label and line.startswith("    onnxc_") and line.endswith(");"):
            steps.append((label, line.split("(")[0].strip()))
            out.append(f"    onnxc_prof[{len(steps)}] = onnxc_prof_now();")
    return "\n".join(out) + "\n", steps


def profile_steps(gen, inputs: list[np.ndarray], workdir: Path, *, timeout: float = 600) -> list[tuple[str, str, int]]:
    """Cortex-M4 instructions of each kernel call of one run of a generated model (qemu -icount,
    to 40, each including about 20 instructions of timer reads): (node, kernel, instructions)."""
    name = gen.prog.name
    gen.write(workdir)
    text, steps = _instrument((workdir / f"{name}.c").read_text(), name)
    (workdir / f"{name}.c").write_text(text)
    main = firmware_main([(name, inputs, [gen.prog.size(o) for o in gen.prog.outputs])], timed=True)
    prof = (f"unsigned long long onnxc_prof[{len(steps) + 1}];\n"
            "unsigned long long onnxc_prof_now(void) { return timer_ticks(); }\n")
    dump = "".join(f'    printf("prof {k} %llu\\n", onnxc_prof[{k}]);\n' for k in range(len(steps) + 1))
    main = main.replace("int main(void)\n{", prof + "int main(void)\n{", 1).replace("    return 0;\n}", dump
                                                                                    + "    return 0;\n}", 1)
    (workdir / "main.c").write_text(main)
    elf = build(sorted(workdir.glob("*.c")), workdir, include=[workdir])
    ticks = [int(v) for v in re.findall(r"^prof \d+ (\d+)\s*$", run_qemu(elf, timeout=timeout, icount=True), re.M)]
    if len(ticks) != len(steps) + 1:
        raise ToolError(f"{name}: expected {len(steps) + 1} profile lines, got {len(ticks)}")
    return [(node, fn, (ticks[k + 1] - ticks[k]) * INSTRUCTIONS_PER_TICK) for k, (node, fn) in enumerate(steps)]
