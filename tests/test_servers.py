"""The test servers themselves: distinct loopback hosts on one port, real host failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from .servers import PORT_ENV, PostgresCluster, PostgresServer, find_free_port

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
