"""Data-aware fitting for the decomposition passes: input statistics and whitening.

A layer y = W p + b (p: an input row of a Gemm/MatMul, or an im2col patch of a Conv) has output
error E||(W - W') p||^2 = tr((W - W') C (W - W')^T) for the input second moment C = E[p p^T].
So the factors that minimize the *output* error are the truncated SVD of W S with S = C^(1/2),
mapped back by S^-1 (activation-aware SVD). With a free bias the centered covariance is used
and the bias absorbs the mean. Everything here needs only the moments (sum p, sum p p^T, count),
which are accumulated batch by batch with `iter_activations`, never storing activations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxc.compiler import runtime
from onnxc.compiler.calibration import iter_activations

Rows = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]  # (batch, row limit, rng) -> [n, D]
ROWS_PER_BATCH = 16384  # rows kept per batch and layer (seeded sample): bounds time on large maps


@dataclass
class Moments:
    """Streaming first and second moments of D-dimensional rows (float64)."""

    dim: int
    count: int = 0
    total: np.ndarray = field(default=None)  # type: ignore[assignment]
    outer: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = np.zeros(self.dim)
        if self.outer is None:
            self.outer = np.zeros((self.dim, self.dim))

    def add(self, rows: np.ndarray) -> None:
        rows = rows.reshape(-1, self.dim)
        if rows.dtype.itemsize < 4:  # float16 activations: accumulate in float32 at least
            rows = rows.astype(np.float32)
        self.count += len(rows)
        self.total += rows.sum(axis=0, dtype=np.float64)
        self.outer += (rows.T @ rows).astype(np.float64)  # per batch in the input's precision

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def second(self) -> np.ndarray:
        """E[p p^T] (uncentered)."""
        return self.outer / max(self.count, 1)

    @property
    def cov(self) -> np.ndarray:
        """E[(p - mu)(p - mu)^T]."""
        mu = self.mean
        return self.second - np.outer(mu, mu)

    def augmented(self) -> np.ndarray:
        """E[q q^T] for q = [p; 1]: lets a bias ride along as the last weight column."""
        out = np.empty((self.dim + 1, self.dim + 1))
        out[:-1, :-1] = self.second
        out[:-1, -1] = out[-1, :-1] = self.mean
        out[-1, -1] = 1.0
        return out


def collect(model: onnx.ModelProto, requests: Sequence[tuple[str, str, int, Rows]],
            inputs: Mapping[str, np.ndarray], *, batch_size: int = 32, seed: int = 0,
            rows_per_batch: int = ROWS_PER_BATCH,
            progress: Callable[[str, int, int], None] | None = None) -> dict[str, Moments]:
    """Moments for each (key, tensor name, row dim, rows function) in one pass over `inputs`.

    A batch giving more than `rows_per_batch` rows (large feature maps) contributes a seeded
    random sample of them: the moments are averages, so a sample estimates them without bias."""
    if not requests:
        return {}
    names = sorted({tensor for _, tensor, _, _ in requests})
    stats = {key: Moments(dim) for key, _, dim, _ in requests}
    n = runtime.sample_count(inputs)
    rng = np.random.default_rng([seed, 4])
    done = 0
    for batch in iter_activations(model, names, inputs, batch_size=batch_size):
        for key, tensor, _, rows in requests:
            stats[key].add(rows(batch[tensor], rows_per_batch, rng))
        done = min(done + batch_size, n)
        if progress:
            progress("input statistics", done, n)
    return stats


# ---- rows ------------------------------------------------------------------------------------
def _subsample(rows: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if len(rows) <= limit:
        return rows
    return rows[np.sort(rng.choice(len(rows), size=limit, replace=False))]


def last_axis_rows(dim: int) -> Rows:
    """Rows of a `x @ W` input: every vector along the last axis (tokens of [B, T, D] too)."""
    return lambda x, limit, rng: _subsample(x.reshape(-1, dim), limit, rng)


def axis_rows(axis: int, dim: int) -> Rows:
    """Rows along `axis` (the contracted axis of `W @ x`, or columns of a transposed Gemm input)."""
    return lambda x, limit, rng: _subsample(np.moveaxis(x, axis, -1).reshape(-1, dim), limit, rng)


def conv_pads(in_spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
              dilations: Sequence[int], pads: Sequence[int] | None, auto_pad: str) -> list[int]:
    """Explicit [begin..., end...] pads for a Conv (resolving auto_pad from the input size)."""
    n = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(in_spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else big)
            end.append(big if auto_pad == "SAME_UPPER" else small)
        return begin + end
    if auto_pad == "VALID" or not pads:
        return [0] * (2 * n)
    return list(pads)


def im2col_rows(kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
                pads: Sequence[int]) -> Rows:
    """Rows of Conv patches [N * out positions, C * prod(kernel)], laid out (c, k1, k2, ...) like
    the weight's [C_out, C_in, k1, k2, ...] so that the layer is `patch @ W.reshape(C_out, -1).T`."""
    n = len(kernel)

    def rows(x: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
        pad = [(0, 0), (0, 0)] + [(pads[i], pads[i + n]) for i in range(n)]
        xp = np.pad(x, pad)
        extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
        win = np.lib.stride_tricks.sliding_window_view(xp, extents, axis=tuple(range(2, 2 + n)))
        # win: [N, C, out1', ..., e1, ...] (a view); strides pick outputs, dilations pick taps
        index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(
            slice(None, None, d) for d in dilations)
        win = win[index]
        batch, channels = win.shape[:2]
        out_shape = win.shape[2:2 + n]
        positions = batch * int(np.prod(out_shape))
        if positions > limit:  # gather only the sampled patches (never the whole im2col matrix)
            flat = np.sort(rng.choice(positions, size=limit, replace=False))
            where = np.unravel_index(flat, (batch, *out_shape))
            picked = win[(where[0], slice(None), *where[1:])]  # [S, C, k...]
            return picked.reshape(limit, -1)
        win = win.transpose([0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n)])
        return win.reshape(-1, channels * int(np.prod(kernel)))

    return rows


def channel_second_moment(patch_second: np.ndarray, channels: int) -> np.ndarray:
    """The per-pixel channel second moment: the mean of the patch moment's diagonal tap blocks."""
    taps = patch_second.shape[0] // channels
    blocks = patch_second.reshape(channels, taps, channels, taps)
    return np.trace(blocks, axis1=1, axis2=3) / taps


# ---- whitening -------------------------------------------------------------------------------
def whiten_input_channels(w: np.ndarray, moments: Moments) -> tuple[np.ndarray, np.ndarray]:
    """(W with its input-channel axis multiplied by S, S^-1) for a conv weight [C_out, C_in, k...],
    S the root of the per-pixel channel second moment: the inputs actually excited count."""
    root, inv_root = sqrt_pair(channel_second_moment(moments.second, w.shape[1]))
    return np.moveaxis(np.tensordot(w, root, axes=([1], [0])), -1, 1), inv_root


def sqrt_pair(moment: np.ndarray, damp: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """(S, S^-1) with S the symmetric square root of `moment + damp * mean eigenvalue * I`.

    The damping keeps directions the calibration never excites (constant border pixels, dead
    channels) from blowing up S^-1; they then count with a small weight instead of none.
    """
    moment = (moment + moment.T) / 2
    vals, vecs = np.linalg.eigh(moment)
    vals = np.maximum(vals, 0)
    vals = vals + damp * max(float(vals.mean()), 1e-12)
    root = np.sqrt(vals)
    return (vecs * root) @ vecs.T, (vecs / root) @ vecs.T


def relative_output_error(w: np.ndarray, w_new: np.ndarray, moment_aug: np.ndarray) -> float:
    """sqrt(E||y - y'||^2 / E||y||^2) for y = [W b] [p; 1] given E[[p;1][p;1]^T].

    `w` and `w_new` are [out, D + 1] (bias as the last column)."""
    diff = w - w_new
    # (A @ M) * A summed: one matrix product (a three-operand einsum loops over i, j, k in C)
    num = float(np.sum((diff @ moment_aug) * diff))
    den = float(np.sum((w @ moment_aug) * w))
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else float(np.sqrt(max(num, 0.0)))


def relative_weight_error(w: np.ndarray, w_new: np.ndarray) -> float:
    norm = float(np.linalg.norm(w))
    return float(np.linalg.norm(w - w_new) / norm) if norm > 0 else float(np.linalg.norm(w_new))


def reduced_rank_fit(w_aug: np.ndarray, proj: np.ndarray, moments: Moments, rank: int,
                     ridge: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best (U, G, b') for y' = U G (proj p) + b' ~ W p + b on the calibration moments.

    `w_aug` is [out, D + 1] (bias last), `proj` [k, D] the fixed first factor(s), U [out, rank],
    G [rank, k]. Least squares with a free bias (centered covariance), then the rank-`rank`
    reduced-rank regression: U spans the top principal directions of the fitted outputs.
    """
    w, b = w_aug[:, :-1], w_aug[:, -1]
    cov, mu = moments.cov, moments.mean
    qcov = proj @ cov @ proj.T
    qcov = (qcov + qcov.T) / 2
    qcov += ridge * max(float(np.trace(qcov)) / len(qcov), 1e-12) * np.eye(len(qcov))
    cross = w @ cov @ proj.T  # E[(y - Ey)(q - Eq)^T]
    m = np.linalg.solve(qcov, cross.T).T  # [out, k]: unconstrained least squares
    fitted = m @ qcov @ m.T  # covariance of the fitted outputs
    vals, vecs = np.linalg.eigh((fitted + fitted.T) / 2)
    u = vecs[:, np.argsort(vals)[::-1][: min(rank, m.shape[0])]]
    g = u.T @ m
    bias = b + w @ mu - u @ (g @ (proj @ mu))
    return u, g, bias


@dataclass
class MatrixSvd:
    """SVD of a layer matrix W [out, in], whitened by its input moment when fitting to data."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    inv_root: np.ndarray | None

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(U [out, r], V [r, in]) with W ~ U V; the singular values are split evenly."""
        root_s = np.sqrt(self.s[:rank])
        u = self.u[:, :rank] * root_s
        v = root_s[:, None] * self.vt[:rank]
        return u, (v @ self.inv_root if self.inv_root is not None else v)


def matrix_svd(w: np.ndarray, moments: Moments | None, centered: bool) -> MatrixSvd:
    """Truncatable SVD minimizing the output error (activation-aware) or the weight error.

    `centered`: the layer has a bias that will absorb the input mean, so whiten by the
    covariance; otherwise by the uncentered second moment."""
    if moments is None:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        return MatrixSvd(u, s, vt, None)
    root, inv_root = sqrt_pair(moments.cov if centered else moments.second)
    u, s, vt = np.linalg.svd(w @ root, full_matrices=False)
    return MatrixSvd(u, s, vt, inv_root)
