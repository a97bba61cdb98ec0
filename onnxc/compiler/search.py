"""Which step count the allocator verifies next, from the verified rounds so far (`Search`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from onnxc.compiler.allocation import Target


class Search:
    """Which step count to verify next. Verified rounds bound it: the most steps known within the
    budget (`ok`) and the fewest known over it (`over`); with a target, the most known short of
    it (`short`) and the fewest known to meet it (`enough`). The next count comes from the
    predictions corrected by the last round (its measured error over the predicted one, its
    measured saving over the predicted one), kept strictly inside the bounds, else from
    bisecting them. Predicted errors add in quadrature and are often far off (refits compensate
    some errors, neighbouring rewrites compound others), so the correction matters.
    The aim: the fewest steps that meet the target within the budget, else the most steps
    within the budget; with only a budget, the most steps within it. When one step after the
    most within the budget breaks it (`blocked`), the allocator takes that step out and searches
    on without it: one rewrite that is harmless alone can compound with the others far beyond
    what its own measurement said, and the steps after it may still reach the target."""

    def __init__(self, cum_save: np.ndarray, cum_err2: np.ndarray, base_value: float, target: Target | None,
                 budget: float):
        self.cum_save, self.cum_err2, self.budget, self.target = cum_save, cum_err2, budget, target
        self.n = len(cum_save) - 1
        self.wanted = (1 - target.ratio) * base_value if target is not None else None
        self.ok, self.over, self.short, self.enough = 0, self.n + 1, 0, None
        self.seen: set[int] = set()
        self.save_scale = 1.0

    def blocked(self) -> bool:
        """The target is out of reach because the one step after the most within the budget breaks it."""
        return (self.target is not None and self.enough is None and self.over == self.ok + 1
                and self.over <= self.n)

    def without_step(self, cum_save: np.ndarray, cum_err2: np.ndarray) -> Search:
        """The search over a step list with step `over` taken out (the steps up to `ok` are the same)."""
        out = Search(cum_save, cum_err2, 0.0, self.target, self.budget)
        out.wanted, out.save_scale = self.wanted, self.save_scale
        out.ok, out.short = self.ok, self.short
        out.seen = {k for k in self.seen if k <= self.ok}
        return out

    def resume(self) -> int | None:
        """The first count to verify after `without_step`: the target's, as corrected so far."""
        k = max(self._count_for(self.wanted, self.save_scale), self.ok + 1)
        return k if k <= self.n else None

    def first(self) -> int:
        if self.target is not None:
            return self._count_for(self.wanted, 1.0)
        return self._count_within(0.8 * self.budget, 1.0)

    def _count_for(self, saving: float, scale: float) -> int:
        """The fewest steps predicted (times `scale`) to save `saving`."""
        return int(min(np.searchsorted(self.cum_save * scale, saving - 1e-9), self.n))

    def _count_within(self, error: float, scale: float) -> int:
        """The most steps predicted (times `scale`) to stay within `error`."""
        return int(np.searchsorted(self.cum_err2 * scale ** 2, error ** 2, side="right") - 1)

    def next(self, k: int, error: float, saved: float, met: bool, ratio: float) -> tuple[int | None, str]:
        """The next step count after verifying `k` steps (None: stop), and why."""
        self.seen.add(k)
        predicted_error = math.sqrt(self.cum_err2[k])
        error_scale = error / predicted_error if predicted_error > 0 and math.isfinite(error) else None
        save_scale = saved / self.cum_save[k] if self.cum_save[k] > 0 and saved > 0 else None
        self.save_scale = save_scale or self.save_scale
        within = error <= self.budget
        if within:
            self.ok = max(self.ok, k)
        else:
            self.over = min(self.over, k)
        if self.target is not None and within:
            if met:
                self.enough = k if self.enough is None else min(self.enough, k)
            else:
                self.short = max(self.short, k)
        if self.target is not None and not within:
            lo, hi = self.ok, self.over  # the target needs more than `over` allows: most within
            guess = self._count_within(0.9 * self.budget, error_scale) if error_scale else None
            why = f"error {error:.3g} over budget {self.budget:g}"
        elif self.target is not None and self.enough is None:
            lo, hi = self.short, self.over
            guess = self._count_for(self.wanted, save_scale) if save_scale else None
            why = f"saved {saved / self.wanted:.0%} of what the target needs"
            if guess is not None and guess >= self.over:  # out of reach within the budget: most within it
                if error >= 0.9 * self.budget:
                    return None, ""
                lo, guess = self.ok, self._count_within(self.budget, error_scale) if error_scale else None
                why += f", more than {self.over} steps (over the budget)"
        elif self.target is not None:
            if met and ratio >= self.target.ratio - 0.05:
                return None, ""  # met close to the target: fewer steps would not save much error
            lo, hi = self.short, self.enough  # met: the fewest steps that still meet it
            guess = self._count_for(self.wanted, save_scale) if save_scale else None
            why = "target met" if met else "short of the target"
        else:
            if within and error >= 0.8 * self.budget:
                return None, ""
            lo, hi = self.ok, self.over
            guess = self._count_within(0.9 * self.budget, error_scale) if error_scale else None
            why = f"error {error:.3g} against budget {self.budget:g}"
        if hi - lo <= 1:
            return None, ""
        if guess is None or not lo < guess < hi or guess in self.seen:
            guess = (lo + hi) // 2
        if guess in self.seen:
            return None, ""
        return guess, f"{why}: try {guess} steps (known: {lo} .. {hi})"
