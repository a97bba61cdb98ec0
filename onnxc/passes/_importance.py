"""Which units of a channel group to remove: scores, consumer statistics and greedy selection.

Four criteria, from cheapest to most faithful:
- `l1`/`l2`: norms of the producers' filters (no data);
- `activation`: mean |x| of each channel where the next layers read it;
- `thinet` (Luo et al. 2017): the Gram matrix of every channel's contribution to the next layers'
  outputs at sampled positions; greedily remove the set whose summed contribution is smallest;
- `lsq`: greedy backward elimination on the next layers' own least-squares problems. Removing the
  columns J of a ridge regression with inverse A = (X'X + lambda I)^-1 and solution B raises its
  residual by tr(B_J' A_JJ^-1 B_J) (the refit compensates what it can, and this counts only what
  it cannot); A and B are then downdated by a Schur complement. This is the error the refit in
  `_reconstruct` will actually reach, so it picks the channels the refit can best do without.

Selection is one greedy loop for all criteria: each step removes the allowed unit of least cost,
where "allowed" enforces the grouped-conv bins and the minimum channels of every member tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx

from onnxc.compiler import runtime
from onnxc.compiler.graph import GraphView
from onnxc.compiler.linear import LinearLayer, is_linear
from onnxc.passes import _reconstruct as rec
from onnxc.passes.channel_groups import ChannelGroup

LSQ_MAX_DIM = 2048  # consumers with more inputs per output use the ThiNet statistic instead
LSQ_BUDGET = 512 * 2**20  # normal equations held for lsq over all groups; past it, ThiNet again


class MeanAbs:
    """Mean |activation| per channel of one tensor."""

    def __init__(self, name: str):
        self.name, self.total, self.count = name, None, 0

    def update(self, values: dict[str, np.ndarray], rng: np.random.Generator) -> None:
        x = np.abs(values[self.name]).astype(np.float64)
        x = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
        self.total = x.sum(1) if self.total is None else self.total + x.sum(1)
        self.count += x.shape[1]

    def result(self) -> np.ndarray:
        return self.total / max(self.count, 1)


class ThinetGram:
    """Gram matrix over units of each input channel's contribution to the layer's output.

    Row s is one sampled (position, output channel) pair; entry c is what input channel c adds to
    that output. Removing a set T changes the output by sum_{c in T} z_c, whose squared norm is
    1_T' G 1_T: greedy selection on G needs no further data.
    """

    def __init__(self, node: onnx.NodeProto, view: GraphView, units: np.ndarray, n_units: int,
                 samples: int, total: int):
        self.node, self.x = node, node.input[0]
        self.units, self.n_units = units, n_units
        self.samples, self.total = samples, total
        layer = LinearLayer.read(node, view, with_add=False)
        self.gram = np.zeros((n_units, n_units))
        self.geom = rec.conv_geometry(node, view)  # None unless a 2-D Conv
        if not isinstance(layer, LinearLayer):  # a ConvTranspose: no statistic of this kind
            self.w, self.ok = None, False
            return
        w = layer.weight.astype(np.float32)
        self.w = w.reshape(w.shape[0], w.shape[1], -1) if w.ndim > 2 else w  # [O, C/G, kk] or [O, F]
        self.ok = w.ndim == 2 or self.geom is not None

    def update(self, values: dict[str, np.ndarray], rng: np.random.Generator) -> None:
        x = values[self.x]
        o_count = self.w.shape[0]
        if self.geom is None:
            rows = x.reshape(len(x), -1)  # [B, F]
            per = max(1, min(o_count, math.ceil(self.samples / max(self.total, 1))))
            outs = np.stack([rng.choice(o_count, size=per, replace=False) for _ in range(len(rows))])
            z = (rows[:, None, :] * self.w[outs]).reshape(-1, rows.shape[1])
        else:
            oh, ow = self.geom.out_size(*x.shape[2:])  # this batch's size (see rec.Geometry)
            b, oy, ox = rec.sample_positions(rng, len(x), oh, ow,
                                             rec.rows_per_batch(self.samples, len(x), self.total, oh * ow))
            p = self.geom.patches(x, b, oy, ox)  # [S, C, kk]
            o = rng.integers(0, o_count, size=len(b))
            cg = self.w.shape[1]
            group_of_o = o // (o_count // self.geom.group)
            z = np.zeros(p.shape[:2], np.float32)
            for gi in range(self.geom.group):
                sel = group_of_o == gi
                if np.any(sel):
                    part = p[sel, gi * cg:(gi + 1) * cg]
                    z[sel, gi * cg:(gi + 1) * cg] = np.einsum("sck,sck->sc", part, self.w[o[sel]])
        zu = np.zeros((len(z), self.n_units), np.float64)
        np.add.at(zu.T, self.units, z.T.astype(np.float64))
        self.gram += zu.T @ zu

    def state(self) -> ThinetState:
        energy = float(self.gram.sum())
        return ThinetState(self.gram / energy if energy > 0 else self.gram)


class LsqStats:
    """The normal equations of one consumer on the original model (all its input channels)."""

    def __init__(self, node: onnx.NodeProto, view: GraphView, units: np.ndarray, n_units: int,
                 samples: int, total: int):
        c = view.static_shape(node.input[0])[1]
        job = rec.RefitJob(node.name, node.input[0], node.output[0], np.arange(c), None)
        self.refitter = rec.Refitter(job, node, view, view, samples, total, from_original=True)
        self.x, self.y = node.input[0], node.output[0]
        self.units, self.n_units = units, n_units
        system = self.refitter.folds[0][0]
        per_channel = system.dim // len(units)  # kernel positions (Conv) or 1 (a feature of a Gemm)
        self.col_units = np.repeat(units, per_channel)
        self.ok = (len(self.refitter.folds[0]) == 1 and system.dim <= LSQ_MAX_DIM
                   and (node.op_type != "Conv" or self.refitter.geom is not None))

    def memory(self) -> int:
        return self.refitter.memory()

    def update(self, values: dict[str, np.ndarray], rng: np.random.Generator) -> None:
        self.refitter.update(values, values, rng)

    def state(self, ridge: float) -> LsqState:
        """A fresh greedy state (the inverse is computed once and copied)."""
        if getattr(self, "_base", None) is None:
            self._base = LsqState(self.refitter.systems[0], self.col_units, self.n_units, ridge)
            self.refitter.folds = [[], []]  # the sums are no longer needed: free them
        return self._base.copy()


class ThinetState:
    def __init__(self, gram: np.ndarray):
        self.gram, self.acc = gram, np.zeros(len(gram))

    def costs(self) -> np.ndarray:
        return 2 * self.acc + np.diag(self.gram)

    def remove(self, u: int) -> None:
        self.acc += self.gram[u]


class LsqState:
    """A consumer's ridge regression, shrunk column block by column block as units are removed."""

    def __init__(self, system: rec.Normal, col_units: np.ndarray, n_units: int, ridge: float):
        n = max(system.n, 1)
        mx, my = system.xs / n, system.ys / n
        cxx = system.xtx - n * np.outer(mx, mx)
        cxy = system.xty - n * np.outer(mx, my)
        p = cxx + rec.ridge_lambda(cxx, ridge) * np.eye(system.dim)
        try:
            self.a = np.linalg.inv(p)
        except np.linalg.LinAlgError:
            self.a = np.linalg.pinv(p)
        self.b = self.a @ cxy
        self.energy = max(system.yy - n * float(my @ my), 1e-30)
        self.cols = np.asarray(col_units)
        self.n_units = n_units

    def copy(self) -> LsqState:
        new = object.__new__(LsqState)
        new.a, new.b, new.cols = self.a.copy(), self.b.copy(), self.cols.copy()
        new.energy, new.n_units = self.energy, self.n_units
        return new

    def costs(self) -> np.ndarray:
        out = np.zeros(self.n_units)
        order = np.argsort(self.cols, kind="stable")
        units, starts, counts = np.unique(self.cols[order], return_index=True, return_counts=True)
        for m in np.unique(counts):
            sel = counts == m
            idx = order[starts[sel][:, None] + np.arange(m)[None, :]]  # [K, m] rows of each unit
            if m == 1:  # a unit of one column (1x1 convs, dense layers): b_j^2 / a_jj, no solves
                j = idx[:, 0]
                bj = self.b[j]
                ajj = self.a[j, j]  # 0 for a dead input: removing it costs nothing (pinv's answer)
                num = np.einsum("ko,ko->k", bj, bj)
                out[units[sel]] = np.divide(num, ajj, out=np.zeros_like(num), where=ajj > 0)
                continue
            ajj = self.a[idx[:, :, None], idx[:, None, :]]
            bj = self.b[idx]  # [K, m, O]
            out[units[sel]] = np.einsum("kmo,kmo->k", bj, _solve(ajj, bj))
        return out / self.energy

    def remove(self, u: int) -> None:
        j = np.flatnonzero(self.cols == u)
        if not len(j):
            return
        r = np.flatnonzero(self.cols != u)
        arj = self.a[np.ix_(r, j)]
        t = _solve(self.a[np.ix_(j, j)], np.concatenate([arj.T, self.b[j]], axis=1))
        self.b = self.b[r] - arj @ t[:, len(r):]
        self.a = self.a[np.ix_(r, r)] - arj @ t[:, :len(r)]
        self.cols = self.cols[r]


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a^-1 b (batched), with the pseudo-inverse for blocks of dead inputs."""
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(a) @ b


# ---- scores ------------------------------------------------------------------------------------
def filter_norms(g: ChannelGroup, view: GraphView, p: int) -> np.ndarray:
    """Filter norms of the producers, each producer normalised by its mean, summed per unit."""
    score = np.zeros(g.n_units)
    for name in g.producers:
        node = view.node_by_name(name)
        y = node.output[0]
        if y not in g.tensors:
            continue
        layer = LinearLayer.read(node, view, with_add=False)
        if isinstance(layer, LinearLayer):
            rows = layer.weight.astype(np.float64)
        else:  # ConvTranspose: [C_in, C_out/g, k...]
            rows = np.moveaxis(view.const(node.input[1]).astype(np.float64), 1, 0)
        rows = rows.reshape(rows.shape[0], -1)
        norms = np.abs(rows).sum(1) if p == 1 else np.sqrt(np.square(rows).sum(1))
        norms = norms / max(float(norms.mean()), 1e-30)
        np.add.at(score, g.tensors[y], norms)
    return score


def collect(model: onnx.ModelProto, groups: list[ChannelGroup], criterion: str, data, samples: int, ridge: float,
            rng: np.random.Generator, progress: Callable[[str, int, int], None] = lambda *a: None,
            ) -> tuple[dict[int, np.ndarray], dict[int, list[Callable[[], object]]]]:
    """Static scores per group (for ranking) and, for Gram/lsq criteria, makers of greedy states;
    `progress("prune: capture", samples streamed, total)` follows the calibration passes."""
    view = GraphView(model.graph)
    scores = {g.id: filter_norms(g, view, 2 if criterion == "l2" else 1) for g in groups}
    if criterion in ("l1", "l2") or data is None:
        return scores, {}
    total = runtime.sample_count(data)
    stats: list[tuple[int, object]] = []
    lsq_bytes = 0
    for g in groups:
        for name in g.consumers:
            node = view.node_by_name(name)
            x = node.input[0]
            if x not in g.tensors:
                continue
            if criterion == "activation":
                stats.append((g.id, MeanAbs(x)))
                continue
            if criterion == "lsq" and is_linear(node, view):
                lsq = LsqStats(node, view, g.tensors[x], g.n_units, samples, total)
                if lsq.ok and lsq_bytes + lsq.memory() <= LSQ_BUDGET:
                    lsq_bytes += lsq.memory()
                    stats.append((g.id, lsq))
                    continue
            thinet = ThinetGram(node, view, g.tensors[x], g.n_units, samples, total)
            if thinet.ok:
                stats.append((g.id, thinet))
    chunks = rec.chunks(stats, lambda item: item[1].memory() if isinstance(item[1], LsqStats) else 0)
    streamed = [0]

    def consume(values: dict[str, np.ndarray], chunk: list) -> None:
        for _, s in chunk:
            s.update(values, rng)
        streamed[0] += len(next(iter(values.values())))
        progress("prune: capture", streamed[0], total * len(chunks))

    for chunk in chunks:
        names = list(dict.fromkeys(n for _, s in chunk for n in _reads(s)))
        rec.stream(model, names, data, lambda values, chunk=chunk: consume(values, chunk))
    factories: dict[int, list[Callable[[], object]]] = {}
    act: dict[int, np.ndarray] = {}
    groups_by_id = {g.id: g for g in groups}
    for gid, s in stats:
        if isinstance(s, MeanAbs):
            per_channel = s.result()
            per_channel = per_channel / max(float(per_channel.mean()), 1e-30)
            u = act.setdefault(gid, np.zeros(groups_by_id[gid].n_units))
            np.add.at(u, groups_by_id[gid].tensors[s.name], per_channel)
        else:
            factory = (lambda s=s: s.state(ridge)) if isinstance(s, LsqStats) else s.state
            factories.setdefault(gid, []).append(factory)
    scores.update(act)
    for gid, group_factories in factories.items():
        scores[gid] = sum(make().costs() for make in group_factories)  # cost of each unit alone
    return scores, factories


def _reads(stat) -> list[str]:
    if isinstance(stat, MeanAbs):
        return [stat.name]
    if isinstance(stat, LsqStats):
        return [stat.x, stat.y]
    return [stat.x]


# ---- selection ---------------------------------------------------------------------------------
def global_counts(groups: list[ChannelGroup], factories: dict[int, list], n_remove: int, min_channels: int
                  ) -> dict[int, int]:
    """Units to remove per group from one greedy run over all groups at once.

    ThiNet and lsq costs are relative output-error increases of the consumers, comparable between
    groups, so each step removes the cheapest unit anywhere and re-prices only its own group.
    """
    states = {g.id: [make() for make in factories[g.id]] for g in groups}
    removed = {g.id: np.zeros(g.n_units, bool) for g in groups}
    incidence, kept, floor = {}, {}, {}
    for g in groups:
        inc = np.zeros((g.n_units, len(g.tensors)), np.int64)
        for j, units in enumerate(g.tensors.values()):
            np.add.at(inc[:, j], units, 1)
        incidence[g.id], kept[g.id] = inc, inc.sum(0)
        floor[g.id] = np.array([min(min_channels, len(u)) for u in g.tensors.values()])

    def price(gid: int) -> np.ndarray:
        inc = incidence[gid]
        ok = ~removed[gid] & np.all((kept[gid][None, :] - inc >= floor[gid][None, :]) | (inc == 0), axis=1)
        return np.where(ok, sum(s.costs() for s in states[gid]), np.inf)

    prices = {g.id: price(g.id) for g in groups}
    for _ in range(n_remove):
        gid = min(prices, key=lambda k: (float(prices[k].min()), k))
        u = int(np.argmin(prices[gid]))
        if not np.isfinite(prices[gid][u]):
            break
        removed[gid][u] = True
        kept[gid] -= incidence[gid][u]
        for s in states[gid]:
            s.remove(u)
        prices[gid] = price(gid)
    return {gid: int(r.sum()) for gid, r in removed.items()}


def select(g: ChannelGroup, n_remove: int, score: np.ndarray, factories: list | None, min_channels: int
           ) -> np.ndarray | None:
    """Boolean mask of kept units: greedy removal of the least costly, within the constraints."""
    if n_remove <= 0:
        return None
    tensors = list(g.tensors)
    incidence = np.zeros((g.n_units, len(tensors)), np.int64)
    for j, t in enumerate(tensors):
        np.add.at(incidence[:, j], g.tensors[t], 1)
    floor = np.array([min(min_channels, len(g.tensors[t])) for t in tensors])
    bins = g.unit_bins if g.unit_bins is not None else np.full(g.n_units, -1)
    n_bins = int(bins.max()) + 1
    bin_size = int(np.sum(bins == 0)) if n_bins else 0
    r = int(round(n_remove / g.n_units * bin_size)) if n_bins else 0
    n_free = max(0, min(int(np.sum(bins < 0)), n_remove - r * n_bins))
    while True:
        states = [make() for make in factories] if factories else None
        removed = _greedy(bins, n_bins, r, n_free, score, states, incidence, floor)
        if n_bins == 0 or r == 0:
            return ~removed
        got = np.bincount(bins[~removed & (bins >= 0)], minlength=n_bins)
        if np.all(got == bin_size - r):
            return ~removed
        r -= 1  # a bin could not lose r units without emptying a tensor: ask less of every bin


def _greedy(bins, n_bins, r, n_free, score, states, incidence, floor) -> np.ndarray:
    removed = np.zeros(len(bins), bool)
    budget = np.full(n_bins + 1, r)
    budget[-1] = n_free  # index -1: the units no grouped conv constrains
    kept = incidence.sum(0)
    cost_of: Callable[[], np.ndarray] = (lambda: sum(s.costs() for s in states)) if states else (lambda: score)
    for _ in range(r * n_bins + n_free):
        allowed = ~removed & (budget[bins] > 0)
        allowed &= np.all((kept[None, :] - incidence >= floor[None, :]) | (incidence == 0), axis=1)
        if not allowed.any():
            break
        u = int(np.argmin(np.where(allowed, cost_of(), np.inf)))
        removed[u] = True
        budget[bins[u]] -= 1
        kept -= incidence[u]
        for s in states or []:
            s.remove(u)
    return removed
