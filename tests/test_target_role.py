"""``target_role`` against a real streaming replica (``pg_replica_pair``: a primary on
127.0.0.8 and a hot standby on 127.0.0.9), checked with ``pg_is_in_recovery()`` on
connect and again by health checks, so a role change is noticed."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, exc, text

from sqla_rebalance import RebalancingQueuePool
from sqla_rebalance.errors import NoHostAvailableError

from .helpers import wait_for

pytestmark = pytest.mark.servers


@pytest.fixture
def engines(pg_replica_pair):
    made = []

    def make(role, **kw):
        kw.setdefault("pool_size", 6)
        kw.setdefault("max_overflow", 0)
        kw.setdefault("health_check_interval", 0.3)
        kw.setdefault("rebalance_spread", 0.1)
        kw.setdefault("hosts", pg_replica_pair.hosts)
        engine = create_engine(
            pg_replica_pair.primary.url(),
            poolclass=RebalancingQueuePool,
            target_role=role,
            **kw,
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.dispose()


def fill(engine, n):
    conns = [engine.connect() for _ in range(n)]
    in_recovery = [c.execute(text("select pg_is_in_recovery()")).scalar() for c in conns]
    for conn in conns:
        conn.close()
    return in_recovery


def per_host(engine):
    return {k: h.open for k, h in engine.pool.stats().hosts.items()}


def test_primary_and_standby_roles(engines, pg_replica_pair):
    primary, standby = pg_replica_pair.hosts
    assert fill(engines("primary"), 6) == [False] * 6
    assert fill(engines("standby"), 6) == [True] * 6
    assert fill(engines("prefer-standby"), 6) == [True] * 6
    engine = engines("any")
    assert sorted(fill(engine, 6)) == [False] * 3 + [True] * 3
    stats = engine.pool.stats()
    assert (stats.hosts[primary].role, stats.hosts[standby].role) == ("primary", "standby")


def test_prefer_standby_falls_back_to_the_primary(engines, pg_replica_pair):
    engine = engines("prefer-standby", pool_pre_ping=True)
    assert fill(engine, 6) == [True] * 6
    pg_replica_pair.standby.stop("immediate")
    # No checkout fails: pre_ping drops the dead connections, connects go to the primary.
    assert fill(engine, 6) == [False] * 6
    pg_replica_pair.standby.restart()
    # Failback to the standby once it is healthy again.
    wait_for(lambda: per_host(engine)[pg_replica_pair.hosts[1]] == 6, timeout=20)
    assert per_host(engine)[pg_replica_pair.hosts[0]] == 0


def test_standby_only_with_no_standby_says_why(engines, pg_replica_pair):
    engine = engines("standby")
    pg_replica_pair.standby.stop("immediate")
    with pytest.raises(exc.OperationalError, match=r"127\.0\.0\.9"):
        engine.connect()  # the driver's error: the standby was tried and refused
    engine2 = engines("standby", hosts=[pg_replica_pair.hosts[0]])
    with pytest.raises(NoHostAvailableError, match="is a primary"):
        engine2.connect()


def test_promoted_standby_is_noticed_by_health_checks(engines, pg_replica_pair):
    primary, standby = pg_replica_pair.hosts
    engine = engines("primary")
    fill(engine, 6)
    assert per_host(engine) == {primary: 6, standby: 0}
    pg_replica_pair.promote()
    # Nothing on the standby to ping: it is probed now and then (a connect), which
    # shows the new role. Two primaries now: a rebalance spreads over both.
    wait_for(lambda: engine.pool.stats().hosts[standby].role == "primary", timeout=10)
    wait_for(lambda: per_host(engine) == {primary: 3, standby: 3}, timeout=10)
    assert engine.pool.stats().retirements["rebalance"] == 3


@pytest.fixture
def no_role_query(pg_cluster):
    """A database on two servers where the login role may not run ``pg_is_in_recovery()``:
    what a PostgreSQL-compatible system or proxy without the function looks like."""
    import psycopg

    servers = pg_cluster.servers[:2]
    for server in servers:
        with psycopg.connect(server.dsn(), autocommit=True) as admin:
            admin.execute("DROP DATABASE IF EXISTS norole")
            admin.execute("DROP ROLE IF EXISTS norole")
            admin.execute("CREATE ROLE norole LOGIN PASSWORD 'norole' NOSUPERUSER")
            admin.execute("CREATE DATABASE norole OWNER norole")
        with psycopg.connect(server.dsn(database="norole"), autocommit=True) as admin:
            admin.execute("REVOKE EXECUTE ON FUNCTION pg_is_in_recovery() FROM PUBLIC")
    yield [server.url(user="norole", password="norole", database="norole") for server in servers]
    for server in servers:
        with psycopg.connect(server.dsn(), autocommit=True) as admin:
            admin.execute("DROP DATABASE IF EXISTS norole WITH (FORCE)")
            admin.execute("DROP ROLE IF EXISTS norole")


def test_a_server_that_cannot_answer_the_role_query_is_used_with_any_role(
    pg_cluster, no_role_query
):
    hosts = pg_cluster.hosts[:2]
    engine = create_engine(
        no_role_query[0],
        poolclass=RebalancingQueuePool,
        hosts=hosts,
        pool_size=4,
        max_overflow=0,
        health_check_interval=0.2,
    )
    try:
        # The role is informational: no NoHostAvailableError at connect.
        with engine.connect() as conn, pytest.raises(Exception, match="permission denied"):
            conn.execute(text("SELECT pg_is_in_recovery()"))
        conns = [engine.connect() for _ in range(4)]
        for conn in conns:
            assert conn.execute(text("SELECT 1")).scalar() == 1
            conn.close()
        failures_then = {k: h.failures for k, h in engine.pool.stats().hosts.items()}
        # A window of five health-check intervals (a sleep measures absence here: no
        # check may fail in it; each check pings with SELECT 1 now).
        time.sleep(1.0)
        stats = engine.pool.stats()
        for key in hosts:
            assert (stats.hosts[key].health, stats.hosts[key].role) == ("up", "unknown")
            assert stats.hosts[key].failures == failures_then[key] == 0
            assert stats.hosts[key].open == 2
        wait_for(lambda: engine.pool.stats().connect_failures == 0)
    finally:
        engine.dispose()
    # A role requested: not knowing it is a reason to refuse the host.
    strict = create_engine(
        no_role_query[0], poolclass=RebalancingQueuePool, hosts=hosts, target_role="primary"
    )
    try:
        with pytest.raises(Exception, match="role check failed"):
            strict.connect()
    finally:
        strict.dispose()
