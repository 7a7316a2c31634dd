"""DNS names as host sources, against a real dnsmasq (``dns_server``, TTL 1 s) and
the four PostgreSQL servers of ``pg_cluster`` (127.0.0.2-5): every A record is a
host; records added or removed move connections with the fewest moves; a DNS
outage keeps the last good set."""

from __future__ import annotations

import itertools

import dns.rcode
import pytest
from sqlalchemy import create_engine, text

from sqla_rebalance import RebalancingQueuePool

from .helpers import wait_for
from .test_dns import DnsFront

pytestmark = pytest.mark.servers

_names = itertools.count()


@pytest.fixture
def engines(pg_cluster, dns_server):
    made = []

    def make(url, **kw):
        kw.setdefault("pool_size", 12)
        kw.setdefault("max_overflow", 0)
        kw.setdefault("rebalance_spread", 0.2)
        kw.setdefault("health_check_interval", 0.5)
        kw.setdefault("dns_min_refresh", 0.2)
        kw.setdefault("dns_nameservers", [dns_server.nameserver])
        engine = create_engine(
            url,
            poolclass=RebalancingQueuePool,
            connect_args={"application_name": f"dns-{next(_names)}"},
            **kw,
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.dispose()


@pytest.fixture
def front(dns_server):
    """A resolver in front of dnsmasq (``front.fail["AAAA"] = REFUSED``): see test_dns.DnsFront."""
    with DnsFront(dns_server.nameserver) as server:
        yield server
    assert not server.errors


def addresses(pg_cluster):
    return [server.host for server in pg_cluster.servers]


def port(pg_cluster):
    return pg_cluster.hosts[0].rsplit(":", 1)[1]


def fill(engine, n):
    conns = [engine.connect() for _ in range(n)]
    for conn in conns:
        conn.close()


def per_host(engine):
    hosts = engine.pool.stats().hosts.items()
    return {k: h.open for k, h in hosts if h.open or h.health != "removed"}


def test_url_name_expands_to_every_record_and_tls_name_is_kept(
    engines, pg_cluster, dns_server, dns_name
):
    ips = addresses(pg_cluster)[:3]
    dns_server.set(dns_name, ips)
    engine = engines(f"postgresql+psycopg://app:app@{dns_name}:{port(pg_cluster)}/app")
    fill(engine, 12)
    p = port(pg_cluster)
    assert per_host(engine) == {f"{ip}:{p}": 4 for ip in ips}
    for host in engine.pool.stats().hosts.values():
        assert host.name == dns_name
    with engine.connect() as conn:
        info = conn.connection.driver_connection.info
        # libpq connected to the address but knows the name (for TLS checks).
        assert info.host == dns_name
        assert info.hostaddr in ips
        assert conn.execute(text("select host(inet_server_addr())")).scalar() == info.hostaddr


def test_record_added_gets_its_share_with_minimal_moves(engines, pg_cluster, dns_server, dns_name):
    ips = addresses(pg_cluster)
    p = port(pg_cluster)
    dns_server.set(dns_name, ips[:3])
    engine = engines(f"postgresql+psycopg://app:app@{dns_name}:{p}/app")
    fill(engine, 12)
    dns_server.set(dns_name, ips)
    wait_for(lambda: per_host(engine).get(f"{ips[3]}:{p}", 0) == 3, timeout=10)
    wait_for(lambda: sorted(per_host(engine).values()) == [3, 3, 3, 3])
    # 4+4+4 over four hosts: one leaves each old host, the minimum.
    assert engine.pool.stats().retirements["rebalance"] == 3


def test_record_removed_moves_its_connections(engines, pg_cluster, dns_server, dns_name):
    ips = addresses(pg_cluster)
    p = port(pg_cluster)
    dns_server.set(dns_name, ips)
    engine = engines(f"postgresql+psycopg://app:app@{dns_name}:{p}/app")
    fill(engine, 12)
    dns_server.set(dns_name, ips[:3])
    wait_for(lambda: f"{ips[3]}:{p}" not in per_host(engine), timeout=10)
    assert sorted(per_host(engine).values()) == [4, 4, 4]
    retired = engine.pool.stats().retirements
    assert retired["host_removed"] == 3
    assert retired["rebalance"] == 0


def test_hosts_argument_with_a_name_and_a_backup_tier(engines, pg_cluster, dns_server, dns_name):
    ips = addresses(pg_cluster)
    p = port(pg_cluster)
    dns_server.set(dns_name, ips[:2])
    engine = engines(pg_cluster.servers[0].url(), hosts=[f"{dns_name}:{p}", [f"{ips[3]}:{p}"]])
    fill(engine, 12)
    assert per_host(engine) == {f"{ips[0]}:{p}": 6, f"{ips[1]}:{p}": 6, f"{ips[3]}:{p}": 0}
    assert engine.pool.stats().hosts[f"{ips[3]}:{p}"].tier == 1


@pytest.mark.parametrize("trouble", ["server stopped", "nxdomain", "no records"])
def test_dns_trouble_never_empties_the_pool(engines, pg_cluster, dns_server, dns_name, trouble):
    ips = addresses(pg_cluster)[:3]
    p = port(pg_cluster)
    dns_server.set(dns_name, ips)
    engine = engines(f"postgresql+psycopg://app:app@{dns_name}:{p}/app", dns_max_refresh=1)
    fill(engine, 12)
    if trouble == "server stopped":
        dns_server.stop()
    elif trouble == "nxdomain":
        dns_server.remove(dns_name)
    else:
        dns_server.set(dns_name, [])
    hostset = engine.pool.hostset
    wait_for(lambda: hostset.dns_failures >= 2, timeout=15)
    # Same hosts, same connections, checkouts fine.
    assert per_host(engine) == {f"{ip}:{p}": 4 for ip in ips}
    for _ in range(20):
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    assert engine.pool.stats().retirements["host_removed"] == 0
    if trouble == "server stopped":
        dns_server.start()
    dns_server.set(dns_name, addresses(pg_cluster))
    wait_for(lambda: len(per_host(engine)) == 4, timeout=15)


@pytest.mark.parametrize(
    "rcode", [dns.rcode.REFUSED, dns.rcode.SERVFAIL], ids=["REFUSED", "SERVFAIL"]
)
def test_a_resolver_refusing_aaaa_still_spreads_over_the_a_records(
    engines, pg_cluster, dns_server, front, dns_name, rcode
):
    # Container and corporate resolvers that refuse AAAA: the A records are the hosts (the
    # name was handed to the driver as is before, which cannot resolve it at all).
    ips = addresses(pg_cluster)
    p = port(pg_cluster)
    front.fail["AAAA"] = rcode
    dns_server.set(dns_name, ips[:3])
    engine = engines(
        f"postgresql+psycopg://app:app@{dns_name}:{p}/app",
        dns_nameservers=[front.nameserver],
    )
    fill(engine, 12)
    assert per_host(engine) == {f"{ip}:{p}": 4 for ip in ips[:3]}
    hostset = engine.pool.hostset
    assert hostset.dns_failures == 0
    # Changes are still followed while AAAA stays refused.
    dns_server.set(dns_name, ips)
    wait_for(lambda: sorted(per_host(engine).values()) == [3, 3, 3, 3], timeout=15)
    assert hostset.dns_failures == 0
    assert {t for n, t in front.queries if n == dns_name + "."} == {"A", "AAAA"}
