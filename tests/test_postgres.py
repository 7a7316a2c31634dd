"""Against a real PostgreSQL server (started by the ``pg_url`` fixture on 127.0.0.x),
with the real maintenance worker: what users rely on, checked end to end."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time

import pytest
from sqlalchemy import create_engine, text

import sqla_rebalance
from sqla_rebalance import AsyncRebalancingQueuePool, RebalancingQueuePool
from sqla_rebalance.worker import get_worker

from .helpers import wait_for

pytestmark = pytest.mark.servers


@pytest.fixture
def engines(pg_url):
    made = []

    def make(**kw):
        engine = create_engine(pg_url, poolclass=RebalancingQueuePool, **kw)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.dispose()


@pytest.fixture
def admin(pg_url):
    engine = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def backend_alive(admin, pid: int) -> bool:
    with admin.connect() as conn:
        return bool(
            conn.execute(
                text("select count(*) from pg_stat_activity where pid = :p"), {"p": pid}
            ).scalar()
        )


def test_lifetime_replacement_under_load(engines):
    engine = engines(pool_size=4, max_overflow=0, pool_recycle=1.5, recycle_jitter=0.5, min_size=4)
    pool = engine.pool
    wait_for(lambda: pool.checkedin() == 4)
    pids: set[int] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def work():
        try:
            while not stop.is_set():
                with engine.begin() as conn:
                    pids.add(conn.execute(text("select pg_backend_pid()")).scalar())
                    conn.execute(text("select pg_sleep(0.002)"))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: pool.stats().retirements["lifetime"] >= 12, timeout=30)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert len(pids) > 4  # connections really were replaced on the server
    # Once the last checkins are processed: exactly pool_size open, no spare left.
    wait_for(lambda: (pool.stats().open, pool.stats().spares, pool.stats().retiring) == (4, 0, 0))
    stats = pool.stats()
    # Every connection was opened by the worker: the four initial ones by prefill, the
    # replacements ahead of their deadlines. No checkout ever waited for a connect.
    assert stats.connects >= 16
    assert stats.checkouts_waited == 0
    assert stats.connect_failures == 0


def test_recycle_never_interrupts_a_transaction(engines, admin):
    engine = engines(pool_size=6, max_overflow=2, pool_recycle=3600)
    with engine.begin() as conn:
        conn.execute(text("drop table if exists ledger"))
        conn.execute(text("create table ledger (tx int, step int)"))
    pool = engine.pool
    errors: list[BaseException] = []
    count = iter(range(1000))
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                tx = next(count, None)
            if tx is None:
                return
            try:
                with engine.begin() as conn:
                    conn.execute(text("insert into ledger values (:t, 1)"), {"t": tx})
                    conn.execute(text("select pg_sleep(0.0005)"))
                    conn.execute(text("insert into ledger values (:t, 2)"), {"t": tx})
            except BaseException as err:
                errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    recycles = 0
    while any(t.is_alive() for t in threads):
        pool.recycle(spread=0.2, reason="signal")
        recycles += 1
        time.sleep(0.05)  # pacing of the recycle requests, not synchronisation
    for t in threads:
        t.join()
    assert errors == []
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from ledger")).scalar() == 2000
    assert recycles > 5
    assert pool.stats().retirements["signal"] > 0


def test_connection_in_use_is_kept_until_checkin_then_closed(engines, admin):
    engine = engines(pool_size=3, pool_recycle=3600)
    pool = engine.pool
    conn, *idle = [engine.connect() for _ in range(3)]
    for c in idle:
        c.close()
    trans = conn.begin()
    pid = conn.execute(text("select pg_backend_pid()")).scalar()
    conn.execute(text("create temp table mine (x int)"))
    assert pool.recycle() == 3
    wait_for(lambda: pool.stats().retirements["manual"] == 2)  # the idle ones
    assert backend_alive(admin, pid)
    conn.execute(text("insert into mine values (1)"))  # still usable, same session
    trans.commit()
    conn.close()  # checkin: now it goes
    wait_for(lambda: not backend_alive(admin, pid))
    assert pool.stats().retirements["manual"] == 3
    assert pool.stats().open == 3


def test_pinned_connection_keeps_its_session(engines, admin):
    engine = engines(pool_size=2, pool_recycle=1.0, recycle_jitter=0.0)
    pool = engine.pool
    with engine.connect() as conn:
        sqla_rebalance.pin(conn)
        conn.execute(text("select pg_advisory_lock(42)"))
        pid = conn.execute(text("select pg_backend_pid()")).scalar()
        conn.commit()
    passes = get_worker().passes
    pool.recycle()
    wait_for(lambda: get_worker().passes > passes + 5, timeout=15)  # several passes ran
    time_past_lifetime = time.time() + 1.5
    wait_for(lambda: time.time() > time_past_lifetime, timeout=5)
    with engine.connect() as conn:
        assert conn.execute(text("select pg_backend_pid()")).scalar() == pid
        held = conn.execute(
            text("select count(*) from pg_locks where locktype = 'advisory' and pid = :p"),
            {"p": pid},
        ).scalar()
        assert held == 1
        sqla_rebalance.unpin(conn)
    wait_for(lambda: not backend_alive(admin, pid))


def test_terminated_backends_are_replaced_in_the_background(engines, admin):
    engine = engines(pool_size=3, pool_pre_ping=True)
    pool = engine.pool
    conns = [engine.connect() for _ in range(3)]
    pids = {c.execute(text("select pg_backend_pid()")).scalar() for c in conns}
    for c in conns:
        c.close()
    with admin.connect() as a:
        for pid in pids:
            a.execute(text("select pg_terminate_backend(:p)"), {"p": pid})
    # The first checkout finds one dead (pre-ping) and invalidates the rest,
    # which the worker replaces.
    with engine.connect() as conn:
        assert conn.execute(text("select 1")).scalar() == 1
    wait_for(lambda: pool.stats().retirements["error"] == 3)
    before = pool.stats().connects
    conns = [engine.connect() for _ in range(3)]
    for c in conns:
        assert c.execute(text("select 1")).scalar() == 1
        c.close()
    assert pool.stats().connects == before  # already reconnected by the worker


def test_engine_cycles_leak_nothing_on_the_server(pg_url, admin):
    def server_connections():
        with admin.connect() as conn:
            return conn.execute(
                text("select count(*) from pg_stat_activity where backend_type = 'client backend'")
            ).scalar()

    def fds():
        return len(os.listdir("/proc/self/fd"))

    def worker_gone() -> bool:
        gc.collect()
        return get_worker().thread is None

    try:  # an earlier test's network deadline may keep the worker up to its end
        wait_for(worker_gone, timeout=60)
    except AssertionError:
        worker = get_worker()
        pools = [ref() for ref in worker._pools.values()]
        timers = [(t.when - time.monotonic(), t.callback) for _w, _s, t in worker._timers]
        raise AssertionError(f"the worker stays up: pools {pools}, timers {timers}") from None
    base_server, base_fds, base_threads = server_connections(), fds(), threading.active_count()
    for _ in range(200):
        engine = create_engine(
            pg_url, poolclass=RebalancingQueuePool, pool_size=2, pool_recycle=60, min_size=1
        )
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    engine = None
    wait_for(lambda: gc.collect() is not None and get_worker().thread is None)
    # At or below baseline (another test's garbage may have been collected meanwhile).
    assert threading.active_count() <= base_threads
    assert fds() <= base_fds
    wait_for(lambda: server_connections() == base_server)


def test_async_engine_on_postgres(pg_url):
    from sqlalchemy.ext.asyncio import create_async_engine

    async def main():
        engine = create_async_engine(
            pg_url,
            poolclass=AsyncRebalancingQueuePool,
            pool_size=3,
            pool_recycle=1.0,
            recycle_jitter=0.5,
            min_size=3,
        )
        pool = engine.pool
        # Warm-up: an asyncio pool cannot prefill before it knows its event loop, so
        # the first checkout opens a connection; min_size opens the rest in the background.
        async with engine.connect() as conn:
            await conn.execute(text("select 1"))
        wait_until = time.monotonic() + 30
        while pool.stats().open < 3:
            assert time.monotonic() < wait_until, pool.stats()
            await asyncio.sleep(0.01)
        warmed = pool.stats()
        pids = set()
        deadline = time.monotonic() + 30
        while pool.stats().retirements["lifetime"] < warmed.retirements["lifetime"] + 6:
            assert time.monotonic() < deadline, pool.stats()
            async with engine.begin() as conn:
                pids.add((await conn.execute(text("select pg_backend_pid()"))).scalar())
            await asyncio.sleep(0.01)
        assert len(pids) > 3
        held = await engine.connect()
        await held.begin()
        pid = (await held.execute(text("select pg_backend_pid()"))).scalar()
        pool.recycle()
        async with engine.connect() as other:
            await other.execute(text("select 1"))
        assert (await held.execute(text("select pg_backend_pid()"))).scalar() == pid
        await held.commit()
        await held.close()
        stats = pool.stats()
        # After warm-up every replacement is the worker's: no checkout waited for one.
        assert stats.connects - warmed.connects >= 6
        assert stats.checkouts_waited == warmed.checkouts_waited, (warmed, stats)
        await engine.dispose()

    asyncio.run(main())


def test_pre_ping_checks_connections_opened_in_the_background(pg_cluster):
    # SQLAlchemy skips pre_ping for a "fresh" connection (one just opened by
    # the checkout itself); the worker's connections may have waited idle.
    server = pg_cluster.servers[3]
    engine = create_engine(
        server.url(), poolclass=RebalancingQueuePool, pool_size=4, min_size=4, pool_pre_ping=True
    )
    try:
        wait_for(lambda: engine.pool.checkedin() == 4)
        server.restart()  # every pooled connection is now dead, never used yet
        for _ in range(4):
            with engine.connect() as conn:
                assert conn.execute(text("select 1")).scalar() == 1
    finally:
        engine.dispose()


def test_an_invalidated_connection_is_not_kept_alive_by_the_pool(pg_url, monkeypatch):
    """The record keeps our state in ``info`` until it reconnects (maybe never, if nothing
    checks it out): the state must not hold the closed DBAPI connection."""
    import weakref

    from sqla_rebalance.lifetime import INFO_KEY

    from .helpers import manual_maintenance

    manual_maintenance(monkeypatch)  # no pass may run: the state alone must let go
    engine = create_engine(pg_url, poolclass=RebalancingQueuePool, pool_size=2)
    try:
        conn = engine.connect()
        conn.execute(text("select 1"))
        record = conn.connection._connection_record
        driver = weakref.ref(conn.connection.driver_connection)
        state = record.info[INFO_KEY]
        conn.invalidate()
        conn.close()
        del conn  # the application lets go of it
        gc.collect()
        assert driver() is None  # closed and gone...
        assert state.closed and state.reason == "error"  # ...though the state is still known
    finally:
        engine.dispose()
