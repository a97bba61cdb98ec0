"""The shipped sample models and data are well-formed and keep their held-out accuracy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from sample_data import (
    CALIBRATION,
    SAMPLE_MODELS,
    accuracy,
    load_calibration,
    load_test_set,
    sample_path,
)

# Minimum held-out accuracy (percent) of each sample on the digits test split.
TARGET_ACCURACY = {"mlp": 96.5, "vgg": 98.5, "resnet": 97.5, "mobilenet": 97.5}


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_sample_is_valid_onnx(name):
    path = sample_path(name)
    assert path.stat().st_size < 2_500_000
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    assert {op.domain: op.version for op in model.opset_import}.get("", 0) == 17
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_sample_has_symbolic_batch(name):
    model = onnx.load(str(sample_path(name)))
    [inp] = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    [out] = model.graph.output
    assert inp.name == "input" and out.name == "logits"
    in_dims = inp.type.tensor_type.shape.dim
    out_dims = out.type.tensor_type.shape.dim
    assert in_dims[0].dim_param and not in_dims[0].HasField("dim_value")
    assert [d.dim_value for d in in_dims[1:]] == [1, 16, 16]
    assert out_dims[0].dim_param and [d.dim_value for d in out_dims[1:]] == [10]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_sample_accuracy(name):
    acc = accuracy(sample_path(name))
    assert acc >= TARGET_ACCURACY[name], f"{name}: {acc:.2f}% < {TARGET_ACCURACY[name]}%"


def test_accuracy_accepts_model_proto():
    model = onnx.load(str(sample_path("mlp")))
    assert accuracy(model) == accuracy(sample_path("mlp"))


def test_calibration_contract():
    with np.load(CALIBRATION) as data:
        assert data.files == ["input"]
    calib = load_calibration()
    assert list(calib) == ["input"]
    x = calib["input"]
    assert x.dtype == np.float32 and x.shape == (256, 1, 16, 16)
    assert np.isfinite(x).all()


def test_test_split():
    x, labels = load_test_set()
    assert x.dtype == np.float32 and x.shape == (450, 1, 16, 16)
    assert labels.dtype == np.int64 and labels.shape == (450,)
    assert set(np.unique(labels)) == set(range(10))
    # Calibration images come from the training split, not the test split.
    calib = load_calibration()["input"].reshape(256, -1)
    test = x.reshape(len(x), -1)
    assert not (calib[:, None, :] == test[None, :, :]).all(axis=2).any()
