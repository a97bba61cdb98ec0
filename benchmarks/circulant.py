"""Block-circulant substitution (`circulant` pass): accuracy vs block size, and form latency.

Part 1 -- the MLP sample (samples/mlp.onnx) with the sample calibration set, for block sizes
4, 8, 16 and 32: held-out accuracy, total parameters (`model_cost` and the stored count from
the pass's report) and local errors, for the projection alone and the data-aware fit. The
accuracy guard is disabled here (max_layer_error=1e9) so every eligible layer is rewritten and
the numbers show the method, not the guard.

Part 2 -- onnxruntime latency of a single K x K layer (K = 256, 1024, 4096) in each form side by
side with the dense layer, at batch 1 and batch 64, for block sizes 8 and 32 (one thread).

Part 3 -- onnxruntime latency of one pointwise conv (batch 1, the channel counts and feature maps
of a text-line recognizer's pointwise convs) in its two forms against the dense conv, for block
sizes 4, 8 and 16, with the MAC ratio the fft form is counted at: whether the MACs it removes
(what a MACs target plans it for) are time saved.

    python benchmarks/circulant.py            # all parts (a few minutes on 2 cores)
    python benchmarks/circulant.py accuracy   # part 1 only
    python benchmarks/circulant.py latency    # part 2 only
    python benchmarks/circulant.py convs      # part 3 only
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from sample_data import CALIBRATION, accuracy, sample_path  # noqa: E402

from onnxc.api import optimize  # noqa: E402
from onnxc.compiler.bench import bench  # noqa: E402
from onnxc.compiler.canonical import canonicalize  # noqa: E402
from onnxc.compiler.cost import model_cost  # noqa: E402
from onnxc.compiler.model import load  # noqa: E402
from onnxc.passes import _circulant_fit as fit  # noqa: E402
from onnxc.passes import _circulant_forms as forms  # noqa: E402

BLOCKS = (4, 8, 16, 32)


def accuracy_table() -> None:
    path = sample_path("mlp")
    base_params = model_cost(canonicalize(load(path))).params
    base_acc = accuracy(path)
    print(f"MLP sample: {base_params} params, held-out accuracy {base_acc:.2f}%")
    print(f"{'block':>5} {'fit':>11} {'accuracy':>9} {'drop':>6} {'params':>8} {'ratio':>6} "
          f"{'stored':>8} {'ratio':>6}  local errors")
    for block in BLOCKS:
        for aware in (False, True):
            spec = f"circulant:block={block},max_layer_error=1e9,form=shift,data_aware={str(aware).lower()}"
            result = optimize(path, passes=[spec], calibration=CALIBRATION)
            record = result.report.passes[0]
            params = model_cost(result.model).params
            stored = base_params - sum(c.before["params"] - c.after["params"] for c in record.changes)
            acc = accuracy(result.model)
            errors = " ".join(f"{c.error:.3f}" for c in record.changes) or record.status
            print(f"{block:>5} {'data-aware' if aware else 'projection':>11} {acc:>8.2f}% {acc - base_acc:>+6.2f} "
                  f"{params:>8} {params / base_params:>6.3f} {stored:>8} {stored / base_params:>6.3f}  {errors}")


def latency_table() -> None:
    rng = np.random.default_rng(0)
    print("\nlatency of one K x K layer, median ms over interleaved runs (ratio to dense), 1 thread")
    print(f"{'K':>5} {'batch':>5} {'block':>5}  " + "  ".join(f"{f:>16}" for f in ("dense", *forms.FORMS)))
    for k in (256, 1024, 4096):
        for batch in (1, 64):
            for block in (8, 32):
                lay = fit.Layout(block, k, k, in_strided=True, out_strided=True)
                c = rng.standard_normal((lay.q, lay.p, block)).astype(np.float32) / np.sqrt(k)
                bias = rng.standard_normal(k).astype(np.float32)
                layer = forms.CirculantLayer(c, bias, lay, k, k)
                shape = [batch, k]
                models = [forms.dense_standalone(fit.dense(c, lay), bias, shape, 17, 8)]
                models += [forms.standalone(f, layer, shape, 17, 8) for f in forms.FORMS]
                x = {"x": rng.standard_normal(shape).astype(np.float32)}
                runs = 30 if k * k * batch < 2**24 else 10
                timings = bench(models, x, ["dense", *forms.FORMS], runs=runs, warmup=3, threads=1)
                cells = "  ".join(f"{t.median_ms:>8.3f} ({t.ratio:>4.2f})" for t in timings)
                print(f"{k:>5} {batch:>5} {block:>5}  {cells}", flush=True)


def conv_latency_table() -> None:
    rng = np.random.default_rng(0)
    print("\nlatency of one pointwise conv at batch 1, 10th percentile ms of interleaved runs (ratio to dense), "
          "1 thread")
    print(f"{'C_in':>5} {'C_out':>5} {'map':>7} {'block':>5}  " +
          "  ".join(f"{f:>16}" for f in ("dense", *forms.CONV_FORMS)) + "  fft MACs")
    for k, n, hw in ((64, 128, (12, 160)), (240, 240, (12, 80)), (480, 480, (6, 80))):
        shape = [1, k, *hw]
        x = {"x": rng.standard_normal(shape).astype(np.float32)}
        for block in (4, 8, 16):
            lay = fit.Layout(block, k, n, in_strided=False, out_strided=False)
            c = rng.standard_normal((lay.q, lay.p, block)).astype(np.float32) / np.sqrt(k)
            bias = rng.standard_normal(n).astype(np.float32)
            layer = forms.CirculantLayer(c, bias, lay, k, n)
            models = [forms.dense_standalone(fit.dense(c, lay), bias, shape, 17, 8, conv=True)]
            models += [forms.standalone(f, layer, shape, 17, 8, conv=True) for f in forms.CONV_FORMS]
            timings = bench(models, x, ["dense", *forms.CONV_FORMS], runs=30, warmup=3, threads=1)
            cells = "  ".join(f"{t.p10_ms:>8.3f} ({t.p10_ms / timings[0].p10_ms:>4.2f})" for t in timings)
            macs = [model_cost(m, {"x": shape}).totals()["macs"] for m in (models[0], models[-1])]
            print(f"{k:>5} {n:>5} {'x'.join(map(str, hw)):>7} {block:>5}  {cells}  {macs[1] / macs[0]:>8.2f}",
                  flush=True)


if __name__ == "__main__":
    parts = sys.argv[1:] or ["accuracy", "latency", "convs"]
    if "accuracy" in parts:
        accuracy_table()
    if "latency" in parts:
        latency_table()
    if "convs" in parts:
        conv_latency_table()
