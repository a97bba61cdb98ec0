"""Load and save ONNX models without losing anything the source carried.

We work on `onnx.ModelProto` directly (not onnx-graphsurgeon's IR): it keeps IR version, opsets,
producer, doc strings and every metadata_props entry by construction, which gs's export drops.
Saving is atomic (temp file in the target folder, then rename) so a failure never leaves a partial
output, and switches to external data when the tensors pass protobuf's 2 GB limit.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from onnxc.errors import OnnxcError

PROTOBUF_LIMIT = 2**31 - 1
# Leave headroom for the graph structure itself when deciding to go external.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)



def load(source: str | os.PathLike[str] | onnx.ModelProto, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Read a model from a path (external data resolved beside it) or return a copy of a proto."""
    if isinstance(source, onnx.ModelProto):
        return clone(source)
    path = Path(source)
    if not path.exists():
        raise OnnxcError(f"{path}: no such file")
    if path.is_dir():
        raise OnnxcError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise OnnxcError(f"{path}: file is empty")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except DecodeError as exc:
        raise OnnxcError(f"{path}: not a valid ONNX model (truncated or not protobuf: {exc})") from None
    except FileNotFoundError as exc:
        raise OnnxcError(f"{path}: external data file missing ({exc.filename or exc})") from None
    except Exception as exc:  # onnx raises assorted errors for damaged external data
        raise OnnxcError(f"{path}: cannot read ONNX model ({type(exc).__name__}: {exc})") from None
    _check_plausible(model, path)
    return model


def _check_plausible(model: onnx.ModelProto, path: Path) -> None:
    """Protobuf parses almost any bytes; reject what cannot be a model before it confuses a pass."""
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise OnnxcError(f"{path}: not an ONNX model (no IR version or graph)")
    if not model.graph.node and not model.graph.output:
        raise OnnxcError(f"{path}: ONNX model has an empty graph")


def clone(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def fingerprint(model: onnx.ModelProto) -> bytes:
    """A digest of the model's bytes: the key of results computed from a model within a process."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).digest()


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data in the model (initializers and Constant attributes, subgraphs too).

    Used instead of `ByteSize()`, which raises past 2 GB.
    """
    return sum(tensor_nbytes(t) for t in _all_tensors(model.graph))


def serialized_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model as a file (tensors, nodes, names, shapes); past ~2 GB, where
    `ByteSize()` raises and tensors go to external data anyway, the tensor bytes."""
    size = tensor_bytes(model)
    return model.ByteSize() if size <= EXTERNAL_DATA_THRESHOLD else size


_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.FLOAT4E2M1: 4,
         onnx.TensorProto.STRING: 0}


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Storage bytes of one tensor from its dims and type (reading `raw_data` would copy it)."""
    count = 1
    for d in tensor.dims:
        count *= d
    bits = _BITS.get(tensor.data_type)
    if bits is None:
        try:
            bits = 8 * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except Exception:
            bits = 32
    if bits == 0:  # strings: only their contents tell
        return sum(len(s) for s in tensor.string_data)
    return (count * bits + 7) // 8


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def save(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write atomically; tensors go to `<name>.data` beside the model when they pass ~2 GB."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise OnnxcError(f"{folder}: output folder does not exist")
    external = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    data_name = f"{path.name}.data"
    tmp_data = folder / f".{data_name}.tmp"
    try:
        if external:
            to_write = clone(model)
            onnx.save_model(
                to_write, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                location=tmp_data.name, size_threshold=1024,
            )
            # Rewrite the location so the final pair of files refer to each other.
            final = onnx.load(str(tmp), load_external_data=False)
            for tensor in _all_tensors(final.graph):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            onnx.save_model(final, str(tmp))
            if tmp_data.exists():
                os.replace(tmp_data, folder / data_name)
        else:
            with open(tmp, "wb") as fh:
                fh.write(model.SerializeToString(deterministic=True))
        set_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        tmp_data.unlink(missing_ok=True)
        raise
    return path


def set_default_mode(path: Path) -> None:
    """mkstemp creates 0600 files; give outputs the mode a plain open() would (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
