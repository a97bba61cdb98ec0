"""Refits on the real PP-OCRv4 text-line recognizer, judged by what it is for: lines read exactly.

The public `ppocr_rec` (scripts/fetch_corpus.py) is calibrated on 128 rendered lines
(tests/text_lines.py, seed 0; 96 fit, 32 held out as `optimize` splits them) and read on a
disjoint set of lines (seed 1). For each technique, three variants side by side:

- `unrefitted`: the rewrite without its data refit (prune: sliced weights; cluster: no bias
  correction; svd/tucker: factors of the weights alone, not fitted to the layer inputs);
- `in-sample`: the refit as it was before held-out judging (every choice made on the samples it
  was fitted to: the pass is given no held-out samples; factorization and clustering fit every
  layer to the unrewritten model's inputs, `recapture=false`);
- `held-out`: the refit at the defaults: judged on the held-out calibration samples, locally and
  at the model's outputs, falling back where it does not generalize (compiler/holdout.py), and
  fitted layer by layer to the inputs each layer sees in the rewritten model (`recapture`).

Printed per row: line accuracy on the test lines (the original reads ~98%), relative L2 of the CTC
probabilities against the original, MACs ratio, seconds.

    python benchmarks/refit_recognizer.py [--test 200] [--only prune:ratio=0.1,cluster:bits=4] [--own-widths]

With `--own-widths` every line keeps its own width (a calibration folder of such lines has a
symbolic width, which is how the issue calibrated the recognizer).

Why cluster's `recapture` is off by default (commit 1f2cd25, 200 test lines): at `cluster:bits=4`
the layer-by-layer correction from the clustered model's own activations read 0% of the lines
(relative L2 0.816) where the one-shot held-out-judged correction reads 59% (0.465); the cause is
not understood yet.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import corpus  # noqa: E402
import numpy as np  # noqa: E402
import text_lines  # noqa: E402

from onnxc.compiler import calibration as calib  # noqa: E402
from onnxc.compiler import runtime  # noqa: E402
from onnxc.compiler.canonical import canonicalize  # noqa: E402
from onnxc.compiler.cost import model_cost  # noqa: E402
from onnxc.compiler.model import clone, load  # noqa: E402
from onnxc.compiler.passes import PassContext, create  # noqa: E402
from onnxc.compiler.recipe import parse_spec  # noqa: E402

# The group the issue pruned alone (240 -> 180 channels) and the last one before the neck (60 -> 54).
SPECS = ["prune:ratio=0.1", "prune:ratio=0.2", "prune:ratio=0.3", "prune-group:p2o.Conv.18=0.25",
         "prune-group:p2o.Conv.33=0.1", "tucker:ratio=0.5", "svd:ratio=0.5", "cluster:bits=4", "cluster:bits=6"]
UNREFITTED = {"prune": {"reconstruct": "false"}, "cluster": {"bias_correction": "false"},
              "svd": {"data_aware": "false"}, "tucker": {"data_aware": "false"}}
# What the refits were before held-out judging: no layer-by-layer recapture outside prune.
BEFORE = {"prune": {}, "cluster": {}, "svd": {"recapture": "false"},
          "tucker": {"recapture": "false"}}


def make_pass(spec: str, variant: str):
    if spec.startswith("prune-group:"):
        group, ratio = spec.split(":", 1)[1].split("=")
        p = create("prune", UNREFITTED["prune"] if variant == "unrefitted" else {})
        return replace(p, _levels={group: float(ratio)})
    pass_id, options = parse_spec(spec)
    extra = {"unrefitted": UNREFITTED, "in-sample": BEFORE}.get(variant, {})
    return create(pass_id, {**options, **extra.get(pass_id, {})})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--only", default="", help="comma-separated specs (default: all)")
    parser.add_argument("--variants", default="unrefitted,in-sample,held-out")
    parser.add_argument("--own-widths", action="store_true",
                        help="calibrate and test on lines at their own widths (a symbolic width), not padded")
    args = parser.parse_args(argv)
    original = load(corpus.path("ppocr_rec"))
    alphabet = text_lines.characters(original)
    if args.own_widths:
        lines, _ = text_lines.own_widths(args.calibration, seed=0)
        x_test, texts = text_lines.own_widths(args.test, seed=1)
        source = [{"x": x} for x in lines]
    else:
        x_cal, _ = text_lines.dataset(args.calibration, seed=0)
        x_test, texts = text_lines.dataset(args.test, seed=1)
        source = {"x": x_cal}
    cal = calib.make_calibration(canonicalize(original, {}, infer=False), source, seed=0)
    shapes = calib.working_shapes(original, cal, {})
    canonical = canonicalize(original, shapes)
    in_sample = calib.Calibration(cal.train, cal.train, cal.source)  # nothing held out: the old behaviour
    base_macs = model_cost(canonical, cal.cost_shapes()).totals()["macs"]
    def outputs(model) -> list[np.ndarray]:
        if not args.own_widths:
            return [next(iter(runtime.run(model, {"x": x_test}).values()))]
        sess = runtime.session(model)
        return [sess.run(None, {"x": x})[0] for x in x_test]

    reference = outputs(canonical)

    def score(model) -> tuple[float, float]:
        out = outputs(model)
        rel = float(np.sqrt(sum(np.sum((o - r) ** 2) for o, r in zip(out, reference))
                            / sum(np.sum(r ** 2) for r in reference)))
        read = [line for o in out for line in text_lines.decode(o, alphabet)]
        return text_lines.line_accuracy(read, texts), rel

    acc, _ = score(canonical)
    print(f"ppocr_rec: {args.calibration} calibration lines ({cal.train.count} fit, {cal.validation.count} held out), "
          f"{args.test} test lines of another seed; the original reads {100 * acc:.1f}%")
    print(f"{'technique':30} {'variant':11} {'lines':>7} {'rel-L2':>7} {'MACs':>6} {'seconds':>8}")
    specs = args.only.split(",") if args.only else SPECS
    for spec in specs:
        for variant in args.variants.split(","):
            p = make_pass(spec, variant)
            ctx = PassContext(calibration=in_sample if variant == "in-sample" else cal, seed=0)
            start = time.perf_counter()
            result = p.run(clone(canonical), ctx)
            seconds = time.perf_counter() - start
            model = canonicalize(result.model, shapes) if result.modified else canonical
            acc, rel = score(model)
            macs = model_cost(model, cal.cost_shapes()).totals()["macs"] / base_macs
            print(f"{spec:30} {variant:11} {100 * acc:6.1f}% {rel:7.3f} {macs:5.3f}x {seconds:8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
