"""An independent MAC count: onnxruntime's per-node profile of one real run.

It shares no code with `onnxc.compiler.cost`: the shapes are the ones onnxruntime's kernels saw
(`input_type_shape`/`output_type_shape` of every node event, graph optimizations off so nodes are
the model's own), and each formula is written from those shapes alone:

- Conv: numel(Y) * numel(W) / W[0]          (each output meets C_in/group * kernel weights)
- ConvTranspose: numel(X) * numel(W) / W[0]  (each input meets C_out/group * kernel weights)
- Gemm: numel(Y) * K with K = numel(A) / M, M = Y[0], whatever the transposes (a constant B may
  be prepacked and then absent from the profile)
- MatMul: numel(Y) * K, K the last dim of A (its only dim when A is 1-D)
- LSTM, GRU, RNN (W and R are prepacked, so absent from the profile): T*N rows of X, each through
  gates * H * (I + H) weights per direction; directions and H from the last output (layout 0)
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort


def _numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _shapes(entries) -> list[list[int]]:
    return [list(next(iter(e.values()))) for e in entries]


def node_macs(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> int:
    if op == "Conv":
        w = inputs[1]
        return _numel(outputs[0]) * _numel(w) // w[0]
    if op == "ConvTranspose":
        w = inputs[1]
        return _numel(inputs[0]) * _numel(w) // w[0]
    if op == "Gemm":
        return _numel(outputs[0]) * (_numel(inputs[0]) // outputs[0][0])
    if op == "MatMul":
        return _numel(outputs[0]) * inputs[0][-1]
    if op in ("LSTM", "GRU", "RNN"):
        x, last = inputs[0], outputs[-1]
        dirs, hidden = (last[1] if len(last) == 4 else last[0]), last[-1]
        gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
        return _numel(x) // x[-1] * dirs * gates * hidden * (x[-1] + hidden)
    return 0


def profiled_macs(model: onnx.ModelProto | str, feed: dict[str, np.ndarray]) -> int:
    """MACs of Conv, ConvTranspose, Gemm and MatMul in one onnxruntime run on `feed`, per that feed."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        sess.run(None, feed)
        with open(sess.end_profiling()) as fh:
            events = json.load(fh)
    total = 0
    for event in events:
        args = event.get("args", {})
        if event.get("cat") != "Node" or "op_name" not in args or not event["name"].endswith("_kernel_time"):
            continue
        total += node_macs(args["op_name"], _shapes(args.get("input_type_shape", [])),
                           _shapes(args.get("output_type_shape", [])))
    return total
