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

**Poll mode** (``?mode=poll``, with ``poll_interval=SECONDS``, default
:data:`DEFAULT_POLL_INTERVAL`) holds no connection at all between reads: each
read is one short connection that writes this process's heartbeat when one is
due and reads the log above its position (one indexed query on the primary
key), then closes. No LISTEN, no session state, no prepared statement, so it
works through PgBouncer in transaction mode and costs the database nothing
between polls; commands arrive within one interval instead of at once. It
is the PostgreSQL bus for fleets too large to hold one LISTEN backend per
process (each is a server process, a few MB, and counts against
``max_connections``); docs/broadcast.md gives the figures and the point where
Redis is the better choice.

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
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from ..deadlines import Deadline
from ..errors import ConfigurationError
from ..validation import brief_repr
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
from .polling import Entries, PollingSubscription

__all__ = ["DEFAULT_POLL_INTERVAL", "QUERY_DEADLINE", "SCHEMA", "PostgresBus"]

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
_INDEX_NAME = "sqla_rebalance_heartbeats_expiry"
#: Heartbeat clean-up and status reads by expiry: a range, not a scan.
_INDEX = f"""
CREATE INDEX IF NOT EXISTS {_INDEX_NAME}
    ON sqla_rebalance_heartbeats (channel, expires_at);
"""
SCHEMA += _INDEX
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
#: Poll mode: seconds between two reads of the log (each wait jittered by ±50 %).
DEFAULT_POLL_INTERVAL = 5.0
#: The bounds of ``poll_interval``: not a busy loop, not deaf for over an hour.
POLL_INTERVAL_RANGE = (0.1, 3600.0)
#: Heartbeat rows of processes gone for this long are deleted (by index).
_DEAD_ROWS_AFTER = "60 seconds"
#: Our own query parameters, taken out of the URL before libpq sees it.
_OWN_PARAMETERS = ("mode", "poll_interval")


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


def _own_parameters(url: str) -> tuple[str, dict[str, str]]:
    """Split ``mode=`` and ``poll_interval=`` from a bus URL (libpq refuses unknown ones)."""
    base, sep, query = url.partition("?")
    if not sep:
        return url, {}
    own: dict[str, str] = {}
    kept = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in _OWN_PARAMETERS:
            if key in own:
                raise ConfigurationError(f"bus URL parameter {key} is given more than once")
            own[key] = value
        else:
            kept.append((key, value))
    return (f"{base}?{urlencode(kept)}" if kept else base), own


def _poll_interval(raw: str | None) -> float | None:
    """``poll_interval=`` checked (the default when not given)."""
    if raw is None:
        return DEFAULT_POLL_INTERVAL
    low, high = POLL_INTERVAL_RANGE
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # also refuses nan
        raise ConfigurationError(
            f"bus URL parameter poll_interval must be a number of seconds in "
            f"[{low:g}, {high:g}], got {brief_repr(raw)}"
        )
    return value


class PostgresBus(Bus):
    schemes = ("postgresql", "postgres", "postgresql+psycopg")
    _schema_ok = False

    def __init__(self, url: str, channel: str = "sqla_rebalance") -> None:
        super().__init__(url, channel)
        self._libpq_url, own = _own_parameters(url)
        mode = own.get("mode", "listen")
        if mode not in ("listen", "poll"):
            raise ConfigurationError(
                f"bus URL parameter mode must be listen or poll, got {brief_repr(mode)}"
            )
        if "poll_interval" in own and mode != "poll":
            raise ConfigurationError("bus URL parameter poll_interval needs mode=poll")
        #: Seconds between two reads of the log in poll mode; None: listen mode.
        self.poll_interval = _poll_interval(own.get("poll_interval")) if mode == "poll" else None

    def connect(self, application_name: str = "sqla-rebalance") -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(
                _conninfo(self._libpq_url),
                autocommit=True,
                application_name=application_name,
                # No prepared statement: a pooler in transaction mode may hand
                # each statement to another server connection.
                prepare_threshold=None,
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
        if self._schema_ok:
            return
        if _tables_exist(conn):
            if not _exists(conn, _INDEX_NAME):  # tables made by an earlier version
                try:
                    with conn.transaction():
                        conn.execute(_INDEX)
                except psycopg.errors.InsufficientPrivilege as err:
                    log.warning(
                        "bus %s: cannot create the index %s (%s): heartbeat clean-up scans "
                        "the channel's rows; an administrator can run: %s",
                        self,
                        _INDEX_NAME,
                        err,
                        _INDEX.strip(),
                    )
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
        if self.poll_interval is not None:
            return _PollSubscription(self)
        return _PostgresSubscription(self)


def _host_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}"


def _exists(conn: psycopg.Connection[Any], name: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    return bool(row and row[0])


def _tables_exist(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT to_regclass('sqla_rebalance_commands') IS NOT NULL"
        " AND to_regclass('sqla_rebalance_heartbeats') IS NOT NULL"
    ).fetchone()
    return bool(row and row[0])


def _log_since(
    conn: psycopg.Connection[Any], channel: str, gen: int, limit: int
) -> list[tuple[int, bytes]]:
    """Logged entries above ``gen`` within the read ceiling, oldest first (one
    range of the primary key)."""
    ceiling = read_ceiling()
    if gen >= ceiling:
        return []
    try:
        rows = conn.execute(
            "SELECT gen, message FROM sqla_rebalance_commands"
            " WHERE channel = %s AND gen > %s AND gen <= %s ORDER BY gen LIMIT %s",
            (channel, gen, ceiling, limit),
        ).fetchall()
    except psycopg.errors.UndefinedTable:
        return []
    out = []
    for position, message in rows:
        checked = log_generation(position, gen, ceiling)
        if checked is not None:
            out.append((checked, str(message).encode("utf-8", "surrogateescape")))
    return out


def _log_head(conn: psycopg.Connection[Any], channel: str) -> int:
    """The highest generation a reader takes (within the read ceiling)."""
    return _generation(conn, channel, read_ceiling())


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
        try:
            with self._watch(self._conn):
                return _log_since(self._conn, self._bus.channel, gen, limit)
        except psycopg.Error as err:
            raise self._fail(err) from err

    def put_heartbeat(
        self, process: str, payload: bytes, ttl: float, acks: Sequence[Ack] = ()
    ) -> None:
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
        _write_heartbeat(self._conn, self._bus.channel, process, payload, ttl)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing must never raise into the listener
            self._conn.close()


def _write_heartbeat(
    conn: psycopg.Connection[Any], channel: str, process: str, payload: bytes, ttl: float
) -> None:
    conn.execute(
        "INSERT INTO sqla_rebalance_heartbeats (channel, process, payload, expires_at)"
        " VALUES (%s, %s, %s, now() + make_interval(secs => %s))"
        " ON CONFLICT (channel, process) DO UPDATE"
        " SET payload = excluded.payload, expires_at = excluded.expires_at",
        (channel, process, payload.decode(), ttl),
    )
    # Rows of processes gone for a minute: a range of the expiry index, not a
    # scan of the channel's rows.
    conn.execute(
        "DELETE FROM sqla_rebalance_heartbeats"
        f" WHERE channel = %s AND expires_at < now() - interval '{_DEAD_ROWS_AFTER}'",
        (channel,),
    )


class _PollSubscription(PollingSubscription):
    """Poll mode: a short connection per read, none held in between."""

    jitter = 0.5

    def __init__(self, bus: PostgresBus) -> None:
        self._bus = bus
        self.poll_interval = bus.poll_interval or DEFAULT_POLL_INTERVAL
        # Rarely: it is a second query in the same short session.
        self.head_check_every = max(30.0, self.poll_interval)
        #: The heartbeat to write at the next read: (process, payload, ttl).
        self._heartbeat: tuple[str, bytes, float] | None = None
        try:
            with self._session() as conn:
                try:
                    bus.ensure_schema(conn)
                except psycopg.errors.InsufficientPrivilege as err:
                    self._can_heartbeat = False
                    log.warning(
                        "bus %s: the bus tables are missing and this role cannot create "
                        "them (%s): no heartbeats, this process will not appear in status",
                        bus,
                        err,
                    )
                head = _log_head(conn, bus.channel)
        except psycopg.Error as err:
            raise self._bus._error(err) from err
        super().__init__(head)

    @contextlib.contextmanager
    def _session(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self._bus.connect("sqla-rebalance-poller")
        try:
            with _Watch("bus poll", _host_of(self._bus.url))(conn):
                yield conn
        finally:
            conn.close()

    def _read(self, seen: int, limit: int, head: bool) -> tuple[Entries, int | None]:
        try:
            with self._session() as conn:
                beat, self._heartbeat = self._heartbeat, None
                if beat is not None:
                    self._write_heartbeat(conn, *beat)
                rows = _log_since(conn, self._bus.channel, seen, limit)
                top = _log_head(conn, self._bus.channel) if head and not rows else None
        except psycopg.Error as err:
            raise self._bus._error(err) from err
        return rows, top

    def generation(self) -> int:
        try:
            with self._session() as conn:
                return _generation(conn, self._bus.channel, publish_ceiling())
        except psycopg.Error as err:
            raise self._bus._error(err) from err

    def since(self, gen: int, limit: int = LOG_LENGTH) -> list[tuple[int, bytes]]:
        try:
            with self._session() as conn:
                return _log_since(conn, self._bus.channel, gen, limit)
        except psycopg.Error as err:
            raise self._bus._error(err) from err

    def put_heartbeat(
        self, process: str, payload: bytes, ttl: float, acks: Sequence[Ack] = ()
    ) -> None:
        """Written with the next read when it comes within a second (one connection
        for both), else now."""
        if not self._can_heartbeat:
            return
        if self._next_poll - time.monotonic() <= 1.0:
            self._heartbeat = (process, payload, ttl)
            return
        try:
            with self._session() as conn:
                self._write_heartbeat(conn, process, payload, ttl)
        except psycopg.Error as err:
            raise self._bus._error(err) from err

    def _write_heartbeat(
        self, conn: psycopg.Connection[Any], process: str, payload: bytes, ttl: float
    ) -> None:
        try:
            _write_heartbeat(conn, self._bus.channel, process, payload, ttl)
        except psycopg.errors.InsufficientPrivilege as err:
            self.heartbeats_refused(self._bus, err)
