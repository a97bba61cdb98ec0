"""The calibration-data side of pruning: sampled patches, channel statistics and the ridge refit.

Everything streams: `iter_activations` yields one batch of intermediate tensors at a time and
each statistic is reduced on the fly (X^T X, X^T Y, sums), so memory is bounded by one batch and
the D x D normal equations, never by the calibration set. Conv layers are seen through im2col
rows at a seeded random subset of output positions: each row is the k x k x C patch feeding one
output pixel, which turns a Conv into the matrix product the refit and ThiNet need.

Refit (He et al. 2017, "Channel pruning for accelerating very deep neural networks"): for a
layer that reads pruned channels, choose W', b' minimising ||Y - X' W' - b'||^2 + lambda ||W'||^2
where Y is the layer's output in the *unpruned* model and X' its input in the *pruned* model
(so errors made upstream are compensated downstream instead of accumulating), restricted to the
kept input channels. lambda is a multiple of the mean diagonal of the centred X'^T X', chosen per
layer by 2-fold cross-validation over calibration samples (rows of one image stay in one fold:
the first and second half of each batch);
when the sliced weights predict the held-out fold better than every refit, they are kept (few
samples, many inputs). A layer followed by Relu/Clip is then refined so that only the part of its
output the activation lets through is matched. A layer that feeds a residual Add, last among its
branches, reproduces the original sum minus the pruned model's other branches.

Held-out samples (the calibration's validation part) stream with the fitting ones into a third
system per layer: the refit is kept only where it beats the sliced weights on them
(`compiler/holdout.py`). Conv rows are sampled at positions of each batch's own output map: the
graph's static shapes say 1 for symbolic dims, and a model fed lines of varying width was once
fitted (and its channels scored) on the top-left pixel alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import onnx
from scipy.linalg import cho_factor, cho_solve

from onnxc.compiler import holdout, runtime
from onnxc.compiler.calibration import capture_batch, iter_activations
from onnxc.compiler.graph import GraphView, attr
from onnxc.compiler.linear import LinearLayer
from onnxc.compiler.resumable import Resumable
from onnxc.compiler.samples import Samples

BUDGET_BYTES = 256 * 2**20  # activations of one batch plus the normal equations of one wave
MAX_REFIT_DIM = 6144  # a layer with more inputs than this is only sliced (D^2 doubles would not fit)
ROWS_BYTES = 96 * 2**20  # sampled rows kept for the activation-aware refit of one layer
# Rows for a grouped conv: every group's system has only cg x k x k inputs (depthwise 5x5: 25), so
# patches of all channels at `samples` positions (8192 x 480 x 25 floats on ppocr_rec) cost far
# more than its fit needs: 64 rows per input, at least 2048.
GROUPED_ROWS, ROWS_PER_INPUT = 2048, 64
T = TypeVar("T")


# ---- geometry of a 2-D convolution -------------------------------------------------------------
@dataclass
class Geometry:
    """A 2-D Conv's sampling geometry. Sizes come from each batch's own tensors, never from the
    graph's static shapes: with symbolic dims (text lines of any width) those read 1, and every
    layer would be fitted to its top-left output pixel alone."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right (explicit pads)
    group: int
    auto_pad: str = "NOTSET"  # SAME_UPPER / SAME_LOWER: pads follow each batch's input size

    def padding(self, h: int, w: int) -> tuple[int, int, int, int]:
        """The pads for an input of h x w (SAME pads depend on it)."""
        if self.auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
            return self.pads
        out = []
        for size, k, s, d in zip((h, w), self.kernel, self.strides, self.dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            out.append((small, total - small) if self.auto_pad == "SAME_UPPER" else (total - small, small))
        return out[0][0], out[1][0], out[0][1], out[1][1]

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """The output's spatial size for an input of h x w."""
        pt, pl, pb, pr = self.padding(h, w)
        return tuple((size + a + b - d * (k - 1) - 1) // s + 1 for size, a, b, k, s, d in
                     zip((h, w), (pt, pl), (pb, pr), self.kernel, self.strides, self.dilations))

    def patches(self, x: np.ndarray, b: np.ndarray, oy: np.ndarray, ox: np.ndarray) -> np.ndarray:
        """im2col rows [S, C, kh*kw] of `x` [B, C, H, W] at output positions (b, oy, ox)."""
        kh, kw = self.kernel
        pt, pl, pb, pr = pads = self.padding(*x.shape[2:])
        if any(pads):
            x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        ky, kx = np.divmod(np.arange(kh * kw), kw)
        iy = oy[:, None] * self.strides[0] + ky[None, :] * self.dilations[0]
        ix = ox[:, None] * self.strides[1] + kx[None, :] * self.dilations[1]
        return x[b[:, None], :, iy, ix].transpose(0, 2, 1)


def conv_geometry(node: onnx.NodeProto, view: GraphView) -> Geometry | None:
    """The 2-D Conv's sampling geometry, or None for what the refit does not handle."""
    x, w = view.shape(node.input[0]), view.static_shape(node.input[1])
    if node.op_type != "Conv" or x is None or w is None or len(x) != 4 or len(w) != 4:
        return None
    strides = tuple(attr(node, "strides", [1, 1]))
    dil = tuple(attr(node, "dilations", [1, 1]))
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    pad4 = (0, 0, 0, 0) if auto != "NOTSET" else tuple(attr(node, "pads", [0, 0, 0, 0]))
    return Geometry(tuple(w[2:]), strides, dil, pad4, attr(node, "group", 1), auto)


def sample_positions(rng: np.random.Generator, batch: int, oh: int, ow: int, rows: int):
    total = batch * oh * ow
    flat = np.sort(rng.choice(total, size=min(rows, total), replace=False))
    return np.unravel_index(flat, (batch, oh, ow))


def rows_per_batch(samples: int, batch: int, total: int, positions: int) -> int:
    return max(1, min(batch * positions, math.ceil(samples * batch / max(total, 1))))


def batch_size(view: GraphView, names: Sequence[str], budget: int = BUDGET_BYTES) -> int:
    """Samples per batch so that the captured tensors of one batch stay within `budget`."""
    return capture_batch(view, names, budget)


def stream(model: onnx.ModelProto, names: Sequence[str], inputs: Mapping[str, np.ndarray],
           consume: Callable[[dict[str, np.ndarray]], None], budget: int = BUDGET_BYTES) -> None:
    """Feed every batch of the tensors `names` to `consume` (memory: one batch)."""
    names = list(dict.fromkeys(names))
    if names:
        for values in iter_activations(model, names, inputs, batch_size(GraphView(model.graph), names, budget)):
            consume(values)


# ---- refit ------------------------------------------------------------------------------------
def ridge_lambda(cxx: np.ndarray, ridge: float) -> float:
    """lambda = ridge x the mean diagonal of X'X (scale-free), with a floor for all-zero inputs."""
    return ridge * max(float(np.trace(cxx)) / max(len(cxx), 1), 1e-12)


def ridge_solve(cxx: np.ndarray, rhs: np.ndarray, ridge: float) -> np.ndarray:
    """(X'X + lambda I)^-1 rhs; a singular system (dead inputs, ridge=0) gets the least-norm solution."""
    a = cxx + ridge_lambda(cxx, ridge) * np.eye(len(cxx))
    try:
        return np.linalg.solve(a, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, rhs, rcond=None)[0]


class Normal:
    """Running sums of one least-squares system X W = Y (and, when asked, the rows themselves)."""

    def __init__(self, dim: int, outs: int, keep_rows: bool = False):
        self.dim, self.outs = dim, outs
        self.xtx = np.zeros((dim, dim))
        self.xty = np.zeros((dim, outs))
        self.xs = np.zeros(dim)
        self.ys = np.zeros(outs)
        self.yy, self.n = 0.0, 0
        self.rows: list[tuple[np.ndarray, np.ndarray]] | None = [] if keep_rows else None

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x = x.astype(np.float32, copy=False)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.xs += x.sum(0, dtype=np.float64)
        self.ys += y.sum(0, dtype=np.float64)
        self.yy += float(np.sum(np.square(y, dtype=np.float64)))
        self.n += len(x)
        if self.rows is not None:
            self.rows.append((np.ascontiguousarray(x), np.ascontiguousarray(y, dtype=np.float32)))

    def residual(self, w: np.ndarray, b: np.ndarray) -> float:
        """||Y - X w - b||^2 from the sums (w: [D, O], b: [O])."""
        r = self.yy - 2 * np.sum(w * self.xty) - 2 * b @ self.ys + np.sum(w * (self.xtx @ w))
        r += 2 * b @ (self.xs @ w) + self.n * b @ b
        return max(float(r), 0.0)

    def _centred(self, intercept: bool):
        if intercept and self.n:
            mx = self.xs / self.n
            return mx, self.xtx - self.n * np.outer(mx, mx)
        return np.zeros(self.dim), self.xtx

    def solve(self, ridge: float, intercept: bool) -> tuple[np.ndarray, np.ndarray]:
        mx, cxx = self._centred(intercept)
        my = self.ys / max(self.n, 1) if intercept else np.zeros(self.outs)
        w = ridge_solve(cxx, self.xty - self.n * np.outer(mx, my), ridge)
        return w, my - mx @ w

    def path(self, intercept: bool) -> Callable[[float], tuple[np.ndarray, np.ndarray]]:
        """The ridge solution as a function of the relative strength: one Cholesky factorisation
        per strength (an eigendecomposition shared by all strengths costs more than the few a
        cross-validation grid asks for)."""
        mx, cxx = self._centred(intercept)
        my = self.ys / max(self.n, 1) if intercept else np.zeros(self.outs)
        rhs = self.xty - self.n * np.outer(mx, my)
        scale = max(float(np.trace(cxx)) / max(self.dim, 1), 1e-12)
        floor = 1e-10 * max(float(np.abs(np.diag(cxx)).max(initial=0.0)), 1e-12)

        def fit(rel: float) -> tuple[np.ndarray, np.ndarray]:
            a = cxx + max(rel * scale, floor) * np.eye(self.dim)
            try:
                w = cho_solve(cho_factor(a, check_finite=False), rhs, check_finite=False)
            except np.linalg.LinAlgError:
                w = np.linalg.lstsq(a, rhs, rcond=None)[0]
            return w, my - mx @ w
        return fit

    @staticmethod
    def merge(a: Normal, b: Normal) -> Normal:
        out = Normal(a.dim, a.outs, a.rows is not None)
        out.xtx, out.xty, out.xs, out.ys = a.xtx + b.xtx, a.xty + b.xty, a.xs + b.xs, a.ys + b.ys
        out.yy, out.n = a.yy + b.yy, a.n + b.n
        if out.rows is not None:
            out.rows = a.rows + b.rows
        return out

    def solve_clipped(self, ridge: float, lo: float, hi: float, iters: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Fit clip(X w + b) to clip(Y): where the original output and the fit are both clipped on
        the same side, the exact value is invisible to the next layer, so it stops being a target.
        Each round keeps X'X and changes only the targets: one factorisation, cheap re-solves."""
        x = np.concatenate([r[0] for r in self.rows])
        y = np.concatenate([r[1] for r in self.rows])
        mx, cxx = self._centred(True)
        w, b = self.solve(ridge, True)
        try:
            factor = cho_factor(cxx + ridge_lambda(cxx, ridge) * np.eye(self.dim))
        except np.linalg.LinAlgError:
            return w, b
        for _ in range(iters):
            pred = x @ w.astype(np.float32) + b.astype(np.float32)
            free = ((y <= lo) & (pred <= lo)) | ((y >= hi) & (pred >= hi))
            t = np.where(free, pred, y)
            mt = t.mean(0, dtype=np.float64)
            w = cho_solve(factor, (x.T @ t).astype(np.float64) - self.n * np.outer(mx, mt))
            b = mt - mx @ w
        return w, b

    def clipped_residual(self, w: np.ndarray, b: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
        """||clip(X w + b) - clip(Y)||^2 and ||clip(Y)||^2 over the stored rows."""
        res = energy = 0.0
        w32, b32 = w.astype(np.float32), b.astype(np.float32)
        for x, y in self.rows:
            yc = np.clip(y, lo, hi)
            res += float(np.sum(np.square(np.clip(x @ w32 + b32, lo, hi) - yc), dtype=np.float64))
            energy += float(np.sum(np.square(yc), dtype=np.float64))
        return res, energy


class NormalStack:
    """The systems of every group of a grouped conv (depthwise: one per channel) accumulated as
    one stack: a batch adds to all of them in a few batched products instead of a Python loop
    over hundreds of groups. `views()` gives each group as a `Normal` over the same memory."""

    def __init__(self, groups: int, dim: int, outs: int, keep_rows: bool = False):
        self.groups, self.dim, self.outs = groups, dim, outs
        self.xtx = np.zeros((groups, dim, dim))
        self.xty = np.zeros((groups, dim, outs))
        self.xs = np.zeros((groups, dim))
        self.ys = np.zeros((groups, outs))
        self.yy = np.zeros(groups)
        self.n = np.zeros((), np.int64)
        self.rows: list[tuple[np.ndarray, np.ndarray]] | None = [] if keep_rows else None

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """x: [S, groups, dim], y: [S, groups, outs]."""
        xg = np.ascontiguousarray(x.transpose(1, 0, 2), dtype=np.float32)  # [G, S, D]
        yg = np.ascontiguousarray(y.transpose(1, 0, 2), dtype=np.float32)
        xt = xg.transpose(0, 2, 1)
        self.xtx += np.matmul(xt, xg)
        self.xty += np.matmul(xt, yg)
        self.xs += xg.sum(1, dtype=np.float64)
        self.ys += yg.sum(1, dtype=np.float64)
        self.yy += np.square(yg, dtype=np.float64).sum((1, 2))
        self.n += len(x)
        if self.rows is not None:
            self.rows.append((xg, yg))

    def views(self) -> list[Normal]:
        return [_GroupNormal(self, g) for g in range(self.groups)]


class _GroupNormal(Normal):
    """One group of a `NormalStack`, read as a `Normal` (its sums are views, filled by the stack)."""

    def __init__(self, stack: NormalStack, g: int):  # no super().__init__: nothing of its own to allocate
        self.stack, self.g = stack, g
        self.dim, self.outs = stack.dim, stack.outs
        self.xtx, self.xty, self.xs, self.ys = stack.xtx[g], stack.xty[g], stack.xs[g], stack.ys[g]

    @property
    def yy(self) -> float:
        return float(self.stack.yy[self.g])

    @property
    def n(self) -> int:
        return int(self.stack.n)

    @property
    def rows(self) -> list[tuple[np.ndarray, np.ndarray]] | None:
        if self.stack.rows is None:
            return None
        return [(x[self.g], y[self.g]) for x, y in self.stack.rows]


@dataclass
class RefitJob:
    """One layer reading pruned channels: where its X and Y come from and how to rewrite it."""

    node: str  # node name (same in the original and the pruned model)
    x_name: str  # its input tensor
    y_name: str  # its output tensor
    keep_in: np.ndarray  # kept input channels (or features), indices into the original input
    keep_out: np.ndarray | None  # kept output channels when the layer is itself a pruned producer
    residual: list[str] = field(default_factory=list)  # other inputs of the Add the output feeds
    clip: tuple[float, float] | None = None  # the Relu/Clip range the output goes through next
    target: str = ""  # tensor of the original model to reproduce (default: y_name)
    error_before: float | None = None  # relative error of the sliced weights on the fitting samples
    error_after: float | None = None  # of the refit weights, on the same samples
    verdict: holdout.Verdict | None = None  # both on held-out samples, and which one was kept
    skipped: str = ""


class Refitter:
    """Accumulates one job's normal equations from matching batches of the two models."""

    def __init__(self, job: RefitJob, node: onnx.NodeProto, view: GraphView, orig_view: GraphView,
                 samples: int, total: int, from_original: bool, held_out: bool = False):
        self.job, self.node, self.view = job, node, view
        self.samples, self.total, self.from_original = samples, total, from_original
        layer = LinearLayer.read(node, view, with_add=False)
        if not isinstance(layer, LinearLayer):
            raise ValueError(f"{node.op_type} '{node.name}' is not a linear layer with a constant weight")
        w = layer.weight
        self.kind = layer.kind
        if self.kind == "Conv":
            self.geom = conv_geometry(node, view)
            self.groups = self.geom.group if self.geom else 1
            o = w.shape[0]
            dim = w.shape[1] * int(np.prod(w.shape[2:]))
            if self.groups > 1:  # a group's system has few inputs (depthwise 3x3: 9): it needs fewer rows
                self.samples = min(samples, max(GROUPED_ROWS, ROWS_PER_INPUT * dim))
            rows = self.samples
        else:
            self.geom, self.groups = None, 1
            o, dim = w.shape
            rows = total
        self.clip = job.clip if self.kind != "MatMul" and not job.residual else None
        keep = self.clip is not None and 4 * rows * dim * (1 + self.groups) <= ROWS_BYTES
        self.clip = self.clip if keep else None
        # two folds by calibration sample: the refit's ridge is chosen by cross-validation; samples
        # past the first `total` are held out: they only judge the refit (holdout.choose)
        self.stacks = None
        if self.groups > 1:
            self.stacks = [NormalStack(self.groups, dim, o // self.groups, keep) for _ in range(3 if held_out else 2)]
            self.folds = [self.stacks[0].views(), self.stacks[1].views()]
            self.held = self.stacks[2].views() if held_out else None
        else:
            self.folds = [[Normal(dim, o, keep)], [Normal(dim, o, keep)]]
            self.held = [Normal(dim, o, keep)] if held_out else None
        self.seen = 0

    @property
    def systems(self) -> list[Normal]:
        return [Normal.merge(a, b) for a, b in zip(*self.folds)]

    def memory(self) -> int:
        systems = 3 if self.held is not None else 2
        return systems * sum(8 * (s.dim * s.dim + s.dim * s.outs) for s in self.folds[0])

    def _spans(self, sample: np.ndarray) -> list[tuple[int, slice]]:
        """(system, rows) of one batch whose rows come sorted by calibration sample: the first
        half of the batch's fitting samples is fold 0, the rest fold 1, held-out samples system 2.
        Folds by sample (rows of one image stay in one fold) as contiguous slices: no copies, and
        one split for every group of a grouped conv."""
        if not len(sample):
            return []
        first, last = int(sample[0]), int(sample[-1])
        train_end = min(last + 1, self.total)
        mid = first + (max(train_end - first, 0) + 1) // 2
        cuts = [0, int(np.searchsorted(sample, mid)), int(np.searchsorted(sample, train_end)), len(sample)]
        spans = [(f, slice(cuts[f], cuts[f + 1])) for f in range(3) if cuts[f + 1] > cuts[f]]
        return [(f, rows) for f, rows in spans if f < 2 or self.held is not None]

    def _add(self, gi: int, x: np.ndarray, y: np.ndarray, spans: list[tuple[int, slice]]) -> None:
        for f, rows in spans:
            system = self.folds[f][gi] if f < 2 else self.held[gi]
            system.add(x[rows], y[rows])

    def update(self, xs: dict[str, np.ndarray], ys: dict[str, np.ndarray] | None, rng: np.random.Generator,
               target: np.ndarray | None = None) -> None:
        """Add one batch. The target comes from `ys` (whole tensors) or, already taken at this
        batch's sampled positions (the same draws from the same generator), from `target`."""
        x = xs[self.job.x_name]
        y = target if target is not None else ys[self.job.target or self.job.y_name]
        if self.from_original:
            x = np.take(x, self.job.keep_in, axis=1)
        first, self.seen = self.seen, self.seen + len(x)
        if self.geom is None:
            y = self._branch(y, xs, None)
            # Gemm rows are samples; a MatMul over [N, T, D] has one row per sample and position.
            steps = int(np.prod(x.shape[1:-1])) if x.ndim > 2 else 1
            spans = self._spans(first + np.repeat(np.arange(len(x)), steps))
            self._add(0, x.reshape(-1, x.shape[-1]).astype(np.float32), y.reshape(-1, y.shape[-1]), spans)
            return
        b, oy, ox = self.positions(rng, len(x), *self.geom.out_size(*x.shape[2:]))
        p = self.geom.patches(x, b, oy, ox)  # [S, C', kk]
        t = self._branch(target if target is not None else y[b, :, oy, ox], xs, (b, oy, ox))  # [S, O']
        spans = self._spans(first + b)
        if self.stacks is not None:  # [S, G x cg, kk] -> [S, G, cg x kk]; targets [S, G, og]
            p, t = p.reshape(len(p), self.groups, -1), t.reshape(len(t), self.groups, -1)
            for f, rows in spans:
                self.stacks[f].add(p[rows], t[rows])
        else:
            self._add(0, p.reshape(len(p), -1), t, spans)

    def positions(self, rng: np.random.Generator, batch: int, oh: int, ow: int,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The output positions sampled from one batch of a Conv's output (oh x ow: this batch's)."""
        return sample_positions(rng, batch, oh, ow, rows_per_batch(self.samples, batch, self.total, oh * ow))

    def target_rows(self, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """What `update` reads of the target tensor for one batch: all of it (Gemm, MatMul) or
        its rows at the positions `update` will draw from a generator in the same state."""
        if self.geom is None:
            return y
        b, oy, ox = self.positions(rng, len(y), *y.shape[2:])
        return np.ascontiguousarray(y[b, :, oy, ox])

    def _branch(self, y: np.ndarray, xs: dict[str, np.ndarray], at) -> np.ndarray:
        """The kept output channels and, for the last branch into a residual Add, what this branch
        must add to the pruned model's other branches (`at`: positions the rows were taken at)."""
        if self.job.keep_out is not None:
            y = np.take(y, self.job.keep_out, axis=1)
        if self.job.residual and not self.from_original:
            rest = (xs[r] if at is None else xs[r][at[0], :, at[1], at[2]] for r in self.job.residual)
            y = y - sum(rest)
        return y

    def finish(self, ridge: float) -> None:
        """Solve, compare with the sliced weights, and write the better one into the pruned model."""
        node, view = self.node, self.view
        layer = LinearLayer.read(node, view, with_add=False)  # a MatMul's bias Add is not refit
        if layer.fixed_c:
            self.job.skipped = "Gemm bias is not a vector"
            return
        w0 = layer.weight  # [O, D] (Conv: [O, C/G, k...])
        o = w0.shape[0]
        og = o // self.groups
        bias = layer.bias if layer.bias is not None else np.zeros(o)
        mats = [w0[gi * og:(gi + 1) * og].reshape(og, -1).T for gi in range(self.groups)]  # [D, O/G] each
        biases = [bias[gi * og:(gi + 1) * og] for gi in range(self.groups)]
        before = after = energy = 0.0
        new_w, new_b = [], []
        intercept = self.kind != "MatMul"
        held = [0.0, 0.0, 0.0]  # held-out residual of the sliced and refit weights, held-out energy
        chosen = _cross_validate_stack(self.stacks[0], self.stacks[1], mats, biases, ridge, intercept) \
            if self.stacks is not None else None
        for gi, ((fa, fb), wm, bm) in enumerate(zip(zip(*self.folds), mats, biases)):
            wm, bm = wm.astype(np.float64), np.asarray(bm, np.float64)
            system = Normal.merge(fa, fb)
            rel = chosen[gi] if chosen is not None else _cross_validate(fa, fb, wm, bm, ridge, intercept)
            if rel is None:  # the sliced weights predict held-out samples better than any refit
                w1, b1 = wm, bm
            else:
                w1, b1 = system.solve(rel, intercept)
            if self.clip is None:
                energy += system.yy
                r0, r1 = system.residual(wm, bm), system.residual(w1, b1)
            else:
                r0, e = system.clipped_residual(wm, bm, *self.clip)
                r1 = system.clipped_residual(w1, b1, *self.clip)[0]
                energy += e
                if rel is not None:
                    w2, b2 = system.solve_clipped(rel, *self.clip)
                    r2 = system.clipped_residual(w2, b2, *self.clip)[0]
                    if r2 < r1 and np.all(np.isfinite(w2)):
                        w1, b1, r1 = w2, b2, r2
            if not np.all(np.isfinite(w1)) or r1 > r0:
                w1, b1, r1 = wm, bm, r0
            before, after = before + r0, after + r1
            if self.held is not None:
                for k, v in enumerate(self._residuals(self.held[gi], (wm, bm), (w1, b1))):
                    held[k] += v
            new_w.append(w1)
            new_b.append(b1)
        self.job.error_before = _relative(before, energy)
        self.job.error_after = _relative(after, energy)
        self.job.verdict = holdout.choose(
            holdout.Errors(self.job.error_after, _relative(held[1], held[2]) if self.held else None),
            holdout.Errors(self.job.error_before, _relative(held[0], held[2]) if self.held else None))
        if not self.job.verdict.kept:  # the refit does not generalize: the sliced weights stay
            new_w, new_b = [m.astype(np.float64) for m in mats], [np.asarray(b, np.float64) for b in biases]
        w = np.concatenate([m.T for m in new_w]).reshape(w0.shape)
        layer.write(view, w, np.concatenate(new_b) if intercept else None)
        view.refresh()


    def _residuals(self, system: Normal, *weights: tuple[np.ndarray, np.ndarray]) -> list[float]:
        """Each (w, b)'s squared error on `system`, then its energy (through the Relu/Clip when
        the layer's output goes through one)."""
        if self.clip is None:
            return [system.residual(w, b) for w, b in weights] + [system.yy]
        out = [system.clipped_residual(w, b, *self.clip) for w, b in weights]
        return [r for r, _ in out] + [out[0][1]]


def _relative(residual: float, energy: float) -> float:
    return math.sqrt(residual / energy) if energy > 0 else 0.0


CV_DIM = 1536  # past this many inputs, cross-validation (eight factorisations) is skipped


def _cross_validate(fa: Normal, fb: Normal, w0: np.ndarray, b0: np.ndarray, ridge: float,
                    intercept: bool) -> float | None:
    """The relative ridge strength with the least 2-fold error, or None when the sliced weights
    (w0, b0) do better on held-out samples than every refit."""
    dim, rows = fa.dim, fa.n + fb.n
    if not fa.n or not fb.n:
        return ridge
    if dim > CV_DIM:
        return ridge if rows >= 2 * dim else None  # too few samples for so many inputs: keep the slice
    grid = [ridge * f for f in (0.1, 1.0, 10.0, 100.0)] if ridge > 0 else [0.0, 1e-3, 1e-2, 1e-1]
    fit_a, fit_b = fa.path(intercept), fb.path(intercept)
    errors = [fb.residual(*fit_a(rel)) + fa.residual(*fit_b(rel)) for rel in grid]
    best = int(np.argmin(errors))
    if fa.residual(w0, b0) + fb.residual(w0, b0) <= errors[best]:
        return None
    return grid[best]


def _cross_validate_stack(fa: NormalStack, fb: NormalStack, mats: list[np.ndarray], biases: list[np.ndarray],
                          ridge: float, intercept: bool) -> list[float | None] | None:
    """`_cross_validate` for every group of a grouped conv at once (batched solves over the stack:
    a depthwise layer has hundreds of 9 x 9 systems, each factorised eight times); None when a
    system is singular (the caller then goes group by group)."""
    if not int(fa.n) or not int(fb.n):
        return [ridge] * fa.groups
    grid = [ridge * f for f in (0.1, 1.0, 10.0, 100.0)] if ridge > 0 else [0.0, 1e-3, 1e-2, 1e-1]
    w0 = np.stack([np.asarray(m, np.float64) for m in mats])  # [G, D, O]
    b0 = np.stack([np.asarray(b, np.float64) for b in biases])  # [G, O]
    try:
        fit_a, fit_b = _stack_path(fa, intercept), _stack_path(fb, intercept)
        errors = np.stack([_stack_residual(fb, *fit_a(rel)) + _stack_residual(fa, *fit_b(rel)) for rel in grid])
    except np.linalg.LinAlgError:
        return None
    best = np.argmin(errors, axis=0)  # [G]
    sliced = _stack_residual(fa, w0, b0) + _stack_residual(fb, w0, b0)
    return [None if sliced[g] <= errors[best[g], g] else grid[best[g]] for g in range(fa.groups)]


def _stack_path(s: NormalStack, intercept: bool) -> Callable[[float], tuple[np.ndarray, np.ndarray]]:
    """`Normal.path` for every system of a stack (batched solves)."""
    n = int(s.n)
    if intercept and n:
        mx, my = s.xs / n, s.ys / n
        cxx = s.xtx - n * mx[:, :, None] * mx[:, None, :]
    else:
        mx, my, cxx = np.zeros_like(s.xs), np.zeros_like(s.ys), s.xtx
    rhs = s.xty - n * mx[:, :, None] * my[:, None, :]
    diag = np.diagonal(cxx, axis1=1, axis2=2)
    scale = np.maximum(diag.sum(1) / max(s.dim, 1), 1e-12)
    floor = 1e-10 * np.maximum(np.abs(diag).max(1), 1e-12)
    eye = np.eye(s.dim)

    def fit(rel: float) -> tuple[np.ndarray, np.ndarray]:
        lam = np.maximum(rel * scale, floor)
        w = np.linalg.solve(cxx + lam[:, None, None] * eye, rhs)
        return w, my - np.einsum("gd,gdo->go", mx, w)
    return fit


def _stack_residual(s: NormalStack, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`Normal.residual` of every system of a stack: [G]."""
    r = s.yy - 2 * np.einsum("gdo,gdo->g", w, s.xty) - 2 * np.einsum("go,go->g", b, s.ys)
    r += np.einsum("gdo,gdo->g", w, np.matmul(s.xtx, w))
    r += 2 * np.einsum("go,go->g", b, np.einsum("gd,gdo->go", s.xs, w)) + int(s.n) * np.einsum("go,go->g", b, b)
    return np.maximum(r, 0.0)


def refit(original: onnx.ModelProto, pruned: onnx.ModelProto, jobs: list[RefitJob], inputs: Mapping[str, np.ndarray],
          *, ridge: float, samples: int, recapture: bool, rng: Callable[[str], np.random.Generator],
          progress: Callable[[str, int, int], None] = lambda *a: None,
          refresh: Callable[[onnx.ModelProto], onnx.ModelProto] = lambda m: m,
          held_out: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Refit every job's layer in the pruned model; returns the (possibly re-inferred) pruned model.

    With `recapture`, layers are refit wave by wave in topological order and each wave's inputs
    come from the pruned model as refit so far. Without it, one pass over the original model gives
    every layer's input restricted to the kept channels (faster; upstream errors then add up).
    `held_out` samples stream with the fitting ones but only judge each refit against the sliced
    weights (`holdout.choose`): a layer whose refit is worse on them keeps its sliced weights.
    """
    orig_view = GraphView(original.graph)
    total = runtime.sample_count(inputs)
    if held_out is not None:  # fitting samples first (same batches and draws as without), then held-out
        inputs = Samples(Samples.of(inputs).groups + Samples.of(held_out).groups)
    if not recapture:
        for j in jobs:
            j.residual, j.target = [], ""
    waves = _waves(pruned, jobs) if recapture else [[j.node for j in jobs]]
    by_name = {j.node: j for j in jobs}

    def plan(view: GraphView, wave: list[str]) -> list[tuple[list[Refitter], list[str], list[str], int]]:
        """The wave's layers in chunks that fit the memory budget: (refitters, x names, y names, batch)."""
        refitters: list[Refitter] = []
        for name in wave:
            job = by_name[name]
            node = view.node_by_name(name)
            r = Refitter(job, node, view, orig_view, samples, total, from_original=not recapture,
                         held_out=held_out is not None)
            if node.op_type == "Conv" and r.geom is None:
                job.skipped = "only 2-D convolutions are refit"
            elif max(s.dim for s in r.folds[0]) > MAX_REFIT_DIM:
                job.skipped = f"{max(s.dim for s in r.folds[0])} inputs per output: too large to refit"
            else:
                refitters.append(r)
        out = []
        for chunk in chunks(refitters, Refitter.memory):
            x_names = list(dict.fromkeys(n for r in chunk for n in [r.job.x_name, *r.job.residual]))
            y_names = list(dict.fromkeys(r.job.target or r.job.y_name for r in chunk))
            if recapture:
                bs = min(batch_size(view, x_names), batch_size(orig_view, y_names))
            else:
                bs = batch_size(orig_view, list(dict.fromkeys(x_names + y_names)))
            out.append((chunk, x_names, y_names, bs))
        return out

    resumed = None
    if recapture:  # one batch size for every wave and for the targets: the same batches, the same draws
        planned = [c for w in waves for c in plan(GraphView(pruned.graph), w)]
        bs = min((c[3] for c in planned), default=1)
        resumed = Resumable(pruned, inputs, bs)
        targets = _target_rows(original, orig_view, planned, inputs, resumed.batch_size, rng, progress)
    done = 0
    progress("prune: fits", done, len(jobs))
    for wave in waves:
        view = GraphView(pruned.graph)
        for chunk, x_names, y_names, bs in plan(view, wave):
            rngs = {r.job.node: rng(r.job.node) for r in chunk}
            if resumed is not None:  # inputs from the pruned model; targets were taken from the original once
                for k, xs in enumerate(resumed.capture(pruned, x_names)):
                    for r in chunk:
                        r.update(xs, None, rngs[r.job.node], target=targets[r.job.node][k])
            else:  # both from the original: one run
                names = list(dict.fromkeys(x_names + y_names))
                for values in iter_activations(original, names, inputs, bs):
                    for r in chunk:
                        r.update(values, values, rngs[r.job.node])
            for r in chunk:
                r.finish(ridge)
                r.folds, r.held, r.stacks = [[], []], None, None
                if resumed is not None:
                    targets.pop(r.job.node, None)
                    resumed.modified([r.node])
                done += 1
                progress("prune: fits", done, len(jobs))
        pruned = refresh(pruned)
    return pruned


def _target_rows(original: onnx.ModelProto, orig_view: GraphView, planned: list, inputs: Mapping[str, np.ndarray],
                 bs: int, rng: Callable[[str], np.random.Generator], progress: Callable[[str, int, int], None],
                 ) -> dict[str, list[np.ndarray]]:
    """Every layer's targets from the original model, batch by batch, as `Refitter.update` will
    read them: the original does not change between waves, so it runs once (resumed where the
    last group of targets stopped when the memory budget splits them) instead of once per wave.
    Conv targets are kept only at the positions each layer samples (the same draws), so this
    stays small."""
    refitters = [r for chunk, _, _, _ in planned for r in chunk]
    out: dict[str, list[np.ndarray]] = {}
    groups = chunks(refitters, lambda r: bs * _per_sample(orig_view, r.job.target or r.job.y_name))
    resumed = Resumable(original, inputs, bs)
    n = runtime.sample_count(inputs)
    for index, group in enumerate(groups):
        names = list(dict.fromkeys(r.job.target or r.job.y_name for r in group))
        gens = {r.job.node: rng(r.job.node) for r in group}
        for values in resumed.capture(original, names):
            for r in group:
                out.setdefault(r.job.node, []).append(r.target_rows(values[r.job.target or r.job.y_name],
                                                                    gens[r.job.node]))
        progress("prune: capture", (index + 1) * n, len(groups) * n)
    return out


def _per_sample(view: GraphView, name: str) -> int:
    shape = view.static_shape(name)
    return 3 * 4 * int(np.prod(shape[1:], dtype=np.int64)) if shape else 0


def chunks(items: Sequence[T], memory: Callable[[T], int]) -> list[list[T]]:
    """Consecutive runs of `items` whose summed `memory` stays within the budget (one item at least)."""
    out: list[list[T]] = []
    current: list[T] = []
    used = 0
    for item in items:
        m = memory(item)
        if current and used + m > BUDGET_BYTES:
            out.append(current)
            current, used = [], 0
        current.append(item)
        used += m
    return out + ([current] if current else [])


def _waves(model: onnx.ModelProto, jobs: list[RefitJob]) -> list[list[str]]:
    """Group layers so that no layer shares a wave with a layer upstream of it (or of its residual)."""
    names = [j.node for j in jobs]
    extra = {j.node: j.residual for j in jobs}
    targets = set(names)
    level: dict[str, int] = {}
    producer_level: dict[str, int] = {}
    for node in model.graph.node:
        reads = [i for i in node.input if i] + extra.get(node.name, [])
        lv = max((producer_level.get(i, 0) for i in reads), default=0)
        if node.name in targets:
            lv += 1
            level[node.name] = lv
        for o in node.output:
            producer_level[o] = lv
    waves: dict[int, list[str]] = {}
    for name in names:
        waves.setdefault(level.get(name, 1), []).append(name)
    return [waves[k] for k in sorted(waves)]
