"""``RebalancingQueuePool``: a drop-in ``QueuePool`` with jittered lifetimes,
background replacement and graceful recycling.

This module is the SQLAlchemy face: construction and ``recreate()``, the
hooks SQLAlchemy calls, the public operations and ``stats()``. The work is
done by the parts it builds, each given the others it needs at construction:
``ledger.py`` (the open connections, and every lock-free rule that keeps one
in use from ever being closed), ``steering.py`` (which host each connection
goes to; ``checks.py``, health checks), ``maintenance.py`` (the pass),
``background.py`` (where background work runs, when the next pass is due)
and ``wiring.py`` (the bus of cluster-wide commands).

The checkout path stays within a few percent of ``QueuePool``: checkout is
not overridden (each connection's jittered deadline is folded into
SQLAlchemy's own recycle check by moving the record's ``starttime``, see
``Ledger.new_state``), and checkin adds one dict membership test (is this
record marked to retire?). Nothing is closed on the request path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy.pool import ConnectionPoolEntry, QueuePool

from . import _sa, clock, signals, stats, targets
from .background import Background, Schedule
from .bus.listener import Listener
from .bus.message import MAX_SPREAD, Command
from .config import PoolConfig
from .hosts import HostSet
from .ledger import Ledger
from .maintenance import Maintenance
from .parameters import PARAMETERS, build_arguments, with_param_docs
from .stats import MANUAL, RETIREMENT_REASONS, SIGNAL, BusStats, Counters, PoolStats
from .steering import Report, Steering, hosts_for
from .wiring import SECRET_ENV, Wiring
from .worker import get_worker

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection

__all__ = ["SECRET_ENV", "AsyncRebalancingQueuePool", "RebalancingQueuePool"]

#: Seconds between create_engine() and the first background prefill.
_PREFILL_DELAY = 0.1


@_sa.pool_class("sqlalchemy.pool.impl.RebalancingQueuePool")
class RebalancingQueuePool(QueuePool):
    """A :class:`~sqlalchemy.pool.QueuePool` that keeps its connections fresh
    without ever making a request wait for it.

    Use it with ``create_engine(url, poolclass=RebalancingQueuePool, ...)``;
    every argument below can be passed to ``create_engine`` by name.

    The ``:param:`` lines of this package's arguments (SQLAlchemy's own are
    SQLAlchemy's) are added below from ``sqla_rebalance.parameters.PARAMETERS``.
    """

    __doc__ = with_param_docs(__doc__)

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
        target_role: str | None = "any",
        dns_nameservers: Any = None,
        dns_min_refresh: float | None = 1.0,
        dns_max_refresh: float | None = None,
        health_check_interval: float | None = 1.0,
        unhealthy_threshold: int | None = 3,
        rebalance_spread: float | None = 1.0,
        broadcast: Any = None,
        broadcast_secret: str | bytes | None = None,
        min_recycle_interval: float | None = 10.0,
        health_check_timeout: float | None = 1.0,
        connect_deadline: float | None = 5.0,
        **kw: Any,
    ) -> None:
        # The arguments as given, by name; the table says which of them PoolConfig
        # checks, and the default of those not given (pool_recycle: -1, as in Pool).
        given = {k: v for k, v in locals().items() if k not in ("self", "creator", "kw")}
        recreated = kw.pop("_recreated", False)
        cfg = self._config = PoolConfig.build(**build_arguments({**kw, **given}))
        # Every argument is checked before QueuePool is built.
        self._wiring = Wiring(cfg.pool_name, broadcast, broadcast_secret, recreated)
        self._broadcast_secret_arg = broadcast_secret
        adapter, hostset = hosts_for(cfg, kw.get("dialect"))
        super().__init__(
            creator,
            pool_size=pool_size,
            max_overflow=max_overflow,
            timeout=timeout,
            use_lifo=use_lifo,
            **kw,
        )
        self._counters = Counters()
        self._schedule = Schedule(id(self))
        wake = self._schedule.request
        self._ledger = Ledger(
            self,
            self._counters,
            cfg.recycle,
            cfg.recycle_jitter,
            wake,
            self._schedule.no_later_than,
        )
        #: The ledger's marks, bound once for the one membership test of a checkin.
        self._doomed = self._ledger.doomed
        creator = _sa.wrap_creator(self, self._connect)  # SQLAlchemy's, for probes
        self._steering = Steering(
            cfg, adapter, hostset, self._ledger, self._counters, creator, self.logger, wake
        )
        self._background = Background(self, self._ledger, self._steering, self._schedule, cfg)
        self._maintenance = Maintenance(self, cfg, self._ledger, self._steering, self._background)
        # Prefill at once for a new engine; a pool made by recreate() (that
        # is, by Engine.dispose(), often called at shutdown) waits for its
        # first connection before opening min_size more.
        if cfg.min_size > 0 and not recreated:
            # A moment's grace: event listeners added right after create_engine()
            # (a do_connect that supplies the password, say) see the prefill.
            self._schedule.next_due = clock.now() + _PREFILL_DELAY
            get_worker().register(self)
        if not recreated:
            self._wiring.attach(self, disposed=False)

    # -- configuration -----------------------------------------------------
    @property
    def config(self) -> PoolConfig:
        """The validated settings of this pool."""
        return self._config

    @property
    def pool_name(self) -> str:
        return self._config.pool_name

    @property
    def hostset(self) -> HostSet | None:
        """The hosts this pool spreads over (None: one host, not managed)."""
        return self._steering.hostset

    @property
    def _disposed(self) -> bool:
        """``dispose()`` was called (the Prometheus collector skips such a pool)."""
        return self._ledger.disposed

    @property
    def listener(self) -> Listener | None:
        """The bus listener this pool is attached to (None without ``broadcast``)."""
        return self._wiring.listener

    def recreate(self) -> RebalancingQueuePool:
        """Called by ``Engine.dispose()``: a new, empty pool with the same settings."""
        self.logger.info("Pool recreating")
        c = self._config
        # Our settings as given (parameters.PARAMETERS says where each is kept);
        # SQLAlchemy's own through _sa; the secret as passed (PoolConfig has none).
        ours = {p.argument: getattr(c, p.stored) for p in PARAMETERS if p.stored}
        return self.__class__(
            _sa.creator(self),
            **ours,
            broadcast_secret=self._broadcast_secret_arg,
            _recreated=True,
            **_sa.recreate_kwargs(self),
        )

    # -- SQLAlchemy's hooks ------------------------------------------------------
    def _connect(
        self,
        original: Callable[[ConnectionPoolEntry], DBAPIConnection],
        rec: ConnectionPoolEntry,
    ) -> DBAPIConnection:
        """Every connect of this pool (``_sa.wrap_creator``), in whichever thread
        opens it: a checkout's, or one of the pool's own."""
        background = self._background.in_background()
        report = Report()
        try:
            dbapi_connection, host_key = self._steering.connect(original, rec, report)
        finally:
            self._maintenance.apply_report(report)
        try:
            self._register(rec, dbapi_connection, host_key, background)
        except BaseException:
            if host_key is not None:
                self._steering.release(host_key)
            raise
        return dbapi_connection

    def _register(
        self,
        rec: ConnectionPoolEntry,
        dbapi_connection: DBAPIConnection,
        host_key: str | None,
        background: bool,
    ) -> None:
        started = _sa.starttime(rec)  # set by SQLAlchemy just before the connect
        self._maintenance.connected(clock.wall() - started)
        host = host_key or targets.describe(dbapi_connection)
        state = self._ledger.new_state(rec, dbapi_connection, host, started)
        self._steering.settle(host_key, rec, state)
        self._counters.connected(background)
        if not background and self._maintenance.drained:
            self._maintenance.drained = False  # the application needs connections again
            self._schedule.request()  # min_size applies again
        self._background.found_loop()
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

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        """Checkin: the only hot-path override (see ``Ledger.retire_at_checkin``)."""
        if record in self._doomed:
            self._ledger.retire_at_checkin(record)
        else:
            _sa.queue_pool_return(self, record)

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
        if not self._steering.disconnected(connection, exception, _checkin):
            _sa.pool_invalidate(self, connection, exception, _checkin)

    def dispose(self) -> None:
        """Close idle connections and spares, and stop maintenance of this pool.

        Checked-out connections are left alone (as with ``QueuePool``); they
        are closed when returned.
        """
        ledger = self._ledger
        ledger.disposed = True
        get_worker().unregister(self)
        self._background.executor.close()
        self._wiring.detach(self)
        ledger.disposing = True
        try:
            super().dispose()
            ledger.close_leftovers(self._steering.hostset)
        finally:
            ledger.disposing = False
        if signals.pool_disposed.receivers:
            signals.emit(signals.pool_disposed, self)

    # -- the maintenance worker's side (``worker.py``) -----------------------------
    @property
    def _next_due(self) -> float:
        return self._schedule.next_due

    @_next_due.setter
    def _next_due(self, value: float) -> None:
        self._schedule.next_due = value

    def _run_maintenance(self) -> None:
        """The pass is due: hand it to this pool's own thread (or event loop)."""
        maintenance = self._maintenance
        self._background.dispatch(maintenance.maintain, maintenance.refresh_dns)

    def _forget_inherited(self) -> None:
        """In a forked child: drop every reference to the parent's connections
        and threads (see ``Ledger.forget_inherited``)."""
        self._ledger.forget_inherited()
        self._steering.after_fork()
        self._background.after_fork()
        self._maintenance.after_fork()

    def _ensure_registered(self) -> None:
        disposed = self._ledger.disposed
        self._wiring.reattach(self, disposed)
        worker = get_worker()
        if not disposed and not worker.is_registered(self):
            worker.register(self)
        else:
            worker.ensure_running()

    def _wake(self) -> None:
        self._ensure_registered()
        self._schedule.request()

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
            or not 0.0 <= spread <= MAX_SPREAD  # False for nan too
        ):
            raise ValueError(
                f"spread must be a number of seconds in [0, {MAX_SPREAD:g}], got {spread!r}"
            )
        if host is not None and (not isinstance(host, str) or not host.strip()):
            raise ValueError(f"host must be a non-empty host key or name, or None, got {host!r}")
        if reason not in RETIREMENT_REASONS:
            raise ValueError(f"reason must be one of {', '.join(RETIREMENT_REASONS)}")
        return self._mark_recycle(host, spread, reason)

    def _mark_recycle(
        self, host: str | None, spread: float, reason: str, before: float | None = None
    ) -> int:
        wall = clock.wall()  # compared with connected_at (wall clock, as issued_at)
        before = wall if before is None else min(before, wall)
        now = clock.now()  # retirement moments: the scheduling clock
        keys = None
        if host is not None:
            keys = self._steering.host_keys(host, self._ledger.hosts_open())
        marked = self._ledger.mark_recycle(keys, spread, reason, before, now)
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
            self._wake()
        return marked

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
        count = self._ledger.live()
        self._maintenance.drained = True
        self._maintenance.drain_requested = True
        self.logger.info("pool %s: draining %d connections", self.pool_name, count)
        if signals.recycle_requested.receivers:
            signals.emit(signals.recycle_requested, self, host=None, spread=0.0, reason=SIGNAL)
        self._wake()
        return count

    def refresh(self) -> None:
        """Re-read what the pool knows of its hosts, then rebalance.

        Sends ``signals.refresh_requested`` first (a receiver may call
        :meth:`set_hosts` with a host list it keeps elsewhere), then
        re-resolves every DNS name and re-checks every host at once.
        """
        if signals.refresh_requested.receivers:
            signals.emit(signals.refresh_requested, self)
        self._steering.recheck()
        self._maintenance.rebalance_requested = True
        self._wake()

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
        marked = self._maintenance.mark_moves(clock.now())
        if marked:
            self._wake()
        return marked

    def set_hosts(self, hosts: Any) -> None:
        """Replace the host list (same forms as ``hosts=``) and rebalance onto it.

        Connections to hosts that are no longer listed are moved gracefully
        (reason ``host_removed``); hosts still listed keep their health state.
        """
        changes = self._steering.set_hosts(hosts)
        self._config = self._steering.config
        self._maintenance.apply_changes(changes)
        self._maintenance.apply_changes(self._steering.resolve())  # names new to the list
        self._ensure_registered()

    def refresh_hosts(self) -> None:
        """Re-resolve every DNS name now, rather than when its TTL runs out."""
        self._maintenance.apply_changes(self._steering.resolve(force=True))

    def host_check_in_flight(self, host: str) -> float | None:
        """Seconds the health check of ``host`` (a key) has been running, or None."""
        return self._maintenance.checks.in_flight(host)

    def stats(self) -> PoolStats:
        """A consistent-enough snapshot of the pool (cheap; not on the checkout path)."""
        ledger, listener = self._ledger, self.listener
        return stats.collect(
            self._config,
            self._counters,
            list(ledger.states.items()),
            _sa.idle_records(self),
            spares=len(ledger.spares),
            retiring=len(ledger.retiring),
            hostset=self._steering.hostset,
            check_in_flight=self._maintenance.checks.in_flight,
            bus=listener.stats_for(self) if listener is not None else BusStats(),
        )

    # -- cluster-wide commands (the bus listener's thread) -------------------------
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


@_sa.pool_class("sqlalchemy.pool.impl.AsyncRebalancingQueuePool", asyncio=True)
class AsyncRebalancingQueuePool(RebalancingQueuePool):
    """The asyncio twin of :class:`RebalancingQueuePool`, for ``create_async_engine``.

    Same arguments and behaviour. Background work runs in the event loop that
    opened the pool's connections (an asyncio driver's connections cannot be
    used from another thread), scheduled there by the maintenance worker.
    """
