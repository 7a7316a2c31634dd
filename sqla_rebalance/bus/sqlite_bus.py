"""The embedded bus: one SQLite file, polled (``sqlite:///path/to/bus.db``).

No server: every process on one machine that opens the same file shares the
bus. The log table is the whole mechanism; listeners poll it every
:data:`POLL_INTERVAL` seconds (an indexed read of nothing, most of the time).
Use it for the demo, for development, and for a single machine; a fleet
needs Redis or PostgreSQL.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterator
from urllib.parse import unquote, urlsplit

from .base import LOG_LENGTH, Bus, BusUnavailableError, Subscription, next_generation

__all__ = ["POLL_INTERVAL", "SQLiteBus"]

#: Seconds between two reads of the log by a listener.
POLL_INTERVAL = 0.1

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
            gen = next_generation(_generation(conn, self.channel))
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
            return _generation(conn, self.channel)

    def heartbeats(self) -> list[bytes]:
        with self._session() as conn:
            rows = conn.execute(
                "SELECT payload FROM sqla_rebalance_heartbeats"
                " WHERE channel = ? AND expires_at > ? ORDER BY process",
                (self.channel, time.time()),
            ).fetchall()
        return [str(r[0]).encode() for r in rows]

    def subscribe(self) -> Subscription:
        return _SQLiteSubscription(self)


def _generation(conn: sqlite3.Connection, channel: str) -> int:
    row = conn.execute(
        "SELECT coalesce(max(gen), 0) FROM sqla_rebalance_commands WHERE channel = ?",
        (channel,),
    ).fetchone()
    return int(row[0]) if row else 0


class _SQLiteSubscription(Subscription):
    def __init__(self, bus: SQLiteBus) -> None:
        self._bus = bus
        self._conn = bus.connect()
        self._buffer: deque[bytes] = deque()
        try:
            # Polling starts from here; what came before is the listener's
            # catch-up read (``since``), as for the other transports.
            self._seen = _generation(self._conn, bus.channel)
        except sqlite3.Error as err:
            self.close()
            raise self._fail(err) from err

    def _fail(self, err: Exception) -> BusUnavailableError:
        return BusUnavailableError(f"sqlite {self._bus.path}: {err}")

    def get(self, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while not self._buffer:
            try:
                rows = self._conn.execute(
                    "SELECT gen, message FROM sqla_rebalance_commands"
                    " WHERE channel = ? AND gen > ? ORDER BY gen LIMIT 100",
                    (self._bus.channel, self._seen),
                ).fetchall()
            except sqlite3.Error as err:
                raise self._fail(err) from err
            for gen, message in rows:
                self._seen = max(self._seen, int(gen))
                self._buffer.append(str(message).encode())
            if self._buffer:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(POLL_INTERVAL, left))
        return self._buffer.popleft()

    def generation(self) -> int:
        try:
            return _generation(self._conn, self._bus.channel)
        except sqlite3.Error as err:
            raise self._fail(err) from err

    def since(self, gen: int, limit: int = LOG_LENGTH) -> list[tuple[int, bytes]]:
        try:
            rows = self._conn.execute(
                "SELECT gen, message FROM sqla_rebalance_commands"
                " WHERE channel = ? AND gen > ? ORDER BY gen LIMIT ?",
                (self._bus.channel, gen, limit),
            ).fetchall()
        except sqlite3.Error as err:
            raise self._fail(err) from err
        return [(int(r[0]), str(r[1]).encode()) for r in rows]

    def put_heartbeat(self, process: str, payload: bytes, ttl: float) -> None:
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
        with contextlib.suppress(Exception):  # closing must never raise into the listener
            self._conn.close()
