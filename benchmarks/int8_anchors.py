"""Anchors for benchmarks/int8_ppocr.py: other post-training quantizers on the same lines.

NNCF (`pip install nncf==3.4`: min/max ranges with its fast bias correction, its default for
ONNX) and AIMET-ONNX (`pip install aimet-onnx==2.42`: cross-layer equalization, then its
quantization simulation, exported to QDQ) quantize `ppocr_rec` on the 128 calibration lines;
each result is read on the 200 unseen lines and timed beside the original, as int8_ppocr.py
does. A tool that is not installed is skipped and said so (they pin their own dependencies,
so a separate virtual environment is the safe place for them).

    python benchmarks/int8_anchors.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import corpus  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import text_lines  # noqa: E402

from onnxc.compiler import runtime  # noqa: E402
from onnxc.compiler.bench import bench  # noqa: E402


def with_nncf(model: onnx.ModelProto, x_cal: np.ndarray, out: Path) -> str:
    import nncf

    dataset = nncf.Dataset(list(x_cal), lambda line: {"x": line[None]})
    quantized = nncf.quantize(model, dataset, subset_size=len(x_cal))
    onnx.save(quantized, str(out))
    return f"nncf {nncf.__version__} (default: min/max, fast bias correction)"


def with_aimet(model: onnx.ModelProto, x_cal: np.ndarray, out: Path) -> str:
    import aimet_onnx
    from aimet_onnx.cross_layer_equalization import equalize_model
    from aimet_onnx.quantsim import QuantizationSimModel

    equalize_model(model)
    sim = QuantizationSimModel(model)
    sim.compute_encodings([{"x": line[None]} for line in x_cal])
    onnx.save(sim.to_onnx_qdq(), str(out))
    return f"aimet-onnx {getattr(aimet_onnx, '__version__', '?')} (CLE, quantsim min/max)"


def main() -> int:
    source = corpus.path("ppocr_rec")
    original = onnx.load(str(source))
    alphabet = text_lines.characters(original)
    x_cal, _ = text_lines.dataset(128, seed=0)
    x_test, texts = text_lines.dataset(200, seed=1)
    work = Path(tempfile.mkdtemp(prefix="int8_anchors."))

    def read(path: Path) -> float:
        sess = runtime.session(path)
        fixed = sess.get_inputs()[0].shape[0]
        step = fixed if isinstance(fixed, int) and fixed > 0 else 20
        out = np.concatenate([sess.run(None, {"x": x_test[i:i + step]})[0] for i in range(0, len(x_test), step)])
        return text_lines.line_accuracy(text_lines.decode(out, alphabet), texts)

    rows = []
    for name, fn in (("nncf", with_nncf), ("aimet", with_aimet)):
        out = work / f"{name}.onnx"
        start = time.perf_counter()
        try:
            label = fn(onnx.load(str(source)), x_cal, out)
        except ImportError as exc:
            print(f"{name}: not installed ({exc}); skipped")
            continue
        except Exception as exc:  # a third-party tool failing on this model is a result too
            print(f"{name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        if not out.exists():
            found = sorted(work.glob(f"{name}*.onnx"))
            if not found:
                print(f"{name}: wrote no model")
                continue
            out = found[0]
        rows.append((label, out, time.perf_counter() - start))
    if not rows:
        return 0
    timings = bench([source] + [r[1] for r in rows], {"x": x_test[:1]}, runs=30, warmup=3)
    print(f"{'':60} {'lines':>7} {'latency':>8} {'file':>6} {'s':>5}")
    print(f"{'float (original)':60} {100 * read(source):6.1f}% {1.0:7.3f}x {1.0:5.3f}x")
    for (label, out, seconds), timing in zip(rows, timings[1:]):
        print(f"{label:60} {100 * read(out):6.1f}% {timing.ratio:7.3f}x "
              f"{out.stat().st_size / source.stat().st_size:5.3f}x {seconds:5.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
