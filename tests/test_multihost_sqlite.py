"""Host rotation with SQLite database files standing in for hosts: no server needed.

A file in a directory that does not exist cannot be opened, which makes a
"host" that refuses connections.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from sqlalchemy import create_engine, exc, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import QueuePool

from sqla_rebalance import AsyncRebalancingQueuePool, RebalancingQueuePool, clock
from sqla_rebalance.errors import ConfigurationError

from .helpers import manual_maintenance, wait_for


@pytest.fixture
def files(tmp_path):
    return [str(tmp_path / f"host{i}.db") for i in range(3)]


@pytest.fixture
def make(files):
    made = []

    def make(hosts=None, **kw):
        kw.setdefault("pool_size", 6)
        kw.setdefault("max_overflow", 0)
        engine = create_engine(
            f"sqlite:///{files[0]}",
            poolclass=RebalancingQueuePool,
            hosts=files if hosts is None else hosts,
            **kw,
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.dispose()


def fill(engine, n):
    conns = [engine.connect() for _ in range(n)]
    for conn in conns:
        conn.close()


def where(conn) -> str:
    return conn.execute(text("select file from pragma_database_list where name='main'")).scalar()


def test_connections_spread_and_go_to_the_chosen_file(make, files):
    engine = make()
    conns = [engine.connect() for _ in range(6)]
    per_host = {k: h.open for k, h in engine.pool.stats().hosts.items()}
    assert per_host == dict.fromkeys(files, 2)
    # Each connection really is on the file its host key says.
    for conn in conns:
        state = conn.connection._connection_record.info["sqla_rebalance"]
        assert where(conn) == state.host
        conn.close()


def test_a_refusing_host_is_skipped_within_the_checkout(make, files, tmp_path, monkeypatch):
    manual_maintenance(monkeypatch)
    bad = str(tmp_path / "missing-dir" / "x.db")
    engine = make(hosts=[bad, *files[:2]], unhealthy_threshold=2)
    fill(engine, 6)  # no error reaches the caller
    stats = engine.pool.stats()
    # One failure makes it suspect: later connects avoid it, no user pays twice.
    assert stats.hosts[bad].health == "suspect"
    assert stats.connect_failures == 1
    assert "unable to open" in stats.hosts[bad].last_error
    assert sorted(h.open for h in stats.hosts.values()) == [0, 3, 3]
    # The health check probes it (outside the pool) and confirms: down.
    engine.pool._maintenance.checks.run_due(time.time() + 60)
    wait_for(lambda: engine.pool.stats().hosts[bad].health == "down")
    stats = engine.pool.stats()
    assert (stats.hosts[bad].health, stats.hosts[bad].failures) == ("down", 2)
    assert stats.connect_failures == 1  # probes are not pool connects
    assert sorted(h.open for h in stats.hosts.values()) == [0, 3, 3]


def test_host_events_go_to_the_pools_own_logger(make, files, tmp_path, caplog):
    # SQLAlchemy's pool logger (as echo_pool and logging.getLogger("sqlalchemy.pool")
    # see it), naming the pool, rather than a logger of ours users do not know.
    bad = str(tmp_path / "missing-dir" / "x.db")
    engine = make(hosts=[bad, *files[:2]], unhealthy_threshold=1, pool_logging_name="orders")
    with caplog.at_level(logging.INFO, logger="sqlalchemy.pool"):
        fill(engine, 3)  # least connections: the third connect at the latest tries `bad`
        wait_for(lambda: engine.pool.stats().hosts[bad].health == "down")
        wait_for(lambda: any(bad in r.getMessage() for r in caplog.records))
    lines = [r for r in caplog.records if bad in r.getMessage()]
    assert {r.name for r in lines} == {"sqlalchemy.pool.impl.RebalancingQueuePool.orders"}
    assert any("down" in r.getMessage() for r in lines)


def test_all_hosts_refusing_raises_the_driver_error(make, tmp_path):
    bad = [str(tmp_path / "nope" / f"{i}.db") for i in range(2)]
    engine = make(hosts=bad)
    with pytest.raises(exc.OperationalError, match="unable to open"):
        engine.connect()
    assert engine.pool.stats().connect_failures == 2  # each host tried once


def test_recreated_pool_keeps_the_hosts(make, files):
    engine = make()
    fill(engine, 6)
    engine.dispose()
    fill(engine, 6)
    assert {k: h.open for k, h in engine.pool.stats().hosts.items()} == dict.fromkeys(files, 2)
    assert engine.pool.config.hosts == files


def test_custom_creator_cannot_be_steered(files, caplog):
    import sqlite3

    engine = create_engine(
        "sqlite://",
        poolclass=RebalancingQueuePool,
        creator=lambda: sqlite3.connect(files[0]),
        hosts=files,
    )
    with caplog.at_level(logging.WARNING, logger="sqlalchemy.pool"):
        engine.connect().close()
    assert "hosts= is ignored" in caplog.text
    assert engine.pool.hostset is None
    engine.dispose()


def test_hosts_need_an_engine(files):
    with pytest.raises(ConfigurationError, match="create_engine"):
        RebalancingQueuePool(lambda: None, hosts=files)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"dns_min_refresh": 0}, "dns_min_refresh"),
        ({"dns_min_refresh": 10, "dns_max_refresh": 5}, "dns_max_refresh"),
        ({"health_check_interval": 0}, "health_check_interval"),
        ({"unhealthy_threshold": 0}, "unhealthy_threshold"),
        ({"rebalance_spread": -1}, "rebalance_spread"),
        ({"target_role": "master"}, "target_role"),
        ({"dns_nameservers": ["not an ip"]}, "nameserver"),
    ],
)
def test_bad_settings_fail_at_create_engine(files, kw, message):
    with pytest.raises(ConfigurationError, match=message):
        create_engine(f"sqlite:///{files[0]}", poolclass=RebalancingQueuePool, hosts=files, **kw)


def test_one_sqlite_file_is_not_managed(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path}/one.db", poolclass=RebalancingQueuePool)
    engine.connect().close()
    assert engine.pool.hostset is None
    assert list(engine.pool.stats().hosts) == ["local"]
    engine.dispose()


def test_set_hosts_on_an_unmanaged_pool_is_refused(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path}/one.db", poolclass=RebalancingQueuePool)
    with pytest.raises(ConfigurationError, match="does not manage hosts"):
        engine.pool.set_hosts(["a.db"])
    engine.dispose()


def test_plain_queuepool_unaffected_by_installed_hook(files):
    # The dialect hook only acts inside a rebalancing pool's connect.
    engine = create_engine(f"sqlite:///{files[0]}", poolclass=QueuePool)
    with engine.connect() as conn:
        assert where(conn) == files[0]
    engine.dispose()


def test_async_engine_spreads_over_files(files):
    pytest.importorskip("aiosqlite")

    async def run():
        engine = create_async_engine(
            f"sqlite+aiosqlite:///{files[0]}",
            poolclass=AsyncRebalancingQueuePool,
            pool_size=6,
            max_overflow=0,
            hosts=files,
        )
        conns = [await engine.connect() for _ in range(6)]
        seen = []
        for conn in conns:
            seen.append(
                (
                    await conn.execute(
                        text("select file from pragma_database_list where name='main'")
                    )
                ).scalar()
            )
            await conn.close()
        per_host = {k: h.open for k, h in engine.sync_engine.pool.stats().hosts.items()}
        await engine.dispose()
        return seen, per_host

    seen, per_host = asyncio.run(run())
    assert sorted(seen) == sorted(files * 2)
    assert per_host == dict.fromkeys(files, 2)


def test_lifetime_replacement_keeps_tied_hosts_even(files, monkeypatch):
    # The replacement must not count the connection it replaces: 2/2 stays 2/2.
    manual_maintenance(monkeypatch)
    for _ in range(20):
        engine = create_engine(
            f"sqlite:///{files[0]}",
            poolclass=RebalancingQueuePool,
            hosts=files[:2],
            pool_size=4,
            max_overflow=0,
            pool_recycle=1000,
            recycle_jitter=0.0,
            health_check_interval=None,
        )
        fill(engine, 4)
        pool = engine.pool
        state = next(s for s in pool._ledger.states.values() if s.host == files[0])
        state.ends_at = clock.now() - 1  # its lifetime is over (the scheduling clock)
        pool._maintenance.maintain()
        assert pool.stats().retirements["lifetime"] == 1
        assert sorted(h.open for h in pool.stats().hosts.values()) == [2, 2]
        engine.dispose()


def test_a_retire_mark_does_not_outlive_the_connection_it_was_for(files, monkeypatch):
    manual_maintenance(monkeypatch)
    engine = create_engine(
        f"sqlite:///{files[0]}", poolclass=RebalancingQueuePool, pool_size=1, max_overflow=0
    )
    pool = engine.pool
    conn = pool.connect()
    rec = conn._connection_record
    old_state = rec.info["sqla_rebalance"]
    conn.close()
    rec.invalidate()  # a disconnect: the next checkout reconnects this record
    conn = pool.connect()
    assert conn._connection_record is rec and rec.info["sqla_rebalance"] is not old_state
    # A mark made for the old connection (the worker could not swap it, it was
    # checked out) must not close the new, healthy one at checkin.
    pool._doomed[rec] = ("error", old_state)
    new_dbapi = rec.dbapi_connection
    conn.close()
    assert rec.dbapi_connection is new_dbapi
    assert not pool._ledger.retiring
    engine.dispose()


def test_a_rebalance_is_carried_out_even_when_its_request_was_taken_by_another_pass(
    files, monkeypatch
):
    """Hosts changed while a pass was running: that pass took the request (the
    ``dirty`` flag) and the next one only finds ``rebalance_requested``. It marks
    connections to move: it must plan their retirement, not leave them for the
    idle safety net (a minute later)."""
    manual_maintenance(monkeypatch)
    engine = create_engine(
        f"sqlite:///{files[0]}",
        poolclass=RebalancingQueuePool,
        hosts=files[:1],
        pool_size=4,
        max_overflow=0,
        rebalance_spread=0.0,
        health_check_interval=None,
    )
    try:
        fill(engine, 4)
        pool = engine.pool
        pool._maintenance.maintain()
        pool.set_hosts(files[:2])
        pool._schedule.dirty = False  # taken by a pass that ran meanwhile
        pool._maintenance.maintain()
        assert pool.stats().retirements["rebalance"] == 2
        assert sorted(h.open for h in pool.stats().hosts.values()) == [2, 2]
    finally:
        engine.dispose()
