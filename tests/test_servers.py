"""The test servers themselves: distinct loopback hosts on one port, real host failures;
MariaDB, a PostgreSQL primary/standby pair, Redis and a DNS server (dnsmasq)."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.exception
import dns.resolver
import psycopg
import pymysql
import pytest
import redis
import sqlalchemy as sa

from sqla_rebalance.devservers import (
    PORT_ENV,
    DnsServer,
    MariaDBCluster,
    MariaDBServer,
    PostgresCluster,
    PostgresReplicaPair,
    PostgresServer,
    RedisServer,
    find_free_port,
    find_program,
)

ROOT = Path(__file__).resolve().parent.parent


def server_identity(server: PostgresServer) -> tuple[str, int, str, bool]:
    with psycopg.connect(server.dsn(), connect_timeout=5) as conn:
        row = conn.execute(
            "select host(inet_server_addr()), inet_server_port(), current_user, "
            "(select rolsuper from pg_roles where rolname = current_user)"
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2], row[3]


def accepts_connections(server: PostgresServer) -> bool:
    try:
        with psycopg.connect(server.dsn(), connect_timeout=5) as conn:
            return conn.execute("select 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


@pytest.mark.servers
def test_instances_are_distinct_hosts_on_one_port(pg_cluster: PostgresCluster) -> None:
    servers = pg_cluster.servers
    assert len(servers) == 4
    assert len({s.host for s in servers}) == 4
    assert {s.port for s in servers} == {pg_cluster.port}
    for server in servers:
        assert server.is_running()
        assert server_identity(server) == (server.host, server.port, "app", True)
        assert server.url() == f"postgresql+psycopg://app:app@{server.host}:{server.port}/app"
    assert pg_cluster.hosts == [f"{s.host}:{s.port}" for s in servers]


def test_url_and_dsn_formats() -> None:
    server = PostgresServer("127.0.0.9", 5555, "/nonexistent")
    assert server.url() == "postgresql+psycopg://app:app@127.0.0.9:5555/app"
    assert server.url(driver=None) == "postgresql://app:app@127.0.0.9:5555/app"
    assert server.url("asyncpg", "u", "p@ss/", "db") == (
        "postgresql+asyncpg://u:p%40ss%2F@127.0.0.9:5555/db"
    )
    assert server.dsn() == "host=127.0.0.9 port=5555 user=app password=app dbname=app"
    assert "password='it\\'s secret'" in server.dsn(password="it's secret")
    assert not server.is_running()


def test_pg_fixtures_agree(
    pg_cluster: PostgresCluster, pg_server: PostgresServer, pg_url: str
) -> None:
    assert pg_server is pg_cluster.servers[0]
    assert pg_url == pg_server.url()


@pytest.mark.servers
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_stop_is_a_host_failure_and_restart_recovers(
    pg_cluster: PostgresCluster, mode: str
) -> None:
    victim, others = pg_cluster.servers[-1], pg_cluster.servers[:-1]
    held = psycopg.connect(victim.dsn(), connect_timeout=5)
    try:
        victim.stop(mode=mode)  # returns once the postmaster and its backends are gone
        assert not victim.is_running()
        with pytest.raises(psycopg.OperationalError):
            held.execute("select 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(victim.dsn(), connect_timeout=5)
        assert all(accepts_connections(server) for server in others)

        victim.restart()  # returns once the server accepts logins again
        assert victim.is_running()
        assert server_identity(victim) == (victim.host, victim.port, "app", True)
        assert all(accepts_connections(server) for server in others)
    finally:
        held.close()
        if not victim.is_running():
            victim.start()


def test_missing_binaries_error_names_the_install_script(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SQLA_REBALANCE_PG_BINDIR", str(tmp_path))  # no initdb in there
    cluster = PostgresCluster(n=1)
    with pytest.raises(RuntimeError, match=r"scripts/install-system-deps\.sh"):
        cluster.start()
    assert not cluster.base_dir.exists()


@pytest.mark.servers
def test_explicit_port_in_use_is_reported(pg_cluster: PostgresCluster) -> None:
    cluster = PostgresCluster(n=1, port=pg_cluster.port)  # 127.0.0.2 is taken by pg_cluster
    with pytest.raises(RuntimeError, match=f"port {pg_cluster.port} is already in use"):
        cluster.start()
    assert not cluster.base_dir.exists()


@pytest.mark.servers
def test_start_failure_carries_the_server_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PORT_ENV, raising=False)
    cluster = PostgresCluster(n=2, settings={"shared_buffers": "plenty"})
    with pytest.raises(RuntimeError, match=r"(?s)last lines of .*postgres\.log.*shared_buffers"):
        cluster.start()
    assert not any(server.is_running() for server in cluster.servers)
    assert not cluster.base_dir.exists()


@pytest.mark.servers
def test_context_manager_port_from_environment_and_cleanup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = find_free_port(["127.0.0.2", "127.0.0.3"])
    monkeypatch.setenv(PORT_ENV, str(port))
    with PostgresCluster(n=2) as cluster:
        assert [s.address for s in cluster.servers] == [f"127.0.0.2:{port}", f"127.0.0.3:{port}"]
        pids = [server.pid for server in cluster.servers]
        assert all(accepts_connections(server) for server in cluster.servers)
    assert not cluster.base_dir.exists()
    for pid in pids:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def run_pytest(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "CI"}
    environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # only our conftest matters; much faster
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


SELECT_ONE = ("tests/test_servers.py", "-k", "test_instances_are_distinct_hosts_on_one_port")


@pytest.mark.parametrize("ci", ["", "true"])
def test_server_that_cannot_start_is_an_error_not_a_skip(ci: str, tmp_path: Path) -> None:
    result = run_pytest(*SELECT_ONE, CI=ci, SQLA_REBALANCE_PG_BINDIR=str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error" in result.stdout
    assert "skipped" not in result.stdout
    assert "install-system-deps.sh" in result.stdout


def test_no_servers_option_skips() -> None:
    result = run_pytest(*SELECT_ONE, "--no-servers", "-rs")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "--no-servers given" in result.stdout


def test_no_servers_option_is_refused_on_ci() -> None:
    result = run_pytest(*SELECT_ONE, "--no-servers", CI="true")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert "not allowed when CI is set" in result.stderr


# --------------------------------------------------------------------------- helpers


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    interval = 0.005
    while not condition():
        assert time.monotonic() < deadline, f"not true within {timeout}s: {condition}"
        time.sleep(interval)
        interval = min(interval * 2, 0.1)


def pg_scalar(server: PostgresServer, sql: str) -> object:
    with psycopg.connect(server.dsn(), connect_timeout=5, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
    return None if row is None else row[0]


_table_names = itertools.count(1)


def unique_table() -> str:
    return f"t_servers_{os.getpid()}_{next(_table_names)}"


# --------------------------------------------------------------------------- MariaDB


@pytest.fixture
def mariadb_engines() -> Iterator[Callable[[str], sa.Engine]]:
    made: list[sa.Engine] = []

    def make(url: str) -> sa.Engine:
        engine = sa.create_engine(url, poolclass=sa.NullPool, connect_args={"connect_timeout": 5})
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.dispose()


def test_mariadb_url_format() -> None:
    server = MariaDBServer("127.0.0.12", 5555, "/nonexistent")
    assert server.url() == "mysql+pymysql://app:app@127.0.0.12:5555/app"
    assert server.url(driver=None, password="p@ss") == "mysql://app:p%40ss@127.0.0.12:5555/app"
    assert server.host == "127.0.0.12"
    assert server.address == "127.0.0.12:5555"
    assert not server.is_running()


def test_missing_program_error_names_the_install_script() -> None:
    with pytest.raises(RuntimeError, match=r"scripts/install-system-deps\.sh.*no-such-package"):
        find_program("sqla-rebalance-no-such-program", "no-such-package")


def test_mariadb_instances_are_distinct_hosts_on_one_port(
    mariadb_cluster: MariaDBCluster, mariadb_engines: Callable[[str], sa.Engine]
) -> None:
    servers = mariadb_cluster.servers
    assert [s.host for s in servers] == ["127.0.0.12", "127.0.0.13"]
    assert {s.port for s in servers} == {mariadb_cluster.port}
    assert mariadb_cluster.hosts == [f"{s.host}:{mariadb_cluster.port}" for s in servers]
    table = unique_table()
    for server in servers:
        assert server.is_running()
        assert server.url() == f"mysql+pymysql://app:app@{server.host}:{server.port}/app"
        with mariadb_engines(server.url()).begin() as conn:
            row = conn.execute(
                sa.text(
                    "select @@bind_address, @@port, current_user(), database(), @@skip_name_resolve"
                )
            ).one()
            assert tuple(row) == (server.host, server.port, "app@%", "app", 1)
            grants = " ".join(r[0] for r in conn.execute(sa.text("show grants")))
            assert "GRANT ALL PRIVILEGES ON *.* TO `app`@`%`" in grants
            conn.execute(sa.text(f"create table {table} (host varchar(20))"))
            conn.execute(sa.text(f"insert into {table} values (:h)"), {"h": server.host})
    for server in servers:  # independent databases: each has only its own row
        with mariadb_engines(server.url()).begin() as conn:
            assert conn.execute(sa.text(f"select host from {table}")).all() == [(server.host,)]
            conn.execute(sa.text(f"drop table {table}"))


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_mariadb_stop_is_a_host_failure_and_restart_recovers(
    mariadb_cluster: MariaDBCluster, mode: str
) -> None:
    victim, other = mariadb_cluster.servers[-1], mariadb_cluster.servers[0]

    def connect(server: MariaDBServer) -> pymysql.Connection:
        return pymysql.connect(
            host=server.host, port=server.port, user="app", password="app", connect_timeout=5
        )

    held = connect(victim)
    try:
        victim.stop(mode=mode)
        assert not victim.is_running()
        with pytest.raises(pymysql.err.OperationalError):
            held.ping(reconnect=False)
        with pytest.raises(pymysql.err.OperationalError):
            connect(victim)
        connect(other).close()

        victim.restart()
        assert victim.is_running()
        connect(victim).close()
    finally:
        held.close()


@pytest.mark.servers
def test_mariadb_start_failure_carries_the_server_log() -> None:
    cluster = MariaDBCluster(n=1, settings={"sqla_rebalance_no_such_option": "1"})
    with pytest.raises(
        RuntimeError, match=r"(?s)MariaDB on 127\.0\.0\.12:.*mariadb\.log.*no-such-option"
    ):
        cluster.start()
    assert not any(server.is_running() for server in cluster.servers)
    assert not cluster.base_dir.exists()


# --------------------------------------------------------------------------- DNS


def test_dns_record_set_changes_are_served_at_once(dns_server: DnsServer, dns_name: str) -> None:
    assert dns_name.endswith(".test")
    assert dns_server.nameserver == f"127.0.0.1:{dns_server.port}"
    assert dns_server.lookup(dns_name) is None  # a fresh name: NXDOMAIN

    # A client configured the way the pool is: nameserver "127.0.0.1:PORT".
    host, port = dns_server.nameserver.split(":")
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = int(port)
    resolver.lifetime = 2.0

    dns_server.set(dns_name, ["127.0.0.2", "127.0.0.3"])  # returns once served
    answer = resolver.resolve(dns_name, "A")
    assert sorted(r.address for r in answer) == ["127.0.0.2", "127.0.0.3"]
    assert answer.rrset is not None and answer.rrset.ttl == dns_server.ttl == 1
    began = time.monotonic()
    with pytest.raises(dns.resolver.NoAnswer):  # NODATA for AAAA, not a timeout
        resolver.resolve(dns_name, "AAAA")
    assert time.monotonic() - began < 0.5

    dns_server.set(dns_name, ["127.0.0.4"])
    assert [r.address for r in resolver.resolve(dns_name, "A")] == ["127.0.0.4"]
    assert dns_server.records[dns_name] == ["127.0.0.4"]

    dns_server.set(dns_name, ["::1", "127.0.0.5"])
    assert dns_server.lookup(dns_name, "A") == ["127.0.0.5"]
    assert dns_server.lookup(dns_name, "AAAA") == ["::1"]

    dns_server.remove(dns_name)
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve(dns_name, "A")
    assert dns_name not in dns_server.records


def test_dns_names_are_independent(dns_server: DnsServer, dns_name: str) -> None:
    other = dns_server.new_name()
    assert other != dns_name
    try:
        dns_server.set(dns_name, ["127.0.0.2"])
        dns_server.set(other, ["127.0.0.3"])
        assert dns_server.lookup(dns_name) == ["127.0.0.2"]
        assert dns_server.lookup(other) == ["127.0.0.3"]
    finally:
        dns_server.remove(other)
    assert dns_server.lookup(dns_name) == ["127.0.0.2"]


def test_dns_outage_times_out_and_start_recovers(dns_server: DnsServer, dns_name: str) -> None:
    dns_server.set(dns_name, ["127.0.0.2"])
    port = dns_server.port
    dns_server.stop()
    try:
        assert not dns_server.is_running()
        began = time.monotonic()
        with pytest.raises(dns.exception.Timeout):
            dns_server.lookup(dns_name, timeout=0.3)
        assert time.monotonic() - began >= 0.3
        dns_server.set(dns_name, ["127.0.0.3"])  # while down: served once it is back
    finally:
        dns_server.start()
    assert dns_server.is_running()
    assert dns_server.port == port
    assert dns_server.lookup(dns_name) == ["127.0.0.3"]


def test_dns_serves_only_loopback_addresses_under_its_domain(
    dns_server: DnsServer, dns_name: str
) -> None:
    with pytest.raises(ValueError, match="only loopback"):
        dns_server.set(dns_name, ["10.1.2.3"])
    with pytest.raises(ValueError, match=r"not a host name under \.test"):
        dns_server.set("db.example.com", ["127.0.0.2"])
    with pytest.raises(dns.resolver.NoNameservers):  # other domains: REFUSED, never forwarded
        dns_server.lookup("example.com")
    assert dns_name not in dns_server.records


# --------------------------------------------------------------------------- PostgreSQL replicas


def test_replica_pair_streams_to_a_hot_standby(
    pg_replica_pair: PostgresReplicaPair, pg_cluster: PostgresCluster
) -> None:
    primary, standby = pg_replica_pair.primary, pg_replica_pair.standby
    assert (primary.host, standby.host) == ("127.0.0.8", "127.0.0.9")
    assert primary.port == standby.port
    assert pg_replica_pair.hosts == [primary.address, standby.address]
    assert not set(pg_replica_pair.hosts) & set(pg_cluster.hosts)
    assert all(server.is_running() for server in pg_cluster.servers)

    assert pg_scalar(primary, "select pg_is_in_recovery()") is False
    assert pg_scalar(standby, "select pg_is_in_recovery()") is True
    assert pg_scalar(primary, "select state from pg_stat_replication") == "streaming"
    assert standby.url() == f"postgresql+psycopg://app:app@127.0.0.9:{standby.port}/app"

    table = unique_table()
    with psycopg.connect(primary.dsn(), autocommit=True) as conn:
        conn.execute(f"create table {table} (x int)")
        conn.execute(f"insert into {table} values (42)")

    def replicated() -> bool:
        try:
            return pg_scalar(standby, f"select x from {table}") == 42
        except psycopg.errors.UndefinedTable:
            return False

    wait_until(replicated)
    with (
        pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
        psycopg.connect(standby.dsn(), autocommit=True) as conn,
    ):
        conn.execute(f"insert into {table} values (1)")
    with psycopg.connect(primary.dsn(), autocommit=True) as conn:
        conn.execute(f"drop table {table}")


def test_replica_pair_promote_then_ensure_layout(pg_replica_pair: PostgresReplicaPair) -> None:
    primary, standby = pg_replica_pair.primary, pg_replica_pair.standby
    pg_replica_pair.promote()  # returns once the standby is out of recovery
    assert pg_replica_pair.is_promoted()
    assert pg_scalar(standby, "select pg_is_in_recovery()") is False
    with psycopg.connect(standby.dsn(), autocommit=True) as conn:
        conn.execute("create table promoted_here (x int)")  # writable now

    pg_replica_pair.ensure_layout()  # what pytest_runtest_setup does before the next test
    assert not pg_replica_pair.is_promoted()
    assert pg_scalar(standby, "select pg_is_in_recovery()") is True
    table = unique_table()
    with psycopg.connect(primary.dsn(), autocommit=True) as conn:
        conn.execute(f"create table {table} (x int)")
    wait_until(lambda: pg_scalar(standby, f"select to_regclass('{table}') is not null") is True)
    assert pg_scalar(standby, "select to_regclass('promoted_here')") is None
    with psycopg.connect(primary.dsn(), autocommit=True) as conn:
        conn.execute(f"drop table {table}")


def test_replica_pair_standby_catches_up_after_primary_restart(
    pg_replica_pair: PostgresReplicaPair,
) -> None:
    primary, standby = pg_replica_pair.primary, pg_replica_pair.standby
    primary.stop(mode="immediate")
    assert pg_scalar(standby, "select pg_is_in_recovery()") is True  # reads go on
    primary.start()
    table = unique_table()
    with psycopg.connect(primary.dsn(), autocommit=True) as conn:
        conn.execute(f"create table {table} (x int)")
    wait_until(lambda: pg_scalar(standby, f"select to_regclass('{table}') is not null") is True)
    with psycopg.connect(primary.dsn(), autocommit=True) as conn:
        conn.execute(f"drop table {table}")


# --------------------------------------------------------------------------- Redis


def test_redis_answers_and_stop_start_works(redis_server: RedisServer) -> None:
    assert redis_server.url() == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis.Redis.from_url(redis_server.url(), socket_timeout=5)
    try:
        assert client.ping() is True
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        client.set("sqla-rebalance-test", "1")

        port = redis_server.port
        redis_server.stop()
        assert not redis_server.is_running()
        with pytest.raises(redis.ConnectionError):
            client.ping()

        redis_server.start()
        assert redis_server.is_running()
        assert redis_server.port == port
        assert client.ping() is True
        assert client.get("sqla-rebalance-test") is None  # no persistence
    finally:
        client.close()


@pytest.mark.servers
def test_port_taken_before_the_first_start() -> None:
    automatic = RedisServer()
    blocker = socket.socket()  # the port is taken between the probe and the start
    blocker.bind((automatic.host, automatic.port))
    try:
        with automatic:  # moves to another port
            assert automatic.port != blocker.getsockname()[1]
            assert redis.Redis.from_url(automatic.url(), socket_timeout=5).ping() is True
        explicit = RedisServer(port=blocker.getsockname()[1])
        with pytest.raises(RuntimeError, match=r"(?s)redis\.log.*[Aa]ddress already in use"):
            explicit.start()
        assert not explicit.is_running()
        explicit.close()
        assert not explicit.directory.exists()
    finally:
        blocker.close()
    assert not automatic.directory.exists()


# --------------------------------------------------------------------------- repairs between tests
# The first test breaks every server kind and leaves it so; pytest_runtest_setup must repair
# everything before the second one (which also passes on its own).


def test_repair_between_tests_1_break_everything(
    pg_cluster: PostgresCluster,
    pg_replica_pair: PostgresReplicaPair,
    mariadb_cluster: MariaDBCluster,
    redis_server: RedisServer,
    dns_server: DnsServer,
) -> None:
    pg_cluster.servers[1].stop(mode="immediate")
    pg_replica_pair.promote()
    pg_replica_pair.primary.stop()
    mariadb_cluster.servers[0].stop(mode="immediate")
    redis_server.stop(mode="immediate")
    dns_server.stop()


def test_repair_between_tests_2_everything_is_back(
    pg_cluster: PostgresCluster,
    pg_replica_pair: PostgresReplicaPair,
    mariadb_cluster: MariaDBCluster,
    redis_server: RedisServer,
    dns_server: DnsServer,
    dns_name: str,
) -> None:
    assert all(server.is_running() for server in pg_cluster.servers)
    assert all(server.is_running() for server in mariadb_cluster.servers)
    assert pg_replica_pair.primary.is_running() and pg_replica_pair.standby.is_running()
    assert not pg_replica_pair.is_promoted()
    assert pg_scalar(pg_replica_pair.standby, "select pg_is_in_recovery()") is True
    assert redis.Redis.from_url(redis_server.url(), socket_timeout=5).ping() is True
    assert dns_server.lookup(dns_name) is None


@pytest.mark.parametrize("module", ["sqla_rebalance.devservers", "tests.servers"])
def test_python_m_servers_dns(module: str, tmp_path: Path) -> None:
    """``python -m sqla_rebalance.devservers`` (from anywhere), and the tests' re-export."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "dns", "--record", "db.test=127.0.0.2,127.0.0.3"],
        cwd=ROOT if module.startswith("tests.") else tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("dns up in"), lines
        nameserver = lines[1].split()[1]
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [nameserver.split(":")[0]]
        resolver.port = int(nameserver.split(":")[1])
        resolver.lifetime = 2.0
        answer = resolver.resolve("db.test", "A")
        assert sorted(r.address for r in answer) == ["127.0.0.2", "127.0.0.3"]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_freeze_is_a_hang_not_a_refusal(pg_cluster: PostgresCluster) -> None:
    """A frozen server accepts TCP connections (the kernel answers) but never replies."""
    import socket

    server = pg_cluster.servers[-1]
    session = psycopg.connect(server.dsn(), connect_timeout=5, autocommit=True)
    session.execute("SELECT 1")
    with server.frozen():
        # An open session hangs too (each PostgreSQL backend is its own process group).
        answered = threading.Event()

        def ping() -> None:
            with contextlib.suppress(Exception):
                session.execute("SELECT 1")
                answered.set()

        pinger = threading.Thread(target=ping, daemon=True)
        pinger.start()
        assert not answered.wait(1.5)
        assert server.is_frozen
        with socket.create_connection((server.host, server.port), timeout=2):
            pass  # the handshake completes: not refused
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.dsn(), connect_timeout=2)
        assert time.monotonic() - started >= 1.5  # it waited: no answer, no refusal
    assert not server.is_frozen
    assert answered.wait(10)  # thawed: the pending query completes
    session.close()
    with psycopg.connect(server.dsn(), connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_frozen_server_is_thawed_by_stop(pg_cluster: PostgresCluster) -> None:
    server = pg_cluster.servers[-1]
    server.freeze()
    server.stop(mode="fast")
    assert not server.is_running() and not server.is_frozen
    pg_cluster.ensure_running()
    assert server.is_running()
