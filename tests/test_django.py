"""The Django integration in the pytest process, against real servers: the pooled backends
(PostgreSQL on ``pg_cluster``, MariaDB on ``mariadb_cluster``) under the ORM, transactions,
Django's request cycle and threads; ``HOSTS`` spreading; and ``manage.py sqla_rebalance``
over a real Redis bus reaching the pools of this process.

Django can be configured once per process, so every in-process Django test is in this module,
on the settings of tests/django_project (``settings.configure(**build_settings(env))``).
Django's own test runner and bad settings run in subprocesses: tests/test_django_runner.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest

pytest.importorskip("django")

import django
from django.conf import settings
from django.core.handlers.wsgi import WSGIHandler
from django.core.management import CommandError, call_command
from django.db import IntegrityError, connections, transaction
from django.db.models import F
from django.test import RequestFactory, override_settings
from sqlalchemy import event

from sqla_rebalance import RebalancingQueuePool
from sqla_rebalance.bus import listener as listener_mod
from sqla_rebalance.bus import open_bus
from sqla_rebalance.bus.listener import process_id
from sqla_rebalance.contrib.django import all_pools, dispose_pools, get_pool
from sqla_rebalance.worker import get_worker

from .django_project.config import APPLICATION_NAME, build_settings
from .helpers import wait_for

pytestmark = pytest.mark.servers

ROOT = Path(__file__).resolve().parents[1]
SECRET = "django-tests-secret"
ALIASES = ["default", "maria"]
SESSION_SQL = {"postgresql": "SELECT pg_backend_pid()", "mysql": "SELECT CONNECTION_ID()"}


# --------------------------------------------------------------------------- set-up


@pytest.fixture(scope="module")
def project(pg_cluster, mariadb_cluster, redis_server) -> Iterator[dict[str, str]]:
    """Django configured on the test project: default/maria on one server each,
    pg_spread/maria_spread over every server, a Redis bus of its own channel."""
    if settings.configured:
        pytest.skip("Django was configured by something else in this process")
    env = {
        "DJTEST_PG": pg_cluster.servers[0].address,
        "DJTEST_PG_HOSTS": ",".join(pg_cluster.hosts),
        "DJTEST_MARIADB": mariadb_cluster.servers[0].address,
        "DJTEST_MARIADB_HOSTS": ",".join(mariadb_cluster.hosts),
        "DJTEST_BUS": f"{redis_server.url()}?channel=dj{os.getpid()}",
    }
    saved = os.environ.get("DJTEST_SECRET")
    os.environ["DJTEST_SECRET"] = SECRET  # SQLA_REBALANCE['SECRET_ENV'] of the project
    settings.configure(**build_settings(env))
    django.setup()
    for alias in ALIASES:
        call_command("migrate", run_syncdb=True, database=alias, verbosity=0, interactive=False)
    connections.close_all()
    yield env
    connections.close_all()
    mine = list(all_pools().values())
    dispose_pools()
    if saved is None:
        os.environ.pop("DJTEST_SECRET", None)
    else:
        os.environ["DJTEST_SECRET"] = saved
    # Nothing of this module left running for the modules after it (test_leaks, test_fork...).
    bus = open_bus(env["DJTEST_BUS"])
    wait_for(lambda: listener_mod.listener_for(bus, SECRET.encode()) is None, timeout=15)
    assert not any(get_worker().is_registered(pool) for pool in mine)


@pytest.fixture(autouse=True)
def _clean(project: dict[str, str]) -> Iterator[None]:
    from tests.django_project.shop.models import Item

    for alias in ALIASES:
        Item.objects.using(alias).all().delete()
    connections.close_all()
    yield
    connections.close_all()


def items(alias: str) -> Any:
    from tests.django_project.shop.models import Item

    return Item.objects.using(alias)


def scalar(alias: str, sql: str) -> Any:
    with connections[alias].cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()[0]


def session_id(alias: str) -> int:
    return int(scalar(alias, SESSION_SQL[connections[alias].vendor]))


# Server-side views of the sessions, over connections of their own (not pooled).


def pg_sessions(server, application_name: str = APPLICATION_NAME) -> dict[int, str]:
    """pid -> state of the sessions the pools opened (by application_name)."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, state FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        ).fetchall()
    return {int(pid): str(state) for pid, state in rows}


def mariadb_query(server, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = pymysql.connect(host=server.host, port=server.port, user="app", password="app")
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql, args)
            return list(cursor.fetchall())
    finally:
        conn.close()


def session_alive(alias: str, sid: int, pg_server, mariadb_server) -> bool:
    if alias == "default":
        return sid in pg_sessions(pg_server)
    return bool(
        mariadb_query(
            mariadb_server, "SELECT id FROM information_schema.processlist WHERE id = %s", sid
        )
    )


IN_TRANSACTION_SQL = {
    "postgresql": "SELECT pg_current_xact_id_if_assigned() IS NOT NULL",
    "mysql": "SELECT @@in_transaction",
}


def insert_from_another_session(alias: str, name: str, pg_server, mariadb_server) -> None:
    """Insert (then delete) an item ``name`` over a connection of its own, waiting at most 5 s
    for a row lock: it fails while an uncommitted row of that name holds one."""
    insert = (
        "INSERT INTO djshop_item (name, qty, price, data, created) "
        "VALUES (%s, 0, 0, '{}', CURRENT_TIMESTAMP)"
    )
    if alias == "default":
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            conn.execute("SET lock_timeout = '5s'")
            conn.execute(insert, [name])
            conn.execute("DELETE FROM djshop_item WHERE name = %s", [name])
        return
    conn = pymysql.connect(
        host=mariadb_server.host,
        port=mariadb_server.port,
        user="app",
        password="app",
        database="app",
        autocommit=True,
    )
    try:
        with conn.cursor() as cursor:
            cursor.execute("SET SESSION innodb_lock_wait_timeout = 5")
            cursor.execute(insert, [name])
            cursor.execute("DELETE FROM djshop_item WHERE name = %s", [name])
    finally:
        conn.close()


_handler: WSGIHandler | None = None


def request(path: str, expect: str = "200 OK") -> dict[str, Any]:
    """One request through Django's WSGI handler: request_started, the view,
    request_finished (where Django closes connections past CONN_MAX_AGE)."""
    global _handler
    if _handler is None:
        _handler = WSGIHandler()
    environ = RequestFactory().get(path).environ
    statuses: list[str] = []
    result = _handler(environ, lambda status, headers, exc_info=None: statuses.append(status))
    try:
        body = b"".join(result)
    finally:
        result.close()  # what a WSGI server does; sends request_finished
    assert statuses == [expect], body
    return json.loads(body) if expect == "200 OK" else {}


def in_threads(n: int, work: Callable[[], Any]) -> list[Any]:
    """Run ``work`` in ``n`` threads at once; each closes its Django connections at the end."""

    def run(_: int) -> Any:
        try:
            return work()
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(run, range(n)))


@contextlib.contextmanager
def count_checkouts(pool: RebalancingQueuePool) -> Iterator[Callable[[], int]]:
    seen = [0]

    def on_checkout(*args: Any) -> None:
        seen[0] += 1

    event.listen(pool, "checkout", on_checkout)
    try:
        yield lambda: seen[0]
    finally:
        event.remove(pool, "checkout", on_checkout)


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m django ARGS`` on the same project settings (same bus), in a new process."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DJTEST_")}
    full_env.update(env, DJANGO_SETTINGS_MODULE="tests.django_project.settings")
    full_env["DJTEST_SECRET"] = SECRET
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --------------------------------------------------------------------------- ORM


@pytest.mark.parametrize("alias", ALIASES)
def test_orm_create_query_update_in_transactions(alias):
    with transaction.atomic(using=alias):
        items(alias).create(name="a", qty=1, price=Decimal("9.99"), data={"tags": ["x", "y"]})
        items(alias).create(name="b")
    a = items(alias).get(name="a")
    # Decimal, JSON and time zone aware datetimes: the adapters Django sets per connection.
    assert (a.qty, a.price, a.data) == (1, Decimal("9.99"), {"tags": ["x", "y"]})
    assert a.created.utcoffset() == timedelta(0)
    with transaction.atomic(using=alias):
        assert items(alias).filter(name="a").update(qty=F("qty") + 1) == 1
        # Rows *matched*, not changed, even on MySQL: Django's FOUND_ROWS client flag
        # reached the driver through the pool's connect arguments.
        assert items(alias).filter(name="a").update(qty=2) == 1
    assert items(alias).get(name="a").qty == 2
    # A server-side cursor on PostgreSQL (psycopg wants the real connection for it).
    assert [i.name for i in items(alias).order_by("name").iterator(chunk_size=1)] == ["a", "b"]
    # Django holds the driver's own connection, not SQLAlchemy's proxy...
    driver = type(connections[alias].connection).__module__
    # (on MySQL, mysqlclient when it is installed, else PyMySQL: the driver of the pool)
    from sqla_rebalance.contrib.django.backends.mysql.base import _DRIVER

    mysql = "pymysql" if _DRIVER == "pymysql" else "MySQLdb"
    assert driver.startswith("psycopg" if alias == "default" else mysql), driver
    assert get_pool(alias)._dialect.driver == ("psycopg" if alias == "default" else _DRIVER)
    # ...checked out of this alias's pool.
    pool = get_pool(alias)
    assert isinstance(pool, RebalancingQueuePool)
    assert pool.stats().in_use == 1
    assert pool.config.pool_name == alias
    assert (pool.config.pool_size, pool.config.recycle, pool.config.recycle_jitter) == (4, 600, 0.2)


@pytest.mark.parametrize("alias", ALIASES)
def test_errors_roll_back_and_are_djangos_exceptions(alias):
    def fail_after_insert() -> None:
        with transaction.atomic(using=alias):
            items(alias).create(name="gone")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_after_insert()
    assert not items(alias).filter(name="gone").exists()
    items(alias).create(name="dup")
    # The driver's IntegrityError became Django's: the pool uses the driver Django imported.
    with pytest.raises(IntegrityError), transaction.atomic(using=alias):
        items(alias).create(name="dup")
    with transaction.atomic(using=alias):
        items(alias).create(name="outer")
        with contextlib.suppress(IntegrityError), transaction.atomic(using=alias):
            items(alias).create(name="inner")
            items(alias).create(name="dup")  # rolls back to the savepoint, "inner" with it
    assert sorted(items(alias).values_list("name", flat=True)) == ["dup", "outer"]


# --------------------------------------------------------------------------- OPTIONS["pool"]

#: Django configured without the app (nothing validates SQLA_REBALANCE at start-up), on one
#: PostgreSQL server, with Django's own psycopg pool (``OPTIONS["pool"]``) asked for at once
#: ("settings") or after the wrapper was made ("changed later"). Prints, as JSON, the error of
#: the first use of the alias and how many sessions it left on the server.
NO_APP_SCRIPT = r"""
import json, sys, time
import django
from django.conf import settings

host, port, when, app_name = sys.argv[1:5]
options = {"application_name": app_name}
if when == "settings":
    options["pool"] = {"min_size": 1, "max_size": 1}
settings.configure(
    DATABASES={"default": {
        "ENGINE": "sqla_rebalance.contrib.django.backends.postgresql",
        "NAME": "app", "USER": "app", "PASSWORD": "app", "HOST": host, "PORT": port,
        "OPTIONS": options,
    }},
    INSTALLED_APPS=[],
    USE_TZ=True,
)
django.setup()
from django.db import connections

out = {"step": "init"}
try:
    conn = connections["default"]
    out["step"] = "connect"
    if when == "changed later":
        conn.settings_dict["OPTIONS"]["pool"] = True
    conn.ensure_connection()
    out["error"] = None
except Exception as exc:
    out["error"] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
time.sleep(0.3)  # a pool's background connect would have shown by now
import psycopg

with psycopg.connect(
    host=host, port=port, user="app", password="app", dbname="app", autocommit=True
) as admin:
    out["sessions"] = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [app_name]
    ).fetchone()[0]
out["psycopg_pool_loaded"] = "psycopg_pool" in sys.modules
print(json.dumps(out))
"""


@pytest.mark.parametrize("when", ["settings", "changed later"])
def test_djangos_pool_option_is_rejected_without_the_app_before_anything_opens(pg_cluster, when):
    server = pg_cluster.servers[0]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DJTEST_") and k != "DJANGO_SETTINGS_MODULE"
    }
    done = subprocess.run(
        [sys.executable, "-c", NO_APP_SCRIPT, server.host, str(server.port), when, "dj-no-app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # At the backend's creation when the settings say so, before any connection otherwise.
    assert out["step"] == ("init" if when == "settings" else "connect")
    assert out["error"] == (
        "sqla_rebalance.errors.ConfigurationError: DATABASES['default']['OPTIONS']['pool']: "
        "that is Django's own psycopg pool; the sqla_rebalance backend pools connections "
        "itself, remove it"
    )
    # Django's pool was never made, so it holds no session (it kept one before).
    assert out["sessions"] == 0
    assert out["psycopg_pool_loaded"] is False


# --------------------------------------------------------------------------- returning to the pool


def test_requests_reuse_pooled_sessions_and_conn_max_age_0_returns_them(pg_cluster):
    request("/session/default/")  # the pool exists and holds a connection
    pool = get_pool("default")
    assert pool is not None
    before = pool.stats()
    sessions = []
    with count_checkouts(pool) as checkouts:
        for _ in range(20):
            sessions.append(request("/session/default/")["session"])
            # CONN_MAX_AGE=0: Django closed its connection at the end of the request...
            assert connections["default"].connection is None
            # ...which returned it to the pool: open and idle there.
            stats = pool.stats()
            assert (stats.in_use, stats.open) == (0, before.open)
        assert checkouts() == 20
    assert pool.stats().connects == before.connects  # no new connection for 20 requests
    live = pg_sessions(pg_cluster.servers[0])
    assert set(sessions) <= set(live)  # the sessions that served requests are still open
    assert len(live) == before.open < 20  # fewer server sessions than checkouts
    assert all(state == "idle" for state in live.values())


def test_threads_share_one_pool():
    barrier = threading.Barrier(4)

    def hold() -> int:
        sid = session_id("default")
        barrier.wait(timeout=10)  # all four hold a connection at the same time
        return sid

    first = in_threads(4, hold)
    connects = get_pool("default").stats().connects
    second = in_threads(4, hold)
    assert len(set(first)) == 4
    assert set(second) == set(first)  # other threads, the same four server sessions
    assert get_pool("default").stats().connects == connects


@pytest.mark.parametrize("alias", ALIASES)
def test_a_connection_returned_mid_transaction_is_rolled_back(alias, pg_cluster, mariadb_cluster):
    servers = (pg_cluster.servers[0], mariadb_cluster.servers[0])
    conn = connections[alias]
    conn.set_autocommit(False)  # a transaction outside atomic(), never committed
    items(alias).create(name="uncommitted")
    sid = session_id(alias)
    assert scalar(alias, IN_TRANSACTION_SQL[conn.vendor])  # the session has it open
    conn.close()  # not in an atomic block: back to the pool, where SQLAlchemy rolls back
    assert get_pool(alias).stats().in_use == 0
    assert session_alive(alias, sid, *servers)  # returned, not closed...
    # ...and rolled back: its uncommitted row (and that row's lock) is gone.
    insert_from_another_session(alias, "uncommitted", *servers)
    if alias == "default":
        assert pg_sessions(servers[0])[sid] == "idle"  # not "idle in transaction"
    assert not items(alias).filter(name="uncommitted").exists()
    assert conn.get_autocommit()  # the next checkout is set up like a new connection


@pytest.mark.parametrize("alias", ALIASES)
def test_closing_inside_atomic_discards_the_connection(alias, pg_cluster, mariadb_cluster):
    servers = (pg_cluster.servers[0], mariadb_cluster.servers[0])
    conn = connections[alias]
    with transaction.atomic(using=alias):
        items(alias).create(name="in-atomic")
        sid = session_id(alias)
        pool = get_pool(alias)
        retired = pool.stats().retirements["error"]
        # Django keeps referring to the connection until the block exits and expects the
        # server to roll back: it must not go back to the pool, to another thread.
        conn.close()
        assert pool.stats().retirements["error"] == retired + 1
    assert conn.connection is None
    wait_for(lambda: not session_alive(alias, sid, *servers))
    assert not items(alias).filter(name="in-atomic").exists()


def driver_closed(alias: str, driver: Any) -> bool:
    return bool(driver.closed) if alias == "default" else not driver.open


@pytest.mark.parametrize("alias", ALIASES)
def test_closing_twice_does_not_close_a_connection_already_back_in_the_pool(
    alias, pg_cluster, mariadb_cluster
):
    servers = (pg_cluster.servers[0], mariadb_cluster.servers[0])
    conn = connections[alias]
    sid = session_id(alias)
    driver = conn.connection
    pool = get_pool(alias)
    assert not pool._pre_ping  # nothing would hide a closed connection from the next user
    conn._close()  # back to the pool...
    assert pool.stats().in_use == 0
    conn.close()  # ...so this one has nothing left to close
    conn._close()
    assert not driver_closed(alias, driver)
    assert session_alive(alias, sid, *servers)
    # Its next user gets it working ("the connection is closed" before): check out every
    # idle connection (the pool may hold others) and use that one.
    held = [pool.connect() for _ in range(pool.stats().idle)]
    try:
        [mine] = [fairy for fairy in held if fairy.driver_connection is driver]
        cursor = mine.cursor()
        cursor.execute(SESSION_SQL[conn.vendor])
        assert cursor.fetchone()[0] == sid
        cursor.close()
    finally:
        for fairy in held:
            fairy.close()
    # This wrapper no longer holds it: it checks a connection out again when used.
    assert conn.connection is None
    session_id(alias)
    assert pool.stats().in_use == 1


@pytest.mark.parametrize("alias", ALIASES)
def test_closing_twice_inside_atomic_is_one_discard(alias, pg_cluster, mariadb_cluster):
    conn = connections[alias]
    with transaction.atomic(using=alias):
        session_id(alias)
        pool = get_pool(alias)
        retired = pool.stats().retirements["error"]
        conn._close()  # discarded: Django keeps referring to it until the block exits
        conn.close()  # nothing more to do (the MySQL drivers raised "Already closed")
        conn._close()
        assert pool.stats().retirements["error"] == retired + 1
    assert conn.connection is None
    assert pool.stats().in_use == 0
    session_id(alias)  # a new checkout works


def test_changed_connection_settings_replace_the_pool(pg_cluster):
    server = pg_cluster.servers[0]
    conn = connections["default"]
    held = session_id("default")  # checked out of the current pool, and kept
    old = get_pool("default")
    options = conn.settings_dict["OPTIONS"]  # shared by every thread's wrapper
    options["application_name"] = APPLICATION_NAME + "-changed"
    try:
        # Another thread connects with the new settings (as after Django's test runner
        # switched NAME to the test database): a new pool, and the old one is disposed.
        [fresh] = in_threads(1, lambda: session_id("default"))
        new = get_pool("default")
        assert new is not old
        assert fresh in pg_sessions(server, APPLICATION_NAME + "-changed")
        wait_for(lambda: set(pg_sessions(server)) == {held})  # the old pool's idle ones closed
        conn.close()  # the one still checked out of the old pool is closed on return
        wait_for(lambda: not pg_sessions(server))
    finally:
        options["application_name"] = APPLICATION_NAME
        connections.close_all()


def terminate_all(server) -> set[int]:
    """Kill every session the pools opened on ``server`` (as a failover or an admin would)."""
    pids = set(pg_sessions(server))
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", [pid])
    wait_for(lambda: not set(pg_sessions(server)) & pids)
    return pids


@pytest.mark.parametrize("health_checks", [True, False])
def test_conn_health_checks_make_the_pool_test_connections_at_checkout(pg_cluster, health_checks):
    server = pg_cluster.servers[0]
    settings_dict = connections["default"].settings_dict  # shared by every thread's wrapper
    settings_dict["CONN_HEALTH_CHECKS"] = health_checks  # a new pool, built with it
    try:
        in_threads(3, lambda: request("/session/default/"))
        pool = get_pool("default")
        assert pool._pre_ping is health_checks
        idle = pool.stats().idle
        dead = terminate_all(server)
        if health_checks:
            # Each checkout tests its connection first and reconnects: no request sees an error.
            served = [request("/session/default/")["session"] for _ in range(idle + 1)]
            assert not set(served) & dead
        else:
            # Django's own check never sees a pooled connection (each checkout is a new
            # connection to Django): the first request gets a dead one and fails...
            errors = pool.stats().retirements["error"]
            request("/session/default/", expect="500 Internal Server Error")
            # ...and the broken connection is discarded at its return, not pooled again.
            assert pool.stats().retirements["error"] == errors + 1
            # Each dead one fails one request, once: after the other idle-1, all is well.
            outcomes = [request_succeeds("/session/default/") for _ in range(idle)]
            assert outcomes[-1], outcomes
        assert not set(pg_sessions(server)) & dead
    finally:
        settings_dict["CONN_HEALTH_CHECKS"] = False
        connections.close_all()


def request_succeeds(path: str) -> bool:
    try:
        request(path)
    except AssertionError:
        return False
    return True


def test_a_full_pool_times_out_with_djangos_operational_error():
    from django.db import OperationalError

    small = {**settings.SQLA_REBALANCE, "MAX_OVERFLOW": 0, "POOL_TIMEOUT": 0.2}
    with override_settings(SQLA_REBALANCE=small):  # a new configuration: a new pool
        barrier = threading.Barrier(5)
        release = threading.Event()

        def hold() -> None:
            session_id("default")
            barrier.wait(timeout=10)
            release.wait(timeout=10)

        with ThreadPoolExecutor(max_workers=4) as executor:
            held = [executor.submit(lambda: (hold(), connections.close_all())) for _ in range(4)]
            barrier.wait(timeout=10)  # POOL_SIZE (4) connections checked out
            try:
                assert get_pool("default").stats().in_use == 4
                # Not SQLAlchemy's TimeoutError: Django code catches DatabaseError.
                with pytest.raises(OperationalError, match="QueuePool limit"):
                    session_id("default")
            finally:
                release.set()
            for future in held:
                future.result()
        assert session_id("default")  # a connection again once they are back


# --------------------------------------------------------------------------- HOSTS


def test_hosts_spread_postgresql_connections_over_the_four_servers(pg_cluster):
    barrier = threading.Barrier(8)

    def where() -> str:
        address = scalar("pg_spread", "SELECT host(inet_server_addr())")
        barrier.wait(timeout=10)
        return str(address)

    seen = Counter(in_threads(8, where))
    assert seen == {server.host: 2 for server in pg_cluster.servers}
    hosts = get_pool("pg_spread").stats().hosts
    assert {key: h.open for key, h in hosts.items()} == dict.fromkeys(pg_cluster.hosts, 2)


def test_hosts_spread_mariadb_connections_over_the_two_servers(mariadb_cluster):
    barrier = threading.Barrier(4)

    def where() -> str:
        address = scalar("maria_spread", "SELECT @@bind_address")
        barrier.wait(timeout=10)
        return str(address)

    seen = Counter(in_threads(4, where))
    assert seen == {server.host: 2 for server in mariadb_cluster.servers}
    hosts = get_pool("maria_spread").stats().hosts
    assert {key: h.open for key, h in hosts.items()} == dict.fromkeys(mariadb_cluster.hosts, 2)


# --------------------------------------------------------------------------- manage.py


def test_manage_py_recycle_wait_reaches_this_process_over_redis(project, pg_cluster):
    server = pg_cluster.servers[0]
    request("/session/default/")
    pool = get_pool("default")
    wait_for(lambda: pool.listener is not None and pool.listener.connected)
    before = pool.stats()
    old_sessions = set(pg_sessions(server))
    assert len(old_sessions) == before.open >= 1
    # Another process, sharing nothing with this one but the settings (bus, secret env).
    done = manage(
        "sqla_rebalance", "recycle", "--pool", "default", "--wait", "30", "--json", env=project
    )
    assert done.returncode == 0, done.stderr
    [sent] = json.loads(done.stdout)["buses"]
    assert sent["command"] == "recycle pool=default"
    # This pytest process (its listener on the bus) applied it...
    assert sent["applied"] == [pool.stats().bus.process]
    assert sent["pending"] == []
    assert pool.stats().bus.generation_applied >= sent["generation"]
    # ...and every connection it had is replaced: the old sessions end on the server.
    wait_for(
        lambda: pool.stats().retirements["signal"] >= before.retirements["signal"] + before.open
    )
    wait_for(lambda: not (set(pg_sessions(server)) & old_sessions))
    assert request("/session/default/")["session"] not in old_sessions


def test_manage_py_status_json_shows_this_process_from_its_heartbeat(project):
    for alias in ALIASES:
        request(f"/session/{alias}/")

    def my_pools() -> dict[str, Any] | None:
        done = manage("sqla_rebalance", "status", "--json", env=project)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["mode"] == "bus"
        [bus] = out["buses"]
        me = get_pool("default").stats().bus.process  # this process's listener
        mine = [p for p in bus["processes"] if p["process"] == me]
        found = {p["pool"]: p for p in mine[0]["pools"]} if mine else {}
        return found if set(ALIASES) <= set(found) else None

    found = wait_for(my_pools, timeout=30)  # a heartbeat after both pools attached
    for alias in ALIASES:
        assert found[alias]["open"] >= 1
        assert found[alias]["pool_size"] == 4


def test_without_a_bus_status_shows_this_process_and_commands_fail_clearly():
    request("/session/default/")
    no_bus = {k: v for k, v in settings.SQLA_REBALANCE.items() if k != "BROADCAST"}
    with override_settings(SQLA_REBALANCE=no_bus):
        out = io.StringIO()
        call_command("sqla_rebalance", "status", "--json", stdout=out)
        data = json.loads(out.getvalue())
        assert (data["mode"], data["process"]) == ("local", process_id())
        entries = {e["alias"]: e for e in data["pools"]}
        assert set(entries) == {"default", "pg_spread", "maria", "maria_spread"}
        assert entries["default"]["created"]
        assert entries["default"]["stats"]["open"] == get_pool("default").stats().open >= 1
        text = io.StringIO()
        call_command("sqla_rebalance", "status", stdout=text)
        assert "showing this process only" in text.getvalue()
        for action in ("recycle", "rebalance", "refresh", "drain"):
            with pytest.raises(CommandError, match="no bus configured") as err:
                call_command("sqla_rebalance", action)
            assert err.value.returncode == 2


def test_manage_py_needs_the_secret_unless_unsigned(project, monkeypatch):
    monkeypatch.delenv("DJTEST_SECRET")
    with pytest.raises(CommandError, match=r"\$DJTEST_SECRET is not set") as err:
        call_command("sqla_rebalance", "recycle")
    assert err.value.returncode == 2
    for args in (["drain", "--spread", "3"], ["rebalance", "--host", "127.0.0.2:5432"]):
        with pytest.raises(CommandError, match="applies to recycle only") as err:
            call_command("sqla_rebalance", *args)
        assert err.value.returncode == 2


@pytest.mark.parametrize(
    "args",
    [
        ["recycle", "--wait", "nan"],
        ["recycle", "--wait", "inf"],
        ["recycle", "--wait", "-1"],
        ["recycle", "--wait=-inf"],
        ["recycle", "--wait", "1e400"],
        ["recycle", "--wait", "86401"],
        ["recycle", "--wait", "soon"],
        ["drain", "--wait", "nan"],
        ["recycle", "--spread", "nan"],
        ["recycle", "--spread", "inf"],
        ["recycle", "--spread", "-1"],
        ["recycle", "--wait", "5", "--spread", "nan"],
        ["recycle", "--rate", "nan"],
        ["recycle", "--rate", "-2"],
        ["recycle", "--rate", "5", "--spread", "2"],
    ],
)
def test_bad_numbers_are_usage_errors_and_publish_nothing(project, args):
    """Issue 11: ``--wait nan`` published, then failed with a traceback in ``wait_for``."""
    bus = open_bus(project["DJTEST_BUS"])
    before = bus.generation()
    with pytest.raises(CommandError, match=r"^--(wait|spread|rate)( must be| and --spread)") as err:
        call_command("sqla_rebalance", *args)
    assert err.value.returncode == 2
    assert bus.generation() == before


@pytest.mark.parametrize(
    ("option", "value"),
    [("wait", float("nan")), ("wait", -1.0), ("spread", float("inf")), ("wait", True)],
)
def test_bad_numbers_from_python_are_usage_errors_too(project, option, value):
    bus = open_bus(project["DJTEST_BUS"])
    before = bus.generation()
    with pytest.raises(CommandError, match=f"^--{option} must be") as err:
        call_command("sqla_rebalance", "recycle", **{option: value})
    assert err.value.returncode == 2
    assert bus.generation() == before


def test_manage_py_wait_nan_exits_2_without_a_traceback_or_a_command(project):
    bus = open_bus(project["DJTEST_BUS"])
    before = bus.generation()
    done = manage("sqla_rebalance", "recycle", "--wait", "nan", env=project)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "--wait must be a finite number of seconds >= 0, got 'nan'" in done.stderr
    assert done.stdout == ""
    assert bus.generation() == before


def test_pymysql_stays_one_module_under_django(mariadb_cluster):
    """PyMySQL installed as MySQLdb must not be loaded twice: Django's backend imports
    MySQLdb.* submodules, and a second copy would rebind pymysql.err, so that
    ``except pymysql.err.MySQLError`` (in this process's other code) misses real errors."""
    from django.db.backends.mysql import base as django_mysql  # noqa: F401

    import sqla_rebalance.contrib.django.backends.mysql.base  # noqa: F401

    server = mariadb_cluster.servers[0]
    with pytest.raises(pymysql.err.MySQLError):
        pymysql.connect(host=server.host, port=server.port, user="app", password="wrong")
