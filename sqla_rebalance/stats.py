"""Pool statistics: named counters and a snapshot type with ``as_dict()``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry

    from .config import PoolConfig
    from .hosts import HostSet
    from .lifetime import ConnState

__all__ = [
    "RETIREMENT_REASONS",
    "BusStats",
    "Counters",
    "HostStats",
    "PoolStats",
    "collect",
]

# Why a connection was closed by the pool. The first eight are the reasons of
# the public contract; ``overflow`` (an overflow connection returned to a full
# pool, plain QueuePool behaviour) and ``dispose`` (pool disposed) complete
# the picture so that every close is accounted for.
LIFETIME = "lifetime"
IDLE = "idle"
SIGNAL = "signal"
REBALANCE = "rebalance"
HOST_REMOVED = "host_removed"
HOST_DOWN = "host_down"
ERROR = "error"
MANUAL = "manual"
OVERFLOW = "overflow"
DISPOSE = "dispose"

RETIREMENT_REASONS: tuple[str, ...] = (
    LIFETIME,
    IDLE,
    SIGNAL,
    REBALANCE,
    HOST_REMOVED,
    HOST_DOWN,
    ERROR,
    MANUAL,
    OVERFLOW,
    DISPOSE,
)


class Counters:
    """Monotonic counters of one pool.

    Updated on connect and close only, never on a plain checkout. The lock is
    an ``RLock`` because a close can run inside a garbage-collector callback
    in a thread that is already updating a counter; a plain ``Lock`` would
    deadlock there.
    """

    __slots__ = (
        "_lock",
        "connect_failures",
        "connects",
        "connects_background",
        "retirements",
    )

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.connects = 0
        self.connects_background = 0
        self.connect_failures = 0
        self.retirements: dict[str, int] = dict.fromkeys(RETIREMENT_REASONS, 0)

    def connected(self, background: bool) -> None:
        with self._lock:
            self.connects += 1
            if background:
                self.connects_background += 1

    def connect_failed(self) -> None:
        with self._lock:
            self.connect_failures += 1

    def retired(self, reason: str) -> None:
        with self._lock:
            self.retirements[reason] = self.retirements.get(reason, 0) + 1


@dataclass(frozen=True)
class HostStats:
    """Connections of one pool to one host, and what the pool knows of it.

    ``host`` is the key used everywhere (``address:port``); ``name`` is the
    DNS name or host given, ``address`` what it resolved to. ``health`` is
    ``up``, ``suspect`` (a recent failure), ``down`` (``unhealthy_threshold``
    failures in a row) or ``removed`` (gone from DNS or the host list while
    connections to it remain). ``failures`` counts every failed connect or
    check since the pool started.
    """

    host: str
    open: int = 0
    idle: int = 0
    in_use: int = 0
    healthy: bool = True
    role: str = "unknown"
    tier: int = 0
    failures: int = 0
    name: str | None = None
    address: str | None = None
    health: str = "up"
    last_error: str | None = None
    #: Why it is suspect or down: ``deadline exceeded`` (it hangs: no answer
    #: within ``health_check_timeout``), ``refused`` or ``error``; None when up.
    reason: str | None = None
    #: Seconds the host's current health check has been running (None: none is).
    check_in_flight: float | None = None


@dataclass(frozen=True)
class BusStats:
    """Cluster-wide command bus figures (zero when no ``broadcast`` is configured).

    The message counts are those of the process's listener for this bus,
    shared by every pool on it; ``commands_*`` are this pool's own.
    ``rejected`` counts refused messages by kind (``bad_signature``,
    ``stale``, ``replayed``...; see ``sqla_rebalance.bus.message``);
    ``duplicates`` are commands read twice (live and from the log), which
    is normal after a reconnect and not a rejection.
    """

    generation_applied: int = 0
    messages_accepted: int = 0
    messages_rejected: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    connected: bool = False
    url: str | None = None
    channel: str | None = None
    reconnects: int = 0
    #: Commands applied to this pool, folded into another by
    #: ``min_recycle_interval``, and waiting for it.
    commands_applied: int = 0
    commands_coalesced: int = 0
    commands_pending: int = 0
    last_error: str | None = None
    #: This process on the bus (``hostname:pid:token``).
    process: str | None = None


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of one pool, as returned by ``pool.stats()``.

    ``open`` counts every connection the pool holds: ``idle + in_use`` plus
    ``spares`` and ``retiring``, which are neither.

    ``checkouts_waited`` counts checkouts that had to open a connection
    themselves (the connect time was paid inside the request); the
    maintenance worker exists to keep it at zero after warm-up.
    """

    pool_name: str
    pool_size: int
    max_overflow: int
    recycle: float
    recycle_jitter: float
    min_size: int
    max_idle: float | None
    open: int
    idle: int
    in_use: int
    pinned: int
    #: Opened in advance to replace in-use connections that are due.
    spares: int
    #: Handed over at checkin, about to be closed by the worker.
    retiring: int
    connects: int
    connect_failures: int
    checkouts_waited: int
    retirements: dict[str, int]
    hosts: dict[str, HostStats] = field(default_factory=dict)
    bus: BusStats = field(default_factory=BusStats)

    def as_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable data."""
        return asdict(self)


def collect(
    config: PoolConfig,
    counters: Counters,
    states: Iterable[tuple[ConnectionPoolEntry, ConnState]],
    idle: Iterable[ConnectionPoolEntry],
    *,
    spares: int,
    retiring: int,
    hostset: HostSet | None,
    check_in_flight: Callable[[str], float | None],
    bus: BusStats,
) -> PoolStats:
    """The snapshot of one pool: its open connections (``states``), those of
    them in the idle queue (``idle``), and what it knows of its hosts."""
    idle_ids = {id(r) for r in idle}
    per_host: dict[str, dict[str, int]] = {}
    pinned = 0
    for rec, state in states:
        if state.closed or rec.dbapi_connection is None:
            continue
        h = per_host.setdefault(state.host, {"open": 0, "idle": 0, "in_use": 0})
        h["open"] += 1
        if rec.in_use:
            h["in_use"] += 1
        elif id(rec) in idle_ids:
            h["idle"] += 1
        pinned += state.pinned
    c = counters
    return PoolStats(
        pool_name=config.pool_name,
        pool_size=config.pool_size,
        max_overflow=config.max_overflow,
        recycle=config.recycle,
        recycle_jitter=config.recycle_jitter,
        min_size=config.min_size,
        max_idle=config.max_idle,
        open=sum(h["open"] for h in per_host.values()),
        idle=sum(h["idle"] for h in per_host.values()),
        in_use=sum(h["in_use"] for h in per_host.values()),
        pinned=pinned,
        # Spares count as open (they are connected) but neither idle nor in use.
        spares=spares,
        retiring=retiring,
        connects=c.connects,
        connect_failures=c.connect_failures,
        checkouts_waited=c.connects - c.connects_background,
        retirements=dict(c.retirements),
        hosts=_host_stats(per_host, hostset, check_in_flight),
        bus=bus,
    )


def _host_stats(
    per_host: dict[str, dict[str, int]],
    hostset: HostSet | None,
    check_in_flight: Callable[[str], float | None],
) -> dict[str, HostStats]:
    out: dict[str, HostStats] = {}
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
            check_in_flight=check_in_flight(host.key),
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
