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
                      dynamic_axes={input_name: axes["input"], output_name: axes["output"]}, opset_version=17,
                      dynamo=False)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
