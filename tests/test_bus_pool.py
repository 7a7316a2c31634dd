"""Pools obeying cluster-wide commands, over the embedded (SQLite file) bus: a real bus and a
real listener thread, in one process. Multi-process and server transports: test_bus_redis.py,
test_bus_postgres.py."""

from __future__ import annotations

import gc
import os
import threading
import warnings

import pytest
from sqlalchemy import create_engine, text

from sqla_rebalance import InsecureBroadcastWarning, RebalancingQueuePool, signals
from sqla_rebalance.bus import fleet_status, send_command, wait_for
from sqla_rebalance.bus import listener as listener_mod
from sqla_rebalance.errors import ConfigurationError
from sqla_rebalance.worker import get_worker

from .helpers import wait_for as poll

SECRET = "bus-test-secret"


@pytest.fixture
def bus(tmp_path):
    return f"sqlite:///{tmp_path}/bus.db"


@pytest.fixture
def make(tmp_path, bus):
    made = []

    def make(url=None, **kw):
        kw.setdefault("pool_size", 4)
        kw.setdefault("max_overflow", 0)
        kw.setdefault("broadcast", bus)
        kw.setdefault("broadcast_secret", SECRET)
        kw.setdefault("min_recycle_interval", 0)
        engine = create_engine(
            url or f"sqlite:///{tmp_path}/app.db", poolclass=RebalancingQueuePool, **kw
        )
        made.append(engine)
        pool = engine.pool
        poll(lambda: pool.listener is not None and pool.listener.connected)
        return engine

    yield make
    for engine in made:
        engine.dispose()


def applied(pool, gen):
    return pool.stats().bus.generation_applied >= gen


def send(bus, action, **kw):
    kw.setdefault("secret", SECRET)
    return send_command(bus, action, **kw)


def test_a_recycle_command_replaces_idle_connections_and_spares_those_in_use(make, bus):
    engine = make(min_size=4, pool_name="orders")
    pool = engine.pool
    poll(lambda: pool.stats().idle == 4)
    busy = engine.connect()
    busy.execute(text("select 1"))
    busy_dbapi = busy.connection.dbapi_connection
    sent = send(bus, "recycle", pool="orders")
    poll(lambda: pool.stats().retirements["signal"] >= 3)
    assert pool.stats().bus.commands_applied == 1
    # The connection in use is untouched, and still works...
    assert busy.connection.dbapi_connection is busy_dbapi
    assert busy.execute(text("select 2")).scalar() == 2
    busy.close()
    # ...and is retired once checked in.
    poll(lambda: pool.stats().retirements["signal"] == 4)
    assert applied(pool, sent.generation)
    assert pool.stats().checkouts_waited <= 1  # only the first connect of `busy` may wait


def test_commands_for_other_pools_change_nothing(make, bus):
    engine = make(min_size=2, pool_name="orders")
    other = make(min_size=2, pool_name="billing")
    poll(lambda: engine.pool.stats().idle == 2 and other.pool.stats().idle == 2)
    sent = send(bus, "recycle", pool="bill*")
    poll(lambda: applied(engine.pool, sent.generation))
    poll(lambda: other.pool.stats().retirements["signal"] == 2)
    assert engine.pool.stats().retirements["signal"] == 0
    assert engine.pool.stats().bus.commands_applied == 0


def test_wrongly_signed_commands_do_nothing(make, bus):
    engine = make(min_size=2)
    poll(lambda: engine.pool.stats().idle == 2)
    send(bus, "recycle", secret="not the secret")
    send(bus, "recycle", secret=None)
    good = send(bus, "rebalance")
    poll(lambda: applied(engine.pool, good.generation))
    stats = engine.pool.stats()
    assert stats.bus.rejected == {"bad_signature": 1, "unsigned": 1}
    assert stats.retirements["signal"] == 0


def test_host_scoped_recycle_by_name(make, tmp_path, bus):
    files = [str(tmp_path / f"h{i}.db") for i in range(2)]
    engine = make(url=f"sqlite:///{files[0]}", hosts=files, pool_size=4, min_size=4)
    pool = engine.pool
    poll(lambda: {h.open for h in pool.stats().hosts.values()} == {2})
    retired: list[str] = []

    def on_retired(sender, host, reason, **kw):
        if sender is pool and reason == "signal":
            retired.append(host)

    signals.connection_retired.connect(on_retired)
    try:
        send(bus, "recycle", host=files[1])
        poll(lambda: len(retired) == 2)
        poll(lambda: {h.open for h in pool.stats().hosts.values()} == {2})
    finally:
        signals.connection_retired.disconnect(on_retired)
    assert retired == [files[1], files[1]]


def test_drain_closes_everything_and_opens_nothing_until_needed(make, bus):
    engine = make(min_size=3, pool_size=3, pool_recycle=3600)
    pool = engine.pool
    poll(lambda: pool.stats().idle == 3)
    busy = engine.connect()
    busy.execute(text("select 1"))
    send(bus, "drain")
    poll(lambda: pool.stats().open == 1)  # the idle ones are gone; the one in use stays
    assert busy.execute(text("select 2")).scalar() == 2
    busy.close()
    poll(lambda: pool.stats().open == 0)
    assert pool.stats().retirements["signal"] == 3
    # Nothing comes back on its own: no prefill, and no worker thread for this pool.
    poll(lambda: not get_worker().is_registered(pool))
    assert pool.stats().open == 0
    # The pool still works, and min_size applies again once the application is back.
    with engine.connect() as conn:
        assert conn.execute(text("select 3")).scalar() == 3
    poll(lambda: pool.stats().open == 3)


def test_refresh_rereads_the_host_list_and_rebalances(make, tmp_path, bus):
    files = [str(tmp_path / f"h{i}.db") for i in range(2)]
    engine = make(url=f"sqlite:///{files[0]}", hosts=files[:1], pool_size=4, min_size=4)
    pool = engine.pool
    poll(lambda: pool.stats().hosts[files[0]].open == 4)
    # The host list lives in a "config service" that the application re-reads on refresh.
    config = {"hosts": files[:1]}

    def reload_hosts(sender):
        sender.set_hosts(config["hosts"])

    signals.refresh_requested.connect(reload_hosts, pool)
    try:
        config["hosts"] = files
        send(bus, "refresh")
        poll(lambda: {h.open for h in pool.stats().hosts.values()} == {2})
    finally:
        signals.refresh_requested.disconnect(reload_hosts)


def test_fleet_status_and_wait(make, bus):
    engine = make(min_size=2, pool_name="orders")
    poll(lambda: engine.pool.stats().idle == 2)
    sent = send(bus, "recycle", pool="orders", spread=0.5)
    result = wait_for(bus, sent.generation, pool="orders", timeout=10)
    assert result.complete
    (proc,) = result.applied
    assert proc.pid == os.getpid()
    status = fleet_status(bus)
    assert [p.process for p in status] == [engine.pool.stats().bus.process]
    (pool_status,) = status[0].pools
    assert pool_status["pool"] == "orders"
    assert pool_status["commands_applied"] == 1
    # Nobody listens for pools named "billing": nothing to wait for.
    assert wait_for(bus, sent.generation, pool="billing", timeout=0).applied == []


def test_a_process_that_has_not_applied_is_reported(make, bus, monkeypatch):
    engine = make(min_size=1)
    poll(lambda: fleet_status(bus))
    # This process stops applying (its listener thread is stuck, say).
    monkeypatch.setattr(engine.pool.listener, "_receive", lambda raw, live: None)
    sent = send(bus, "recycle")
    result = wait_for(bus, sent.generation, timeout=0.5)
    assert not result.complete
    assert [p.process for p in result.pending] == [engine.pool.stats().bus.process]


def test_a_dead_bus_never_breaks_checkout(tmp_path):
    # A directory that does not exist: the bus cannot be opened, ever.
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        broadcast=f"sqlite:///{tmp_path}/missing/bus.db",
        broadcast_secret=SECRET,
    )
    try:
        for _ in range(20):
            with engine.connect() as conn:
                assert conn.execute(text("select 1")).scalar() == 1
        poll(lambda: engine.pool.stats().bus.last_error)
        stats = engine.pool.stats().bus
        assert not stats.connected
        assert "unable to open" in stats.last_error
    finally:
        engine.dispose()


def test_configuration_errors_fail_at_create_engine(tmp_path):
    url = f"sqlite:///{tmp_path}/app.db"
    with pytest.raises(ConfigurationError, match="unknown bus scheme"):
        create_engine(url, poolclass=RebalancingQueuePool, broadcast="amqp://x/")
    with pytest.raises(ConfigurationError, match="broadcast_secret is set but broadcast is not"):
        create_engine(url, poolclass=RebalancingQueuePool, broadcast_secret="x")
    with pytest.raises(ConfigurationError, match="min_recycle_interval must be >= 0"):
        create_engine(
            url,
            poolclass=RebalancingQueuePool,
            broadcast=f"sqlite:///{tmp_path}/b.db",
            broadcast_secret="x",
            min_recycle_interval=-1,
        )
    with pytest.raises(ConfigurationError, match="non-empty"):
        create_engine(
            url,
            poolclass=RebalancingQueuePool,
            broadcast=f"sqlite:///{tmp_path}/b.db",
            broadcast_secret="",
        )


def test_no_secret_warns_at_start_up(tmp_path, monkeypatch):
    monkeypatch.delenv("SQLA_REBALANCE_SECRET", raising=False)
    with pytest.warns(InsecureBroadcastWarning, match="without broadcast_secret"):
        engine = create_engine(
            f"sqlite:///{tmp_path}/app.db",
            poolclass=RebalancingQueuePool,
            broadcast=f"sqlite:///{tmp_path}/b.db",
        )
    engine.dispose()
    monkeypatch.setenv("SQLA_REBALANCE_SECRET", "from-env")
    with warnings.catch_warnings():
        warnings.simplefilter("error", InsecureBroadcastWarning)
        engine = create_engine(
            f"sqlite:///{tmp_path}/app.db",
            poolclass=RebalancingQueuePool,
            broadcast=f"sqlite:///{tmp_path}/b.db",
        )
    assert engine.pool._wiring.secret == b"from-env"
    engine.dispose()


def test_dispose_keeps_the_bus_settings_and_listens_again(make, bus):
    engine = make(min_size=1, min_recycle_interval=3)
    old = engine.pool
    engine.dispose()
    new = engine.pool
    assert new is not old
    assert new.config.broadcast == bus
    assert new.config.min_recycle_interval == 3
    assert new._wiring.secret == SECRET.encode()
    with engine.connect():
        pass
    poll(lambda: new.listener is not None and new.listener.connected)
    sent = send(bus, "recycle")
    poll(lambda: applied(new, sent.generation))


def listener_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sqla-rebalance-bus")]


def test_engine_cycles_leave_no_listener_thread(tmp_path, bus):
    gc.collect()
    poll(lambda: not listener_threads())
    fds = len(os.listdir("/proc/self/fd"))
    for i in range(1000):
        engine = create_engine(
            f"sqlite:///{tmp_path}/app.db",
            poolclass=RebalancingQueuePool,
            broadcast=bus,
            broadcast_secret=SECRET,
            min_size=i % 2,
        )
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        assert engine.pool.listener is not None
        engine.dispose()
    poll(lambda: not listener_threads(), timeout=15)
    poll(lambda: not listener_mod._registry)
    gc.collect()
    poll(lambda: len(os.listdir("/proc/self/fd")) <= fds)


def test_a_garbage_collected_engine_stops_its_listener(tmp_path, bus):
    gc.collect()
    poll(lambda: not listener_threads())
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        broadcast=bus,
        broadcast_secret=SECRET,
    )
    poll(lambda: listener_threads())
    del engine
    gc.collect()
    poll(lambda: not listener_threads())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_listens_on_its_own(make, bus, tmp_path):
    engine = make(min_size=2)
    poll(lambda: engine.pool.stats().idle == 2)
    parent_process = engine.pool.stats().bus.process
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: connect, be seen on the bus, obey a recycle
        code = 1
        try:
            with engine.connect() as conn:
                conn.execute(text("select 1"))
            poll(lambda: engine.pool.listener is not None and engine.pool.listener.connected)
            child_process = engine.pool.stats().bus.process
            os.write(write, (child_process + "\n").encode())
            poll(lambda: engine.pool.stats().retirements["signal"] >= 1, timeout=20)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_process = pipe.readline().strip()
    assert child_process and child_process != parent_process
    poll(lambda: len(fleet_status(bus)) == 2)
    sent = send(bus, "recycle")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    poll(lambda: applied(engine.pool, sent.generation))
    # The parent's own connections were the parent's to recycle, and still work.
    with engine.connect() as conn:
        assert conn.execute(text("select 1")).scalar() == 1


def test_an_async_engine_obeys_commands(tmp_path, bus):
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine

    from sqla_rebalance import AsyncRebalancingQueuePool

    async def main() -> None:
        engine = create_async_engine(
            f"sqlite+aiosqlite:///{tmp_path}/async.db",
            poolclass=AsyncRebalancingQueuePool,
            pool_size=3,
            min_size=3,
            broadcast=bus,
            broadcast_secret=SECRET,
            min_recycle_interval=0,
        )
        pool = engine.pool
        try:
            async with engine.connect() as conn:
                await conn.execute(text("select 1"))

            async def until(predicate, timeout=10.0):
                deadline = asyncio.get_running_loop().time() + timeout
                while not predicate():
                    assert asyncio.get_running_loop().time() < deadline, predicate
                    await asyncio.sleep(0.01)

            await until(lambda: pool.stats().idle == 3 and pool.listener.connected)
            await asyncio.to_thread(send, bus, "recycle")
            await until(lambda: pool.stats().retirements["signal"] == 3)
            await until(lambda: pool.stats().idle == 3)
            await asyncio.to_thread(send, bus, "drain")
            await until(lambda: pool.stats().open == 0)
            async with engine.connect() as conn:
                assert (await conn.execute(text("select 2"))).scalar() == 2
        finally:
            await engine.dispose()

    asyncio.run(main())


def test_wait_holds_until_a_coalesced_command_is_applied(make, bus):
    engine = make(min_size=1, min_recycle_interval=1.5)
    pool = engine.pool
    poll(lambda: pool.stats().idle == 1)
    first = send(bus, "recycle")
    poll(lambda: pool.stats().bus.commands_applied == 1)
    second = send(bus, "recycle")  # within the interval: held back
    poll(lambda: pool.stats().bus.generation_applied == second.generation)
    assert pool.stats().bus.commands_pending == 1
    early = wait_for(bus, second.generation, timeout=0.3)
    assert not early.complete  # received, but not applied yet
    assert wait_for(bus, first.generation, timeout=5).complete
    late = wait_for(bus, second.generation, timeout=10)
    assert late.complete
    assert pool.stats().bus.commands_pending == 0
    assert pool.stats().bus.commands_applied == 2


def test_waiting_with_nobody_listening_is_not_success(bus):
    sent = send(bus, "recycle", pool="nobody")
    result = wait_for(bus, sent.generation, pool="nobody", timeout=0.2)
    assert (result.applied, result.pending, result.complete) == ([], [], False)


def test_a_process_started_after_a_command_has_nothing_to_wait_for(make, bus, monkeypatch):
    # Commands issued before a listener existed are history (no grace here, for the test).
    monkeypatch.setattr(listener_mod, "ATTACH_GRACE", 0.0)
    sent = send(bus, "recycle")
    engine = make(min_size=1)
    poll(lambda: engine.pool.stats().idle == 1)
    result = wait_for(bus, sent.generation, timeout=10)
    assert result.complete
    assert [p.process for p in result.applied] == [engine.pool.stats().bus.process]
    assert engine.pool.stats().retirements["signal"] == 0  # history is never applied
    assert engine.pool.stats().bus.messages_rejected == 0
