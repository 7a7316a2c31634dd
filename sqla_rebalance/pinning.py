"""Pinning: keep a connection that holds session state out of every recycle.

A connection holding an advisory lock, a ``LISTEN``, temporary tables or
``SET`` session settings must not be silently replaced. ``pin()`` exempts it
from lifetime replacement, ``recycle()`` and rebalancing until ``unpin()``;
an error that invalidates it still closes it (a broken connection is not
worth keeping). How a pin and the maintenance pass stay out of each other's
way without a lock is rule 3 of ``ledger.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _sa, ledger
from .errors import NotPooledError
from .lifetime import ConnState, state_of

if TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry

__all__ = ["is_pinned", "pin", "unpin"]


def _state(conn: object) -> tuple[ConnectionPoolEntry, ConnState]:
    try:
        rec = _sa.record_of(conn)
    except TypeError as err:
        raise NotPooledError(str(err)) from None
    state = state_of(rec)
    if state is None:
        raise NotPooledError(
            f"{conn!r} was not opened by a RebalancingQueuePool; "
            "pin() works on connections of sqla-rebalance pools only"
        )
    return rec, state


def pin(conn: object) -> None:
    """Exempt ``conn`` (a ``Connection`` or pool-proxied DBAPI connection) from recycling."""
    ledger.pin(*_state(conn))


def unpin(conn: object) -> None:
    """Make ``conn`` subject to recycling again; if it is past its deadline it is
    retired at its next checkin (or replaced, if idle)."""
    ledger.unpin(*_state(conn))


def is_pinned(conn: object) -> bool:
    """True if ``conn`` is pinned."""
    return _state(conn)[1].pinned
