"""Fork safety: the child gets its own worker and never touches the parent's connections."""

from __future__ import annotations

import json
import os
import random
import sys

import pytest
from sqlalchemy import create_engine, text

from sqla_rebalance import RebalancingQueuePool
from sqla_rebalance.worker import get_worker

from .helpers import wait_for

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def test_child_restarts_worker_lazily_and_leaves_parent_connections_alone(tmp_path):
    engine = create_engine(
        f"sqlite:///{tmp_path}/f.db",
        poolclass=RebalancingQueuePool,
        pool_size=3,
        min_size=2,
        pool_recycle=3600,
    )
    pool = engine.pool
    wait_for(lambda: pool.checkedin() == 2)
    parent_conns = {id(r.dbapi_connection) for r in pool._ledger.states}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report, then exit without running pytest's teardown
        code = 1
        try:
            ok = get_worker().thread is None  # no thread inherited
            # The parent's connections forgotten.
            ok &= pool._ledger.states == {} and pool._ledger.spares == []
            # The parent's idle connections keep their slots but not their sockets.
            ok &= all(r.dbapi_connection is None for r in pool._pool.queue)
            pool.recycle()  # must not touch them either
            engine.dispose(close=False)  # SQLAlchemy's advice for a child
            with engine.connect() as conn:
                ok &= conn.execute(text("select 1")).scalar() == 1
            ok &= get_worker().thread is not None  # restarted on first use
            os.write(write, b"ok" if ok else b"bad")
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 10) == b"ok"
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's pool still has its own two connections, untouched.
    assert {id(r.dbapi_connection) for r in pool._ledger.states} == parent_conns
    with engine.connect() as conn:
        assert conn.execute(text("select 1")).scalar() == 1
    engine.dispose()
    sys.stdout.flush()


def test_child_uses_a_multi_host_pool(tmp_path):
    hosts = [str(tmp_path / f"h{i}.db") for i in range(2)]
    engine = create_engine(
        f"sqlite:///{hosts[0]}", poolclass=RebalancingQueuePool, pool_size=4, hosts=hosts
    )
    conns = [engine.connect() for _ in range(4)]
    for conn in conns:
        conn.close()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            engine.dispose(close=False)
            conns = [engine.connect() for _ in range(4)]
            per_host = {k: h.open for k, h in engine.pool.stats().hosts.items()}
            os.write(write, b"ok" if per_host == dict.fromkeys(hosts, 2) else b"bad")
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 10) == b"ok"
    assert os.waitstatus_to_exitcode(status) == 0
    assert {k: h.open for k, h in engine.pool.stats().hosts.items()} == dict.fromkeys(hosts, 2)
    engine.dispose()


def _draws(engine) -> list[float]:
    """The lifetimes the pool drew for its open connections, and the moments a recycle
    spread over 5 s chose for them (seconds after now)."""
    states = list(engine.pool._ledger.states.values())
    now = min(state.retire_at for state in states)
    lifetimes = sorted(round(s.deadline - s.connected_at, 9) for s in states)
    return lifetimes + sorted(round(s.retire_at - now, 9) for s in states)


def test_an_application_seed_neither_lines_up_the_pools_draws_nor_is_disturbed(tmp_path):
    """Lifetimes come from the package's own random source (``randomness``):

    - after ``random.seed(0)`` in a parent and in its forked child (an application that
      seeds every worker alike), the two pools draw different lifetimes: a fleet seeded
      in step still expires spread out;
    - opening, recycling and replacing connections leaves the application's seeded
      ``random`` sequence where it was."""
    random.seed(0)
    expected = random.random()

    def open_three() -> list[float]:
        engine = create_engine(
            f"sqlite:///{tmp_path}/{os.getpid()}.db",
            poolclass=RebalancingQueuePool,
            pool_size=3,
            pool_recycle=600,
            recycle_jitter=0.5,
        )
        with engine.connect(), engine.connect(), engine.connect():
            pass
        engine.pool.recycle(spread=5.0)  # idle connections marked, not closed at once
        draws = _draws(engine)
        engine.dispose()
        return draws

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            random.seed(0)
            os.write(write, json.dumps(open_three()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    random.seed(0)
    mine = open_three()
    assert random.random() == expected  # the application's sequence, undisturbed
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    theirs = json.loads(os.read(read, 4096))
    assert len(mine) == len(theirs) == 6
    assert all(300 <= lifetime <= 600 for lifetime in mine[:3] + theirs[:3])
    assert mine[:3] != theirs[:3]  # lifetimes
    assert mine[3:] != theirs[3:]  # the recycle's spread
