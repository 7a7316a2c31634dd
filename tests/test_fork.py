"""Fork safety: the child gets its own worker and never touches the parent's connections."""

from __future__ import annotations

import os
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
