"""Rank selection shared by the decomposition passes (svd, tucker, cp).

A factorized layer is only worth emitting when it is cheaper, so every rule below ends in the
same place: the largest (or requested) rank whose cost fits, rounded to `round_to`, and `None`
when no rank makes the layer cheaper in MACs. The rules:

- `rank`: a fixed rank (clamped to what the layer allows);
- `energy`: the smallest rank keeping that fraction of the squared singular values (of the
  whitened matrix when fitting to data, so "energy" means output energy);
- `auto`: empirical variational Bayes matrix factorization (EVBMF, Nakajima et al. 2013), the
  rule Kim et al. 2016 used to pick Tucker ranks: keep the components above the noise level it
  estimates from the spectrum itself;
- `ratio` (default): the largest rank whose MACs are at most that fraction of the layer's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from onnxc.errors import UsageError


@dataclass(frozen=True)
class RankRule:
    """Which rule picks a rank; built from a pass's options."""

    rank: int | None = None
    energy: float | None = None
    auto: bool = False
    ratio: float = 0.5
    round_to: int = 8

    @property
    def name(self) -> str:
        if self.rank is not None:
            return f"rank={self.rank}"
        if self.energy is not None:
            return f"energy={self.energy:g}"
        if self.auto:
            return "auto (VBMF)"
        return f"ratio={self.ratio:g}"


def validate_rule(pass_id: str, rule: RankRule) -> None:
    """UsageError for option values that cannot pick a rank."""
    if rule.rank is not None and rule.rank < 1:
        raise UsageError(f"pass '{pass_id}': rank must be >= 1, got {rule.rank}")
    if rule.energy is not None and not 0 < rule.energy <= 1:
        raise UsageError(f"pass '{pass_id}': energy must be in (0, 1], got {rule.energy:g}")
    if not 0 < rule.ratio < 1:
        raise UsageError(f"pass '{pass_id}': ratio must be in (0, 1), got {rule.ratio:g}")
    if rule.round_to < 1:
        raise UsageError(f"pass '{pass_id}': round_to must be >= 1, got {rule.round_to}")


def energy_rank(singular_values: np.ndarray, energy: float) -> int:
    """Smallest r whose top-r squared singular values hold `energy` of the total."""
    s2 = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1] ** 2
    total = s2.sum()
    if total <= 0:
        return 1
    cumulative = np.cumsum(s2) / total
    return int(np.searchsorted(cumulative, energy - 1e-12) + 1)


def round_rank(r: int, round_to: int, max_rank: int) -> int:
    """`r` rounded to the nearest multiple of `round_to` (at least one multiple), clamped."""
    if round_to > 1:
        r = max(round_to, int(round(r / round_to)) * round_to)
    return int(min(max(r, 1), max_rank))


def largest_fitting(cost: Callable[[int], float], budget: float, max_rank: int) -> int | None:
    """The largest rank in [1, max_rank] with cost(rank) <= budget (cost grows with the rank)."""
    lo, hi = 0, max_rank
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo if lo >= 1 else None


def evbmf_rank(singular_values: np.ndarray, shape: Sequence[int], residual: float = 0.0) -> int:
    """Rank chosen by empirical VBMF for an L x M matrix with these singular values.

    The noise variance is estimated by minimizing the EVB free energy over its analytic bounds
    (a bounded scalar search done here with a grid and golden-section refinement, numpy only);
    components whose singular value passes the EVB threshold are kept.
    """
    s = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1]
    L, M = sorted(int(d) for d in shape)
    H = min(len(s), L)
    s = s[:H]
    if H == 0 or s[0] <= 0:
        return 1
    alpha = L / M
    tau_bar = 2.5129 * np.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    eh_ub = int(min(np.ceil(L / (1 + alpha)) - 1, H)) - 1
    upper = (np.sum(s**2) + residual) / (L * M)
    tail = s[eh_ub + 1:] if 0 <= eh_ub + 1 < H else s[-1:]
    lower = max(tail[0] ** 2 / (M * x_bar), np.mean(tail**2) / M)
    if not lower < upper:
        lower = upper * 1e-6

    def free_energy(sigma2: float) -> float:
        x = s**2 / (M * sigma2)
        z1, z2 = x[x > x_bar], x[x <= x_bar]
        tau_z1 = 0.5 * (z1 - (1 + alpha) + np.sqrt(np.maximum((z1 - (1 + alpha)) ** 2 - 4 * alpha, 0)))
        return float(np.sum(z2 - np.log(z2)) + np.sum(z1 - tau_z1) + np.sum(np.log((tau_z1 + 1) / z1))
                     + alpha * np.sum(np.log(tau_z1 / alpha + 1)) + residual / (M * sigma2)
                     + (L - H) * np.log(sigma2))

    sigma2 = _minimize_bounded(free_energy, lower, upper)
    threshold = np.sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return max(1, int(np.sum(s > threshold)))


def _minimize_bounded(f: Callable[[float], float], lo: float, hi: float, steps: int = 64) -> float:
    """Grid search on a log scale, then golden-section refinement around the best point."""
    grid = np.geomspace(lo, hi, steps)
    values = [f(g) for g in grid]
    i = int(np.argmin(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, steps - 1)]
    golden = (np.sqrt(5) - 1) / 2
    c, d = b - golden * (b - a), a + golden * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(40):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - golden * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + golden * (b - a)
            fd = f(d)
    return float((a + b) / 2)


Spectra = Callable[[], Sequence[tuple[np.ndarray, Sequence[int]]]]


def choose_ranks(rule: RankRule, cost: Callable[[tuple[int, ...]], float], original_cost: float,
                 dims: Sequence[int], *, spectra: Spectra | None = None) -> tuple[tuple[int, ...] | None, str]:
    """Ranks for one layer under `rule` (one per entry of `dims`, each at most that entry), or
    (None, reason) when no choice makes the layer cheaper in MACs.

    `cost(ranks)` is the factorized layer's MACs. `spectra()` lazily returns (singular values,
    matrix shape) per mode for the energy and VBMF rules; with more spectra than dims (a CP rank
    shared by all modes) the largest per-mode rank is used. The ratio rule scales all ranks in
    proportion to their dims and takes the largest scale whose rounded ranks fit the budget.
    """
    dims = tuple(int(d) for d in dims)
    if min(dims, default=0) < 1:
        return None, "no rank available"
    if rule.rank is not None:
        ranks = tuple(min(rule.rank, d) for d in dims)
    elif rule.energy is not None or rule.auto:
        if spectra is None:
            return None, "no spectrum for this layer"
        per_mode = [energy_rank(s, rule.energy) if rule.energy is not None else evbmf_rank(s, shape)
                    for s, shape in spectra()]
        if len(per_mode) != len(dims):
            per_mode = [max(per_mode)] * len(dims)
        ranks = tuple(round_rank(r, rule.round_to, d) for r, d in zip(per_mode, dims))
    else:
        top = max(dims)

        def scaled(k: int) -> tuple[int, ...]:
            """Ranks at scale k, rounded to `round_to` (those below one multiple kept as they are);
            non-decreasing in k, so the largest fitting scale is found by bisection."""
            exact = [max(1, min(d, int(round(k * d / top)))) for d in dims]
            return tuple(round_rank(r, rule.round_to, d) if r >= rule.round_to else r for r, d in zip(exact, dims))

        k = largest_fitting(lambda k: cost(scaled(k)), rule.ratio * original_cost, top)
        if k is None:
            return None, f"even rank 1 keeps more than ratio={rule.ratio:g} of the MACs"
        ranks = scaled(k)
    if cost(ranks) >= original_cost:
        shown = ranks[0] if len(ranks) == 1 else "x".join(map(str, ranks))
        return None, f"rank {shown} would not reduce MACs ({int(cost(ranks))} >= {int(original_cost)})"
    return ranks, ""
