"""magika's content-type model on real files of this machine: its inputs built as magika builds
them, and a size target that keeps its labels on files from directories it was not calibrated on."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import corpus
import file_types
import numpy as np
import pytest

from onnxc.api import optimize
from onnxc.compiler.model import load
from onnxc.compiler.runtime import run

PAD = 256
TYPES = ("python", "json", "png", "elf", "gzip", "html", "xml", "csv", "pyc", "zip", "txt", "markdown")


def test_features_strip_window_and_pad_as_magika(tmp_path):
    small = tmp_path / "small.txt"
    small.write_bytes(b"  \n hello world \n\n")
    x = file_types.features(small)
    beg, end = list(x[:1024]), list(x[1024:])
    assert beg == list(b"hello world \n\n") + [PAD] * (1024 - 14)  # lstripped, padded after
    assert end == [PAD] * (1024 - 15) + list(b"  \n hello world")  # rstripped, padded before
    big = tmp_path / "big.bin"
    data = bytes(range(256)) * 40  # 10240 bytes: only the first and last 4096 are read
    big.write_bytes(b"\t" * 3 + data + b" " * 5)
    x = file_types.features(big)
    assert list(x[:1024]) == list(data[:1024]) and list(x[1024:]) == list(data[-1024:])
    (tmp_path / "tiny").write_bytes(b"abcdefg")  # under 8 bytes: magika does not run the model
    (tmp_path / "blank").write_bytes(b"\n" * 20 + b"abc")  # under 8 bytes once stripped
    assert file_types.features(tmp_path / "tiny") is None and file_types.features(tmp_path / "blank") is None


def test_labels_apply_thresholds_and_overwrites():
    names = file_types.config()["target_labels_space"]
    rows = np.zeros((4, len(names)), np.float32)
    rows[0, names.index("python")] = 0.9  # over the default 0.5
    rows[1, names.index("markdown")] = 0.7  # under markdown's own 0.75: a text type -> txt
    rows[2, names.index("png")] = 0.4  # under 0.5: a binary type -> unknown
    rows[3, names.index("randomtxt")] = 0.99  # the overwrite map
    assert file_types.labels([rows]) == ["python", "txt", "unknown", "txt"]


@pytest.fixture(scope="module")
def files():
    paths = sysconfig.get_paths()
    search = file_types._outermost([Path(paths["stdlib"]), Path(paths["purelib"])])
    data = file_types.dataset(per_type=2, types=TYPES, search=search)
    return data.subset("calibration"), data.subset("test")


def test_size_target_keeps_labels_on_other_files(files, tmp_path):
    cal, test = files
    assert len(cal.paths) >= 16 and len(test.paths) >= 16
    np.savez(tmp_path / "cal.npz", bytes=cal.features)
    source = corpus.path("magika")
    out = tmp_path / "m.onnx"
    result = optimize(source, calibration=tmp_path / "cal.npz", target="size=0.3", passes=["cluster"],
                      cache_dir=tmp_path / "cache", output=out)
    alloc = result.report.allocation
    before, after = result.report.file_bytes["before"], result.report.file_bytes["after"]
    assert alloc["met"] and after <= 0.31 * before
    assert alloc["achieved"] == pytest.approx(after / before, abs=0.005)  # judged on the file, not tensors
    conv = {m["level"]: m["saving"]["bytes"] for m in alloc["sensitivity"]["measurements"]
            if m["name"].endswith("Conv_0/Conv2D")}
    weights = 512 * 256 * 5
    assert conv[6] - conv[8] >= 0.95 * weights * 2 / 8  # 6-bit codes take 6 bits, not a byte
    ref = file_types.labels(list(run(load(source), {"bytes": test.features}).values()))
    got = file_types.labels(list(run(load(out), {"bytes": test.features}).values()))
    assert np.mean([a == b for a, b in zip(ref, got)]) >= 0.95  # 8-bit where it matters: labels kept
