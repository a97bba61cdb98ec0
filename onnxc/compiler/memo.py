"""Results the sensitivity sweep computes again and again, kept for the next identical request.

The sweep runs one pass per candidate-level, each against the same original model and the same
calibration samples: every level of a channel group captures the same tensors, and every refit
judged at the model's outputs runs the same original model on the same samples. Recomputing
them costs as much as the rest of a probe. Inside `keeping()` (the sweep's tasks) the last
result of each kind is kept, keyed by the model's and the samples' digests; outside it nothing
is kept, so a single compile's memory is what its passes need.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_ACTIVE = [0]
_STORE: dict[str, tuple[Any, Any]] = {}


@contextmanager
def keeping() -> Iterator[None]:
    """Keep results inside this block; they stay stored for the next block until `clear()`."""
    _ACTIVE[0] += 1
    try:
        yield
    finally:
        _ACTIVE[0] -= 1


def active() -> bool:
    return _ACTIVE[0] > 0


def get(kind: str, key: Any) -> Any | None:
    """The stored result of `kind` when it was computed for `key`, else None."""
    if not active():
        return None
    found = _STORE.get(kind)
    return found[1] if found is not None and found[0] == key else None


def put(kind: str, key: Any, value: Any) -> None:
    """Store `value` as the last result of `kind` (only inside `keeping()`)."""
    if active():
        _STORE[kind] = (key, value)


def drop(kind: str) -> None:
    """Forget the last result of `kind` (before computing a new one, so two never coexist)."""
    _STORE.pop(kind, None)


def clear() -> None:
    _STORE.clear()
