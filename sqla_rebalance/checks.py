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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .deadlines import Deadline, abandon
from .hosts import UP, Changes, Host, HostSet

if TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry

    from .background import Background
    from .ledger import Ledger
    from .steering import Steering

__all__ = ["HostChecks", "abandon_if_unhealthy"]


class HostChecks:
    """The health checks of one pool, and the ones in flight.

    Given at construction what it works with: the pool's steering (hosts,
    role query, probes, deadlines), its ledger (idle connections to ping),
    its background (where a check runs), and ``apply``, which turns the
    changes a check found into signals and a rebalance (``Maintenance.apply_changes``).
    """

    def __init__(
        self,
        steering: Steering,
        ledger: Ledger,
        background: Background,
        apply: Callable[[Changes], None],
    ) -> None:
        self._steering = steering
        self._ledger = ledger
        self._background = background
        self._apply = apply
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
        steering = self._steering
        hostset = steering.hostset
        if hostset is None:
            return
        # With one host and any role there is nothing to choose between:
        # periodic checks would only cost queries.
        periodic = len(hostset) > 1 or steering.config.target_role != "any"
        for host in hostset.due_checks(now):
            if host.key in self.inflight:
                continue
            if host.health != UP or not hostset.role_fits(host):
                # Failed, or of a role this pool does not use: a connect probe.
                self._start(hostset, host, now, None)
            elif not periodic:
                hostset.checked(host, now)
            else:
                rec = self._idle_record(host)
                if rec is not None or self._ledger.in_use_on(host.key):
                    # Every connection to it busy: a probe, or a hung host
                    # would go unnoticed for as long as they stay busy.
                    self._start(hostset, host, now, rec)
                else:
                    # No connection there at all: nothing to protect, and a
                    # connect to it is watched (and fails over) anyway.
                    hostset.checked(host, now)

    def _idle_record(self, host: Host) -> ConnectionPoolEntry | None:
        """One idle connection to ``host``, taken out of the idle queue (or None)."""
        adapter = self._steering.adapter
        if adapter is None or adapter.standby_sql is None:
            return None
        return self._ledger.take_idle(host.key)

    def _start(
        self,
        hostset: HostSet,
        host: Host,
        now: float,
        rec: ConnectionPoolEntry | None,
    ) -> None:
        steering = self._steering
        timeout = steering.config.health_check_timeout
        # Not due again while it runs: its result (or its deadline) reschedules it.
        hostset.checking(host, now + timeout)

        def job() -> None:
            if rec is None:
                self._probe(host)
            else:
                self._ping(host, rec)

        steering.log.debug(
            "pool %s: %s of %s (%s)",
            steering.pool_name,
            "probe" if rec is None else "ping",
            host.key,
            host.health,
        )
        if not self._background.spawn(f"check:{host.key}", job) and rec is not None:
            self._return_idle(rec)  # a check of this host is still running

    def _return_idle(self, rec: ConnectionPoolEntry) -> None:
        self._ledger.return_idle(rec, self._steering.hostset)

    # -- the jobs (the pool's own threads, or its event loop) ------------------------
    def _ping(self, host: Host, rec: ConnectionPoolEntry) -> None:
        steering = self._steering
        hostset, adapter = steering.hostset, steering.adapter
        dbapi = rec.dbapi_connection
        if hostset is None or adapter is None or dbapi is None:
            self._return_idle(rec)
            return
        deadline = self._watch("health check", host.key, dbapi)
        try:
            role = steering.ask_role(host.key, dbapi)
        except Exception as err:
            self._done(deadline)
            # Broken (or abandoned after its deadline): closed here; the pass
            # reconnects its slot in the background.
            rec.invalidate(err)
            self._return_idle(rec)
            changes = Changes() if deadline.expired else hostset.failed(host.key, err)
        else:
            self._done(deadline)
            steering.log.debug(
                "pool %s: ping of %s answered in %.3fs",
                steering.pool_name,
                host.key,
                deadline.age(),
            )
            self._return_idle(rec)
            changes = hostset.succeeded(host.key, role)
        self._apply(changes)

    def _probe(self, host: Host) -> None:
        """Connect to ``host`` outside the pool, ask its role, close again."""
        steering = self._steering
        hostset = steering.hostset
        if hostset is None:
            return
        config = steering.config
        deadline = self._watch("probe", host.key, None)
        # The driver's own connect timeout, unless the user set one: the
        # deadline has counted the failures by then; this only ends the wait.
        timeout = max(1.0, config.health_check_timeout, config.connect_deadline)
        conn: Any = None
        try:
            conn = steering.probe(host, timeout)
            deadline.conn = conn  # the role query is watched too
            role = steering.ask_role(host.key, conn)
        except Exception as err:
            steering.log.debug("pool %s: probe of %s failed: %s", steering.pool_name, host.key, err)
            changes = Changes() if deadline.expired else hostset.failed(host.key, err)
        else:
            changes = hostset.succeeded(host.key, role)
        finally:
            self._done(deadline)
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        self._apply(changes)

    def _watch(self, what: str, key: str, conn: Any) -> Deadline:
        deadline = self._steering.watch(what, key, conn)  # the pool's one way to watch
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
