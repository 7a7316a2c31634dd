"""Host steering of one pool: which host each new connection goes to, and
what connecting teaches about the hosts.

:class:`Steering` owns the pool's :class:`~sqla_rebalance.hosts.HostSet` and
driver :class:`~sqla_rebalance.targets.Adapter`. Opening a connection inside
a checkout (or for the pass) goes:

1. the pool's connect hook (``_sa.wrap_creator``) calls :meth:`Steering.connect`;
2. it reserves the best host (:meth:`Steering.reserve`: least connections,
   counting connects in progress) and sets the connect's
   :class:`~sqla_rebalance.targets.Target`;
3. SQLAlchemy's creator runs the ``do_connect`` handlers, then the dialect's
   ``connect``, which ``targets`` points at that host. At the very first
   connect of a pool without ``hosts=`` the host list is learnt there, from
   the URL, and the host reserved then (``Target.seed``, a closure of this
   object);
4. the role is checked when it matters; a failure (or a wrong role) moves on
   to the next host, inside the same checkout;
5. the pool registers the connection and :meth:`Steering.settle` counts it
   as open instead of as connecting, in one step.

Steering never calls back into the pool. What it learns about the hosts
(a failure, a host up again, a role) is returned to the caller as
:class:`~sqla_rebalance.hosts.Changes` in a :class:`Report`, and the pool
turns them into signals and a rebalance. Deadlines missed on the worker
thread (a host that hangs, ``deadlines.py``) are queued here
(:meth:`Steering.take_pending`) for the next pass, which the one callable
given at construction, ``wake``, requests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine.interfaces import Dialect

from . import _sa, targets
from .config import PoolConfig
from .deadlines import Deadline
from .dns import Resolver
from .errors import ConfigurationError, NoHostAvailableError
from .hosts import STANDBY, UNKNOWN, Changes, Host, HostSet, parse_hosts
from .lifetime import state_of
from .stats import Counters

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.pool import ConnectionPoolEntry

    from .ledger import Ledger
    from .lifetime import ConnState

__all__ = ["Report", "Steering", "hosts_for"]

Creator = Callable[["ConnectionPoolEntry | None"], "DBAPIConnection"]


def hosts_for(config: PoolConfig, dialect: object) -> tuple[targets.Adapter | None, HostSet | None]:
    """Validate the host arguments: the driver adapter and host set of a pool,
    or ``(None, None)`` when it cannot steer connects (and need not)."""
    if not isinstance(dialect, Dialect):
        if config.hosts is not None:
            raise ConfigurationError(
                "hosts= needs a pool made by create_engine() (it points the dialect's "
                "connect at each host); a bare pool with a creator cannot be steered"
            )
        return None, None
    adapter = targets.adapter_for(dialect)
    specs = None
    if config.hosts is not None:
        specs = parse_hosts(config.hosts, adapter.default_port, adapter.paths)
    elif adapter.paths:
        return None, None  # one SQLite file: nothing to spread over
    resolver = None
    nameservers = config.dns_nameservers
    if nameservers is not None:
        if isinstance(nameservers, str):
            nameservers = [n for n in nameservers.split(",") if n.strip()]
        resolver = Resolver(nameservers)  # raises ConfigurationError when malformed
    targets.install(dialect)
    return adapter, HostSet(
        specs,
        target_role=config.target_role,
        resolver=resolver,
        dns_min_refresh=config.dns_min_refresh,
        dns_max_refresh=config.dns_max_refresh,
        unhealthy_threshold=config.unhealthy_threshold,
        health_check_interval=config.health_check_interval,
    )


class Report:
    """What one connect learnt about the hosts, for the pool to act on."""

    __slots__ = ("changes", "failed")

    def __init__(self) -> None:
        #: Host transitions, in order (each becomes signals and a rebalance).
        self.changes: list[Changes] = []
        #: A host failed: probe it at once (a pass now), so that a host that
        #: is really down is marked so within a few probe intervals.
        self.failed = False


class Steering:
    """Host choice, connects to a host, role checks and failure accounting of one pool."""

    def __init__(
        self,
        config: PoolConfig,
        adapter: targets.Adapter | None,
        hostset: HostSet | None,
        ledger: Ledger,
        counters: Counters,
        creator: Creator,
        log: Any,
        wake: Callable[[], None],
    ) -> None:
        #: The pool's settings; only ``hosts`` changes later (:meth:`set_hosts`).
        self.config = config
        self.pool_name = config.pool_name
        self.adapter = adapter
        #: None: the pool does not steer (one host it does not manage).
        self.hostset = hostset
        if hostset is not None:  # host events in the pool's log (echo_pool too)
            hostset.log = log
        self.log = log
        #: SQLAlchemy's creator, bypassing the pool's connect hook: for probes,
        #: whose connections belong to no record (``creator(None)``).
        self.creator = creator
        self._ledger = ledger
        self._counters = counters
        self._wake = wake
        #: Connects in progress per host, so that a burst of them spreads out.
        self._connecting: dict[str, int] = {}
        self._lock = threading.Lock()
        #: Hosts that cannot answer the role query (see :meth:`ask_role`).
        self._role_unanswerable: set[str] = set()
        self._unsteerable_warned = False
        #: Host changes from missed deadlines, applied by the next pass (signals
        #: must not run on the worker thread, which serves every pool).
        self._pending: deque[Changes] = deque()

    # -- choosing a host ----------------------------------------------------------
    def host_counts(self) -> dict[str, int]:
        """Open connections per host (not those about to leave), plus connects in progress."""
        counts = dict(self._connecting)
        for key, n in self._ledger.open_per_host().items():
            counts[key] = counts.get(key, 0) + n
        return counts

    def reserve(self, hostset: HostSet, tried: list[str]) -> Host | None:
        with self._lock:
            host = hostset.choose(self.host_counts(), tried)
            if host is not None:
                self._connecting[host.key] = self._connecting.get(host.key, 0) + 1
            return host

    def release(self, key: str) -> None:
        with self._lock:
            self._release_locked(key)

    def _release_locked(self, key: str) -> None:
        left = self._connecting.get(key, 0) - 1
        if left > 0:
            self._connecting[key] = left
        else:
            self._connecting.pop(key, None)

    def settle(self, key: str | None, rec: ConnectionPoolEntry, state: ConnState) -> None:
        """Count a new connection once: as open instead of as connecting (to
        host ``key``), in one step, so that a concurrent choice never sees it twice."""
        if key is None:  # not steered: never counted as connecting
            self._ledger.add(rec, state)
            return
        with self._lock:
            self._ledger.add(rec, state)
            self._release_locked(key)

    # -- connecting ---------------------------------------------------------------
    def connect(
        self,
        original: Callable[[ConnectionPoolEntry], DBAPIConnection],
        rec: ConnectionPoolEntry,
        report: Report,
    ) -> tuple[DBAPIConnection, str | None]:
        """Open ``rec``'s connection on the best host; on failure try the next
        one, so that the checkout sees no error while any healthy host remains.

        Returns the connection and its host key, reserved (the caller settles
        or releases it), or None for a connection this pool does not steer.
        """
        hostset = self.hostset
        if hostset is None:
            try:
                return original(rec), None
            except BaseException:
                self._counters.connect_failed()
                raise
        tried: list[str] = []
        last_error: BaseException | None = None
        rejected: list[str] = []
        while True:
            if hostset.seeded:
                if hostset.next_dns_refresh() == 0.0:
                    hostset.refresh_dns()  # names given by hosts=, never resolved yet
                host = self.reserve(hostset, tried)
                if host is None:
                    if last_error is not None:
                        raise last_error
                    raise NoHostAvailableError(
                        f"pool {self.pool_name}: no host can take a connection with "
                        f"target_role={self.config.target_role!r} "
                        f"({'; '.join(rejected) or hostset.describe() or 'no hosts'})"
                    )
                target = targets.Target(host, timeout=self.config.connect_deadline)
            else:
                target = targets.Target(
                    None, seed=self._seed(hostset, tried), timeout=self.config.connect_deadline
                )
            token = targets.current_target().set(target)
            # Watched from the start: a connect to a host that hangs makes it
            # suspect after health_check_timeout, so other connects avoid it
            # long before the driver's own timeout ends this one.
            deadline = self.watch("connect", target.host.key if target.host else None)
            try:
                dbapi_connection = original(rec)
            except Exception as err:
                deadline.finish()
                self._counters.connect_failed()
                if target.host is None:
                    raise
                self.release(target.host.key)
                tried.append(target.host.key)
                last_error = err
                if not deadline.expired:  # else already counted, once per timeout
                    self._failed(target.host.key, err, report)
                continue
            except BaseException:
                deadline.finish()
                if target.host is not None:
                    self.release(target.host.key)
                raise
            finally:
                targets.current_target().reset(token)
            deadline.finish()
            host = target.host
            if not target.applied or host is None:
                # A custom creator (not the dialect's connect), or a Unix
                # socket: this pool cannot steer its connects.
                if host is not None:
                    self.release(host.key)
                self._unsteerable(applied=target.applied)
                return dbapi_connection, None
            problem = self._check_role(hostset, host, dbapi_connection, tried, report)
            if problem is None:
                return dbapi_connection, host.key
            self.release(host.key)
            tried.append(host.key)
            rejected.append(problem)
            with contextlib.suppress(Exception):
                dbapi_connection.close()

    def _seed(
        self, hostset: HostSet, tried: list[str]
    ) -> Callable[[targets.Adapter, tuple[Any, ...], dict[str, Any]], Host | None]:
        """Learn the hosts from the first connect's arguments (the URL), then reserve one."""

        def seed(
            adapter: targets.Adapter, cargs: tuple[Any, ...], cparams: dict[str, Any]
        ) -> Host | None:
            if not hostset.seeded:
                hostset.seed(adapter.seed(cargs, cparams) or [])
            hostset.refresh_dns()  # the first connect needs the addresses
            if not len(hostset):
                return None
            return self.reserve(hostset, tried)

        return seed

    def _check_role(
        self,
        hostset: HostSet,
        host: Host,
        dbapi_connection: Any,
        tried: list[str],
        report: Report,
    ) -> str | None:
        """Record a successful connect, learning the host's role when it
        matters; return why the connection does not fit, or None."""
        want = self.config.target_role
        role = None
        if self.adapter is not None and (want != "any" or host.role == UNKNOWN):
            deadline = self.watch("role query", host.key, dbapi_connection)
            try:
                role = self.ask_role(host.key, dbapi_connection)
            except Exception as err:
                if not deadline.expired:
                    self._failed(host.key, err, report)
                return f"{host.key}: role check failed ({err})"
            finally:
                deadline.finish()
        report.changes.append(hostset.succeeded(host.key, role))
        if role is None or want in ("any", role):
            return None
        if want == "prefer-standby":
            if role == STANDBY:
                return None
            # A primary only when no standby (or host of unknown role) is left to try.
            if not hostset.may_be_standby(exclude=[*tried, host.key]):
                return None
            return f"{host.key} is a {role}, trying for a standby"
        return f"{host.key} is a {role}"

    def ask_role(self, key: str, dbapi_connection: Any) -> str | None:
        """The role of the server behind ``dbapi_connection``; raises if the
        connection does not work.

        With ``target_role="any"`` the role is only informational: a server
        that cannot answer the role query (no ``pg_is_in_recovery()`` or
        ``@@global.read_only``, no right to run it) is used all the same, its
        role unknown (None), and checked with ``SELECT 1`` from then on.
        """
        adapter = self.adapter
        if adapter is None:
            return None
        informational = self.config.target_role == "any"
        if informational and key in self._role_unanswerable:
            adapter.alive(dbapi_connection)
            return None
        try:
            return adapter.role(dbapi_connection)
        except Exception as err:
            if not informational:
                raise
            adapter.alive(dbapi_connection)  # raises: the connection itself is broken
            self._role_unanswerable.add(key)
            self.log.info(
                "pool %s: %s cannot answer the role query (%s); its role stays unknown",
                self.pool_name,
                key,
                str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__,
            )
            return None

    def probe(self, host: Host, timeout: float) -> DBAPIConnection:
        """A connection to ``host`` outside the pool (a health probe)."""
        target = targets.Target(host, timeout=timeout)
        token = targets.current_target().set(target)
        try:
            return self.creator(None)
        finally:
            targets.current_target().reset(token)

    def _unsteerable(self, applied: bool) -> None:
        self.hostset = None
        if applied or self._unsteerable_warned or self.config.hosts is None:
            return
        self._unsteerable_warned = True
        self.log.warning(
            "pool %s: hosts= is ignored: connections are made by a custom creator, "
            "not by the dialect's connect",
            self.pool_name,
        )

    def _failed(self, key: str, error: BaseException, report: Report) -> None:
        hostset = self.hostset
        if hostset is None:
            return
        self.log.info("pool %s: connect to %s failed: %s", self.pool_name, key, error)
        report.changes.append(hostset.failed(key, error))
        report.failed = True

    # -- deadlines (``deadlines.py``) -------------------------------------------------
    def watch(self, what: str, host: str | None, conn: Any = None) -> Deadline:
        """Watch a network operation to ``host``."""
        return Deadline(what, host, self.config.health_check_timeout, self._missed, conn)

    def _missed(self, deadline: Deadline) -> None:
        """A watched operation is still running past its deadline (worker thread:
        bookkeeping only; the signals follow in this pool's next pass)."""
        hostset = self.hostset
        if hostset is None or deadline.host is None:
            return
        err = deadline.error()
        if deadline.misses == 1:
            self.log.warning("pool %s: %s", self.pool_name, err)
        self._pending.append(hostset.failed(deadline.host, err))
        self._wake()

    def take_pending(self) -> Iterator[Changes]:
        """The host changes of missed deadlines, oldest first (for the pass)."""
        while self._pending:
            yield self._pending.popleft()

    # -- the host list ----------------------------------------------------------------
    def set_hosts(self, hosts: Any) -> Changes:
        """Replace the host list (same forms as ``hosts=``); :meth:`resolve` the
        names new to it next."""
        hostset, adapter = self.hostset, self.adapter
        if hostset is None or adapter is None:
            raise ConfigurationError(
                f"pool {self.pool_name} does not manage hosts (a Unix socket, one SQLite "
                "file, or a custom creator)"
            )
        specs = parse_hosts(hosts, adapter.default_port, adapter.paths)
        self.config = dataclasses.replace(self.config, hosts=hosts)
        return hostset.replace(specs)

    def dns_due(self, now: float) -> bool:
        hostset = self.hostset
        return hostset is not None and hostset.seeded and hostset.next_dns_refresh() <= now

    def resolve(self, force: bool = False) -> Changes:
        """Re-resolve the names whose TTL ran out (all of them with ``force``). Blocks."""
        hostset = self.hostset
        if hostset is None or not hostset.seeded:
            return Changes()
        return hostset.refresh_dns(force=force)

    def host_keys(self, host: str, open_hosts: Iterable[str]) -> set[str]:
        """The host keys ``host`` stands for: a key (``address:port``), an
        address, a name, or ``name:port``, as given in ``hosts=`` or the URL."""
        keys = {host}
        hostset = self.hostset
        if hostset is not None:
            for h in hostset.hosts():
                names = {h.key, h.name, h.address, f"{h.name}:{h.port}" if h.port else h.name}
                if host in names:
                    keys.add(h.key)
        for key in open_hosts:
            if key.rsplit(":", 1)[0] == host:
                keys.add(key)
        return keys

    def recheck(self) -> None:
        """Check every host and re-resolve every name at the next pass (never here:
        the caller may be an event loop, or the bus listener)."""
        hostset = self.hostset
        if hostset is not None and hostset.seeded:
            hostset.check_all_now()
            hostset.expire_dns()

    def disconnected(self, connection: Any, exception: BaseException | None, checkin: bool) -> bool:
        """A disconnect error on a checked-out ``connection``: with several hosts,
        it concerns one host. Soft-invalidate that host's other connections
        (never closed while in use; the idle ones are replaced by the pass),
        invalidate this one, and check the host at once. False (nothing done)
        when the pool does not steer several hosts: SQLAlchemy's own pool-wide
        invalidation applies then."""
        hostset = self.hostset
        rec = _sa.fairy_record(connection)
        state = state_of(rec) if rec is not None else None
        if (
            rec is None
            or hostset is None
            or len(hostset) < 2
            or state is None
            or hostset.get(state.host) is None
        ):
            return False
        for other in self._ledger.others_on(state.host, rec):
            other.invalidate(exception, soft=True)
        if checkin and getattr(connection, "is_valid", False):
            connection.invalidate(exception)
        hostset.suspect(state.host)
        self._wake()
        return True

    def failure_of(self, key: str) -> dict[str, str | None]:
        """Why ``key`` failed last (the ``reason`` and ``error`` of host signals)."""
        hostset = self.hostset
        host = hostset.get(key) if hostset is not None else None
        if host is None:
            return {"reason": None, "error": None}
        return {"reason": host.failure_reason, "error": host.last_error}

    def after_fork(self) -> None:
        self._connecting = {}
        self._lock = threading.Lock()
        self._pending = deque()
        if self.hostset is not None:
            self.hostset.after_fork()
