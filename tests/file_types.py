"""Real files of known types for magika's content-type model (`magika` in the corpus), built offline.

Files are found on this machine: the running Python's standard library and site-packages, and
/usr/share and /usr/lib (Python sources and stubs, JSON, PNG, gzip, ELF shared objects, HTML,
XML, SVG, CSS, C/C++, Fortran, CMake, SQL, Perl, bytecode, fonts, certificates, ...). A type with
no file here is left out (the dataset says how many files each type has). Each file becomes
magika 1.0.3's model input exactly as `Magika._extract_features_from_seekable` builds it (its
`standard_v3_3` config: the first and last 4096 bytes, whitespace-stripped, 1024 of each, padded
with token 256), and the model's probabilities become labels as
`Magika._get_output_label_from_dl_label_and_score` does in its default high-confidence mode
(per-type thresholds, the overwrite map, txt/unknown below the threshold). Files magika would
not give the model (fewer than 8 bytes after stripping) are skipped, as magika does.

    data = dataset(per_type=6)          # FileSet: features [N, 2048] int32, paths, types, split
    cal = data.subset("calibration")    # split by a hash of each file's directory: no folder in both
    labels(model_outputs)               # magika's output label per file

`type_error` is a `--metric` (`file_types:type_error` with tests/ on the path): the fraction of
files whose output label differs from the reference model's.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import corpus
import numpy as np

# Type -> extensions looked for. A type's expected label is the one model label whose extension
# list in magika's knowledge base holds the extension (none when several or none do, e.g. .h).
TYPES: dict[str, tuple[str, ...]] = {
    "python": ("py",), "pyi": ("pyi",), "json": ("json",), "png": ("png",), "gzip": ("gz",), "txt": ("txt",),
    "elf": ("so",), "html": ("html", "htm"), "xml": ("xml",), "svg": ("svg",), "csv": ("csv",), "css": ("css",),
    "toml": ("toml",), "markdown": ("md",), "rst": ("rst",), "c": ("c",), "h": ("h",), "cpp": ("cpp", "cc", "hpp"),
    "fortran": ("f90",), "cmake": ("cmake",), "sql": ("sql",), "perl": ("pl", "pm"), "pyc": ("pyc",),
    "ttf": ("ttf",), "wav": ("wav",), "jar": ("jar",), "zip": ("zip", "whl"), "pem": ("pem",),
    "javascript": ("js",), "shell": ("sh",), "yaml": ("yaml", "yml"), "ini": ("ini", "cfg"), "tcl": ("tcl",),
    "postscript": ("ps",), "npy": ("npy",), "npz": ("npz",), "pickle": ("pkl",), "onnx": ("onnx",),
    "pdf": ("pdf",), "jpeg": ("jpg", "jpeg"), "gif": ("gif",), "ico": ("ico",), "bzip": ("bz2",), "xz": ("xz",),
    "woff": ("woff",), "woff2": ("woff2",), "tar": ("tar",), "batch": ("bat",),
}
SPLITS = ("calibration", "test")
WHITESPACE = b" \t\n\r\x0b\x0c"  # what bytes.strip() removes


def roots() -> list[Path]:
    """Where files are looked for: the standard library (with site-packages), /usr/share, /usr/lib."""
    paths = sysconfig.get_paths()
    found = [Path(paths["stdlib"]), Path(paths["purelib"]), Path("/usr/share"), Path("/usr/lib")]
    return _outermost([p for p in found if p.is_dir()])


def _outermost(folders: list[Path]) -> list[Path]:
    """The folders without those inside another (site-packages lives in the standard library's)."""
    real = [p.resolve() for p in folders]
    return [p for p, r in zip(folders, real)
            if r not in real[:real.index(r)] and not any(o != r and o in r.parents for o in real)]


# ---- magika's pipeline -------------------------------------------------------------------------
@lru_cache(maxsize=1)
def config() -> dict:
    """magika 1.0.3's standard_v3_3 config (labels, window sizes, padding, thresholds, overwrite map)."""
    corpus.path("magika")
    return json.loads((corpus.directory() / "magika_config.json").read_text())


@lru_cache(maxsize=1)
def knowledge() -> dict:
    """magika's content-type knowledge base: extensions and text/binary per label."""
    corpus.path("magika")
    return json.loads((corpus.directory() / "magika_content_types.json").read_text())


def features(path: Path) -> np.ndarray | None:
    """The model's input row for one file (`Magika._extract_features_from_seekable`), or None when
    magika would not run the model on it (`_get_result_or_features_from_seekable`: under 8 bytes,
    or padding at byte 8 after stripping)."""
    c = config()
    beg_size, end_size, pad, block = c["beg_size"], c["end_size"], c["padding_token"], c["block_size"]
    size = path.stat().st_size
    if size < c["min_file_size_for_dl"]:
        return None
    with open(path, "rb") as f:
        n = min(block, size)
        head = f.read(n)
        f.seek(size - n)
        tail = f.read(n)
    beg = list(head.lstrip(WHITESPACE)[:beg_size])
    beg += [pad] * (beg_size - len(beg))
    end = list(tail.rstrip(WHITESPACE)[-end_size:]) if end_size else []
    end = [pad] * (end_size - len(end)) + end
    if beg[c["min_file_size_for_dl"] - 1] == pad:
        return None
    return np.array(beg + end, dtype=np.int32)


def labels(outputs) -> list[str]:
    """magika's output label per row of the model's probabilities (high-confidence mode)."""
    c = config()
    kb = knowledge()
    probs = np.asarray(outputs[0] if isinstance(outputs, (list, tuple)) else outputs)
    out = []
    for row in probs:
        dl = c["target_labels_space"][int(row.argmax())]
        label = c["overwrite_map"].get(dl, dl)
        if row.max() < c["thresholds"].get(dl, c["medium_confidence_threshold"]):
            label = "txt" if kb[label]["is_text"] else "unknown"
        out.append(label)
    return out


def expected(ext: str) -> str | None:
    """The label an extension implies when exactly one of the model's labels claims it."""
    claims = [label for label in config()["target_labels_space"] if ext in knowledge()[label]["extensions"]]
    return claims[0] if len(claims) == 1 else None


def type_error(reference_outputs: list, candidate_outputs: list) -> float:
    """A `--metric`: the fraction of files whose magika label differs from the reference model's."""
    return float(np.mean([a != b for a, b in zip(labels(reference_outputs), labels(candidate_outputs))]))


# ---- the dataset -------------------------------------------------------------------------------
@dataclass
class FileSet:
    features: np.ndarray  # [N, 2048] int32, the model's input `bytes`
    paths: list[str]
    types: list[str]  # our type name (TYPES key)
    expected: list[str | None]  # extension-derived label where unambiguous
    split: list[str]

    def subset(self, split: str) -> FileSet:
        keep = [i for i, s in enumerate(self.split) if s == split]
        return FileSet(self.features[keep], [self.paths[i] for i in keep], [self.types[i] for i in keep],
                       [self.expected[i] for i in keep], [split] * len(keep))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.types:
            out[t] = out.get(t, 0) + 1
        return out


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _split_of(path: str) -> str:
    """calibration or test from a hash of the file's directory (3 of 5 directories calibrate)."""
    return SPLITS[int(_digest(os.path.dirname(path))[:8], 16) % 5 >= 3]


@lru_cache(maxsize=2)
def _found(top: tuple[Path, ...]) -> dict[str, list[str]]:
    """Every regular file under `top` whose extension a type wants, by type (symlinks skipped)."""
    by_ext = {e: t for t, exts in TYPES.items() for e in exts}
    out: dict[str, list[str]] = {t: [] for t in TYPES}
    for root in top:
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                ext = name.rsplit(".", 1)[-1] if "." in name else ""
                kind = by_ext.get(ext)
                path = os.path.join(folder, name)
                if kind and not os.path.islink(path):
                    out[kind].append(path)
    return out


def dataset(per_type: int = 6, types: tuple[str, ...] | None = None, search: list[Path] | None = None) -> FileSet:
    """Up to `per_type` files of each type in each split, chosen by a hash of their path (the same
    files on every machine with the same install), with magika's features."""
    found = _found(tuple(search or roots()))
    rows, paths, kinds, wanted, splits = [], [], [], [], []
    for kind in types or tuple(TYPES):
        taken = {s: 0 for s in SPLITS}
        for path in sorted(found.get(kind, []), key=_digest):
            split = _split_of(path)
            if taken[split] >= per_type:
                if all(v >= per_type for v in taken.values()):
                    break
                continue
            try:
                x = features(Path(path))
            except OSError:
                continue
            if x is None:
                continue
            taken[split] += 1
            rows.append(x)
            paths.append(path)
            kinds.append(kind)
            wanted.append(expected(path.rsplit(".", 1)[-1]))
            splits.append(split)
    feats = np.stack(rows) if rows else np.zeros((0, 2 * config()["beg_size"]), np.int32)
    return FileSet(feats, paths, kinds, wanted, splits)
