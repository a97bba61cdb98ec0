"""A public stand-in for the issue's private text recognizer (10 MB, ~650 MMAC at 1x3x48x320).

A CRNN-style network built in torch with seeded random weights: a ResNet-like Conv backbone that
halves the height at every stage and the width twice (48x320 -> 3x80), a height-collapsing conv,
then a bidirectional LSTM sequence neck over the 80 time steps and a per-step classifier. Batch
and width are dynamic axes, as in the real exports. Exported here (never committed: ~11 MB).

    python benchmarks/standin.py OUT.onnx [--calibration OUT.npz --samples 128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HEIGHT, WIDTH = 48, 320


def build(path: str | Path, *, width: float = 1.0, classes: int = 2000, seed: int = 0) -> Path:
    """Export the stand-in to `path` (`width` scales every channel count; 1.0 is the full model)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    def ch(c: int) -> int:
        return max(8, int(round(c * width / 8)) * 8)

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: tuple[int, int]):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                          if stride != (1, 1) or cin != cout else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.short(x))

    class Recognizer(nn.Module):
        def __init__(self):
            super().__init__()
            c1, c2, c3, c4 = ch(32), ch(64), ch(128), ch(256)
            self.stem = nn.Sequential(nn.Conv2d(3, c1, 3, 2, 1, bias=False), nn.BatchNorm2d(c1), nn.ReLU())
            self.body = nn.Sequential(
                Block(c1, c2, (2, 2)), Block(c2, c2, (1, 1)),  # 24x160 -> 12x80
                Block(c2, c3, (2, 1)), Block(c3, c3, (1, 1)),  # 6x80
                Block(c3, c4, (2, 1)),  # 3x80
            )
            self.collapse = nn.Sequential(nn.Conv2d(c4, c4, (3, 1), bias=False), nn.BatchNorm2d(c4), nn.ReLU())
            self.neck = nn.LSTM(c4, ch(128), bidirectional=True, batch_first=True)
            self.head = nn.Linear(2 * ch(128), classes)

        def forward(self, x):
            f = self.collapse(self.body(self.stem(x)))  # [N, C, 1, W/4]
            seq = f.squeeze(2).permute(0, 2, 1)  # [N, T, C]
            out, _ = self.neck(seq)
            return self.head(out).softmax(-1)

    net = Recognizer().eval()
    with torch.no_grad():  # BN statistics that are not the identity, so folding matters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = Path(path)
    x = torch.randn(1, 3, HEIGHT, WIDTH)
    torch.onnx.export(net, (x,), str(path), input_names=["x"], output_names=["probs"], opset_version=17,
                      dynamic_axes={"x": {0: "batch", 3: "width"}, "probs": {0: "batch", 1: "steps"}},
                      dynamo=False)
    return path


def calibration(path: str | Path, samples: int = 128, seed: int = 0) -> Path:
    """Smooth random "text lines" in [0, 1] (low-frequency noise, not white noise), 1x3x48x320 each."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((samples, 3, HEIGHT // 8, WIDTH // 8), dtype=np.float32)
    x = coarse.repeat(8, axis=2).repeat(8, axis=3)
    x += 0.1 * rng.standard_normal(x.shape, dtype=np.float32)
    path = Path(path)
    np.savez(path, x=np.ascontiguousarray(x, dtype=np.float32))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--calibration")
    parser.add_argument("--samples", type=int, default=128)
    args = parser.parse_args(argv)
    build(args.out, width=args.width)
    if args.calibration:
        calibration(args.calibration, args.samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
