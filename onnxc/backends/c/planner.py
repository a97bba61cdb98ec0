"""Static memory plan: where every run-time tensor lives.

Graph inputs and outputs live in the caller's buffers (a producer of a graph output writes
straight into it). Every other tensor belongs to a *buffer* in the arena:

- a view (Reshape, Flatten, contiguous Split/Slice) joins its source's buffer at an offset;
- an op that can run in place (elementwise ops, Softmax, BatchNorm, pooling whose windows
  allow it, depthwise and 1x1 conv with a small scratch) takes its input's buffer when no member
  of that buffer is read after this step (and the scratch is smaller than the output it saves);
- a Concat input along a contiguous axis is written by its producer straight into the Concat
  output (the copy is dropped);
- otherwise the output opens a new buffer.

A buffer's footprint varies over time: at each step it spans its base up to the end of the
furthest member alive then (a pooled or strided in-place output shrinks it). Buffers get
offsets by greedy-by-size placement (largest first, lowest offset where the footprint does not
overlap a buffer's footprint at the same steps), tried first-fit and best-fit; the smaller arena
wins. Steps run in the model's node order. Sizes and offsets are in bytes (tensors may be float32,
int8 or int32); footprints are rounded up to 4 bytes, so every buffer starts float-aligned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onnxc.backends.c.program import Program, Step


@dataclass
class Member:
    name: str
    offset: int                  # bytes from the buffer base
    size: int
    start: int                   # step it is written (or joins)
    end: int = -1                # last step it is read


@dataclass
class Buffer:
    id: int
    start: int                   # first step writing it
    members: list[Member] = field(default_factory=list)
    end: int = -1                # last step reading any member
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (first, last step, extent)
    offset: int = 0              # bytes from the arena start
    scratch: bool = False

    @property
    def size(self) -> int:
        return max((m.offset + m.size for m in self.members), default=0)


@dataclass
class Location:
    root: str                    # "input", "output" or "arena"
    index: int                   # input/output position, or buffer id
    offset: int                  # bytes from the root


@dataclass
class Plan:
    locations: dict[str, Location]
    buffers: list[Buffer]
    inplace: set[int]            # steps that run their in-place variant
    scratch: dict[int, Buffer]   # step -> scratch buffer
    arena: int                   # bytes
    first_use: dict[str, int]
    last_use: dict[str, int]
    elided: dict[int, set[int]]  # step -> indices of copy calls made unnecessary (Concat pieces)

    def address(self, name: str) -> int:
        loc = self.locations[name]
        return self.buffers[loc.index].offset + loc.offset if loc.root == "arena" else loc.offset

    def same_storage(self, step: Step) -> bool:
        """Whether the step's output sits exactly where its first input is (it ran in place)."""
        if not step.inputs or not step.outputs:
            return False
        a, b = self.locations.get(step.inputs[0]), self.locations.get(step.outputs[0])
        return a is not None and b is not None and (a.root, a.index, a.offset) == (b.root, b.index, b.offset)


def concat_requests(prog: Program, last_use: dict[str, int]) -> tuple[dict[str, tuple[str, int]],
                                                                         dict[int, set[int]]]:
    """Concat inputs whose producer can write straight into the Concat output.

    Eligible: produced by a computing step (not a view, not a graph input), read once by this
    Concat and never by a later step, not a graph output, not already placed in another Concat.
    Returns {input: (concat output, byte offset)} and, per step, the copy calls to drop.
    """
    producer: dict[str, int] = {}
    for s, step in enumerate(prog.steps):
        if step.view is None:
            for name in step.outputs:
                producer.setdefault(name, s)
    outputs = set(prog.outputs)
    requests: dict[str, tuple[str, int]] = {}
    elided: dict[int, set[int]] = {}
    for s, step in enumerate(prog.steps):
        if not step.pieces:
            continue
        for name, offset, call in step.pieces:
            if (name in requests or name in outputs or name in prog.inputs or producer.get(name, s) >= s
                    or step.inputs.count(name) != 1 or last_use.get(name) != s):
                continue
            requests[name] = (step.outputs[0], offset * prog.nbytes(name) // max(prog.size(name), 1))
            elided.setdefault(s, set()).add(call)
    return requests, elided


class _Planner:
    def __init__(self, prog: Program, no_inplace: frozenset[str] = frozenset()):
        self.prog = prog
        self.no_inplace = no_inplace  # op types not run in place in this variant
        self.last_use: dict[str, int] = {}
        self.first_use: dict[str, int] = {}
        for s, step in enumerate(prog.steps):
            for name in step.inputs:
                self.last_use[name] = s
            for name in step.outputs:
                self.first_use.setdefault(name, s)
                self.last_use.setdefault(name, s)
        self.outputs = {name: k for k, name in enumerate(prog.outputs)}
        self.requests, self.elided = concat_requests(prog, self.last_use)
        self.loc: dict[str, Location] = {name: Location("input", k, 0) for k, name in enumerate(prog.inputs)}
        self.buffers: list[Buffer] = []
        self.inplace: set[int] = set()
        self.scratch: dict[int, Buffer] = {}

    def end_of(self, buf: Buffer) -> int:
        return max((self.last_use.get(m.name, m.start) if m.name else m.start for m in buf.members),
                   default=buf.start)

    def new_buffer(self, size: int, s: int, name: str) -> Buffer:
        buf = Buffer(len(self.buffers), s)
        self.buffers.append(buf)
        if name:
            self.join(buf, name, 0, s)
        else:  # scratch: alive during one step
            buf.members.append(Member("", 0, size, s, s))
            buf.scratch = True
        return buf

    def join(self, buf: Buffer, name: str, offset: int, s: int) -> None:
        buf.members.append(Member(name, offset, self.prog.nbytes(name), max(s, self.first_use.get(name, s))))
        self.loc[name] = Location("arena", buf.id, offset)

    def locate(self, name: str, s: int) -> Location:
        """Give `name` its storage at step s (inside its Concat output when requested)."""
        if name in self.loc:
            return self.loc[name]
        if name in self.requests:
            target, offset = self.requests[name]
            base = self.locate(target, s)
            if base.root == "arena":
                self.join(self.buffers[base.index], name, base.offset + offset, s)
            else:
                self.loc[name] = Location(base.root, base.index, base.offset + offset)
        elif name in self.outputs:
            self.loc[name] = Location("output", self.outputs[name], 0)
        else:
            self.new_buffer(0, s, name)
        return self.loc[name]

    def try_inplace(self, s: int) -> bool:
        step = self.prog.steps[s]
        out = step.outputs[0]
        if step.inplace is None or out in self.outputs or out in self.requests or out in self.loc:
            return False
        if "*" in self.no_inplace or step.op in self.no_inplace:
            return False
        cand = step.inputs[step.inplace]
        src = self.loc[cand]
        if src.root != "arena":
            return False
        buf = self.buffers[src.index]
        others = [self.loc[i] for k, i in enumerate(step.inputs) if k != step.inplace]
        out_size = self.prog.nbytes(out)
        if (self.end_of(buf) != s or out_size > self.prog.nbytes(cand) or 4 * step.inplace_scratch >= out_size
                or any(o.root == "arena" and o.index == src.index for o in others)):
            return False
        self.join(buf, out, src.offset, s)
        if step.inplace_calls is not None:
            self.inplace.add(s)
            if step.inplace_scratch:
                self.scratch[s] = self.new_buffer(4 * step.inplace_scratch, s, "")
        return True

    def run(self) -> Plan:
        for s, step in enumerate(self.prog.steps):
            if step.view is not None:
                src = self.loc[step.inputs[step.view[0]]]
                dst = step.outputs[0]
                offset = step.view[1] * self.prog.nbytes(dst) // max(self.prog.size(dst), 1)
                if src.root == "arena":
                    self.join(self.buffers[src.index], dst, src.offset + offset, s)
                else:
                    self.loc[dst] = Location(src.root, src.index, src.offset + offset)
                continue
            took = self.try_inplace(s)
            for name in step.outputs[1 if took else 0:]:
                self.locate(name, s)
            if s not in self.inplace and step.scratch:
                self.scratch[s] = self.new_buffer(4 * step.scratch, s, "")
        for buf in self.buffers:
            for m in buf.members:
                if m.name:
                    m.end = self.last_use.get(m.name, m.start)
            buf.end = self.end_of(buf)
            buf.segments = footprint(buf)
        arena = place(self.buffers)
        return Plan(self.loc, self.buffers, self.inplace, self.scratch, arena, self.first_use, self.last_use,
                    self.elided)


# Plan variants tried: in place everywhere, no in-place pooling (a pooled output keeps its big
# input's base and can fragment the arena), no in-place at all. The smallest arena wins.
VARIANTS = (frozenset(), frozenset({"MaxPool", "AveragePool"}), frozenset({"*"}))


def plan(prog: Program) -> Plan:
    best = None
    for variant in VARIANTS:
        candidate = _Planner(prog, variant).run()
        if best is None or candidate.arena < best.arena:
            best = candidate
    return best


def footprint(buf: Buffer) -> list[tuple[int, int, int]]:
    """(first step, last step, extent) segments: at each step, the end of the furthest live member."""
    cuts = sorted({m.start for m in buf.members} | {m.end + 1 for m in buf.members})
    segs: list[tuple[int, int, int]] = []
    for a, b in zip(cuts, cuts[1:]):
        extent = -(-max((m.offset + m.size for m in buf.members if m.start <= a <= m.end), default=0) // 4) * 4
        if extent == 0:
            continue
        if segs and segs[-1][2] == extent and segs[-1][1] == a - 1:
            segs[-1] = (segs[-1][0], b - 1, extent)
        else:
            segs.append((a, b - 1, extent))
    return segs


ORDERS = {
    "size": lambda b: (-b.size, b.start, b.id),
    "area": lambda b: (-b.size * (b.end - b.start + 1), b.start, b.id),
    "start": lambda b: (b.start, -b.size, b.id),
}


def place(buffers: list[Buffer]) -> int:
    """Assign offsets (greedy: several orders, first and best fit); returns the arena in bytes."""
    best: tuple[int, list[int]] | None = None
    for order in ORDERS.values():
        for fit in ("first", "best"):
            offsets = _greedy(buffers, fit, order)
            size = max((offsets[b.id] + e for b in buffers for _, _, e in b.segments), default=0)
            if best is None or size < best[0]:
                best = (size, offsets)
    for b in buffers:
        b.offset = best[1][b.id]
    return best[0]


def _greedy(buffers: list[Buffer], fit: str, order) -> list[int]:
    offsets = [0] * len(buffers)
    placed: list[Buffer] = []
    for buf in sorted(buffers, key=order):
        if not buf.segments:
            continue
        # Offsets o forbidden by a placed buffer A: for time-overlapping segments of sizes sb
        # (ours) and sa (A's), o in (offA - sb, offA + sa).
        forbidden = []
        for other in placed:
            if other.start > buf.end or buf.start > other.end:
                continue
            off = offsets[other.id]
            for a0, a1, sa in other.segments:
                for b0, b1, sb in buf.segments:
                    if a0 <= b1 and b0 <= a1:
                        forbidden.append((off - sb, off + sa))
        offsets[buf.id] = _lowest_offset(forbidden, fit)
        placed.append(buf)
    return offsets


def _lowest_offset(forbidden: list[tuple[int, int]], fit: str) -> int:
    """The offset outside every open interval: lowest (first fit) or in the tightest gap (best fit)."""
    merged: list[list[int]] = []
    for lo, hi in sorted(forbidden):
        if hi <= 0:
            continue
        if merged and lo < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    # Allowed offsets: [0, lo_0], [hi_0, lo_1], ..., [hi_last, inf)
    gaps = []
    start = 0
    for lo, hi in merged:
        if lo >= start:
            gaps.append((lo - start, start))
        start = max(start, hi)
    if fit == "first" or not gaps:
        return gaps[0][1] if gaps else start
    return min(gaps)[1]


def naive_peak(prog: Program) -> int:
    """Peak bytes of simultaneously live intermediate tensors (no sharing), in step order."""
    io = set(prog.inputs) | set(prog.outputs)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for s, step in enumerate(prog.steps):
        for name in step.outputs:
            first.setdefault(name, s)
            last.setdefault(name, s)
        for name in step.inputs:
            last[name] = s
    peak = 0
    for s in range(len(prog.steps)):
        live = sum(prog.nbytes(n) for n in first if n not in io and first[n] <= s <= last[n])
        peak = max(peak, live)
    return peak
