"""Cluster-wide commands over a real Redis: several OS processes, a Redis restart, raw bad
messages from redis-cli, a flood, and transactions running through recycles on PostgreSQL."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import redis
from sqlalchemy import create_engine, text

from sqla_rebalance import RebalancingQueuePool, signals
from sqla_rebalance.bus import fleet_status, open_bus, send_command, wait_for
from sqla_rebalance.bus.base import next_generation
from sqla_rebalance.errors import ConfigurationError

from .bus_cases import (
    Store,
    check_bad_messages_are_rejected,
    check_junk_heartbeats_are_skipped,
    check_junk_in_the_log_moves_nothing,
    junk_commands,
)
from .bus_proc import ROOT, start_apps
from .helpers import wait_for as poll
from .servers import find_free_port, find_program

SECRET = "redis-bus-test-secret"
_channels = itertools.count()


@pytest.fixture
def bus(redis_server):
    """A Redis bus URL on a channel of its own (tests do not see each other's commands)."""
    return f"{redis_server.url()}?channel=t{os.getpid()}_{next(_channels)}"


@pytest.fixture
def apps():
    started = []
    yield started
    for app in started:
        app.kill()


def test_a_command_reaches_every_process(bus, pg_url, apps):
    apps += start_apps(4, db=pg_url, bus=bus, pool="orders", secret=SECRET, pool_size=2)
    # Sent with the real CLI, secret from the environment, waiting for every process.
    env = dict(os.environ, SQLA_REBALANCE_SECRET=SECRET, PYTHONPATH=str(ROOT))
    cli = [sys.executable, "-m", "sqla_rebalance", "recycle", "--bus", bus, "--pool", "orders"]
    done = subprocess.run(
        [*cli, "--spread", "0.5", "--wait", "20", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert sorted(out["applied"]) == sorted(app.process for app in apps)
    assert out["pending"] == []
    assert out["receivers"] == 4
    for app in apps:
        event = app.wait_event("recycle")
        assert (event["reason"], event["spread"]) == ("signal", 0.5)
    for app in apps:
        poll(lambda app=app: app.stats()["retirements"]["signal"] == 2)
    status = {p.process: p for p in fleet_status(bus)}
    assert set(status) == {app.process for app in apps}
    for proc in status.values():
        (pool,) = proc.pools
        assert pool["pool"] == "orders"
        assert pool["commands_applied"] == 1
        assert sum(h["open"] for h in pool["hosts"].values()) == 2


def test_a_command_sent_while_redis_restarts_is_applied_after_reconnect(
    redis_server, bus, tmp_path, apps
):
    db = f"sqlite:///{tmp_path}/app.db"
    apps += start_apps(2, db=db, bus=bus, pool="p", secret=SECRET, fixed_backoff=2.0, load=2)
    for _attempt in range(3):
        redis_server.stop()
        for app in apps:
            poll(lambda app=app: not app.stats()["bus"]["connected"], timeout=30)
        redis_server.start()
        # Redis kept nothing (no persistence): the log and the generation counter are gone.
        sent = send_command(bus, "recycle", secret=SECRET)
        if sent.receivers == 0:
            break  # nobody was subscribed: only the durable log can tell them
    else:
        pytest.fail("a listener was always subscribed when the command was sent")
    for app in apps:
        event = app.wait_event("recycle", timeout=30)
        assert event["reason"] == "signal"
        stats = app.stats()["bus"]
        assert stats["generation_applied"] == sent.generation
        assert stats["reconnects"] >= 1
        # Cleared once the catch-up read is over (the command is applied during it).
        poll(lambda app=app: app.stats()["bus"]["last_error"] is None)
        assert app.stats()["bus"]["connected"]  # and not the outage's error
    for app in apps:  # the load ran all along: Redis going away broke no transaction
        bye = app.quit()
        assert bye["errors"] == []
        assert bye["commits"] > 0


def test_bad_messages_from_redis_cli_are_rejected_and_counted(redis_server, bus, tmp_path):
    channel = open_bus(bus).channel
    cli = find_program("redis-cli", "redis-server")

    def publish_raw(payload: bytes) -> None:
        subprocess.run(
            [
                str(cli),
                "-h",
                redis_server.host,
                "-p",
                str(redis_server.port),
                "-x",
                "PUBLISH",
                f"{channel}:commands",
            ],
            input=payload,
            check=True,
            capture_output=True,
            timeout=10,
        )

    def logged_first() -> bytes:
        r = redis.Redis(host=redis_server.host, port=redis_server.port)
        try:
            return r.zrange(f"{channel}:log", 0, 0)[0]
        finally:
            r.close()

    check_bad_messages_are_rejected(bus, SECRET, tmp_path, publish_raw, logged_first)


def test_a_flood_of_commands_recycles_at_most_once_per_interval(bus, tmp_path):
    interval = 1.0
    engines = [
        create_engine(
            f"sqlite:///{tmp_path}/app{i}.db",
            poolclass=RebalancingQueuePool,
            min_size=2,
            pool_name=f"pool{i}",
            broadcast=bus,
            broadcast_secret=SECRET,
            min_recycle_interval=interval,
        )
        for i in range(2)
    ]
    applied: dict[str, list[float]] = {e.pool.pool_name: [] for e in engines}

    def on_recycle(sender, **kw):
        applied[sender.pool_name].append(time.monotonic())

    signals.recycle_requested.connect(on_recycle)
    try:
        for engine in engines:
            poll(lambda e=engine: e.pool.listener is not None and e.pool.listener.connected)
        start = time.monotonic()
        last = None
        for _ in range(10_000):
            last = send_command(bus, "recycle", secret=SECRET)
        flood = time.monotonic() - start
        assert last is not None
        for engine in engines:
            poll(lambda e=engine: e.pool.stats().bus.commands_pending == 0, timeout=30)
            poll(lambda e=engine: e.pool.stats().bus.generation_applied == last.generation)
        elapsed = time.monotonic() - start
        for engine in engines:
            times = applied[engine.pool.pool_name]
            assert 1 <= len(times) <= elapsed / interval + 1, (len(times), flood)
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert all(gap >= interval * 0.9 for gap in gaps), gaps
            stats = engine.pool.stats().bus
            assert stats.messages_accepted == 10_000
            assert stats.commands_applied + stats.commands_coalesced >= 9_990
    finally:
        signals.recycle_requested.disconnect(on_recycle)
        for engine in engines:
            engine.dispose()


def test_transactions_in_flight_all_commit_through_recycles(bus, pg_url):
    engine = create_engine(
        pg_url,
        poolclass=RebalancingQueuePool,
        pool_size=6,
        max_overflow=0,
        min_size=6,
        broadcast=bus,
        broadcast_secret=SECRET,
        min_recycle_interval=0,
    )
    table = f"bus_tx_{os.getpid()}_{next(_channels)}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (id int PRIMARY KEY, pid int)"))
    ids = itertools.count()
    errors: list[str] = []
    done = threading.Event()

    def work() -> None:
        while True:
            n = next(ids)
            if n >= 1000:
                return
            try:
                with engine.begin() as conn:
                    pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
                    conn.execute(
                        text(f"INSERT INTO {table} VALUES (:n, :pid)"), {"n": n, "pid": pid}
                    )
                    conn.execute(text("SELECT pg_sleep(0.002)"))
            except Exception as err:
                errors.append(repr(err))

    try:
        poll(lambda: engine.pool.listener is not None and engine.pool.listener.connected)
        threads = [threading.Thread(target=work) for _ in range(6)]
        for t in threads:
            t.start()

        def sender() -> None:
            while not done.is_set():
                send_command(bus, "recycle", secret=SECRET, spread=0.05)
                done.wait(0.05)

        s = threading.Thread(target=sender)
        s.start()
        for t in threads:
            t.join()
        done.set()
        s.join()
        assert errors == []
        with engine.connect() as conn:
            rows = conn.execute(text(f"SELECT count(*), count(DISTINCT pid) FROM {table}")).one()
        assert rows[0] == 1000
        # The recycles really happened: many server sessions served the 1,000 transactions.
        assert rows[1] > 6
        assert engine.pool.stats().retirements["signal"] > 0
        assert engine.pool.stats().bus.commands_applied > 5
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {table}"))
        engine.dispose()


def redis_clients(redis_server, name: str = "sqla-rebalance") -> int:
    """Clients whose name starts with ``name`` (publishers, and ``sqla-rebalance-listener``)."""
    r = redis.Redis(host=redis_server.host, port=redis_server.port)
    try:
        return sum(1 for c in r.client_list() if c.get("name", "").startswith(name))
    finally:
        r.close()


def test_engine_cycles_leave_no_listener_and_no_redis_client(redis_server, bus, tmp_path):
    def threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("sqla-rebalance-bus")]

    poll(lambda: not threads())
    poll(lambda: redis_clients(redis_server) == 0)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(1000):
        engine = create_engine(
            f"sqlite:///{tmp_path}/app.db",
            poolclass=RebalancingQueuePool,
            broadcast=bus,
            broadcast_secret=SECRET,
        )
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    poll(lambda: not threads(), timeout=15)
    poll(lambda: redis_clients(redis_server) == 0)
    poll(lambda: len(os.listdir("/proc/self/fd")) <= fds)


def test_status_and_wait_report_a_process_that_cannot_apply(bus, tmp_path, apps):
    (app,) = start_apps(1, db=f"sqlite:///{tmp_path}/app.db", bus=bus, pool="p", secret=SECRET)
    apps.append(app)
    poll(lambda: [p.process for p in fleet_status(bus)] == [app.process])
    os.kill(app.proc.pid, 19)  # SIGSTOP: alive, heartbeat still valid, applying nothing
    try:
        sent = send_command(bus, "recycle", secret=SECRET)
        result = wait_for(bus, sent.generation, timeout=1.0)
        assert not result.complete
        assert [p.process for p in result.pending] == [app.process]
    finally:
        os.kill(app.proc.pid, 18)  # SIGCONT
    result = wait_for(bus, sent.generation, timeout=20)
    assert result.complete
    assert [p.process for p in result.applied] == [app.process]


def test_checkouts_never_wait_for_a_dead_redis(tmp_path):
    # A port nothing listens on: every connect to the bus is refused, for ever.
    port = find_free_port(["127.0.0.1"])
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        broadcast=f"redis://127.0.0.1:{port}/0",
        broadcast_secret=SECRET,
    )
    try:
        poll(lambda: engine.pool.stats().bus.last_error)
        start = time.monotonic()
        for _ in range(200):
            with engine.connect() as conn:
                assert conn.execute(text("select 1")).scalar() == 1
        assert time.monotonic() - start < 5  # no checkout waited on the bus
        assert not engine.pool.stats().bus.connected
        assert "refused" in (engine.pool.stats().bus.last_error or "").lower()
    finally:
        engine.dispose()


def _checkouts_take(engine, n: int = 200) -> float:
    start = time.monotonic()
    for _ in range(n):
        with engine.connect() as conn:
            assert conn.execute(text("select 1")).scalar() == 1
    return time.monotonic() - start


def test_checkouts_never_wait_for_a_hung_redis(redis_server, bus, tmp_path):
    # A Redis that hangs (SIGSTOP: the kernel still accepts TCP, nothing answers),
    # first while the pool is connected to it, then while it connects.
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        min_size=1,
        broadcast=bus,
        broadcast_secret=SECRET,
    )
    try:
        pool = engine.pool
        poll(lambda: pool.stats().bus.connected)
        with redis_server.frozen():
            assert _checkouts_take(engine) < 5
            # The listener finds out through its own deadline, not through a checkout.
            poll(lambda: not pool.stats().bus.connected, timeout=30)
            assert _checkouts_take(engine) < 5
            started = time.monotonic()
            pool.recycle()  # a local command never waits on the bus either
            pool.stats()
            assert time.monotonic() - started < 1
        poll(lambda: pool.stats().bus.connected, timeout=30)  # back after the thaw
        assert pool.stats().bus.last_error is None
    finally:
        engine.dispose()
    with redis_server.frozen():
        late = create_engine(
            f"sqlite:///{tmp_path}/late.db",
            poolclass=RebalancingQueuePool,
            broadcast=f"{bus}_late",  # a listener of its own, connecting to the hung server
            broadcast_secret=SECRET,
        )
        try:
            assert _checkouts_take(late) < 5
            assert not late.pool.stats().bus.connected
            started = time.monotonic()
            late.dispose()  # never waits on the hung bus
            assert time.monotonic() - started < 5
        finally:
            late.dispose()


def test_garbage_in_the_log_is_read_past_once(redis_server, bus, tmp_path):
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        min_size=1,
        broadcast=bus,
        broadcast_secret=SECRET,
        min_recycle_interval=0,
    )
    try:
        pool = engine.pool
        poll(lambda: pool.listener is not None and pool.listener.connected)
        channel = open_bus(bus).channel
        r = redis.Redis(host=redis_server.host, port=redis_server.port)
        # Somebody with write access to Redis puts junk into the log, then the listener
        # reconnects (client kill) and reads the log: it must read past the junk, once.
        r.zadd(f"{channel}:log", {b"junk": int(time.time() * 1000) + 5})
        r.client_kill_filter(_type="pubsub")
        poll(lambda: pool.stats().bus.rejected.get("malformed") == 1)
        sent = send_command(bus, "recycle", secret=SECRET)
        poll(lambda: pool.stats().bus.generation_applied == sent.generation)
        r.client_kill_filter(_type="pubsub")  # another reconnect: the junk is not read again
        poll(lambda: pool.stats().bus.reconnects >= 2 and pool.stats().bus.connected)
        assert pool.stats().bus.rejected == {"malformed": 1}
        r.close()
    finally:
        engine.dispose()


class RedisStore(Store):
    """The Redis keys of a channel, written with a plain client (as redis-cli would)."""

    huge_positions = (1e15, float("inf"))

    def __init__(self, redis_server, bus: str) -> None:
        self.channel = open_bus(bus).channel
        self.r = redis.Redis(host=redis_server.host, port=redis_server.port)

    def add_log(self, position, payload):
        self.r.zadd(f"{self.channel}:log", {payload: position})

    def remove_log(self, position):
        score = "+inf" if position == float("inf") else position
        self.r.zremrangebyscore(f"{self.channel}:log", score, score)

    def log_only(self, payload_for):
        gen = next_generation(int(self.r.get(f"{self.channel}:gen") or 0))
        self.r.set(f"{self.channel}:gen", gen)
        self.add_log(gen, payload_for(gen))
        return gen

    def add_heartbeat(self, name, payload):
        self.r.set(f"{self.channel}:hb:{name}", payload, ex=60)
        self.r.sadd(f"{self.channel}:hb", name)

    def reconnect(self, engine):
        self.r.client_kill_filter(_type="pubsub")


@pytest.fixture
def store(redis_server, bus):
    store = RedisStore(redis_server, bus)
    yield store
    store.r.close()


def test_junk_in_the_log_moves_nothing(bus, tmp_path, store):
    """Scores 1e15 and +inf (and junk an hour ahead): no cursor, generation or --wait
    answer moves, a missed command is caught up, no reconnect loop (int(+inf))."""
    check_junk_in_the_log_moves_nothing(bus, SECRET, tmp_path, store)


def test_junk_heartbeats_are_skipped_and_counted(bus, tmp_path, store):
    extra = {"not_utf8": b"\xff\xfe\x00junk", "oversized": b"{" + b" " * (2 << 20) + b"}"}
    # A heartbeat index member that is not UTF-8 (and whose key does not exist).
    store.r.sadd(f"{store.channel}:hb", b"\xff\xfe")
    check_junk_heartbeats_are_skipped(bus, SECRET, tmp_path, store, extra)


def test_junk_in_the_generation_key(bus, tmp_path, store, monkeypatch, capsys):
    """Publishing: a key that is not a number is a bus problem (exit 3, nothing sent);
    one out of range (1e15 ms, beyond int64) is ignored and overwritten. Listening:
    no reconnect loop, and the log is read anyway."""
    from sqla_rebalance.bus import listener as listener_mod
    from sqla_rebalance.cli import main

    monkeypatch.setattr(listener_mod, "POLL_INTERVAL", 0.2)  # the slow re-read, made fast
    monkeypatch.setenv("SQLA_REBALANCE_SECRET", SECRET)
    gen_key = f"{store.channel}:gen"
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        broadcast=bus,
        broadcast_secret=SECRET,
        min_recycle_interval=0,
    )
    try:
        pool = engine.pool
        poll(lambda: pool.listener is not None and pool.listener.connected)
        first = send_command(bus, "recycle", secret=SECRET)
        poll(lambda: pool.stats().bus.generation_applied == first.generation)
        store.r.set(gen_key, "junk")
        assert main(["recycle", "--bus", bus]) == 3
        err = capsys.readouterr().err
        assert "cannot publish" in err and f"{gen_key} holds 'junk'" in err
        assert "invalid literal" not in err
        assert store.r.zcard(f"{store.channel}:log") == 1  # nothing was published
        # The listener polls the key (every 0.2 s here): no reconnect loop.
        time.sleep(1.0)
        assert pool.stats().bus.reconnects == 0 and pool.stats().bus.last_error is None
        for junk in (str(10**15), str(2**63), "99999999999999999999"):
            store.r.set(gen_key, junk)
            sent = send_command(bus, "recycle", secret=SECRET)
            assert sent.generation < time.time() * 1000 + 86_400_000
            assert int(store.r.get(gen_key)) == sent.generation  # overwritten
            poll(lambda sent=sent: pool.stats().bus.generation_applied == sent.generation)
        store.r.delete(gen_key)
        assert main(["rebalance", "--bus", bus]) == 0
    finally:
        engine.dispose()


def test_a_junk_flood_is_rejected_cheaply_and_logged_as_a_summary(bus, tmp_path, store, caplog):
    """10,000 junk messages of five kinds: every one counted, a handful of log lines, the
    listener still connected, and a real command sent after it applied."""
    caplog.set_level("INFO", logger="sqla_rebalance.bus")
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        broadcast=bus,
        broadcast_secret=SECRET,
        min_recycle_interval=0,
    )
    try:
        pool = engine.pool
        poll(lambda: pool.listener is not None and pool.listener.connected)
        junk = [
            *junk_commands(store.channel, SECRET.encode(), int(time.time() * 1000) + 5),
            b"x" * 4000,  # oversized: refused before any parse
        ]
        pipe = store.r.pipeline(transaction=False)
        for i in range(10_000):
            pipe.publish(f"{store.channel}:commands", junk[i % len(junk)])
            if i % 500 == 499:
                pipe.execute()
        pipe.execute()
        poll(lambda: pool.stats().bus.messages_rejected == 10_000, timeout=30)
        sent = send_command(bus, "recycle", secret=SECRET)
        poll(lambda: pool.stats().bus.generation_applied == sent.generation)
        stats = pool.stats().bus
        assert stats.connected and stats.reconnects == 0
        assert set(stats.rejected) == {
            "malformed",
            "bad_signature",
            "unsigned",
            "version",
            "oversized",
        }
        lines = [r for r in caplog.records if "rejected" in r.getMessage()]
        assert len(lines) <= len(stats.rejected)  # one per kind; the rest is a summary later
    finally:
        engine.dispose()


def test_a_password_in_the_bus_url_is_never_shown(tmp_path, caplog, monkeypatch, capsys):
    """user:password@ and ?password= are masked in stats, logs, warnings and CLI errors."""
    import warnings

    from sqla_rebalance.cli import main

    port = find_free_port(["127.0.0.1"])  # nothing listens: every connect fails
    caplog.set_level("INFO", logger="sqla_rebalance")
    monkeypatch.setenv("SQLA_REBALANCE_SECRET", SECRET)
    for url in (
        f"redis://127.0.0.1:{port}/0?password=hunter2secret",
        f"redis://app:hunter2secret@127.0.0.1:{port}/0",
        f"redis://127.0.0.1:{port}/0?channel=c1&password=hunter2secret",
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = create_engine(
                f"sqlite:///{tmp_path}/app.db", poolclass=RebalancingQueuePool, broadcast=url
            )
        try:
            poll(lambda engine=engine: engine.pool.stats().bus.last_error)
            stats = engine.pool.stats().bus
            shown = [
                stats.url or "",
                stats.last_error or "",
                repr(engine.pool.stats().as_dict()),
                *(str(w.message) for w in caught),
                *(r.getMessage() for r in caplog.records),
            ]
            assert "***" in stats.url
        finally:
            engine.dispose()
        assert main(["recycle", "--bus", url]) == 3
        assert main(["status", "--bus", url]) == 3
        assert main(["recycle", "--bus", url.replace("redis://", "redis+x://")]) == 2
        shown.append(capsys.readouterr().err)
        assert any("***" in line for line in shown)
        for line in shown:
            assert "hunter2secret" not in line
        caplog.clear()


@pytest.fixture
def sentinel_trio():
    """A Redis master, its replica and one Sentinel watching them (quorum 1)."""
    from .servers import RedisSentinel, RedisServer

    master = RedisServer()
    replica = RedisServer(settings={"replicaof": f"{master.host} {master.port}"})
    sentinel = RedisSentinel(master)
    started = []
    try:
        for server in (master, replica, sentinel):
            server.start()
            started.append(server)
        yield master, replica, sentinel
    finally:
        for server in reversed(started):
            server.close()


def test_a_sentinel_bus_follows_a_failover(sentinel_trio, tmp_path):
    master, replica, sentinel = sentinel_trio
    bus = f"{sentinel.url()}?channel=sentinel{os.getpid()}"
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        min_size=1,
        broadcast=bus,
        broadcast_secret=SECRET,
        min_recycle_interval=0,
    )
    try:
        pool = engine.pool
        poll(lambda: pool.stats().bus.connected)
        first = send_command(bus, "recycle", secret=SECRET)
        poll(lambda: pool.stats().bus.generation_applied == first.generation)
        assert [p.process for p in fleet_status(bus)] == [pool.stats().bus.process]
        master.stop()  # the sentinel promotes the replica within seconds
        with redis.Redis(host=sentinel.host, port=sentinel.port) as s:
            poll(
                lambda: (
                    int(s.sentinel_get_master_addr_by_name(sentinel.service)[1]) == replica.port
                ),
                timeout=30,
            )
        # Publisher and listener both find the new master through the sentinel.
        second = poll(lambda: _try_send(bus), timeout=30)
        poll(lambda: pool.stats().bus.generation_applied == second.generation, timeout=30)
        assert pool.stats().bus.connected
    finally:
        engine.dispose()


def _try_send(bus: str):
    from sqla_rebalance.bus.base import BusUnavailableError

    try:
        return send_command(bus, "rebalance", secret=SECRET)
    except BusUnavailableError:
        return None


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://127.0.0.1:26379",  # no service
        "redis+sentinel://127.0.0.1:26379/svc/zero",
        "redis+sentinel://127.0.0.1:notaport/svc",
        "redis+sentinel://127.0.0.1:26379/svc?timeout=1",
    ],
)
def test_malformed_sentinel_urls_are_refused_at_once(url):
    with pytest.raises(ConfigurationError):
        open_bus(url)


def test_sentinel_url_parts():
    bus = open_bus("redis+sentinel://u:p%40ss@a:26379,b:26380/orders/2?sentinel_password=s")
    target = bus.sentinel
    assert target is not None
    assert target.sentinels == [("a", 26379), ("b", 26380)]
    assert (target.service, target.db, target.username, target.password) == (
        "orders",
        2,
        "u",
        "p@ss",
    )
    assert target.sentinel_password == "s"
    assert "p@ss" not in repr(bus) and "p%40ss" not in repr(bus)


# -- one connection per listening process (RESP3), and no redundant PINGs ---------------
LISTENER_NAME = "sqla-rebalance-listener"


def tcp_connections(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` to ``port`` (from /proc, whatever
    their client name: what Redis's maxclients counts)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                fields = line.split()
                remote, state, inode = fields[2], fields[3], fields[9]
                established = state == "01"
                if established and int(remote.rsplit(":", 1)[1], 16) == port and inode in inodes:
                    count += 1
    return count


def listener_ids(r: redis.Redis) -> list[int]:
    return [int(c["id"]) for c in r.client_list() if c.get("name") == LISTENER_NAME]


def command_calls(r: redis.Redis, command: str) -> int:
    return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_listening_process_holds_one_redis_connection(redis_server, bus, tmp_path, apps, store):
    """The whole of a listening process's Redis traffic (commands, catch-up, heartbeats,
    status) goes over one connection, counted by the kernel, before and after a reconnect."""
    (app,) = start_apps(1, db=f"sqlite:///{tmp_path}/app.db", bus=bus, pool="p", secret=SECRET)
    apps.append(app)
    # Status works: the heartbeats are written over the subscribed connection.
    poll(lambda: [p.process for p in fleet_status(bus)] == [app.process])
    assert tcp_connections(app.proc.pid, redis_server.port) == 1
    (first_id,) = poll(lambda: len(ids := listener_ids(store.r)) == 1 and ids)
    flags = {c["id"]: c for c in store.r.client_list()}[str(first_id)]
    assert (flags["resp"], flags["sub"]) == ("3", "1")  # subscribed, and RESP3
    # A live command.
    sent = send_command(bus, "recycle", secret=SECRET)
    assert sent.receivers == 1
    assert app.wait_event("recycle")["reason"] == "signal"
    # A missed one: only in the log, then the connection is cut; the listener reconnects
    # (one connection again) and catches up from the log over it.
    missed = store.log_only(
        lambda gen: encode_command("recycle", gen, SECRET.encode(), store.channel)
    )
    store.r.client_kill_filter(_id=first_id)
    poll(lambda: app.stats()["bus"]["generation_applied"] == missed, timeout=20)
    assert app.count("recycle") == 2
    poll(lambda: listener_ids(store.r) not in ([], [first_id]))
    assert tcp_connections(app.proc.pid, redis_server.port) == 1
    assert app.stats()["bus"]["connected"]
    result = wait_for(bus, missed, timeout=20)  # status and --wait see it applied
    assert [p.process for p in result.applied] == [app.process]
    assert tcp_connections(app.proc.pid, redis_server.port) == 1


def encode_command(action: str, gen: int, secret: bytes, channel: str) -> bytes:
    import dataclasses

    from sqla_rebalance.bus.message import encode, new_command

    return encode(dataclasses.replace(new_command(action), gen=gen), secret, channel=channel)


def test_an_idle_listener_sends_no_ping(redis_server, bus, tmp_path, store):
    """Its heartbeats prove the connection alive: no PING at all over a window longer
    than redis-py's health-check interval (which made about half the traffic before)."""
    from sqla_rebalance.bus import redis_bus

    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        broadcast=bus,
        broadcast_secret=SECRET,
    )
    try:
        pool = engine.pool
        poll(lambda: pool.listener is not None and pool.listener.heartbeats >= 1)
        listener = pool.listener
        pings, sets = command_calls(store.r, "ping"), command_calls(store.r, "set")
        hb = listener.heartbeats
        window = redis_bus._HEALTH_CHECK_INTERVAL + 2.0
        time.sleep(window)  # the observation window (nothing is waited for)
        assert command_calls(store.r, "ping") == pings
        # The listener was not silent: it kept writing heartbeats over its connection.
        assert listener.heartbeats > hb
        assert command_calls(store.r, "set") > sets
        assert pool.stats().bus.connected and pool.stats().bus.reconnects == 0
    finally:
        engine.dispose()
    assert redis_bus._IDLE_PING_AFTER > listener_module().HEARTBEAT_INTERVAL


def listener_module():
    from sqla_rebalance.bus import listener

    return listener


@pytest.fixture
def no_heartbeats_user(redis_server):
    """A Redis user that may do everything but SET and SADD (heartbeats refused)."""
    r = redis.Redis(host=redis_server.host, port=redis_server.port)
    r.acl_setuser(
        "nohb",
        enabled=True,
        passwords=["+nohb-pass"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-set", "-sadd"],
    )
    yield "nohb", "nohb-pass"
    r.acl_deluser("nohb")
    r.close()


def test_without_heartbeats_at_most_one_ping_per_idle_interval(
    redis_server, bus, no_heartbeats_user, tmp_path, store, monkeypatch, caplog
):
    """Heartbeats refused by an ACL: the connection carries nothing on its own, so the
    listener PINGs once per idle interval, and a hung server is noticed within
    idle interval + socket timeout."""
    from sqla_rebalance.bus import redis_bus

    idle = 1.0
    monkeypatch.setattr(redis_bus, "_IDLE_PING_AFTER", idle)
    caplog.set_level("WARNING", logger="sqla_rebalance.bus")
    user, password = no_heartbeats_user
    url = f"redis://{user}:{password}@{redis_server.host}:{redis_server.port}/0"
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        broadcast=f"{url}?channel={store.channel}",  # the listener's user: no SET/SADD
        broadcast_secret=SECRET,
        min_recycle_interval=0,
    )
    try:
        pool = engine.pool
        poll(lambda: any("cannot write heartbeats" in r.getMessage() for r in caplog.records))
        assert pool.stats().bus.connected
        poll(lambda: len(listener_ids(store.r)) == 1)  # an earlier test's listener gone
        pings = command_calls(store.r, "ping")
        start = time.monotonic()
        time.sleep(4 * idle)  # the observation window
        sent_pings = command_calls(store.r, "ping") - pings
        elapsed = time.monotonic() - start
        assert 1 <= sent_pings <= elapsed / idle + 1, (sent_pings, elapsed)
        sent = send_command(bus, "recycle", secret=SECRET)  # commands still arrive (sent as admin)
        poll(lambda: pool.stats().bus.generation_applied == sent.generation)
        assert pool.stats().bus.reconnects == 0
        with redis_server.frozen():
            frozen_at = time.monotonic()
            poll(lambda: not pool.stats().bus.connected, timeout=20)
            noticed = time.monotonic() - frozen_at
            assert noticed <= idle + redis_bus._SOCKET_TIMEOUT + 1.5, noticed
        poll(lambda: pool.stats().bus.connected, timeout=30)
        assert "nohb-pass" not in caplog.text
    finally:
        engine.dispose()


def test_a_message_that_arrives_while_a_reply_is_awaited_is_kept(redis_server, bus, store):
    """Messages published just before each command are on the socket ahead of its reply:
    queued while the reply is read, then returned by get(), in order, none lost."""
    from sqla_rebalance.bus.redis_bus import _RedisSubscription

    sub = open_bus(bus).subscribe()
    try:
        assert isinstance(sub, _RedisSubscription)
        topic = f"{store.channel}:commands"
        sent = []
        for n, command in enumerate(
            [
                lambda: sub.generation(),
                lambda: sub.since(0),
                lambda: sub.put_heartbeat("p1", b"{}", 5.0),
            ]
        ):
            batch = [f"m{n}.{i}".encode() for i in range(3)]
            for data in batch:
                # Delivered (written to the subscription's socket) before PUBLISH returns.
                assert store.r.publish(topic, data) == 1
            sent += batch
            command()
            # Read past while waiting for the reply, and kept (get() was not called yet).
            assert list(sub._messages) == sent
        assert store.r.exists(f"{store.channel}:hb:p1")
        got = []
        while (data := sub.get(0.0)) is not None:
            got.append(data)
        assert got == sent
        assert sub.get(0.05) is None
        store.r.publish(topic, b"last")
        assert poll(lambda: sub.get(0.1)) == b"last"
    finally:
        sub.close()


def test_get_returns_within_its_timeout_on_a_hung_server(redis_server, bus):
    sub = open_bus(bus).subscribe()
    try:
        with redis_server.frozen():
            for timeout in (0.0, 0.2, 0.5):
                start = time.monotonic()
                assert sub.get(timeout) is None
                assert time.monotonic() - start < timeout + 0.1
    finally:
        sub.close()


def test_closed_under_it_the_subscription_fails_and_never_reconnects_silently(
    redis_server, bus, store
):
    from sqla_rebalance.bus.base import BusUnavailableError

    sub = open_bus(bus).subscribe()
    try:
        (listener_id,) = poll(lambda: len(ids := listener_ids(store.r)) == 1 and ids)
        store.r.client_kill_filter(_id=listener_id)
        with pytest.raises(BusUnavailableError):
            sub.get(5.0)  # the server's close is seen at once
        for call in (sub.generation, lambda: sub.get(0.0), lambda: sub.since(0)):
            with pytest.raises(BusUnavailableError):
                call()
        assert listener_ids(store.r) == []  # nothing reopened behind the listener's back
    finally:
        sub.close()


def test_without_resp3_the_listener_falls_back_to_two_connections(tmp_path, caplog):
    """A server that does not know HELLO (Redis < 6): two connections, said once, and
    commands and status still work."""
    from sqla_rebalance.bus.redis_bus import _TwoConnectionSubscription

    from .servers import RedisServer

    caplog.set_level("WARNING", logger="sqla_rebalance.bus")
    server = RedisServer(settings={"rename-command HELLO": "hello-renamed-away"})
    server.start()
    try:
        bus = f"{server.url()}?channel=old{os.getpid()}"
        for _ in range(2):
            sub = open_bus(bus).subscribe()
            assert isinstance(sub, _TwoConnectionSubscription)
            sub.close()
        said = [r for r in caplog.records if "no RESP3" in r.getMessage()]
        assert len(said) == 1
        engine = create_engine(
            f"sqlite:///{tmp_path}/app.db",
            poolclass=RebalancingQueuePool,
            broadcast=bus,
            broadcast_secret=SECRET,
            min_recycle_interval=0,
        )
        try:
            pool = engine.pool
            poll(lambda: [p.process for p in fleet_status(bus)] == [pool.stats().bus.process])
            sent = send_command(bus, "recycle", secret=SECRET)
            poll(lambda: pool.stats().bus.generation_applied == sent.generation)
            assert redis_clients(server) == 2  # pub/sub + commands
        finally:
            engine.dispose()
        assert len([r for r in caplog.records if "no RESP3" in r.getMessage()]) == 1
    finally:
        server.close()


def test_a_pong_in_flight_is_not_taken_for_a_command_reply(bus, store, monkeypatch):
    """The idle PING is not waited for: the next command reads its PONG first."""
    from sqla_rebalance.bus import redis_bus

    store.r.set(f"{store.channel}:gen", 12345)
    sub = open_bus(bus).subscribe()
    try:
        assert isinstance(sub, redis_bus._RedisSubscription)
        for _ in range(20):
            sub._heard = time.monotonic() - redis_bus._IDLE_PING_AFTER  # idle: PING now
            pings = command_calls(store.r, "ping")
            assert sub.get(0.0) is None  # sends it; reads the PONG only if already there
            poll(lambda pings=pings: command_calls(store.r, "ping") == pings + 1)
            assert sub.generation() == 12345  # its own reply, whether the PONG was read or not
            assert sub._ping_sent is None
            assert sub.get(0.0) is None  # and nothing left over on the connection
        # Deterministically: the PONG answered, still unread, when a command is sent.
        sub._conn.send_command("PING", check_health=False)
        sub._ping_sent = time.monotonic()
        poll(lambda: sub._conn.can_read(0.0))
        assert sub.generation() == 12345
        assert sub._ping_sent is None
        store.r.publish(f"{store.channel}:commands", b"after")
        assert poll(lambda: sub.get(0.1)) == b"after"
    finally:
        sub.close()


def test_a_heartbeat_learns_the_fleet_size_in_the_same_round_trip(bus):
    """The heartbeat write also reads the size of the heartbeat index (SCARD): the
    hint by which acknowledgements spread (``ACK_RATE``)."""
    from sqla_rebalance.bus import open_bus

    sub = open_bus(bus).subscribe()
    try:
        sub.put_heartbeat("proc-a", b"{}", 15.0)
        sub.put_heartbeat("proc-b", b"{}", 15.0)
        assert sub.fleet_size == 2
    finally:
        sub.close()


def test_wait_reads_only_the_processes_that_have_not_acknowledged(bus, tmp_path, apps, monkeypatch):
    """Each listener acknowledges a command with its heartbeat (a set per command):
    ``wait_for`` reads the heartbeats of the processes not in it, and counts the
    others; its answer still comes from one full look at the end."""
    from sqla_rebalance.bus.redis_bus import RedisBus, ack_keys

    apps += start_apps(3, db=f"sqlite:///{tmp_path}/app.db", bus=bus, pool="p", secret=SECRET)
    poll(lambda: len(fleet_status(bus)) == 3, timeout=20)
    sent = send_command(bus, "recycle", pool="p", secret=SECRET)
    assert wait_for(bus, sent.generation, pool="p", timeout=20).complete
    target = open_bus(bus)
    ack, hit = ack_keys(target.channel, sent.generation, "p")
    client = redis.Redis.from_url(bus.split("?")[0])
    try:
        poll(lambda: client.scard(ack) == 3, timeout=20)
        idents = {m.decode() for m in client.smembers(ack)}
        assert idents == {p.process for p in fleet_status(bus)} == {a.process for a in apps}
        assert {m.decode() for m in client.smembers(hit)} == idents
        assert 0 < client.ttl(ack) <= 3600
    finally:
        client.close()

    looks: list[int] = []
    full: list[int] = []
    original_acks, original_full = RedisBus.acknowledgements, RedisBus.heartbeats

    def spy_acks(self, generation, pattern):
        view = original_acks(self, generation, pattern)
        looks.append(len(view.heartbeats))
        return view

    def spy_full(self):
        full.append(1)
        return original_full(self)

    monkeypatch.setattr(RedisBus, "acknowledgements", spy_acks)
    monkeypatch.setattr(RedisBus, "heartbeats", spy_full)
    result = wait_for(bus, sent.generation, pool="p", timeout=20)
    assert result.complete and len(result.applied) == 3
    assert looks == [0]  # every process acknowledged: no heartbeat read at the look
    assert full == [1]  # the final answer


def test_a_process_that_has_not_acknowledged_is_pending(bus, tmp_path, apps):
    """A process that has not applied the command is not in the set: it is read,
    and reported pending; junk in the acknowledgement keys is not believed."""
    from sqla_rebalance.bus.redis_bus import ack_keys

    (app,) = start_apps(1, db=f"sqlite:///{tmp_path}/app.db", bus=bus, pool="p", secret=SECRET)
    apps.append(app)
    poll(lambda: [p.process for p in fleet_status(bus)] == [app.process], timeout=20)
    os.kill(app.proc.pid, 19)  # SIGSTOP
    try:
        sent = send_command(bus, "recycle", pool="p", secret=SECRET)
        target = open_bus(bus)
        ack, hit = ack_keys(target.channel, sent.generation, "p")
        client = redis.Redis.from_url(bus.split("?")[0])
        try:
            client.sadd(hit, *(f"forged-{i}" for i in range(50)))  # counted, never read
            view = target.acknowledgements(sent.generation, "p")
            assert view is not None and view.applied == 50 and len(view.heartbeats) == 1
            result = wait_for(bus, sent.generation, pool="p", timeout=1.0)
            assert not result.complete
            assert [p.process for p in result.pending] == [app.process]
            client.delete(hit)
            client.set(ack, "not a set")  # WRONGTYPE: read every heartbeat instead
            assert target.acknowledgements(sent.generation, "p") is None
            assert not wait_for(bus, sent.generation, pool="p", timeout=0.5).complete
            client.delete(ack)
        finally:
            client.close()
            target.close()
    finally:
        os.kill(app.proc.pid, 18)  # SIGCONT
    result = wait_for(bus, sent.generation, pool="p", timeout=20)
    assert result.complete and [p.process for p in result.applied] == [app.process]


def _documented_acls(channel: str) -> list[list[str]]:
    """The ``ACL SETUSER`` commands of docs/commands.md, for ``channel``."""
    text = (ROOT / "docs" / "commands.md").read_text()
    block = text.split("**ACLs.**", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    commands: list[list[str]] = []
    for line in block.splitlines():
        if line.startswith("ACL SETUSER"):
            commands.append(line.split())
        elif line.strip():
            commands[-1] += line.split()
    return [[word.replace("sqla_rebalance", channel) for word in c] for c in commands]


def test_the_documented_acls_are_enough(redis_server, bus, tmp_path, caplog):
    """The listener and operator users exactly as docs/commands.md gives them: heartbeats,
    acknowledgements and the fleet size are written, commands arrive, and the operator
    sends, reads status and waits; nothing is refused."""
    channel = open_bus(bus).channel
    admin = redis.Redis(host=redis_server.host, port=redis_server.port)
    acls = _documented_acls(channel)
    assert [c[2] for c in acls] == ["sqla_listener", "sqla_operator"]
    for command in acls:
        password = f"{command[2]}-pass"
        admin.execute_command(*(f">{password}" if w.startswith(">") else w for w in command))
    where = f"{redis_server.host}:{redis_server.port}/0?channel={channel}"
    listener_bus = f"redis://sqla_listener:sqla_listener-pass@{where}"
    operator_bus = f"redis://sqla_operator:sqla_operator-pass@{where}"
    caplog.set_level("WARNING", logger="sqla_rebalance")
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        broadcast=listener_bus,
        broadcast_secret=SECRET,
        min_recycle_interval=0,
    )
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        pool = engine.pool
        poll(lambda: len(fleet_status(operator_bus)) == 1, timeout=20)
        sent = send_command(operator_bus, "recycle", secret=SECRET)
        assert wait_for(operator_bus, sent.generation, timeout=20).complete
        process = pool.stats().bus.process
        ack_key = f"{channel}:ack:{sent.generation}:*"
        poll(lambda: admin.smembers(ack_key) == {process.encode()}, timeout=20)
        assert pool.listener is not None and pool.listener._fleet == 1  # SCARD allowed
        assert pool.stats().bus.reconnects == 0
        assert not [r for r in caplog.records if "cannot write" in r.getMessage()]
    finally:
        engine.dispose()
        admin.acl_deluser("sqla_listener", "sqla_operator")
        admin.close()


@pytest.mark.parametrize("kind", ["one connection", "two connections"])
def test_a_junk_acknowledgement_key_costs_only_that_acknowledgement(redis_server, bus, kind):
    """Somebody wrote a string where a command's acknowledgement set goes: that one
    acknowledgement is lost (WRONGTYPE); the heartbeat, the other acknowledgements and
    the fleet size are written, and nothing is taken for a lost connection."""
    from sqla_rebalance.bus.redis_bus import _TwoConnectionSubscription

    target = open_bus(bus)
    sub = target.subscribe() if kind == "one connection" else _TwoConnectionSubscription(target)
    r = redis.Redis(host=redis_server.host, port=redis_server.port)
    channel = target.channel
    try:
        r.set(f"{channel}:ack:5:*", "junk")
        sub.put_heartbeat("p1", b"{}", 5.0, [(5, "*", True), (6, "*", False)])
        assert r.get(f"{channel}:hb:p1") == b"{}"
        assert r.get(f"{channel}:ack:5:*") == b"junk"
        assert r.smembers(f"{channel}:ack:6:*") == {b"p1"}
        assert not r.exists(f"{channel}:hit:6:*")  # no matching pool: not a hit
        assert sub.fleet_size == 1
        assert sub._can_heartbeat and sub._can_ack
    finally:
        sub.close()
        r.close()


def test_a_wait_ends_when_nothing_is_pending_even_with_no_hit_counted(redis_server, bus):
    """A process acknowledged a command without a matching pool, then made one (and
    its heartbeat shows it done): no look finds anything pending, none counts a hit;
    the wait ends at once from the full read, not at its timeout."""
    target = open_bus(bus)
    r = redis.Redis(host=redis_server.host, port=redis_server.port)
    channel, gen = target.channel, 42
    beat = {"process": "p1", "ts": time.time(), "pools": [{"pool": "p", "generation": gen}]}
    try:
        r.set(f"{channel}:hb:p1", json.dumps(beat), px=15000)
        r.sadd(f"{channel}:hb", "p1")
        r.sadd(f"{channel}:ack:{gen}:p", "p1")  # acknowledged, no hit
        started = time.monotonic()
        result = wait_for(bus, gen, pool="p", timeout=10)
        assert result.complete and [p.process for p in result.applied] == ["p1"]
        assert time.monotonic() - started < 5
    finally:
        r.close()
