"""The maintenance worker: one daemon thread per process, serving every pool.

Pools are held by weak reference, so the worker never keeps a pool (or its
engine) alive; the thread exits as soon as no pool is registered and starts
again on demand. After ``fork()`` the child starts with no thread and a fresh
inbox: a thread cannot be inherited, and the child must never touch the
parent's sockets (see ``RebalancingQueuePool._forget_inherited``).

The worker only decides and dispatches: a pool's ``_run_maintenance`` hands
its pass to the pool's own threads (``executor.py``) or event loop and
returns at once, and the timers (:meth:`MaintenanceWorker.call_later`) run
short callbacks that never block: they mark a network operation that missed
its deadline (``deadlines.py``). Nothing that waits on the network runs on
this thread, so a hung host cannot stall another pool.

Its cost follows the work, not the number of pools or connections: one
heap, on the monotonic scheduling clock, holds each pool's next due time, so
a wake-up touches only the pools that are due (and those that asked), never
all of them. A pool tells the worker its due time changed by poking it with
its key (:meth:`MaintenanceWorker.poke`); a heap entry whose time is no
longer the pool's is stale and dropped when it comes up.

The inbox is a ``queue.SimpleQueue`` because ``put()`` on it is reentrant:
it is called from the checkin path, which may run inside a garbage-collector
callback, where taking a plain ``Lock`` could deadlock.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol

from . import clock

__all__ = ["MAX_SLEEP", "MaintenanceWorker", "Timer", "get_worker"]

log = logging.getLogger("sqla_rebalance.worker")

#: How soon the worker looks again at a pool whose pass it just dispatched,
#: until that pass says when it is next due (seconds).
MAX_SLEEP = 1.0


class Maintained(Protocol):
    """What the worker needs of a pool."""

    _next_due: float

    def _run_maintenance(self) -> None: ...


class Timer:
    """A callback due at a monotonic time; ``cancel()`` makes it a no-op."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], float | None]) -> None:
        self.when = when
        #: Returns None, or a delay (s) after which to run it again.
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.callback = _cancelled  # it stays in the heap until its time: hold nothing


def _cancelled() -> None:
    return None


class MaintenanceWorker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: dict[int, weakref.ref[Maintained]] = {}
        #: Keys of pools whose due time changed; None: look at every pool.
        self._inbox: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: (due time on ``clock.now()``, sequence, pool key): the pools' next passes.
        #: Only the worker thread touches it and ``_due``.
        self._heap: list[tuple[float, int, int]] = []
        #: Pool key -> the due time of its live heap entry (others are stale).
        self._due: dict[int, float] = {}
        #: (monotonic due time, sequence, timer): deadlines of network operations.
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self.passes = 0

    # -- timers (any thread, never a GC callback) -------------------------------
    def call_later(self, delay: float, callback: Callable[[], float | None]) -> Timer:
        """Run ``callback`` in the worker thread ``delay`` seconds from now.

        The callback must not block (it runs on the thread that serves every
        pool); it returns None, or a delay after which it runs again.
        """
        timer = Timer(time.monotonic() + delay, callback)
        with self._lock:
            heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
            self._start_locked()
        self.poke()
        return timer

    def _run_timers(self) -> float:
        """Run the timers that are due; return when the next one is (monotonic)."""
        while True:
            with self._lock:
                if not self._timers:
                    return float("inf")
                when, _seq, timer = self._timers[0]
                if timer.cancelled:
                    heapq.heappop(self._timers)
                    continue
                if when > time.monotonic():
                    return when
                heapq.heappop(self._timers)
            try:
                again = timer.callback()
            except BaseException:  # a timer must never end the worker
                log.exception("sqla-rebalance timer %r failed", timer.callback)
                again = None
            if again is not None and not timer.cancelled:
                timer.when = time.monotonic() + again
                with self._lock:
                    heapq.heappush(self._timers, (timer.when, next(self._seq), timer))

    # -- registration (never called from a GC callback) ---------------------
    def register(self, pool: Maintained) -> None:
        key = id(pool)
        with self._lock:
            if key not in self._pools:
                self._pools[key] = self._ref(key, pool)
            self._start_locked()
        self.poke(key)

    def unregister(self, pool: Maintained) -> None:
        with self._lock:
            ref = self._pools.get(id(pool))
            if ref is not None and ref() is pool:
                del self._pools[id(pool)]
        self.poke(id(pool))

    def _ref(self, key: int, pool: Maintained) -> weakref.ref[Maintained]:
        def forget(ref: weakref.ref[Maintained]) -> None:
            self._forget(key, ref)

        return weakref.ref(pool, forget)

    def _forget(self, key: int, ref: weakref.ref[Maintained]) -> None:
        # Weakref callback: may run in any thread at any time, so no lock
        # here; dict.pop is atomic, and the loop tolerates a dead ref anyway.
        if self._pools.get(key) is ref:
            self._pools.pop(key, None)
        self.poke(key)

    def is_registered(self, pool: Maintained) -> bool:
        ref = self._pools.get(id(pool))
        return ref is not None and ref() is pool

    def ensure_running(self) -> None:
        """Start the thread if pools are registered but none runs (after fork)."""
        if self._thread is None and self._pools:
            with self._lock:
                self._start_locked()

    def _start_locked(self) -> None:
        if self._thread is None and (self._pools or self._timers):
            self._thread = threading.Thread(
                target=self._run, name="sqla-rebalance-worker", daemon=True
            )
            self._thread.start()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def poke(self, key: int | None = None) -> None:
        """Wake the worker now (safe from any thread and from GC callbacks).

        ``key`` names the pool (its ``id()``) whose due time changed; with
        none the worker reads every pool's again.
        """
        self._inbox.put(key)

    # -- the loop -------------------------------------------------------------
    def _run(self) -> None:
        me = threading.current_thread()
        changed: set[int] = set()
        everyone = True  # a new thread reads every pool's due time once
        while True:
            with self._lock:
                if self._thread is not me:  # replaced after fork; never here in practice
                    return
                if not self._pools and all(t.cancelled for _when, _seq, t in self._timers):
                    self._timers.clear()
                    self._heap.clear()
                    self._due.clear()
                    self._thread = None
                    return
                if everyone:
                    changed.update(self._pools)
            everyone = False
            timers_due = self._run_timers()
            for key in changed:
                self._reschedule(key)
            changed.clear()
            self._run_due()
            self.passes += 1
            heap, due = self._heap, self._due
            while heap and due.get(heap[0][2]) != heap[0][0]:
                heapq.heappop(heap)  # stale: never wake up for it
            wake = heap[0][0] if heap else float("inf")
            timeout = min(wake - clock.now(), timers_due - time.monotonic())
            if timeout > 0:
                with contextlib.suppress(queue.Empty):
                    item = self._inbox.get(timeout=None if timeout == float("inf") else timeout)
                    everyone |= item is None
                    if item is not None:
                        changed.add(item)
            # Coalesce every poke received meanwhile into this one wake-up.
            while True:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                everyone |= item is None
                if item is not None:
                    changed.add(item)

    def _pool(self, key: int) -> Maintained | None:
        ref = self._pools.get(key)
        return None if ref is None else ref()

    def _push(self, key: int, when: float) -> None:
        if self._due.get(key) != when:
            self._due[key] = when
            heapq.heappush(self._heap, (when, next(self._seq), key))

    def _reschedule(self, key: int) -> None:
        """Pool ``key`` says its due time changed (or it went away)."""
        pool = self._pool(key)
        if pool is None:
            self._due.pop(key, None)  # its heap entries are stale now
        else:
            self._push(key, pool._next_due)

    def _run_due(self) -> None:
        """Dispatch the passes of the pools that are due; nothing else is looked at."""
        heap, now = self._heap, clock.now()
        while heap and heap[0][0] <= now:
            when, _seq, key = heapq.heappop(heap)
            if self._due.get(key) != when:
                continue  # stale: the pool's due time moved since
            del self._due[key]
            pool = self._pool(key)
            if pool is None:
                continue
            if pool._next_due <= now:
                try:
                    pool._run_maintenance()  # dispatches; never blocks
                except BaseException:  # the loop must survive any pool's failure
                    log.exception("maintenance of %r failed", pool)
                    pool._next_due = clock.now() + MAX_SLEEP
            self._push(key, pool._next_due)
            del pool  # hold no strong reference while sleeping


_worker = MaintenanceWorker()


def get_worker() -> MaintenanceWorker:
    return _worker


def _after_fork_in_child() -> None:
    global _worker
    parent = _worker
    _worker = child = MaintenanceWorker()
    # Pools survive into the child; they must forget the parent's connections
    # and are re-registered with the child's worker, whose thread starts lazily
    # on the pool's next connect or public call.
    for key, ref in list(parent._pools.items()):
        pool = ref()
        if pool is not None:
            forget = getattr(pool, "_forget_inherited", None)
            if forget is not None:
                forget()
            child._pools[key] = child._ref(key, pool)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
