"""``RebalancingQueuePool``: a drop-in ``QueuePool`` with jittered lifetimes,
background replacement and graceful recycling.

How it stays within a few percent of ``QueuePool`` on the checkout path:

- Checkout is not overridden at all. Each connection's jittered deadline is
  folded into SQLAlchemy's own recycle comparison by moving the record's
  ``starttime`` back by ``pool_recycle - lifetime`` (clamped so it never
  crosses an invalidation mark, see ``_sa.clamp_starttime``). That check is a
  safety net: the worker normally replaces an idle connection *before* its
  deadline, so no checkout pays a lifetime reconnect.
- Checkin adds one dict membership test: is this record marked to retire?
  The maintenance worker marks in-use connections that are due (lifetime
  reached, recycle requested) after it has opened a spare to take their
  place; the checkin swaps the spare in and hands the old connection to the
  worker to close. Nothing is closed on the request path.

Everything else (opening, closing, scanning, sizing) happens in the
maintenance worker (``worker.py``), off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import event
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool
from sqlalchemy.pool.base import _AsyncConnDialect
from sqlalchemy.util import queue as sqla_queue

from . import _sa, signals, targets
from .bus import open_bus
from .bus.base import Bus
from .bus.listener import Listener
from .bus.listener import attach as attach_listener
from .bus.listener import detach as detach_listener
from .bus.message import Command
from .checks import HostChecks, abandon_if_unhealthy
from .config import DEFAULT_HEALTH_CHECK_INTERVAL, PoolConfig
from .deadlines import Deadline
from .dns import Resolver
from .errors import ConfigurationError, InsecureBroadcastWarning, NoHostAvailableError
from .executor import Executor
from .hosts import STANDBY, UNKNOWN, Changes, Host, HostSet, parse_hosts
from .lifetime import (
    INFO_KEY,
    ConnState,
    draw_lifetime,
    replacement_lead,
    schedule_replacements,
    state_of,
)
from .stats import (
    DISPOSE,
    ERROR,
    HOST_DOWN,
    IDLE,
    LIFETIME,
    MANUAL,
    OVERFLOW,
    RETIREMENT_REASONS,
    SIGNAL,
    BusStats,
    Counters,
    HostStats,
    PoolStats,
)
from .worker import MAX_SLEEP, get_worker

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection

try:  # greenlet identifies "who is connecting" inside an asyncio event loop
    from greenlet import getcurrent as _getcurrent
except ImportError:  # pragma: no cover - greenlet is present wherever asyncio pools are
    _getcurrent = None

__all__ = ["AsyncRebalancingQueuePool", "RebalancingQueuePool"]

#: Where the bus secret is read from when ``broadcast_secret`` is not given.
SECRET_ENV = "SQLA_REBALANCE_SECRET"

#: Seconds between create_engine() and the first background prefill.
_PREFILL_DELAY = 0.1

# Retry delays (s) for background connects that fail: exponential, full jitter.
_BACKOFF_MIN = 0.5
_BACKOFF_MAX = 30.0

#: Longest ``spread`` a recycle may ask for (one day, as for a cluster-wide command).
_MAX_SPREAD = 86400.0

#: Background connects of one pool running at once (a pass waits for one at a
#: time; one it stopped waiting for, on a hung host, may still be running).
_CONNECT_CAP = 3
#: A connection whose background connect the pass stopped waiting for, and
#: that connected later, is used by the next pass (its arrival requests one)
#: within this many seconds, or closed: the need for it is gone.
_FRESH_MAX_AGE = 1.0


def _describe_host(dbapi_connection: Any) -> str:
    """``host:port`` of a DBAPI connection, as the driver reports it."""
    drv = getattr(dbapi_connection, "driver_connection", None) or dbapi_connection
    info = getattr(drv, "info", None)  # psycopg
    host = getattr(info, "host", None)
    port = getattr(info, "port", None)
    if host is None:  # pymysql, mysqlclient
        host = getattr(drv, "host", None)
        port = getattr(drv, "port", None)
    if not host or not isinstance(host, str):
        return "local"
    return f"{host}:{port}" if port else host


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


def _checked_in(rec: ConnectionPoolEntry) -> bool:
    """Read ``in_use`` again (another thread may have checked ``rec`` in)."""
    return not rec.in_use


class RebalancingQueuePool(QueuePool):
    """A :class:`~sqlalchemy.pool.QueuePool` that keeps its connections fresh
    without ever making a request wait for it.

    Use it with ``create_engine(url, poolclass=RebalancingQueuePool, ...)``;
    every argument below can be passed to ``create_engine`` by name.

    :param recycle_jitter: fraction in ``[0, 1)``. Each connection lives a
      lifetime drawn uniformly in ``[pool_recycle * (1 - jitter), pool_recycle]``
      seconds. Default 0.2 when ``pool_recycle`` is set; giving it without
      ``pool_recycle`` is an error.
    :param min_size: connections to open in the background at start and to
      keep open (default 0, like ``QueuePool``).
    :param max_idle: seconds; idle connections above ``min_size`` that were
      not needed for this long are closed (default None: never, like
      ``QueuePool``).
    :param pool_name: name used in stats, logs and cluster-wide commands
      (default ``"default"``).
    :param hosts: the hosts to spread connections over, ``"name:port"``
      strings; a nested list is a lower-priority tier, used only while no host
      of a better tier is healthy. Default: the URL's host(s). Every DNS name
      stands for all its A/AAAA records.
    :param target_role: ``"any"`` (default), ``"primary"``, ``"standby"`` or
      ``"prefer-standby"``; checked on each connect and by health checks.
    :param dns_nameservers: ``["ip:port", ...]`` or a dnspython ``Resolver``
      (default: the system's resolver configuration).
    :param dns_min_refresh: seconds; names are re-resolved when their TTL runs
      out, but not more often than this (default 1).
    :param dns_max_refresh: seconds; ... and at least this often (default 60).
    :param health_check_interval: seconds between checks of each host (a
      query on one of its idle connections, or a connect probe when it has
      none idle or it failed). None checks only hosts that failed. Default 1.
    :param health_check_timeout: seconds a health check, role query or
      connect may go unanswered; each such period counts as one failure of
      the host ("deadline exceeded"), so a host that hangs is suspect after
      one and down after ``unhealthy_threshold`` of them. Default 1.
    :param connect_deadline: the driver's connect timeout for connections
      the pool opens, when the URL or ``connect_args`` set none (libpq would
      wait forever). Default 5.
    :param unhealthy_threshold: consecutive failures that mark a host down
      (default 3).
    :param rebalance_spread: seconds over which a rebalance moves connections
      (default 1).
    :param broadcast: a bus URL (``redis://...``, ``postgresql://...``,
      ``sqlite:///path``) or a :class:`sqla_rebalance.bus.Bus`: the pool then
      obeys cluster-wide ``recycle``/``rebalance``/``refresh``/``drain``
      commands sent there (``sqla-rebalance recycle --bus URL``). Default None.
    :param broadcast_secret: the HMAC key that commands must be signed with
      (str or bytes). Default: ``$SQLA_REBALANCE_SECRET``; without either the
      pool warns and accepts unsigned commands.
    :param min_recycle_interval: seconds; the pool applies at most one batch
      of cluster-wide commands per interval, coalescing the rest (default 10).
    """

    _is_asyncio = False
    #: Log under SQLAlchemy's pool logger (``sqlalchemy.pool``, ``echo_pool``),
    #: as every pool class of SQLAlchemy does, not under this package's name.
    _sqla_logger_namespace = "sqlalchemy.pool.impl.RebalancingQueuePool"

    #: Reasons accepted by :meth:`recycle`.
    recycle_reasons: ClassVar[tuple[str, ...]] = RETIREMENT_REASONS

    def __init__(
        self,
        creator: Any,
        pool_size: int = 5,
        max_overflow: int = 10,
        timeout: float = 30.0,
        use_lifo: bool = False,
        recycle_jitter: float | None = None,
        min_size: int = 0,
        max_idle: float | None = None,
        pool_name: str | None = None,
        hosts: Any = None,
        target_role: str | None = None,
        dns_nameservers: Any = None,
        dns_min_refresh: float | None = None,
        dns_max_refresh: float | None = None,
        health_check_interval: float | None = DEFAULT_HEALTH_CHECK_INTERVAL,
        unhealthy_threshold: int | None = None,
        rebalance_spread: float | None = None,
        broadcast: Any = None,
        broadcast_secret: str | bytes | None = None,
        min_recycle_interval: float | None = None,
        health_check_timeout: float | None = None,
        connect_deadline: float | None = None,
        **kw: Any,
    ) -> None:
        recreated = kw.pop("_recreated", False)
        self._config = PoolConfig.build(
            pool_size=pool_size,
            max_overflow=max_overflow,
            timeout=timeout,
            recycle=kw.get("recycle", -1),
            recycle_jitter=recycle_jitter,
            min_size=min_size,
            max_idle=max_idle,
            pool_name=pool_name,
            hosts=hosts,
            target_role=target_role,
            dns_nameservers=dns_nameservers,
            dns_min_refresh=dns_min_refresh,
            dns_max_refresh=dns_max_refresh,
            health_check_interval=health_check_interval,
            health_check_timeout=health_check_timeout,
            connect_deadline=connect_deadline,
            unhealthy_threshold=unhealthy_threshold,
            rebalance_spread=rebalance_spread,
            broadcast=broadcast,
            min_recycle_interval=min_recycle_interval,
        )
        self._bus, self._bus_secret = self._build_bus(broadcast, broadcast_secret, recreated)
        self._broadcast_secret_arg = broadcast_secret
        self._hostset = self._build_hostset(kw.get("dialect"))
        super().__init__(
            creator,
            pool_size=pool_size,
            max_overflow=max_overflow,
            timeout=timeout,
            use_lifo=use_lifo,
            **kw,
        )
        if self._hostset is not None:  # host events in the pool's log (echo_pool too)
            self._hostset.log = self.logger
        self._counters = Counters()
        # Our bookkeeping hooks, on this pool itself rather than on the class:
        # class-level listeners are global state that ``Pool.dispatch._clear()``
        # (SQLAlchemy's own test teardown) wipes for every pool of the process.
        # ``recreate()`` copies them along with the user's: listen once.
        for identifier, listener in _BOOKKEEPING:
            if listener not in getattr(self.dispatch, identifier):
                event.listen(self, identifier, listener)
        #: Every open connection we manage, by record.
        self._states: dict[ConnectionPoolEntry, ConnState] = {}
        #: Checked-out records to retire at checkin: the reason, and the state
        #: of the connection meant (a record is reused when it reconnects).
        self._doomed: dict[ConnectionPoolEntry, tuple[str, ConnState | None]] = {}
        #: Open connections waiting to take the place of a doomed one.
        self._spares: list[ConnectionPoolEntry] = []
        #: Doomed records handed over by checkin: (record, reason, slot_empty).
        self._retiring: deque[tuple[ConnectionPoolEntry, str, bool]] = deque()
        self._lead = replacement_lead(self._config.recycle) if self._config.recycle > 0 else 0.0
        #: Moving average of how long a background connect takes (seconds).
        self._connect_time = 0.01
        self._next_due = 0.0
        #: Set by whoever pokes the worker for this pool; a pass that is
        #: running meanwhile must not overwrite the request with its own plan.
        self._wake = False
        self._disposed = False
        self._disposing = False
        #: Threads (greenlets for asyncio) doing this pool's background work:
        #: connects made there are not counted as checkouts that waited.
        self._bg_tokens: set[object] = set()
        #: This pool's own threads for whatever may block (``executor.py``).
        self._executor = Executor(f"pool-{self._config.pool_name}")
        # A pool dropped without dispose() lets its idle threads go at once.
        weakref.finalize(self, self._executor.close)
        self._pass_inflight = False
        self._async_inflight = False
        #: Keys of jobs running in the event loop (asyncio pools), and their tasks.
        self._async_jobs: set[str] = set()
        self._async_tasks: set[asyncio.Future[Any]] = set()
        #: Health checks in flight, each under a deadline.
        self._checks = HostChecks(self)
        #: Host changes from missed deadlines, applied by the next pass (signals
        #: must not run on the worker thread, which serves every pool).
        self._pending_changes: deque[Changes] = deque()
        #: Background connects that finished after the pass stopped waiting:
        #: (when, record), taken by the next connect the pool wants.
        self._fresh: list[tuple[float, ConnectionPoolEntry]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backoff = 0.0
        self._retry_at = 0.0
        self._idle_window_start = time.time()
        self._idle_window_min: int | None = None
        #: The connection whose replacement the worker is opening.
        self._replacing: ConnState | None = None
        #: Connects in progress per host, so that a burst of them spreads out.
        self._connecting: dict[str, int] = {}
        #: Hosts that cannot answer the role query (see ``_ask_role``).
        self._role_unanswerable: set[str] = set()
        self._choose_lock = threading.Lock()
        self._rebalance_requested = False
        self._unsteerable_warned = False
        self._invoke_original = _sa.wrap_creator(self, self._connect)
        #: Cluster-wide commands: the listener this pool is attached to, and
        #: the process it was attached in (a forked child attaches again).
        self._listener: Listener | None = None
        self._listener_pid = 0
        #: drain(): no background connect until the application connects again.
        self._drained = False
        self._drain_requested = False
        # Prefill at once for a new engine; a pool made by recreate() (that
        # is, by Engine.dispose(), often called at shutdown) waits for its
        # first connection before opening min_size more.
        if self._config.min_size > 0 and not recreated:
            # A moment's grace: event listeners added right after create_engine()
            # (a do_connect that supplies the password, say) see the prefill.
            self._next_due = time.time() + _PREFILL_DELAY
            get_worker().register(self)
        if self._bus is not None and not recreated:
            self._attach_bus()

    # -- configuration -----------------------------------------------------
    @property
    def config(self) -> PoolConfig:
        """The validated settings of this pool."""
        return self._config

    @property
    def pool_name(self) -> str:
        return self._config.pool_name

    def recreate(self) -> RebalancingQueuePool:
        """Called by ``Engine.dispose()``: a new, empty pool with the same settings."""
        self.logger.info("Pool recreating")
        c = self._config
        return self.__class__(
            self._creator,
            recycle_jitter=c.recycle_jitter_arg,
            min_size=c.min_size,
            max_idle=c.max_idle,
            pool_name=c.pool_name_arg,
            hosts=c.hosts,
            target_role=c.target_role,
            dns_nameservers=c.dns_nameservers,
            dns_min_refresh=c.dns_min_refresh,
            dns_max_refresh=c.dns_max_refresh,
            health_check_interval=c.health_check_interval,
            health_check_timeout=c.health_check_timeout,
            connect_deadline=c.connect_deadline,
            unhealthy_threshold=c.unhealthy_threshold,
            rebalance_spread=c.rebalance_spread,
            broadcast=c.broadcast,
            broadcast_secret=self._broadcast_secret_arg,
            min_recycle_interval=c.min_recycle_interval,
            _recreated=True,
            **_sa.recreate_kwargs(self),
        )

    # -- connect hook (runs in whichever thread opens the connection) --------
    def _token(self) -> object:
        if self._is_asyncio and _getcurrent is not None:
            return _getcurrent()
        return threading.get_ident()

    def _connect(
        self,
        original: Callable[[ConnectionPoolEntry], DBAPIConnection],
        rec: ConnectionPoolEntry,
    ) -> DBAPIConnection:
        background = self._token() in self._bg_tokens
        hostset = self._hostset
        if hostset is None:
            try:
                dbapi_connection = original(rec)
            except BaseException:
                self._counters.connect_failed()
                raise
            self._register(rec, dbapi_connection, None, background)
            return dbapi_connection
        dbapi_connection, host_key = self._connect_to_host(original, rec, hostset)
        try:
            self._register(rec, dbapi_connection, host_key, background)
        except BaseException:
            if host_key is not None:
                self._release(host_key)
            raise
        return dbapi_connection

    def _register(
        self,
        rec: ConnectionPoolEntry,
        dbapi_connection: DBAPIConnection,
        host_key: str | None,
        background: bool,
    ) -> None:
        cfg = self._config
        started = _sa.starttime(rec)  # set by SQLAlchemy just before the connect
        self._connect_time += 0.3 * (max(0.0, time.time() - started) - self._connect_time)
        deadline = None
        if cfg.recycle > 0:
            deadline = started + draw_lifetime(cfg.recycle, cfg.recycle_jitter)
            # An invalidation that came while connecting must keep applying
            # to this connection: leave starttime alone then.
            if started > _sa.invalidation_floor(self, rec):
                _sa.set_starttime(rec, _sa.clamp_starttime(self, rec, deadline - cfg.recycle))
        state = ConnState(
            self, dbapi_connection, host_key or _describe_host(dbapi_connection), started, deadline
        )
        rec.info[INFO_KEY] = state
        if host_key is None:
            self._states[rec] = state
        else:
            # Counted once: as open instead of as connecting, in one step, so
            # that a concurrent choice never sees it twice.
            with self._choose_lock:
                self._states[rec] = state
                self._release_locked(host_key)
        self._counters.connected(background)
        if not background:
            self._drained = False  # the application needs connections again
        if self._is_asyncio and self._loop is None:
            with contextlib.suppress(RuntimeError):  # no running loop: not async after all
                self._loop = asyncio.get_running_loop()
                # Maintenance could not run before the loop was known.
                self._request_pass()
        self._ensure_registered()
        if signals.connection_opened.receivers:
            signals.emit(
                signals.connection_opened,
                self,
                host=state.host,
                background=background,
                connection_id=state.serial,
                connected_at=state.connected_at,
            )

    # -- cluster-wide commands ---------------------------------------------------
    def _build_bus(
        self, broadcast: Any, secret: str | bytes | None, recreated: bool
    ) -> tuple[Bus | None, bytes | None]:
        """Validate ``broadcast`` and its secret (connects to nothing)."""
        if broadcast is None:
            if secret is not None:
                raise ConfigurationError("broadcast_secret is set but broadcast is not")
            return None, None
        bus = open_bus(broadcast)
        if secret is None:
            secret = os.environ.get(SECRET_ENV) or None
        if isinstance(secret, str):
            secret = secret.encode()
        if secret is not None and (not isinstance(secret, bytes) or not secret):
            raise ConfigurationError("broadcast_secret must be a non-empty string or bytes")
        if secret is None and not recreated:
            warnings.warn(
                f"pool {self._config.pool_name}: broadcast={bus.display_url} without "
                f"broadcast_secret (or ${SECRET_ENV}): anyone who can publish on the bus "
                "can recycle this pool, and unsigned commands are accepted",
                InsecureBroadcastWarning,
                stacklevel=4,
            )
        return bus, secret

    def _attach_bus(self) -> None:
        bus = self._bus
        if bus is None or self._disposed:
            return
        if self._listener is not None and self._listener_pid == os.getpid():
            return
        self._listener = attach_listener(self, bus, self._bus_secret)
        self._listener_pid = os.getpid()

    @property
    def listener(self) -> Listener | None:
        """The bus listener this pool is attached to (None without ``broadcast``)."""
        return self._listener if self._listener_pid == os.getpid() else None

    def _apply_command(self, command: Command, cutoff: float) -> None:
        """Carry out a cluster-wide command (called by the bus listener).

        ``cutoff``: connections opened after it are left alone by a recycle;
        they were opened after the command was issued, so they are already
        what the command asks for.
        """
        self.logger.info("pool %s: command %d: %s", self.pool_name, command.gen, command.describe())
        action = command.action
        if action == "recycle":
            self._mark_recycle(command.host, command.spread, SIGNAL, before=cutoff)
        elif action == "rebalance":
            self.rebalance()
        elif action == "refresh":
            self.refresh()
        elif action == "drain":
            self.drain()

    # -- hosts -------------------------------------------------------------------
    def _build_hostset(self, dialect: object) -> HostSet | None:
        """Validate the host arguments; None when this pool cannot steer connects."""
        cfg = self._config
        self._adapter: targets.Adapter | None = None
        if not isinstance(dialect, Dialect):
            if cfg.hosts is not None:
                raise ConfigurationError(
                    "hosts= needs a pool made by create_engine() (it points the dialect's "
                    "connect at each host); a bare pool with a creator cannot be steered"
                )
            return None
        adapter = targets.adapter_for(dialect)
        specs = None
        if cfg.hosts is not None:
            specs = parse_hosts(cfg.hosts, adapter.default_port, adapter.paths)
        elif adapter.paths:
            return None  # one SQLite file: nothing to spread over
        resolver = None
        nameservers = cfg.dns_nameservers
        if nameservers is not None:
            if isinstance(nameservers, str):
                nameservers = [n for n in nameservers.split(",") if n.strip()]
            resolver = Resolver(nameservers)  # raises ConfigurationError when malformed
        self._adapter = adapter
        targets.install(dialect)
        return HostSet(
            specs,
            target_role=cfg.target_role,
            resolver=resolver,
            dns_min_refresh=cfg.dns_min_refresh,
            dns_max_refresh=cfg.dns_max_refresh,
            unhealthy_threshold=cfg.unhealthy_threshold,
            health_check_interval=cfg.health_check_interval,
        )

    @property
    def hostset(self) -> HostSet | None:
        """The hosts this pool spreads over (None: one host, not managed)."""
        return self._hostset

    def _host_counts(self) -> dict[str, int]:
        """Open connections per host, not counting those about to leave, plus
        connects in progress."""
        counts = dict(self._connecting)
        # Those on their way out: marked to retire at checkin, or being replaced
        # right now (so that a replacement on a tied host keeps hosts even).
        leaving = {id(mark[1]) for mark in list(self._doomed.values())}
        replacing = self._replacing
        for state in list(self._states.values()):
            if (
                state.closed
                or state.retire_at is not None
                or state is replacing
                or id(state) in leaving
            ):
                continue
            counts[state.host] = counts.get(state.host, 0) + 1
        return counts

    def _reserve(self, hostset: HostSet, tried: list[str]) -> Host | None:
        with self._choose_lock:
            host = hostset.choose(self._host_counts(), tried)
            if host is not None:
                self._connecting[host.key] = self._connecting.get(host.key, 0) + 1
            return host

    def _release(self, key: str) -> None:
        with self._choose_lock:
            self._release_locked(key)

    def _release_locked(self, key: str) -> None:
        left = self._connecting.get(key, 0) - 1
        if left > 0:
            self._connecting[key] = left
        else:
            self._connecting.pop(key, None)

    def _seed_hosts(
        self, hostset: HostSet, tried: list[str]
    ) -> Callable[[targets.Adapter, tuple[Any, ...], dict[str, Any]], Host | None]:
        def seed(
            adapter: targets.Adapter, cargs: tuple[Any, ...], cparams: dict[str, Any]
        ) -> Host | None:
            if not hostset.seeded:
                hostset.seed(adapter.seed(cargs, cparams) or [])
            hostset.refresh_dns()  # the first connect needs the addresses
            if not len(hostset):
                return None
            return self._reserve(hostset, tried)

        return seed

    def _connect_to_host(
        self,
        original: Callable[[ConnectionPoolEntry], DBAPIConnection],
        rec: ConnectionPoolEntry,
        hostset: HostSet,
    ) -> tuple[DBAPIConnection, str | None]:
        """Connect to the best host; on failure try the next one, so the
        checkout sees no error while any healthy host remains.

        Returns the connection and its host key, reserved in ``_connecting``
        (the caller releases it once the connection is registered).
        """
        tried: list[str] = []
        last_error: BaseException | None = None
        rejected: list[str] = []
        while True:
            if hostset.seeded:
                if hostset.next_dns_refresh() == 0.0:
                    hostset.refresh_dns()  # names given by hosts=, never resolved yet
                host = self._reserve(hostset, tried)
                if host is None:
                    if last_error is not None:
                        raise last_error
                    raise NoHostAvailableError(
                        f"pool {self.pool_name}: no host can take a connection with "
                        f"target_role={self._config.target_role!r} "
                        f"({'; '.join(rejected) or hostset.describe() or 'no hosts'})"
                    )
                target = targets.Target(host, timeout=self._config.connect_deadline)
            else:
                target = targets.Target(
                    None,
                    seed=self._seed_hosts(hostset, tried),
                    timeout=self._config.connect_deadline,
                )
            token = targets.current_target().set(target)
            # Watched from the start: a connect to a host that hangs makes it
            # suspect after health_check_timeout, so other connects avoid it
            # long before the driver's own timeout ends this one.
            deadline = self._watch("connect", target.host.key if target.host else None)
            try:
                dbapi_connection = original(rec)
            except Exception as err:
                deadline.finish()
                self._counters.connect_failed()
                if target.host is None:
                    raise
                self._release(target.host.key)
                tried.append(target.host.key)
                last_error = err
                if not deadline.expired:  # else already counted, once per timeout
                    self._host_failed(target.host.key, err)
                continue
            except BaseException:
                deadline.finish()
                if target.host is not None:
                    self._release(target.host.key)
                raise
            finally:
                targets.current_target().reset(token)
            deadline.finish()
            host = target.host
            if not target.applied or host is None:
                # A custom creator (not the dialect's connect), or a Unix
                # socket: this pool cannot steer its connects.
                if host is not None:
                    self._release(host.key)
                self._unsteerable(applied=target.applied)
                return dbapi_connection, None
            problem = self._check_role(hostset, host, dbapi_connection, tried)
            if problem is None:
                return dbapi_connection, host.key
            self._release(host.key)
            tried.append(host.key)
            rejected.append(problem)
            with contextlib.suppress(Exception):
                dbapi_connection.close()

    def _check_role(
        self, hostset: HostSet, host: Host, dbapi_connection: Any, tried: list[str]
    ) -> str | None:
        """Record a successful connect, learning the host's role when it
        matters; return why the connection does not fit, or None."""
        want = self._config.target_role
        role = None
        if self._adapter is not None and (want != "any" or host.role == UNKNOWN):
            deadline = self._watch("role query", host.key, dbapi_connection)
            try:
                role = self._ask_role(host.key, dbapi_connection)
            except Exception as err:
                if not deadline.expired:
                    self._host_failed(host.key, err)
                return f"{host.key}: role check failed ({err})"
            finally:
                deadline.finish()
        self._apply_changes(hostset.succeeded(host.key, role))
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

    def _ask_role(self, key: str, dbapi_connection: Any) -> str | None:
        """The role of the server behind ``dbapi_connection``; raises if the
        connection does not work.

        With ``target_role="any"`` the role is only informational: a server
        that cannot answer the role query (no ``pg_is_in_recovery()`` or
        ``@@global.read_only``, no right to run it) is used all the same, its
        role unknown (None), and checked with ``SELECT 1`` from then on.
        """
        adapter = self._adapter
        if adapter is None:
            return None
        informational = self._config.target_role == "any"
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
            self.logger.info(
                "pool %s: %s cannot answer the role query (%s); its role stays unknown",
                self.pool_name,
                key,
                str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__,
            )
            return None

    def _unsteerable(self, applied: bool) -> None:
        self._hostset = None
        if applied or self._unsteerable_warned or self._config.hosts is None:
            return
        self._unsteerable_warned = True
        self.logger.warning(
            "pool %s: hosts= is ignored: connections are made by a custom creator, "
            "not by the dialect's connect",
            self.pool_name,
        )

    def _invalidate(
        self,
        connection: Any,
        exception: BaseException | None = None,
        _checkin: bool = True,
    ) -> None:
        """A disconnect error on ``connection``.

        SQLAlchemy then marks *every* connection of the pool stale, to be
        reconnected at its next checkout: right for one server, but with
        several hosts one failing host would make the pool drop its healthy
        connections to all the others. Here only the failing host's
        connections are marked (soft-invalidated: never closed while in use;
        the idle ones are replaced in the background), and the host is
        checked at once.
        """
        hostset = self._hostset
        rec = getattr(connection, "_connection_record", None)
        state = state_of(rec) if rec is not None else None
        if hostset is None or len(hostset) < 2 or state is None or hostset.get(state.host) is None:
            _sa.pool_invalidate(self, connection, exception, _checkin)
            return
        for other, other_state in list(self._states.items()):
            if (
                other_state.host == state.host
                and other is not rec
                and not other_state.closed
                and other.dbapi_connection is other_state.dbapi  # not reconnected meanwhile
            ):
                other.invalidate(exception, soft=True)
        if _checkin and getattr(connection, "is_valid", False):
            connection.invalidate(exception)
        hostset.suspect(state.host)
        self._request_pass()

    def _host_failed(self, key: str, error: BaseException) -> None:
        hostset = self._hostset
        if hostset is None:
            return
        self.logger.info("pool %s: connect to %s failed: %s", self.pool_name, key, error)
        self._apply_changes(hostset.failed(key, error))
        # Probe it at once: a host that is really down is marked so within
        # a few probe intervals, not after three more user requests.
        self._request_pass()

    @staticmethod
    def _failure_of(hostset: HostSet | None, key: str) -> dict[str, str | None]:
        host = hostset.get(key) if hostset is not None else None
        if host is None:
            return {"reason": None, "error": None}
        return {"reason": host.failure_reason, "error": host.last_error}

    def _apply_changes(self, changes: Changes) -> None:
        """Signals, and a rebalance, after hosts changed (any thread)."""
        if not changes:
            return
        hostset = self._hostset
        for key in changes.suspect:
            if signals.host_suspect.receivers:
                signals.emit(signals.host_suspect, self, host=key, **self._failure_of(hostset, key))
        for key in changes.down:
            if signals.host_down.receivers:
                signals.emit(signals.host_down, self, host=key, **self._failure_of(hostset, key))
        for key in changes.up:
            if signals.host_up.receivers:
                signals.emit(signals.host_up, self, host=key)
        if (changes.added or changes.removed) and signals.hosts_changed.receivers:
            signals.emit(signals.hosts_changed, self, added=changes.added, removed=changes.removed)
        self._rebalance_requested = True
        self._request_pass()

    # -- checkin: the only hot-path override ---------------------------------
    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        if record in self._doomed:
            self._retire_at_checkin(record)
        else:
            _sa.queue_pool_return(self, record)

    def _retire_at_checkin(self, record: ConnectionPoolEntry) -> None:
        # May run in a garbage-collector callback: no blocking, no plain Lock,
        # no I/O. The worker closes the old connection.
        mark = self._doomed.pop(record, None)
        if mark is None or mark[1] is not state_of(record) or self._pool.full():
            # Unmarked meanwhile (pinned), reconnected since it was marked (the
            # mark was for its previous connection), or an overflow connection
            # that QueuePool closes at checkin anyway: the spare stays for another.
            _sa.queue_pool_return(self, record)
            return
        reason = mark[0]
        try:
            spare = self._spares.pop()
        except IndexError:
            spare = None
        if spare is not None:
            _sa.queue_pool_return(self, spare)
        self._retiring.append((record, reason, spare is None))
        self._request_pass()

    def _request_pass(self) -> None:
        """Ask for a maintenance pass now (safe from any thread and GC callbacks)."""
        self._wake = True
        self._next_due = 0.0
        get_worker().poke()

    def _ensure_registered(self) -> None:
        if self._bus is not None and self._listener_pid != os.getpid():
            self._attach_bus()
        worker = get_worker()
        if not self._disposed and not worker.is_registered(self):
            worker.register(self)
        else:
            worker.ensure_running()

    # -- public operations ---------------------------------------------------
    def recycle(self, host: str | None = None, spread: float = 0.0, reason: str = MANUAL) -> int:
        """Gracefully replace the pool's connections; return how many were marked.

        Idle connections are replaced in the background, each at a moment
        drawn uniformly in ``[now, now + spread]`` seconds; connections in use
        are closed at checkin once their moment has come, never while in
        use. Pinned connections are left alone. ``host`` limits the recycle
        to the connections of one host (as shown in :meth:`stats`).
        """
        if (
            isinstance(spread, bool)
            or not isinstance(spread, (int, float))
            or not 0.0 <= spread <= _MAX_SPREAD  # False for nan too
        ):
            raise ValueError(
                f"spread must be a number of seconds in [0, {_MAX_SPREAD:g}], got {spread!r}"
            )
        if host is not None and (not isinstance(host, str) or not host.strip()):
            raise ValueError(f"host must be a non-empty host key or name, or None, got {host!r}")
        if reason not in RETIREMENT_REASONS:
            raise ValueError(f"reason must be one of {', '.join(RETIREMENT_REASONS)}")
        return self._mark_recycle(host, spread, reason)

    def _mark_recycle(
        self, host: str | None, spread: float, reason: str, before: float | None = None
    ) -> int:
        now = time.time()
        before = now if before is None else min(before, now)
        keys = self._host_keys(host) if host is not None else None
        marked = 0
        for state in list(self._states.values()):
            if state.closed or state.pinned or state.connected_at > before:
                continue
            if keys is not None and state.host not in keys:
                continue
            at = now + random.uniform(0.0, spread) if spread > 0 else now
            if state.retire_at is None or at < state.retire_at:
                state.retire_at = at
                state.retire_reason = reason
            marked += 1
        if signals.recycle_requested.receivers:
            signals.emit(signals.recycle_requested, self, host=host, spread=spread, reason=reason)
        self.logger.info(
            "pool %s: recycle requested (%s) of %d connections%s over %.1fs",
            self.pool_name,
            reason,
            marked,
            f" on {host}" if host else "",
            spread,
        )
        if marked:
            self._ensure_registered()
            self._request_pass()
        return marked

    def _host_keys(self, host: str) -> set[str]:
        """The host keys ``host`` stands for: a key (``address:port``), an
        address, a name, or ``name:port``, as given in ``hosts=`` or the URL."""
        keys = {host}
        hostset = self._hostset
        if hostset is not None:
            for h in hostset.hosts():
                names = {h.key, h.name, h.address, f"{h.name}:{h.port}" if h.port else h.name}
                if host in names:
                    keys.add(h.key)
        for state in list(self._states.values()):
            if state.host.rsplit(":", 1)[0] == host:
                keys.add(state.host)
        return keys

    def drain(self) -> int:
        """Close every connection, open none in the background; return how many go.

        Idle connections are closed at once, connections in use when they
        are checked in (never while in use); pinned ones are left alone. No
        replacement is opened and ``min_size`` is not refilled until the
        application checks out a connection again, which reconnects as a
        new pool would. The pool stays usable throughout: use it when a
        backend or a whole database is being retired, or to free server
        connections held by an idle process.
        """
        count = sum(1 for s in list(self._states.values()) if not s.closed and not s.pinned)
        self._drained = True
        self._drain_requested = True
        self.logger.info("pool %s: draining %d connections", self.pool_name, count)
        if signals.recycle_requested.receivers:
            signals.emit(signals.recycle_requested, self, host=None, spread=0.0, reason=SIGNAL)
        self._ensure_registered()
        self._request_pass()
        return count

    def refresh(self) -> None:
        """Re-read what the pool knows of its hosts, then rebalance.

        Sends ``signals.refresh_requested`` first (a receiver may call
        :meth:`set_hosts` with a host list it keeps elsewhere), then
        re-resolves every DNS name and re-checks every host at once.
        """
        if signals.refresh_requested.receivers:
            signals.emit(signals.refresh_requested, self)
        hostset = self._hostset
        if hostset is not None and hostset.seeded:
            hostset.check_all_now()
            # Resolved by the worker, never in the caller's thread (which may be
            # an event loop, or the bus listener).
            hostset.expire_dns()
        self._rebalance_requested = True
        self._ensure_registered()
        self._request_pass()

    def rebalance(self) -> int:
        """Move only the excess connections off over-loaded hosts; return how many will move.

        Each eligible host (healthy, best tier, matching ``target_role``)
        gets an even share of the pool's connections; only those beyond a
        host's share are retired (idle ones first), spread over
        ``rebalance_spread`` seconds, and replaced on the hosts below their
        share. Connections in use are retired at checkin, never while in use.
        Hosts are rebalanced automatically when they change (DNS, health,
        role); call this after changing something the pool cannot see.
        """
        marked = self._mark_moves(time.time())
        if marked:
            self._ensure_registered()
            self._request_pass()
        return marked

    def set_hosts(self, hosts: Any) -> None:
        """Replace the host list (same forms as ``hosts=``) and rebalance onto it.

        Connections to hosts that are no longer listed are moved gracefully
        (reason ``host_removed``); hosts still listed keep their health state.
        """
        hostset = self._hostset
        adapter = self._adapter
        if hostset is None or adapter is None:
            raise ConfigurationError(
                f"pool {self.pool_name} does not manage hosts (a Unix socket, one SQLite "
                "file, or a custom creator)"
            )
        specs = parse_hosts(hosts, adapter.default_port, adapter.paths)
        self._config = dataclasses.replace(self._config, hosts=hosts)
        self._apply_changes(hostset.replace(specs))
        self._apply_changes(hostset.refresh_dns())  # names new to the list
        self._ensure_registered()

    def refresh_hosts(self) -> None:
        """Re-resolve every DNS name now, rather than when its TTL runs out."""
        hostset = self._hostset
        if hostset is not None and hostset.seeded:
            self._apply_changes(hostset.refresh_dns(force=True))

    def _mark_moves(self, now: float) -> int:
        hostset = self._hostset
        if hostset is None or not hostset.seeded:
            return 0
        counts: dict[str, int] = {}
        movable: dict[str, list[tuple[ConnectionPoolEntry, ConnState]]] = {}
        leaving = {id(mark[1]) for mark in list(self._doomed.values())}
        for rec, state in list(self._states.items()):
            if state.closed or state.retire_at is not None or id(state) in leaving:
                continue
            counts[state.host] = counts.get(state.host, 0) + 1
            if not state.pinned:
                movable.setdefault(state.host, []).append((rec, state))
        moves = hostset.plan(counts)
        marked = 0
        for key, (n, reason) in moves.items():
            # Idle ones first, then those closest to their end of life anyway.
            candidates = sorted(
                movable.get(key, ()),
                key=lambda item: (item[0].in_use, item[1].deadline or item[1].connected_at),
            )
            spread = 0.0 if reason == HOST_DOWN else self._config.rebalance_spread
            for _rec, state in candidates[:n]:
                state.retire_at = now + (random.uniform(0.0, spread) if spread > 0 else 0.0)
                state.retire_reason = reason
                marked += 1
        if marked:
            self.logger.info(
                "pool %s: moving %d connections (%s) over %.1fs",
                self.pool_name,
                marked,
                ", ".join(f"{key}: {n} {reason}" for key, (n, reason) in sorted(moves.items())),
                self._config.rebalance_spread,
            )
        return marked

    def _check_hosts(self, now: float) -> None:
        """Start the health checks that are due (``checks.py``); never waits."""
        self._checks.run_due(now)

    # -- blocking work: the pool's own threads (or event loop), under deadlines ----
    def _watch(self, what: str, host: str | None, conn: Any = None) -> Deadline:
        """Watch a network operation to ``host`` (see ``deadlines.py``)."""
        return Deadline(what, host, self._config.health_check_timeout, self._missed, conn)

    def _missed(self, deadline: Deadline) -> None:
        """A watched operation is still running past its deadline (worker thread:
        bookkeeping only; the signals follow in this pool's next pass)."""
        hostset = self._hostset
        if hostset is None or deadline.host is None:
            return
        err = deadline.error()
        if deadline.misses == 1:
            self.logger.warning("pool %s: %s", self.pool_name, err)
        self._pending_changes.append(hostset.failed(deadline.host, err))
        self._request_pass()

    def _spawn(self, key: str, job: Callable[[], object], cap: int = 1) -> bool:
        """Run ``job`` off the maintenance pass: on this pool's executor, or as a
        task in the event loop of an asyncio pool. False if ``key`` is busy."""
        if not self._is_asyncio:
            return self._executor.submit(key, job, cap)
        loop = self._loop
        if loop is None or loop.is_closed() or key in self._async_jobs:
            return False
        self._async_jobs.add(key)

        async def run() -> None:
            try:
                await _sa.greenlet_spawn(job)
            except BaseException:
                self.logger.exception("pool %s: %s failed", self.pool_name, key)
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

    def _return_idle(self, rec: ConnectionPoolEntry) -> None:
        """Put back a record a check took out of the idle queue (closed if disposed)."""
        if self._disposed:
            self._close(rec, DISPOSE)
        else:
            _sa.queue_pool_return(self, rec)

    def host_check_in_flight(self, host: str) -> float | None:
        """Seconds the health check of ``host`` (a key) has been running, or None."""
        return self._checks.in_flight(host)

    def stats(self) -> PoolStats:
        """A consistent-enough snapshot of the pool (cheap; not on the checkout path)."""
        idle = {id(r) for r in _sa.idle_records(self)}
        per_host: dict[str, dict[str, int]] = {}
        pinned = 0
        for rec, state in list(self._states.items()):
            if state.closed or rec.dbapi_connection is None:
                continue
            h = per_host.setdefault(state.host, {"open": 0, "idle": 0, "in_use": 0})
            h["open"] += 1
            if rec.in_use:
                h["in_use"] += 1
            elif id(rec) in idle:
                h["idle"] += 1
            pinned += state.pinned
        # Spares count as open (they are connected) but neither idle nor in use.
        spares = len(self._spares)
        listener = self.listener
        c = self._counters
        cfg = self._config
        return PoolStats(
            pool_name=cfg.pool_name,
            pool_size=cfg.pool_size,
            max_overflow=cfg.max_overflow,
            recycle=cfg.recycle,
            recycle_jitter=cfg.recycle_jitter,
            min_size=cfg.min_size,
            max_idle=cfg.max_idle,
            open=sum(h["open"] for h in per_host.values()),
            idle=sum(h["idle"] for h in per_host.values()),
            in_use=sum(h["in_use"] for h in per_host.values()),
            pinned=pinned,
            spares=spares,
            retiring=len(self._retiring),
            connects=c.connects,
            connect_failures=c.connect_failures,
            checkouts_waited=c.connects - c.connects_background,
            retirements=dict(c.retirements),
            hosts=self._host_stats(per_host),
            bus=listener.stats_for(self) if listener is not None else BusStats(),
        )

    def _host_stats(self, per_host: dict[str, dict[str, int]]) -> dict[str, HostStats]:
        out: dict[str, HostStats] = {}
        hostset = self._hostset
        known = hostset.hosts() if hostset is not None else []
        for host in known:
            h = per_host.get(host.key, {})
            out[host.key] = HostStats(
                host=host.key,
                open=h.get("open", 0),
                idle=h.get("idle", 0),
                in_use=h.get("in_use", 0),
                healthy=host.healthy,
                role=host.role,
                tier=host.tier,
                failures=host.total_failures,
                name=host.name,
                address=host.address,
                health=host.health,
                last_error=host.last_error,
                reason=host.failure_reason,
                check_in_flight=self._checks.in_flight(host.key),
            )
        for key, h in per_host.items():
            if key not in out:  # unmanaged, or removed from the host set
                out[key] = HostStats(
                    host=key,
                    open=h["open"],
                    idle=h["idle"],
                    in_use=h["in_use"],
                    health="removed" if hostset is not None else "up",
                    healthy=hostset is None,
                )
        return out

    def dispose(self) -> None:
        """Close idle connections and spares, and stop maintenance of this pool.

        Checked-out connections are left alone (as with ``QueuePool``); they
        are closed when returned.
        """
        self._disposed = True
        get_worker().unregister(self)
        self._executor.close()
        listener = self.listener
        if listener is not None:
            detach_listener(self, listener)
        self._listener = None
        self._disposing = True
        try:
            super().dispose()
            self._close_leftovers()
        finally:
            self._disposing = False
        if signals.pool_disposed.receivers:
            signals.emit(signals.pool_disposed, self)

    def _close_leftovers(self) -> None:
        """Close spares and handed-over records (after dispose)."""
        self._doomed.clear()
        self._trim_fresh(time.time())
        while True:
            try:  # checkin may pop concurrently: never test-then-pop
                spare = self._spares.pop()
            except IndexError:
                break
            self._close(spare, DISPOSE)
        while True:
            try:
                rec, _reason, _slot_empty = self._retiring.popleft()
            except IndexError:
                break
            self._close(rec, DISPOSE)

    # -- maintenance (runs in the worker thread, or in the event loop) --------
    def _run_maintenance(self) -> None:
        """Called by the worker when ``_next_due`` has come: hand the pass to
        this pool's own thread (or event loop) and return at once."""
        # Until the pass says otherwise; written before the in-flight test so
        # that a pass ending meanwhile is never overwritten.
        self._next_due = time.time() + MAX_SLEEP
        if not self._is_asyncio:
            if self._pass_inflight:
                return  # the running pass sets _next_due when it ends
            self._pass_inflight = True
            if not self._executor.submit("pass", self._pass_job):
                self._pass_inflight = False
            return
        hostset = self._hostset
        if hostset is not None and hostset.seeded and hostset.next_dns_refresh() <= time.time():
            # A DNS lookup blocks: on this pool's executor, never in the loop.
            self._executor.submit("dns", self._refresh_dns_job)
        # An asyncio driver can only be used from its event loop: run the
        # pass there, as a greenlet, like SQLAlchemy's own async engine does.
        loop = self._loop
        if self._async_inflight or loop is None or loop.is_closed():
            return
        self._async_inflight = True
        self._wake = False

        async def run() -> None:
            next_due = time.time() + MAX_SLEEP
            try:
                next_due = await _sa.greenlet_spawn(self._maintain)
            except BaseException:
                self.logger.exception("maintenance of pool %s failed", self.pool_name)
            finally:
                self._next_due = 0.0 if self._wake else next_due
                self._async_inflight = False
                get_worker().poke()

        try:
            asyncio.run_coroutine_threadsafe(run(), loop)
        except RuntimeError:  # loop closed between the check and the call
            self._async_inflight = False

    def _pass_job(self) -> None:
        """One maintenance pass of a sync pool, on its own executor thread."""
        self._wake = False
        next_due = time.time() + MAX_SLEEP
        try:
            self._refresh_dns_job()
            next_due = self._maintain()
        except BaseException:  # logged; the next pass comes as usual
            self.logger.exception("maintenance of pool %s failed", self.pool_name)
        finally:
            self._next_due = 0.0 if self._wake else next_due
            self._pass_inflight = False
            get_worker().poke()

    def _refresh_dns_job(self) -> None:
        hostset = self._hostset
        if hostset is not None and hostset.seeded and hostset.next_dns_refresh() <= time.time():
            self._apply_changes(hostset.refresh_dns())

    def _maintain(self) -> float:
        """One maintenance pass; returns when the next one is due."""
        now = time.time()
        if self._disposed:
            return now + MAX_SLEEP
        token = self._token()
        self._bg_tokens.add(token)
        try:
            while self._pending_changes:
                self._apply_changes(self._pending_changes.popleft())
            return self._maintain_pass(now)
        finally:
            self._bg_tokens.discard(token)
            self._cleanup_if_disposed()

    def _cleanup_if_disposed(self) -> None:
        """Disposed while a pass was running: leave nothing open behind."""
        if not self._disposed:
            return
        self._disposing = True
        try:
            self._close_leftovers()
            for rec in _sa.idle_records(self):
                if _sa.remove_idle(self, rec):
                    self._close(rec, DISPOSE)
        finally:
            self._disposing = False

    def _maintain_pass(self, now: float) -> float:
        next_due = now + MAX_SLEEP
        retired: dict[str, int] = {}
        hostset = self._hostset

        # 0. Hosts: health checks, then move connections if hosts changed.
        if hostset is not None and hostset.seeded:
            self._check_hosts(now)
            if self._rebalance_requested:
                self._rebalance_requested = False
                self._mark_moves(now)

        if self._drain_requested:
            self._drain_requested = False
            self._drain_now(retired)

        # 1. Connections handed over by checkin.
        while self._retiring:
            rec, reason, slot_empty = self._retiring.popleft()
            self._close(rec, reason)
            retired[reason] = retired.get(reason, 0) + 1
            if slot_empty:
                self._refill_slot(rec)

        idle = _sa.idle_records(self)
        for rec in idle:
            if rec.dbapi_connection is None and not self._drained:
                # Invalidated and closed (a disconnect error): reconnect it
                # here rather than inside the next checkout.
                self._replace_idle(rec, ERROR, now)
        idle_ids = {id(r) for r in idle}
        retiring = {item[0] for item in self._retiring}
        starts = self._schedule()
        due_in_use: list[tuple[ConnectionPoolEntry, ConnState, str]] = []
        # A mark on a record that is neither in use nor idle (an overflow
        # connection closed at checkin, say) would hold a spare forever.
        for rec, (_reason, marked) in list(self._doomed.items()):
            if (not rec.in_use and id(rec) not in idle_ids) or marked is not state_of(rec):
                self._doomed.pop(rec, None)
        spares = set(self._spares)
        for rec, state in list(self._states.items()):
            if state.closed or rec.dbapi_connection is not state.dbapi:
                # Closed, reconnected or detached behind our back.
                if self._states.get(rec) is state:
                    del self._states[rec]
                continue
            if state.pinned:
                self._shield(rec)
                continue
            if rec in retiring:
                continue
            is_idle = id(rec) in idle_ids
            state.idle_since = (state.idle_since or now) if is_idle else None
            if is_idle and _sa.is_invalidated(self, rec):
                # SQLAlchemy would reconnect it inside the next checkout.
                if self._replace_idle(rec, ERROR, now):
                    retired[ERROR] = retired.get(ERROR, 0) + 1
                continue
            due = state.due(starts.get(rec))
            if due is None:
                continue
            at, reason = due
            if at > now:  # the sweep at the end of the pass schedules it
                continue
            if rec in spares:
                # A spare that waited past its own deadline: step 2 opens a
                # fresh one if it is still needed.
                try:
                    self._spares.remove(rec)
                except ValueError:  # taken by a checkin meanwhile
                    continue
                self._close(rec, reason)
                retired[reason] = retired.get(reason, 0) + 1
                continue
            if is_idle:
                if self._replace_idle(rec, reason, now):
                    retired[reason] = retired.get(reason, 0) + 1
                else:
                    next_due = min(next_due, max(self._retry_at, now + 0.01))
            elif rec.in_use and rec not in self._doomed:
                due_in_use.append((rec, state, reason))

        # 2. In-use connections that are due: open a spare first, then mark
        #    them, so that their checkin never leaves the pool a slot short.
        for rec, state, reason in due_in_use:
            if len(self._spares) <= len(self._doomed) and (
                len(self._spares) >= self._spare_cap() or not self._open_spare(now, state)
            ):
                next_due = min(next_due, max(self._retry_at, now + 0.05))
                break
            self._doomed[rec] = (reason, state)
            # Check again after marking: it may have been checked in or
            # pinned while the spare was opening. (Checkin clears in_use then
            # tests the mark; pin() sets pinned then drops the mark: in either
            # order one side sees the other.)
            if not rec.in_use or state.pinned or state.closed:
                self._doomed.pop(rec, None)
                # Checked in meanwhile: it is idle now, and the spare just
                # opened can take its slot at once.
                if not (state.pinned or state.closed) and self._replace_idle(rec, reason, now):
                    retired[reason] = retired.get(reason, 0) + 1
        # Marked records whose spare was closed (it came due) get a fresh one.
        while not self._drained and len(self._spares) < min(len(self._doomed), self._spare_cap()):
            if not self._open_spare(now):
                break
        self._trim_spares()
        self._trim_fresh(now)

        # 3. Keep min_size open; close what stayed idle past max_idle.
        self._prefill(now)
        self._shrink_idle(now, retired)
        if self._config.max_idle is not None:
            next_due = min(next_due, now + min(MAX_SLEEP, self._config.max_idle / 4))
        # When the next connection comes due, including those opened during
        # this pass (they have deadlines of their own).
        starts = self._schedule()
        for rec, state in list(self._states.items()):
            due = state.due(starts.get(rec))
            if due is not None and due[0] > now and not state.pinned:
                next_due = min(next_due, due[0])
        if hostset is not None and hostset.seeded:
            next_due = min(
                next_due,
                max(now + 0.01, hostset.next_check()),
                max(now + 0.01, hostset.next_dns_refresh()),
            )

        if (
            self._drained
            and not self._states
            and not self._retiring
            and not self._doomed
            and not self._spares
        ):
            # Drained and empty: nothing to maintain until the application
            # connects again (which registers the pool anew).
            get_worker().unregister(self)
        if retired:
            self.logger.info(
                "pool %s: retired %d connections (%s)",
                self.pool_name,
                sum(retired.values()),
                ", ".join(f"{k}={v}" for k, v in sorted(retired.items())),
            )
        return next_due

    def _drain_now(self, retired: dict[str, int]) -> None:
        """The work of :meth:`drain`, in the maintenance pass."""
        self._spares, spares = [], self._spares
        for spare in spares:
            self._close(spare, SIGNAL)
        for rec in _sa.idle_records(self):
            state = self._states.get(rec)
            if state is not None and state.pinned:
                continue
            if _sa.remove_idle(self, rec):
                if rec.dbapi_connection is not None:
                    self._close(rec, SIGNAL)
                    retired[SIGNAL] = retired.get(SIGNAL, 0) + 1
                _sa.dec_overflow(self)
        for rec, state in list(self._states.items()):
            if state.closed or state.pinned or not rec.in_use:
                continue
            self._doomed[rec] = (SIGNAL, state)
            if _checked_in(rec) and _sa.remove_idle(self, rec):  # checked in meanwhile
                self._doomed.pop(rec, None)
                self._close(rec, SIGNAL)
                _sa.dec_overflow(self)
                retired[SIGNAL] = retired.get(SIGNAL, 0) + 1

    def _schedule(self) -> dict[Any, float]:
        """Start times of lifetime replacements (see ``schedule_replacements``)."""
        return schedule_replacements(
            [
                (state.deadline, rec)
                for rec, state in list(self._states.items())
                if state.deadline is not None and not state.pinned and not state.closed
            ],
            self._lead,
            # Connect times vary (about 2x under load): plan with headroom.
            2.0 * self._connect_time,
        )

    def _spare_cap(self) -> int:
        return max(2, self._config.pool_size // 4)

    def _open(self, now: float) -> ConnectionPoolEntry | None:
        """Open a connection in the background; None (with backoff) on failure.

        A sync pool connects on an executor thread and waits for it at most
        ``health_check_timeout``: a connect to a host that hangs must not
        hold up the rest of the pass. A connect it stopped waiting for that
        succeeds later is kept for the next pass (``_fresh``).
        """
        while self._fresh:
            _at, rec = self._fresh.pop()
            if rec.dbapi_connection is not None:
                return rec
        if now < self._retry_at:
            return None
        if self._is_asyncio:
            return self._open_now()  # awaits in the event loop: blocks nothing else
        opening = _Opening()
        if not self._executor.submit("connect", lambda: self._open_job(opening), _CONNECT_CAP):
            return None
        return opening.result(self._config.health_check_timeout)

    def _open_job(self, opening: _Opening) -> None:
        token = self._token()
        self._bg_tokens.add(token)
        try:
            rec = self._open_now()
        finally:
            self._bg_tokens.discard(token)
        if not opening.deliver(rec) and rec is not None:
            # The pass stopped waiting: the next one takes it.
            if self._disposed:
                self._close(rec, DISPOSE)
            else:
                self._fresh.append((time.time(), rec))
                self._request_pass()

    def _open_now(self) -> ConnectionPoolEntry | None:
        try:
            rec = _sa.create_record(self)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # gevent's Timeout, a listener's own exception class...
            # ...is a failed background connect like any other: backoff, not the end of
            # this pool's maintenance.
            self._backoff = min(_BACKOFF_MAX, max(_BACKOFF_MIN, self._backoff * 2))
            self._retry_at = time.time() + random.uniform(0, self._backoff)
            self.logger.warning(
                "pool %s: background connect failed (%s); retrying in up to %.1fs",
                self.pool_name,
                err,
                self._backoff,
            )
            return None
        self._backoff = 0.0
        if self._disposed:
            self._close(rec, DISPOSE)
            return None
        _sa.ping_at_first_checkout(rec)
        return rec

    def _trim_fresh(self, now: float) -> None:
        """Close late background connects that no pass wanted for a while."""
        keep = []
        while self._fresh:
            at, rec = self._fresh.pop()
            state = state_of(rec)
            marked = state is not None and state.retire_at is not None  # by a rebalance
            if now - at < _FRESH_MAX_AGE and not self._disposed and not marked:
                keep.append((at, rec))
            else:
                self._close(rec, IDLE)
        self._fresh.extend(keep)

    def _open_spare(self, now: float, replacing: ConnState | None = None) -> bool:
        self._replacing = replacing
        try:
            rec = self._open(now)
        finally:
            self._replacing = None
        if rec is None:
            return False
        self._spares.append(rec)
        return True

    def _trim_spares(self) -> None:
        # Spares beyond the marked connections (those pinned or closed
        # meanwhile) are not kept open for nothing.
        while len(self._spares) > len(self._doomed):
            try:
                spare = self._spares.pop()
            except IndexError:
                break
            self._close(spare, IDLE)

    def _replace_idle(self, old: ConnectionPoolEntry, reason: str, now: float) -> bool:
        """Swap a fresh connection into ``old``'s queue slot, then close ``old``."""
        # Idle now, so not to be retired at checkin: its spare (if it was
        # given one) becomes free for this swap.
        self._doomed.pop(old, None)
        try:
            new = self._spares.pop() if len(self._spares) > len(self._doomed) else None
        except IndexError:
            new = None
        if new is None:
            self._replacing = state_of(old)
            try:
                new = self._open(now)
            finally:
                self._replacing = None
            if new is None:
                return False
        if _sa.swap_idle(self, old, new):
            self._close(old, reason)
            if self._disposed and _sa.remove_idle(self, new):
                self._close(new, DISPOSE)
            return True
        # Checked out meanwhile: keep the new one as its spare.
        self._spares.append(new)
        if old.in_use:
            self._doomed.setdefault(old, (reason, state_of(old)))
        return False

    def _refill_slot(self, old: ConnectionPoolEntry) -> None:
        """A doomed record was checked in with no spare ready: fill its slot."""
        if self._drained:
            _sa.dec_overflow(self)  # draining: the slot goes with its connection
            return
        new = self._open(time.time())
        # If no connection could be opened, return the (closed) record itself:
        # the slot is kept and the next checkout reconnects it, as QueuePool would.
        _sa.queue_pool_return(self, new if new is not None else old)

    def _prefill(self, now: float) -> None:
        if self._drained:
            return
        want = self._config.min_size
        while self.size() + _sa.overflow(self) < want and not self._disposed:
            if not _sa.inc_overflow(self):
                return
            rec = self._open(now)
            if rec is None:
                _sa.dec_overflow(self)
                return
            _sa.queue_pool_return(self, rec)

    def _shrink_idle(self, now: float, retired: dict[str, int]) -> None:
        """Close connections that were idle for ``max_idle`` (down to ``min_size``).

        Like psycopg_pool's ShrinkPool: over each ``max_idle`` window, the
        minimum number of idle connections seen is how many were never
        needed; that many (at most) are closed.
        """
        max_idle = self._config.max_idle
        if max_idle is None:
            return
        idle = [r for r in _sa.idle_records(self) if r in self._states]
        n_idle = len(idle)
        self._idle_window_min = (
            n_idle if self._idle_window_min is None else min(self._idle_window_min, n_idle)
        )
        if now - self._idle_window_start < max_idle:
            return
        surplus = min(
            self._idle_window_min, self.size() + _sa.overflow(self) - self._config.min_size
        )
        self._idle_window_start = now
        self._idle_window_min = None
        if surplus <= 0:
            return
        # Close those idle the longest.
        since = {id(r): getattr(self._states.get(r), "idle_since", None) or now for r in idle}
        idle.sort(key=lambda r: since[id(r)])
        for rec in idle[:surplus]:
            state = self._states.get(rec)
            if state is None or state.pinned or now - since[id(rec)] < max_idle:
                continue
            if _sa.remove_idle(self, rec):
                self._close(rec, IDLE)
                _sa.dec_overflow(self)
                retired[IDLE] = retired.get(IDLE, 0) + 1

    def _close(self, rec: ConnectionPoolEntry, reason: str) -> None:
        state = state_of(rec)
        if state is not None:
            if state.reason is None:
                state.reason = reason
            abandon_if_unhealthy(self._hostset, state.host, state.dbapi)
        rec.close()

    def _shield(self, rec: ConnectionPoolEntry) -> None:
        """Keep SQLAlchemy's checkout-time recycle away from a pinned connection."""
        now = time.time()
        if (
            self._config.recycle > 0
            and not _sa.is_invalidated(self, rec)
            and _sa.starttime(rec) < now - self._config.recycle / 2
        ):
            _sa.set_starttime(rec, now)

    def _restore_deadline(self, rec: ConnectionPoolEntry, state: ConnState) -> None:
        if state.deadline is not None and not _sa.is_invalidated(self, rec):
            _sa.set_starttime(
                rec, _sa.clamp_starttime(self, rec, state.deadline - self._config.recycle)
            )

    def _forget_inherited(self) -> None:
        """In a forked child: drop every reference to the parent's connections.

        Their sockets are shared with the parent; closing them here would end
        the parent's sessions. They stay usable by SQLAlchemy as before (the
        usual advice applies: ``engine.dispose(close=False)`` in the child).
        """
        for state in self._states.values():
            state.closed = True
        # Idle ones keep their queue slot but lose the parent's socket: the
        # child reconnects them on checkout. The objects are kept referenced
        # so that no driver finalizer ever runs on them in the child.
        for rec in _sa.idle_records(self):
            if rec.dbapi_connection is not None:
                _INHERITED.append(_sa.forget_connection(rec))
        for _rec, _reason, slot_empty in self._retiring:
            if slot_empty:
                _sa.dec_overflow(self)
        self._states = {}
        self._doomed = {}
        self._connecting = {}
        self._replacing = None
        self._bg_tokens = set()
        self._executor = Executor(f"pool-{self._config.pool_name}")
        self._pass_inflight = False
        self._async_jobs = set()
        self._async_tasks = set()
        self._checks.after_fork()
        self._pending_changes = deque()
        self._fresh = []
        self._choose_lock = threading.Lock()
        if self._hostset is not None:
            self._hostset.after_fork()
        self._spares = []
        self._retiring = deque()
        self._async_inflight = False
        self._loop = None
        self._next_due = 0.0

    # -- close accounting (class-level pool events) ----------------------------
    def _closed(self, rec: ConnectionPoolEntry, state: ConnState) -> None:
        if state.closed:
            return
        state.closed = True
        if self._states.get(rec) is state:
            del self._states[rec]
        reason = state.reason
        if reason is None:
            if self._disposing:
                reason = DISPOSE
            elif _sa.is_invalidated(self, rec):
                reason = ERROR  # reconnected at checkout after a disconnect error
            elif state.deadline is not None and time.time() >= state.deadline:
                reason = LIFETIME  # SQLAlchemy's own check, inside a checkout
            else:
                reason = OVERFLOW  # QueuePool closing an overflow connection at checkin
        self._counters.retired(reason)
        # The record keeps ``info`` (and this state) until it reconnects, maybe
        # for long: it must not keep the closed DBAPI connection alive too.
        state.dbapi = None
        if signals.connection_retired.receivers:
            now = time.time()
            signals.emit(
                signals.connection_retired,
                self,
                host=state.host,
                reason=reason,
                age=now - state.connected_at,
                connection_id=state.serial,
                connected_at=state.connected_at,
                closed_at=now,
            )


#: DBAPI connections inherited from the parent process, never touched again.
_INHERITED: list[object] = []


def _on_close(dbapi_connection: Any, rec: ConnectionPoolEntry) -> None:
    state = state_of(rec)
    if state is not None and state.dbapi is dbapi_connection:
        pool = state.pool_ref()
        if pool is not None:
            pool._closed(rec, state)


def _on_invalidate(dbapi_connection: Any, rec: ConnectionPoolEntry, exception: Any) -> None:
    state = state_of(rec)
    if state is not None and state.reason is None:
        state.reason = ERROR


def _on_detach(dbapi_connection: Any, rec: ConnectionPoolEntry) -> None:
    # The connection now belongs to the application; it is no longer ours.
    # SQLAlchemy fires this after returning the record to the pool, which may
    # already have reconnected it: act only on the state of this connection.
    state = state_of(rec)
    if state is not None and state.dbapi is dbapi_connection:
        state.closed = True
        state.dbapi = None
        pool = state.pool_ref()
        if pool is not None and pool._states.get(rec) is state:
            del pool._states[rec]


#: The events every pool listens to on itself (see ``RebalancingQueuePool.__init__``).
_BOOKKEEPING: tuple[tuple[str, Callable[..., None]], ...] = (
    ("close", _on_close),
    ("invalidate", _on_invalidate),
    ("detach", _on_detach),
)


class AsyncRebalancingQueuePool(RebalancingQueuePool):
    """The asyncio twin of :class:`RebalancingQueuePool`, for ``create_async_engine``.

    Same arguments and behaviour. Background work runs in the event loop that
    opened the pool's connections (an asyncio driver's connections cannot be
    used from another thread), scheduled there by the maintenance worker.
    """

    _is_asyncio = True
    _sqla_logger_namespace = "sqlalchemy.pool.impl.AsyncRebalancingQueuePool"
    _queue_class = sqla_queue.AsyncAdaptedQueue  # type: ignore[assignment]
    _dialect = _AsyncConnDialect()
