"""onnxruntime backend on a sample: float, pruned, int8 and pruned+int8 side by side.

For each variant: held-out accuracy, file size, and onnxruntime latency as a ratio of the float
model's (interleaved runs, medians; `onnxc.compiler.bench`), at each batch size asked for; the
10th-percentile ratio beside it shows how much of the median is noise from a busy machine.
An extra row shows onnxruntime's QOperator int8 format (the backend writes QDQ) for comparison.

    python benchmarks/ort_backend.py [--model vgg] [--batch 64 --batch 1] [--runs 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from sample_data import CALIBRATION, accuracy, load_test_set, sample_path  # noqa: E402

from onnxc import api  # noqa: E402
from onnxc.compiler.bench import bench  # noqa: E402
from onnxc.compiler.model import save  # noqa: E402
from onnxc.compiler.passes import available  # noqa: E402


def pruned_model(source: Path, ratio: float) -> tuple[onnx.ModelProto, str]:
    if "prune" not in available():
        sys.exit("the prune pass (onnxc/passes/prune.py) is not available yet")
    result = api.optimize(source, passes=[f"prune:ratio={ratio}"], calibration=CALIBRATION)
    return result.model, f"prune:ratio={ratio}"


def qoperator(source: Path, out: Path) -> Path:
    """onnxruntime's QOperator format (QLinearConv...) straight from its tools, for comparison."""
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    from onnxc.backends.ort_quant import _Reader
    from onnxc.compiler.calibration import make_calibration
    from onnxc.compiler.canonical import canonicalize
    from onnxc.compiler.model import load

    canonical = canonicalize(load(source))
    cal = make_calibration(canonical, CALIBRATION)
    pre = out.with_name("qop_pre.onnx")
    save(canonical, out.with_name("qop_src.onnx"))
    quant_pre_process(str(out.with_name("qop_src.onnx")), str(pre))
    quantize_static(str(pre), str(out), _Reader(cal.train, 32), quant_format=QuantFormat.QOperator,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default 64 and 1)")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    batches = args.batch or [64, 1]
    source = sample_path(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        pruned, how = pruned_model(source, args.ratio)
        save(pruned, work / "pruned.onnx")
        variants = {"float": source, f"pruned ({how})": work / "pruned.onnx"}
        for label, src, out in [("int8", source, "int8.onnx"), ("pruned+int8", pruned, "pruned_int8.onnx"),
                                ("pruned+int8 .ort", pruned, "pruned_int8.ort")]:
            api.export(src, "onnxruntime", work / out, int8="static", calibration=CALIBRATION)
            variants[label] = work / out
        variants["int8 QOperator (ort direct)"] = qoperator(source, work / "qop.onnx")
        print(f"built in {time.perf_counter() - t0:.1f} s; model {source.name}, threads={args.threads}, "
              f"runs={args.runs}", file=sys.stderr)

        x, _ = load_test_set()
        timings = {b: bench(list(variants.values()), {"input": x[:b]}, list(variants), runs=args.runs,
                            warmup=5, threads=args.threads) for b in batches}
        base_acc, base_size = accuracy(source), source.stat().st_size
        width = max(len(k) for k in variants)
        head = f"{'variant':<{width}}  {'accuracy %':>10}  {'Δ points':>8}  {'file KB':>8}  {'size':>6}"
        head += "".join(f"  {f'b={b} ms':>9}  {f'b={b} ratio':>11}  {'p10 ratio':>9}" for b in batches)
        print(head)
        for i, (label, path) in enumerate(variants.items()):
            acc = accuracy(path)
            size = path.stat().st_size
            row = f"{label:<{width}}  {acc:>10.2f}  {acc - base_acc:>+8.2f}"
            row += f"  {size / 1024:>8.1f}  {size / base_size:>5.2f}x"
            for b in batches:
                t = timings[b][i]
                row += f"  {t.median_ms:>9.3f}  {t.ratio:>10.2f}x  {t.p10_ms / timings[b][0].p10_ms:>8.2f}x"
            print(row)


if __name__ == "__main__":
    main()
