"""PyMySQL has no multi-host support of its own: two real MariaDB servers
(``mariadb_cluster``, 127.0.0.12-13) behind one pool. Spread, failover inside the
checkout, ``@@read_only`` as the standby role, and DNS names (the TLS name is kept:
PyMySQL gets ``host=<name>`` and a socket we opened to the address)."""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import create_engine, text

from sqla_rebalance import RebalancingQueuePool

from .helpers import wait_for

pytestmark = pytest.mark.servers

_users = itertools.count()


@pytest.fixture
def engines(mariadb_cluster):
    made = []

    def make(url=None, **kw):
        kw.setdefault("pool_size", 6)
        kw.setdefault("max_overflow", 0)
        kw.setdefault("health_check_interval", 0.3)
        kw.setdefault("rebalance_spread", 0.1)
        kw.setdefault("hosts", mariadb_cluster.hosts)
        engine = create_engine(
            url or mariadb_cluster.servers[0].url(), poolclass=RebalancingQueuePool, **kw
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.dispose()


def fill(engine, n):
    conns = [engine.connect() for _ in range(n)]
    # Which server: each instance listens on its own address.
    where = [c.execute(text("select @@bind_address")).scalar() for c in conns]
    for conn in conns:
        conn.close()
    return where


def per_host(engine):
    return {k: h.open for k, h in engine.pool.stats().hosts.items()}


@pytest.fixture
def read_only(mariadb_cluster):
    changed = []

    def set_read_only(server, value):
        admin = create_engine(server.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"set global read_only = {int(value)}"))
        admin.dispose()

    def change(server, value):
        changed.append(server)
        set_read_only(server, value)

    yield change
    for server in changed:
        if server.is_running():
            set_read_only(server, False)


def test_even_spread_and_roles(engines, mariadb_cluster):
    engine = engines()
    where = fill(engine, 6)
    assert sorted(where) == sorted([s.host for s in mariadb_cluster.servers] * 3)
    stats = engine.pool.stats()
    assert sorted(h.open for h in stats.hosts.values()) == [3, 3]
    assert {h.role for h in stats.hosts.values()} == {"primary"}


def test_failover_inside_the_checkout_and_failback(engines, mariadb_cluster):
    engine = engines(pool_pre_ping=True)
    fill(engine, 6)
    victim = mariadb_cluster.servers[1]
    victim.stop()
    # Every checkout succeeds: dead pooled connections fail their ping, the
    # reconnect goes to the other server.
    assert fill(engine, 6) == [mariadb_cluster.servers[0].host] * 6
    wait_for(lambda: engine.pool.stats().hosts[mariadb_cluster.hosts[1]].health == "down")
    victim.start()
    wait_for(lambda: sorted(per_host(engine).values()) == [3, 3], timeout=20)


def test_read_only_server_is_a_standby(engines, mariadb_cluster, read_only):
    a, b = mariadb_cluster.hosts
    engine = engines(target_role="primary")
    fill(engine, 6)
    assert per_host(engine) == {a: 3, b: 3}
    read_only(mariadb_cluster.servers[1], True)
    # The health check (a query on an idle connection) sees the new role; the
    # connections move off it.
    wait_for(lambda: engine.pool.stats().hosts[b].role == "standby", timeout=10)
    wait_for(lambda: per_host(engine) == {a: 6, b: 0}, timeout=10)
    assert fill(engine, 6) == [mariadb_cluster.servers[0].host] * 6


def test_dns_name_keeps_the_tls_name(engines, mariadb_cluster, dns_server, dns_name):
    addresses = [s.host for s in mariadb_cluster.servers]
    port = mariadb_cluster.servers[0].port
    dns_server.set(dns_name, addresses)
    engine = engines(
        f"mysql+pymysql://app:app@{dns_name}:{port}/app",
        hosts=None,
        dns_nameservers=[dns_server.nameserver],
    )
    assert sorted(fill(engine, 6)) == sorted(addresses * 3)
    with engine.connect() as conn:
        # PyMySQL knows the name (what it would verify a certificate against).
        assert conn.connection.driver_connection.host == dns_name
