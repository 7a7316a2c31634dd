"""The PostgreSQL bus (``postgresql://`` URLs, libpq form; needs psycopg 3.2+).

Two tables, created on first use (``CREATE TABLE IF NOT EXISTS``, so the bus
role needs ``CREATE`` on its schema once, or an administrator runs
:data:`SCHEMA` beforehand):

- ``sqla_rebalance_commands``: the durable log, one row per command;
- ``sqla_rebalance_heartbeats``: each live process's status, with an expiry.

A publish is one transaction: a transaction-scoped advisory lock (so that
publishers never interleave), the next generation, the log row and
``pg_notify(channel, message)``. PostgreSQL delivers the notification only
if that transaction commits, so a listener never hears of a command that is
not in the log. Each listening process holds one autocommit connection
(``application_name`` ``sqla-rebalance-listener``) and also writes its
heartbeats through it.

Every statement runs under a :class:`~sqla_rebalance.deadlines.Deadline`
(:data:`QUERY_DEADLINE`): a server that hangs (TCP still acknowledged, so
keepalives and ``tcp_user_timeout`` never fire) gets its socket shut down
locally, the statement fails and the listener reconnects, instead of waiting
for the thaw. Waiting for notifications is not a statement: it has its own
timeout.

What is read back is untrusted: generations are read within ``now + 1 day``
(publishing) or ``now + 2 days`` (listening), so a junk row at
``gen = 2**63-1`` neither makes the next publish fail ("bigint out of
range") nor hides the commands after it.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from ..deadlines import Deadline
from .base import (
    LOG_LENGTH,
    Bus,
    BusUnavailableError,
    Subscription,
    log_generation,
    next_generation,
    publish_ceiling,
    read_ceiling,
)

__all__ = ["QUERY_DEADLINE", "SCHEMA", "PostgresBus"]

log = logging.getLogger("sqla_rebalance.bus")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sqla_rebalance_commands (
    channel text NOT NULL,
    gen bigint NOT NULL,
    message text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, gen)
);
CREATE TABLE IF NOT EXISTS sqla_rebalance_heartbeats (
    channel text NOT NULL,
    process text NOT NULL,
    payload text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (channel, process)
);
"""
#: Advisory lock key that serialises publishers (and schema creation).
_LOCK_KEY = 0x5F5152424C  # "_QRBL"
#: Connection options: fail fast, and notice a dead server on an idle
#: LISTEN connection within about 20 s (TCP keepalives, user timeout).
_OPTIONS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 2,
    "tcp_user_timeout": 15000,
}

#: Seconds a bus statement may take before its connection is abandoned.
QUERY_DEADLINE = 10.0


class _Watch:
    """Statements on one connection, each under a deadline (see the module docstring)."""

    def __init__(self, what: str, host: str) -> None:
        self.what = what
        self.host = host
        self.missed = False

    @contextlib.contextmanager
    def __call__(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        with Deadline(self.what, self.host, QUERY_DEADLINE, self._miss, conn) as deadline:
            try:
                yield
            except psycopg.Error as err:
                if deadline.expired:  # our doing: say why the socket was shut
                    raise psycopg.OperationalError(str(deadline.error())) from err
                raise

    def _miss(self, deadline: Deadline) -> None:  # worker thread: bookkeeping only
        self.missed = True


def _conninfo(url: str) -> str:
    """A libpq URL: SQLAlchemy's ``postgresql+psycopg://`` is accepted too."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql"))


class PostgresBus(Bus):
    schemes = ("postgresql", "postgres", "postgresql+psycopg")
    _schema_ok = False

    def connect(self, application_name: str = "sqla-rebalance") -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(
                _conninfo(self.url),
                autocommit=True,
                application_name=application_name,
                **_OPTIONS,
            )
        except psycopg.Error as err:
            raise self._error(err) from err

    def _error(self, err: Exception) -> BusUnavailableError:
        return self.error("postgresql", err)

    def ensure_schema(self, conn: psycopg.Connection[Any]) -> None:
        """Create the tables if they are missing.

        Looked up first: PostgreSQL checks the ``CREATE`` privilege even for
        ``CREATE TABLE IF NOT EXISTS`` on a table that exists, and a role
        that only publishes or listens need not have it once an
        administrator has run :data:`SCHEMA`.
        """
        if self._schema_ok or _tables_exist(conn):
            self._schema_ok = True
            return
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            conn.execute(SCHEMA)
        self._schema_ok = True

    def publish(self, build: Callable[[int], bytes]) -> tuple[int, int | None]:
        with self._session() as conn:
            self.ensure_schema(conn)
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                # Rows beyond now + 1 day are junk: not continued from (bigint overflow).
                gen = next_generation(_generation(conn, self.channel, publish_ceiling()))
                data = build(gen).decode("ascii")
                conn.execute(
                    "INSERT INTO sqla_rebalance_commands (channel, gen, message)"
                    " VALUES (%s, %s, %s)",
                    (self.channel, gen, data),
                )
                conn.execute(
                    "DELETE FROM sqla_rebalance_commands WHERE channel = %s AND gen < ("
                    " SELECT gen FROM sqla_rebalance_commands WHERE channel = %s"
                    " ORDER BY gen DESC OFFSET %s LIMIT 1)",
                    (self.channel, self.channel, LOG_LENGTH - 1),
                )
                conn.execute("SELECT pg_notify(%s, %s)", (self.channel, data))
        return gen, None

    @contextlib.contextmanager
    def _session(self) -> Iterator[psycopg.Connection[Any]]:
        """A short-lived connection; driver errors become BusUnavailableError."""
        conn = self.connect()
        try:
            with _Watch("bus statement", _host_of(self.url))(conn):
                yield conn
        except psycopg.Error as err:
            raise self._error(err) from err
        finally:
            conn.close()

    def generation(self) -> int:
        with self._session() as conn:
            return _generation(conn, self.channel, publish_ceiling())

    def heartbeats(self) -> list[bytes]:
        with self._session() as conn:
            if not _tables_exist(conn):
                return []
            rows = conn.execute(
                "SELECT payload FROM sqla_rebalance_heartbeats"
                " WHERE channel = %s AND expires_at > now() ORDER BY process",
                (self.channel,),
            ).fetchall()
        return [str(r[0]).encode() for r in rows]

    def subscribe(self) -> Subscription:
        return _PostgresSubscription(self)


def _host_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}"


def _tables_exist(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT to_regclass('sqla_rebalance_commands') IS NOT NULL"
        " AND to_regclass('sqla_rebalance_heartbeats') IS NOT NULL"
    ).fetchone()
    return bool(row and row[0])


def _generation(conn: psycopg.Connection[Any], channel: str, ceiling: int) -> int:
    """The highest generation in the log up to ``ceiling`` (0: none)."""
    try:
        row = conn.execute(
            "SELECT coalesce(max(gen), 0) FROM sqla_rebalance_commands"
            " WHERE channel = %s AND gen <= %s",
            (channel, ceiling),
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return (log_generation(row[0], 0, ceiling) or 0) if row else 0


class _PostgresSubscription(Subscription):
    def __init__(self, bus: PostgresBus) -> None:
        self._bus = bus
        self._conn = bus.connect("sqla-rebalance-listener")
        self._buffer: deque[bytes] = deque()
        self._watch = _Watch("bus listener statement", _host_of(bus.url))
        try:
            try:
                with self._watch(self._conn):
                    bus.ensure_schema(self._conn)
            except psycopg.errors.InsufficientPrivilege as err:
                # A listener may be read-only; heartbeats need the table.
                self._can_heartbeat = False
                log.warning(
                    "bus %s: the bus tables are missing and this role cannot create them "
                    "(%s): no heartbeats, this process will not appear in status",
                    bus,
                    err,
                )
            with self._watch(self._conn):
                self._conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(bus.channel)))
        except psycopg.Error as err:
            self.close()
            raise self._fail(err) from err

    def _fail(self, err: Exception) -> BusUnavailableError:
        return self._bus._error(err)

    def get(self, timeout: float) -> bytes | None:
        if not self._buffer:
            try:
                # Run the generator to its end: notifications that arrive in
                # one packet come together, and leaving the loop at the first
                # one would drop the others.
                for notify in self._conn.notifies(timeout=timeout, stop_after=1):
                    self._buffer.append(notify.payload.encode("utf-8", "surrogateescape"))
            except psycopg.Error as err:
                raise self._fail(err) from err
            if self._conn.closed:
                raise self._fail(RuntimeError("connection closed"))
        return self._buffer.popleft() if self._buffer else None

    def generation(self) -> int:
        try:
            with self._watch(self._conn):
                return _generation(self._conn, self._bus.channel, publish_ceiling())
        except psycopg.Error as err:
            raise self._fail(err) from err

    def since(self, gen: int, limit: int = LOG_LENGTH) -> list[tuple[int, bytes]]:
        ceiling = read_ceiling()
        if gen >= ceiling:
            return []
        try:
            with self._watch(self._conn):
                rows = self._conn.execute(
                    "SELECT gen, message FROM sqla_rebalance_commands"
                    " WHERE channel = %s AND gen > %s AND gen <= %s ORDER BY gen LIMIT %s",
                    (self._bus.channel, gen, ceiling, limit),
                ).fetchall()
        except psycopg.errors.UndefinedTable:
            return []
        except psycopg.Error as err:
            raise self._fail(err) from err
        out = []
        for position, message in rows:
            checked = log_generation(position, gen, ceiling)
            if checked is not None:
                out.append((checked, str(message).encode("utf-8", "surrogateescape")))
        return out

    def put_heartbeat(self, process: str, payload: bytes, ttl: float) -> None:
        if not self._can_heartbeat:
            return
        try:
            with self._watch(self._conn):
                self._put_heartbeat(process, payload, ttl)
        except psycopg.errors.InsufficientPrivilege as err:
            self.heartbeats_refused(self._bus, err)
        except psycopg.Error as err:
            raise self._fail(err) from err

    def _put_heartbeat(self, process: str, payload: bytes, ttl: float) -> None:
        self._conn.execute(
            "INSERT INTO sqla_rebalance_heartbeats (channel, process, payload, expires_at)"
            " VALUES (%s, %s, %s, now() + make_interval(secs => %s))"
            " ON CONFLICT (channel, process) DO UPDATE"
            " SET payload = excluded.payload, expires_at = excluded.expires_at",
            (self._bus.channel, process, payload.decode(), ttl),
        )
        # Expired rows of processes that are gone; cheap with few rows.
        self._conn.execute(
            "DELETE FROM sqla_rebalance_heartbeats"
            " WHERE channel = %s AND expires_at < now() - interval '1 hour'",
            (self._bus.channel,),
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing must never raise into the listener
            self._conn.close()
