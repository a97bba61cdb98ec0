"""Fast, deterministic k-means for 1-D data (a layer's weights), one or many rows at once.

General k-means costs O(N K) per iteration; in one dimension the clusters are contiguous runs
of the sorted values, so after one sort every Lloyd iteration only has to place the K-1
boundaries (midpoints between neighbouring centroids) in the sorted array with a binary search
and read each cluster's weight and sum from prefix sums: O(K log N) per iteration, independent
of N. A single row longer than `HIST_MIN` is not even sorted: it is summarized by a fine
equal-width histogram (count, sum and sum of squares per bin, O(N)), and the same Lloyd runs on
the bins. Final codes are exact nearest-centroid assignments (a lookup grid resolves most values
in O(1), binary search the few near a boundary). Rows (per-channel codebooks) are clustered
together: each row is mapped to its own interval of one sorted key axis (row r occupies
[2r, 2r+1]) so that one `searchsorted` serves every row.

Points may carry weights (data-aware clustering: the importance of each weight). Exact zeros,
when a row has any, get a centroid fixed at exactly 0.0 that Lloyd never moves, so pruned
weights stay exact zeros. Empty clusters are re-seeded by splitting the cluster with the
largest weighted squared error. Initializations: `linear` (evenly spaced between min and max,
Deep Compression's choice: it keeps centroids for the rare large weights, at the price of a
higher squared error and slow Lloyd convergence for large K), `density` (weighted quantiles),
`kmeans++` (seeded greedy D^2 sampling, O(K log N) per candidate; the lowest squared error) and
`companded` (spacing by density^(1/3), the high-resolution MSE optimum).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INITS = ("linear", "density", "kmeans++", "companded")
HIST_MIN = 1 << 20  # a single row longer than this is clustered on a histogram
HIST_BINS = 1 << 18  # also the lookup grid of the final assignment of long rows


@dataclass
class KMeans1D:
    centroids: np.ndarray  # [R, K] float64, ascending per row
    codes: np.ndarray  # [R, n] uint8 (K <= 256) or uint16: index of each value's centroid
    counts: np.ndarray  # [R, K] int64: members per cluster
    inertia: np.ndarray  # [R] weighted sum of squared errors (on the histogram for long rows)
    iterations: int
    zero_code: np.ndarray  # [R] int: index of the fixed 0.0 centroid, -1 when the row had no zeros


class _Points:
    """Rows of points sorted by value with prefix sums of weight, weight*x and weight*x^2.

    Built exactly (each row sorted) or, for one very long row, from a fine histogram: each
    non-empty bin becomes one point at its weighted mean carrying its total weight, with the
    exact sum of squares kept, so Lloyd works on at most `HIST_BINS` points instead of N.
    """

    def __init__(self, flat: np.ndarray, rows: int, m: int, p0: np.ndarray | None, p1: np.ndarray,
                 p2: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        self.rows, self.n = rows, m
        self.flat, self.p0, self.p1, self.p2 = flat, p0, p1, p2
        self.lo, self.hi = lo, hi
        span = hi - lo
        self.scale = np.where(span > 0, 1.0 / np.where(span > 0, span, 1.0), 0.0)
        self.keys = flat if rows == 1 else self._to_key(flat.reshape(rows, m)).reshape(-1)
        self.start = np.arange(rows, dtype=np.int64) * m
        self.total = self.sum0(self.start, self.start + m)

    @classmethod
    def sorted(cls, x: np.ndarray, weights: np.ndarray | None) -> _Points:
        rows, n = x.shape
        if weights is None:
            s = np.sort(x, axis=1).astype(np.float64)
            w = None
        else:
            order = np.argsort(x, axis=1, kind="stable")
            s = np.take_along_axis(x, order, axis=1).astype(np.float64)
            w = np.take_along_axis(weights, order, axis=1).astype(np.float64)
        wx = s if w is None else w * s
        p0 = None if w is None else _prefix(w.reshape(-1))
        return cls(s.reshape(-1), rows, n, p0, _prefix(wx.reshape(-1)), _prefix((wx * s).reshape(-1)),
                   s[:, 0].copy(), s[:, -1].copy())

    @classmethod
    def histogram(cls, x: np.ndarray, weights: np.ndarray | None, g: np.ndarray, bins: int) -> _Points:
        """One row ([n]) summarized by `bins` equal-width bins (`g`: bin of each value)."""
        lo, hi = float(x.min()), float(x.max())
        if weights is None:
            s0 = np.bincount(g, minlength=bins).astype(np.float64)
            s1 = np.bincount(g, weights=x, minlength=bins)
            s2 = np.bincount(g, weights=np.square(x, dtype=np.float64), minlength=bins)
        else:
            w = np.asarray(weights, dtype=np.float64).reshape(-1)
            wx = w * x
            s0 = np.bincount(g, weights=w, minlength=bins)
            s1 = np.bincount(g, weights=wx, minlength=bins)
            s2 = np.bincount(g, weights=wx * x, minlength=bins)
        keep = s0 > 0
        s0, s1, s2 = s0[keep], s1[keep], s2[keep]
        means = np.clip(s1 / s0, lo, hi)
        return cls(means, 1, len(means), _prefix(s0), _prefix(s1), _prefix(s2), np.array([lo]), np.array([hi]))

    def _to_key(self, values: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        rows = np.arange(self.rows) if rows is None else rows
        lo, scale = self.lo[rows, None], self.scale[rows, None]
        t = np.clip((values - lo) * scale, -0.25, 1.25)
        return t + 2.0 * rows[:, None]

    def locate(self, bounds: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Flat index of the first point >= each boundary (bounds [len(rows), m])."""
        if self.rows == 1:
            return np.searchsorted(self.keys, bounds.reshape(-1), side="left").reshape(bounds.shape)
        keys = self._to_key(bounds, rows)
        idx = np.searchsorted(self.keys, keys.reshape(-1), side="left").reshape(bounds.shape)
        start = self.start[rows, None]
        return np.clip(idx, start, start + self.n)

    def sum0(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (b - a).astype(np.float64) if self.p0 is None else self.p0[b] - self.p0[a]

    def sse(self, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Weighted sum of (x - c)^2 over flat index ranges [a, b)."""
        s0, s1, s2 = self.sum0(a, b), self.p1[b] - self.p1[a], self.p2[b] - self.p2[a]
        return np.maximum(s2 - 2.0 * c * s1 + c * c * s0, 0.0)


def _bin_index(x: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Equal-width bin of each value over [lo, hi] (in place on one temporary: big rows)."""
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.intp)
    dtype = np.float32 if x.dtype == np.float32 else np.float64
    g = np.subtract(x, dtype(lo), dtype=dtype)
    g *= dtype(bins / (hi - lo))
    np.clip(g, 0, bins - 1, out=g)
    return g.astype(np.intp)


def _prefix(values: np.ndarray) -> np.ndarray:
    out = np.empty(len(values) + 1, dtype=np.float64)
    out[0] = 0.0
    np.cumsum(values, out=out[1:])
    return out


def kmeans1d(values: np.ndarray, k: int, *, weights: np.ndarray | None = None, init: str = "linear",
             rng: np.random.Generator | None = None, max_iter: int = 300, keep_zero: bool = True,
             reseed_rounds: int = 3, hist: bool = True) -> KMeans1D:
    """Cluster each row of `values` ([n] or [R, n]) into at most `k` centroids.

    `weights` (same shape, >= 0) weight each point's squared error. `rng` is only used by
    `kmeans++`. A single row longer than `HIST_MIN` is clustered on its `HIST_BINS`-bin
    histogram (`hist=False` forces the exact sort); codes are always exact nearest-centroid
    assignments. Deterministic: the same inputs and generator state give the same result.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got '{init}'")
    x = np.asarray(values)
    x = x.reshape(1, -1) if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError("values must be a non-empty [n] or [R, n] array")
    if weights is not None:
        weights = np.broadcast_to(np.asarray(weights, dtype=np.float64), x.shape)
    rows, n = x.shape
    k = max(1, min(int(k), n))
    grid = None
    if rows == 1 and n > HIST_MIN and hist:
        grid = _bin_index(x[0], float(x.min()), float(x.max()), HIST_BINS)
        data = _Points.histogram(x[0], None if weights is None else weights[0], grid, HIST_BINS)
    else:
        data = _Points.sorted(x, weights)
    zero_rows = np.zeros(rows, dtype=bool)
    if keep_zero:
        zero_rows = np.any(x == 0, axis=1)
    if init == "kmeans++":
        c = _init_kmeanspp(data, k, zero_rows, rng if rng is not None else np.random.default_rng(0))
    elif init == "companded":
        c = _init_companded(data, k)
    elif init == "density":
        c = _init_density(data, k)
    else:
        c = data.lo[:, None] + (data.hi - data.lo)[:, None] * np.linspace(0.0, 1.0, k)[None, :]
    fixed = np.zeros_like(c, dtype=bool)
    if zero_rows.any() and k > 1:
        r = np.nonzero(zero_rows)[0]
        j = np.argmin(np.abs(c[r]), axis=1)
        c[r, j] = 0.0
        fixed[r, j] = True
        c, fixed = _sort_rows(c, fixed)
    elif zero_rows.any():
        c[zero_rows] = 0.0
        fixed[zero_rows] = True
    iterations = 0
    for round_ in range(reseed_rounds + 1):
        c, it = _lloyd(data, c, fixed, max_iter)
        iterations += it
        if round_ == reseed_rounds or not _reseed_empty(data, c, fixed):
            break
        c, fixed = _sort_rows(c, fixed)
    edges = _edges(data, c, np.arange(rows))
    inertia = data.sse(edges[:, :-1], edges[:, 1:], c).sum(axis=1)
    codes = _assign(x, c, grid)
    offsets = (np.arange(rows, dtype=np.int64) * k)[:, None]
    counts = np.bincount((codes + offsets).reshape(-1), minlength=rows * k).reshape(rows, k)
    zero_code = np.where(fixed.any(axis=1), np.argmax(fixed, axis=1), -1)
    return KMeans1D(c, codes, counts.astype(np.int64), inertia, iterations, zero_code)


def _sort_rows(c: np.ndarray, fixed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(c, axis=1, kind="stable")
    return np.take_along_axis(c, order, axis=1), np.take_along_axis(fixed, order, axis=1)


def _edges(data: _Points, c: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[len(rows), K+1] flat indices: cluster j of row r is [edges[r, j], edges[r, j+1])."""
    start = data.start[rows, None]
    inner = data.locate(0.5 * (c[:, 1:] + c[:, :-1]), rows) if c.shape[1] > 1 else start[:, :0]
    return np.concatenate([start, inner, start + data.n], axis=1)


def _lloyd(data: _Points, c: np.ndarray, fixed: np.ndarray, max_iter: int) -> tuple[np.ndarray, int]:
    """Lloyd iterations until no boundary moves (only unconverged rows are recomputed)."""
    if data.rows == 1:
        return _lloyd_row(data, c, fixed, max_iter)
    c = c.copy()
    active = np.arange(data.rows)
    prev = None
    it = 0
    while it < max_iter:
        it += 1
        ca = c[active]
        edges = _edges(data, ca, active)
        a, b = edges[:, :-1], edges[:, 1:]
        s0 = data.sum0(a, b)
        s1 = data.p1[b] - data.p1[a]
        new = np.where(s0 > 0, s1 / np.where(s0 > 0, s0, 1.0), ca)
        new = np.where(fixed[active], 0.0, new)
        c[active] = new
        if prev is not None:
            moved = np.any(edges != prev, axis=1)
            if not moved.all():
                active, edges = active[moved], edges[moved]
                if active.size == 0:
                    break
        prev = edges
    return c, it


def _lloyd_row(data: _Points, c: np.ndarray, fixed: np.ndarray, max_iter: int) -> tuple[np.ndarray, int]:
    """The single-row case with as few numpy calls per iteration as possible."""
    c = c[0].copy()
    fixed = fixed[0]
    k = c.size
    edges = np.empty(k + 1, dtype=np.int64)
    edges[0], edges[-1] = 0, data.n
    prev = np.full(k + 1, -1, dtype=np.int64)
    p0, p1 = data.p0, data.p1
    it = 0
    while it < max_iter:
        it += 1
        edges[1:-1] = np.searchsorted(data.keys, 0.5 * (c[1:] + c[:-1]), side="left")
        if np.array_equal(edges, prev):
            break
        s0 = np.diff(edges).astype(np.float64) if p0 is None else np.diff(p0[edges])
        full = s0 > 0
        c[full] = np.diff(p1[edges])[full] / s0[full]
        c[fixed] = 0.0
        prev[:] = edges
    return c[None, :], it


def _reseed_empty(data: _Points, c: np.ndarray, fixed: np.ndarray) -> bool:
    """Move each empty centroid into the cluster with the largest error (split it); in place."""
    rows = np.arange(data.rows)
    edges = _edges(data, c, rows)
    a, b = edges[:, :-1], edges[:, 1:]
    s0 = data.sum0(a, b)
    empty = (s0 <= 0) & ~fixed
    if not empty.any():
        return False
    err = data.sse(a, b, c)
    changed = False
    for r in np.nonzero(empty.any(axis=1))[0]:
        slots = np.nonzero(empty[r])[0]
        donors = np.argsort(-err[r], kind="stable")[: len(slots)]
        for slot, donor in zip(slots, donors):
            if err[r, donor] <= 0 or s0[r, donor] <= 0:
                continue
            spread = np.sqrt(err[r, donor] / s0[r, donor])
            c[r, slot] = c[r, donor] + 0.5 * spread
            changed = True
    return changed


def _init_density(data: _Points, k: int) -> np.ndarray:
    """Centroids at the weighted quantiles (j + 1/2) / K of each row."""
    return _quantiles(data, (np.arange(k) + 0.5) / k)


def _quantiles(data: _Points, q: np.ndarray) -> np.ndarray:
    """[R, len(q)]: the point of each row at the weighted quantiles `q` (fractions in [0, 1])."""
    out = np.empty((data.rows, q.size))
    for r in range(data.rows):
        a, b = data.start[r], data.start[r] + data.n
        if data.p0 is None:
            idx = a + np.minimum((q * data.n).astype(np.int64), data.n - 1)
        else:
            target = data.p0[a] + q * data.total[r]
            idx = np.clip(np.searchsorted(data.p0[a:b + 1], target, side="right") - 1 + a, a, b - 1)
        out[r] = data.flat[idx]
    return out


def _init_companded(data: _Points, k: int) -> np.ndarray:
    """Centroids spaced evenly in the cumulative of density^(1/3) (the high-resolution optimum).

    For many levels the MSE-optimal quantizer puts points with density proportional to p(x)^(1/3)
    (Panter-Dite), so starting there leaves Lloyd only a little polishing, where a linear start
    needs thousands of iterations at K = 256. The density is estimated on equal-mass bins (so
    heavy tails and a sharp centre are both resolved): a bin of width w holding mass 1/B has
    density 1/(B w), hence weight w^(2/3) in the companded cumulative.
    """
    bins = int(min(max(8 * k, 256), 4096, data.n))
    rows = np.arange(data.rows)
    edges = _quantiles(data, np.linspace(0.0, 1.0, bins + 1))
    edges[:, 0], edges[:, -1] = data.lo, data.hi
    g = np.cbrt(np.square(np.diff(edges, axis=1)))
    cum = np.concatenate([np.zeros((data.rows, 1)), np.cumsum(g, axis=1)], axis=1)
    out = np.empty((data.rows, k))
    for r in rows:
        total = cum[r, -1]
        if total > 0:
            out[r] = np.interp((np.arange(k) + 0.5) / k * total, cum[r], edges[r])
        else:
            out[r] = data.lo[r]
    return out


def _init_kmeanspp(data: _Points, k: int, zero_rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ (D^2 sampling, best of 2 + ln K candidates per step) for all rows at once.

    Each candidate costs O(K log n) through the prefix sums: the D^2 mass of a cell is its
    weighted squared error around its centre, and a point inside a cell is found by binary search.
    """
    rows = np.arange(data.rows)
    trials = 2 + int(np.log(k))
    start, end = data.start, data.start + data.n
    first = data.flat[_sample_index(data, start, end, rng.random(data.rows) * data.total, None)]
    centres = np.sort(np.where(zero_rows, 0.0, first)[:, None], axis=1)
    for _ in range(1, k):
        edges = _edges(data, centres, rows)
        a, b = edges[:, :-1], edges[:, 1:]
        cum = np.cumsum(data.sse(a, b, centres), axis=1)
        total = cum[:, -1]
        u = rng.random((data.rows, trials)) * total[:, None]  # [R, L]
        cell = np.minimum((cum[:, None, :] <= u[:, :, None]).sum(axis=2), centres.shape[1] - 1)
        before = np.where(cell > 0, np.take_along_axis(cum, np.maximum(cell - 1, 0), axis=1), 0.0)
        ca, cb, cc = (np.take_along_axis(m, cell, axis=1).reshape(-1) for m in (a, b, centres))
        idx = _sample_index(data, ca, cb, (u - before).reshape(-1), cc)
        cand = data.flat[np.clip(idx, np.repeat(start, trials), np.repeat(end, trials) - 1)]
        # Potential after adding each candidate (rows repeated L times), keep the best per row.
        trial_rows = np.repeat(rows, trials)
        trial_c = np.sort(np.concatenate([np.repeat(centres, trials, axis=0), cand[:, None]], axis=1), axis=1)
        te = _edges(data, trial_c, trial_rows)
        potential = data.sse(te[:, :-1], te[:, 1:], trial_c).sum(axis=1).reshape(data.rows, trials)
        best = np.argmin(potential, axis=1)
        new = np.where(total > 0, cand.reshape(data.rows, trials)[rows, best], centres[:, 0])
        centres = np.sort(np.concatenate([centres, new[:, None]], axis=1), axis=1)
    return centres


def _sample_index(data: _Points, a: np.ndarray, b: np.ndarray, u: np.ndarray,
                  centre: np.ndarray | None) -> np.ndarray:
    """Per row, the point p in [a, b) where the cumulative mass from a first exceeds u.

    The mass of a point is its weight (centre None) or its weighted squared distance to `centre`.
    Vectorized binary search on the prefix sums.
    """
    lo, hi = a + 1, np.maximum(b, a + 1)
    for _ in range(int(np.ceil(np.log2(max(data.n, 2)))) + 2):
        searching = lo < hi
        if not searching.any():
            break
        mid = (lo + hi) // 2
        f = data.sum0(a, mid) if centre is None else data.sse(a, mid, centre)
        go_left = f > u
        hi = np.where(searching & go_left, mid, hi)
        lo = np.where(searching & ~go_left, mid + 1, lo)
    return lo - 1


def _assign(x: np.ndarray, c: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
    """Index of the nearest centroid of each value (ties to the upper one)."""
    k = c.shape[1]
    dtype = np.uint8 if k <= 256 else np.uint16
    codes = np.empty(x.shape, dtype=dtype)
    for r in range(x.shape[0]):
        codes[r] = _assign_row(x[r], 0.5 * (c[r, 1:] + c[r, :-1]), grid)
    return codes


def _assign_row(x: np.ndarray, bounds: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
    """`searchsorted(bounds, x, 'right')`, through a lookup grid for long rows.

    A uniform grid over [min, max] (`grid`: each value's cell among `HIST_BINS`, when the
    histogram already computed it) gives most values their code by one table lookup; only values
    in cells that contain a boundary (with half a cell of margin against rounding) are resolved
    by binary search.
    """
    if x.size < 1 << 16 or bounds.size == 0:
        return np.searchsorted(bounds, x, side="right")
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.searchsorted(bounds, x, side="right")
    cells = HIST_BINS if grid is not None else int(min(HIST_BINS, x.size))
    g = grid if grid is not None else _bin_index(x, lo, hi, cells)
    width = (hi - lo) / cells
    starts = lo + width * np.arange(cells)
    code_lo = np.searchsorted(bounds, starts - 0.5 * width, side="right")
    code_hi = np.searchsorted(bounds, starts + 1.5 * width, side="right")
    codes = code_lo.astype(np.uint16 if bounds.size > 255 else np.uint8)[g]
    exact = (code_lo != code_hi)[g]
    codes[exact] = np.searchsorted(bounds, x[exact], side="right")
    return codes


def assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Public nearest-centroid assignment for [R, n] values and [R, K] ascending centroids."""
    return _assign(np.atleast_2d(values), np.atleast_2d(centroids))
