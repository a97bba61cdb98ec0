"""Model inputs (or outputs) as users have them: samples whose dynamic dims may differ.

Text lines of different widths or audio of different lengths cannot be stacked into one array.
`Samples` keeps them as groups: each group is a feed dict whose arrays share their shapes, with
samples on axis 0. When every sample has the same shapes there is exactly one group, and the
object is a plain `Mapping[str, np.ndarray]` (so `samples["input"]` is the stacked array, as a
`.npz` calibration file gives it). Everything that runs a model walks `batches()`, which never
mixes groups, so passes stream variable-shape data without ever concatenating it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

from onnxc.errors import OnnxcError


class Samples(Mapping[str, np.ndarray]):
    """Groups of same-shape feed dicts (samples on axis 0), in a fixed sample order."""

    def __init__(self, groups: Sequence[Mapping[str, np.ndarray]]):
        groups = [dict(g) for g in groups if g and _count(g) > 0]
        names = [list(g) for g in groups]
        if any(n != names[0] for n in names):
            raise OnnxcError(f"samples disagree on their inputs: {sorted({tuple(n) for n in names})}")
        self.groups: list[dict[str, np.ndarray]] = groups
        self._names: list[str] = names[0] if names else []

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_feeds(cls, feeds: Iterable[Mapping[str, np.ndarray]]) -> Samples:
        """Group feed dicts (each one or more samples on axis 0) by their shapes, keeping order.

        Feeds of equal shapes are concatenated into one group, so uniform data is one group.
        """
        buckets: dict[tuple, list[dict[str, np.ndarray]]] = {}
        for feed in feeds:
            feed = {k: np.asarray(v) for k, v in feed.items()}
            if not feed:
                continue
            _count(feed)  # all inputs of one feed hold the same number of samples
            key = tuple((k, v.shape[1:], v.dtype.str) for k, v in feed.items())
            buckets.setdefault(key, []).append(feed)
        groups = [{k: np.concatenate([f[k] for f in fs]) if len(fs) > 1 else fs[0][k] for k in fs[0]}
                  for fs in buckets.values()]
        return cls(groups)

    @classmethod
    def of(cls, data: Samples | Mapping[str, np.ndarray]) -> Samples:
        return data if isinstance(data, Samples) else cls([data])

    # ---- Mapping (uniform data) ------------------------------------------------------------
    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        if len(self.groups) == 1:
            return self.groups[0][name]
        raise OnnxcError(f"'{name}' holds samples of {len(self.groups)} different shapes "
                         f"({', '.join(_fmt(g[name].shape[1:]) for g in self.groups)}); "
                         "this step needs equal shapes")

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    # ---- samples ---------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return sum(_count(g) for g in self.groups)

    @property
    def is_uniform(self) -> bool:
        return len(self.groups) <= 1

    def shapes(self) -> list[dict[str, list[int]]]:
        """Per group, the shape of one sample of each input (with a leading 1): for reports."""
        return [{k: [1, *v.shape[1:]] for k, v in g.items()} for g in self.groups]

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Feed dicts of at most `batch_size` samples, group by group (shapes never mix)."""
        batch_size = max(1, int(batch_size))
        for g in self.groups:
            n = _count(g)
            for start in range(0, n, batch_size):
                yield {k: v[start:start + batch_size] for k, v in g.items()}

    def subset(self, indices: Sequence[int] | np.ndarray) -> Samples:
        """The samples at these global indices (sample order: group by group), in index order."""
        indices = np.sort(np.asarray(indices, dtype=np.int64))
        groups, start = [], 0
        for g in self.groups:
            n = _count(g)
            local = indices[(indices >= start) & (indices < start + n)] - start
            if len(local):
                groups.append({k: v[local] for k, v in g.items()})
            start += n
        return Samples(groups)

    def __repr__(self) -> str:
        return f"Samples({self.count} samples, {len(self.groups)} shape group(s), inputs {self._names})"


def fingerprint(data: Samples | Mapping[str, np.ndarray]) -> bytes:
    """A digest of the samples (names, shapes, dtypes, values): with `model.fingerprint`, the key of
    results computed from a model on data within a process."""
    import hashlib

    h = hashlib.sha256()
    for group in Samples.of(data).groups:
        for name in sorted(group):
            value = np.ascontiguousarray(group[name])
            h.update(f"{name}{value.shape}{value.dtype}".encode())
            h.update(value.tobytes())
    return h.digest()


def _count(feed: Mapping[str, np.ndarray]) -> int:
    counts = {len(v) if np.ndim(v) else 1 for v in feed.values()}
    if len(counts) != 1:
        raise OnnxcError(f"inputs disagree on the number of samples: {sorted(counts)}")
    return counts.pop()


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) or "scalar"
