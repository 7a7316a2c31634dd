"""Threads of one pool for its blocking work: maintenance passes, health checks, connects.

The process-wide worker (``worker.py``) only decides *when* something is due;
whatever can block on the network runs here, on threads that belong to one
pool. A host that hangs (a frozen VM, a partitioned zone: TCP accepted,
nothing answers) then holds up at most the jobs of that pool that went to that
host, never another pool's maintenance, as with HikariCP's per-pool
housekeeping and connection executors.

- Threads start lazily, when a job has no idle thread to take it, up to
  ``max_workers``; a thread with nothing to do for ``idle_timeout`` seconds
  exits, so a process with many quiet pools holds few threads.
- Each job has a key (``"pass"``, ``"check:HOST"``...) and each key a cap on
  the jobs queued or running under it: one health check per host at a time,
  one maintenance pass per pool. ``submit`` refuses a job over its cap rather
  than queueing it, so a hung host cannot pile up work.
- A job that raises, even a ``BaseException`` (gevent's ``Timeout``, a
  listener's mistake), is logged; the thread goes on.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

__all__ = ["Executor"]

log = logging.getLogger("sqla_rebalance.executor")


class Executor:
    """Run a pool's blocking jobs on a small set of its own daemon threads."""

    def __init__(self, name: str, max_workers: int = 8, idle_timeout: float = 5.0) -> None:
        self.name = name
        self.max_workers = max_workers
        self.idle_timeout = idle_timeout
        self._cond = threading.Condition(threading.Lock())
        self._jobs: deque[tuple[str, Callable[[], object]]] = deque()
        #: Jobs queued or running, per key.
        self._busy: dict[str, int] = {}
        self._threads = 0
        self._idle = 0
        self._closed = False

    def submit(self, key: str, job: Callable[[], object], cap: int = 1) -> bool:
        """Queue ``job`` under ``key``; False (and nothing queued) when ``key``
        already has ``cap`` jobs queued or running, or the executor is closed."""
        with self._cond:
            busy = self._busy.get(key, 0)
            if self._closed or busy >= cap:
                return False
            self._busy[key] = busy + 1
            self._jobs.append((key, job))
            if self._idle >= len(self._jobs):
                self._cond.notify()
            elif self._threads < self.max_workers:
                self._threads += 1
                threading.Thread(
                    target=self._run, name=f"sqla-rebalance-{self.name}", daemon=True
                ).start()
            # else: every thread is busy; the job waits for the first free one.
        return True

    def busy(self, key: str) -> int:
        """Jobs queued or running under ``key``."""
        return self._busy.get(key, 0)

    @property
    def threads(self) -> int:
        """Threads alive now (running a job or idle)."""
        return self._threads

    def close(self) -> None:
        """Refuse new jobs; idle threads exit now, busy ones after their job."""
        with self._cond:
            self._closed = True
            while self._jobs:
                key, _job = self._jobs.popleft()
                self._done_locked(key)
            self._cond.notify_all()

    def _done_locked(self, key: str) -> None:
        left = self._busy.get(key, 1) - 1
        if left > 0:
            self._busy[key] = left
        else:
            self._busy.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    if self._closed:
                        self._threads -= 1
                        return
                    self._idle += 1
                    self._cond.wait(self.idle_timeout)
                    self._idle -= 1
                    if not self._jobs and not self._closed:
                        # Nothing came for idle_timeout (or a spurious wake-up
                        # with nothing to do): let this thread go.
                        self._threads -= 1
                        return
                key, job = self._jobs.popleft()
            try:
                job()
            except BaseException:  # the thread serves the pool's next jobs
                log.exception("%s: job %s failed", self.name, key)
            finally:
                # An idle thread must not keep the job's pool alive.
                job = _nothing
                with self._cond:
                    self._done_locked(key)


def _nothing() -> None:
    pass
