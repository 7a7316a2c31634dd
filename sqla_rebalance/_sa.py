"""The one place that touches SQLAlchemy's private pool attributes.

sqla-rebalance extends :class:`sqlalchemy.pool.QueuePool`, and a few of the
things it must do have no public API: reading the idle queue, swapping a
connection record in place, creating a record outside a checkout, and
adjusting a record's ``starttime`` so SQLAlchemy's own recycle comparison
enforces our per-connection deadline. Every such access goes through a
function here, and ``tests/test_sa_compat.py`` checks each one on every
supported SQLAlchemy release (2.0.x and 2.1.x), so an upstream change fails
one small test instead of corrupting a pool.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, MutableSequence
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool
from sqlalchemy.util import greenlet_spawn
from sqlalchemy.util import queue as sqla_queue

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.pool.base import _ConnectionRecord

__all__ = [
    "clamp_starttime",
    "create_record",
    "greenlet_spawn",
    "idle_records",
    "queue_locked",
    "record_of",
    "remove_idle",
    "swap_idle",
]

#: ``QueuePool._do_return_conn`` bound once, so our override calls it without a
#: ``super()`` lookup on the checkin path.
queue_pool_return = QueuePool._do_return_conn


def _deque(pool: QueuePool) -> MutableSequence[ConnectionPoolEntry]:
    q: Any = pool._pool
    if isinstance(q, sqla_queue.Queue):
        return cast("MutableSequence[ConnectionPoolEntry]", q.queue)
    # AsyncAdaptedQueue wraps an asyncio.Queue (created lazily, memoized);
    # its items live in the asyncio.Queue's private ``_queue`` (a deque, or a
    # list for LifoQueue).
    return cast("MutableSequence[ConnectionPoolEntry]", q._queue._queue)


@contextlib.contextmanager
def queue_locked(pool: QueuePool) -> Iterator[MutableSequence[ConnectionPoolEntry]]:
    """Hold the idle queue still and yield its deque.

    The threading queue is guarded by its own mutex (an RLock, so this is safe
    even if a checkin runs in the same thread from a GC callback). The asyncio
    queue needs no lock: every caller runs in the event loop's thread and the
    block below never awaits.
    """
    q: Any = pool._pool
    if isinstance(q, sqla_queue.Queue):
        with q.mutex:
            yield q.queue
    else:
        yield _deque(pool)


def idle_records(pool: QueuePool) -> list[ConnectionPoolEntry]:
    """A snapshot of the records waiting in the idle queue."""
    with queue_locked(pool) as dq:
        return list(dq)


def swap_idle(pool: QueuePool, old: ConnectionPoolEntry, new: ConnectionPoolEntry) -> bool:
    """Put ``new`` in the queue slot of ``old`` if ``old`` is still idle.

    Make-before-break: the pool never has one idle connection fewer, so a
    checkout arriving meanwhile never has to open one itself.
    """
    with queue_locked(pool) as dq:
        try:
            index = dq.index(old)
        except ValueError:
            return False
        dq[index] = new
        return True


def remove_idle(pool: QueuePool, rec: ConnectionPoolEntry) -> bool:
    """Take ``rec`` out of the idle queue if it is still there."""
    with queue_locked(pool) as dq:
        try:
            dq.remove(rec)
        except ValueError:
            return False
        return True


def create_record(pool: QueuePool) -> ConnectionPoolEntry:
    """Open a new connection record outside any checkout (runs connect events)."""
    return pool._create_connection()


def ping_at_first_checkout(rec: ConnectionPoolEntry) -> None:
    """Let ``pool_pre_ping`` check ``rec`` at its first checkout.

    SQLAlchemy skips the ping for a "fresh" record: one connected inside the
    checkout that uses it. A connection the worker opened in the background
    may wait idle for a long time before that first checkout, and its server
    may have gone meanwhile.
    """
    cast("_ConnectionRecord", rec).fresh = False


def record_of(conn: object) -> ConnectionPoolEntry:
    """The pool record behind a (async) ``Connection`` or a pool-proxied DBAPI connection."""
    fairy = conn
    # An asyncio AsyncConnection: its sync_connection is the Connection.
    fairy = getattr(fairy, "sync_connection", None) or fairy
    if not isinstance(fairy, PoolProxiedConnection):
        # A sqlalchemy.engine.Connection: its ``connection`` property is the
        # pool-proxied DBAPI connection (public API).
        fairy = getattr(fairy, "connection", None)
    rec = getattr(fairy, "_connection_record", None)
    if rec is None:
        raise TypeError(
            "expected a SQLAlchemy Connection or a pool-proxied DBAPI connection "
            f"checked out from a pool, got {conn!r}"
        )
    return cast("ConnectionPoolEntry", rec)


def pool_of(rec: ConnectionPoolEntry) -> Any:
    """The pool that owns ``rec``."""
    return rec._ConnectionRecord__pool  # type: ignore[attr-defined]


def starttime(rec: ConnectionPoolEntry) -> float:
    return cast("_ConnectionRecord", rec).starttime


def set_starttime(rec: ConnectionPoolEntry, value: float) -> None:
    cast("_ConnectionRecord", rec).starttime = value


def clamp_starttime(pool: QueuePool, rec: ConnectionPoolEntry, wanted: float) -> float:
    """The earliest ``starttime`` at or after ``wanted`` that is not "invalidated".

    SQLAlchemy recycles at checkout when ``now - starttime > pool._recycle``,
    and also when ``pool._invalidate_time > starttime`` or the record's
    ``_soft_invalidate_time > starttime``. Moving ``starttime`` back (to make a
    connection's lifetime shorter than ``pool_recycle``) must never cross one
    of those marks, or a freshly opened connection would look invalidated and
    be reconnected at every checkout, forever. The result is strictly later
    than both marks so that ``Pool._invalidate`` still treats the record as
    newer than the last pool invalidation.
    """
    floor = invalidation_floor(pool, rec)
    if wanted > floor:
        return wanted
    return math.nextafter(floor, math.inf)


def invalidation_floor(pool: QueuePool, rec: ConnectionPoolEntry) -> float:
    """The latest invalidation mark (pool-wide or of the record) that applies to ``rec``."""
    return max(pool._invalidate_time, getattr(rec, "_soft_invalidate_time", 0.0))


def forget_connection(rec: ConnectionPoolEntry) -> object:
    """Detach the DBAPI connection from ``rec`` without closing it; return it.

    For a forked child: the socket belongs to the parent. The record keeps its
    queue slot and reconnects at its next checkout, as after an invalidation.
    """
    dbapi = rec.dbapi_connection
    cast("_ConnectionRecord", rec).dbapi_connection = None
    return dbapi


def is_invalidated(pool: QueuePool, rec: ConnectionPoolEntry) -> bool:
    """True if SQLAlchemy would reconnect ``rec`` at its next checkout for invalidation."""
    st = starttime(rec)
    return (
        rec.dbapi_connection is None
        or pool._invalidate_time > st
        or getattr(rec, "_soft_invalidate_time", 0.0) > st
    )


def wrap_creator(
    pool: QueuePool,
    wrapper: Callable[
        [Callable[[ConnectionPoolEntry], DBAPIConnection], ConnectionPoolEntry], DBAPIConnection
    ],
) -> Callable[[ConnectionPoolEntry | None], DBAPIConnection]:
    """Route every connect of ``pool`` through ``wrapper(original, record)``.

    ``Pool._invoke_creator(record)`` is what ``_ConnectionRecord`` calls to
    open a DBAPI connection, just after it sets ``record.starttime``; wrapping
    it lets us tag the record and set its deadline before the ``connect``
    event handlers (dialect initialisation, user listeners) run.

    Returns the original, which health probes call with ``None`` to open a
    connection that belongs to no record (``create_engine``'s creator takes
    ``connection_record=None``).
    """
    original = pool._invoke_creator

    def invoke(rec: ConnectionPoolEntry) -> DBAPIConnection:
        return wrapper(original, rec)

    pool._invoke_creator = invoke
    return original  # type: ignore[return-value]


def pool_invalidate(
    pool: QueuePool, connection: Any, exception: BaseException | None, checkin: bool
) -> None:
    """SQLAlchemy's own ``Pool._invalidate`` (the pool-wide staleness mark after a
    disconnect error), which ``RebalancingQueuePool`` overrides for several hosts."""
    QueuePool._invalidate(pool, connection, exception, checkin)


def overflow(pool: QueuePool) -> int:
    return pool._overflow


def inc_overflow(pool: QueuePool) -> bool:
    """Reserve a slot for one more open connection (False if the pool is full)."""
    return pool._inc_overflow()


def dec_overflow(pool: QueuePool) -> None:
    pool._dec_overflow()


def max_overflow(pool: QueuePool) -> int:
    return pool._max_overflow


def use_lifo(pool: QueuePool) -> bool:
    return bool(pool._pool.use_lifo)


def recreate_kwargs(pool: QueuePool) -> dict[str, Any]:
    """The arguments ``QueuePool.recreate()`` passes to the new pool."""
    return dict(
        pool_size=pool._pool.maxsize,
        max_overflow=pool._max_overflow,
        pre_ping=pool._pre_ping,
        use_lifo=pool._pool.use_lifo,
        timeout=pool._timeout,
        recycle=pool._recycle,
        echo=pool.echo,
        logging_name=pool._orig_logging_name,
        reset_on_return=pool._reset_on_return,
        _dispatch=pool.dispatch,
        dialect=pool._dialect,
    )
