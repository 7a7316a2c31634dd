"""The workload: threads running short read/write transactions through the engine."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, text

from ..lifetime import state_of
from .output import Out


@dataclass
class Failure:
    error: BaseException
    host: str | None
    started: float
    failed: float
    #: The transaction was the first use of its connection (never checked out before).
    first_use: bool = False


class Workload:
    """Threads running short read/write transactions until stopped.

    A failed transaction is shown and counted, and the thread goes on.
    ``expected(failure)`` tells the failures the demo provoked on purpose
    (statements in flight on a killed server) from real errors.
    """

    def __init__(
        self,
        engine: Engine,
        threads: int,
        out: Out,
        expected: Callable[[Failure], bool] = lambda failure: False,
    ) -> None:
        self.engine = engine
        self.out = out
        self.expected = expected
        self.stop_event = threading.Event()
        self.started = False
        self.lock = threading.Lock()
        self.transactions = 0
        self.errors: list[Failure] = []
        self.in_flight: list[Failure] = []
        self.threads = [
            threading.Thread(target=self._run, args=(i,), name=f"demo-{i}", daemon=True)
            for i in range(threads)
        ]

    def start(self) -> None:
        self.started = True
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.started:
            for t in self.threads:
                t.join()

    def _run(self, i: int) -> None:
        rng = random.Random(i)
        while not self.stop_event.is_set():
            started = time.monotonic()
            host, first_use = None, False
            try:
                with self.engine.begin() as conn:
                    host, first_use = host_of(conn)
                    conn.execute(text("insert into events (who) values (:w)"), {"w": f"t{i}"})
                    conn.execute(text("select count(*) from events")).scalar()
            except Exception as err:  # shown and counted: a demo must not hide errors
                failure = Failure(err, host, started, time.monotonic(), first_use)
                self._failed(failure)
                self.stop_event.wait(0.05)
                continue
            with self.lock:
                self.transactions += 1
            self.stop_event.wait(rng.uniform(0.005, 0.02))

    def _failed(self, failure: Failure) -> None:
        expected = self.expected(failure)
        with self.lock:
            (self.in_flight if expected else self.errors).append(failure)
            shown = len(self.errors) <= 5 or expected
        if shown:
            what = "in flight on the killed server" if expected else "ERROR"
            first_line = (str(failure.error).strip().splitlines() or [""])[0]
            where = failure.host or "host unknown"
            if failure.first_use:
                where += ", first use of this connection"
            self.out.say(f"{what}: {type(failure.error).__name__}: {first_line[:120]} [{where}]")


def create_table(engine: Engine) -> None:
    """The workload's table, in any database's dialect (autoincrement id)."""
    metadata = MetaData()
    Table(
        "events",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("who", String(20)),
    )
    metadata.create_all(engine)


def host_of(conn: Any) -> tuple[str | None, bool]:
    """The host key of the pooled connection behind a SQLAlchemy ``Connection``,
    and whether this is its first checkout (SQLAlchemy's ``fresh`` flag)."""
    record = getattr(conn.connection, "_connection_record", None)
    state = state_of(record) if record is not None else None
    return (state.host if state is not None else None), bool(getattr(record, "fresh", False))
