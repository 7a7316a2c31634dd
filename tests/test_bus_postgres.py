"""Cluster-wide commands over PostgreSQL LISTEN/NOTIFY: several OS processes, the listener's
backend killed with pg_terminate_backend, and raw bad notifications sent with psql."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time

import psycopg
import pytest
from sqlalchemy import create_engine

from sqla_rebalance import RebalancingQueuePool
from sqla_rebalance.bus import fleet_status, open_bus, postgres_bus, send_command, wait_for
from sqla_rebalance.bus.base import BusUnavailableError, next_generation
from sqla_rebalance.bus.postgres_bus import SCHEMA
from sqla_rebalance.errors import ConfigurationError

from .bus_cases import (
    Store,
    check_bad_messages_are_rejected,
    check_junk_heartbeats_are_skipped,
    check_junk_in_the_log_moves_nothing,
)
from .bus_proc import start_apps
from .helpers import wait_for as poll
from .servers import find_pg_bindir

SECRET = "pg-bus-test-secret"
_channels = itertools.count()


@pytest.fixture
def bus_server(pg_cluster):
    return pg_cluster.servers[3]


@pytest.fixture
def bus(bus_server):
    """A PostgreSQL bus (libpq URL) on a channel of its own."""
    return f"{bus_server.url(driver=None)}?channel=t{os.getpid()}_{next(_channels)}"


@pytest.fixture(params=["listen", "poll"])
def any_bus(request, bus):
    """The bus in both modes: LISTEN/NOTIFY, and polling with no connection held."""
    return bus if request.param == "listen" else f"{bus}&mode=poll&poll_interval=0.2"


@pytest.fixture
def apps():
    started = []
    yield started
    for app in started:
        app.kill()


def listener_backends(server) -> list[int]:
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'sqla-rebalance-listener'"
        ).fetchall()
    return [r[0] for r in rows]


def test_a_command_reaches_every_process(any_bus, pg_url, apps):
    bus = any_bus
    apps += start_apps(3, db=pg_url, bus=bus, pool="orders", secret=SECRET, pool_size=2)
    sent = send_command(bus, "recycle", pool="orders", spread=0.2, secret=SECRET)
    result = wait_for(bus, sent.generation, pool="orders", timeout=20)
    assert result.complete
    assert sorted(p.process for p in result.applied) == sorted(a.process for a in apps)
    for app in apps:
        assert app.wait_event("recycle")["reason"] == "signal"
        poll(lambda app=app: app.stats()["retirements"]["signal"] == 2)
    assert {p.process for p in fleet_status(bus)} == {a.process for a in apps}


def test_killed_listener_backends_recover_and_catch_up(bus, bus_server, tmp_path, apps):
    apps += start_apps(
        2, db=f"sqlite:///{tmp_path}/app.db", bus=bus, pool="p", secret=SECRET, fixed_backoff=2.0
    )
    poll(lambda: len(listener_backends(bus_server)) >= 2)
    with psycopg.connect(bus_server.dsn(), autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'sqla-rebalance-listener'"
        )
    poll(lambda: not listener_backends(bus_server))
    # Nobody is LISTENing now: the NOTIFY reaches no one; only the log keeps the command.
    sent = send_command(bus, "recycle", secret=SECRET)
    assert not listener_backends(bus_server)
    for app in apps:
        assert app.wait_event("recycle", timeout=30)["reason"] == "signal"
        stats = app.stats()["bus"]
        assert stats["generation_applied"] == sent.generation
        assert stats["reconnects"] >= 1
        assert stats["connected"]


def test_bad_notifications_from_psql_are_rejected_and_counted(bus, bus_server, tmp_path):
    channel = open_bus(bus).channel
    psql = find_pg_bindir() / "psql"

    def publish_raw(payload: bytes) -> None:
        subprocess.run(
            [
                str(psql),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                bus_server.dsn(),
                "-v",
                f"chan={channel}",
                "-v",
                f"payload={payload.decode()}",
            ],
            input="SELECT pg_notify(:'chan', :'payload');\n",
            text=True,
            check=True,
            capture_output=True,
            timeout=20,
        )

    def logged_first() -> bytes:
        with psycopg.connect(bus_server.dsn(), autocommit=True) as conn:
            row = conn.execute(
                "SELECT message FROM sqla_rebalance_commands WHERE channel = %s ORDER BY gen",
                (channel,),
            ).fetchone()
        assert row is not None
        return str(row[0]).encode()

    check_bad_messages_are_rejected(bus, SECRET, tmp_path, publish_raw, logged_first)


def test_a_role_without_create_listens_and_reports_with_tables_made_by_an_administrator(
    bus_server, tmp_path
):
    channel = f"ro{os.getpid()}_{next(_channels)}"
    with psycopg.connect(bus_server.dsn(), autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("DROP ROLE IF EXISTS bus_reader")
        conn.execute("CREATE ROLE bus_reader LOGIN PASSWORD 'r'")
        conn.execute("GRANT SELECT ON sqla_rebalance_commands TO bus_reader")
        conn.execute(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON sqla_rebalance_heartbeats TO bus_reader"
        )
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    reader = bus_server.url(driver=None, user="bus_reader", password="r")
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        min_size=1,
        broadcast=f"{reader}?channel={channel}",
        broadcast_secret=SECRET,
        min_recycle_interval=0,
    )
    try:
        pool = engine.pool
        poll(lambda: pool.listener is not None and pool.listener.connected)
        sent = send_command(
            f"{bus_server.url(driver=None)}?channel={channel}", "recycle", secret=SECRET
        )
        poll(lambda: pool.stats().bus.generation_applied == sent.generation)
        assert pool.stats().bus.connected
        # Its heartbeats are written too: status and --wait see it.
        wait = wait_for(f"{reader}?channel={channel}", sent.generation, timeout=10)
        assert [p.process for p in wait.applied] == [pool.stats().bus.process]
    finally:
        engine.dispose()
        with psycopg.connect(bus_server.dsn(), autocommit=True) as conn:
            conn.execute("REVOKE ALL ON sqla_rebalance_commands FROM bus_reader")
            conn.execute("REVOKE ALL ON sqla_rebalance_heartbeats FROM bus_reader")
            conn.execute("DROP ROLE bus_reader")


def test_notifications_arriving_together_are_all_delivered(bus):
    sub = open_bus(bus).subscribe()
    try:
        sent = [send_command(bus, "rebalance", secret=SECRET) for _ in range(5)]
        # All five are queued on the listening connection before it reads: they come in
        # one packet, and each must come out of get().
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 5 and time.monotonic() < deadline:
            raw = sub.get(0.5)
            if raw is not None:
                got.append(json.loads(raw)["gen"])
        assert got == [s.generation for s in sent]
    finally:
        sub.close()


class PostgresStore(Store):
    """The bus tables of a channel, written with plain SQL (as psql would)."""

    huge_positions = (2**63 - 1,)

    def __init__(self, server, bus: str) -> None:
        self.channel = open_bus(bus).channel
        self.server = server

    def _sql(self, query: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.server.dsn(), autocommit=True) as conn:
            conn.execute(SCHEMA)
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def add_log(self, position, payload):
        self._sql(
            "INSERT INTO sqla_rebalance_commands (channel, gen, message) VALUES (%s, %s, %s)",
            (self.channel, position, payload.decode()),
        )

    def remove_log(self, position):
        self._sql(
            "DELETE FROM sqla_rebalance_commands WHERE channel = %s AND gen = %s",
            (self.channel, position),
        )

    def log_only(self, payload_for):
        ((last,),) = self._sql(
            "SELECT coalesce(max(gen), 0) FROM sqla_rebalance_commands"
            " WHERE channel = %s AND gen < %s",
            (self.channel, 2**62),
        )
        gen = next_generation(int(last))
        self.add_log(gen, payload_for(gen))
        return gen

    def add_heartbeat(self, name, payload):
        self._sql(
            "INSERT INTO sqla_rebalance_heartbeats (channel, process, payload, expires_at)"
            " VALUES (%s, %s, %s, now() + interval '1 minute')",
            (self.channel, name, payload.decode()),
        )

    def reconnect(self, engine):
        self._sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'sqla-rebalance-listener'"
        )


def test_junk_in_the_log_moves_nothing(any_bus, bus_server, tmp_path):
    """gen = 2**63-1 (and junk an hour ahead): no cursor, generation or --wait answer
    moves, a missed command is caught up, publishing works ("bigint out of range")."""
    # Poll mode reads the log at every poll: there is no connection to break.
    check_junk_in_the_log_moves_nothing(
        any_bus,
        SECRET,
        tmp_path,
        PostgresStore(bus_server, any_bus),
        catch_up="mode=poll" not in any_bus,
    )


def test_junk_heartbeats_are_skipped_and_counted(any_bus, bus_server, tmp_path):
    check_junk_heartbeats_are_skipped(any_bus, SECRET, tmp_path, PostgresStore(bus_server, any_bus))


def test_a_password_in_the_bus_url_is_never_shown(bus_server, tmp_path, monkeypatch, capsys):
    """A wrong password given as ?password=: the CLI's error and the listener's stats
    mask it."""
    from sqla_rebalance.cli import main

    monkeypatch.setenv("SQLA_REBALANCE_SECRET", SECRET)
    url = bus_server.url(driver=None, password="hunter2secret")
    plain = url.replace(":hunter2secret@", "@")
    for bad in (
        url,
        f"{plain}?password=hunter2secret",
        f"{plain}?sslmode=disable&password=x%3Dhunter2secret",
    ):
        assert main(["recycle", "--bus", bad]) in (0, 3)  # trust auth may let it in
        assert main(["status", "--bus", bad]) in (0, 3)
        err = capsys.readouterr().err
        assert "hunter2secret" not in err
        engine = create_engine(
            f"sqlite:///{tmp_path}/app.db",
            poolclass=RebalancingQueuePool,
            broadcast=bad,
            broadcast_secret=SECRET,
        )
        try:
            stats = engine.pool.stats().bus
            assert "hunter2secret" not in (stats.url or "") and "***" in (stats.url or "")
            assert "hunter2secret" not in repr(engine.pool.listener.bus)
        finally:
            engine.dispose()


def test_a_hung_bus_server_is_left_and_rejoined_after_the_thaw(
    bus, bus_server, tmp_path, monkeypatch
):
    # SIGSTOP: TCP is still acknowledged, so keepalives and tcp_user_timeout never
    # fire; only the statement deadline notices.
    monkeypatch.setattr(postgres_bus, "QUERY_DEADLINE", 1.0)
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        broadcast=bus,
        broadcast_secret=SECRET,
        min_recycle_interval=0,
    )
    try:
        pool = engine.pool
        poll(lambda: pool.stats().bus.connected)
        with bus_server.frozen():
            # The next heartbeat statement misses its deadline: the listener lets go.
            poll(lambda: not pool.stats().bus.connected, timeout=30)
            assert "deadline exceeded" in (pool.stats().bus.last_error or "")
            started = time.monotonic()
            with pytest.raises(BusUnavailableError):
                send_command(bus, "recycle", secret=SECRET)  # the sender is bounded too
            assert time.monotonic() - started < 15
            with engine.connect():  # checkouts never noticed
                pass
        poll(lambda: pool.stats().bus.connected, timeout=30)
        sent = send_command(bus, "recycle", secret=SECRET)
        poll(lambda: pool.stats().bus.generation_applied == sent.generation, timeout=30)
    finally:
        engine.dispose()


def _ours_on(server) -> set[int]:
    """Backend pids of this package's connections (any test's) on ``server``."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'sqla-rebalance-%%'"
        ).fetchall()
    return {r[0] for r in rows}


def test_poll_mode_holds_no_connection_between_reads(bus, bus_server, tmp_path):
    polled = f"{bus}&mode=poll&poll_interval=0.3"
    before = _ours_on(bus_server)  # other tests' listeners, still winding down
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        min_size=1,
        broadcast=polled,
        broadcast_secret=SECRET,
        min_recycle_interval=0,
    )
    try:
        pool = engine.pool
        poll(lambda: pool.stats().bus.connected)
        sent = send_command(polled, "recycle", secret=SECRET)
        poll(lambda: pool.stats().bus.generation_applied == sent.generation)
        me = pool.stats().bus.process  # its heartbeat rides on a read: wait for one
        poll(lambda: [p.process for p in fleet_status(polled)] == [me])
        samples = []
        for _ in range(20):
            samples.append(_ours_on(bus_server))
            time.sleep(0.1)
        # A connection held between reads would be the same backend over the 2 s.
        held = set.intersection(*samples[:3]) & set.intersection(*samples[-3:])
        assert held <= before, (held, before)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "query",
    [
        "mode=push",
        "mode=poll&poll_interval=nan",
        "mode=poll&poll_interval=0",
        "mode=poll&poll_interval=-1",
        "mode=poll&poll_interval=1e9",
        "mode=poll&poll_interval=soon",
        "poll_interval=2",
        "mode=poll&mode=listen",
    ],
)
def test_poll_mode_parameters_are_checked(bus, query):
    with pytest.raises(ConfigurationError):
        open_bus(f"{bus}&{query}")


def test_poll_mode_parameters_stay_out_of_libpq(bus):
    opened = open_bus(f"{bus}&mode=poll&poll_interval=0.5")
    assert opened.poll_interval == 0.5
    assert "mode" not in opened._libpq_url and "poll_interval" not in opened._libpq_url
    assert open_bus(bus).poll_interval is None  # listen mode, as before
    assert open_bus(f"{bus}&mode=poll").poll_interval == postgres_bus.DEFAULT_POLL_INTERVAL


def test_dead_processes_heartbeats_are_removed_within_a_minute(any_bus, bus_server, tmp_path):
    channel = open_bus(any_bus).channel
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        broadcast=any_bus,
        broadcast_secret=SECRET,
    )
    try:
        poll(lambda: engine.pool.stats().bus.connected)
        with psycopg.connect(bus_server.dsn(), autocommit=True) as conn:
            conn.execute(
                "INSERT INTO sqla_rebalance_heartbeats VALUES"
                " (%s, 'gone-a-while', '{}', now() - interval '2 minutes'),"
                " (%s, 'just-gone', '{}', now() - interval '5 seconds')",
                (channel, channel),
            )

            def left() -> list[str]:
                rows = conn.execute(
                    "SELECT process FROM sqla_rebalance_heartbeats"
                    " WHERE channel = %s AND process IN ('gone-a-while', 'just-gone')",
                    (channel,),
                ).fetchall()
                return sorted(r[0] for r in rows)

            # The listener's next heartbeat (fast after connecting) cleans up.
            poll(lambda: left() == ["just-gone"], timeout=20)
            plan = conn.execute(
                "EXPLAIN DELETE FROM sqla_rebalance_heartbeats"
                " WHERE channel = 'x' AND expires_at < now() - interval '60 seconds'"
            ).fetchall()
        assert any("sqla_rebalance_heartbeats_expiry" in r[0] for r in plan) or any(
            "Seq Scan" in r[0]
            for r in plan  # a tiny table: the planner may prefer a scan
        )
    finally:
        engine.dispose()


def test_the_expiry_index_is_added_to_tables_made_by_an_earlier_version(bus, bus_server):
    with psycopg.connect(bus_server.dsn(), autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("DROP INDEX sqla_rebalance_heartbeats_expiry")
    sub = open_bus(bus).subscribe()
    sub.close()
    with psycopg.connect(bus_server.dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT to_regclass('sqla_rebalance_heartbeats_expiry')").fetchone()
    assert row is not None and row[0] is not None
