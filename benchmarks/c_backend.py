"""C backend: memory, footprint, executed instructions and fidelity per model, side by side.

For each model (the four samples, the DS-CNN keyword spotter, 4-bit clustered variants, and with
`--light` onnx's light architectures with random weights):

- arena bytes (the one static activation buffer) beside the naive peak of simultaneously live
  intermediate tensors in node order (after activation fusion; no in-place, no aliasing, no
  sharing) -- and onnx2c's 64,000 for the DS-CNN;
- weight bytes, and flash (text + rodata) / RAM (data + bss) of the model linked as Cortex-M4
  firmware (`arm-none-eabi-size`, -O2, gc-sections, minus an empty firmware);
- instructions executed by `NAME_run` on the host build (-O2, `valgrind --tool=callgrind`) and
  per multiply-accumulate;
- max |C - onnxruntime| / max |onnxruntime| on the host, and on the Cortex-M4 under QEMU
  (mps2-an386, semihosting).

- with `--int8`: first the four MLPerf Tiny models in int8 (onnxc/backends/c/reference_models.py:
  DS-CNN, MobileNetV1 0.25 visual wake words, ResNet-8, the anomaly autoencoder; random weights,
  calibrated on random inputs): Cortex-M4 instructions per inference and per MAC, flash and RAM,
  and the outputs of 100 held-out inputs run on the Cortex-M4 against onnxruntime running the same
  QDQ model as its int8 model (largest difference in output steps, share within one step, share
  equal, top-1 agreement; the
  inputs in batches that fit the board's flash). `--mlperf` prints this table alone.
  Then each model also exported in int8 (the QDQ model of our onnxruntime flow, lowered
  to integer kernels), and a second table puts float and int8 side by side: Cortex-M4
  instructions per inference (qemu `-icount shift=0`, SysTick), weights, flash and RAM (the
  4-bit clustered variants too, whose int8 layers keep their codes); a third puts both beside
  onnx2c's float build. onnx2c is on neither PyPI nor Debian, so its figures
  are the ones recorded in issue 13 (host instructions with callgrind, gcc -O2; Cortex-M4 RAM),
  labelled as such, beside ours measured here (host callgrind of NAME_run, -O2, and the M4).

    python benchmarks/c_backend.py [--light [squeezenet,shufflenet,inception_v1,...]] [--no-qemu]
                                   [--no-callgrind] [--int8] [--mlperf]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's onnxc; test helpers

from onnxc.api import optimize  # noqa: E402
from onnxc.backends.c import compile_model, mps2  # noqa: E402
from onnxc.backends.c.reference_models import ds_cnn, onnx2c_reference_bytes  # noqa: E402
from onnxc.backends.c.toolchain import (  # noqa: E402
    build_generated,
    callgrind_instructions,
    max_rel_error,
    run_generated,
)
from onnxc.compiler import runtime  # noqa: E402
from onnxc.compiler.canonical import canonicalize  # noqa: E402
from onnxc.compiler.cost import model_cost  # noqa: E402

SAMPLES = ROOT / "samples"


def models(light: list[str]) -> list[tuple[str, onnx.ModelProto, dict[str, np.ndarray]]]:
    digit = {"input": np.load(SAMPLES / "digits_test.npz")["input"][:1]}
    out = [(name, onnx.load(SAMPLES / f"{name}.onnx"), digit) for name in ("mlp", "vgg", "resnet", "mobilenet")]
    rng = np.random.default_rng(0)
    out.append(("ds_cnn", ds_cnn(seed=0), {"input": rng.standard_normal((1, 1, 49, 10)).astype(np.float32)}))
    for name in ("mobilenet", "resnet"):
        spec = "cluster:bits=4,min_size=256"
        res = optimize(SAMPLES / f"{name}.onnx", passes=[spec], calibration=SAMPLES / "digits_calib.npz")
        out.append((f"{name}_c4", res.model, digit))
    if light:
        from test_c_light import light_model

        x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
        for name in light:
            m = light_model(name)
            out.append((name, m, {m.graph.input[0].name: x}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--light", nargs="?", const="squeezenet,shufflenet", default="",
                    help="add onnx light models with random weights (default squeezenet,shufflenet; slow)")
    ap.add_argument("--no-qemu", action="store_true", help="skip the Cortex-M4 run under QEMU")
    ap.add_argument("--no-callgrind", action="store_true", help="skip instruction counting")
    ap.add_argument("--int8", action="store_true", help="also compare float and int8 builds on the Cortex-M4")
    ap.add_argument("--mlperf", action="store_true", help="only the MLPerf Tiny models in int8 on the Cortex-M4")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="onnxc_c_bench_"))
    try:
        if args.int8 or args.mlperf:
            mlperf_table(work / "mlperf")
            if args.mlperf:
                return
        entries = models([n for n in args.light.split(",") if n])
        if args.int8:
            int8_table(entries, work / "int8")
            return
        run(entries, work, qemu=not args.no_qemu and mps2.available(), callgrind=not args.no_callgrind)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def m4_instructions(gen, feed: dict[str, np.ndarray], work: Path) -> tuple[int, dict[str, int]]:
    """Cortex-M4 instructions of one NAME_run (qemu -icount shift=0) and the model's footprint."""
    work.mkdir(parents=True)
    gen.write(work)
    name = gen.prog.name
    ins, outs = [feed[n] for n in gen.prog.inputs], [gen.prog.size(n) for n in gen.prog.outputs]
    (work / "main.c").write_text(mps2.firmware_main([(name, ins, outs)], timed=True))
    elf = mps2.build(sorted(work.glob("*.c")), work, include=[work])
    count = mps2.count_instructions(mps2.run_qemu(elf, timeout=900, icount=True))[name]
    fp = mps2.footprint(name, [gen.prog.size(n) for n in gen.prog.inputs], outs,
                        [work / f"{name}.c"] + sorted(work.glob("onnxc_*.c")), work, include=[work])
    return count, fp


def mlperf_table(work: Path, count: int = 100) -> None:
    """The MLPerf Tiny models in int8 on the Cortex-M4: cost, footprint, agreement with onnxruntime."""
    from mlperf_tiny import agreement, inputs, int8_build, macs, qdq_reference

    from onnxc.backends.c.reference_models import MLPERF_TINY

    print(f"{'model':14s} {'MACs':>9s} {'M4 instr':>10s} {'instr/MAC':>9s} {'flash':>9s} {'RAM':>8s} "
          f"{'max steps':>9s} {'within 1':>8s} {'equal':>6s} {'top-1':>6s}")
    for name in MLPERF_TINY:
        model, qdq, gen = int8_build(name)
        x = inputs(name, count)
        n_macs = macs(model)
        instr, fp = m4_instructions(gen, {"input": x[0]}, work / f"{name}_timed")
        ours = m4_outputs(gen, x, work / name)
        agree = agreement(gen, ours, qdq_reference(qdq, x))
        print(f"{name:14s} {n_macs / 1e6:8.2f}M {instr / 1e6:9.3f}M {instr / n_macs:9.2f} {fp['flash']:>9,} "
              f"{fp['ram']:>8,} {agree['max_steps']:9.2f} {agree['within_one']:8.3f} {agree['exact']:6.3f} "
              f"{agree['top1']:6.2f}",
              flush=True)
    print(f"\nM4 instr: one NAME_run (float in and out) on the mps2-an386 Cortex-M4 under qemu -icount shift=0, "
          f"to {mps2.INSTRUCTIONS_PER_TICK}; flash = text+rodata+data of the model linked for the Cortex-M4 (-O2, "
          "gc-sections) minus an empty firmware, RAM = data+bss minus the float I/O buffers;\n"
          f"steps: |M4 - onnxruntime| over the output scale on {count} standard-normal inputs (onnxruntime's int8 "
          "model: the QDQ model with all optimizations, its integer kernels); equal: share of outputs bit for bit;\n"
          "top-1 is meaningless for the autoencoder (a reconstruction). "
          "Per layer: benchmarks/c_layers.py")


def m4_outputs(gen, x: np.ndarray, work: Path, flash_budget: int = 2 << 20) -> np.ndarray:
    """Outputs [count, n] of every input (axis 0) run on the Cortex-M4, in as few firmwares as fit."""
    name, out_size = gen.prog.name, gen.prog.size(gen.prog.outputs[0])
    per = max(1, min(len(x), flash_budget // (x[0].nbytes + 1)))
    outs = []
    for start in range(0, len(x), per):
        d = work / f"batch{start}"
        d.mkdir(parents=True)
        gen.write(d)
        chunk = x[start:start + per]
        runs = "".join(f"    if ({name}_run({name}_x[{i}], {name}_y) != 0) return 1;\n"
                       f'    print_bits("{name}.out{i}", {name}_y, {out_size});\n' for i in range(len(chunk)))
        main = mps2.firmware_main([])  # includes and print_bits
        body = f'#include "{name}.h"\n' + main[:main.index("int main(void)")]
        data = ", ".join(f"0x{v:08x}" for v in chunk.reshape(len(chunk), -1).view("<u4").reshape(-1))
        (d / "main.c").write_text(
            body + f"static const union {{ uint32_t u[{chunk.size}]; float f[{len(chunk)}][{chunk[0].size}]; }} "
            f"{name}_xs = {{{{{data}}}}};\n#define {name}_x {name}_xs.f\nstatic float {name}_y[{out_size}];\n"
            f"int main(void)\n{{\n{runs}    return 0;\n}}\n")
        elf = mps2.build(sorted(d.glob("*.c")), d, include=[d])
        printed = mps2.parse_outputs(mps2.run_qemu(elf, timeout=900))
        outs += [printed[f"{name}.out{i}"] for i in range(len(chunk))]
    return np.stack(outs)


# onnx2c's float build as recorded in issue 13 (not measured here: onnx2c is not installable from
# PyPI or Debian): host x86-64 instructions per inference (callgrind, gcc -O2) and RAM in bytes.
ONNX2C_RECORDED = {"ds_cnn": (22.8e6, 64_000), "vgg": (450e6, 131_072), "resnet": (1_165e6, 196_608),
                   "mobilenet": (59.7e6, 393_216)}


def host_instructions(gens, feed: dict[str, np.ndarray], work: Path) -> list[int | None]:
    """Host instructions of each generated model's NAME_run (-O2, callgrind), one program."""
    if not shutil.which("valgrind"):
        return [None] * len(gens)
    exe = build_generated(gens, work, opt="-O2")
    return [callgrind_instructions(exe, k, [feed[n] for n in g.prog.inputs], f"{g.prog.name}_run", work)
            for k, g in enumerate(gens)]


def onnx2c_table(rows: list[dict]) -> None:
    """Ours (float and int8, measured) beside onnx2c's float build (recorded)."""
    print(f"\n{'model':10s} {'onnx2c host*':>12s} {'ours f host':>11s} {'int8 host':>10s} {'ours f M4':>10s} "
          f"{'int8 M4':>9s} {'onnx2c RAM*':>11s} {'ours f RAM':>10s} {'int8 RAM':>9s} {'int8/onnx2c instr':>17s}")
    for r in rows:
        rec = ONNX2C_RECORDED.get(r["name"])
        fh, qh = r["host"]
        ratio = f"{qh / rec[0]:17.3f}" if rec and qh else f"{'-':>17s}"
        print(f"{r['name']:10s} {(f'{rec[0] / 1e6:,.1f}M' if rec else '-'):>12s} {_m(fh):>11s} {_m(qh):>10s} "
              f"{_m(r['m4'][0]):>10s} {_m(r['m4'][1]):>9s} {(f'{rec[1]:,}' if rec else '-'):>11s} "
              f"{r['ram'][0]:>10,} {r['ram'][1]:>9,} {ratio}")
    print("* onnx2c: recorded in issue 13 (host x86-64 callgrind, gcc -O2; Cortex-M4 static RAM), not measured "
          "here: onnx2c is not on PyPI or Debian.\n  ours: host = callgrind of NAME_run (-O2) on this machine; "
          "M4 = qemu -icount; RAM = data+bss of the model on the Cortex-M4 (arena, minus I/O buffers).")


def _m(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.2f}M"


def int8_table(entries, work: Path) -> None:
    """Float and int8 builds of each model side by side on the Cortex-M4."""
    from onnxc.backends import ExportOptions
    from onnxc.backends.c import quantize_for_c
    from onnxc.compiler.calibration import make_calibration

    print(f"{'model':10s} {'M4 instr float':>15s} {'int8':>12s} {'ratio':>6s} {'weights f':>10s} {'int8':>9s} "
          f"{'ratio':>6s} {'flash f':>9s} {'int8':>9s} {'RAM f':>9s} {'int8':>9s} {'arena ratio':>11s}")
    rows = []
    for name, model, feed in entries:
        canonical = canonicalize(model)
        cal = make_calibration(canonical, None if name == "ds_cnn" else SAMPLES / "digits_calib.npz", seed=0)
        qdq, _ = quantize_for_c(canonical, ExportOptions(int8="static", calibration=cal))
        fgen, qgen = compile_model(canonical, name), compile_model(qdq, name)
        (fi, ffp), (qi, qfp) = (m4_instructions(g, feed, work / f"{name}_{tag}") for g, tag in ((fgen, "f"),
                                                                                                 (qgen, "q")))
        host = host_instructions([compile_model(canonical, f"{name}_f"), compile_model(qdq, f"{name}_q")], feed,
                                 work / f"{name}_host")
        rows.append({"name": name, "host": host, "m4": (fi, qi), "ram": (ffp["ram"], qfp["ram"]),
                     "weights": qgen.weight_bytes})
        print(f"{name:10s} {fi / 1e6:14.2f}M {qi / 1e6:11.2f}M {qi / fi:6.2f} {_kb(fgen.weight_bytes):>10s} "
              f"{_kb(qgen.weight_bytes):>9s} {qgen.weight_bytes / fgen.weight_bytes:6.3f} {_kb(ffp['flash']):>9s} "
              f"{_kb(qfp['flash']):>9s} {_kb(ffp['ram']):>9s} {_kb(qfp['ram']):>9s} "
              f"{qgen.arena_bytes / fgen.arena_bytes:11.3f}", flush=True)
    print("\nM4 instr: instructions of one NAME_run on the mps2-an386 Cortex-M4 under qemu -icount shift=0 "
          f"(SysTick, to {mps2.INSTRUCTIONS_PER_TICK}); int8 runs the float entry point (quantize in, dequantize out)")
    by = {r["name"]: r for r in rows}
    for name in by:
        if name.endswith("_c4") and name[:-3] in by:
            c, d = by[name], by[name[:-3]]
            print(f"{name}: int8 4-bit clustered / int8 dense: weights {c['weights'] / d['weights']:.3f}, "
                  f"M4 instructions {c['m4'][1] / d['m4'][1]:.2f}")
    onnx2c_table([r for r in rows if not r["name"].endswith("_c4")])


def run(entries, work: Path, *, qemu: bool, callgrind: bool) -> None:
    gens = []
    t0 = time.time()
    for name, model, _ in entries:
        gens.append(compile_model(model, name))
    print(f"# lowered {len(gens)} models in {time.time() - t0:.1f}s", file=sys.stderr)
    host = work / "host"
    exe = build_generated(gens, host, opt="-O2")
    rows = []
    for k, ((name, model, feed), gen) in enumerate(zip(entries, gens)):
        ref = runtime.run(model, feed)
        got = run_generated(exe, k, gen, feed)
        err = max(max_rel_error(got[o], ref[o]) for o in ref)
        report = gen.report()
        fp = mps2.footprint(name, [gen.prog.size(n) for n in gen.prog.inputs],
                            [gen.prog.size(n) for n in gen.prog.outputs],
                            [host / f"{name}.c"] + sorted(host.glob("onnxc_*.c")), host, include=[host]) \
            if shutil.which(mps2.CC) else None
        instr = None
        if callgrind and shutil.which("valgrind"):
            instr = callgrind_instructions(exe, k, [feed[n] for n in gen.prog.inputs], f"{name}_run", host)
        macs = model_cost(canonicalize(model, {n: list(v.shape) for n, v in feed.items()})).macs
        rows.append({"name": name, "macs": macs, "arena": gen.arena_bytes, "peak": report["naive_peak_bytes"],
                     "weights": gen.weight_bytes, "fp": fp, "instr": instr, "err": err, "gen": gen, "feed": feed,
                     "ref": ref})
        print(f"# {name}: done", file=sys.stderr)
    m4 = m4_errors(rows, work / "m4") if qemu else {}
    print_table(rows, m4)


def m4_errors(rows, work: Path) -> dict[str, float]:
    """Run every model that fits the board (4 MB flash) on the Cortex-M4 under QEMU."""
    work.mkdir(parents=True, exist_ok=True)
    fit = [r for r in rows if r["fp"] is None or r["fp"]["flash"] < 3 << 20 and r["fp"]["ram"] < 3 << 20]
    errors = {}
    for r in fit:  # one firmware per model: each must fit the memories on its own
        d = work / r["name"]
        d.mkdir()
        gen = r["gen"]
        gen.write(d)
        (d / "main.c").write_text(mps2.firmware_main([(gen.prog.name, [r["feed"][n] for n in gen.prog.inputs],
                                                       [gen.prog.size(n) for n in gen.prog.outputs])]))
        elf = mps2.build(sorted(d.glob("*.c")), d, include=[d])
        printed = mps2.parse_outputs(mps2.run_qemu(elf, timeout=900))
        errors[r["name"]] = max(max_rel_error(printed[f"{gen.prog.name}.out{k}"], r["ref"][o].reshape(-1))
                                for k, o in enumerate(gen.prog.outputs))
    return errors


def _kb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1000:,.1f}k"


def print_table(rows, m4: dict[str, float]) -> None:
    head = (f"{'model':14s} {'MACs':>9s} {'arena':>9s} {'naive peak':>10s} {'arena/peak':>10s} {'weights':>9s} "
            f"{'flash':>9s} {'RAM':>9s} {'host instr':>11s} {'instr/MAC':>9s} {'err host':>9s} {'err M4':>9s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        fp = r["fp"] or {}
        instr, macs = r["instr"], max(r["macs"], 1)
        instr_s = "-" if instr is None else f"{instr / 1e6:,.2f}M"
        per_mac = "-" if instr is None else f"{instr / macs:.2f}"
        m4_s = f"{m4[r['name']]:9.1e}" if r["name"] in m4 else "-"
        print(f"{r['name']:14s} {r['macs'] / 1e6:8.2f}M {_kb(r['arena']):>9s} {_kb(r['peak']):>10s} "
              f"{r['arena'] / max(r['peak'], 1):10.2f} {_kb(r['weights']):>9s} {_kb(fp.get('flash')):>9s} "
              f"{_kb(fp.get('ram')):>9s} {instr_s:>11s} {per_mac:>9s} {r['err']:9.1e} {m4_s:>9s}")
    by = {r["name"]: r for r in rows}
    if "ds_cnn" in by:
        a = by["ds_cnn"]["arena"]
        print(f"\nDS-CNN arena {a:,} bytes vs onnx2c {onnx2c_reference_bytes():,} "
              f"({a / onnx2c_reference_bytes():.2f}x; bound 48,000: {'met' if a <= 48_000 else 'NOT met'})")
    for base in ("mobilenet", "resnet"):
        if base in by and f"{base}_c4" in by and by[base]["fp"] and by[f"{base}_c4"]["fp"]:
            d, c = by[base], by[f"{base}_c4"]
            ratio_i = (c["instr"] / d["instr"]) if c["instr"] and d["instr"] else float("nan")
            print(f"{base} 4-bit clustered / dense: flash {c['fp']['flash'] / d['fp']['flash']:.2f}x, "
                  f"RAM {c['fp']['ram'] / d['fp']['ram']:.2f}x, instructions {ratio_i:.2f}x")
    print("\nflash = text+rodata+data of the model linked for Cortex-M4 (-O2, gc-sections) minus an empty "
          "firmware;\nRAM = data+bss (the arena) minus the I/O buffers; err = max|C-ort|/max|ort|; "
          f"host: {os.uname().machine}, callgrind on NAME_run")


if __name__ == "__main__":
    main()
