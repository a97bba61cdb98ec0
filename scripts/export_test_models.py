#!/usr/bin/env python3
"""Export the small torch models the corpus tests use, with dynamic axes (needs the `dev` extra).

The exports are committed under tests/models/ so the tests need no torch. Weights are random
(seeded): these models test that every path keeps the interface and runs at several sizes, not
accuracy (the public corpus and the digits samples do that).

- crnn.onnx: a text-line recognizer (conv backbone, height pooled away, BiLSTM, per-column
  classes) for [N, 1, 32, W] lines; output [N, W/4, 37] log-probabilities; batch and width dynamic.
- cnn_lstm_gru.onnx: a sequence model for [1, 4, T] frames (Conv1d, a Shape -> Gather -> Concat
  -> Reshape chain, bidirectional LSTM, GRU, per-step classes [T, 1, 3]); T dynamic (`seqlen`).
- resnet_dyn.onnx: a residual classifier with global pooling for [N, 3, H, W]; batch, height and
  width dynamic (named dims), like a torchvision export with dynamic axes.
- streaming_vad.onnx: a voice-activity detector fed 512-sample chunks: `input [batch, sequence]`,
  its LSTM state `state [2, batch, 128]` in and `stateN` out, and an int64 scalar `sr` whose value
  (16000 or 8000) selects an `If` branch (the model is scripted, so the branch stays an If).
- crnn_shapes.onnx: a CNN + BiLSTM recognizer for [N, 1, 64, W] at opset 11 whose LSTM initial
  states (Shape -> Gather -> Unsqueeze -> Concat -> ConstantOfShape) and Reshape targets are
  computed from the dynamic width and batch at run time, as torch writes them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

OUT = Path(__file__).resolve().parent.parent / "tests" / "models"


class CRNN(nn.Module):
    def __init__(self, classes: int = 37):
        super().__init__()
        def block(i, o, pool):
            return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(pool)]
        self.cnn = nn.Sequential(*block(1, 32, 2), *block(32, 64, 2), *block(64, 96, (2, 1)),
                                 *block(96, 128, (4, 1)))
        self.rnn = nn.LSTM(128, 64, bidirectional=True, batch_first=True)
        self.head = nn.Linear(128, classes)

    def forward(self, x):
        f = self.cnn(x).squeeze(2).permute(0, 2, 1)  # [N, W/4, 128]
        y, _ = self.rnn(f)
        return self.head(y).log_softmax(-1)


class CnnLstmGru(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.lstm = nn.LSTM(8, 6, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(12, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):  # [1, 4, seqlen]
        h = torch.relu(self.conv(x)).permute(0, 2, 1)
        h = h.reshape(x.shape[0], x.shape[2], 8)  # Shape -> Gather -> Concat -> Reshape
        y, _ = self.lstm(h)
        y, _ = self.gru(y.transpose(0, 1))
        return self.fc(y)


class Residual(nn.Module):
    def __init__(self, c: int, stride: int = 1):
        super().__init__()
        out = c * stride
        self.body = nn.Sequential(nn.Conv2d(c, out, 3, stride, 1), nn.BatchNorm2d(out), nn.ReLU(),
                                  nn.Conv2d(out, out, 3, 1, 1), nn.BatchNorm2d(out))
        self.skip = nn.Identity() if stride == 1 else nn.Sequential(nn.Conv2d(c, out, 1, stride), nn.BatchNorm2d(out))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


class ResNetDyn(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.layers = nn.Sequential(Residual(16), Residual(16, 2), Residual(32), Residual(32, 2))
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


class Encoder(nn.Module):
    """The sample-rate branch: 16 kHz and 8 kHz chunks have their own encoder."""

    def __init__(self, feats: int = 24, width: int = 32):
        super().__init__()
        self.enc16 = nn.Conv1d(feats, width, 3, padding=1)
        self.enc8 = nn.Conv1d(feats, width, 3, padding=1)

    def forward(self, f: torch.Tensor, sr: torch.Tensor) -> torch.Tensor:
        if bool(sr == 16000):
            h = self.enc16(f)
        else:
            h = self.enc8(f)
        return torch.relu(h)


class StreamingVAD(nn.Module):
    def __init__(self, feats: int = 24, width: int = 32, hidden: int = 128):
        super().__init__()
        self.stft = nn.Conv1d(1, feats, 64, stride=32)
        self.encoder = Encoder(feats, width)
        self.cell = nn.LSTMCell(width, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, state: torch.Tensor, sr: torch.Tensor):
        f = self.stft(x.unsqueeze(1)).abs()
        h = self.encoder(f, sr).mean(-1)
        hx, cx = self.cell(h, (state[0], state[1]))
        return torch.sigmoid(self.head(torch.relu(hx))), torch.stack([hx, cx])


class CRNNShapes(nn.Module):
    def __init__(self, classes: int = 11):
        super().__init__()
        def block(i, o, pool):
            return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(pool)]
        self.cnn = nn.Sequential(*block(1, 8, 2), *block(8, 16, 2), *block(16, 16, (2, 1)), *block(16, 16, (2, 1)))
        self.rnn = nn.LSTM(16 * 4, 24, bidirectional=True, batch_first=True)
        self.head = nn.Linear(48, classes)

    def forward(self, x):
        f = self.cnn(x)  # [N, 16, 4, W/4]
        b, c, h, w = f.shape
        f = f.reshape(b, c * h, w).permute(0, 2, 1)  # Reshape target from Shape
        f = f.unsqueeze(3).mean(3, keepdim=True).squeeze(3)  # as recognizers pool the height away
        y, _ = self.rnn(f)  # initial states from Shape -> Gather -> ConstantOfShape
        y = y.reshape(b * w, -1)  # the batch and steps folded into a Reshape target
        return self.head(y).reshape(b, w, -1).log_softmax(-1)


def export_streaming(path: Path) -> None:
    model = torch.jit.script(StreamingVAD().eval())  # scripted: the sample-rate test stays an If
    args = (torch.randn(1, 512), torch.zeros(2, 1, 128), torch.tensor(16000))
    torch.onnx.export(model, args, str(path), input_names=["input", "state", "sr"],
                      output_names=["output", "stateN"],
                      dynamic_axes={"input": {0: "batch", 1: "sequence"}, "state": {1: "batch"},
                                    "output": {0: "batch"}, "stateN": {1: "batch"}}, opset_version=17, dynamo=False)
    print(path, path.stat().st_size)


def export(model: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str,
           axes: dict) -> None:
    model.eval()
    # BatchNorm gets non-trivial statistics so that folding it is a real test.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    torch.onnx.export(model, (example,), str(path), input_names=[input_name], output_names=[output_name],
                      dynamic_axes={input_name: axes["input"], output_name: axes["output"]},
                      opset_version=axes.get("opset", 17), dynamo=False)
    print(path, path.stat().st_size)


def main() -> int:
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    export(CRNN(), torch.randn(1, 1, 32, 128), OUT / "crnn.onnx", "line", "logprobs",
           {"input": {0: "batch", 3: "width"}, "output": {0: "batch", 1: "steps"}})
    export(ResNetDyn(), torch.randn(1, 3, 64, 64), OUT / "resnet_dyn.onnx", "image", "logits",
           {"input": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}})
    export(CnnLstmGru(), torch.randn(1, 4, 10), OUT / "cnn_lstm_gru.onnx", "x", "y",
           {"input": {2: "seqlen"}, "output": {0: "seqlen"}})
    export_streaming(OUT / "streaming_vad.onnx")
    export(CRNNShapes(), torch.randn(1, 1, 64, 128), OUT / "crnn_shapes.onnx", "input1", "output",
           {"input": {0: "batch", 3: "width"}, "output": {0: "batch", 1: "steps"}, "opset": 11})
    return 0


if __name__ == "__main__":
    sys.exit(main())
