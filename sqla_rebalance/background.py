"""Where one pool's background work runs, and when its next pass is due.

The process-wide worker (``worker.py``) only decides *when*: it reads
``pool._next_due`` and calls ``pool._run_maintenance()``, which hands the
pass to :meth:`Background.dispatch` and returns at once. A sync pool's pass,
its background connects and its health checks run on the pool's own
:class:`~sqla_rebalance.executor.Executor` threads; an asyncio pool's run as
tasks in the event loop that owns its connections (its driver cannot be
used from another thread), as greenlets, like SQLAlchemy's own async engine.

The :class:`Schedule` fields are written without a lock, except ``scan_by``:

- ``next_due``: the worker (``now + MAX_SLEEP`` before dispatching), the end
  of a pass (its plan), and :meth:`Schedule.request` (0: now).
- ``wake``: set by :meth:`Schedule.request` (any thread, a checkin in a
  garbage-collector callback too), cleared when a pass starts. A pass that
  ends while it is set leaves ``next_due`` at 0 instead of its own plan, so
  a request made during a pass is never lost.
- ``dirty``: set with ``wake``, taken (and cleared) by a pass when it
  starts; a pass that took it does a full scan of the pool's connections.
  A pass that finds it clear and nothing of its own plan due does only what
  is due for the hosts (health checks): the pass costs what is due, not what
  the pool holds. A pass that fails sets it again.
- ``scan_by``: the latest moment a full scan is needed, set by
  :meth:`Schedule.no_later_than` for a connection opened outside a pass
  (checkout threads) and taken by a pass when it starts, both under
  ``_lock`` (never from a garbage-collector callback). A pass that does not
  scan keeps it in its own plan.

Every write of ``next_due`` is followed by a poke of the worker naming the
pool (``key``), so that the worker's heap of due times stays exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from . import _sa, clock, randomness
from .executor import Executor
from .stats import DISPOSE
from .worker import MAX_SLEEP, get_worker

if TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry, QueuePool

    from .config import PoolConfig
    from .ledger import Ledger
    from .steering import Steering

try:  # greenlet identifies "who is connecting" inside an asyncio event loop
    from greenlet import getcurrent as _getcurrent
except ImportError:  # pragma: no cover - greenlet is present wherever asyncio pools are
    _getcurrent = None

__all__ = ["Background", "Schedule"]

# Retry delays (s) for background connects that fail: exponential, full jitter.
_BACKOFF_MIN = 0.5
_BACKOFF_MAX = 30.0

#: Background connects of one pool running at once (a pass waits for one at a
#: time; one it stopped waiting for, on a hung host, may still be running).
_CONNECT_CAP = 3


class _Opening:
    """A background connect the pass waits for, for a bounded time."""

    __slots__ = ("_done", "_lock", "abandoned", "rec")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.rec: ConnectionPoolEntry | None = None
        self.abandoned = False

    def deliver(self, rec: ConnectionPoolEntry | None) -> bool:
        """From the connecting thread: False if the pass no longer waits."""
        with self._lock:
            if self.abandoned:
                return False
            self.rec = rec
        self._done.set()
        return True

    def result(self, timeout: float) -> ConnectionPoolEntry | None:
        """The connection, or None if the connect failed or is not done in time."""
        self._done.wait(timeout)
        with self._lock:
            if not self._done.is_set():
                self.abandoned = True
            return self.rec


class Schedule:
    """When a pool's next pass is due: what the worker reads (see above)."""

    __slots__ = ("_lock", "_scan_by", "dirty", "key", "next_due", "wake")

    def __init__(self, key: int = 0) -> None:
        #: The pool's key for the worker (its ``id()``).
        self.key = key
        self.next_due = 0.0
        self.wake = False
        self.dirty = True
        self._scan_by = math.inf
        self._lock = threading.Lock()

    def request(self) -> None:
        """Ask for a full pass now (safe from any thread and GC callbacks)."""
        self.wake = True
        self.dirty = True
        self.next_due = 0.0
        get_worker().poke(self.key)

    def no_later_than(self, when: float) -> None:
        """A full pass is needed by ``when`` (a connection opened outside a pass).

        Remembered until a pass takes it (:meth:`take_scan_by`), not only
        when it is earlier than the next pass: that pass may be one that
        only checks hosts, and its plan for the next full scan was made
        without this connection.
        """
        with self._lock:
            self._scan_by = min(self._scan_by, when)
        if when < self.next_due:
            self.wake = True  # a pass running now planned without it
            self.next_due = when
            get_worker().poke(self.key)

    def after_fork(self) -> None:
        """In a forked child: a lock another thread of the parent held stays held."""
        self._lock = threading.Lock()

    def take_scan_by(self) -> float:
        """When a full scan was asked for by (``inf``: not asked); clears it."""
        with self._lock:
            when, self._scan_by = self._scan_by, math.inf
        return when


class Background:
    """The threads (or event loop) of one pool, its pass schedule and its background connects."""

    def __init__(
        self,
        pool: QueuePool,
        ledger: Ledger,
        steering: Steering,
        schedule: Schedule,
        config: PoolConfig,
    ) -> None:
        self._pool = pool
        self._ledger = ledger
        self._steering = steering
        self._name = name = config.pool_name
        self.is_asyncio = _sa.is_asyncio(pool)
        #: How long a pass waits for a background connect.
        self._timeout = config.health_check_timeout
        self.schedule = schedule
        #: This pool's own threads for whatever may block (``executor.py``).
        self.executor = Executor(f"pool-{name}")
        #: The event loop of an asyncio pool, learnt at its first connection.
        self.loop: asyncio.AbstractEventLoop | None = None
        #: Threads (greenlets for asyncio) doing this pool's background work:
        #: connects made there are not counted as checkouts that waited.
        self._tokens: set[object] = set()
        self._pass_inflight = False
        self._async_inflight = False
        #: Keys of jobs running in the event loop (asyncio pools), and their tasks.
        self._async_jobs: set[str] = set()
        self._async_tasks: set[asyncio.Future[Any]] = set()
        self._backoff = 0.0
        self.retry_at = 0.0

    # -- scheduling ------------------------------------------------------------------
    def found_loop(self) -> None:
        """At a connect of an asyncio pool: learn its event loop."""
        if self.is_asyncio and self.loop is None:
            with contextlib.suppress(RuntimeError):  # no running loop: not async after all
                self.loop = asyncio.get_running_loop()
                # Maintenance could not run before the loop was known.
                self.schedule.request()

    def dispatch(self, maintain: Callable[[], float], refresh_dns: Callable[[], None]) -> None:
        """The worker found the pass due: hand it to this pool's own thread (or
        event loop) and return at once. ``maintain`` returns when the next is due."""
        schedule = self.schedule
        # Until the pass says otherwise; written before the in-flight test so
        # that a pass ending meanwhile is never overwritten.
        schedule.next_due = clock.now() + MAX_SLEEP
        if not self.is_asyncio:
            if self._pass_inflight:
                return  # the running pass sets next_due when it ends
            self._pass_inflight = True
            if not self.executor.submit("pass", lambda: self._pass_job(maintain, refresh_dns)):
                self._pass_inflight = False
            return
        if self._steering.dns_due(clock.now()):
            # A DNS lookup blocks: on this pool's executor, never in the loop.
            self.executor.submit("dns", refresh_dns)
        loop = self.loop
        if self._async_inflight or loop is None or loop.is_closed():
            return
        self._async_inflight = True
        schedule.wake = False

        async def run() -> None:
            next_due = clock.now() + MAX_SLEEP
            try:
                next_due = await _sa.greenlet_spawn(maintain)
            except BaseException:
                schedule.dirty = True
                self._pool.logger.exception("maintenance of pool %s failed", self._name)
            finally:
                schedule.next_due = 0.0 if schedule.wake else next_due
                self._async_inflight = False
                get_worker().poke(schedule.key)

        try:
            asyncio.run_coroutine_threadsafe(run(), loop)
        except RuntimeError:  # loop closed between the check and the call
            self._async_inflight = False

    def _pass_job(self, maintain: Callable[[], float], refresh_dns: Callable[[], None]) -> None:
        """One maintenance pass of a sync pool, on its own executor thread."""
        schedule = self.schedule
        schedule.wake = False
        next_due = clock.now() + MAX_SLEEP
        try:
            refresh_dns()
            next_due = maintain()
        except BaseException:  # logged; the next pass comes as usual, and scans
            schedule.dirty = True
            self._pool.logger.exception("maintenance of pool %s failed", self._name)
        finally:
            schedule.next_due = 0.0 if schedule.wake else next_due
            self._pass_inflight = False
            get_worker().poke(schedule.key)

    # -- who is connecting ------------------------------------------------------------
    def _token(self) -> object:
        if self.is_asyncio and _getcurrent is not None:
            return _getcurrent()
        return threading.get_ident()

    def in_background(self) -> bool:
        """Is the calling thread (greenlet) doing this pool's background work?"""
        return self._token() in self._tokens

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """Mark the calling thread (greenlet) as doing background work."""
        token = self._token()
        self._tokens.add(token)
        try:
            yield
        finally:
            self._tokens.discard(token)

    # -- jobs -------------------------------------------------------------------------
    def spawn(self, key: str, job: Callable[[], object], cap: int = 1) -> bool:
        """Run ``job`` off the maintenance pass: on this pool's executor, or as a
        task in the event loop of an asyncio pool. False if ``key`` is busy."""
        if not self.is_asyncio:
            return self.executor.submit(key, job, cap)
        loop = self.loop
        if loop is None or loop.is_closed() or key in self._async_jobs:
            return False
        self._async_jobs.add(key)

        async def run() -> None:
            try:
                await _sa.greenlet_spawn(job)
            except BaseException:
                self._pool.logger.exception("pool %s: %s failed", self._name, key)
            finally:
                self._async_jobs.discard(key)

        def start() -> None:
            task = asyncio.ensure_future(run())
            self._async_tasks.add(task)
            task.add_done_callback(self._async_tasks.discard)

        try:
            loop.call_soon_threadsafe(start)
        except RuntimeError:  # loop closed meanwhile
            self._async_jobs.discard(key)
            return False
        return True

    # -- background connects ----------------------------------------------------------
    def open(self, now: float) -> ConnectionPoolEntry | None:
        """Open a connection in the background; None (with backoff) on failure.

        A sync pool connects on an executor thread and waits for it at most
        ``health_check_timeout``: a connect to a host that hangs must not
        hold up the rest of the pass. A connect it stopped waiting for that
        succeeds later is kept for the next pass (the ledger's ``fresh``).
        """
        fresh = self._ledger.fresh
        while fresh:
            _at, rec = fresh.pop()
            if rec.dbapi_connection is not None:
                return rec
        if now < self.retry_at:
            return None
        if self.is_asyncio:
            return self.open_now()  # awaits in the event loop: blocks nothing else
        opening = _Opening()
        if not self.executor.submit("connect", lambda: self._open_job(opening), _CONNECT_CAP):
            return None
        return opening.result(self._timeout)

    def _open_job(self, opening: _Opening) -> None:
        with self.working():
            rec = self.open_now()
        if not opening.deliver(rec) and rec is not None:
            # The pass stopped waiting: the next one takes it.
            if self._ledger.disposed:
                self._ledger.close(rec, DISPOSE, self._steering.hostset)
            else:
                self._ledger.fresh.append((clock.now(), rec))
                self.schedule.request()

    def open_now(self) -> ConnectionPoolEntry | None:
        try:
            rec = _sa.create_record(self._pool)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # gevent's Timeout, a listener's own exception class...
            # ...is a failed background connect like any other: backoff, not the end of
            # this pool's maintenance.
            self._backoff = min(_BACKOFF_MAX, max(_BACKOFF_MIN, self._backoff * 2))
            self.retry_at = clock.now() + randomness.rng.uniform(0, self._backoff)
            self._pool.logger.warning(
                "pool %s: background connect failed (%s); retrying in up to %.1fs",
                self._name,
                err,
                self._backoff,
            )
            return None
        self._backoff = 0.0
        if self._ledger.disposed:
            self._ledger.close(rec, DISPOSE, self._steering.hostset)
            return None
        _sa.ping_at_first_checkout(rec)
        return rec

    def after_fork(self) -> None:
        """In a forked child: no thread, task or loop of the parent is ours."""
        self._tokens = set()
        self.executor = Executor(f"pool-{self._name}")
        self._pass_inflight = False
        self._async_jobs = set()
        self._async_tasks = set()
        self._async_inflight = False
        self.loop = None
        self.schedule.next_due = 0.0  # the child's worker reads every pool at its start
        self.schedule.after_fork()
