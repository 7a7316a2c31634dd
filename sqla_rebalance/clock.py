"""The package's two clocks, so that a step of the wall clock never stalls maintenance.

- :func:`now` (monotonic) for every schedule: when the next pass is due, when a
  connection's lifetime replacement starts, a recycle's spread, idle times,
  connect back-off, host check intervals. An NTP step or a VM resumed from a
  snapshot moves the wall clock, not this one: with wall-clock schedules, a
  step back of 60 s stalled maintenance for 60 s (every due time looked a
  minute away).
- The wall clock (:func:`wall`) only where an outside party reads the value:
  SQLAlchemy's ``starttime`` (its own ``pool_recycle`` check compares it with
  ``time.time()``), the timestamps of signals and stats, and the ``issued_at``
  of bus messages. :func:`lifetime_end` converts a wall-clock deadline of
  SQLAlchemy's into this clock, once, when the connection opens.

Tests replace ``_monotonic`` (and ``time.time``) with one fake clock.
"""

from __future__ import annotations

import time

__all__ = ["lifetime_end", "now", "wall"]

_monotonic = time.monotonic


def now() -> float:
    """Seconds on the scheduling clock (monotonic; only differences mean anything)."""
    return _monotonic()


def wall() -> float:
    """Seconds on the wall clock: only to compare with or hand to an outside party
    (SQLAlchemy's ``starttime``, a signal's timestamp)."""
    return time.time()


def lifetime_end(wall_deadline: float) -> float:
    """The scheduling-clock time of a wall-clock deadline (as SQLAlchemy's ``starttime``
    plus a lifetime), read against the wall clock now."""
    return now() + (wall_deadline - wall())
