"""Train the four sample models on scikit-learn's digits and export them to ONNX.

Dev-only script: it needs torch and scikit-learn (``pip install torch==2.13.0 scikit-learn``);
nothing else in onnxc imports torch. Run from anywhere::

    python samples/make_samples.py

It writes, next to this file:

- ``mlp.onnx``, ``vgg.onnx``, ``resnet.onnx``, ``mobilenet.onnx`` -- input ``input``
  float32 [batch,1,16,16], output ``logits`` float32 [batch,10], opset 17.
- ``digits_calib.npz`` -- key ``input`` only: 256 images of the training split.
- ``digits_test.npz`` -- key ``input``: the whole held-out test split.
- ``digits_test_labels.npy`` -- int64 labels of the test split.

Preprocessing: 8x8 digits scaled to [0, 1], bilinearly upsampled to 16x16
(``align_corners=False``), then normalized with the fixed ``MEAN``/``STD`` below.
The split is a stratified ``train_test_split(test_size=0.25, random_state=0)``.
Training is seeded, single-threaded and uses deterministic algorithms, so reruns give the
same weights on the same torch build.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
MEAN = 0.30
STD = 0.32
SEED = 0
N_CALIB = 256
OPSET = 17
MAX_IR_VERSION = 10


# ---------------------------------------------------------------- data


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Preprocessed (x_train, y_train, x_test, y_test); x float32 [N,1,16,16], y int64."""
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = ((x - MEAN) / STD).numpy().astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_tr, y_tr, x_te, y_te


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background value."""
    n, _, h, w = x.shape
    pad = max_shift
    background = (0.0 - MEAN) / STD
    padded = F.pad(x, (pad, pad, pad, pad), value=background)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


# ---------------------------------------------------------------- models


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, relu6: bool = False):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6() if relu6 else nn.ReLU(),
    )


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(256, 512),
            nn.ReLU(),
            nn.Linear(512, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )

    def forward(self, x):
        return self.net(x)


class VGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, 32),
            conv_bn_relu(32, 32),
            nn.MaxPool2d(2),
            conv_bn_relu(32, 64),
            conv_bn_relu(64, 64),
            nn.MaxPool2d(2),
            conv_bn_relu(64, 128),
            conv_bn_relu(128, 128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(1, 32)
        self.blocks = nn.Sequential(BasicBlock(32, 32, 1), BasicBlock(32, 64, 2), BasicBlock(64, 64, 1))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            conv_bn_relu(cin, hidden, k=1, relu6=True),
            conv_bn_relu(hidden, hidden, k=3, stride=stride, groups=hidden, relu6=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        y = self.body(x)
        return x + y if self.use_residual else y


class MobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(1, 32, relu6=True)
        self.blocks = nn.Sequential(
            InvertedResidual(32, 32, 1),
            InvertedResidual(32, 48, 2),
            InvertedResidual(48, 48, 1),
            InvertedResidual(48, 64, 1),
        )
        self.head = conv_bn_relu(64, 128, k=1, relu6=True)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.pool(self.head(self.blocks(self.stem(x)))))


# name -> (constructor, epochs, learning rate, weight decay, shift augmentation)
SPECS = {
    "mlp": (MLP, 40, 1e-3, 1e-4, False),
    "vgg": (VGG, 20, 2e-3, 1e-4, True),
    "resnet": (ResNet, 20, 2e-3, 1e-4, True),
    "mobilenet": (MobileNet, 20, 2e-3, 1e-4, True),
}


# ---------------------------------------------------------------- training


def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates of one image through Conv2d and Linear layers."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total += out[0].numel() * k
        elif isinstance(mod, nn.Linear):
            total += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, 16, 16))
    for h in handles:
        h.remove()
    return total


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    return 100.0 * (pred == y).float().mean().item()


def train(name: str, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray) -> nn.Module:
    ctor, epochs, lr, wd, augment = SPECS[name]
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = ctor()
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    xv, yv = torch.from_numpy(x_te), torch.from_numpy(y_te)
    batch = 64
    steps = epochs * math.ceil(len(xt) / batch)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), batch):
            idx = perm[i : i + batch]
            xb = random_shift(xt[idx], gen) if augment else xt[idx]
            loss = F.cross_entropy(model(xb), yt[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 5 == 0 or epoch + 1 == epochs:
            acc = evaluate(model, xv, yv)
            print(
                f"  {name} epoch {epoch + 1}/{epochs} loss {total / len(xt):.4f} test {acc:.2f}%"
                f" ({time.time() - start:.0f}s)"
            )
    return model.eval()


# ---------------------------------------------------------------- export


def module_path(node_name: str) -> str:
    """``/blocks/blocks.1/shortcut/shortcut.0/Conv`` -> ``blocks.1.shortcut.0``."""
    name, last = "", ""
    for part in node_name.strip("/").split("/")[:-1]:
        if last and part.startswith(last + "."):
            name = name[: len(name) - len(last)] + part
        else:
            name = f"{name}.{part}" if name else part
        last = part
    return name


def tidy(proto: onnx.ModelProto, model: nn.Module) -> None:
    """Constant nodes -> initializers; BN-folded ``onnx::Conv_N`` weights -> module names."""
    graph = proto.graph
    constants = [n for n in graph.node if n.op_type == "Constant"]
    for node in constants:
        tensor = numpy_helper.to_array(node.attribute[0].t)
        graph.initializer.append(numpy_helper.from_array(tensor, node.output[0]))
        graph.node.remove(node)

    modules = dict(model.named_modules())
    taken = {init.name for init in graph.initializer}
    renames: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Conv" or module_path(node.name) not in modules:
            continue
        for slot, suffix in ((1, "weight"), (2, "bias")):
            if len(node.input) > slot and node.input[slot].startswith("onnx::"):
                new = f"{module_path(node.name)}.{suffix}"
                if new not in taken:
                    renames[node.input[slot]] = new
                    taken.add(new)
    for init in graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)


def export(model: nn.Module, path: Path, x_check: np.ndarray) -> onnx.ModelProto:
    model.eval()
    dummy = torch.from_numpy(x_check[:2])
    with warnings.catch_warnings():
        # The legacy TorchScript exporter is deprecated but gives the plainest graph for these models.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    tidy(proto, model)
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    proto.producer_name = "onnxc-samples"
    proto.doc_string = ""
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    assert not list(path.parent.glob(path.name + ".data")), "unexpected external data"

    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 16, 16]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 7, len(x_check)):
        xb = x_check[:n]
        got = session.run(["logits"], {"input": xb})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(xb)).numpy()
        err = float(np.abs(got - want).max())
        assert got.shape == (n, 10) and err < 1e-4, (path.name, n, err)
    return proto


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x_tr, y_tr, x_te, y_te = load_data()
    print(f"train {x_tr.shape}, test {x_te.shape}")

    np.savez_compressed(HERE / "digits_calib.npz", input=np.ascontiguousarray(x_tr[:N_CALIB]))
    np.savez_compressed(HERE / "digits_test.npz", input=x_te)
    np.save(HERE / "digits_test_labels.npy", y_te)

    summary = []
    for name in SPECS:
        model = train(name, x_tr, y_tr, x_te, y_te)
        path = HERE / f"{name}.onnx"
        proto = export(model, path, x_te)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        pred = session.run(["logits"], {"input": x_te})[0].argmax(1)
        acc = 100.0 * float((pred == y_te).mean())
        params = sum(p.numel() for p in model.parameters())
        ops = sorted({node.op_type for node in proto.graph.node})
        summary.append((name, acc, params, count_macs(model), path.stat().st_size, ops))

    print(f"\n{'model':<10} {'test acc':>9} {'params':>9} {'MACs':>11} {'bytes':>9}  ops")
    for name, acc, params, macs, size, ops in summary:
        print(f"{name:<10} {acc:8.2f}% {params:9d} {macs:11d} {size:9d}  {','.join(ops)}")


if __name__ == "__main__":
    main()
