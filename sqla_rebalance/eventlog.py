"""The connection event log: every connection a pool opens and retires, as rows in a table.

``pool.stats()`` and the Prometheus collector say *how many* connections were
opened and why they were closed; the event log says *which* ones, *when* and
*where*: one row per DBAPI connection, with its host, its connect and
disconnect times and the reason it was retired. That answers questions that
counters cannot ("which host had the churn at 03:12?", "how long do
connections to the standby really live?") with plain SQL, across every process
that writes to the same table.

>>> from sqla_rebalance.eventlog import EventLog
>>> log = EventLog("postgresql+psycopg://audit@logdb/audit").watch(engine)

How it stays off the request path:

- The signal receivers only append a tuple to a ``deque`` (no lock, no I/O)
  or count a drop when the buffer is full.
  They run inside checkin, inside garbage-collector callbacks and in the
  maintenance worker, so they must never block.
- A background thread per log writes the buffer in batches every
  ``flush_interval`` seconds (sooner when a batch is full). It holds the log
  by weak reference and makes no database call while the buffer is empty.
- A batch that fails is retried once, on the next cycle; if that fails too,
  its events are counted as dropped and a rate-limited warning is logged.

See ``docs/eventlog.md`` for the schema, the guarantees and example queries.

The work is split three ways: this module is the public facade (what
:class:`EventLog` watches and the signal receivers), the buffering and the
background writer are :mod:`sqla_rebalance.eventlog_writer`, and the table
and its SQL are :mod:`sqla_rebalance.eventlog_table`. Every public name is
importable from here.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeAlias

from sqlalchemy import Table, create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool

from . import signals
from .eventlog_table import Event, UTCDateTime, make_table
from .eventlog_writer import (
    WARN_INTERVAL,  # noqa: F401  (still importable from here)
    BufferedWriter,
    EventLogStats,
    log,
)
from .pool import RebalancingQueuePool

__all__ = ["DEFAULT_TABLE", "EventLog", "EventLogStats", "UTCDateTime"]

#: Name of the table written when ``table=`` is not given.
DEFAULT_TABLE = "sqla_rebalance_connection_events"

# ``pool-disposed`` (sender: the pool, sent by ``pool.dispose()``). The pool
# may or may not send it; ``Namespace.signal`` returns the same signal object
# that ``signals.py`` defines under that name, so this works as soon as the
# pool sends it and is harmless before.
_pool_disposed = signals.namespace.signal("pool-disposed")

Watchable: TypeAlias = Engine | AsyncEngine | Pool

#: Every log not yet closed, flushed at interpreter exit. Strong references on
#: purpose: ``EventLog(url).watch(engine)`` without keeping the result is the
#: common case, and that log must keep working (and be flushed) until exit.
_open_logs: set[EventLog] = set()


class EventLog(BufferedWriter):
    """Writes the ``connection_opened`` / ``connection_retired`` signals of pools to a table.

    :param target: where the table lives: a SQLAlchemy URL (the log then owns
      an engine of its own, disposed by :meth:`close`) or an :class:`Engine`
      (left open). SQLite files, PostgreSQL and MySQL/MariaDB are supported.
    :param table: the table name; it is created (with its indexes) if missing.
    :param schema: the table's schema (PostgreSQL), default the search path.
    :param buffer_size: events held in memory at most; when full, further
      events are counted as dropped (``stats().dropped_full``), never blocking.
    :param flush_interval: seconds between background writes, or ``None`` for
      no background thread at all (call :meth:`flush` yourself).
    :param batch_size: events per write transaction; a full batch also wakes
      the background thread early.
    :param shutdown_timeout: seconds that ``close()``, interpreter exit and
      ``engine.dispose()`` wait for their flush, so that a database that hangs
      cannot hang them.
    """

    def __init__(
        self,
        target: str | URL | Engine,
        *,
        table: str = DEFAULT_TABLE,
        schema: str | None = None,
        buffer_size: int = 10000,
        flush_interval: float | None = 5.0,
        batch_size: int = 500,
        shutdown_timeout: float = 5.0,
    ) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if flush_interval is not None and not flush_interval > 0:
            raise ValueError("flush_interval must be positive, or None for no background thread")
        if not shutdown_timeout >= 0:
            raise ValueError("shutdown_timeout must be >= 0")
        if isinstance(target, AsyncEngine):
            raise TypeError("the event log writes with a synchronous Engine (or give a URL)")
        if isinstance(target, Engine):
            self._engine = target
            self._owns_engine = False
        else:
            url = make_url(target)
            if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
                raise ValueError(
                    "an in-memory SQLite database is private to one connection: give a file "
                    "(sqlite:///path.db), or an Engine with StaticPool"
                )
            self._engine = create_engine(url, pool_size=1, max_overflow=2, pool_pre_ping=True)
            self._owns_engine = True
        self._table = make_table(table, schema)
        self._buffer_size = buffer_size
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._shutdown_timeout = shutdown_timeout
        #: Watched pools, and engines followed to their current pool.
        self._pools: dict[int, weakref.ref[Pool]] = {}
        self._engines: dict[int, tuple[weakref.ref[Engine], Callable[[Engine], None]]] = {}
        #: Pools whose pool_disposed flush already ran (so engine_disposed skips it).
        self._dispose_flushed: set[int] = set()
        #: id(engine) -> id(its pool when last seen), to recognise that pool above.
        self._engine_pools: dict[int, int] = {}
        self._closed = False
        self._table_ready = False
        self._engine_pid = os.getpid()
        self._warned_at = -math.inf
        self._reset_process_state()
        signals.connection_opened.connect(self._on_opened)
        signals.connection_retired.connect(self._on_retired)
        _pool_disposed.connect(self._on_pool_disposed)
        _open_logs.add(self)

    # -- public API ------------------------------------------------------------
    @property
    def table(self) -> Table:
        """The SQLAlchemy ``Table`` written to, for queries."""
        return self._table

    @property
    def engine(self) -> Engine:
        """The engine the log writes with."""
        return self._engine

    def watch(self, engine_or_pool: Watchable) -> EventLog:
        """Log the connections of this engine's pool (or of this pool) from now on.

        An engine (sync or async) is followed to its current pool, so its
        events keep being logged after ``engine.dispose()``, and
        ``engine.dispose()`` flushes the log. Engines and pools are held by
        weak reference; a watched pool that is garbage-collected wakes the
        background flush. Returns ``self``, for ``EventLog(url).watch(engine)``.
        """
        if self._closed:
            raise RuntimeError("this EventLog is closed")
        target: Any = engine_or_pool
        if isinstance(target, AsyncEngine):
            target = target.sync_engine
        if isinstance(target, Engine):
            if target is self._engine:
                raise ValueError("an EventLog cannot watch the engine it writes with")
            pool = target.pool
        elif isinstance(target, Pool):
            pool = target
        else:
            raise TypeError(f"watch() takes an Engine, an AsyncEngine or a pool, not {target!r}")
        if not isinstance(pool, RebalancingQueuePool):
            raise TypeError(
                f"{type(pool).__name__} sends no connection signals: use "
                "poolclass=RebalancingQueuePool (or AsyncRebalancingQueuePool)"
            )
        if isinstance(target, Engine):
            known = self._engines.get(id(target))
            if known is None or known[0]() is not target:  # not yet (or an id reused)
                listener = self._disposed_listener()
                event.listen(target, "engine_disposed", listener)
                self._engines[id(target)] = (weakref.ref(target), listener)
            self._engine_pools[id(target)] = id(pool)
        self._adopt_pool(pool)
        self._ensure_thread()
        return self

    def flush(self) -> int:
        """Write everything buffered now, in the calling thread; returns events written.

        A batch that fails stays pending for its one retry: the next flush,
        whether a later call or the background thread's next cycle.
        """
        if self._closed:
            return 0
        self._ensure_thread()
        return self._flush(final=False)

    def close(self, timeout: float | None = None) -> None:
        """Stop logging, write what is buffered, and release the log's engine.

        Waits at most ``timeout`` seconds (default ``shutdown_timeout``) for
        the final flush. There being no next cycle, a failing batch is retried
        at once, and whatever cannot be written is counted as dropped.
        Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + (self._shutdown_timeout if timeout is None else timeout)
        signals.connection_opened.disconnect(self._on_opened)
        signals.connection_retired.disconnect(self._on_retired)
        _pool_disposed.disconnect(self._on_pool_disposed)
        for ref, listener in list(self._engines.values()):
            engine = ref()
            if engine is not None:
                with contextlib.suppress(Exception):
                    event.remove(engine, "engine_disposed", listener)
        self._engines.clear()
        thread = self._thread
        self._inbox.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))
        self._bounded_flush(max(0.0, deadline - time.monotonic()), final=True)
        if self._owns_engine and not self._flush_lock.locked():
            self._engine.dispose()
        _open_logs.discard(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<EventLog {self._table.fullname} on {self._engine.url!r} ({state})>"

    # -- receivers: no lock, no I/O, never block ---------------------------------
    def _watches(self, sender: Any) -> bool:
        ref = self._pools.get(id(sender))
        if ref is not None and ref() is sender:
            return True
        # A watched engine's new pool (after dispose()). Checked here, at its
        # first event, rather than in engine_disposed: a connection can be
        # opened on the new pool before that event fires.
        for engine_ref, _listener in list(self._engines.values()):
            engine = engine_ref()
            if engine is not None and engine.pool is sender:
                self._adopt_pool(sender)
                return True
        return False

    def _on_opened(
        self,
        sender: Any,
        *,
        host: str,
        background: bool,
        connection_id: int,
        connected_at: float,
        **_: Any,
    ) -> None:
        if not self._watches(sender):
            return
        event = Event(
            True, sender.pool_name, connection_id, host, connected_at, background, None, None
        )
        if not self._push(event):
            return
        if self._thread is None:
            # Only after fork (the child has no thread yet). A connect is never
            # inside a GC callback, unlike a close, so starting a thread is
            # safe here; the connect itself costs far more.
            self._ensure_thread()
        elif len(self._buffer) == self._batch_size:
            self._inbox.put(None)

    def _on_retired(
        self,
        sender: Any,
        *,
        host: str,
        reason: str,
        connection_id: int,
        connected_at: float,
        closed_at: float,
        **_: Any,
    ) -> None:
        if not self._watches(sender):
            return
        event = Event(
            False, sender.pool_name, connection_id, host, connected_at, None, closed_at, reason
        )
        if self._push(event) and len(self._buffer) == self._batch_size:
            self._inbox.put(None)

    def _adopt_pool(self, pool: Pool) -> None:
        key = id(pool)
        me = weakref.ref(self)

        def gone(ref: weakref.ref[Pool]) -> None:
            # GC callback: dict.pop and SimpleQueue.put only.
            log_ = me()
            if log_ is not None:
                if log_._pools.get(key) is ref:
                    log_._pools.pop(key, None)
                log_._dispose_flushed.discard(key)
                log_._inbox.put(None)  # flush what it left behind

        self._pools[key] = weakref.ref(pool, gone)

    def _on_pool_disposed(self, sender: Any, **_: Any) -> None:
        """``pool_disposed`` (if the pool sends it): flush, bounded by shutdown_timeout."""
        if self._closed or not self._watches(sender):
            return
        self._dispose_flushed.add(id(sender))
        self._bounded_flush(self._shutdown_timeout, final=False)

    def _disposed_listener(self) -> Callable[[Engine], None]:
        me = weakref.ref(self)  # the engine must not keep the log alive

        def on_engine_disposed(engine: Engine) -> None:
            log_ = me()
            if log_ is None or log_._closed:
                return
            # engine.pool is already the new pool. The old one, if it sent
            # pool_disposed, was flushed then: do not wait for a second flush.
            old = log_._engine_pools.get(id(engine))
            log_._engine_pools[id(engine)] = id(engine.pool)
            log_._adopt_pool(engine.pool)
            if old is not None and old in log_._dispose_flushed:
                log_._dispose_flushed.discard(old)
                return
            log_._bounded_flush(log_._shutdown_timeout, final=False)

        return on_engine_disposed


def _flush_all_at_exit() -> None:
    for event_log in list(_open_logs):
        try:
            event_log.close()
        except Exception:
            log.exception("event log: final flush at exit failed")


def _after_fork_in_child() -> None:
    # The parent writes its own buffered events; the child starts empty, with
    # fresh locks (one may have been held by the parent's flusher at fork) and
    # no thread (restarted lazily). Its engine is disposed with close=False
    # before its first write (see _write).
    for event_log in list(_open_logs):
        event_log._reset_process_state()


atexit.register(_flush_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
