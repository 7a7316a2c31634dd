"""Cluster-wide commands over a real Redis Cluster (``redis+cluster://``), started by the
tests: the checks of the Redis bus (several OS processes, raw bad messages, junk in the
store, missed commands caught up), concurrent publishers, and nodes that stop, hang or
fail over under a listening pool."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.cluster import ClusterNode
from redis.cluster import RedisCluster as ClusterClient
from sqlalchemy import create_engine, text

from sqla_rebalance import RebalancingQueuePool
from sqla_rebalance.bus import fleet_status, open_bus, send_command, wait_for
from sqla_rebalance.bus.base import BusUnavailableError, next_generation
from sqla_rebalance.devservers.redis import RedisCluster
from sqla_rebalance.errors import ConfigurationError

from .bus_cases import (
    Store,
    check_bad_messages_are_rejected,
    check_junk_heartbeats_are_skipped,
    check_junk_in_the_log_moves_nothing,
)
from .bus_proc import ROOT, start_apps
from .helpers import wait_for as poll
from .servers import find_free_port, find_program

pytestmark = pytest.mark.servers

SECRET = "redis-cluster-bus-test-secret"
_channels = itertools.count()


def _start(request: pytest.FixtureRequest, cluster: RedisCluster) -> None:
    if request.config.getoption("--no-servers"):
        pytest.skip("needs real servers; --no-servers given")
    try:
        cluster.start()
    except BaseException:
        cluster.close()
        raise


@pytest.fixture(scope="module")
def redis_cluster(request: pytest.FixtureRequest) -> Iterator[RedisCluster]:
    """Three Redis Cluster masters on 127.0.0.1, no replicas, no persistence."""
    cluster = RedisCluster(3)
    _start(request, cluster)
    yield cluster
    cluster.close()


@pytest.fixture
def cluster(redis_cluster: RedisCluster) -> RedisCluster:
    """The module's cluster, repaired first: a node a previous test stopped or froze is
    back, and every node sees every slot served."""
    redis_cluster.ensure_running()
    return redis_cluster


def _client(cluster: RedisCluster) -> ClusterClient:
    return ClusterClient(
        startup_nodes=[ClusterNode(n.host, n.port) for n in cluster.nodes],
        require_full_coverage=False,
        socket_timeout=5,
        password=cluster.password,
    )


@pytest.fixture
def bus(cluster: RedisCluster) -> str:
    """A cluster bus URL on a channel of its own (tests do not see each other's commands)."""
    return f"{cluster.url()}?channel=c{os.getpid()}_{next(_channels)}"


@pytest.fixture
def apps():
    started = []
    yield started
    for app in started:
        app.kill()


def _channel(bus: str) -> str:
    return open_bus(bus).channel


def _try_send(bus: str, action: str = "rebalance"):
    try:
        return send_command(bus, action, secret=SECRET)
    except BusUnavailableError:
        return None


def _engine(bus: str, tmp_path, name: str = "app", **kw):
    return create_engine(
        f"sqlite:///{tmp_path}/{name}.db",
        poolclass=RebalancingQueuePool,
        min_size=1,
        broadcast=bus,
        broadcast_secret=SECRET,
        min_recycle_interval=0,
        **kw,
    )


# -- the keys and the URL -----------------------------------------------------------


def test_every_key_of_a_channel_is_in_one_slot(cluster, bus, tmp_path):
    channel = _channel(bus)
    engine = _engine(bus, tmp_path)
    try:
        pool = engine.pool
        poll(lambda: pool.stats().bus.connected)
        sent = send_command(bus, "recycle", secret=SECRET)
        poll(lambda: pool.stats().bus.generation_applied == sent.generation)
        poll(lambda: fleet_status(bus))
        client = _client(cluster)
        try:
            owner = cluster.node_for(f"{{{channel}}}")
            direct = redis.Redis(host=owner.host, port=owner.port)
            # Acknowledged with the next heartbeat (the pattern "*" is part of the key).
            poll(lambda: direct.exists(f"{{{channel}}}:ack:{sent.generation}:*"))
            keys = sorted(k.decode() for k in direct.keys(f"{{{channel}}}:*"))
            direct.close()
            process = pool.stats().bus.process
            assert keys == [
                f"{{{channel}}}:ack:{sent.generation}:*",  # the acknowledgements of the command
                f"{{{channel}}}:gen",
                f"{{{channel}}}:hb",
                f"{{{channel}}}:hb:{process}",
                f"{{{channel}}}:hit:{sent.generation}:*",
                f"{{{channel}}}:log",
            ]
            assert client.smembers(keys[0]) == {process.encode()}
            # The heartbeat's round trip also told the listener the fleet's size.
            listener = pool.listener
            assert listener is not None and listener._fleet == 1
            assert len({client.keyslot(k) for k in keys}) == 1
            assert int(client.get(f"{{{channel}}}:gen")) == sent.generation
            # The wake-up goes over the shard channel, on the node of the slot.
            numsub = redis.Redis(host=owner.host, port=owner.port).pubsub_shardnumsub(
                f"{{{channel}}}:commands"
            )
            assert numsub == [(f"{{{channel}}}:commands".encode(), 1)]
        finally:
            client.close()
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://127.0.0.1:notaport",
        "redis+cluster://127.0.0.1:7000,:7001/",
        "redis+cluster://127.0.0.1:7000/1",
        "redis+cluster://127.0.0.1:7000/?db=2",
        "redis+cluster://127.0.0.1:7000/?timeout_please=1",
        "redis+cluster://127.0.0.1:7000/?health_check_interval=1",
    ],
)
def test_malformed_cluster_urls_are_refused_at_once(url):
    with pytest.raises(ConfigurationError):
        open_bus(url)


def test_cluster_url_parts():
    from sqla_rebalance.bus.redis_cluster import RedisClusterBus

    bus = open_bus("redis+cluster://u:p%40ss@a:7000,b:7001,c/?socket_timeout=3&channel=orders")
    assert isinstance(bus, RedisClusterBus)
    assert bus.channel == "orders"
    target = bus.target
    assert target.seeds == [("a", 7000), ("b", 7001), ("c", 6379)]
    assert target.options == {"username": "u", "password": "p@ss", "socket_timeout": 3.0}
    assert not target.ssl
    assert "p@ss" not in repr(bus) and "p%40ss" not in repr(bus)
    assert bus._keys() == ("{orders}:gen", "{orders}:log", "{orders}:commands")
    tls = open_bus("rediss+cluster://h:7000?password=pw0rdsecret")
    assert tls.target.ssl and tls.target.options == {"password": "pw0rdsecret"}
    assert "pw0rdsecret" not in repr(tls)


def test_a_password_in_the_bus_url_is_never_shown(tmp_path, caplog, monkeypatch, capsys):
    """user:password@ and ?password= are masked in stats, logs and CLI errors."""
    from sqla_rebalance.cli import main

    port = find_free_port(["127.0.0.1"])  # nothing listens: every connect fails
    caplog.set_level("INFO", logger="sqla_rebalance")
    monkeypatch.setenv("SQLA_REBALANCE_SECRET", SECRET)
    for url in (
        f"redis+cluster://127.0.0.1:{port}/?password=hunter2secret",
        f"redis+cluster://app:hunter2secret@127.0.0.1:{port},127.0.0.1:{port + 1}/",
    ):
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
                *(r.getMessage() for r in caplog.records),
            ]
            assert "***" in stats.url
            assert "refused" in stats.last_error.lower()
        finally:
            engine.dispose()
        assert main(["recycle", "--bus", url]) == 3
        assert main(["status", "--bus", url]) == 3
        shown.append(capsys.readouterr().err)
        assert any("***" in line for line in shown)
        for line in shown:
            assert "hunter2secret" not in line
        caplog.clear()


@pytest.fixture
def password_cluster(request):
    """One master holding every slot, with a password."""
    cluster = RedisCluster(1, password="hunter2secret")
    _start(request, cluster)
    yield cluster
    cluster.close()


# -- the behaviour of the Redis bus ----------------------------------------------------


def test_a_command_reaches_every_process(bus, tmp_path, apps):
    apps += start_apps(
        3, db=f"sqlite:///{tmp_path}/app.db", bus=bus, pool="orders", secret=SECRET, pool_size=2
    )
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
    assert out["receivers"] == 3  # every listener is subscribed on the slot's node
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
    done = subprocess.run(
        [sys.executable, "-m", "sqla_rebalance", "status", "--bus", bus, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for app in apps:
        assert app.process in done.stdout


def test_a_command_sent_while_the_slot_node_restarts_is_applied_after_reconnect(
    cluster, bus, tmp_path, apps
):
    """The node that serves the channel's slot restarts empty (no persistence, no
    replica): the listeners reconnect and catch the command up from the log."""
    db = f"sqlite:///{tmp_path}/app.db"
    # A node restarts in 2-3 s (a master waits 2 s before it serves again): the listeners
    # retry 8 s after losing it, so the command is sent while none is subscribed.
    apps += start_apps(2, db=db, bus=bus, pool="p", secret=SECRET, fixed_backoff=8.0, load=2)
    owner = cluster.node_for(f"{{{_channel(bus)}}}")
    for _attempt in range(3):
        owner.stop()
        for app in apps:
            poll(lambda app=app: not app.stats()["bus"]["connected"], timeout=30)
        owner.start()
        # Redis kept nothing: the log and the generation counter are gone.
        sent = poll(lambda: _try_send(bus, "recycle"), timeout=30)
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
        poll(lambda app=app: app.stats()["bus"]["last_error"] is None, timeout=30)
        assert app.stats()["bus"]["connected"]
    for app in apps:  # the load ran all along: the bus going away broke no transaction
        bye = app.quit()
        assert bye["errors"] == []
        assert bye["commits"] > 0


def test_bad_messages_from_redis_cli_are_rejected_and_counted(cluster, bus, tmp_path):
    channel = _channel(bus)
    cli = find_program("redis-cli", "redis-server")

    def publish_raw(payload: bytes) -> None:
        seed = cluster.nodes[0]
        # -c: follow the redirection to the node of the slot, as a cluster client does.
        argv = [str(cli), "-c", "-h", seed.host, "-p", str(seed.port), "-x", "SPUBLISH"]
        subprocess.run(
            [*argv, f"{{{channel}}}:commands"],
            input=payload,
            check=True,
            capture_output=True,
            timeout=10,
        )

    def logged_first() -> bytes:
        client = _client(cluster)
        try:
            return client.zrange(f"{{{channel}}}:log", 0, 0)[0]
        finally:
            client.close()

    check_bad_messages_are_rejected(bus, SECRET, tmp_path, publish_raw, logged_first)


class ClusterStore(Store):
    """The keys of a channel in the cluster, written with a plain cluster client."""

    huge_positions = (1e15, float("inf"))

    def __init__(self, cluster: RedisCluster, bus: str) -> None:
        self.cluster = cluster
        self.tag = f"{{{_channel(bus)}}}"
        self.r = _client(cluster)

    def add_log(self, position, payload):
        self.r.zadd(f"{self.tag}:log", {payload: position})

    def remove_log(self, position):
        score = "+inf" if position == float("inf") else position
        self.r.zremrangebyscore(f"{self.tag}:log", score, score)

    def log_only(self, payload_for):
        gen = next_generation(int(self.r.get(f"{self.tag}:gen") or 0))
        self.r.set(f"{self.tag}:gen", gen)
        self.add_log(gen, payload_for(gen))
        return gen

    def add_heartbeat(self, name, payload):
        self.r.set(f"{self.tag}:hb:{name}", payload, ex=60)
        self.r.sadd(f"{self.tag}:hb", name)

    def reconnect(self, engine):
        owner = self.cluster.node_for(self.tag)
        with redis.Redis(host=owner.host, port=owner.port) as direct:
            direct.client_kill_filter(_type="pubsub")


@pytest.fixture
def store(cluster, bus):
    store = ClusterStore(cluster, bus)
    yield store
    store.r.close()


def test_junk_in_the_log_moves_nothing(bus, tmp_path, store):
    """Scores 1e15 and +inf (and junk an hour ahead): no cursor, generation or --wait
    answer moves, a missed command is caught up after a reconnect, no reconnect loop."""
    check_junk_in_the_log_moves_nothing(bus, SECRET, tmp_path, store)


def test_junk_heartbeats_are_skipped_and_counted(bus, tmp_path, store):
    extra = {"not_utf8": b"\xff\xfe\x00junk", "oversized": b"{" + b" " * (2 << 20) + b"}"}
    # A heartbeat index member that is not UTF-8 (and whose key does not exist).
    store.r.sadd(f"{store.tag}:hb", b"\xff\xfe")
    check_junk_heartbeats_are_skipped(bus, SECRET, tmp_path, store, extra)


def test_junk_in_the_generation_key(bus, tmp_path, store, monkeypatch, capsys):
    """A key that is not a number: publishing fails (exit 3, nothing sent), naming the
    hash-tagged key; one out of range is ignored and overwritten."""
    from sqla_rebalance.cli import main

    monkeypatch.setenv("SQLA_REBALANCE_SECRET", SECRET)
    gen_key = f"{store.tag}:gen"
    engine = _engine(bus, tmp_path)
    try:
        pool = engine.pool
        poll(lambda: pool.listener is not None and pool.listener.connected)
        first = send_command(bus, "recycle", secret=SECRET)
        poll(lambda: pool.stats().bus.generation_applied == first.generation)
        store.r.set(gen_key, "junk")
        assert main(["recycle", "--bus", bus]) == 3
        err = capsys.readouterr().err
        assert "cannot publish" in err and f"{gen_key} holds 'junk'" in err
        assert store.r.zcard(f"{store.tag}:log") == 1  # nothing was published
        for junk in (str(10**15), str(2**63), "99999999999999999999"):
            store.r.set(gen_key, junk)
            sent = send_command(bus, "recycle", secret=SECRET)
            assert sent.generation < time.time() * 1000 + 86_400_000
            assert int(store.r.get(gen_key)) == sent.generation  # overwritten
            poll(lambda sent=sent: pool.stats().bus.generation_applied == sent.generation)
        assert pool.stats().bus.reconnects == 0
    finally:
        engine.dispose()


def test_concurrent_publishers_never_interleave(cluster, bus, tmp_path):
    """Four threads publishing at once: every generation distinct, the log holding each
    once, and the generation key the last one (the compare-and-set script retried)."""
    engine = _engine(bus, tmp_path)
    sent: list[int] = []
    lock = threading.Lock()
    errors: list[str] = []

    def publisher() -> None:
        for _ in range(50):
            try:
                gen = send_command(bus, "rebalance", secret=SECRET).generation
            except Exception as err:
                errors.append(repr(err))
                return
            with lock:
                sent.append(gen)

    try:
        pool = engine.pool
        poll(lambda: pool.stats().bus.connected)
        threads = [threading.Thread(target=publisher) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(sent) == len(set(sent)) == 200
        poll(lambda: pool.stats().bus.generation_applied == max(sent), timeout=30)
        tag = f"{{{_channel(bus)}}}"
        client = _client(cluster)
        try:
            logged = [
                int(score) for _, score in client.zrange(f"{tag}:log", 0, -1, withscores=True)
            ]
            assert logged == sorted(sent)
            assert int(client.get(f"{tag}:gen")) == max(sent)
        finally:
            client.close()
        assert pool.stats().bus.messages_rejected == 0
    finally:
        engine.dispose()


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


def _sqla_clients(cluster: RedisCluster) -> int:
    count = 0
    for node in cluster.nodes:
        with redis.Redis(host=node.host, port=node.port) as r:
            count += sum(1 for c in r.client_list() if c.get("name") == "sqla-rebalance")
    return count


def test_engine_cycles_leave_no_listener_and_no_redis_client(cluster, bus, tmp_path):
    def threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("sqla-rebalance-bus")]

    poll(lambda: not threads())
    poll(lambda: _sqla_clients(cluster) == 0)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(100):
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
    poll(lambda: _sqla_clients(cluster) == 0)
    poll(lambda: len(os.listdir("/proc/self/fd")) <= fds)


# -- nodes stopping, hanging, failing over ---------------------------------------------


def test_a_hung_node_that_does_not_serve_the_channel_changes_nothing(cluster, bus, tmp_path):
    """SIGSTOP of another master: the listener stays subscribed, commands are applied,
    and ``--wait`` completes (a client asking the hung seed first waits out a timeout)."""
    tag = f"{{{_channel(bus)}}}"
    engine = _engine(bus, tmp_path)
    try:
        pool = engine.pool
        poll(lambda: pool.stats().bus.connected)
        first = send_command(bus, "recycle", secret=SECRET)
        poll(lambda: pool.stats().bus.generation_applied == first.generation)
        other = cluster.others(tag)[0]
        with other.frozen():
            for _ in range(3):
                sent = send_command(bus, "recycle", secret=SECRET)
                assert sent.receivers == 1
                poll(lambda sent=sent: pool.stats().bus.generation_applied == sent.generation)
            assert wait_for(bus, sent.generation, timeout=30).complete
            stats = pool.stats().bus
            assert stats.connected and stats.reconnects == 0 and stats.last_error is None
        assert pool.stats().bus.reconnects == 0
    finally:
        engine.dispose()


def test_a_hung_slot_node_is_left_and_rejoined_after_the_thaw(cluster, bus, tmp_path):
    """SIGSTOP of the master of the channel's slot: the listener notices through its own
    deadlines (no checkout waits), and after SIGCONT it reconnects and applies what is
    sent next."""
    tag = f"{{{_channel(bus)}}}"
    engine = _engine(bus, tmp_path)
    try:
        pool = engine.pool
        poll(lambda: pool.stats().bus.connected)
        first = send_command(bus, "recycle", secret=SECRET)
        poll(lambda: pool.stats().bus.generation_applied == first.generation)
        owner = cluster.node_for(tag)
        with owner.frozen():
            poll(lambda: not pool.stats().bus.connected, timeout=60)
            started = time.monotonic()
            for _ in range(100):
                with engine.connect() as conn:
                    conn.execute(text("select 1"))
            assert time.monotonic() - started < 5
            with pytest.raises(BusUnavailableError):
                send_command(bus, "recycle", secret=SECRET)
        poll(lambda: pool.stats().bus.connected, timeout=60)
        sent = poll(lambda: _try_send(bus, "recycle"), timeout=30)
        poll(lambda: pool.stats().bus.generation_applied == sent.generation, timeout=30)
        assert pool.stats().bus.reconnects >= 1
    finally:
        engine.dispose()


@pytest.fixture
def replicated_cluster(request):
    """Three masters with one replica each; a master down 1 s is failed over."""
    cluster = RedisCluster(3, replicas=1, node_timeout=1000)
    _start(request, cluster)
    yield cluster
    cluster.close()


def test_a_failover_of_the_slot_node_is_followed(replicated_cluster, tmp_path):
    cluster = replicated_cluster
    bus = f"{cluster.url()}?channel=failover{os.getpid()}"
    tag = f"{{{_channel(bus)}}}"
    engine = _engine(bus, tmp_path)
    try:
        pool = engine.pool
        poll(lambda: pool.stats().bus.connected)
        first = send_command(bus, "recycle", secret=SECRET)
        poll(lambda: pool.stats().bus.generation_applied == first.generation)
        poll(lambda: [p.process for p in fleet_status(bus)] == [pool.stats().bus.process])
        owner = cluster.node_for(tag)
        owner.stop(mode="immediate")  # a crash: its replica takes over the slot
        poll(lambda: cluster.node_for(tag) is not owner, timeout=30)
        # Publisher and listener both find the new master through the slot map.
        second = poll(lambda: _try_send(bus), timeout=30)
        poll(lambda: pool.stats().bus.generation_applied == second.generation, timeout=30)
        stats = pool.stats().bus
        assert stats.connected and stats.reconnects >= 1
        assert wait_for(bus, second.generation, timeout=20).complete
    finally:
        engine.dispose()


def test_a_password_protected_cluster(password_cluster, tmp_path):
    """``?password=`` and ``:password@`` reach every node; one master serves every slot."""
    port = password_cluster.nodes[0].port
    url = password_cluster.url()
    assert url == f"redis+cluster://:hunter2secret@127.0.0.1:{port}/"
    for bus in (f"redis+cluster://127.0.0.1:{port}/?password=hunter2secret&channel=pw", url):
        engine = _engine(bus, tmp_path)
        try:
            pool = engine.pool
            poll(lambda pool=pool: pool.stats().bus.connected)
            sent = send_command(bus, "recycle", secret=SECRET)
            poll(
                lambda pool=pool, sent=sent: pool.stats().bus.generation_applied == sent.generation
            )
            assert wait_for(bus, sent.generation, timeout=10).complete
        finally:
            engine.dispose()
    with pytest.raises(BusUnavailableError) as caught:
        send_command(
            f"redis+cluster://127.0.0.1:{port}/?password=wrong_pass", "recycle", secret=SECRET
        )
    assert "wrong_pass" not in str(caught.value)
