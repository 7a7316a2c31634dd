"""Nothing leaks: engines created and disposed leave threads and file descriptors at baseline."""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref

from sqlalchemy import create_engine, pool, text

from sqla_rebalance import RebalancingQueuePool
from sqla_rebalance.worker import get_worker

from .helpers import wait_for


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _left() -> str:
    """What keeps the process from its baseline: the worker thread and what it still
    serves (registered pools, timers not cancelled), and bus listener threads."""
    gc.collect()
    worker = get_worker()
    listening = [t.name for t in threading.enumerate() if t.name.startswith("sqla-rebalance-bus")]
    if worker.thread is None and not listening:
        return ""
    pools = [type(ref()).__name__ for ref in list(worker._pools.values()) if ref() is not None]
    timers = [_timer(t.callback) for _when, _seq, t in list(worker._timers) if not t.cancelled]
    return f"worker thread {worker.thread}, pools {pools}, timers {timers}, listeners {listening}"


def _timer(callback: object) -> str:
    """A timer's callback: a deadline as the operation and host it watches."""
    deadline = getattr(callback, "__self__", None)
    if deadline is not None and hasattr(deadline, "what"):
        return f"deadline of a {deadline.what} on {deadline.host} (misses {deadline.misses})"
    return repr(callback)


def settle() -> bool:
    """No worker thread and no bus listener left (an earlier test's may still be exiting)."""
    return not _left()


def wait_settled() -> None:
    """:func:`settle`, saying what is left if it never comes."""
    try:
        wait_for(settle)
    except AssertionError as err:
        raise AssertionError(f"{err}; left: {_left()}") from None


def test_thousand_engine_cycles_leave_threads_and_fds_at_baseline(tmp_path):
    url = f"sqlite:///{tmp_path}/leak.db"
    wait_settled()
    threads, fds = threading.active_count(), open_fds()
    for i in range(1000):
        engine = create_engine(
            url,
            poolclass=RebalancingQueuePool,
            pool_size=2,
            pool_recycle=60,
            min_size=1 if i % 2 else 0,
        )
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        assert get_worker().thread is not None  # the worker serves the pool...
        engine.dispose()
        del engine, conn
    wait_settled()  # ...and stops once no pool is left
    assert threading.active_count() == threads
    assert open_fds() == fds


def test_multi_host_engine_cycles_leave_threads_and_fds_at_baseline(tmp_path):
    hosts = [str(tmp_path / f"h{i}.db") for i in range(3)]
    wait_settled()
    threads, fds = threading.active_count(), open_fds()
    for _ in range(300):
        engine = create_engine(
            f"sqlite:///{hosts[0]}", poolclass=RebalancingQueuePool, pool_size=3, hosts=hosts
        )
        conns = [engine.connect() for _ in range(3)]
        for conn in conns:
            conn.close()
        engine.dispose()
        del engine, conns, conn
    wait_settled()
    assert threading.active_count() == threads
    assert open_fds() == fds


def test_worker_holds_pools_weakly(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path}/w.db", poolclass=RebalancingQueuePool, min_size=1)
    wait_for(lambda: engine.pool.checkedin() == 1)  # prefilled by the worker
    assert get_worker().is_registered(engine.pool)
    engine = None  # the only reference: the pool goes with it
    wait_settled()


class _DBAPIConn:
    def cursor(self) -> object:
        raise AssertionError("not used")

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass


def _invalidated_connection_is_collected(p: RebalancingQueuePool) -> bool:
    conn = p.connect()
    ref = weakref.ref(conn.dbapi_connection)
    conn._connection_record.invalidate()  # closes it; the record stays in the pool
    del conn
    gc.collect()
    return ref() is None


def test_invalidated_connection_is_not_kept_alive_even_after_pool_listeners_are_cleared():
    # SQLAlchemy's own test teardown clears every class-level pool listener of
    # the process (Pool.dispatch._clear()): our bookkeeping must not depend on them.
    p = RebalancingQueuePool(_DBAPIConn, pool_size=2)
    try:
        assert _invalidated_connection_is_collected(p)
        pool.Pool.dispatch._clear()
        later = RebalancingQueuePool(_DBAPIConn, pool_size=2)
        assert _invalidated_connection_is_collected(later)
        recreated = later.recreate()  # carries the listeners over, once
        assert _invalidated_connection_is_collected(recreated)
        assert len(recreated.dispatch.close) == 1
        later.dispose()
        recreated.dispose()
    finally:
        p.dispose()


def test_maintenance_goes_on_when_the_wall_clock_steps_back(tmp_path, monkeypatch):
    # An NTP step or a VM restored from a snapshot: time.time() jumps back a minute.
    # Schedules run on the monotonic clock, so lifetimes are still replaced on time
    # (with wall-clock schedules every due time looked a minute away).
    engine = create_engine(
        f"sqlite:///{tmp_path}/w.db",
        poolclass=RebalancingQueuePool,
        pool_size=3,
        max_overflow=0,
        min_size=3,
        pool_recycle=2,
        recycle_jitter=0.2,
    )
    try:
        pool = engine.pool
        wait_for(lambda: len(pool._ledger.states) == 3)
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() - 60.0)
        before = pool.stats().retirements["lifetime"]
        # Each connection lives 1.6-2 s: within 6 s each is replaced at least once.
        wait_for(lambda: pool.stats().retirements["lifetime"] >= before + 3, timeout=6)
        with engine.connect() as conn:
            assert conn.execute(text("select 1")).scalar() == 1
        assert pool.stats().checkouts_waited == 0
    finally:
        engine.dispose()
