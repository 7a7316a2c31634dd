"""Every private SQLAlchemy attribute we rely on, checked on the installed release.

CI runs this module under SQLAlchemy 2.0.x and 2.1.x (see tox.ini and
.ci/run). If an upstream change moves one of these, this is what fails.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time

import pytest
import sqlalchemy
from sqlalchemy import create_engine, event, exc
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool

from sqla_rebalance import _sa


@pytest.fixture
def pool(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path}/c.db", poolclass=QueuePool, pool_size=3)
    yield engine.pool
    engine.dispose()


def test_supported_release():
    assert sqlalchemy.__version__.startswith(("2.0.", "2.1."))


def test_idle_queue_access_swap_and_remove(pool):
    a, b = pool.connect(), pool.connect()
    rec_a, rec_b = a._connection_record, b._connection_record
    a.close()
    b.close()
    assert _sa.idle_records(pool) == [rec_a, rec_b]
    new = _sa.create_record(pool)
    assert new.dbapi_connection is not None and not new.in_use
    assert _sa.swap_idle(pool, rec_a, new)
    assert _sa.idle_records(pool) == [new, rec_b]
    assert not _sa.swap_idle(pool, rec_a, new)  # no longer there
    assert _sa.remove_idle(pool, rec_b) and not _sa.remove_idle(pool, rec_b)
    assert pool.checkedin() == 1
    # What stays in the queue is handed out as usual.
    c = pool.connect()
    assert c._connection_record is new
    c.close()
    rec_a.close()
    rec_b.close()


def test_record_of_connection_and_proxy(tmp_path, pool):
    engine = create_engine(f"sqlite:///{tmp_path}/d.db")
    with engine.connect() as conn:
        rec = _sa.record_of(conn)
        assert _sa.record_of(conn.connection) is rec
        assert _sa.pool_of(rec) is engine.pool
    with pytest.raises(TypeError):
        _sa.record_of(object())


def test_starttime_drives_sqlalchemy_recycle(pool, monkeypatch):
    pool._recycle = 100
    c = pool.connect()
    rec = c._connection_record
    c.close()
    dbapi = rec.dbapi_connection
    _sa.set_starttime(rec, time.time() - 99)
    c = pool.connect()
    assert c.dbapi_connection is dbapi  # not yet
    c.close()
    _sa.set_starttime(rec, time.time() - 101)
    assert _sa.starttime(rec) < time.time() - 100
    c = pool.connect()
    assert c.dbapi_connection is not dbapi  # recycled by SQLAlchemy's own check
    c.close()


def test_clamp_starttime_respects_invalidation_marks(pool):
    c = pool.connect()
    rec = c._connection_record
    pool._invalidate_time = 1000.0
    assert _sa.clamp_starttime(pool, rec, 500.0) == math.nextafter(1000.0, math.inf)
    assert _sa.clamp_starttime(pool, rec, 2000.0) == 2000.0
    rec._soft_invalidate_time = 3000.0
    assert _sa.clamp_starttime(pool, rec, 2000.0) > 3000.0
    _sa.set_starttime(rec, _sa.clamp_starttime(pool, rec, 2000.0))
    assert not _sa.is_invalidated(pool, rec)
    pool._invalidate_time = _sa.starttime(rec) + 1
    assert _sa.is_invalidated(pool, rec)
    c.close()


def test_wrap_creator_sees_record_after_starttime_is_set(pool):
    seen = []

    def wrapper(original, rec):
        seen.append(rec.starttime)
        return original(rec)

    _sa.wrap_creator(pool, wrapper)
    before = time.time()
    c = pool.connect()
    assert seen and seen[0] >= before
    c.close()


def test_wrap_creator_returns_an_original_that_takes_no_record(pool):
    # Health probes open connections outside the pool: original(None).
    original = _sa.wrap_creator(pool, lambda original, rec: original(rec))
    dbapi = original(None)
    assert dbapi.execute("select 1").fetchone() == (1,)
    dbapi.close()


def test_pool_invalidate_is_the_disconnect_hook(pool):
    # Connection._handle_dbapi_exception calls pool._invalidate(fairy, e) on a
    # disconnect; RebalancingQueuePool overrides it to act on one host only.
    params = list(inspect.signature(QueuePool._invalidate).parameters)
    assert params == ["self", "connection", "exception", "_checkin"]
    src = inspect.getsource(sqlalchemy.engine.base.Connection._handle_dbapi_exception)
    assert "pool._invalidate(" in src
    c = pool.connect()
    before = pool._invalidate_time
    _sa.pool_invalidate(pool, c, None, True)
    assert pool._invalidate_time > before
    assert not c.is_valid
    c.close()


def test_soft_invalidation_of_a_record_recycles_it_at_checkout(pool):
    c = pool.connect()
    rec = _sa.record_of(c)
    c.close()
    rec.invalidate(soft=True)
    assert _sa.is_invalidated(pool, rec)
    first = rec.dbapi_connection
    c = pool.connect()
    assert _sa.record_of(c).dbapi_connection is not first
    c.close()


def test_overflow_accounting(pool):
    assert _sa.overflow(pool) == -3 and _sa.max_overflow(pool) == 10
    assert _sa.inc_overflow(pool)
    assert _sa.overflow(pool) == -2
    _sa.dec_overflow(pool)
    assert _sa.overflow(pool) == -3
    assert not _sa.use_lifo(pool)


def test_recreate_kwargs_build_an_equivalent_pool(pool):
    kw = _sa.recreate_kwargs(pool)
    new = QueuePool(pool._creator, **kw)
    assert new.size() == pool.size() and new.timeout() == pool.timeout()


def test_queue_pool_return_is_queuepool_checkin(pool):
    rec = _sa.create_record(pool)
    _sa.queue_pool_return(pool, rec)
    assert _sa.idle_records(pool) == [rec]
    rec.close()


def test_async_queue_internals():
    from sqlalchemy.pool import AsyncAdaptedQueuePool

    async def main():
        pool = AsyncAdaptedQueuePool(lambda: object(), pool_size=2)
        a = _sa.create_record(pool)
        b = _sa.create_record(pool)
        pool._pool.put(a, False)
        assert _sa.idle_records(pool) == [a]
        assert _sa.swap_idle(pool, a, b)
        assert _sa.idle_records(pool) == [b]
        assert _sa.remove_idle(pool, b) and pool._pool.qsize() == 0

    asyncio.run(main())


def test_greenlet_spawn_is_importable():
    assert callable(_sa.greenlet_spawn)


def test_pool_class_declares_what_sqlalchemy_reads(tmp_path):
    @_sa.pool_class("sqlalchemy.pool.impl.Declared")
    class Declared(QueuePool):
        pass

    @_sa.pool_class("sqlalchemy.pool.impl.AsyncDeclared", asyncio=True)
    class AsyncDeclared(Declared):
        pass

    engine = create_engine(f"sqlite:///{tmp_path}/p.db", poolclass=Declared)
    assert engine.pool.logger.name == "sqlalchemy.pool.impl.Declared"
    assert not _sa.is_asyncio(engine.pool)
    engine.dispose()
    # create_engine checks the pool's asyncio flag against the dialect's.
    with pytest.raises(exc.ArgumentError, match="asyncio"):
        create_engine(f"sqlite:///{tmp_path}/p.db", poolclass=AsyncDeclared)

    async def main():
        pool = AsyncDeclared(lambda: object(), pool_size=2)
        stock = AsyncAdaptedQueuePool(lambda: object(), pool_size=2)
        assert _sa.is_asyncio(pool) and _sa.is_asyncio(stock)
        assert pool.logger.name == "sqlalchemy.pool.impl.AsyncDeclared"
        assert type(pool._pool) is type(stock._pool)  # the asyncio queue
        assert type(pool._dialect) is type(stock._dialect)  # the connection dialect
        rec = _sa.create_record(pool)
        _sa.queue_pool_return(pool, rec)
        assert _sa.idle_records(pool) == [rec]

    asyncio.run(main())


def test_is_asyncio_of_the_stock_pools():
    assert not _sa.is_asyncio(QueuePool(lambda: object()))

    async def main():
        assert _sa.is_asyncio(AsyncAdaptedQueuePool(lambda: object()))

    asyncio.run(main())


def test_creator_is_what_the_pool_was_made_with():
    def creator():
        return object()

    assert _sa.creator(QueuePool(creator)) is creator


def test_queue_full_is_when_checkin_closes_an_overflow_connection(tmp_path):
    engine = create_engine(
        f"sqlite:///{tmp_path}/f.db", poolclass=QueuePool, pool_size=1, max_overflow=1
    )
    pool = engine.pool
    a, b = pool.connect(), pool.connect()
    rec_a, rec_b = _sa.fairy_record(a), _sa.fairy_record(b)
    assert not _sa.queue_full(pool)
    a.close()
    assert _sa.queue_full(pool)
    b.close()  # no room: QueuePool closes it instead of queueing it
    assert rec_b.dbapi_connection is None
    assert _sa.idle_records(pool) == [rec_a]
    engine.dispose()


def test_fairy_record_until_detached(pool):
    c = pool.connect()
    rec = _sa.fairy_record(c)
    assert rec is not None and rec is _sa.record_of(c)
    assert _sa.fairy_record(object()) is None
    c.detach()
    assert _sa.fairy_record(c) is None
    c.close()


def test_wrap_dialect_connect_is_the_last_step_of_a_connect(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path}/w.db")
    seen = []

    @event.listens_for(engine, "do_connect")
    def handler(dialect, conn_rec, cargs, cparams):
        cparams["timeout"] = 7.0  # what a user's handler may set

    def wrap(original):
        def connect(*cargs, **cparams):
            seen.append(dict(cparams))
            return original(*cargs, **cparams)

        return connect

    assert _sa.wrap_dialect_connect(engine.dialect, wrap)
    assert not _sa.wrap_dialect_connect(engine.dialect, wrap)  # once per dialect
    with engine.connect():
        pass
    # Called once per connect, after the do_connect handlers, with their parameters.
    assert len(seen) == 1 and seen[0]["timeout"] == 7.0
    engine.dispose()
