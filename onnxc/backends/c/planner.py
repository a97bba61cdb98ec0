"""Static memory plan: where every run-time tensor lives.

Graph inputs and outputs live in the caller's buffers (a producer of a graph output writes
straight into it). Every other tensor belongs to a *buffer* in the arena:

- a view (Reshape, Flatten, contiguous Split/Slice) joins its source's buffer at an offset;
- an op that can run in place (elementwise ops, Softmax, BatchNorm, depthwise and 1x1 conv
  with a small scratch) takes its input's buffer when no member of that buffer is read after
  this step (and the scratch is smaller than the output it saves);
- otherwise the output opens a new buffer.

A buffer lives from its first writer to the last reader of any member. Buffers get offsets by
greedy-by-size placement (largest first, lowest offset that does not overlap a buffer alive at
the same time), tried with first-fit and best-fit; the smaller arena wins. Steps run in the
model's node order, so the plan never needs more than the peak of live tensors in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onnxc.backends.c.program import Program


@dataclass
class Buffer:
    id: int
    size: int                    # elements
    start: int                   # first step writing it
    end: int = -1                # last step reading any member
    members: list[str] = field(default_factory=list)
    offset: int = 0              # elements from the arena start
    scratch: bool = False


@dataclass
class Location:
    root: str                    # "input", "output" or "arena"
    index: int                   # input/output position, or buffer id
    offset: int                  # elements from the root


@dataclass
class Plan:
    locations: dict[str, Location]
    buffers: list[Buffer]
    inplace: set[int]            # steps that run their in-place variant
    scratch: dict[int, Buffer]   # step -> scratch buffer
    arena: int                   # elements
    first_use: dict[str, int]
    last_use: dict[str, int]

    def address(self, name: str) -> int:
        loc = self.locations[name]
        return self.buffers[loc.index].offset + loc.offset if loc.root == "arena" else loc.offset


def plan(prog: Program) -> Plan:
    last_use: dict[str, int] = {}
    first_use: dict[str, int] = {}
    for s, step in enumerate(prog.steps):
        for name in step.inputs:
            last_use[name] = s
        for name in step.outputs:
            first_use.setdefault(name, s)
            last_use.setdefault(name, s)
    outputs = {name: k for k, name in enumerate(prog.outputs)}
    loc: dict[str, Location] = {name: Location("input", k, 0) for k, name in enumerate(prog.inputs)}
    buffers: list[Buffer] = []
    members_end = {}  # buffer id -> last use over its current members
    inplace: set[int] = set()
    scratch: dict[int, Buffer] = {}

    def new_buffer(size: int, s: int, name: str | None) -> Buffer:
        buf = Buffer(len(buffers), size, s)
        buffers.append(buf)
        members_end[buf.id] = s
        if name is not None:
            join(buf, name, 0)
        return buf

    def join(buf: Buffer, name: str, offset: int) -> None:
        buf.members.append(name)
        loc[name] = Location("arena", buf.id, offset)
        members_end[buf.id] = max(members_end[buf.id], last_use.get(name, buf.start))

    for s, step in enumerate(prog.steps):
        if step.view is not None:
            src = loc[step.inputs[step.view[0]]]
            dst = step.outputs[0]
            if src.root == "arena":
                join(buffers[src.index], dst, src.offset + step.view[1])
            else:
                loc[dst] = Location(src.root, src.index, src.offset + step.view[1])
            continue
        took = False
        if step.inplace is not None and step.outputs[0] not in outputs:
            cand = step.inputs[step.inplace]
            src = loc[cand]
            others = [loc[i] for k, i in enumerate(step.inputs) if k != step.inplace]
            out_size = prog.size(step.outputs[0])
            ok = (src.root == "arena" and members_end[src.index] == s and out_size <= prog.size(cand)
                  and not any(o.root == "arena" and o.index == src.index for o in others))
            if ok and step.inplace_scratch < out_size:
                join(buffers[src.index], step.outputs[0], src.offset)
                took = True
                if step.inplace_calls is not None:
                    inplace.add(s)
                    if step.inplace_scratch:
                        buf = new_buffer(step.inplace_scratch, s, None)
                        buf.scratch = True
                        scratch[s] = buf
        for name in step.outputs[1 if took else 0:]:
            if name in outputs:
                loc[name] = Location("output", outputs[name], 0)
            elif name not in loc:
                new_buffer(prog.size(name), s, name)
        if step.scratch and s not in scratch:
            buf = new_buffer(step.scratch, s, None)
            buf.scratch = True
            scratch[s] = buf
    for buf in buffers:
        buf.end = members_end[buf.id]
    arena = place(buffers)
    return Plan(loc, buffers, inplace, scratch, arena, first_use, last_use)


def place(buffers: list[Buffer]) -> int:
    """Assign offsets (greedy by size); returns the arena size in elements."""
    best: tuple[int, list[int]] | None = None
    for fit in ("first", "best"):
        offsets = _greedy(buffers, fit)
        size = max((offsets[b.id] + b.size for b in buffers), default=0)
        if best is None or size < best[0]:
            best = (size, offsets)
    for b in buffers:
        b.offset = best[1][b.id]
    return best[0]


def _greedy(buffers: list[Buffer], fit: str) -> list[int]:
    offsets = [0] * len(buffers)
    placed: list[Buffer] = []
    for buf in sorted(buffers, key=lambda b: (-b.size, b.start, b.id)):
        if buf.size == 0:
            continue
        busy = sorted((offsets[o.id], offsets[o.id] + o.size) for o in placed
                      if o.start <= buf.end and buf.start <= o.end)
        gaps, cursor = [], 0
        for lo, hi in busy:
            if lo - cursor >= buf.size:
                gaps.append((lo - cursor, cursor))
            cursor = max(cursor, hi)
        if fit == "best" and gaps:
            offsets[buf.id] = min(gaps)[1]
        elif gaps:
            offsets[buf.id] = gaps[0][1]
        else:
            offsets[buf.id] = cursor
        placed.append(buf)
    return offsets


def naive_peak(prog: Program) -> int:
    """Peak elements of simultaneously live intermediate tensors (no sharing), in step order."""
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
        live = sum(prog.size(n) for n in first if n not in io and first[n] <= s <= last[n])
        peak = max(peak, live)
    return peak
