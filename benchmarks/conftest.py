"""Fixtures of the pytest-benchmark suite.

Run with ``.venv/bin/python -m pytest benchmarks`` (the default ``testpaths``
is ``tests``). PostgreSQL benchmarks start a 1-instance cluster on 127.0.0.x
once per session; set ``SQLA_REBALANCE_BENCH_DSN`` to use a running
(loopback) server instead.

At the end of the run a summary prints, for each pair, the ratio of the
median times RebalancingQueuePool / QueuePool as measured by
pytest-benchmark (each pool in its own calibrated run; for a ratio measured
in alternating rounds use ``benchmarks/checkout_overhead.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _support import BASELINE, CHECKOUT_POOLS, OURS, make_engine, postgres_url
from pytest_benchmark.fixture import BenchmarkFixture
from sqlalchemy.engine import Engine

#: (group, pool variant) -> median seconds, filled in by ``record_median``.
_medians: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with postgres_url(os.environ.get("SQLA_REBALANCE_BENCH_DSN")) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL per backend; the PostgreSQL server starts only if needed."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bench.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def backend(db_url: str) -> str:
    return db_url.split(":", 1)[0].split("+", 1)[0]


@pytest.fixture(params=list(CHECKOUT_POOLS))
def pool_variant(request: pytest.FixtureRequest) -> str:
    """``queuepool`` or ``rebalance`` (see ``_support.CHECKOUT_POOLS``)."""
    name: str = request.param
    return name


@pytest.fixture
def engine(pool_variant: str, db_url: str) -> Iterator[Engine]:
    """A warmed-up engine with the pool of ``pool_variant``."""
    eng = make_engine(db_url, CHECKOUT_POOLS[pool_variant])
    for _ in range(50):  # first connect and dialect initialisation out of the way
        with eng.connect():
            pass
    yield eng
    eng.dispose()


@pytest.fixture
def record_median(pool_variant: str) -> Callable[[BenchmarkFixture], None]:
    """Remember the median of a finished benchmark for the end-of-run summary."""

    def record(benchmark: BenchmarkFixture) -> None:
        meta = benchmark.stats  # None with --benchmark-disable
        if meta is not None and benchmark.group:
            _medians[(benchmark.group, pool_variant)] = meta.stats.median

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    groups = sorted({g for g, _ in _medians})
    rows = [
        (g, _medians[(g, BASELINE)], _medians[(g, OURS)])
        for g in groups
        if (g, BASELINE) in _medians and (g, OURS) in _medians
    ]
    if not rows:
        return
    tr = terminalreporter
    tr.section("checkout overhead: median RebalancingQueuePool / QueuePool")
    tr.write_line(f"{'group':<28} {'queuepool us':>13} {'rebalance us':>13} {'ratio':>7}")
    for group, base, ours in rows:
        tr.write_line(f"{group:<28} {base * 1e6:13.2f} {ours * 1e6:13.2f} {ours / base:7.3f}")
    tr.write_line("target: ratio <= 1.05 (single runs are noisy; see checkout_overhead.py)")
