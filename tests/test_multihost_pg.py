"""Several hosts, for real: four PostgreSQL servers on 127.0.0.2-5 (the ``pg_cluster``
fixture), with the real maintenance worker. Spread, failover inside a checkout,
a host stopped and restarted under load, tiers, and rebalancing with the fewest moves.

Where connections are is checked on the servers themselves (``pg_stat_activity``,
by ``application_name``), not only in the pool's own figures.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from sqlalchemy import create_engine, exc, text

from sqla_rebalance import RebalancingQueuePool, signals
from sqla_rebalance.errors import ConfigurationError

from .helpers import wait_for

pytestmark = pytest.mark.servers

_app_names = itertools.count()


@pytest.fixture
def app_name():
    return f"multihost-{next(_app_names)}"


@pytest.fixture
def engines(pg_cluster, app_name):
    made = []

    def make(hosts=None, **kw):
        kw.setdefault("pool_size", 12)
        kw.setdefault("max_overflow", 0)
        kw.setdefault("health_check_interval", 0.5)
        kw.setdefault("rebalance_spread", 0.2)
        engine = create_engine(
            pg_cluster.servers[0].url(),
            poolclass=RebalancingQueuePool,
            hosts=pg_cluster.hosts if hosts is None else hosts,
            connect_args={"application_name": app_name},
            **kw,
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.dispose()


@pytest.fixture
def server_counts(pg_cluster, app_name):
    """Connections of this test's pool on each server, as the servers see them."""

    def count() -> dict[str, int]:
        out = {}
        for server, key in zip(pg_cluster.servers, pg_cluster.hosts, strict=True):
            if not server.is_running():
                out[key] = 0
                continue
            admin = create_engine(server.url(), poolclass=None)
            try:
                with admin.connect() as conn:
                    out[key] = conn.execute(
                        text("select count(*) from pg_stat_activity where application_name = :a"),
                        {"a": app_name},
                    ).scalar()
            finally:
                admin.dispose()
        return out

    return count


def fill(engine, n):
    """Check out n connections at once (so the pool opens n), then return them."""
    conns = [engine.connect() for _ in range(n)]
    for conn in conns:
        conn.close()


def open_per_host(engine) -> dict[str, int]:
    return {key: h.open for key, h in engine.pool.stats().hosts.items()}


class Load:
    """Threads running short transactions; every error is kept."""

    def __init__(self, engine, threads=8):
        self.engine = engine
        self.errors: list[BaseException] = []
        self.done = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self):
        while not self._stop.is_set():
            try:
                with self.engine.connect() as conn:
                    conn.execute(text("select 1"))
                self.done += 1
            except Exception as err:
                self.errors.append(err)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join()


def test_even_spread_over_four_hosts(engines, server_counts, pg_cluster):
    engine = engines()
    fill(engine, 12)
    assert sorted(open_per_host(engine).values()) == [3, 3, 3, 3]
    assert server_counts() == dict.fromkeys(pg_cluster.hosts, 3)
    stats = engine.pool.stats()
    for host in stats.hosts.values():
        assert (host.health, host.role, host.tier) == ("up", "primary", 0)
    # TLS keeps the name: libpq got host=<name> hostaddr=<address>; here names are addresses.
    with engine.connect() as conn:
        info = conn.connection.driver_connection.info
        assert f"{info.host}:{info.port}" in pg_cluster.hosts


def test_checkout_fails_over_inside_the_checkout(engines, pg_cluster):
    dead = pg_cluster.servers[1]
    dead.stop("immediate")
    downs = []
    engine = engines(unhealthy_threshold=2)
    signals.host_down.connect(lambda pool, host, **kw: downs.append(host), weak=False)
    try:
        # Every checkout opens a connection; none sees the dead host's error.
        fill(engine, 12)
        stats = engine.pool.stats()
        assert stats.hosts[dead_key(pg_cluster, 1)].open == 0
        assert stats.connect_failures >= 1
        # Evenly spread once settled: a rebalance requested by the host change may
        # have opened a spare during the fill, whose old connection closes after
        # its checkin (never while in use).
        wait_for(
            lambda: (
                sorted(
                    h.open
                    for k, h in engine.pool.stats().hosts.items()
                    if k != dead_key(pg_cluster, 1)
                )
                == [4, 4, 4]
            )
        )
        wait_for(lambda: engine.pool.stats().hosts[dead_key(pg_cluster, 1)].health == "down")
        # The signal follows the state change, from the thread that saw the failure.
        wait_for(lambda: dead_key(pg_cluster, 1) in downs)
    finally:
        signals.host_down.receivers.clear()


def dead_key(pg_cluster, i):
    return pg_cluster.hosts[i]


def test_host_stopped_and_restarted_under_load(engines, pg_cluster, server_counts):
    engine = engines(pool_pre_ping=True)
    fill(engine, 12)
    victim = pg_cluster.servers[2]
    key = pg_cluster.hosts[2]
    with Load(engine) as load:
        wait_for(lambda: load.done > 200)
        victim.stop("immediate")
        stopped_at = time.monotonic()
        wait_for(lambda: engine.pool.stats().hosts[key].health == "down")
        detected = time.monotonic() - stopped_at
        errors_during_outage = len(load.errors)
        # Its share moved to the other three hosts.
        wait_for(lambda: engine.pool.stats().hosts[key].open == 0)
        done_before = load.done
        wait_for(lambda: load.done > done_before + 200)
        victim.restart()
        # Failback: the host comes back up and gets its even share again.
        wait_for(lambda: engine.pool.stats().hosts[key].health == "up", timeout=15)
        wait_for(lambda: sorted(open_per_host(engine).values()) == [3, 3, 3, 3], timeout=15)
    # pre_ping catches dead pooled connections; only statements in flight on the
    # killed server at the stop instant can fail (at most one per thread).
    assert errors_during_outage <= 8
    assert len(load.errors) == errors_during_outage
    assert detected < 5
    assert server_counts() == dict.fromkeys(pg_cluster.hosts, 3)
    retired = engine.pool.stats().retirements
    assert retired["rebalance"] >= 3


def test_tiers_failover_and_failback(engines, pg_cluster, server_counts):
    a, b, dr, _ = pg_cluster.hosts
    engine = engines(hosts=[a, b, [dr]], pool_pre_ping=True, unhealthy_threshold=1)
    fill(engine, 12)
    assert open_per_host(engine) == {a: 6, b: 6, dr: 0}
    pg_cluster.servers[0].stop("immediate")
    pg_cluster.servers[1].stop("immediate")
    with Load(engine, threads=4) as load:
        # Tier 0 is gone: everything moves to the backup tier, no checkout fails
        # except statements in flight at the stop instant.
        wait_for(lambda: open_per_host(engine).get(dr, 0) >= 4, timeout=15)
        done = load.done
        wait_for(lambda: load.done > done + 100)
        assert all(isinstance(e, Exception) for e in load.errors)
        errors_in_outage = len(load.errors)
        pg_cluster.servers[0].restart()
        pg_cluster.servers[1].restart()

        # Failback: tier 0 healthy again, the backup tier is emptied. (The two
        # servers come back one after the other: the first takes everything,
        # then shares with the second.)
        def failed_back():
            counts = open_per_host(engine)
            return counts.get(dr, 0) == 0 and abs(counts[a] - counts[b]) <= 1

        wait_for(failed_back, timeout=20)
    assert errors_in_outage <= 4 and len(load.errors) == errors_in_outage
    counts = open_per_host(engine)
    assert counts[a] + counts[b] >= 4
    assert server_counts()[dr] == 0


def test_rebalance_after_set_hosts_moves_the_minimum(engines, pg_cluster, server_counts):
    a, b, c, d = pg_cluster.hosts
    engine = engines(hosts=[a, b])
    fill(engine, 12)
    assert open_per_host(engine) == {a: 6, b: 6}
    moved = []
    signals.connection_retired.connect(lambda pool, reason, **kw: moved.append(reason), weak=False)
    try:
        engine.pool.set_hosts([a, b, c, d])
        wait_for(lambda: sorted(open_per_host(engine).values()) == [3, 3, 3, 3])
    finally:
        signals.connection_retired.receivers.clear()
    # 6+6 over four hosts: 3 leave each old host, the minimum.
    assert moved.count("rebalance") == 6
    assert server_counts() == dict.fromkeys(pg_cluster.hosts, 3)
    # Removing a host moves its connections only.
    engine.pool.set_hosts([a, b, c])
    wait_for(lambda: open_per_host(engine).get(d, 0) == 0)
    assert sorted(open_per_host(engine).values()) == [4, 4, 4]
    assert engine.pool.stats().retirements["host_removed"] == 3
    # Nothing to do when already even.
    assert engine.pool.rebalance() == 0


def test_in_use_connections_are_never_moved_while_in_use(engines, pg_cluster):
    a, b, c, _ = pg_cluster.hosts
    engine = engines(hosts=[a, b], pool_size=4)
    held = [engine.connect() for _ in range(4)]
    pids = [conn.execute(text("select pg_backend_pid()")).scalar() for conn in held]
    engine.pool.set_hosts([a, b, c])
    # One connection must move (4 over 3 hosts): the pool opens its
    # replacement on c at once, but closes nothing in use.
    wait_for(lambda: engine.pool.stats().spares >= 1)
    assert engine.pool.stats().hosts[c].open >= 1
    for conn, pid in zip(held, pids, strict=True):
        assert conn.execute(text("select pg_backend_pid()")).scalar() == pid
    for conn in held:
        conn.close()
    # Checked in: the marked one is retired, its replacement takes its slot.
    wait_for(lambda: sorted(open_per_host(engine).values()) == [1, 1, 2])
    assert engine.pool.stats().retirements["rebalance"] == 1


def test_a_disconnect_on_one_host_leaves_the_others_alone(engines, pg_cluster):
    engine = engines(pool_size=8)
    fill(engine, 8)
    before = {r.dbapi_connection for r in engine.pool._ledger.states}
    victim_key = pg_cluster.hosts[0]
    # Kill one backend of one host: SQLAlchemy's pool-wide invalidation would
    # reconnect all eight connections; only that host's are replaced here.
    conns = [engine.connect() for _ in range(8)]
    victim = next(
        c for c in conns if c.connection.dbapi_connection.info.host == victim_key.split(":")[0]
    )
    for c in conns:
        if c is not victim:
            c.close()
    pid = victim.execute(text("select pg_backend_pid()")).scalar()
    admin = create_engine(pg_cluster.servers[0].url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as ac:
        ac.execute(text("select pg_terminate_backend(:p)"), {"p": pid})
    admin.dispose()
    with pytest.raises(exc.OperationalError):
        victim.execute(text("select 1"))
    victim.close()
    fill(engine, 8)
    after = {r.dbapi_connection for r in engine.pool._ledger.states}
    kept = before & after
    others = sum(1 for _ in before) - 2  # victim host had 2 of 8
    assert len(kept) >= others


def test_bad_host_configuration_fails_at_create_engine(pg_cluster):
    with pytest.raises(ConfigurationError, match="port"):
        create_engine(pg_cluster.servers[0].url(), poolclass=RebalancingQueuePool, hosts=["a:x"])
    with pytest.raises(ConfigurationError, match="target_role"):
        create_engine(
            pg_cluster.servers[0].url(), poolclass=RebalancingQueuePool, target_role="leader"
        )


def test_async_engine_spreads_and_fails_over(pg_cluster):
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine

    from sqla_rebalance import AsyncRebalancingQueuePool

    async def run():
        engine = create_async_engine(
            pg_cluster.servers[0].url(driver="psycopg_async"),
            poolclass=AsyncRebalancingQueuePool,
            pool_size=8,
            max_overflow=0,
            hosts=pg_cluster.hosts,
            health_check_interval=0.5,
            pool_pre_ping=True,
        )
        try:
            conns = [await engine.connect() for _ in range(8)]
            for conn in conns:
                await conn.close()
            pool = engine.sync_engine.pool
            spread = sorted(h.open for h in pool.stats().hosts.values())
            pg_cluster.servers[2].stop("immediate")
            seen = set()
            for _ in range(16):
                async with engine.connect() as conn:
                    seen.add((await conn.execute(text("select host(inet_server_addr())"))).scalar())
            for _ in range(200):  # the async probes run in this loop: give them turns
                if pool.stats().hosts[pg_cluster.hosts[2]].health == "down":
                    break
                await asyncio.sleep(0.05)
            return spread, seen, pool.stats().hosts[pg_cluster.hosts[2]].health
        finally:
            await engine.dispose()

    spread, seen, health = asyncio.run(run())
    assert spread == [2, 2, 2, 2]
    assert pg_cluster.servers[2].host not in seen and len(seen) == 3
    assert health == "down"
