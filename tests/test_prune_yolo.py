"""A YOLOv8-style detector built in code, pruned at ratio=0.3 (the latency side lives in
benchmarks/prune.py, which imports `yolo_like` from here)."""

from __future__ import annotations

import numpy as np
import onnx
from test_channel_groups import Net

from onnxc.compiler import runtime
from onnxc.compiler.calibration import make_calibration
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.cost import model_cost
from onnxc.compiler.passes import PassContext, create

YOLOV8N = (16, 32, 64, 128, 256)
YOLOV8S = (32, 64, 128, 256, 512)


class Yolo(Net):
    def cbs(self, x, cin, cout, k=1, s=1):
        """Conv (BN folded) + SiLU written as x * Sigmoid(x), as exporters emit it."""
        return self.silu(self.conv(x, cin, cout, k=k, stride=s))

    def c2f(self, x, cin, cout, n, shortcut):
        c = cout // 2
        y0, y1 = self.op("Split", [self.cbs(x, cin, 2 * c), self.const(np.array([c, c], np.int64))],
                         outputs=2, axis=1)
        ys = [y0, y1]
        for _ in range(n):
            b = self.cbs(self.cbs(ys[-1], c, c, k=3), c, c, k=3)
            ys.append(self.op("Add", [ys[-1], b]) if shortcut else b)
        return self.cbs(self.op("Concat", ys, axis=1), (2 + n) * c, cout)

    def sppf(self, x, cin, cout):
        c = cin // 2
        y = [self.cbs(x, cin, c)]
        for _ in range(3):
            y.append(self.op("MaxPool", [y[-1]], kernel_shape=[5, 5], strides=[1, 1], pads=[2, 2, 2, 2]))
        return self.cbs(self.op("Concat", y, axis=1), 4 * c, cout)

    def up(self, x):
        return self.op("Resize", [x, "", self.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")

    def head(self, x, cin, c2, c3, nc):
        box = self.conv(self.cbs(self.cbs(x, cin, c2, k=3), c2, c2, k=3), c2, 64, k=1)
        cls = self.conv(self.cbs(self.cbs(x, cin, c3, k=3), c3, c3, k=3), c3, nc, k=1)
        return self.op("Concat", [box, cls], axis=1)


def yolo_like(widths=YOLOV8N, size: int = 160, nc: int = 80, seed: int = 0) -> onnx.ModelProto:
    """Backbone with C2f and SPPF, PAN neck with upsampling and concats, decoupled detect head."""
    w0, w1, w2, w3, w4 = widths
    n = Yolo(seed=seed)
    x = n.cbs("images", 3, w0, k=3, s=2)
    x = n.c2f(n.cbs(x, w0, w1, k=3, s=2), w1, w1, 1, True)
    p3 = n.c2f(n.cbs(x, w1, w2, k=3, s=2), w2, w2, 2, True)
    p4 = n.c2f(n.cbs(p3, w2, w3, k=3, s=2), w3, w3, 2, True)
    p5 = n.sppf(n.c2f(n.cbs(p4, w3, w4, k=3, s=2), w4, w4, 1, True), w4, w4)
    n4 = n.c2f(n.op("Concat", [n.up(p5), p4], axis=1), w4 + w3, w3, 1, False)
    o3 = n.c2f(n.op("Concat", [n.up(n4), p3], axis=1), w3 + w2, w2, 1, False)
    o4 = n.c2f(n.op("Concat", [n.cbs(o3, w2, w2, k=3, s=2), n4], axis=1), w2 + w3, w3, 1, False)
    o5 = n.c2f(n.op("Concat", [n.cbs(o4, w3, w3, k=3, s=2), p5], axis=1), w3 + w4, w4, 1, False)
    c2, c3 = max(16, w2 // 4, 64), max(w2, min(nc, 100))
    outs = [n.head(o, c, c2, c3, nc) for o, c in ((o3, w2), (o4, w3), (o5, w4))]
    return n.model({"images": [1, 3, size, size]}, outs)


def test_yolo_style_detector_prunes_at_0_3():
    model = yolo_like()
    cal = make_calibration(model, None, seed=0, random_count=6)
    options = {"ratio": 0.3, "samples": 512, "downstream": False, "round_to": 1}  # MACs follow the ratio exactly
    result = create("prune", options).run(canonicalize(model), PassContext(calibration=cal))
    pruned = canonicalize(result.model)
    onnx.checker.check_model(pruned)
    ref, got = runtime.run(model, cal.validation), runtime.run(pruned, cal.validation)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    ops = {o: nd.op_type for nd in model.graph.node for o in nd.output}
    through = {ops[t] for c in result.changes for t in c.detail["members"] if t in ops}
    assert {"Split", "Add", "Concat", "Resize", "MaxPool", "Mul", "Sigmoid"} <= through
    reasons = [s.reason for s in result.skipped]
    assert sum("graph output" in r for r in reasons) == 3  # the three detect heads keep their channels
    ratio = model_cost(pruned).macs / model_cost(model).macs
    print(f"yolo-like: {len(result.changes)} groups pruned, MACs x{ratio:.3f}")
    assert ratio < 0.6
    assert all(c.error is not None and c.error < 1.0 for c in result.changes if c.detail["consumers"])
