"""Real text lines for the public PP-OCRv4 recognizer (`ppocr_rec` in the corpus), built offline.

Lines of English words, numbers and punctuation are rendered with Pillow's scalable default font
at varied sizes, margins and grey levels, then preprocessed as rapidocr does it (height 48 keeping
the aspect ratio, width at most 320, (x/255 - 0.5) / 0.5, right-padded with zeros). The model's
output is [N, T, 6625] CTC probabilities over the dictionary in its `character` metadata, with
the blank first and a space last; `decode` is rapidocr's greedy CTC decoding.

    x, texts = dataset(128, seed=0)           # calibration lines
    read = decode(model_outputs, characters(model))
    line_accuracy(read, texts)                # fraction of lines read exactly

`line_error` is a `--metric` (`text_lines:line_error` with tests/ on the path): the fraction of
lines whose decoded text differs from the reference model's.
"""

from __future__ import annotations

import numpy as np
import onnx
from PIL import Image, ImageDraw, ImageFont

HEIGHT, WIDTH = 48, 320
WORDS = ("the of and to in is that for it as was with be by on not this are or from at which have an they you "
         "were all there would their we been has when who will more no if out so said what up its about into than "
         "them can only other new some could time these two may then do first any now such like our over even most "
         "made after also did many before must through back years where much your way well down should because each "
         "just those people how too little state good very make world still own see work long get here between both "
         "life being under never day same another know while last invoice total page section table figure report "
         "order number date amount account name address phone email model results value sample").split()


def _word(rng: np.random.Generator) -> str:
    kind = rng.random()
    if kind < 0.12:
        return str(int(rng.integers(0, 10_000)))
    if kind < 0.18:
        return f"{rng.integers(0, 1000)}.{rng.integers(0, 100):02d}"
    word = str(rng.choice(WORDS))
    if rng.random() < 0.2:
        word = word.capitalize()
    if rng.random() < 0.1:
        word += str(rng.choice(list(",.:;")))
    return word


def random_text(rng: np.random.Generator) -> str:
    return " ".join(_word(rng) for _ in range(int(rng.integers(2, 6))))


def render(text: str, rng: np.random.Generator) -> Image.Image:
    """`text` on a light background in a dark grey, at a random size with random margins."""
    font = ImageFont.load_default(size=int(rng.integers(24, 40)))
    left, top, right, bottom = font.getbbox(text)
    mx, my = int(rng.integers(4, 16)), int(rng.integers(3, 10))
    background = int(rng.integers(215, 256))
    img = Image.new("RGB", (right - left + 2 * mx, bottom - top + 2 * my), (background,) * 3)
    ink = int(rng.integers(0, 70))
    ImageDraw.Draw(img).text((mx - left, my - top), text, fill=(ink,) * 3, font=font)
    return img


def preprocess(img: Image.Image) -> np.ndarray:
    """rapidocr's recognizer input: [3, 48, 320] in [-1, 1], the line left-aligned, zero padding."""
    w, h = img.size
    width = min(WIDTH, int(np.ceil(HEIGHT * w / h)))
    x = np.asarray(img.convert("RGB").resize((width, HEIGHT), Image.BILINEAR), np.float32) / 255.0
    out = np.zeros((3, HEIGHT, WIDTH), np.float32)
    out[:, :, :width] = ((x - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def dataset(count: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """`count` rendered lines as a [count, 3, 48, 320] batch and their texts; lines wider than the
    model's 320 columns after resizing are redrawn (rapidocr would split them)."""
    rng = np.random.default_rng(seed)
    xs, texts = [], []
    while len(xs) < count:
        text = random_text(rng)
        img = render(text, rng)
        if HEIGHT * img.size[0] / img.size[1] > WIDTH:
            continue
        xs.append(preprocess(img))
        texts.append(text)
    return np.stack(xs), texts


def own_widths(count: int, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Like `dataset`, but each line as a [1, 3, 48, W] array at its own width (rounded up to a
    multiple of 8), as rapidocr feeds a line alone: a calibration folder of such lines has
    symbolic widths."""
    rng = np.random.default_rng(seed)
    xs, texts = [], []
    while len(xs) < count:
        text = random_text(rng)
        img = render(text, rng)
        width = HEIGHT * img.size[0] / img.size[1]
        if width > WIDTH:
            continue
        xs.append(preprocess(img)[None, :, :, :min(WIDTH, int(np.ceil(np.ceil(width) / 8) * 8))])
        texts.append(text)
    return xs, texts


def characters(model: onnx.ModelProto) -> list[str]:
    """The CTC alphabet: blank, the `character` metadata's lines, then a space (rapidocr's order)."""
    meta = {p.key: p.value for p in model.metadata_props}
    return ["blank"] + meta["character"].splitlines() + [" "]


def decode(probabilities: np.ndarray, alphabet: list[str]) -> list[str]:
    """Greedy CTC: argmax per step, repeats collapsed, blanks dropped, outer spaces stripped."""
    best = np.asarray(probabilities).argmax(axis=-1)
    out = []
    for row in best:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        out.append("".join(alphabet[i] for i in row[keep & (row != 0)]).strip())
    return out


def line_accuracy(read: list[str], texts: list[str]) -> float:
    return float(np.mean([a == b for a, b in zip(read, texts)]))


def _decoded_indices(outputs: list[np.ndarray]) -> list[tuple]:
    """Decoded lines as index tuples (no alphabet needed to compare two models' readings), outer
    spaces (the last class) stripped as `decode` strips them."""
    probabilities = np.asarray(outputs[0])
    space = probabilities.shape[-1] - 1
    out = []
    for row in probabilities.argmax(axis=-1):
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        line = [int(i) for i in row[keep & (row != 0)]]
        while line and line[0] == space:
            line.pop(0)
        while line and line[-1] == space:
            line.pop()
        out.append(tuple(line))
    return out


def line_error(reference_outputs: list[np.ndarray], candidate_outputs: list[np.ndarray]) -> float:
    """A `--metric`: the fraction of lines the candidate reads differently from the reference."""
    ref = _decoded_indices(reference_outputs)
    got = _decoded_indices(candidate_outputs)
    return float(np.mean([a != b for a, b in zip(ref, got)]))
