"""AsyncRebalancingQueuePool: maintenance runs in the event loop that owns the connections."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from sqla_rebalance import AsyncRebalancingQueuePool, RebalancingQueuePool
from sqla_rebalance._sa import greenlet_spawn

from .helpers import FakeClock, manual_maintenance, seed_randomness

pytest.importorskip("aiosqlite")


def make(tmp_path, **kw):
    kw.setdefault("pool_size", 3)
    return create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path}/a.db", poolclass=AsyncRebalancingQueuePool, **kw
    )


def test_sync_pool_class_is_rejected_by_async_engine(tmp_path):
    from sqlalchemy import exc

    with pytest.raises(exc.ArgumentError, match="asyncio"):
        create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/a.db", poolclass=RebalancingQueuePool)


def test_replacement_and_checkin_retirement_in_the_loop(tmp_path, monkeypatch):
    clock = FakeClock()
    clock.install(monkeypatch)
    manual_maintenance(monkeypatch)
    seed_randomness(monkeypatch, 3)

    async def main():
        engine = make(tmp_path, pool_recycle=100, recycle_jitter=0.0)
        pool = engine.pool
        async with engine.connect() as c1, engine.connect() as c2:
            await c1.execute(text("select 1"))
            await c2.execute(text("select 1"))
        held = await engine.connect()
        await held.execute(text("select 1"))
        clock.advance(100)
        await greenlet_spawn(pool._maintenance.maintain)  # one idle replaced, one in use marked
        assert pool.stats().retirements["lifetime"] == 1
        assert len(pool._doomed) == 1
        assert len(pool._ledger.spares) == 1
        await held.close()  # checkin swaps the spare in
        await greenlet_spawn(pool._maintenance.maintain)
        stats = pool.stats()
        assert stats.retirements["lifetime"] == 2
        assert stats.idle == 2
        assert stats.checkouts_waited == 2
        async with engine.connect() as c1, engine.connect() as c2:
            await c1.execute(text("select 1"))
            await c2.execute(text("select 1"))
        assert pool.stats().connects == 4  # no checkout reconnected
        await engine.dispose()

    asyncio.run(main())


def test_worker_maintains_an_async_pool(tmp_path):
    async def main():
        engine = make(tmp_path, pool_recycle=0.6, recycle_jitter=0.5, min_size=2)
        pool = engine.pool
        deadline = time.monotonic() + 20
        while pool.stats().retirements["lifetime"] < 4:
            assert time.monotonic() < deadline, pool.stats()
            async with engine.connect() as conn:
                await conn.execute(text("select 1"))
            await asyncio.sleep(0.02)
        stats = pool.stats()
        # Only the first checkout connected (an asyncio pool learns its event loop
        # there); the prefill and every replacement are the worker's, in this loop.
        assert stats.connects >= 5
        assert stats.checkouts_waited == 1, stats
        await engine.dispose()

    asyncio.run(main())


def test_pin_accepts_an_async_connection(tmp_path):
    import sqla_rebalance

    async def main():
        engine = make(tmp_path, pool_recycle=100)
        async with engine.connect() as conn:
            await conn.execute(text("select 1"))
            sqla_rebalance.pin(conn)
            assert sqla_rebalance.is_pinned(conn)
            assert engine.pool.recycle() == 0  # pinned: left alone
            sqla_rebalance.unpin(conn)
            assert not sqla_rebalance.is_pinned(conn)
        await engine.dispose()

    asyncio.run(main())
