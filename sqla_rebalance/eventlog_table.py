"""The event log's table: its schema, its rows, and the SQL that writes one batch.

Split out of :mod:`sqla_rebalance.eventlog` so that everything that knows the
shape of the table lives in one place: the portable UTC timestamp type, the
table and its indexes, how buffered events fold into rows, and the one
transaction that inserts new rows and closes those of earlier batches. The
buffering and the background thread (:mod:`sqla_rebalance.eventlog_writer`)
and the public facade (:mod:`sqla_rebalance.eventlog`) only call into it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

__all__ = ["Event", "UTCDateTime", "make_table", "write_batch"]

# Column widths. Values are cut to fit rather than failing the whole batch.
_NAME_LEN = 255
_HOST_LEN = 512
_REASON_LEN = 32


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp, portable over SQLite, PostgreSQL and MySQL.

    PostgreSQL gets ``TIMESTAMP WITH TIME ZONE``. SQLite and MySQL have no
    zone-aware type, so they store naive UTC (SQLite as ISO text, MySQL as
    ``DATETIME(6)``: without ``fsp`` MySQL would drop the microseconds). Read
    back, every value is an aware UTC ``datetime``, whichever the database.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects.mysql import DATETIME

            return dialect.type_descriptor(DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=timezone.utc)


def make_table(name: str, schema: str | None) -> Table:
    return Table(
        name,
        MetaData(),
        # INTEGER PRIMARY KEY is what autoincrements on SQLite.
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
        Column("pool", String(_NAME_LEN), nullable=False),
        Column("process", String(_NAME_LEN), nullable=False),
        Column("connection_id", BigInteger, nullable=False),
        Column("host", String(_HOST_LEN), nullable=False),
        Column("opened_at", UTCDateTime(), nullable=False),
        Column("closed_at", UTCDateTime(), nullable=True),
        Column("reason", String(_REASON_LEN), nullable=True),
        Column("background", Boolean, nullable=True),
        # The lookup of a retirement whose open was written by an earlier batch.
        Index(f"ix_{name}_process_conn", "process", "connection_id"),
        Index(f"ix_{name}_opened_at", "opened_at"),
        schema=schema,
    )


class Event(NamedTuple):
    """One signal, as the receivers buffer it (epoch seconds, as the pool sends them)."""

    opened: bool
    pool: str
    connection_id: int
    host: str
    connected_at: float
    background: bool | None
    closed_at: float | None
    reason: str | None


def _merge(batch: list[Event], process: str) -> tuple[list[dict[str, Any]], list[Event]]:
    """Fold a batch into rows to insert, plus the retirements of earlier batches' rows.

    An open and a retire of the same connection in one batch become one row
    that keeps the open's connect time. Connection ids are unique within a
    process, and a batch only ever holds this process's events (the buffer is
    emptied in a forked child), so the id alone is the key here.
    """
    rows: dict[int, dict[str, Any]] = {}
    closes: list[Event] = []
    for ev in batch:
        if ev.opened:
            rows[ev.connection_id] = _row(ev, process)
            continue
        row = rows.get(ev.connection_id)
        if row is not None and row["closed_at"] is None:
            row["closed_at"] = _utc(ev.closed_at or ev.connected_at)
            row["reason"] = (ev.reason or "")[:_REASON_LEN] or None
        else:
            closes.append(ev)
    return list(rows.values()), closes


def _row(ev: Event, process: str) -> dict[str, Any]:
    """An insertable row; for a lone retirement it is already closed."""
    return {
        "pool": ev.pool[:_NAME_LEN],
        "process": process,
        "connection_id": ev.connection_id,
        "host": ev.host[:_HOST_LEN],
        "opened_at": _utc(ev.connected_at),
        "closed_at": None if ev.closed_at is None else _utc(ev.closed_at),
        "reason": None if ev.reason is None else ev.reason[:_REASON_LEN],
        "background": ev.background,
    }


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def write_batch(conn: Connection, table: Table, process: str, batch: list[Event]) -> None:
    """Write ``batch`` on ``conn`` (in its transaction): insert new rows, close old ones.

    A retirement whose row is not found (its open was dropped, failed, or
    came before ``watch()``) is inserted as a closed row: ``opened_at``
    from the retirement's own ``connected_at``, ``background`` NULL.
    """
    rows, closes = _merge(batch, process)
    if closes:
        # Matched on the connect time too, so that a row left open by
        # an earlier process with the same pid is never closed by us.
        found: dict[tuple[int, datetime], int] = {}
        for chunk in _chunks(sorted({ev.connection_id for ev in closes}), 500):
            query = select(table.c.id, table.c.connection_id, table.c.opened_at).where(
                table.c.process == process,
                table.c.connection_id.in_(chunk),
                table.c.closed_at.is_(None),
            )
            for row_id, conn_id, opened_at in conn.execute(query):
                found[(conn_id, opened_at)] = row_id
        changes: list[dict[str, Any]] = []
        for ev in closes:
            row_id = found.pop((ev.connection_id, _utc(ev.connected_at)), None)
            if row_id is None:
                rows.append(_row(ev, process))
            else:
                changes.append(
                    {
                        "b_id": row_id,
                        "b_closed_at": _utc(ev.closed_at or ev.connected_at),
                        "b_reason": (ev.reason or "")[:_REASON_LEN] or None,
                    }
                )
        if changes:
            conn.execute(
                update(table)
                .where(table.c.id == bindparam("b_id"))
                .values(closed_at=bindparam("b_closed_at"), reason=bindparam("b_reason")),
                changes,
            )
    if rows:
        conn.execute(insert(table), rows)
