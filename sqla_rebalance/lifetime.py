"""Per-connection lifetime: the jittered deadline, when to replace each connection, and
the state kept per connection (its writers and rules are in ``ledger.py``)."""

from __future__ import annotations

import itertools
import math
import random
import weakref
from typing import TYPE_CHECKING, Any

from . import randomness
from .stats import LIFETIME

if TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry

    from .ledger import Ledger

__all__ = [
    "ConnState",
    "draw_lifetime",
    "replacement_lead",
    "schedule_replacements",
    "state_of",
]

#: Key of our state in ``ConnectionPoolEntry.info``. ``info`` is cleared by
#: SQLAlchemy whenever the record reconnects, which is exactly the life of one
#: DBAPI connection.
INFO_KEY = "sqla_rebalance"


def draw_lifetime(recycle: float, jitter: float, rng: random.Random | None = None) -> float:
    """A lifetime drawn uniformly in ``[recycle * (1 - jitter), recycle]``.

    Drawing each connection's lifetime independently is what breaks up the
    reconnect storm of a plain ``pool_recycle``: connections opened together
    expire spread over ``jitter * recycle`` seconds. The upper bound is never
    exceeded, so ``pool_recycle`` keeps its meaning of a maximum lifetime.
    """
    if recycle <= 0:
        raise ValueError("recycle must be positive")
    r = (rng or randomness.rng).random()  # [0, 1)
    return recycle * (1.0 - jitter * r)


def replacement_lead(recycle: float) -> float:
    """How long before its deadline an idle connection is replaced.

    Long enough for the worker to open the replacement (one connect, a few
    milliseconds on a LAN) before SQLAlchemy's own check would recycle the
    connection inside a checkout, even when a loaded machine wakes the pool's
    thread late; short enough not to distort the drawn lifetime: 2 % of
    ``pool_recycle``, at least 0.2 s (10 % below ``pool_recycle=2``), at most 2 s.
    """
    return min(2.0, max(0.02 * recycle, min(0.2, 0.1 * recycle)))


def schedule_replacements(
    deadlines: list[tuple[float, object]], margin: float, connect_time: float
) -> dict[object, float]:
    """When to start replacing each connection so that a serial worker is never late.

    ``deadlines`` pairs each connection's deadline with a key. One worker
    opens replacements one after another, each taking about ``connect_time``.
    Scheduling backwards from the last deadline, each replacement starts by
    ``deadline - margin - connect_time`` and early enough to leave room for the
    ones after it. A lone deadline is thus replaced ``margin + connect_time``
    before it; a cluster of deadlines (many connections opened together, or a
    slow network) starts earlier instead of running late into SQLAlchemy's
    checkout-time recycle.
    """
    starts: dict[object, float] = {}
    following = math.inf
    for deadline, key in sorted(deadlines, key=lambda item: item[0], reverse=True):
        start = min(deadline - margin - connect_time, following - connect_time)
        starts[key] = start
        following = start
    return starts


_serials = itertools.count(1)


class ConnState:
    """What the pool knows of one open DBAPI connection.

    Lives in ``record.info[INFO_KEY]`` and in the pool's ledger of open
    connections. No lock guards it: which thread writes which field, and in
    which order, is set out in ``ledger.py`` with the rules that keep a
    connection in use from ever being closed.
    """

    __slots__ = (
        "__weakref__",
        "closed",
        "connected_at",
        "dbapi",
        "deadline",
        "ends_at",
        "host",
        "idle_since",
        "ledger_ref",
        "pinned",
        "reason",
        "retire_at",
        "retire_reason",
        "serial",
    )

    def __init__(
        self,
        ledger: Ledger,
        dbapi: Any,
        host: str,
        connected_at: float,
        deadline: float | None,
    ) -> None:
        #: The ledger of the pool that opened it (weak: a record may outlive its pool).
        self.ledger_ref: weakref.ref[Ledger] = weakref.ref(ledger)
        #: Numbers the connections of this process (``connection_id`` in signals).
        self.serial = next(_serials)
        #: The DBAPI connection; None once it is closed.
        self.dbapi = dbapi
        self.host = host
        self.connected_at = connected_at
        #: Lifetime deadline (epoch seconds), None without ``pool_recycle``.
        self.deadline = deadline
        #: The same deadline on the scheduling clock (``clock.now()``), which the
        #: pass plans replacements by; set with ``deadline`` by the ledger.
        self.ends_at: float | None = None
        #: A requested retirement (recycle, rebalance...): when, and why.
        self.retire_at: float | None = None
        self.retire_reason: str | None = None
        #: The reason the pool gave when it closed the connection.
        self.reason: str | None = None
        self.pinned = False
        self.closed = False
        self.idle_since: float | None = None

    def due(self, lifetime_start: float | None) -> tuple[float, str] | None:
        """When the pool should start retiring this connection, and why (None: never).

        ``lifetime_start`` is when its lifetime replacement is scheduled to
        start (see :func:`schedule_replacements`).
        """
        best: tuple[float, str] | None = None
        if lifetime_start is not None:
            best = (lifetime_start, LIFETIME)
        if self.retire_at is not None and (best is None or self.retire_at < best[0]):
            best = (self.retire_at, self.retire_reason or LIFETIME)
        return best

    def __repr__(self) -> str:
        return (
            f"<ConnState host={self.host} connected_at={self.connected_at:.3f} "
            f"deadline={self.deadline}>"
        )


def state_of(rec: ConnectionPoolEntry) -> ConnState | None:
    """Our state for the connection ``rec`` currently holds (None if not ours)."""
    state = rec.info.get(INFO_KEY)
    return state if isinstance(state, ConnState) else None
