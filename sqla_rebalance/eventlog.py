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
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import math
import os
import queue
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple, TypeAlias

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    create_engine,
    event,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import URL, Dialect, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool
from sqlalchemy.types import TypeDecorator, TypeEngine

from . import signals
from .pool import RebalancingQueuePool

__all__ = ["DEFAULT_TABLE", "EventLog", "EventLogStats", "UTCDateTime"]

log = logging.getLogger("sqla_rebalance.eventlog")

#: Name of the table written when ``table=`` is not given.
DEFAULT_TABLE = "sqla_rebalance_connection_events"

#: At most one warning about lost events per this many seconds (per log).
WARN_INTERVAL = 60.0

# Column widths. Values are cut to fit rather than failing the whole batch.
_NAME_LEN = 255
_HOST_LEN = 512
_REASON_LEN = 32

# ``pool-disposed`` (sender: the pool, sent by ``pool.dispose()``). The pool
# may or may not send it; ``Namespace.signal`` returns the same signal object
# that ``signals.py`` defines under that name, so this works as soon as the
# pool sends it and is harmless before.
_pool_disposed = signals.namespace.signal("pool-disposed")

Watchable: TypeAlias = Engine | AsyncEngine | Pool


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp, portable over SQLite, PostgreSQL and MySQL.

    PostgreSQL gets ``TIMESTAMP WITH TIME ZONE``. SQLite and MySQL have no
    zone-aware type, so they store naive UTC (SQLite as ISO text, MySQL as
    ``DATETIME(6)``: without ``fsp`` MySQL would drop the microseconds). Read
    back, every value is an aware UTC ``datetime``, whichever the database.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects.mysql import DATETIME

            return dialect.type_descriptor(DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=timezone.utc)


def _make_table(name: str, schema: str | None) -> Table:
    return Table(
        name,
        MetaData(),
        # INTEGER PRIMARY KEY is what autoincrements on SQLite.
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
        Column("pool", String(_NAME_LEN), nullable=False),
        Column("process", String(_NAME_LEN), nullable=False),
        Column("connection_id", BigInteger, nullable=False),
        Column("host", String(_HOST_LEN), nullable=False),
        Column("opened_at", UTCDateTime(), nullable=False),
        Column("closed_at", UTCDateTime(), nullable=True),
        Column("reason", String(_REASON_LEN), nullable=True),
        Column("background", Boolean, nullable=True),
        # The lookup of a retirement whose open was written by an earlier batch.
        Index(f"ix_{name}_process_conn", "process", "connection_id"),
        Index(f"ix_{name}_opened_at", "opened_at"),
        schema=schema,
    )


class _Event(NamedTuple):
    """One signal, as the receivers buffer it (epoch seconds, as the pool sends them)."""

    opened: bool
    pool: str
    connection_id: int
    host: str
    connected_at: float
    background: bool | None
    closed_at: float | None
    reason: str | None


def _merge(batch: list[_Event], process: str) -> tuple[list[dict[str, Any]], list[_Event]]:
    """Fold a batch into rows to insert, plus the retirements of earlier batches' rows.

    An open and a retire of the same connection in one batch become one row
    that keeps the open's connect time. Connection ids are unique within a
    process, and a batch only ever holds this process's events (the buffer is
    emptied in a forked child), so the id alone is the key here.
    """
    rows: dict[int, dict[str, Any]] = {}
    closes: list[_Event] = []
    for ev in batch:
        if ev.opened:
            rows[ev.connection_id] = _row(ev, process)
            continue
        row = rows.get(ev.connection_id)
        if row is not None and row["closed_at"] is None:
            row["closed_at"] = _utc(ev.closed_at or ev.connected_at)
            row["reason"] = (ev.reason or "")[:_REASON_LEN] or None
        else:
            closes.append(ev)
    return list(rows.values()), closes


def _row(ev: _Event, process: str) -> dict[str, Any]:
    """An insertable row; for a lone retirement it is already closed."""
    return {
        "pool": ev.pool[:_NAME_LEN],
        "process": process,
        "connection_id": ev.connection_id,
        "host": ev.host[:_HOST_LEN],
        "opened_at": _utc(ev.connected_at),
        "closed_at": None if ev.closed_at is None else _utc(ev.closed_at),
        "reason": None if ev.reason is None else ev.reason[:_REASON_LEN],
        "background": ev.background,
    }


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass(frozen=True)
class EventLogStats:
    """Figures of one :class:`EventLog`, counted in *events* (one open or one retire).

    Every event a watched pool sent is, at any moment, exactly one of
    ``written``, ``dropped`` or ``pending``. ``dropped`` is
    ``dropped_full + dropped_failed``: events refused because the buffer was
    full, and events of batches given up after their retry failed
    (``failed_flushes`` counts those batches). ``flush_errors`` counts every
    failed write attempt, retried or not; ``batches`` the successful ones.
    """

    written: int
    dropped: int
    failed_flushes: int
    pending: int
    batches: int
    dropped_full: int
    dropped_failed: int
    flush_errors: int
    last_error: str | None

    def as_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable data."""
        return asdict(self)


#: Every log not yet closed, flushed at interpreter exit. Strong references on
#: purpose: ``EventLog(url).watch(engine)`` without keeping the result is the
#: common case, and that log must keep working (and be flushed) until exit.
_open_logs: set[EventLog] = set()


class EventLog:
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
        self._table = _make_table(table, schema)
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

    def _reset_process_state(self) -> None:
        """Everything that belongs to one process (called again in a forked child)."""
        self._process = f"{socket.gethostname()}:{os.getpid()}"
        # The receivers' side: a deque is appended to without any lock, and
        # len() is exact. A check-then-append may overshoot buffer_size by the
        # number of threads appending at that very instant, which keeps it
        # bounded; what matters is that an append never waits.
        self._buffer: deque[_Event] = deque()
        # Drops are counted by advancing an itertools.count: next() on it is
        # one C call, atomic under the GIL, takes no lock (a receiver may run
        # inside a GC callback in a thread that already holds any lock we
        # could name) and cannot lose an increment the way ``n += 1`` can.
        # A count cannot be read without advancing it, so readers advance it
        # too and subtract their own reads (see _dropped_full()).
        self._drop_seq = itertools.count()
        self._drop_reads = 0
        #: Readers of _drop_seq only: stats() and the flusher, never receivers.
        self._read_lock = threading.Lock()
        #: One flush at a time (background, flush(), close(), exit, dispose).
        self._flush_lock = threading.Lock()
        self._start_lock = threading.Lock()
        #: Wakes the flusher. SimpleQueue.put is reentrant: safe in GC callbacks.
        self._inbox: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: A batch whose first write failed, waiting for its one retry.
        self._retry: list[_Event] | None = None
        self._inflight = 0
        self._written = 0
        self._batches = 0
        self._failed_flushes = 0
        self._dropped_failed = 0
        self._flush_errors = 0
        self._last_error: str | None = None
        self._reported_full = 0
        self._reported_failed = 0
        self._cycles = 0

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

    def stats(self) -> EventLogStats:
        """A snapshot of the counters. Never waits for a flush in progress."""
        full = self._dropped_full()
        retry = self._retry
        return EventLogStats(
            written=self._written,
            dropped=full + self._dropped_failed,
            failed_flushes=self._failed_flushes,
            pending=len(self._buffer) + len(retry or ()) + self._inflight,
            batches=self._batches,
            dropped_full=full,
            dropped_failed=self._dropped_failed,
            flush_errors=self._flush_errors,
            last_error=self._last_error,
        )

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
        event = _Event(
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
        event = _Event(
            False, sender.pool_name, connection_id, host, connected_at, None, closed_at, reason
        )
        if self._push(event) and len(self._buffer) == self._batch_size:
            self._inbox.put(None)

    def _push(self, event: _Event) -> bool:
        """Buffer ``event``, or count it as dropped when the buffer is full."""
        buf = self._buffer
        if len(buf) >= self._buffer_size:
            next(self._drop_seq)
            return False
        buf.append(event)
        return True

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

    # -- the background thread -----------------------------------------------------
    def _ensure_thread(self) -> None:
        """Start the background flusher unless it runs (lazily: first watch, or after fork)."""
        if self._flush_interval is None or self._closed or self._thread is not None:
            return
        with self._start_lock:
            self._start_locked(self._flush_interval)

    def _start_locked(self, interval: float) -> None:
        if self._thread is not None:  # another thread won the race
            return
        thread = threading.Thread(
            target=_run_flusher,
            args=(weakref.ref(self), self._inbox, interval),
            name="sqla-rebalance-eventlog",
            daemon=True,
        )
        self._thread = thread
        thread.start()

    def _bounded_flush(self, timeout: float, *, final: bool) -> None:
        """Flush in a helper thread and wait at most ``timeout`` for it.

        A database that does not answer (a connect stuck on an unreachable
        host) must not hang ``close()``, ``engine.dispose()`` or interpreter
        exit; the helper is a daemon and is abandoned if it overruns.
        """

        def run() -> None:
            try:
                self._flush(final=final)
            except Exception:
                log.exception("event log %s: flush failed", self._table.fullname)

        try:
            helper = threading.Thread(target=run, name="sqla-rebalance-eventlog-flush", daemon=True)
            helper.start()
        except RuntimeError:  # no new threads at interpreter shutdown: flush here
            run()
            return
        helper.join(timeout)
        if helper.is_alive():
            log.warning(
                "event log %s: flush still running after %.1f s; %d events not written yet",
                self._table.fullname,
                timeout,
                self.stats().pending,
            )

    # -- flushing (one at a time, under _flush_lock) ------------------------------------
    def _dropped_full(self) -> int:
        with self._read_lock:
            # next() returns how many times it was called before: the drops
            # plus our own earlier reads.
            value = next(self._drop_seq) - self._drop_reads
            self._drop_reads += 1
        return value

    def _take(self) -> list[_Event]:
        batch: list[_Event] = []
        pop = self._buffer.popleft
        for _ in range(self._batch_size):
            try:  # receivers append concurrently: never test-then-pop
                batch.append(pop())
            except IndexError:
                break
        self._inflight = len(batch)
        return batch

    def _flush(self, *, final: bool) -> int:
        """Write the retry batch, then the buffer, batch by batch; returns events written.

        Stops at the first failure: the database is probably down, and the
        buffer keeps (bounded) until the next cycle. ``final`` (close, exit)
        retries a failing batch at once and counts the rest as dropped.
        """
        written = 0
        with self._flush_lock:
            self._cycles += 1
            try:
                retry, self._retry = self._retry, None
                if retry is not None:
                    self._inflight = len(retry)
                    if not self._attempt(retry):
                        self._abandon(retry)
                        if final:
                            self._abandon(self._drain(), batch=False)
                        return written
                    written += len(retry)
                while True:
                    batch = self._take()
                    if not batch:
                        break
                    if self._attempt(batch) or (final and self._attempt(batch)):
                        written += len(batch)
                        continue
                    if final:
                        self._abandon(batch)
                        self._abandon(self._drain(), batch=False)
                    else:
                        self._retry = batch
                    break
            finally:
                self._inflight = 0
                self._report()
        return written

    def _drain(self) -> list[_Event]:
        rest: list[_Event] = []
        while True:
            batch = self._take()
            if not batch:
                return rest
            rest.extend(batch)

    def _attempt(self, batch: list[_Event]) -> bool:
        try:
            self._write(batch)
        except Exception as exc:  # any failure of the log DB: counted, never raised
            self._flush_errors += 1
            self._last_error = f"{type(exc).__name__}: {exc}"[:500]
            log.debug("event log %s: write failed: %s", self._table.fullname, self._last_error)
            return False
        self._written += len(batch)
        self._batches += 1
        return True

    def _abandon(self, events: list[_Event], *, batch: bool = True) -> None:
        if batch:
            self._failed_flushes += 1
        self._dropped_failed += len(events)

    def _report(self) -> None:
        """Warn about lost events, at most once per WARN_INTERVAL: never silently,
        but a database that stays down must not flood the application's log."""
        full = self._dropped_full()
        new_full = full - self._reported_full
        new_failed = self._dropped_failed - self._reported_failed
        if not (new_full or new_failed):
            return
        now = time.monotonic()
        if now - self._warned_at < WARN_INTERVAL:
            return
        self._warned_at = now
        self._reported_full = full
        self._reported_failed = self._dropped_failed
        log.warning(
            "event log %s: %d connection events dropped (buffer full: %d, write failed "
            "twice: %d) since the last report; last error: %s",
            self._table.fullname,
            new_full + new_failed,
            new_full,
            new_failed,
            self._last_error,
        )

    def _ensure_table(self) -> None:
        if self._table_ready:
            return
        try:
            self._table.create(self._engine, checkfirst=True)
        except SQLAlchemyError:
            # Another process may have created it between the check and ours.
            if not inspect(self._engine).has_table(self._table.name, schema=self._table.schema):
                raise
        self._table_ready = True

    def _write(self, batch: list[_Event]) -> None:
        """One transaction: insert new rows, close rows written by earlier batches.

        A retirement whose row is not found (its open was dropped, failed, or
        came before ``watch()``) is inserted as a closed row: ``opened_at``
        from the retirement's own ``connected_at``, ``background`` NULL.
        """
        pid = os.getpid()
        if pid != self._engine_pid:
            # Forked child: never use the parent's connections to the log DB.
            self._engine.dispose(close=False)
            self._engine_pid = pid
        self._ensure_table()
        table = self._table
        process = self._process
        rows, closes = _merge(batch, process)
        with self._engine.begin() as conn:
            if closes:
                # Matched on the connect time too, so that a row left open by
                # an earlier process with the same pid is never closed by us.
                found: dict[tuple[int, datetime], int] = {}
                for chunk in _chunks(sorted({ev.connection_id for ev in closes}), 500):
                    query = select(table.c.id, table.c.connection_id, table.c.opened_at).where(
                        table.c.process == process,
                        table.c.connection_id.in_(chunk),
                        table.c.closed_at.is_(None),
                    )
                    for row_id, conn_id, opened_at in conn.execute(query):
                        found[(conn_id, opened_at)] = row_id
                changes: list[dict[str, Any]] = []
                for ev in closes:
                    row_id = found.pop((ev.connection_id, _utc(ev.connected_at)), None)
                    if row_id is None:
                        rows.append(_row(ev, process))
                    else:
                        changes.append(
                            {
                                "b_id": row_id,
                                "b_closed_at": _utc(ev.closed_at or ev.connected_at),
                                "b_reason": (ev.reason or "")[:_REASON_LEN] or None,
                            }
                        )
                if changes:
                    conn.execute(
                        update(table)
                        .where(table.c.id == bindparam("b_id"))
                        .values(closed_at=bindparam("b_closed_at"), reason=bindparam("b_reason")),
                        changes,
                    )
            if rows:
                conn.execute(insert(table), rows)


def _run_flusher(
    ref: weakref.ref[EventLog], inbox: queue.SimpleQueue[None], interval: float
) -> None:
    """The background loop of one log; holds it only while flushing."""
    me = threading.current_thread()
    while True:
        with contextlib.suppress(queue.Empty):
            inbox.get(timeout=interval)
        while True:  # coalesce every wake-up received meanwhile
            try:
                inbox.get_nowait()
            except queue.Empty:
                break
        log_ = ref()
        if log_ is None or log_._closed or log_._thread is not me:
            return
        try:
            log_._flush(final=False)
        except Exception:  # the loop must survive anything
            log.exception("event log %s: flush failed", log_._table.fullname)
        del log_


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
