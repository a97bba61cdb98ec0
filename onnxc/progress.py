"""Progress as plain lines, for logs: stderr redirected to a file (CI, build pipelines) or a pipe.

A live bar redraws itself in place, which a log file cannot show: a redirected run printed
nothing until it ended. Here each phase prints one line once it has run for START_DELAY (a phase
run again, as a refit runs once per layer wave, at most once per interval; a command that fails
on bad input at once prints its one error line and nothing else), and every `interval` seconds
(from a background timer, so a phase that reports rarely is still seen) one line per phase
still running, with its counts, percentage, elapsed time and an ETA from its rate so far.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

INTERVAL = 30.0
START_DELAY = 1.0  # a phase is announced once it has run this long: quick phases and failures stay quiet


@dataclass
class _Phase:
    done: int
    total: int
    start: float


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class PlainProgress:
    """`progress(label, done, total)` calls as log lines on `stream`."""

    def __init__(self, stream: TextIO, interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.interval = interval
        self.clock = clock
        self.began = clock()
        self.phases: dict[str, _Phase] = {}
        self.said: dict[str, float] = {}  # when each phase last got its own line
        self.pending: set[str] = set()  # phases started but not announced yet (START_DELAY)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.timer: threading.Thread | None = None

    def __enter__(self) -> PlainProgress:
        self.timer = threading.Thread(target=self._tick, daemon=True)
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.timer is not None:
            self.timer.join()

    def __call__(self, label: str, done: int, total: int) -> None:
        now = self.clock()
        with self.lock:
            phase = self.phases.get(label)
            if phase is None or done < phase.done or total != phase.total:  # new, or run again
                self.phases[label] = _Phase(done, total, now)
                if phase is None or now - self.said.get(label, now) >= self.interval:  # a rerun: not every time
                    self.pending.add(label)
            else:
                phase.done = done
                if label in self.pending and now - phase.start >= START_DELAY:
                    self.pending.discard(label)
                    self.said[label] = now
                    self._write(f"{label}: {done}/{total}")

    def report(self) -> None:
        """One line per phase still running: counts, percentage, elapsed and remaining time."""
        now = self.clock()
        with self.lock:
            for label, p in self.phases.items():
                if p.done >= p.total:
                    continue
                self.pending.discard(label)
                self.said[label] = now
                spent = now - p.start
                eta = f"eta {_duration(spent * (p.total - p.done) / p.done)}" if p.done else "eta unknown"
                pct = 100.0 * p.done / p.total if p.total else 0.0
                self._write(f"{label}: {p.done}/{p.total} ({pct:.0f}%), {_duration(spent)} elapsed, {eta}")

    def _tick(self) -> None:
        while not self.stop.wait(self.interval):
            self.report()

    def _write(self, text: str) -> None:
        self.stream.write(f"[{_duration(self.clock() - self.began):>6}] {text}\n")
        self.stream.flush()
