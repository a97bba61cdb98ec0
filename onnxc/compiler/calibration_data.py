"""Calibration data as users have it, read and checked against the model's inputs.

- a `.npz`: one array per graph input, keyed by input name, samples on axis 0;
- a `.npy`: the one input of a single-input model, samples on axis 0;
- a folder of `.npy` / `.npz` files, one or more samples each, whose dynamic dims may differ from
  file to file (text lines of different widths, audio of different lengths);
- a folder of images, read with a `--preprocess` spec (see `preprocess.py`);
- in the library, also a mapping of arrays or any iterable of feed dicts (as NNCF's `Dataset`).

Everything becomes `Samples`; a mistake (wrong keys, rank, fixed dim or dtype) is one line that
names the file and what the model expects.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxc.compiler import layout
from onnxc.compiler import preprocess as prep
from onnxc.compiler.samples import Samples
from onnxc.errors import OnnxcError, UsageError

Source = str | os.PathLike | Samples | Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | str | None, ...]  # None or a name for a dynamic dim (-1, 0 and '?' included)
    dtype: np.dtype
    batch_axis: int | None = 0  # where the model takes its samples (None: the same for every sample)

    def sample_dims(self) -> tuple[int | str | None, ...]:
        """The dims that follow the sample axis inside the compiler (the batch axis taken out)."""
        return tuple(layout.internal_dims(self.shape, self.batch_axis))


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph's real inputs (initializers excluded), with shapes and numpy dtypes."""
    inits = {t.name for t in model.graph.initializer}
    axes = layout.model_input_axes(model)
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                     for d in tt.shape.dim)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype(np.float32)
        specs.append(InputSpec(vi.name, dims, dtype, axes.get(vi.name, 0)))
    return specs


def load(source: Source, model: onnx.ModelProto, preprocess: str | None = None) -> tuple[Samples, str]:
    """Read `source` into checked `Samples`; returns them with a label for reports."""
    check_preprocess(source, preprocess)
    specs = input_specs(model)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = str(path)
        if not path.exists():
            raise OnnxcError(f"{path}: no such calibration file or folder")
        if path.is_dir():
            return _load_folder(path, specs, preprocess), label  # checked file by file
        elif path.suffix.lower() == ".npy":
            groups = [_npy_feed(path, specs)]
        elif path.suffix.lower() in prep.IMAGE_SUFFIXES:
            groups = _load_images([path], specs, preprocess).groups
        else:
            groups = [load_npz_arrays(path)]
    elif isinstance(source, Samples):  # the compiler's own: samples already on axis 0
        return check_keys(source, specs, "samples"), "samples"
    elif isinstance(source, Mapping):
        groups, label = [{k: np.asarray(v) for k, v in source.items()}], "arrays"
    else:
        try:
            feeds = iter(source)
        except TypeError:
            raise OnnxcError(f"calibration must be a path, a mapping of arrays or an iterable of feed dicts, "
                             f"got {type(source).__name__}") from None
        samples = Samples.from_feeds(check([f], specs, "feeds").groups[0] for f in feeds)
        if samples.count == 0:
            raise OnnxcError("feeds: holds no samples")
        return samples, "feeds"
    return check(groups, specs, label), label


def check_preprocess(source: Source | None, preprocess: str | None) -> None:
    """A `--preprocess` spec is checked (unknown keys name the valid ones) and refused where it
    cannot apply: it reads images, so with random inputs, arrays or `.npy`/`.npz` files it would
    be silently ignored, and a user who gave it believes it did something."""
    if not preprocess:
        return
    prep.parse(preprocess)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir() or not path.exists() or path.suffix.lower() in prep.IMAGE_SUFFIXES:
            return  # a folder is judged by what it holds (_load_folder); a missing path is load's error
        what = f"{path} is a {path.suffix or 'suffixless'} file"
    elif source is None:
        what = "there is no --calibration (inputs are drawn at random)"
    else:
        what = f"the calibration data are {type(source).__name__} arrays, not images"
    raise UsageError(f"--preprocess applies only to image calibration (a folder of images); {what}")


def load_npz(path: str | os.PathLike, model: onnx.ModelProto) -> Samples:
    """A calibration `.npz` checked against the model's inputs (keys, ranks, dims, dtypes)."""
    return check([load_npz_arrays(Path(path))], input_specs(model), str(path))


def load_npz_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise OnnxcError(f"{path}: no such calibration file")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive of arrays keyed by input name")
        with data:
            return {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise OnnxcError(f"{path}: not a readable .npz calibration file ({exc})") from None


def check_keys(samples: Samples | Mapping, specs: Sequence[InputSpec], label: str):
    """The keys must be the model's inputs, no more and no fewer."""
    names = [s.name for s in specs]
    if set(samples) != set(names):
        missing, extra = sorted(set(names) - set(samples)), sorted(set(samples) - set(names))
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)}"]
                                                                          if extra else [])
        raise OnnxcError(f"{label}: calibration keys must be the model inputs ({', '.join(names)}): "
                         f"{'; '.join(parts)}")
    return samples


def check(groups: Sequence[Mapping[str, np.ndarray]], specs: Sequence[InputSpec], label: str) -> Samples:
    """Keys, ranks, fixed dims and dtypes against the model inputs (float32 <-> float64 and other
    same-kind casts are made, not refused: a float64 .npy is what numpy writes by default).

    Arrays come in the model's layout, samples stacked on each input's batch axis; an input
    without one (a scalar sample rate) is given once for all samples, or once per sample on a
    leading axis. They leave with samples on axis 0 (`layout`)."""
    names = {s.name: s for s in specs}
    out_groups = []
    for group in groups:
        check_keys(group, specs, label)
        counts = {int(arr.shape[names[k].batch_axis]) for k, arr in group.items()
                  if names[k].batch_axis is not None and np.ndim(arr) > names[k].batch_axis}
        if len(counts) > 1:
            raise OnnxcError(f"{label}: inputs disagree on the number of samples on their batch axes: "
                             f"{sorted(counts)}")
        per_sample = {len(arr) for k, arr in group.items()
                      if names[k].batch_axis is None and np.ndim(arr) == len(names[k].shape) + 1}
        count = counts.pop() if counts else (per_sample.pop() if len(per_sample) == 1 else 1)
        fixed = {}
        for name, arr in group.items():
            fixed[name] = _checked(np.asarray(arr), names[name], label, count)
        out_groups.append(fixed)
    out = Samples(out_groups)
    if out.count == 0:
        raise OnnxcError(f"{label}: holds no samples")
    return out


def _checked(arr: np.ndarray, spec: InputSpec, label: str, count: int) -> np.ndarray:
    """One input's array, checked against its spec, with its samples moved to axis 0."""
    name = spec.name
    if arr.dtype != spec.dtype:
        if arr.dtype.kind == spec.dtype.kind:
            arr = arr.astype(spec.dtype)
        else:
            raise OnnxcError(f"{label}: '{name}' has dtype {arr.dtype}, the model expects {spec.dtype}")
    shared = spec.batch_axis is None
    rank = len(spec.shape)
    if shared and arr.ndim == rank + 1:  # one value per sample
        if len(arr) != count:
            raise OnnxcError(f"{label}: '{name}' holds {len(arr)} values, the other inputs {count} samples")
        body = arr.shape[1:]
    elif spec.shape and arr.ndim != rank or shared and arr.ndim != rank:
        where = "the same for every sample" if shared else f"samples on axis {spec.batch_axis}"
        raise OnnxcError(f"{label}: '{name}' has shape {arr.shape}, the model expects rank "
                         f"{rank} ({fmt_shape(spec.shape)}) with {where}")
    else:
        body = arr.shape
    for i, d in enumerate(spec.shape):
        if isinstance(d, int) and i != spec.batch_axis and i < len(body) and body[i] != d:
            raise OnnxcError(f"{label}: '{name}' has shape {arr.shape}, the model expects {fmt_shape(spec.shape)}")
    if shared and arr.ndim == rank + 1:
        return arr
    return layout.to_internal(arr, spec.batch_axis, count)


def fmt_shape(shape: Sequence) -> str:
    return "[" + ", ".join(str(d) if d not in (None, "") else "?" for d in shape) + "]"


# ---- folders ---------------------------------------------------------------------------------
def _load_folder(folder: Path, specs: Sequence[InputSpec], preprocess: str | None) -> Samples:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    kinds = {_kind(p) for p in files}
    if not files:
        raise OnnxcError(f"{folder}: calibration folder is empty")
    if None in kinds:
        odd = next(p.name for p in files if _kind(p) is None)
        raise OnnxcError(f"{folder}: '{odd}' is not a .npy, .npz or image file")
    if len(kinds) > 1:
        raise OnnxcError(f"{folder}: mixes {' and '.join(sorted(kinds))} files; use one kind")
    kind = kinds.pop()
    if kind == "image":
        return _load_images(files, specs, preprocess)
    if preprocess:
        raise UsageError(f"--preprocess applies only to image calibration (a folder of images); "
                         f"{folder} holds {kind} files")
    read = _npy_feed if kind == "npy" else _npz_feed
    return Samples.from_feeds(check([read(p, specs)], specs, str(p)).groups[0] for p in files)


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        return suffix[1:]
    return "image" if suffix in prep.IMAGE_SUFFIXES else None


def _npy_feed(path: Path, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    if len(specs) != 1:
        raise OnnxcError(f"{path}: a .npy holds one input, the model has {len(specs)} "
                         f"({', '.join(s.name for s in specs)}): use .npz files keyed by input name")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise OnnxcError(f"{path}: not a readable .npy file ({exc})") from None
    if not isinstance(arr, np.ndarray):
        raise OnnxcError(f"{path}: an .npz archive, not a .npy array")
    return {specs[0].name: _with_sample_axis(arr, specs[0])}


def _npz_feed(path: Path, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    by_name = {s.name: s for s in specs}
    return {k: _with_sample_axis(v, by_name[k]) if k in by_name else v for k, v in load_npz_arrays(path).items()}


def _with_sample_axis(arr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A file holding one sample without the batch axis gets it added."""
    if spec.batch_axis is None or not spec.shape or arr.ndim != len(spec.shape) - 1:
        return arr
    return np.expand_dims(arr, spec.batch_axis)


def _load_images(files: Sequence[Path], specs: Sequence[InputSpec], preprocess: str | None) -> Samples:
    if len(specs) != 1:
        raise OnnxcError(f"images calibrate single-input models; this one has {', '.join(s.name for s in specs)}")
    if specs[0].dtype.kind != "f":
        raise OnnxcError(f"images need a float input; '{specs[0].name}' is {specs[0].dtype}")
    spec = prep.parse(preprocess).for_input(specs[0].shape)
    return Samples.from_feeds({specs[0].name: spec.load(p, specs[0].dtype)} for p in files)
