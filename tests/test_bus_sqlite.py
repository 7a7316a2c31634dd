"""Untrusted data in the embedded bus (a SQLite file written by anybody who can write the
file): junk log rows and heartbeats, rows of the wrong type, and a listener that must not
go deaf when a junk row far ahead is deleted."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from sqla_rebalance import RebalancingQueuePool
from sqla_rebalance.bus import open_bus, send_command
from sqla_rebalance.bus.base import next_generation, publish_ceiling

from .bus_cases import (
    Store,
    check_junk_heartbeats_are_skipped,
    check_junk_in_the_log_moves_nothing,
)
from .helpers import wait_for as poll

SECRET = "sqlite-bus-test-secret"


class SQLiteStore(Store):
    huge_positions = (2**63 - 1,)

    def __init__(self, bus: str) -> None:
        self.bus = open_bus(bus)
        self.channel = self.bus.channel

    def _sql(self, query: str, params: tuple = ()) -> list[tuple]:
        conn = self.bus.connect()  # creates the tables
        try:
            return conn.execute(query, params).fetchall()
        finally:
            conn.close()

    def add_log(self, position, payload):
        self._sql(
            "INSERT INTO sqla_rebalance_commands (channel, gen, message) VALUES (?, ?, ?)",
            (self.channel, position, payload),
        )

    def remove_log(self, position):
        self._sql(
            "DELETE FROM sqla_rebalance_commands WHERE channel = ? AND gen = ?",
            (self.channel, position),
        )

    def add_heartbeat(self, name, payload):
        self._sql(
            "INSERT INTO sqla_rebalance_heartbeats (channel, process, payload, expires_at)"
            " VALUES (?, ?, ?, ?)",
            (self.channel, name, payload, time.time() + 60),
        )


@pytest.fixture
def bus(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/bus.db"


def test_junk_in_the_log_moves_nothing(bus, tmp_path):
    """gen = 2**63-1 and junk an hour ahead, read by the polling listener: nothing moves,
    and publishing works from a generation near the clock."""
    check_junk_in_the_log_moves_nothing(bus, SECRET, tmp_path, SQLiteStore(bus), catch_up=False)


def test_junk_heartbeats_are_skipped_and_counted(bus, tmp_path):
    extra = {"not_utf8": b"\xff\xfe\x00junk", "oversized": b"{" + b" " * (2 << 20) + b"}"}
    check_junk_heartbeats_are_skipped(bus, SECRET, tmp_path, SQLiteStore(bus), extra)


def test_a_listener_hears_commands_after_a_junk_row_far_ahead_is_deleted(bus, tmp_path):
    """The polling position is moved by rows nobody verified: when such a row is deleted,
    the next command (at a lower generation) must still be heard, within about a second,
    not at the next slow catch-up (15-45 s)."""
    store = SQLiteStore(bus)
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        broadcast=bus,
        broadcast_secret=SECRET,
        min_recycle_interval=0,
    )
    try:
        pool = engine.pool
        poll(lambda: pool.listener is not None and pool.listener.connected)
        ahead = int(time.time() * 1000) + 3_600_000
        store.add_log(ahead, b"junk an hour ahead")
        poll(lambda: pool.stats().bus.rejected.get("malformed") == 1)
        store.remove_log(ahead)
        sent = send_command(bus, "recycle", secret=SECRET)
        assert sent.generation < ahead
        start = time.monotonic()
        poll(lambda: pool.stats().bus.generation_applied == sent.generation, timeout=10)
        assert time.monotonic() - start < 5
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "gen",
    ["not a number", 1.5e12, b"\x00\x01", 2**63 - 1, -5, 0],
    ids=["text", "real", "blob", "int64_max", "negative", "zero"],
)
def test_rows_of_any_type_never_break_publish_or_read(bus, tmp_path, gen):
    """SQLite keeps whatever type it is given: a text, real or blob generation, a blob
    message that is not UTF-8. Reads skip them, publishes ignore them."""
    store = SQLiteStore(bus)
    store._sql(
        "INSERT INTO sqla_rebalance_commands (channel, gen, message) VALUES (?, ?, ?)",
        (store.channel, gen, b"\xff\xfe not utf-8"),
    )
    store._sql(
        "INSERT INTO sqla_rebalance_commands (channel, gen, message) VALUES (?, ?, ?)",
        (store.channel, int(time.time() * 1000) - 10, b"\xff\xfe not utf-8 either"),
    )
    sub = open_bus(bus).subscribe()
    try:
        entries = sub.since(0)
        assert all(
            isinstance(g, int) and 0 < g <= publish_ceiling() + 86_400_000 for g, _ in entries
        )
        assert sub.generation() <= publish_ceiling()
        sent = send_command(bus, "recycle", secret=SECRET)
        assert sent.generation <= publish_ceiling()
        assert sent.generation >= next_generation(0) - 1000
        assert sub.get(1.0) is not None  # the polling read of the new row works
    finally:
        sub.close()
    raw = sqlite3.connect(open_bus(bus).path)
    try:
        (count,) = raw.execute("SELECT count(*) FROM sqla_rebalance_commands").fetchone()
    finally:
        raw.close()
    assert count == 3
