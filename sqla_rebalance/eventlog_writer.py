"""The event log's buffer and the thread that writes it: off the request path, batched.

Split out of :mod:`sqla_rebalance.eventlog`, which keeps the public
:class:`~sqla_rebalance.eventlog.EventLog` (construction, ``watch()``,
``close()`` and the signal receivers). This module is what happens between a
receiver appending an event and the row reaching the table: the lock-free
buffer and drop counter, the background flusher thread and the bounded
flushes of ``close()``/``dispose()``/exit, batching, the one retry of a failed
batch, the counters behind ``stats()`` and the rate-limited warning about lost
events. The SQL itself is :mod:`sqla_rebalance.eventlog_table`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import socket
import threading
import time
import weakref
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Table, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from .eventlog_table import Event, write_batch

__all__ = ["WARN_INTERVAL", "BufferedWriter", "EventLogStats"]

# The facade's logger: its warnings are the event log's, whichever module says them.
log = logging.getLogger("sqla_rebalance.eventlog")

#: At most one warning about lost events per this many seconds (per log).
WARN_INTERVAL = 60.0


@dataclass(frozen=True)
class EventLogStats:
    """Figures of one :class:`.EventLog`, counted in *events* (one open or one retire).

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


class BufferedWriter:
    """The buffering and writing half of an :class:`~sqla_rebalance.eventlog.EventLog`.

    A base class: the log sets the attributes declared here, then calls
    :meth:`_reset_process_state`; the receivers only ever call :meth:`_push`
    and wake ``_inbox``.
    """

    _engine: Engine
    _table: Table
    _batch_size: int
    _buffer_size: int
    _flush_interval: float | None
    _closed: bool
    _table_ready: bool
    _engine_pid: int
    _warned_at: float

    def _reset_process_state(self) -> None:
        """Everything that belongs to one process (called again in a forked child)."""
        self._process = f"{socket.gethostname()}:{os.getpid()}"
        # The receivers' side: a deque is appended to without any lock, and
        # len() is exact. A check-then-append may overshoot buffer_size by the
        # number of threads appending at that very instant, which keeps it
        # bounded; what matters is that an append never waits.
        self._buffer: deque[Event] = deque()
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
        self._retry: list[Event] | None = None
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

    # -- the receivers' side: no lock, no I/O, never block -------------------------
    def _push(self, event: Event) -> bool:
        """Buffer ``event``, or count it as dropped when the buffer is full."""
        buf = self._buffer
        if len(buf) >= self._buffer_size:
            next(self._drop_seq)
            return False
        buf.append(event)
        return True

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

    def _take(self) -> list[Event]:
        batch: list[Event] = []
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

    def _drain(self) -> list[Event]:
        rest: list[Event] = []
        while True:
            batch = self._take()
            if not batch:
                return rest
            rest.extend(batch)

    def _attempt(self, batch: list[Event]) -> bool:
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

    def _abandon(self, events: list[Event], *, batch: bool = True) -> None:
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

    def _write(self, batch: list[Event]) -> None:
        """One transaction: insert new rows, close rows written by earlier batches
        (see :func:`~sqla_rebalance.eventlog_table.write_batch`)."""
        pid = os.getpid()
        if pid != self._engine_pid:
            # Forked child: never use the parent's connections to the log DB.
            self._engine.dispose(close=False)
            self._engine_pid = pid
        self._ensure_table()
        with self._engine.begin() as conn:
            write_batch(conn, self._table, self._process, batch)


def _run_flusher(
    ref: weakref.ref[BufferedWriter], inbox: queue.SimpleQueue[None], interval: float
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
