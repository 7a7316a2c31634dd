"""The embedded bus: one SQLite file, polled (``sqlite:///path/to/bus.db``).

No server: every process on one machine that opens the same file shares the
bus. The log table is the whole mechanism; listeners poll it every
:data:`POLL_INTERVAL` seconds (an indexed read of nothing, most of the time).
Use it for the demo, for development, and for a single machine; a fleet
needs Redis or PostgreSQL.

What is read back is untrusted: only integer generations within ``now + 1
day`` (publishing) or ``now + 2 days`` (reading) are taken, messages are read
as bytes (text that is not UTF-8 cannot break a read), and a listener whose
polling position is above everything left in the log (a junk row, deleted)
moves back down to the log's head instead of staying deaf.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from urllib.parse import unquote, urlsplit

from .base import (
    LOG_LENGTH,
    Ack,
    Bus,
    BusUnavailableError,
    Subscription,
    log_generation,
    next_generation,
    publish_ceiling,
    read_ceiling,
)
from .polling import PollingSubscription

__all__ = ["POLL_INTERVAL", "SQLiteBus"]

#: Seconds between two reads of the log by a listener.
POLL_INTERVAL = 0.1
#: Seconds between two checks that the log's head did not move back below
#: a listener's polling position (rows deleted).
_HEAD_CHECK = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sqla_rebalance_commands (
    channel TEXT NOT NULL,
    gen INTEGER NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (channel, gen)
);
CREATE TABLE IF NOT EXISTS sqla_rebalance_heartbeats (
    channel TEXT NOT NULL,
    process TEXT NOT NULL,
    payload TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (channel, process)
);
"""


def _path(url: str) -> str:
    parts = urlsplit(url)
    path = unquote(parts.path)
    # sqlite:///relative.db and sqlite:////absolute.db, as in SQLAlchemy.
    path = path[1:] if path.startswith("/") else path
    if not path or path == ":memory:":
        raise ValueError(
            "the SQLite bus needs a file shared by the processes: sqlite:///path/to/bus.db"
        )
    return path


class SQLiteBus(Bus):
    schemes = ("sqlite",)

    def __init__(self, url: str, channel: str = "sqla_rebalance") -> None:
        super().__init__(url, channel)
        self.path = _path(url)

    def connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
        except sqlite3.Error as err:
            raise BusUnavailableError(f"sqlite {self.path}: {err}") from err
        return conn

    def publish(self, build: Callable[[int], bytes]) -> tuple[int, int | None]:
        with self._session() as conn:
            conn.execute("BEGIN IMMEDIATE")  # one publisher at a time
            gen = next_generation(_generation(conn, self.channel, publish_ceiling()))
            data = build(gen).decode("ascii")
            conn.execute(
                "INSERT INTO sqla_rebalance_commands (channel, gen, message) VALUES (?, ?, ?)",
                (self.channel, gen, data),
            )
            conn.execute(
                "DELETE FROM sqla_rebalance_commands WHERE channel = ? AND gen <= ("
                " SELECT gen FROM sqla_rebalance_commands WHERE channel = ?"
                " ORDER BY gen DESC LIMIT 1 OFFSET ?)",
                (self.channel, self.channel, LOG_LENGTH),
            )
            conn.execute("COMMIT")
        return gen, None

    @contextlib.contextmanager
    def _session(self) -> Iterator[sqlite3.Connection]:
        """A short-lived connection; driver errors become BusUnavailableError."""
        conn = self.connect()
        try:
            yield conn
        except sqlite3.Error as err:
            raise BusUnavailableError(f"sqlite {self.path}: {err}") from err
        finally:
            conn.close()

    def generation(self) -> int:
        with self._session() as conn:
            return _generation(conn, self.channel, publish_ceiling())

    def heartbeats(self) -> list[bytes]:
        with self._session() as conn:
            rows = conn.execute(
                "SELECT CAST(payload AS BLOB) FROM sqla_rebalance_heartbeats"
                " WHERE channel = ? AND expires_at > ? ORDER BY process",
                (self.channel, time.time()),
            ).fetchall()
        return [bytes(r[0]) for r in rows if isinstance(r[0], bytes)]

    def subscribe(self) -> Subscription:
        return _SQLiteSubscription(self)


def _generation(conn: sqlite3.Connection, channel: str, ceiling: int) -> int:
    """The highest integer generation in the log up to ``ceiling`` (0: none)."""
    row = conn.execute(
        "SELECT gen FROM sqla_rebalance_commands WHERE channel = ? AND gen <= ?"
        " AND typeof(gen) = 'integer' ORDER BY gen DESC LIMIT 1",
        (channel, ceiling),
    ).fetchone()
    return (log_generation(row[0], 0, ceiling) or 0) if row else 0


def _read(conn: sqlite3.Connection, channel: str, gen: int, limit: int) -> list[tuple[int, bytes]]:
    """Logged entries above ``gen`` (and within the read ceiling), oldest first."""
    ceiling = read_ceiling()
    if gen >= ceiling:
        return []
    rows = conn.execute(
        "SELECT gen, CAST(message AS BLOB) FROM sqla_rebalance_commands"
        " WHERE channel = ? AND gen > ? AND gen <= ? AND typeof(gen) = 'integer'"
        " ORDER BY gen LIMIT ?",
        (channel, gen, ceiling, limit),
    ).fetchall()
    out = []
    for position, message in rows:
        checked = log_generation(position, gen, ceiling)
        if checked is not None:
            out.append((checked, bytes(message) if isinstance(message, bytes) else b""))
    return out


class _SQLiteSubscription(PollingSubscription):
    poll_interval = POLL_INTERVAL
    head_check_every = _HEAD_CHECK

    def __init__(self, bus: SQLiteBus) -> None:
        self._bus = bus
        self._conn = bus.connect()
        try:
            # Polling starts from here; what came before is the listener's
            # catch-up read (``since``), as for the other transports.
            head = _generation(self._conn, bus.channel, read_ceiling())
        except sqlite3.Error as err:
            self.close()
            raise self._fail(err) from err
        super().__init__(head)

    def _fail(self, err: Exception) -> BusUnavailableError:
        return BusUnavailableError(f"sqlite {self._bus.path}: {err}")

    def _read(
        self, seen: int, limit: int, head: bool
    ) -> tuple[list[tuple[int, bytes]], int | None]:
        try:
            rows = _read(self._conn, self._bus.channel, seen, limit)
            top = None
            if head and not rows:
                top = _generation(self._conn, self._bus.channel, read_ceiling())
        except sqlite3.Error as err:
            raise self._fail(err) from err
        return rows, top

    def generation(self) -> int:
        try:
            return _generation(self._conn, self._bus.channel, publish_ceiling())
        except sqlite3.Error as err:
            raise self._fail(err) from err

    def since(self, gen: int, limit: int = LOG_LENGTH) -> list[tuple[int, bytes]]:
        try:
            return _read(self._conn, self._bus.channel, gen, limit)
        except sqlite3.Error as err:
            raise self._fail(err) from err

    def put_heartbeat(
        self, process: str, payload: bytes, ttl: float, acks: Sequence[Ack] = ()
    ) -> None:
        now = time.time()
        try:
            self._conn.execute(
                "INSERT INTO sqla_rebalance_heartbeats (channel, process, payload, expires_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (channel, process) DO UPDATE"
                " SET payload = excluded.payload, expires_at = excluded.expires_at",
                (self._bus.channel, process, payload.decode(), now + ttl),
            )
            self._conn.execute(
                "DELETE FROM sqla_rebalance_heartbeats WHERE channel = ? AND expires_at < ?",
                (self._bus.channel, now - 3600),
            )
        except sqlite3.Error as err:
            raise self._fail(err) from err

    def close(self) -> None:
        super().close()
        with contextlib.suppress(Exception):  # closing must never raise into the listener
            self._conn.close()
