"""pytest-benchmark: one pooled checkout+checkin, QueuePool vs RebalancingQueuePool.

Each group holds one pair (same backend, same checkout path), so
pytest-benchmark's table shows them side by side::

    .venv/bin/python -m pytest benchmarks/test_checkout.py

The engine fixture is parametrized over the two pools (``queuepool``:
``QueuePool(pool_recycle=1800)``; ``rebalance``: ``RebalancingQueuePool(
pool_recycle=1800, recycle_jitter=0.2)``) and ``db_url`` over SQLite (a file
database) and PostgreSQL (a session-wide 1-instance cluster).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pytest_benchmark.fixture import BenchmarkFixture
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

# A checkout+checkin takes ~15-25 us: time batches of them (min_time), not
# single calls, so that timer overhead and scheduling jitter matter less.
pytestmark = pytest.mark.benchmark(min_time=0.0005, warmup=True, warmup_iterations=2000)


def assert_all_checked_in(engine: Engine) -> None:
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    assert pool.checkedout() == 0


def test_pool_connect_close(
    benchmark: BenchmarkFixture,
    engine: Engine,
    backend: str,
    record_median: Callable[[BenchmarkFixture], None],
) -> None:
    """``engine.pool.connect()`` then ``.close()``: the pool alone."""
    benchmark.group = f"pool.connect/{backend}"
    connect = engine.pool.connect

    def checkout_checkin() -> None:
        connect().close()

    benchmark(checkout_checkin)
    record_median(benchmark)
    assert_all_checked_in(engine)


def test_engine_connect(
    benchmark: BenchmarkFixture,
    engine: Engine,
    backend: str,
    record_median: Callable[[BenchmarkFixture], None],
) -> None:
    """``with engine.connect(): pass``: what an application does."""
    benchmark.group = f"engine.connect/{backend}"
    connect = engine.connect

    def checkout_checkin() -> None:
        with connect():
            pass

    benchmark(checkout_checkin)
    record_median(benchmark)
    assert_all_checked_in(engine)
