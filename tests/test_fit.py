"""`--fit`: compress until the linked Cortex-M firmware fits the device's flash and RAM."""

from __future__ import annotations

import json

import pytest
from sample_data import CALIBRATION, accuracy, sample_path

from onnxc.api import optimize
from onnxc.backends import ExportOptions
from onnxc.backends.c import fit as device
from onnxc.backends.c import quantize_for_c
from onnxc.compiler.calibration import make_calibration
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.model import load
from onnxc.errors import UsageError

SHAPES = {"input": [1, 1, 16, 16]}


def test_fit_specs():
    assert device.parse_fit(["flash=256K", "ram=1.5M"]) == {"flash": 262144, "ram": int(1.5 * 2**20)}
    assert device.parse_fit(["flash=1000"]) == {"flash": 1000}
    assert device.parse_fit(["instructions=4.5M", "ram=2K"]) == {"instructions": 4_500_000, "ram": 2048}
    assert device.parse_fit(["instructions=750k"]) == {"instructions": 750_000}
    for bad in (["rom=1K"], ["flash=-1K"], ["flash=12Q"], ["flash"], ["instructions=1KB"], ["instructions=0.0001"],
                ["instructions=-5M"], ["cycles=1M"], ["instructions="]):
        with pytest.raises(UsageError):
            device.parse_fit(bad)


@pytest.mark.parametrize("spec", ["instructions=lots", "instructions=2MB", "time=1M"])
def test_bad_fit_spec_is_one_usage_line(tmp_path, capsys, spec):
    from onnxc.cli import main

    out = tmp_path / "c"
    with pytest.raises(SystemExit) as exc:
        main(["optimize", str(sample_path("mlp")), "-o", str(out), "--backend", "c", "--fit", spec, "-q"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fit" in err[-1] and "Traceback" not in err[-1], err
    assert not out.exists()


def first_input() -> dict:
    from onnxc.compiler.calibration import make_calibration as cal_of
    from onnxc.compiler.sensitivity import first_sample

    model = canonicalize(load(sample_path("mlp")), SHAPES)
    return first_sample(cal_of(model, CALIBRATION).validation)


def test_fit_instructions_on_the_cortex_m4(tmp_path):
    """--fit instructions=N: the MLP pruned until one inference on the emulated Cortex-M4 (qemu
    -icount) takes at most 70% of its instructions; the kept plan's count is the firmware's own
    (measured again here), top-1 within a point on the test split."""
    base = device.measure(canonicalize(load(sample_path("mlp")), SHAPES), SHAPES, sample=first_input())
    limit = int(0.7 * base["instructions"])
    result = optimize(sample_path("mlp"), calibration=CALIBRATION, backend="c", fit=[f"instructions={limit}"],
                      passes=["prune"], export_options=ExportOptions(name="net"), output=tmp_path / "c",
                      cache_dir=tmp_path / "cache")
    fp = result.report.device
    assert fp["before"]["instructions"] == base["instructions"] > limit >= fp["after"]["instructions"]
    assert result.report.allocation["met"]
    again = device.measure(canonicalize(result.model, SHAPES), SHAPES, sample=first_input())
    assert again["instructions"] == fp["after"]["instructions"]
    assert accuracy(result.model) >= accuracy(sample_path("mlp")) - 1.0
    assert (tmp_path / "c" / "net.c").exists()


def test_impossible_instructions_fit_is_one_line(tmp_path, capsys):
    from onnxc.cli import main

    out = tmp_path / "c"
    with pytest.raises(SystemExit) as exc:
        main(["optimize", str(sample_path("mlp")), "-o", str(out), "--backend", "c", "--fit", "instructions=20K",
              "-p", "prune", "--calibration", str(CALIBRATION), "--max-error", "0.05", "--jobs", "1", "-q"])
    assert exc.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fit" in err[0] and "instructions" in err[0] and "of 20,000" in err[0], err
    assert not out.exists()


def int8_flash(name: str) -> int:
    model = canonicalize(load(sample_path(name)), SHAPES)
    qdq, _ = quantize_for_c(model, ExportOptions(int8="static", calibration=make_calibration(model, CALIBRATION)))
    return device.measure(qdq, SHAPES)["flash"]


def test_int8_fit_halves_the_int8_build(tmp_path):
    """The MLP's firmware in half the flash of its own int8 build, measured by linking, top-1 within
    a point on the test split; int8 is planned per layer with the structure."""
    limit = int8_flash("mlp") // 2
    result = optimize(sample_path("mlp"), calibration=CALIBRATION, backend="c", fit=[f"flash={limit}"],
                      export_options=ExportOptions(int8="static", name="net"), output=tmp_path / "c",
                      cache_dir=tmp_path / "cache")
    fp = result.report.device
    assert fp["after"]["flash"] <= limit < fp["before"]["flash"]
    assert result.report.allocation["met"]
    assert accuracy(result.model) >= accuracy(sample_path("mlp")) - 1.0
    assert (tmp_path / "c" / "net.c").exists() and result.report.backend["weight_bytes"] < limit


def test_impossible_fit_is_one_line(tmp_path, capsys):
    from onnxc.cli import main

    out, report = tmp_path / "c", tmp_path / "r.json"
    with pytest.raises(SystemExit) as exc:
        main(["optimize", str(sample_path("mlp")), "-o", str(out), "--backend", "c", "--fit", "flash=4K",
              "-p", "prune", "--calibration", str(CALIBRATION), "--max-error", "0.05", "--jobs", "1", "-q",
              "--report", str(report)])
    assert exc.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fit" in err[0] and "flash" in err[0] and "of 4,096" in err[0]
    assert not out.exists()
    assert not report.exists() or json.loads(report.read_text())


def test_fit_needs_the_c_backend(tmp_path):
    with pytest.raises(UsageError, match="--backend c"):
        optimize(sample_path("mlp"), fit=["flash=10K"], output=tmp_path / "m.onnx")


def test_fit_ram_is_planned_on_activations(tmp_path):
    """--fit ram=SIZE is planned on the peak activation bytes (what pruning shrinks and int8 or
    clustered weights do not): the MLP's RAM into two thirds, measured by linking, top-1 within a
    point."""
    base = device.measure(canonicalize(load(sample_path("mlp")), SHAPES), SHAPES)
    limit = 2 * base["ram"] // 3
    result = optimize(sample_path("mlp"), calibration=CALIBRATION, backend="c", fit=[f"ram={limit}"],
                      passes=["prune"], export_options=ExportOptions(name="net"), output=tmp_path / "c",
                      cache_dir=tmp_path / "cache")
    fp = result.report.device
    assert fp["before"]["ram"] == base["ram"] > limit >= fp["after"]["ram"]
    assert result.report.allocation["met"] and result.report.allocation["target"].startswith("device_ram=")
    assert accuracy(result.model) >= accuracy(sample_path("mlp")) - 1.0
