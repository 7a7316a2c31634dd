"""Prometheus metrics for sqla-rebalance pools, read from ``pool.stats()`` at scrape time.

A custom collector rather than ``Gauge``/``Counter`` objects updated by the
pool: the figures already exist in the pool, so reading them when Prometheus
asks costs nothing on the checkout path and cannot drift from ``stats()``.

Pools are held by weak reference, so registering an engine never keeps it
alive; an engine that is garbage-collected, or a pool that is disposed,
simply stops appearing. An engine is followed to its *current* pool, because
``Engine.dispose()`` replaces the pool while the engine goes on serving.

>>> from sqla_rebalance.prometheus import register
>>> register(engine)  # on prometheus_client's default REGISTRY
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import TypeAlias

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import REGISTRY, CollectorRegistry
except ImportError as err:  # tested with prometheus_client hidden from sys.modules
    raise ImportError(
        "sqla_rebalance.prometheus needs prometheus_client: pip install sqla-rebalance[prometheus]"
    ) from err

from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool

from .bus.message import REJECTION_KINDS
from .pool import RebalancingQueuePool
from .stats import RETIREMENT_REASONS, PoolStats

__all__ = ["PREFIX", "RebalanceCollector", "register"]

log = logging.getLogger("sqla_rebalance.prometheus")

PREFIX = "sqla_rebalance_"

Target: TypeAlias = Engine | AsyncEngine | Pool
_Ref: TypeAlias = "weakref.ref[Engine] | weakref.ref[RebalancingQueuePool]"


def _current_pool(ref: _Ref) -> RebalancingQueuePool | None:
    obj = ref()
    if obj is None:
        return None
    pool = obj.pool if isinstance(obj, Engine) else obj
    if not isinstance(pool, RebalancingQueuePool) or getattr(pool, "_disposed", False):
        return None
    return pool


class RebalanceCollector:
    """A ``prometheus_client`` collector for any number of rebalancing pools.

    ``pools_or_engines``: engines (sync or async) or pools to report; more can
    be added with :meth:`add`. Each pool is labelled by its ``pool_name``,
    which must therefore differ between the pools of one collector.
    """

    def __init__(self, pools_or_engines: Iterable[Target] | None = None) -> None:
        self._lock = threading.Lock()
        self._refs: list[_Ref] = []
        for target in pools_or_engines or ():
            self.add(target)

    def add(self, engine_or_pool: Target) -> None:
        """Report this engine's (or pool's) figures from now on; adding twice is harmless."""
        obj = (
            engine_or_pool.sync_engine
            if isinstance(engine_or_pool, AsyncEngine)
            else engine_or_pool
        )
        pool = obj.pool if isinstance(obj, Engine) else obj
        if not isinstance(pool, RebalancingQueuePool):
            raise TypeError(
                f"{engine_or_pool!r} does not use a RebalancingQueuePool "
                f"(its pool is a {type(pool).__name__})"
            )
        ref: _Ref = weakref.ref(obj) if isinstance(obj, Engine) else weakref.ref(pool)
        with self._lock:
            self._prune()
            for other in self._refs:
                other_pool = _current_pool(other)
                if other() is obj or other_pool is pool:
                    return
                if other_pool is not None and other_pool.pool_name == pool.pool_name:
                    # Two series with equal labels would make Prometheus reject the scrape.
                    raise ValueError(
                        f"a pool named {pool.pool_name!r} is already collected; give each "
                        "engine its own pool_name"
                    )
            self._refs.append(ref)

    def _prune(self) -> None:
        self._refs = [r for r in self._refs if r() is not None]

    def pools(self) -> list[RebalancingQueuePool]:
        """The live pools reported, one per ``pool_name``."""
        with self._lock:
            self._prune()
            refs = list(self._refs)
        out: dict[str, RebalancingQueuePool] = {}
        for ref in refs:
            pool = _current_pool(ref)
            if pool is None:
                continue
            if pool.pool_name in out and out[pool.pool_name] is not pool:
                log.warning("two pools named %r; reporting only the first", pool.pool_name)
                continue
            out[pool.pool_name] = pool
        return list(out.values())

    def describe(self) -> Iterator[Metric]:
        """The metric names, without samples: lets a registry detect clashes up front."""
        return iter(_families([]))

    def collect(self) -> Iterator[Metric]:
        """One snapshot of every pool, taken now."""
        return iter(_families([pool.stats() for pool in self.pools()]))


def _families(snapshots: list[PoolStats]) -> list[Metric]:
    def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
        return GaugeMetricFamily(PREFIX + name, doc, labels=labels)

    def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
        return CounterMetricFamily(PREFIX + name, doc, labels=labels)

    ph = ["pool", "host"]
    connections = gauge("connections", "Connections idle or in use, per host.", [*ph, "state"])
    opened = gauge(
        "connections_open", "Open connections per host (also spares and retiring ones).", ph
    )
    healthy = gauge(
        "host_healthy", "1 unless the host is marked down or removed.", [*ph, "tier", "role"]
    )
    failures = counter("host_failures", "Failed connects and checks of the host.", ph)
    state = gauge(
        "host_state",
        "1 for the host's health (up, suspect, down, removed) and why it failed "
        "(deadline_exceeded: it hangs; refused; error; none while up).",
        [*ph, "health", "reason"],
    )
    in_flight = gauge(
        "host_check_in_flight_seconds",
        "How long the host's current health check has been running (0: none is).",
        ph,
    )
    connects = counter("connects", "Connections opened by the pool.", ["pool"])
    connect_failures = counter("connect_failures", "Connects that failed.", ["pool"])
    waited = counter(
        "checkouts_waited",
        "Checkouts that had to open a connection themselves (paid inside the request).",
        ["pool"],
    )
    retirements = counter(
        "retirements", "Connections closed by the pool, by reason.", ["pool", "reason"]
    )
    spares = gauge("spares", "Connections opened ahead to replace in-use ones.", ["pool"])
    retiring = gauge("retiring", "Connections handed over at checkin, being closed.", ["pool"])
    pinned = gauge("pinned", "Connections pinned against recycling.", ["pool"])
    # Cluster-wide commands (pools with broadcast=; the message counts are the
    # process's listener's, shared by the pools on one bus).
    bus_connected = gauge(
        "bus_connected", "1 while the pool's bus listener is connected.", ["pool"]
    )
    bus_generation = gauge(
        "bus_generation_applied", "Highest command generation the listener processed.", ["pool"]
    )
    bus_messages = counter(
        "bus_messages", "Bus messages, accepted or rejected.", ["pool", "result"]
    )
    bus_rejected = counter("bus_rejected", "Rejected bus messages, by kind.", ["pool", "kind"])
    bus_commands = counter(
        "bus_commands", "Commands applied to the pool, or coalesced.", ["pool", "outcome"]
    )

    for s in snapshots:
        name = s.pool_name
        for key, h in sorted(s.hosts.items()):
            connections.add_metric([name, key, "idle"], h.idle)
            connections.add_metric([name, key, "in_use"], h.in_use)
            opened.add_metric([name, key], h.open)
            healthy.add_metric([name, key, str(h.tier), h.role], 1.0 if h.healthy else 0.0)
            failures.add_metric([name, key], h.failures)
            reason = (h.reason or "none").replace(" ", "_")
            state.add_metric([name, key, h.health, reason], 1.0)
            in_flight.add_metric([name, key], h.check_in_flight or 0.0)
        connects.add_metric([name], s.connects)
        connect_failures.add_metric([name], s.connect_failures)
        waited.add_metric([name], s.checkouts_waited)
        reasons = [*RETIREMENT_REASONS, *sorted(set(s.retirements) - set(RETIREMENT_REASONS))]
        for reason in reasons:
            retirements.add_metric([name, reason], s.retirements.get(reason, 0))
        spares.add_metric([name], s.spares)
        retiring.add_metric([name], s.retiring)
        pinned.add_metric([name], s.pinned)
        b = s.bus
        if b.url is not None:
            bus_connected.add_metric([name], 1.0 if b.connected else 0.0)
            bus_generation.add_metric([name], b.generation_applied)
            bus_messages.add_metric([name, "accepted"], b.messages_accepted)
            bus_messages.add_metric([name, "rejected"], b.messages_rejected)
            for kind in REJECTION_KINDS:
                bus_rejected.add_metric([name, kind], b.rejected.get(kind, 0))
            bus_commands.add_metric([name, "applied"], b.commands_applied)
            bus_commands.add_metric([name, "coalesced"], b.commands_coalesced)
    return [
        connections,
        opened,
        healthy,
        failures,
        state,
        in_flight,
        connects,
        connect_failures,
        waited,
        retirements,
        spares,
        retiring,
        pinned,
        bus_connected,
        bus_generation,
        bus_messages,
        bus_rejected,
        bus_commands,
    ]


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, RebalanceCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def register(engine_or_pool: Target, registry: CollectorRegistry = REGISTRY) -> RebalanceCollector:
    """Report ``engine_or_pool`` on ``registry``; returns the registry's one collector.

    One collector per registry, shared by every call, because two collectors
    emitting the same metric names on one registry is an error there.
    """
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = RebalanceCollector()
            registry.register(collector)
            _collectors[registry] = collector
    collector.add(engine_or_pool)
    return collector
