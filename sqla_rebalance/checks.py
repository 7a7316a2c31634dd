"""Health checks of a pool's hosts: each one off the maintenance pass, under a deadline.

A check is due per host every ``health_check_interval`` seconds (at once
for a host that failed). It is one of:

- a **ping**: the role query (``SELECT pg_is_in_recovery()``...) on one of the
  host's idle connections, taken out of the idle queue for the time of the
  query. No extra connection, no churn.
- a **probe**: a short-lived connection of its own, opened, asked its role
  and closed. For a host that failed (to confirm the failure or fail back),
  a host of a role this pool does not use, and an up host whose connections
  are all in use: it would otherwise never be checked, and if it hung, every
  thread would end up waiting on it. An up host holding no connection of
  this pool is not probed (no churn): a connect to it is watched anyway.

Each check runs as a job of the pool's own executor (or a task in the
event loop of an asyncio pool), one per host at a time, never on the
process-wide worker thread: a host that hangs holds up only its own check.
Its :class:`~sqla_rebalance.deadlines.Deadline` (``health_check_timeout``)
counts a failure each time it passes with the check still running, so a
hung host is *suspect* after one timeout and *down* after
``unhealthy_threshold`` of them, however long the driver would wait.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Any

from . import _sa, targets
from .deadlines import Deadline, abandon
from .hosts import UP, Changes, Host, HostSet

if TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry

    from .pool import RebalancingQueuePool

__all__ = ["HostChecks"]


class HostChecks:
    """The health checks of one pool, and the ones in flight."""

    def __init__(self, pool: RebalancingQueuePool) -> None:
        self._pool = weakref.ref(pool)
        #: Checks running now, by host key.
        self.inflight: dict[str, Deadline] = {}

    def in_flight(self, key: str) -> float | None:
        """Seconds the check of ``key`` has been running, or None."""
        deadline = self.inflight.get(key)
        return deadline.age() if deadline is not None else None

    def after_fork(self) -> None:
        self.inflight = {}

    # -- the pass's part: start what is due (never waits) --------------------------
    def run_due(self, now: float) -> None:
        pool = self._pool()
        hostset = pool._hostset if pool is not None else None
        if pool is None or hostset is None:
            return
        # With one host and any role there is nothing to choose between:
        # periodic checks would only cost queries.
        periodic = len(hostset) > 1 or pool._config.target_role != "any"
        for host in hostset.due_checks(now):
            if host.key in self.inflight:
                continue
            if host.health != UP or not hostset.role_fits(host):
                # Failed, or of a role this pool does not use: a connect probe.
                self._start(pool, hostset, host, now, None)
            elif not periodic:
                hostset.checked(host, now)
            else:
                rec = self._idle_record(pool, host)
                if rec is not None or self._in_use_on(pool, host):
                    # Every connection to it busy: a probe, or a hung host
                    # would go unnoticed for as long as they stay busy.
                    self._start(pool, hostset, host, now, rec)
                else:
                    # No connection there at all: nothing to protect, and a
                    # connect to it is watched (and fails over) anyway.
                    hostset.checked(host, now)

    def _idle_record(self, pool: RebalancingQueuePool, host: Host) -> ConnectionPoolEntry | None:
        """One idle connection to ``host``, taken out of the idle queue (or None)."""
        if pool._adapter is None or pool._adapter.standby_sql is None:
            return None
        for rec in _sa.idle_records(pool):
            state = pool._states.get(rec)
            if (
                state is not None
                and state.host == host.key
                and not state.pinned
                and rec.dbapi_connection is state.dbapi
                and _sa.remove_idle(pool, rec)
            ):
                return rec
        return None

    @staticmethod
    def _in_use_on(pool: RebalancingQueuePool, host: Host) -> bool:
        return any(
            state.host == host.key and rec.in_use and not state.closed
            for rec, state in list(pool._states.items())
        )

    def _start(
        self,
        pool: RebalancingQueuePool,
        hostset: HostSet,
        host: Host,
        now: float,
        rec: ConnectionPoolEntry | None,
    ) -> None:
        timeout = pool._config.health_check_timeout
        # Not due again while it runs: its result (or its deadline) reschedules it.
        hostset.checking(host, now + timeout)

        def job() -> None:
            if rec is None:
                self._probe(host)
            else:
                self._ping(host, rec)

        pool.logger.debug(
            "pool %s: %s of %s (%s)",
            pool.pool_name,
            "probe" if rec is None else "ping",
            host.key,
            host.health,
        )
        if not pool._spawn(f"check:{host.key}", job) and rec is not None:
            pool._return_idle(rec)  # a check of this host is still running

    # -- the jobs (the pool's own threads, or its event loop) ------------------------
    def _ping(self, host: Host, rec: ConnectionPoolEntry) -> None:
        pool = self._pool()
        if pool is None:
            return
        hostset, adapter = pool._hostset, pool._adapter
        dbapi = rec.dbapi_connection
        if hostset is None or adapter is None or dbapi is None:
            pool._return_idle(rec)
            return
        deadline = self._watch(pool, "health check", host.key, dbapi)
        try:
            role = pool._ask_role(host.key, dbapi)
        except Exception as err:
            self._done(deadline)
            # Broken (or abandoned after its deadline): closed here; the pass
            # reconnects its slot in the background.
            rec.invalidate(err)
            pool._return_idle(rec)
            changes = Changes() if deadline.expired else hostset.failed(host.key, err)
        else:
            self._done(deadline)
            pool.logger.debug(
                "pool %s: ping of %s answered in %.3fs", pool.pool_name, host.key, deadline.age()
            )
            pool._return_idle(rec)
            changes = hostset.succeeded(host.key, role)
        pool._apply_changes(changes)

    def _probe(self, host: Host) -> None:
        """Connect to ``host`` outside the pool, ask its role, close again."""
        pool = self._pool()
        if pool is None:
            return
        hostset = pool._hostset
        if hostset is None:
            return
        timeout = pool._config.health_check_timeout
        deadline = self._watch(pool, "probe", host.key, None)
        # The driver's own connect timeout, unless the user set one: the
        # deadline has counted the failures by then; this only ends the wait.
        target = targets.Target(host, timeout=max(1.0, timeout, pool._config.connect_deadline))
        conn: Any = None
        try:
            token = targets.current_target().set(target)
            try:
                conn = pool._invoke_original(None)
            finally:
                targets.current_target().reset(token)
            deadline.conn = conn  # the role query is watched too
            role = pool._ask_role(host.key, conn)
        except Exception as err:
            pool.logger.debug("pool %s: probe of %s failed: %s", pool.pool_name, host.key, err)
            changes = Changes() if deadline.expired else hostset.failed(host.key, err)
        else:
            changes = hostset.succeeded(host.key, role)
        finally:
            self._done(deadline)
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        pool._apply_changes(changes)

    def _watch(self, pool: RebalancingQueuePool, what: str, key: str, conn: Any) -> Deadline:
        deadline = pool._watch(what, key, conn)  # the pool's one way to watch an operation
        self.inflight[key] = deadline
        return deadline

    def _done(self, deadline: Deadline) -> None:
        deadline.finish()
        if deadline.host is not None and self.inflight.get(deadline.host) is deadline:
            del self.inflight[deadline.host]


def abandon_if_unhealthy(hostset: HostSet | None, key: str, dbapi_connection: Any) -> None:
    """Before closing a connection to a host that is not up: shut its socket
    first, so the close never waits on a peer that does not answer."""
    if hostset is None:
        return
    host = hostset.get(key)
    if host is not None and host.health != UP:
        abandon(dbapi_connection)
