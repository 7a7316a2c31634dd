"""Test helpers: a controllable clock and a way to drive maintenance by hand."""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from sqla_rebalance.executor import Executor
from sqla_rebalance.worker import MaintenanceWorker


class FakeClock:
    """Replaces ``time.time`` (SQLAlchemy's ``starttime``, signals) and the package's
    scheduling clock (``sqla_rebalance.clock``) alike: :meth:`install`."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeClock:
        from sqla_rebalance import clock

        monkeypatch.setattr(time, "time", self)
        monkeypatch.setattr(clock, "_monotonic", self)
        return self

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def seed_randomness(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Repeatable draws of the package (lifetimes, spreads, tie-breaks) for one test: its
    ``randomness.rng`` becomes a seeded generator (``random.seed`` no longer reaches it)."""
    from sqla_rebalance import randomness

    monkeypatch.setattr(randomness, "rng", random.Random(seed))


def manual_maintenance(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep pools out of the background worker so a test drives ``_maintain()`` itself.

    The pools' executor jobs (background connects, health checks) run inline, in the
    test's thread, so that a test sees their effect as soon as ``_maintain()`` returns.
    """
    monkeypatch.setattr(MaintenanceWorker, "register", lambda self, pool: None)
    monkeypatch.setattr(MaintenanceWorker, "is_registered", lambda self, pool: True)
    monkeypatch.setattr(Executor, "submit", _run_inline)


def _run_inline(self: Executor, key: str, job: Callable[[], object], cap: int = 1) -> bool:
    job()
    return True


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


async def async_wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, what: str = ""
) -> Any:
    """:func:`wait_for` inside an event loop: polls with ``asyncio.sleep``, so the pools'
    tasks in the same loop (maintenance, checks, connects) go on meanwhile. ``predicate``
    may return an awaitable."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {what or predicate}")
        await asyncio.sleep(interval)
