"""Deadlines for the network operations a pool starts, and abandoning a hung connection.

A host that *hangs* (a frozen VM, a partitioned zone) still completes TCP
handshakes in its kernel and acknowledges data, so a driver call to it waits
for a reply that never comes: a refused connection is detected in
milliseconds, a hung one only by a clock. Every connect, health check and
role query the pool starts is therefore watched by a :class:`Deadline`: a
timer of the process-wide worker (``worker.call_later``) that fires when the
operation is still running after ``timeout`` seconds, and again every
``timeout`` seconds after that while it still runs. Each firing is one host
failure (``"deadline exceeded"``): the host turns *suspect* at once, so new
connections go elsewhere, and *down* after ``unhealthy_threshold`` firings.

The timer callback runs on the worker thread, so it only does local things:
bookkeeping and :func:`abandon`, which shuts the connection's socket down.
That is a local system call (it never waits on the peer), and it makes a
thread blocked reading from the socket return at once with an error, so the
connection can be invalidated and its thread freed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any

from .errors import DeadlineExceeded
from .worker import Timer, get_worker

__all__ = ["Deadline", "abandon", "socket_fd"]

log = logging.getLogger("sqla_rebalance.deadlines")


class Deadline:
    """One network operation to one host, watched until :meth:`finish`."""

    __slots__ = (
        "_abandoned",
        "_on_miss",
        "_timer",
        "conn",
        "finished",
        "host",
        "misses",
        "started",
        "timeout",
        "what",
    )

    def __init__(
        self,
        what: str,
        host: str | None,
        timeout: float,
        on_miss: Callable[[Deadline], None],
        conn: Any = None,
    ) -> None:
        #: "connect", "health check", "probe", "role query"...
        self.what = what
        self.host = host
        self.timeout = timeout
        #: The DBAPI connection the operation runs on, if any: abandoned on the first miss.
        self.conn = conn
        self.started = time.monotonic()
        #: How many times the deadline fired while the operation ran.
        self.misses = 0
        self.finished = False
        self._abandoned = False
        # Held weakly: a pending timer must not keep a disposed pool alive.
        ref = weakref.WeakMethod(on_miss)
        self._on_miss: Callable[[], Callable[[Deadline], None] | None] = ref
        self._timer: Timer = get_worker().call_later(timeout, self._fire)

    @property
    def expired(self) -> bool:
        """Did the operation miss its deadline (its failure is already counted)?"""
        return self.misses > 0

    def age(self) -> float:
        """Seconds since the operation started."""
        return time.monotonic() - self.started

    def error(self) -> DeadlineExceeded:
        return DeadlineExceeded(self.what, self.host, self.timeout * max(1, self.misses))

    def abandon(self) -> None:
        """After a miss: shut the socket of ``conn`` (once), so that a thread blocked
        on it returns. Called again when ``conn`` is set after a miss."""
        if self.misses and self.conn is not None and not self._abandoned:
            self._abandoned = True
            abandon(self.conn)

    def finish(self) -> None:
        """The operation returned (or failed): stop watching it."""
        self.finished = True
        self._timer.cancel()
        self.conn = None  # a cancelled timer waits in the heap until its time: hold nothing

    def _fire(self) -> float | None:
        # Worker thread: local work only.
        if self.finished:
            return None
        self.misses += 1
        self.abandon()
        on_miss = self._on_miss()
        if on_miss is None:  # the pool is gone
            return None
        on_miss(self)
        return self.timeout

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def socket_fd(dbapi_connection: Any) -> int | None:
    """The socket file descriptor under a DBAPI connection, if it has one."""
    conn = getattr(dbapi_connection, "driver_connection", None) or dbapi_connection
    # Lambdas: each attribute is looked up only when tried (drivers differ).
    getters: tuple[Callable[[], Any], ...] = (
        lambda: conn.fileno(),  # noqa: PLW0108 - psycopg, psycopg2, mysqlclient
        # mysqlclient while a query runs (fileno() raises then), as recorded at
        # connect by targets.MySQLdbAdapter; ``open`` is read without its lock.
        lambda: conn._sqla_rebalance_fd if conn.open else None,
        lambda: conn.pgconn.socket,  # psycopg (closed fileno() raises)
        lambda: conn._sock.fileno(),  # noqa: PLW0108 - PyMySQL
        lambda: conn._transport.get_extra_info("socket").fileno(),  # asyncpg
        lambda: conn._writer.transport.get_extra_info("socket").fileno(),  # aiomysql, asyncmy
    )
    for get in getters:
        try:
            fd = get()
        except Exception:
            continue
        if isinstance(fd, int) and fd >= 0:
            return fd
    return None


def abandon(dbapi_connection: Any) -> bool:
    """Shut down the socket of ``dbapi_connection`` without waiting on the peer.

    A thread blocked on the connection gets an error at once; a later
    ``close()`` finds a dead socket and returns without a network wait. The
    descriptor itself stays open (the driver still owns it and closes it).
    Returns False when the connection has no socket (SQLite) or it was closed.
    """
    fd = socket_fd(dbapi_connection)
    if fd is None:
        return False
    try:
        dup = os.dup(fd)
    except OSError:
        return False
    try:
        sock = socket.socket(fileno=dup)
    except OSError:  # not a socket
        os.close(dup)
        return False
    with sock, contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
        return True
    return False
