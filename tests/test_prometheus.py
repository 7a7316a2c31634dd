"""The Prometheus collector: real engines on SQLite, scraped with ``generate_latest``."""

from __future__ import annotations

import gc
import importlib
import sys

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import QueuePool

from sqla_rebalance import RETIREMENT_REASONS, RebalancingQueuePool, pin, unpin

from .helpers import wait_for

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from sqla_rebalance.prometheus import RebalanceCollector, register  # noqa: E402

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(registry: CollectorRegistry) -> tuple[str, Samples]:
    """The exposition text, and its samples keyed by (name, labels)."""
    body = generate_latest(registry).decode()
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return body, out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(f"sqla_rebalance_{name}", frozenset(labels.items()))]


def matching(samples: Samples, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """Samples of ``name`` whose labels include ``labels`` (others may vary, e.g. role)."""
    return [
        (dict(k), v)
        for (n, k), v in samples.items()
        if n == f"sqla_rebalance_{name}" and labels.items() <= dict(k).items()
    ]


def pools_in(samples: Samples) -> set[str]:
    return {dict(labels)["pool"] for _, labels in samples}


@pytest.fixture
def made(tmp_path):
    engines = []

    def make(name="orders", file="app.db", **kw):
        kw.setdefault("pool_size", 3)
        kw.setdefault("max_overflow", 0)
        engine = create_engine(
            f"sqlite:///{tmp_path / file}", poolclass=RebalancingQueuePool, pool_name=name, **kw
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


def test_samples_follow_checkouts_pinning_and_recycle(made):
    engine = made("orders")
    registry = CollectorRegistry()
    register(engine, registry)

    c1, c2 = engine.connect(), engine.connect()
    c1.execute(text("select 1"))
    c1.close()
    pin(c2)
    body, s = scrape(registry)
    pool = {"pool": "orders"}
    host = {**pool, "host": "local"}
    assert value(s, "connections", **host, state="idle") == 1
    assert value(s, "connections", **host, state="in_use") == 1
    assert value(s, "connections_open", **host) == 2
    assert value(s, "host_healthy", **host, tier="0", role="unknown") == 1
    assert value(s, "host_failures_total", **host) == 0
    assert value(s, "connects_total", **pool) == 2
    assert value(s, "checkouts_waited_total", **pool) == 2
    assert value(s, "connect_failures_total", **pool) == 0
    assert value(s, "pinned", **pool) == 1
    assert value(s, "spares", **pool) == 0
    assert value(s, "retiring", **pool) == 0
    reasons = {dict(k)["reason"] for n, k in s if n == "sqla_rebalance_retirements_total"}
    assert reasons == set(RETIREMENT_REASONS)
    assert all(value(s, "retirements_total", **pool, reason=r) == 0 for r in reasons)
    assert 'sqla_rebalance_connects_total{pool="orders"} 2.0' in body
    assert "# TYPE sqla_rebalance_retirements_total counter" in body
    # A scrape reads figures; it opens nothing and checks nothing out.
    assert engine.pool.stats().connects == 2
    assert engine.pool.checkedout() == 1

    unpin(c2)
    c2.close()
    engine.pool.recycle()  # both idle now: the worker replaces them in the background
    wait_for(lambda: engine.pool.stats().retirements["manual"] == 2)
    wait_for(lambda: engine.pool.stats().idle == 2)
    _, s = scrape(registry)
    assert value(s, "retirements_total", **pool, reason="manual") == 2
    assert value(s, "connects_total", **pool) == 4
    assert value(s, "checkouts_waited_total", **pool) == 2  # replacements did not wait
    assert value(s, "connections", **host, state="idle") == 2
    assert value(s, "pinned", **pool) == 0


def test_host_failures_and_health(made, tmp_path):
    good = str(tmp_path / "good.db")
    bad = str(tmp_path / "missing-dir" / "bad.db")  # cannot be opened: a refusing host
    engine = made("multi", hosts=[good, bad], unhealthy_threshold=1, pool_size=2)
    registry = CollectorRegistry()
    register(engine, registry)
    conns = [engine.connect() for _ in range(2)]  # the second goes to bad, fails, retries good
    try:
        _, s = scrape(registry)
    finally:
        for conn in conns:
            conn.close()
    pool = {"pool": "multi"}
    assert value(s, "connections_open", **pool, host=good) == 2
    assert value(s, "connections_open", **pool, host=bad) == 0
    assert value(s, "host_failures_total", **pool, host=good) == 0
    assert value(s, "host_failures_total", **pool, host=bad) >= 1
    assert value(s, "connect_failures_total", **pool) >= 1
    [(good_labels, good_up)] = matching(s, "host_healthy", **pool, host=good)
    [(bad_labels, bad_up)] = matching(s, "host_healthy", **pool, host=bad)
    assert (good_up, bad_up) == (1, 0)
    assert good_labels["tier"] == bad_labels["tier"] == "0"
    [(good_state, one)] = matching(s, "host_state", **pool, host=good)
    [(bad_state, also_one)] = matching(s, "host_state", **pool, host=bad)
    assert one == also_one == 1
    assert (good_state["health"], good_state["reason"]) == ("up", "none")
    assert (bad_state["health"], bad_state["reason"]) == ("down", "error")
    assert value(s, "host_check_in_flight_seconds", **pool, host=good) == 0


def test_two_pools_are_told_apart_by_pool_name(made):
    orders = made("orders", file="o.db")
    users = made("users", file="u.db")
    registry = CollectorRegistry()
    collector = RebalanceCollector([orders])
    registry.register(collector)
    collector.add(users)
    with orders.connect(), orders.connect(), users.connect():
        _, s = scrape(registry)
    assert value(s, "connections", pool="orders", host="local", state="in_use") == 2
    assert value(s, "connections", pool="users", host="local", state="in_use") == 1
    assert value(s, "connects_total", pool="orders") == 2
    assert value(s, "connects_total", pool="users") == 1


def test_same_pool_name_twice_is_refused(made):
    collector = RebalanceCollector([made("same", file="a.db")])
    with pytest.raises(ValueError, match="already collected"):
        collector.add(made("same", file="b.db"))


def test_adding_the_same_pool_again_is_harmless(made):
    engine = made("once")
    collector = RebalanceCollector([engine, engine])
    collector.add(engine.pool)
    assert collector.pools() == [engine.pool]


def test_a_garbage_collected_engine_disappears(made, tmp_path):
    keep = made("keep", file="k.db")
    registry = CollectorRegistry()
    register(keep, registry)
    gone = create_engine(
        f"sqlite:///{tmp_path / 'g.db'}", poolclass=RebalancingQueuePool, pool_name="gone"
    )
    register(gone, registry)
    with gone.connect() as conn:
        conn.execute(text("select 1"))
    assert pools_in(scrape(registry)[1]) == {"keep", "gone"}
    gone.dispose()
    del gone, conn
    gc.collect()
    assert pools_in(scrape(registry)[1]) == {"keep"}


def test_a_disposed_pool_disappears_but_a_disposed_engine_reports_its_new_pool(made):
    by_pool = made("by-pool", file="p.db")
    by_engine = made("by-engine", file="e.db")
    registry = CollectorRegistry()
    register(by_pool.pool, registry)
    register(by_engine, registry)
    with by_pool.connect(), by_engine.connect():
        pass
    _, s = scrape(registry)
    assert pools_in(s) == {"by-pool", "by-engine"}
    assert value(s, "connects_total", pool="by-engine") == 1
    by_pool.pool.dispose()
    by_engine.dispose()  # the engine goes on with a fresh pool (counters restart)
    _, s = scrape(registry)
    assert pools_in(s) == {"by-engine"}
    assert value(s, "connects_total", pool="by-engine") == 0


def test_register_shares_one_collector_per_registry(made):
    registry = CollectorRegistry()
    first = register(made("a", file="a.db"), registry)
    second = register(made("b", file="b.db"), registry)
    assert first is second
    assert pools_in(scrape(registry)[1]) == {"a", "b"}
    # Why it is shared: a second collector of the same metrics is refused by the registry.
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(RebalanceCollector())


def test_an_engine_without_a_rebalancing_pool_is_refused(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'q.db'}", poolclass=QueuePool)
    try:
        with pytest.raises(TypeError, match="QueuePool"):
            RebalanceCollector([engine])
    finally:
        engine.dispose()


def test_an_async_engine_is_accepted(tmp_path):
    pytest.importorskip("aiosqlite")
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine

    from sqla_rebalance import AsyncRebalancingQueuePool

    engine = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'a.db'}",
        poolclass=AsyncRebalancingQueuePool,
        pool_name="async",
    )

    async def main() -> Samples:
        try:
            async with engine.connect() as conn:
                await conn.execute(text("select 1"))
            registry = CollectorRegistry()
            register(engine, registry)
            return scrape(registry)[1]
        finally:
            await engine.dispose()

    s = asyncio.run(main())
    assert value(s, "connects_total", pool="async") == 1
    assert value(s, "connections", pool="async", host="local", state="idle") == 1


def test_without_prometheus_client_the_import_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    for name in [m for m in sys.modules if m.startswith("prometheus_client.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "sqla_rebalance.prometheus")
    with pytest.raises(ImportError, match=r"pip install sqla-rebalance\[prometheus\]"):
        importlib.import_module("sqla_rebalance.prometheus")


def test_bus_figures(made, tmp_path):
    from sqla_rebalance.bus import send_command

    bus = f"sqlite:///{tmp_path}/bus.db"
    engine = made(broadcast=bus, broadcast_secret="s", min_recycle_interval=0, min_size=1)
    plain = made(name="plain", file="plain.db")
    wait_for(lambda: engine.pool.listener is not None and engine.pool.listener.connected)
    registry = CollectorRegistry()
    register(engine, registry)
    register(plain, registry)
    sent = send_command(bus, "recycle", pool="orders", secret="s")
    send_command(bus, "recycle", pool="orders", secret="wrong")
    wait_for(lambda: engine.pool.stats().bus.messages_rejected == 1)
    wait_for(lambda: engine.pool.stats().bus.generation_applied == sent.generation)
    _, samples = scrape(registry)
    assert value(samples, "bus_connected", pool="orders") == 1.0
    assert value(samples, "bus_generation_applied", pool="orders") == sent.generation
    assert value(samples, "bus_messages_total", pool="orders", result="accepted") == 1
    assert value(samples, "bus_messages_total", pool="orders", result="rejected") == 1
    assert value(samples, "bus_rejected_total", pool="orders", kind="bad_signature") == 1
    assert value(samples, "bus_rejected_total", pool="orders", kind="stale") == 0
    assert value(samples, "bus_commands_total", pool="orders", outcome="applied") == 1
    # A pool without a bus has no bus series at all.
    assert matching(samples, "bus_connected", pool="plain") == []
