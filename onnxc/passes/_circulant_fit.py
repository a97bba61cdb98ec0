"""Block-circulant approximations of a dense weight: the projection and the least-squares fit.

A dense layer computes y = x @ W + bias with W of shape [K, N]. Its features are grouped into
blocks of b: input feature (k, j) with k < b, j < p = K / b and output feature (r, i) with
i < q = N / b. Block (i, j) is the circulant C(c[i, j]) with C(v)[r, k] = v[(r - k) mod b], so
the output block i is y_i = sum_j c_ij (*) x_j (circular convolution) and the layer keeps
q * p * b numbers instead of q * p * b * b.

Which features form a block is a free choice; two groupings per side are used: contiguous
(feature j * b + k, neighbours share a block: right for image pixels and other ordered inputs)
and strided (feature k * p + j). `Layout` fixes the choice.

The data-aware fit is solved in the Fourier domain, where circular convolution is a product:
rfft(y_i) = sum_j rfft(c_ij) * rfft(x_j). The normal equations therefore split into one p x p
complex system per frequency (b / 2 + 1 of them), solved for all outputs at once, instead of
one K x K system: exact for the time-domain least squares because each frequency is its own
problem and the ridge term is isotropic in both domains (Parseval).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_FIT_BYTES = 1 << 30  # normal equations larger than this fall back to the projection


@dataclass(frozen=True)
class Layout:
    """Block size, padded feature counts and the grouping of each side."""

    block: int
    in_features: int  # K, padded to a multiple of block
    out_features: int  # N, padded to a multiple of block
    in_strided: bool = False
    out_strided: bool = False

    @property
    def p(self) -> int:
        return self.in_features // self.block

    @property
    def q(self) -> int:
        return self.out_features // self.block

    @property
    def name(self) -> str:
        return f"{'strided' if self.in_strided else 'contiguous'}/{'strided' if self.out_strided else 'contiguous'}"

    def in_index(self) -> np.ndarray:
        """[b, p]: the input feature holding element k of input block j."""
        return _index(self.block, self.p, self.in_strided)

    def out_index(self) -> np.ndarray:
        """[b, q]: the output feature holding element r of output block i."""
        return _index(self.block, self.q, self.out_strided)


def _index(b: int, blocks: int, strided: bool) -> np.ndarray:
    k = np.arange(b)[:, None]
    j = np.arange(blocks)[None, :]
    return k * blocks + j if strided else j * b + k


def pattern(b: int) -> np.ndarray:
    """[b, b] with pattern[r, k] = (r - k) mod b: where C(v)[r, k] reads v."""
    r = np.arange(b)
    return (r[:, None] - r[None, :]) % b


def _axes(layout: Layout) -> tuple[tuple[int, int, int, int], list[int]]:
    """The [K, N] weight viewed as 4-D (reshape dims) and the perm to [i, j, r, k] block order."""
    b, p, q = layout.block, layout.p, layout.q
    rows = (b, p) if layout.in_strided else (p, b)
    cols = (b, q) if layout.out_strided else (q, b)
    j, k = (1, 0) if layout.in_strided else (0, 1)
    r, i = (2, 3) if layout.out_strided else (3, 2)
    return (*rows, *cols), [i, j, r, k]


def dense(c: np.ndarray, layout: Layout) -> np.ndarray:
    """The dense [K, N] weight of the block-circulant parameters c [q, p, b]."""
    shape, perm = _axes(layout)
    blocks = c[:, :, pattern(layout.block)]  # [i, j, r, k]
    return blocks.transpose(np.argsort(perm)).reshape(layout.in_features, layout.out_features)


def blocks_of(w: np.ndarray, layout: Layout) -> np.ndarray:
    """[q, p, r, k]: the b x b blocks of a dense [K, N] weight under `layout`."""
    shape, perm = _axes(layout)
    return w.reshape(shape).transpose(perm)


def apply(c: np.ndarray, x: np.ndarray, layout: Layout) -> np.ndarray:
    """x [n, K] @ dense(c) by FFT, without forming the dense weight."""
    xf = np.fft.rfft(x[:, layout.in_index()], axis=1).transpose(1, 0, 2)  # [F, n, p]
    y3 = np.fft.irfft(xf @ _spectrum(c), n=layout.block, axis=0)  # [b, n, q]
    y = np.empty((len(x), layout.out_features))
    y[:, layout.out_index()] = y3.transpose(1, 0, 2)
    return y


def project(w: np.ndarray, layout: Layout) -> np.ndarray:
    """The Frobenius-nearest block-circulant weight: each block averaged along wrapped diagonals."""
    b = layout.block
    blocks = blocks_of(w, layout)
    r = np.arange(b)
    return np.stack([blocks[:, :, r, (r - d) % b].mean(axis=-1) for d in range(b)], axis=-1)


def _spectrum(c: np.ndarray) -> np.ndarray:
    """[q, p, b] parameters -> [F, p, q] complex spectra (rfft along the element axis)."""
    return np.fft.rfft(c, axis=2).transpose(2, 1, 0)


def _parameters(cf: np.ndarray, b: int) -> np.ndarray:
    return np.fft.irfft(cf.transpose(2, 1, 0), n=b, axis=2)


def _frequency_weights(b: int) -> np.ndarray:
    """How often each rfft frequency appears in the full spectrum (Parseval for real signals)."""
    weights = np.full(b // 2 + 1, 2.0)
    weights[0] = 1.0
    if b % 2 == 0:
        weights[-1] = 1.0
    return weights


def fit_bytes(layout: Layout) -> int:
    """Memory of the normal equations (complex128 G and H over the b / 2 + 1 frequencies)."""
    f = layout.block // 2 + 1
    return 16 * f * layout.p * (layout.p + layout.q)


def row_flops(layout: Layout) -> int:
    """Floating-point work one activation row adds to the normal equations."""
    f = layout.block // 2 + 1
    return 8 * f * layout.p * (layout.p + layout.q)


class NormalEquations:
    """Per-frequency sums for fitting y ~ x @ B + bias with B block-circulant (streamed by batch)."""

    def __init__(self, layout: Layout, center: bool, offset: np.ndarray | None = None):
        """`center`: a free bias absorbs the means; `offset`: a fixed bias subtracted from targets."""
        self.layout = layout
        self.center = center
        self.offset = None if offset is None else np.pad(np.asarray(offset, np.float64),
                                                         (0, layout.out_features - len(offset)))
        f, p, q = layout.block // 2 + 1, layout.p, layout.q
        self.g = np.zeros((f, p, p), np.complex128)
        self.h = np.zeros((f, p, q), np.complex128)
        self.syy = np.zeros(f)
        self.sum_x = np.zeros(layout.in_features)
        self.sum_y = np.zeros(layout.out_features)
        self.energy = 0.0  # sum of y^2 (the error's denominator)
        self.count = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """x [n, K] inputs and y [n, N] target outputs (both padded)."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        self.energy += float((y * y).sum())
        if self.offset is not None:
            y = y - self.offset
        # [n, F] features -> [n, b, blocks] (the element axis first) -> spectra [F, n, blocks]
        xf = np.fft.rfft(x[:, self.layout.in_index()], axis=1).transpose(1, 0, 2)  # [F, n, p]
        yf = np.fft.rfft(y[:, self.layout.out_index()], axis=1).transpose(1, 0, 2)  # [F, n, q]
        xh = xf.conj().transpose(0, 2, 1)
        self.g += xh @ xf
        self.h += xh @ yf
        self.syy += (np.abs(yf) ** 2).sum(axis=(1, 2))
        self.sum_x += x.sum(axis=0)
        self.sum_y += y.sum(axis=0)
        self.count += len(x)

    def _centered(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(G, H, Syy, mean x, mean y), centered when the layer has a bias to absorb the means."""
        if not self.center or self.count == 0:
            zx, zy = np.zeros_like(self.sum_x), np.zeros_like(self.sum_y)
            return self.g, self.h, self.syy, zx, zy
        n = self.count
        mx, my = self.sum_x / n, self.sum_y / n
        mxf = np.fft.rfft(mx[self.layout.in_index()], axis=0)  # [F, p]
        myf = np.fft.rfft(my[self.layout.out_index()], axis=0)  # [F, q]
        g = self.g - n * mxf.conj()[:, :, None] * mxf[:, None, :]
        h = self.h - n * mxf.conj()[:, :, None] * myf[:, None, :]
        syy = self.syy - n * (np.abs(myf) ** 2).sum(axis=1)
        return g, h, syy, mx, my

    def solve(self, prior: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray | None]:
        """Ridge least squares pulled towards `prior` [q, p, b]; returns (c, bias or None)."""
        g, h, _, mx, my = self._centered()
        p = self.layout.p
        scale = np.real(np.trace(g, axis1=1, axis2=2)) / p
        lam = ridge * scale + 1e-12 * max(float(scale.max(initial=0.0)), 1e-30)
        eye = np.eye(p)
        cf = np.linalg.solve(g + lam[:, None, None] * eye, h + lam[:, None, None] * _spectrum(prior))
        c = _parameters(cf, self.layout.block)
        bias = my - apply(c, mx[None], self.layout)[0] if self.center else None
        return c, bias

    def relative_error(self, c: np.ndarray) -> float:
        """||x @ B(c) + bias - y|| / ||y|| over the added samples.

        The bias is the optimal one when centering, the fixed `offset` (or none) otherwise. Padded
        outputs count with target 0, so with padding this slightly overstates the error.
        """
        g, h, syy, _, _ = self._centered()
        cf = _spectrum(c)
        cross = np.real((cf.conj() * h).sum(axis=(1, 2)))
        quad = np.real((cf.conj() * (g @ cf)).sum(axis=(1, 2)))
        per_freq = syy - 2 * cross + quad
        residual = float((_frequency_weights(self.layout.block) * per_freq).sum()) / self.layout.block
        return float(np.sqrt(max(residual, 0.0) / self.energy)) if self.energy > 0 else 0.0


# ---- one layout's fit, as an executor task ---------------------------------------------------------
def fit_task(item: tuple[Layout, bool, float], *, weight: np.ndarray, bias: np.ndarray | None,
             batches: list) -> tuple[np.ndarray, np.ndarray | None, float, float]:
    """(parameters, bias, local error, the projection's local error) of one layout: its normal
    equations accumulated over `batches` of sampled layer inputs (x, x from the original model or
    None when the same), then, when `aware`, the ridge fit towards the projection. item = (layout,
    aware, ridge); shared: the dense layer's [K, N] weight and bias, and the batches."""
    layout, aware, ridge = item
    stats = NormalEquations(layout, center=aware and bias is not None, offset=None if aware else bias)
    for x, x0 in batches:
        x = np.asarray(x, np.float64)
        x0 = x if x0 is None else np.asarray(x0, np.float64)
        y = x0 @ weight + (bias if bias is not None else 0.0)
        stats.add(pad_columns(x, layout.in_features), pad_columns(y, layout.out_features))
    proj = project(pad_matrix(weight, layout.in_features, layout.out_features), layout)
    proj_error = stats.relative_error(proj)  # with the refitted bias when data-aware
    if not aware:
        return proj, bias, proj_error, proj_error
    c, fitted_bias = stats.solve(proj, ridge)
    return c, fitted_bias, stats.relative_error(c), proj_error


def project_only(weight: np.ndarray, bias: np.ndarray | None, layout: Layout) -> tuple:
    """The projection without data: the same tuple as `fit_task`, errors in weight space."""
    w = pad_matrix(weight, layout.in_features, layout.out_features)
    proj = project(w, layout)
    error = float(np.linalg.norm(dense(proj, layout) - w) / max(np.linalg.norm(w), 1e-30))
    return proj, bias, error, error


def pad_columns(a: np.ndarray, width: int) -> np.ndarray:
    return a if a.shape[1] == width else np.pad(a, ((0, 0), (0, width - a.shape[1])))


def pad_matrix(w: np.ndarray, k: int, n: int) -> np.ndarray:
    if w.shape == (k, n):
        return w
    out = np.zeros((k, n), w.dtype)
    out[: w.shape[0], : w.shape[1]] = w
    return out
