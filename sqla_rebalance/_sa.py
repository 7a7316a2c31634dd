"""The one place that touches SQLAlchemy's private pool attributes.

sqla-rebalance extends :class:`sqlalchemy.pool.QueuePool`, and a few of the
things it must do have no public API: reading the idle queue, swapping a
connection record in place, creating a record outside a checkout, and
adjusting a record's ``starttime`` so SQLAlchemy's own recycle comparison
enforces our per-connection deadline. Every such access goes through a
function here, and ``tests/test_sa_compat.py`` checks each one on every
supported SQLAlchemy release (2.0.x and 2.1.x), so an upstream change fails
one small test instead of corrupting a pool.

The pool classes themselves override SQLAlchemy's documented pool hooks
(``_do_return_conn``, ``_invalidate``, ``recreate``, ``dispose``); what else
they must declare for SQLAlchemy (the asyncio queue and connection dialect,
the logger name) is set by :func:`pool_class`. Two connect-time hooks are
installed here too: :func:`wrap_creator` (every connect of a pool) and
:func:`wrap_dialect_connect` (the last step of an engine's connect, after
the ``do_connect`` handlers).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, MutableSequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool
from sqlalchemy.pool.base import _AsyncConnDialect
from sqlalchemy.util import greenlet_spawn
from sqlalchemy.util import queue as sqla_queue

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection, Dialect
    from sqlalchemy.pool.base import _ConnectionRecord

__all__ = [
    "clamp_starttime",
    "create_record",
    "greenlet_spawn",
    "idle_records",
    "pool_class",
    "queue_locked",
    "record_of",
    "remove_idle",
    "swap_idle",
    "wrap_creator",
    "wrap_dialect_connect",
]

_P = TypeVar("_P", bound=QueuePool)


def pool_class(logger_name: str, *, asyncio: bool = False) -> Callable[[type[_P]], type[_P]]:
    """Class decorator: what SQLAlchemy reads off a ``QueuePool`` subclass.

    ``logger_name``: the pool logs under this name (``_sqla_logger_namespace``),
    in SQLAlchemy's ``sqlalchemy.pool`` hierarchy, as its own pools do.
    ``asyncio``: the class is an asyncio pool, as ``AsyncAdaptedQueuePool`` is
    (``_is_asyncio``, which ``create_engine`` checks against the dialect; an
    asyncio-safe queue; the connection dialect a pool made without an engine
    uses).
    """

    def declare(cls: type[_P]) -> type[_P]:
        target: Any = cls
        target._sqla_logger_namespace = logger_name
        target._is_asyncio = asyncio
        if asyncio:
            target._queue_class = sqla_queue.AsyncAdaptedQueue
            target._dialect = _AsyncConnDialect()
        return cls

    return declare


def is_asyncio(pool: QueuePool) -> bool:
    """True for an asyncio pool (its connections belong to one event loop)."""
    return bool(pool._is_asyncio)


def creator(pool: QueuePool) -> Any:
    """The creator ``pool`` was made with (what ``recreate()`` passes on)."""
    return pool._creator


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


def queue_full(pool: QueuePool) -> bool:
    """Is the idle queue full? Then ``QueuePool`` closes a record checked in
    (an overflow connection) instead of queueing it."""
    return bool(pool._pool.full())


def fairy_record(connection: object) -> ConnectionPoolEntry | None:
    """The record behind a pool-proxied DBAPI connection (None once detached)."""
    return cast("ConnectionPoolEntry | None", getattr(connection, "_connection_record", None))


def record_of(conn: object) -> ConnectionPoolEntry:
    """The pool record behind a (async) ``Connection`` or a pool-proxied DBAPI connection."""
    fairy = conn
    # An asyncio AsyncConnection: its sync_connection is the Connection.
    fairy = getattr(fairy, "sync_connection", None) or fairy
    if not isinstance(fairy, PoolProxiedConnection):
        # A sqlalchemy.engine.Connection: its ``connection`` property is the
        # pool-proxied DBAPI connection (public API).
        fairy = getattr(fairy, "connection", None)
    rec = fairy_record(fairy)
    if rec is None:
        raise TypeError(
            "expected a SQLAlchemy Connection or a pool-proxied DBAPI connection "
            f"checked out from a pool, got {conn!r}"
        )
    return rec


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


#: Marks a dialect whose ``connect`` is already wrapped.
_WRAPPED = "_sqla_rebalance_connect"


def wrap_dialect_connect(
    dialect: Dialect, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> bool:
    """Route every ``dialect.connect(*cargs, **cparams)`` through ``wrap(original)``,
    once per dialect; False if it was wrapped already.

    The creator that ``create_engine`` builds runs the ``do_connect`` event
    handlers and then calls ``dialect.connect(*cargs, **cparams)``, looked up
    on the dialect instance at each connect. An attribute of the instance is
    therefore the last step of every connect of that engine, after any
    user's handler (a rotating IAM token, say), with ``cparams`` that
    connect's own copy: where a host can be chosen without taking anything
    from the user. SQLAlchemy has no event there; this is the one place that
    replaces a dialect method (engines share no dialect instance).
    """
    if getattr(dialect, _WRAPPED, False):
        return False
    dialect.connect = wrap(dialect.connect)  # type: ignore[method-assign]
    setattr(dialect, _WRAPPED, True)
    return True


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
