"""Bookkeeping: what happened in each phase of the timeline, fed by the pool's signals."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..pool import RebalancingQueuePool
from .output import Out

#: Index (in the list of four hosts) of the host added at 25 %, and of the one taken down.
ADDED = 3
DOWNED = 1


def min_moves(counts: Mapping[str, int], eligible: list[str]) -> int:
    """The fewest connections to move so that ``eligible`` hosts hold an even share.

    Each eligible host ends with ``total // k`` or one more; a host that is not
    eligible ends with none. The hosts that keep the extra one are those
    holding the most already.
    """
    if not eligible:
        return 0
    total = sum(counts.values())
    base, extra = divmod(total, len(eligible))
    ranked = sorted(eligible, key=lambda k: -counts.get(k, 0))
    share = {k: base + (1 if n < extra else 0) for n, k in enumerate(ranked)}
    return sum(max(0, c - share.get(k, 0)) for k, c in counts.items())


@dataclass
class Phase:
    name: str
    start: float
    end: float | None = None
    retired: dict[str, int] = field(default_factory=dict)
    #: (host label, reason) -> count
    retired_from: dict[tuple[str, str], int] = field(default_factory=dict)
    opened: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "start": round(self.start, 3),
            "end": None if self.end is None else round(self.end, 3),
            "retired": dict(self.retired),
            "retired_from": {f"{h}/{r}": n for (h, r), n in self.retired_from.items()},
            "opened": dict(self.opened),
        }


class Book:
    """What happened, by phase; fed by the pool's signals (any thread)."""

    def __init__(self, keys: list[str], out: Out) -> None:
        self.labels = {key: f"h{i + 1}" for i, key in enumerate(keys)}
        self.out = out
        self.lock = threading.Lock()
        self.phases: list[Phase] = []
        self.events: list[tuple[float, str, str]] = []
        #: (time, host label) of every connection opened.
        self.opens: list[tuple[float, str]] = []

    def label(self, key: str) -> str:
        return self.labels.get(key, key)

    def begin(self, name: str) -> Phase:
        now = self.out.elapsed()
        with self.lock:
            if self.phases:
                self.phases[-1].end = now
            phase = Phase(name, now)
            self.phases.append(phase)
        return phase

    def finish(self) -> None:
        with self.lock:
            if self.phases:
                self.phases[-1].end = self.out.elapsed()

    def opened(self, key: str) -> None:
        now = self.out.elapsed()
        with self.lock:
            self.opens.append((now, self.label(key)))
            if self.phases:
                d = self.phases[-1].opened
                d[self.label(key)] = d.get(self.label(key), 0) + 1

    def retired(self, key: str, reason: str) -> None:
        with self.lock:
            if self.phases:
                phase = self.phases[-1]
                phase.retired[reason] = phase.retired.get(reason, 0) + 1
                k = (self.label(key), reason)
                phase.retired_from[k] = phase.retired_from.get(k, 0) + 1

    def event(self, kind: str, key: str) -> float:
        now = self.out.elapsed()
        with self.lock:
            self.events.append((now, kind, self.label(key)))
        return now

    def opened_between(self, label: str, start: float, end: float) -> int:
        with self.lock:
            return sum(1 for t, h in self.opens if h == label and start < t < end)

    def first(self, kind: str, label: str, after: float) -> float | None:
        with self.lock:
            return next(
                (t for t, k, h in self.events if k == kind and h == label and t >= after), None
            )


def open_counts(pool: RebalancingQueuePool) -> dict[str, int]:
    return {key: h.open for key, h in pool.stats().hosts.items() if h.open}


def host_line(pool: RebalancingQueuePool, book: Book) -> str:
    hosts = pool.stats().hosts
    order = sorted(hosts, key=lambda k: (k not in book.labels, book.label(k)))
    counts = " ".join(f"{book.label(k)}={hosts[k].open}" for k in order)
    health = "/".join(hosts[k].health for k in order)
    return f"{counts} ({health})"


def fmt_counts(counts: Mapping[str, int], book: Book) -> str:
    return " ".join(f"{book.label(k)}={n}" for k, n in sorted(counts.items(), key=lambda i: i[0]))


def fmt_reasons(reasons: Mapping[str, int]) -> str:
    return ", ".join(f"{r}={n}" for r, n in sorted(reasons.items())) or "none"
