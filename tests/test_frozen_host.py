"""Hosts that *hang* rather than refuse: servers stopped with SIGSTOP (``server.freeze()``).

The kernel still completes TCP handshakes and acknowledges data, but nothing answers: what
a frozen VM or a partitioned zone looks like to a client. Against real PostgreSQL and MariaDB
servers of the suite, each with sync and asyncio pools, with the real maintenance worker:

- the frozen host is marked suspect, then down, with the reason ``deadline exceeded``;
- once down and its idle connections replaced, no checkout gets a connection to it;
- a host whose connections are all in use is still found (a probe of its own);
- a second pool of the process (a second thread, or the same event loop) keeps its
  background replacement (no checkout waits);
- it fails back after a thaw; 20 freeze/thaw cycles leave no thread or server session.

Figures (how fast, how many transactions) are in ``benchmarks/frozen_host.py``; here the
deadlines are generous and only behaviour is asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

from sqla_rebalance import AsyncRebalancingQueuePool, RebalancingQueuePool, signals
from sqla_rebalance.lifetime import state_of

from .helpers import async_wait_for, wait_for

pytestmark = pytest.mark.servers

_names = itertools.count()

#: Generous bounds for a loaded CI machine; the benchmark measures the real times.
DOWN_WITHIN = 15.0


@pytest.fixture
def app_name() -> str:
    return f"frozen-{next(_names)}"


@pytest.fixture
def engines(pg_cluster: Any, app_name: str) -> Iterator[Any]:
    made: list[Any] = []

    def make(hosts: list[str] | None = None, url: str | None = None, **kw: Any) -> Any:
        kw.setdefault("pool_size", 6)
        kw.setdefault("max_overflow", 0)
        engine = create_engine(
            url or pg_cluster.servers[0].url(),
            poolclass=RebalancingQueuePool,
            hosts=pg_cluster.hosts[:3] if hosts is None else hosts,
            connect_args={"application_name": app_name},
            **kw,
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.dispose()


@pytest.fixture
def host_signals() -> Iterator[list[tuple[str, str, dict[str, Any]]]]:
    got: list[tuple[str, str, dict[str, Any]]] = []

    def receiver(name: str) -> Any:
        def receive(pool: Any, host: str, **kw: Any) -> None:
            got.append((name, host, kw))

        return receive

    receivers = {
        signals.host_suspect: receiver("suspect"),
        signals.host_down: receiver("down"),
        signals.host_up: receiver("up"),
    }
    for signal, receive in receivers.items():
        signal.connect(receive, weak=False)
    yield got
    for signal, receive in receivers.items():
        signal.disconnect(receive)


def host_of(conn: Any) -> str:
    """The pool's host key of a checked-out connection (no network round trip)."""
    state = state_of(conn.connection._connection_record)
    assert state is not None
    return state.host


def health(engine: Any, key: str) -> Any:
    return engine.pool.stats().hosts[key]


def test_frozen_host_is_found_avoided_and_failed_back(engines, pg_cluster, host_signals):
    frozen = pg_cluster.servers[2]
    key = frozen.address
    engine = engines(min_size=6)
    wait_for(lambda: engine.pool.stats().idle == 6)
    assert health(engine, key).open == 2
    with frozen.frozen():
        started = time.monotonic()
        wait_for(lambda: health(engine, key).health == "down", timeout=DOWN_WITHIN)
        took = time.monotonic() - started
        stats = health(engine, key)
        assert stats.reason == "deadline exceeded"
        assert "deadline exceeded" in (stats.last_error or "")
        kinds = [(name, kw.get("reason")) for name, host, kw in host_signals if host == key]
        assert kinds[:2] == [("suspect", "deadline exceeded"), ("down", "deadline exceeded")]
        # Its idle connections are replaced on the other hosts, in the background...
        wait_for(lambda: health(engine, key).open == 0, timeout=DOWN_WITHIN)
        assert engine.pool.stats().idle == 6
        # ...and no checkout gets a connection to it, nor waits for one.
        waited = engine.pool.stats().checkouts_waited
        for _ in range(30):
            with engine.connect() as conn:
                assert host_of(conn) != key
                conn.execute(text("SELECT 1"))
        assert engine.pool.stats().checkouts_waited == waited
        print(f"frozen host down after {took:.1f}s")
    # Thawed: up again, and it gets its share back.
    wait_for(lambda: health(engine, key).health == "up", timeout=DOWN_WITHIN)
    wait_for(lambda: health(engine, key).open == 2, timeout=DOWN_WITHIN)
    assert health(engine, key).reason is None


def test_a_checkout_that_must_connect_never_tries_a_suspect_host(engines, pg_cluster):
    """While a host is suspect (a check unanswered past its deadline, not yet down), a
    checkout that has to open a connection goes to a healthy host at once. The connect
    deadline is 30 s here: a checkout that tried the frozen host first would wait that
    long before failing over, while a connect to the healthy host takes milliseconds."""
    healthy, frozen = pg_cluster.servers[1], pg_cluster.servers[2]
    engine = engines(
        hosts=[healthy.address, frozen.address],
        pool_size=8,
        min_size=2,
        unhealthy_threshold=30,  # suspect for ~30 s before down: the state under test
        connect_deadline=30,
    )
    wait_for(lambda: engine.pool.stats().idle == 2)
    held: list[Any] = []
    try:
        with frozen.frozen():
            wait_for(
                lambda: health(engine, frozen.address).health == "suspect", timeout=DOWN_WITHIN
            )
            held += [engine.connect(), engine.connect()]  # the two open (no I/O: no ping)
            waited = engine.pool.stats().checkouts_waited
            slowest = 0.0
            for _ in range(4):  # nothing idle: each of these checkouts connects
                started = time.monotonic()
                conn = engine.connect()
                slowest = max(slowest, time.monotonic() - started)
                held.append(conn)
                assert host_of(conn) == healthy.address
            assert engine.pool.stats().checkouts_waited == waited + 4
            assert health(engine, frozen.address).health == "suspect"  # still: not yet down
            assert slowest < 10.0, f"a checkout waited {slowest:.1f}s: it tried the frozen host"
    finally:
        for conn in held:
            with contextlib.suppress(Exception):
                conn.invalidate()  # never wait on the frozen one's socket
                conn.close()


def test_host_with_every_connection_busy_is_probed(engines, pg_cluster):
    healthy, frozen = pg_cluster.servers[0], pg_cluster.servers[3]
    engine = engines(hosts=[healthy.address, frozen.address], pool_size=2, min_size=2)
    wait_for(lambda: engine.pool.stats().idle == 2)
    held = [engine.connect(), engine.connect()]  # one per host: nothing idle to ping
    assert sorted(host_of(c) for c in held) == sorted([healthy.address, frozen.address])
    try:
        with frozen.frozen():
            seen_in_flight = []

            def probing() -> bool:
                stats = health(engine, frozen.address)
                if stats.check_in_flight is not None:
                    seen_in_flight.append(stats.check_in_flight)
                return stats.health == "down"

            wait_for(probing, timeout=DOWN_WITHIN)
            assert seen_in_flight and max(seen_in_flight) > 0
            assert health(engine, frozen.address).reason == "deadline exceeded"
            assert health(engine, healthy.address).health == "up"
    finally:
        for conn in held:
            with contextlib.suppress(Exception):
                conn.close()


def test_a_second_pool_keeps_its_background_replacement(engines, pg_cluster, app_name):
    frozen, other = pg_cluster.servers[2], pg_cluster.servers[1]
    first = engines(min_size=6)
    # Short lifetimes: the second pool needs replacements during the freeze.
    second = engines(
        hosts=[other.address], pool_size=3, min_size=3, pool_recycle=4, recycle_jitter=0.5
    )
    wait_for(lambda: first.pool.stats().idle == 6 and second.pool.stats().idle == 3)
    stop = threading.Event()
    errors: list[BaseException] = []

    def light_load(engine: Any) -> None:
        while not stop.is_set():
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
            except Exception as err:
                errors.append(err)
            stop.wait(0.02)

    worker = threading.Thread(target=light_load, args=(second,), daemon=True)
    worker.start()
    try:
        time.sleep(0.5)
        before = second.pool.stats()
        with frozen.frozen():
            wait_for(lambda: health(first, frozen.address).health == "down", timeout=DOWN_WITHIN)
            # Long enough for every connection of the second pool to be replaced once.
            deadline = time.monotonic() + 5
            wait_for(
                lambda: (
                    second.pool.stats().connects >= before.connects + 3
                    and time.monotonic() > deadline
                ),
                timeout=20,
            )
        after = second.pool.stats()
    finally:
        stop.set()
        worker.join(10)
    assert errors == []
    assert after.retirements.get("lifetime", 0) > before.retirements.get("lifetime", 0)
    assert after.checkouts_waited == before.checkouts_waited


def test_async_pool_finds_a_frozen_host(pg_cluster):
    frozen = pg_cluster.servers[2]

    async def main() -> tuple[str, str | None, str]:
        engine = create_async_engine(
            pg_cluster.servers[0].url(driver="psycopg"),
            poolclass=AsyncRebalancingQueuePool,
            hosts=pg_cluster.hosts[:3],
            pool_size=3,
            max_overflow=0,
        )
        try:
            for _ in range(6):  # the loop's connections: one per host
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            conns = [await engine.connect() for _ in range(3)]
            for conn in conns:
                await conn.close()
            with frozen.frozen():
                deadline = time.monotonic() + DOWN_WITHIN
                while time.monotonic() < deadline:
                    stats = engine.pool.stats().hosts[frozen.address]
                    if stats.health == "down":
                        break
                    await asyncio.sleep(0.05)
                # The loop stayed free meanwhile: this pool still serves the others.
                async with engine.connect() as conn:
                    host = (await conn.execute(text("SELECT inet_server_addr()::text"))).scalar()
            return stats.health, stats.reason, str(host)
        finally:
            await engine.dispose()

    state, reason, served_by = asyncio.run(main())
    assert (state, reason) == ("down", "deadline exceeded")
    assert not served_by.startswith(frozen.host)


def test_mariadb_frozen_host_is_marked_down(mariadb_cluster):
    frozen = mariadb_cluster.servers[1]
    engine = create_engine(
        mariadb_cluster.servers[0].url(),
        poolclass=RebalancingQueuePool,
        hosts=mariadb_cluster.hosts,
        pool_size=4,
        max_overflow=0,
        min_size=4,
    )
    try:
        wait_for(lambda: engine.pool.stats().idle == 4)
        with frozen.frozen():
            wait_for(lambda: health(engine, frozen.address).health == "down", timeout=DOWN_WITHIN)
            assert health(engine, frozen.address).reason == "deadline exceeded"
            wait_for(lambda: health(engine, frozen.address).open == 0, timeout=DOWN_WITHIN)
            for _ in range(10):
                with engine.connect() as conn:
                    assert host_of(conn) != frozen.address
                    conn.execute(text("SELECT 1"))
        wait_for(lambda: health(engine, frozen.address).health == "up", timeout=DOWN_WITHIN)
    finally:
        engine.dispose()


def test_twenty_freeze_thaw_cycles_leak_nothing(engines, pg_cluster, app_name):
    frozen = pg_cluster.servers[3]
    probe = create_engine(pg_cluster.servers[0].url(), poolclass=RebalancingQueuePool)

    def sessions() -> int:
        with probe.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n"),
                    {"n": app_name},
                ).scalar_one()
            )

    def on_frozen_host() -> int:
        import psycopg

        with psycopg.connect(frozen.dsn(), connect_timeout=5, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app_name,)
            ).fetchone()
            return int(row[0]) if row else 0

    threads_before = threading.active_count()
    engine = engines(
        hosts=[pg_cluster.servers[0].address, frozen.address],
        pool_size=4,
        min_size=4,
        health_check_interval=0.2,
        health_check_timeout=0.3,
        unhealthy_threshold=2,
    )
    try:
        wait_for(lambda: engine.pool.stats().idle == 4)
        for _ in range(20):
            with frozen.frozen():
                wait_for(lambda: health(engine, frozen.address).health == "down", timeout=10)
            wait_for(lambda: health(engine, frozen.address).health == "up", timeout=10)
        wait_for(lambda: health(engine, frozen.address).open >= 1, timeout=20)  # failed back
        # No session abandoned on the frozen host is left on the server: what the server
        # has there is what the pool holds (polled: abandoned sockets close at the thaw).
        wait_for(lambda: on_frozen_host() == health(engine, frozen.address).open, timeout=30)
        # A spare may be open for a moment while connections move back (make-before-break).
        wait_for(lambda: engine.pool.stats().open <= 4, timeout=20)
    finally:
        engine.dispose()
    try:
        wait_for(lambda: sessions() == 0 and on_frozen_host() == 0, timeout=20)
    finally:
        probe.dispose()
    # Every thread of the pool (passes, checks, connects) is gone once it is disposed.
    wait_for(lambda: threading.active_count() <= threads_before, timeout=15)


@pytest.mark.timeout(90)  # a pool that blocked the loop on the frozen host would hang it
def test_a_second_async_pool_keeps_its_background_replacement(pg_cluster, app_name):
    """Two asyncio pools in one event loop share it, as their tasks do: the checks and
    connects of the first pool that hang on the frozen host must all await, never block,
    or the second pool (on a healthy host) would stop replacing its connections in the
    background and its checkouts would have to connect themselves."""
    frozen, other = pg_cluster.servers[2], pg_cluster.servers[1]

    def make(**kw: Any) -> Any:
        return create_async_engine(
            pg_cluster.servers[0].url(driver="psycopg"),
            poolclass=AsyncRebalancingQueuePool,
            max_overflow=0,
            connect_args={"application_name": app_name},
            **kw,
        )

    async def main() -> tuple[Any, Any, Any, list[BaseException]]:
        first = make(hosts=pg_cluster.hosts[:3], pool_size=6, min_size=6)
        # Short lifetimes: the second pool needs replacements during the freeze.
        second = make(
            hosts=[other.address], pool_size=3, min_size=3, pool_recycle=4, recycle_jitter=0.5
        )
        stop = asyncio.Event()
        errors: list[BaseException] = []
        served = [0]

        async def light_load() -> None:
            while not stop.is_set():
                try:
                    async with second.connect() as conn:
                        await conn.execute(text("SELECT 1"))
                    served[0] += 1
                except Exception as err:
                    errors.append(err)
                await asyncio.sleep(0.02)

        try:
            # Warm-up: an asyncio pool learns its loop at its first checkout (which
            # connects); then its worker fills min_size in the background.
            for engine in (first, second):
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            await async_wait_for(
                lambda: first.pool.stats().idle == 6 and second.pool.stats().idle == 3
            )
            assert health(first, frozen.address).open == 2
            load = asyncio.ensure_future(light_load())
            try:
                await async_wait_for(lambda: served[0] >= 10)
                before = second.pool.stats()
                with frozen.frozen():
                    await async_wait_for(
                        lambda: health(first, frozen.address).health == "down",
                        timeout=DOWN_WITHIN,
                    )
                    down = health(first, frozen.address)
                    # Long enough for every connection of the second pool to be replaced once.
                    deadline = time.monotonic() + 5
                    checkouts_at_down = served[0]
                    await async_wait_for(
                        lambda: (
                            second.pool.stats().connects >= before.connects + 3
                            and time.monotonic() > deadline
                        ),
                        timeout=20,
                    )
                    after = second.pool.stats()
                    # The load went on all along (a blocked loop would have stalled it).
                    assert served[0] > checkouts_at_down
            finally:
                stop.set()
                await load
        finally:
            await first.dispose()
            await second.dispose()
        return down, before, after, errors

    down, before, after, errors = asyncio.run(main())
    assert down.reason == "deadline exceeded"
    assert errors == []
    assert after.retirements.get("lifetime", 0) > before.retirements.get("lifetime", 0)
    assert after.checkouts_waited == before.checkouts_waited


@pytest.mark.timeout(90)  # a pool that blocked the loop on the frozen host would hang it
def test_async_mariadb_frozen_host_is_marked_down(mariadb_cluster):
    """The asyncio MySQL drivers hang differently from psycopg (their own socket reads in
    the loop): the frozen MariaDB host must still be found by the deadlines, avoided by
    every checkout without one waiting for a connect, and failed back after the thaw."""
    pytest.importorskip("aiomysql")  # a failure on CI, where every test must run
    frozen = mariadb_cluster.servers[1]

    async def main() -> None:
        engine = create_async_engine(
            mariadb_cluster.servers[0].url(driver="aiomysql"),
            poolclass=AsyncRebalancingQueuePool,
            hosts=mariadb_cluster.hosts,
            pool_size=4,
            max_overflow=0,
            min_size=4,
        )
        try:
            async with engine.connect() as conn:  # the pool learns its event loop
                await conn.execute(text("SELECT 1"))
            await async_wait_for(lambda: engine.pool.stats().idle == 4)
            assert health(engine, frozen.address).open == 2
            with frozen.frozen():
                await async_wait_for(
                    lambda: health(engine, frozen.address).health == "down", timeout=DOWN_WITHIN
                )
                assert health(engine, frozen.address).reason == "deadline exceeded"
                # Its idle connections are closed (hung checks abandoned) and replaced on
                # the other host, in the background...
                await async_wait_for(
                    lambda: health(engine, frozen.address).open == 0, timeout=DOWN_WITHIN
                )
                await async_wait_for(lambda: engine.pool.stats().idle == 4, timeout=DOWN_WITHIN)
                # ...and no checkout gets a connection to it, nor waits for one.
                waited = engine.pool.stats().checkouts_waited
                for _ in range(10):
                    async with engine.connect() as conn:
                        assert host_of(conn.sync_connection) != frozen.address
                        await conn.execute(text("SELECT 1"))
                assert engine.pool.stats().checkouts_waited == waited
            await async_wait_for(
                lambda: health(engine, frozen.address).health == "up", timeout=DOWN_WITHIN
            )
            await async_wait_for(
                lambda: health(engine, frozen.address).open == 2, timeout=DOWN_WITHIN
            )
            assert health(engine, frozen.address).reason is None
        finally:
            await engine.dispose()

    asyncio.run(main())
