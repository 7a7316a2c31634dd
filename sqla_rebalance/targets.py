"""Pointing one connect at one host, per database and driver.

The pool decides *which* host a new connection goes to; this module makes the
driver go there. It wraps the engine's ``dialect.connect(*cargs, **cparams)``
(the last step of SQLAlchemy's creator, after every ``do_connect`` handler,
through ``_sa.wrap_dialect_connect``, the one place that replaces it):
there ``cparams`` is this connect's own copy, so concurrent connects to
different hosts cannot see each other's choice, and a user's ``do_connect``
handler (a rotating IAM token, say) keeps working unchanged.

What each connect should do travels in a :class:`~contextvars.ContextVar`
set by the pool around the connect (a context variable rather than a
thread-local, because under asyncio several greenlets connect in one thread).

TLS keeps verifying the name the user gave, not the address we picked:

- libpq (psycopg, psycopg2): ``host=name`` and ``hostaddr=address``; libpq
  connects to the address and checks the certificate against the name.
- PyMySQL: the connection is created with ``host=name`` and
  ``defer_connect=True``, then given a socket we opened to the address, so its
  TLS handshake still uses the name (``server_hostname=self.host``).
- Other drivers get the address as host (certificate checks against a name
  need that driver's own option).

Tested against real servers (tests/test_drivers.py): psycopg 3 (sync and
async), psycopg2, asyncpg, PyMySQL, mysqlclient, aiomysql and asyncmy.
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from . import _sa
from .hosts import PRIMARY, STANDBY, Host, HostSpec, parse_hosts

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import Dialect

__all__ = ["Adapter", "Target", "adapter_for", "current_target", "describe", "install"]


class Target:
    """One connect attempt: where it goes and what it is for."""

    __slots__ = ("applied", "choose", "host", "seed", "timeout")

    def __init__(
        self,
        host: Host | None,
        *,
        seed: Callable[[Adapter, tuple[Any, ...], dict[str, Any]], Host | None] | None = None,
        timeout: float | None = None,
    ) -> None:
        #: The chosen host; None until ``seed`` has learnt the hosts from the URL.
        self.host = host
        #: Called at the first connect of a pool that has no host list yet.
        self.seed = seed
        #: The driver's connect timeout (s) unless the user set one
        #: (``connect_deadline``, or the health check timeout for probes).
        self.timeout = timeout
        #: Set when the connect went through ``dialect.connect`` (not a custom creator).
        self.applied = False


_current: ContextVar[Target | None] = ContextVar("sqla_rebalance_target", default=None)


def current_target() -> ContextVar[Target | None]:
    """The context variable a pool sets around a connect."""
    return _current


def install(dialect: Dialect) -> None:
    """Point every connect of ``dialect`` at the host its :class:`Target` names
    (the dialect's ``connect`` is wrapped once, by ``_sa.wrap_dialect_connect``)."""
    adapter = adapter_for(dialect)

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def connect(*cargs: Any, **cparams: Any) -> Any:
            target = _current.get()
            if target is None:
                return original(*cargs, **cparams)
            target.applied = True
            if target.seed is not None:
                target.host = target.seed(adapter, cargs, cparams)
                target.seed = None
            host = target.host
            if host is None:  # hosts not managed (a Unix socket, hostaddr given...)
                return original(*cargs, **cparams)
            cargs, cparams = adapter.point(cargs, dict(cparams), host, target.timeout)
            return adapter.open(original, cargs, cparams, host)

        return connect

    _sa.wrap_dialect_connect(dialect, wrap)


def describe(dbapi_connection: Any) -> str:
    """``host:port`` of a connection the pool did not steer, as its driver reports it."""
    drv = getattr(dbapi_connection, "driver_connection", None) or dbapi_connection
    info = getattr(drv, "info", None)  # psycopg
    host = getattr(info, "host", None)
    port = getattr(info, "port", None)
    if host is None:  # pymysql, mysqlclient
        host = getattr(drv, "host", None)
        port = getattr(drv, "port", None)
    if not host or not isinstance(host, str):
        return "local"
    return f"{host}:{port}" if port else host


class Adapter:
    """How to read hosts from, and point, the connect arguments of one driver.

    The generic version handles drivers taking ``host`` and ``port`` keywords.
    """

    default_port: int | None = None
    #: Returns one row, one column: true on a standby (read-only) server.
    standby_sql: str | None = None
    #: ``hosts=`` entries are file paths (SQLite), not network hosts.
    paths = False

    def seed(self, cargs: Sequence[Any], cparams: dict[str, Any]) -> list[HostSpec] | None:
        """The URL's hosts; None when this connect cannot be steered."""
        host = cparams.get("host")
        if isinstance(host, (list, tuple)):  # asyncpg's multi-host form
            ports = cparams.get("port")
            ports = list(ports) if isinstance(ports, (list, tuple)) else [ports] * len(host)
            names = [str(h) for h in host]
        elif isinstance(host, str) and host:
            names = host.split(",")
            port_text = str(cparams.get("port") or "")
            ports = port_text.split(",") if port_text else [None]
            if len(ports) == 1:
                ports = ports * len(names)
        else:
            return None
        if any(not n or n.startswith("/") or n.startswith("@") for n in names):
            return None  # a Unix socket: nothing to choose
        if len(ports) != len(names):
            return None  # let the driver report its own error
        entries = []
        for name, port in zip(names, ports, strict=True):
            if port in (None, ""):
                entries.append(name)
            elif ":" in name and not name.startswith("["):  # an IPv6 literal
                entries.append(f"[{name}]:{port}")
            else:
                entries.append(f"{name}:{port}")
        return parse_hosts(entries, self.default_port)

    def point(
        self,
        cargs: tuple[Any, ...],
        cparams: dict[str, Any],
        host: Host,
        timeout: float | None,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        cparams["host"] = host.address or host.name
        if host.port is not None:
            cparams["port"] = host.port
        return cargs, cparams

    def open(
        self,
        connect: Callable[..., Any],
        cargs: tuple[Any, ...],
        cparams: dict[str, Any],
        host: Host,
    ) -> Any:
        return connect(*cargs, **cparams)

    def role(self, dbapi_connection: Any) -> str:
        """``primary`` or ``standby``, asked of a fresh or idle connection."""
        if self.standby_sql is None:
            return PRIMARY
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(self.standby_sql)
            row = cursor.fetchone()
        finally:
            cursor.close()
        # Leave no transaction open on a connection that goes back to the pool.
        dbapi_connection.rollback()
        return STANDBY if row and row[0] and row[0] not in ("0", "OFF") else PRIMARY

    def alive(self, dbapi_connection: Any) -> None:
        """``SELECT 1`` (after a rollback): raises if the connection does not work.

        For a server that cannot answer the role query (a compatible system or
        a proxy without ``pg_is_in_recovery()``, a role without the right to
        run it): with ``target_role="any"`` the role is only informational.
        """
        dbapi_connection.rollback()
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        finally:
            cursor.close()
        dbapi_connection.rollback()


class LibpqAdapter(Adapter):
    """psycopg 3 and psycopg2: libpq keywords, TLS verified against the name."""

    default_port = 5432
    standby_sql = "SELECT pg_is_in_recovery()"

    def seed(self, cargs: Sequence[Any], cparams: dict[str, Any]) -> list[HostSpec] | None:
        if cparams.get("hostaddr"):
            return None  # the user pinned the address: leave it alone
        return super().seed(cargs, cparams)

    def point(
        self,
        cargs: tuple[Any, ...],
        cparams: dict[str, Any],
        host: Host,
        timeout: float | None,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        cparams["host"] = host.name
        if host.address is not None and host.address != host.name:
            cparams["hostaddr"] = host.address
        else:
            cparams.pop("hostaddr", None)
        if host.port is not None:
            cparams["port"] = str(host.port)
        # One host per connect: libpq's own host shuffling has nothing to do.
        cparams.pop("load_balance_hosts", None)
        if timeout is not None:
            # libpq takes whole seconds and treats values below 2 as 2.
            cparams.setdefault("connect_timeout", str(max(2, round(timeout))))
        return cargs, cparams


class AsyncpgAdapter(Adapter):
    default_port = 5432
    standby_sql = "SELECT pg_is_in_recovery()"

    def point(
        self,
        cargs: tuple[Any, ...],
        cparams: dict[str, Any],
        host: Host,
        timeout: float | None,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        cargs, cparams = super().point(cargs, cparams, host, None)
        if timeout is not None:
            cparams.setdefault("timeout", timeout)
        return cargs, cparams


class MySQLAdapter(Adapter):
    """MySQL and MariaDB drivers (aiomysql, asyncmy; mysqlclient and PyMySQL below)."""

    default_port = 3306
    standby_sql = "SELECT @@global.read_only"

    def seed(self, cargs: Sequence[Any], cparams: dict[str, Any]) -> list[HostSpec] | None:
        if cparams.get("unix_socket"):
            return None
        return super().seed(cargs, cparams)

    def point(
        self,
        cargs: tuple[Any, ...],
        cparams: dict[str, Any],
        host: Host,
        timeout: float | None,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        cargs, cparams = super().point(cargs, cparams, host, None)
        if timeout is not None:
            cparams.setdefault("connect_timeout", timeout)
        return cargs, cparams


class MySQLdbAdapter(MySQLAdapter):
    """mysqlclient: its ``connect_timeout`` is whole seconds (a float is a TypeError)."""

    def point(
        self,
        cargs: tuple[Any, ...],
        cparams: dict[str, Any],
        host: Host,
        timeout: float | None,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        whole = None if timeout is None else max(1, math.ceil(timeout))
        return super().point(cargs, cparams, host, whole)

    def open(
        self,
        connect: Callable[..., Any],
        cargs: tuple[Any, ...],
        cparams: dict[str, Any],
        host: Host,
    ) -> Any:
        conn = connect(*cargs, **cparams)
        # mysqlclient refuses every call (fileno() too) while another thread runs a
        # query on the connection: remember its socket for abandon() (see socket_fd).
        with contextlib.suppress(Exception):
            conn._sqla_rebalance_fd = conn.fileno()
        return conn


class PyMySQLAdapter(MySQLAdapter):
    """PyMySQL: connect to the address, but keep the name for TLS."""

    def point(
        self,
        cargs: tuple[Any, ...],
        cparams: dict[str, Any],
        host: Host,
        timeout: float | None,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        cargs, cparams = super().point(cargs, cparams, host, timeout)
        if host.address is not None and host.address != host.name:
            cparams["host"] = host.name
            cparams["defer_connect"] = True
        return cargs, cparams

    def open(
        self,
        connect: Callable[..., Any],
        cargs: tuple[Any, ...],
        cparams: dict[str, Any],
        host: Host,
    ) -> Any:
        if not cparams.get("defer_connect") or host.address is None:
            return connect(*cargs, **cparams)
        import pymysql.err

        conn = connect(*cargs, **cparams)
        port = host.port or self.default_port
        try:
            sock = socket.create_connection((host.address, port), cparams.get("connect_timeout"))
        except OSError as err:
            # What PyMySQL itself raises, so SQLAlchemy sees a DBAPI error.
            raise pymysql.err.OperationalError(
                2003, f"Can't connect to MySQL server on {host.key!r} ({err})"
            ) from err
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conn.connect(sock)
        return conn


class SQLiteAdapter(Adapter):
    """SQLite: each "host" is a database file (demos and tests of rotation)."""

    paths = True

    def seed(self, cargs: Sequence[Any], cparams: dict[str, Any]) -> list[HostSpec] | None:
        return None  # one file: nothing to rotate unless hosts= lists files

    def point(
        self,
        cargs: tuple[Any, ...],
        cparams: dict[str, Any],
        host: Host,
        timeout: float | None,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if "database" in cparams:
            cparams["database"] = host.name
            return cargs, cparams
        return (host.name, *cargs[1:]), cparams


def adapter_for(dialect: Dialect) -> Adapter:
    name = dialect.name
    driver = getattr(dialect, "driver", "")
    if name == "postgresql":
        if driver in ("psycopg", "psycopg_async", "psycopg2", "psycopg2cffi"):
            return LibpqAdapter()
        return AsyncpgAdapter()
    if name in ("mysql", "mariadb"):
        if driver == "pymysql":
            return PyMySQLAdapter()
        return MySQLdbAdapter() if driver == "mysqldb" else MySQLAdapter()
    if name == "sqlite":
        return SQLiteAdapter()
    return Adapter()
