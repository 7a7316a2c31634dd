"""The Django integration in fresh processes: Django's own test runner on test databases
(``python -m django test``, serial and ``--parallel``), and ``manage.py check`` with good and
bad ``SQLA_REBALANCE`` settings. Each subprocess configures Django from
``tests.django_project.settings`` (``DJTEST_*`` variables, see tests/django_project/config.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pymysql
import pytest

pytest.importorskip("django")

ROOT = Path(__file__).resolve().parents[1]


def run_django(*args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("DJTEST_") and key != "DJANGO_SETTINGS_MODULE"
    }
    full_env.update(env, DJANGO_SETTINGS_MODULE="tests.django_project.settings")
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def pg_databases(server) -> set[str]:
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def mariadb_databases(server) -> set[str]:
    conn = pymysql.connect(host=server.host, port=server.port, user="app", password="app")
    try:
        with conn.cursor() as cursor:
            cursor.execute("SHOW DATABASES")
            return {row[0] for row in cursor.fetchall()}
    finally:
        conn.close()


@pytest.fixture
def servers_env(pg_cluster, mariadb_cluster):
    pg, maria = pg_cluster.servers[0], mariadb_cluster.servers[0]
    assert not {n for n in pg_databases(pg) if n.startswith("test_app")}
    assert not {n for n in mariadb_databases(maria) if n.startswith("test_app")}
    return {"DJTEST_PG": pg.address, "DJTEST_MARIADB": maria.address}


@pytest.mark.parametrize("parallel", ["1", "2"])
def test_djangos_test_runner_uses_the_pools_on_test_databases(
    servers_env, pg_cluster, mariadb_cluster, parallel
):
    done = run_django(
        "test",
        "tests.django_project.shop",
        "--noinput",
        "-v",
        "2",
        "--parallel",
        parallel,
        **servers_env,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Ran 4 tests" in output
    assert "\nOK" in output
    for alias in ("default", "maria"):
        assert f"Creating test database for alias '{alias}'" in output
        assert f"Destroying test database for alias '{alias}'" in output
        if parallel == "2":
            assert f"Cloning test database for alias '{alias}'" in output
    # Dropped despite the pools (a pooled session left open would make DROP DATABASE fail).
    assert not {n for n in pg_databases(pg_cluster.servers[0]) if n.startswith("test_app")}
    assert not {
        n for n in mariadb_databases(mariadb_cluster.servers[0]) if n.startswith("test_app")
    }


def test_check_passes_with_good_settings_and_warns_about_conn_max_age(servers_env):
    done = run_django("check", "--database", "default", **servers_env)
    assert done.returncode == 0, done.stderr
    assert "sqla_rebalance.W001" not in done.stdout + done.stderr
    done = run_django("check", "--database", "default", DJTEST_CONN_MAX_AGE="60", **servers_env)
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert "sqla_rebalance.W001" in out
    assert "DATABASES['default']['CONN_MAX_AGE'] is 60" in out
    assert "DATABASES['maria']['CONN_MAX_AGE'] is 60" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"JITTER": 1.5}, "SQLA_REBALANCE['JITTER']: recycle_jitter must be in [0, 1)"),
        ({"MIN_SZIE": 2}, "SQLA_REBALANCE: unknown key 'MIN_SZIE' (did you mean 'MIN_SIZE'?)"),
        (
            {"DATABASES": {"default": {"MIN_SIZE": 9}}},
            "SQLA_REBALANCE['DATABASES']['default']['MIN_SIZE']: min_size (9) cannot be larger "
            "than pool_size (4)",
        ),
        ({"BROADCAST": "amqp://x"}, "SQLA_REBALANCE['BROADCAST']: broadcast: unknown bus scheme"),
    ],
)
def test_bad_settings_fail_when_the_app_loads_naming_the_key(extra, message):
    # `check` without --database connects to nothing (the address is never dialled): the
    # app's ready() alone fails.
    done = run_django("check", DJTEST_PG="127.0.0.1:1", DJTEST_REBALANCE_JSON=json.dumps(extra))
    assert done.returncode != 0
    assert "ConfigurationError" in done.stderr
    assert message in done.stderr, done.stderr
