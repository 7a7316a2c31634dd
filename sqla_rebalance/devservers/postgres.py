"""PostgreSQL: independent servers (:class:`PostgresCluster`) and a streaming-replication pair
(:class:`PostgresReplicaPair`), each server a :class:`PostgresServer`.

``initdb`` runs once into a template that is copied for every instance. PostgreSQL refuses to run
as root: as root, every PostgreSQL program runs as the ``postgres`` system user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from urllib.parse import quote

from ._cluster import _Cluster
from ._common import (
    _UNIX_SOCKET_PATH_MAX,
    APP_DATABASE,
    APP_PASSWORD,
    APP_USER,
    START_TIMEOUT,
    STOP_TIMEOUT,
    _account,
    _chown,
    _copy_trees,
    _optional_module,
    _poll,
    _run_as,
)
from ._process import _ServerProcess, _start_all

INSTALL_HINT = (
    "install them with scripts/install-system-deps.sh (Debian: apt-get install postgresql)"
)
PORT_ENV = "SQLA_REBALANCE_PG_PORT"
BINDIR_ENV = "SQLA_REBALANCE_PG_BINDIR"
FIRST_ADDRESS = "127.0.0.2"  # PostgresCluster: 127.0.0.2, .3, ...
REPLICA_ADDRESS = "127.0.0.8"  # PostgresReplicaPair: primary .8, standby .9

# Settings shared by every instance (written once into the template's postgresql.conf).
COMMON_SETTINGS: dict[str, str] = {
    "max_connections": "200",
    "shared_buffers": "16MB",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "huge_pages": "off",
    # In the data directory (removed with it), not as /dev/shm/PostgreSQL.* files that a
    # crash-like stop leaves behind.
    "dynamic_shared_memory_type": "mmap",
    "password_encryption": "scram-sha-256",
    "logging_collector": "off",
    "log_destination": "stderr",
    "log_line_prefix": "%m [%p] %q%u@%d ",
    "lc_messages": "C",
    "timezone": "UTC",
}
INSTANCE_CONF = "sqla_rebalance.conf"  # per-instance settings (address, port, socket, extras)

# Extra settings of both servers of a PostgresReplicaPair.
REPLICA_SETTINGS: dict[str, str] = {
    # Walsenders only send flushed WAL: with asynchronous commit a row reaches the standby up to
    # wal_writer_delay (200 ms) late. fsync is off, so a synchronous local flush costs nothing.
    "synchronous_commit": "on",
    # Keep WAL (1 MB segments) for a standby that was stopped for a while.
    "wal_keep_size": "64MB",
    # A standby whose primary came back reconnects within 0.1 s (default: 5 s).
    "wal_retrieve_retry_interval": "100ms",
}

PG_HBA = """\
# Written by sqla_rebalance.devservers
# TYPE  DATABASE     USER      ADDRESS        METHOD
local   all          postgres                 trust
local   all          all                      scram-sha-256
host    all          all       127.0.0.0/8    scram-sha-256
host    replication  all       127.0.0.0/8    scram-sha-256
"""

BOOTSTRAP_SQL = f"""\
CREATE ROLE {APP_USER} LOGIN SUPERUSER PASSWORD '{APP_PASSWORD}';
CREATE DATABASE {APP_DATABASE} OWNER {APP_USER};
"""

STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


# --------------------------------------------------------------------------- helpers


def find_pg_bindir() -> Path:
    """The directory with the PostgreSQL server programs; RuntimeError if there is none."""
    needed = ("initdb", "postgres")

    def usable(directory: Path) -> bool:
        return all(os.access(directory / name, os.X_OK) for name in needed)

    override = os.environ.get(BINDIR_ENV)
    if override:
        if usable(Path(override)):
            return Path(override)
        raise RuntimeError(
            f"{BINDIR_ENV}={override!r} does not contain {' and '.join(needed)}; {INSTALL_HINT}"
        )

    def version_key(path: Path) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in path.parent.name.split("."))
        except ValueError:
            return (-1,)

    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version_key, reverse=True)
    candidates = [d for d in debian if usable(d)]
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            candidates.append(Path(out))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for candidate in candidates:
        if usable(candidate):
            return candidate
    raise RuntimeError(f"PostgreSQL server programs (initdb, postgres) not found; {INSTALL_HINT}")


def _psycopg() -> ModuleType | None:
    """psycopg if installed (optional): a real ``app`` login is the best readiness check."""
    return _optional_module("psycopg")


def _pg_account() -> pwd.struct_passwd | None:
    return _account("postgres", "PostgreSQL (PostgreSQL refuses to run as root)", INSTALL_HINT)


def _run_pg(argv: list[str], what: str, *, cwd: Path, stdin: str | None = None) -> str:
    """Run a PostgreSQL program as the PostgreSQL account; RuntimeError with output on failure."""
    return _run_as(_pg_account(), argv, what, cwd=cwd, stdin=stdin)


def _conf_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _conninfo_value(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _write_settings(path: Path, settings: Mapping[str, str], *, append: bool) -> None:
    lines = [f"{name} = {_conf_value(value)}\n" for name, value in settings.items()]
    with path.open("a" if append else "w") as f:
        if append:
            f.write("\n# --- sqla_rebalance.devservers ---\n")
        f.writelines(lines)


# --------------------------------------------------------------------------- PostgreSQL


class PostgresServer(_ServerProcess):
    """One PostgreSQL instance listening on ``host:port`` only.

    ``directory`` holds ``data/`` (the data directory, already initialised, e.g. by
    :class:`PostgresCluster`), ``sock/`` (its Unix socket directory) and ``postgres.log``.
    """

    kind = "PostgreSQL"
    stop_signals = STOP_SIGNALS
    # Immediate shutdown (backends get SIGQUIT), and as a last resort SIGKILL.
    escalation = (signal.SIGQUIT,)

    def __init__(
        self,
        host: str,
        port: int,
        directory: str | os.PathLike[str],
        *,
        settings: Mapping[str, str] | None = None,
        bindir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.directory = Path(directory)
        self.settings = dict(settings or {})
        self._bindir = Path(bindir) if bindir is not None else None
        self._proc = None

    # ----------------------------------------------------------------- paths and addresses

    @property
    def datadir(self) -> Path:
        return self.directory / "data"

    @property
    def socket_dir(self) -> Path:
        return self.directory / "sock"

    @property
    def logfile(self) -> Path:
        return self.directory / "postgres.log"

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_pg_bindir()
        return self._bindir

    def url(
        self,
        driver: str | None = "psycopg",
        user: str = APP_USER,
        password: str = APP_PASSWORD,
        database: str = APP_DATABASE,
    ) -> str:
        """A SQLAlchemy URL (``driver=None`` gives a plain ``postgresql://`` URL)."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"{scheme}://{auth}@{self.host}:{self.port}/{quote(database, safe='')}"

    def dsn(
        self, user: str = APP_USER, password: str = APP_PASSWORD, database: str = APP_DATABASE
    ) -> str:
        """A libpq conninfo string (for psycopg.connect, psql, ...)."""
        parts = {
            "host": self.host,
            "port": str(self.port),
            "user": user,
            "password": password,
            "dbname": database,
        }
        return " ".join(f"{key}={_conninfo_value(value)}" for key, value in parts.items())

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<PostgresServer {self.address} {state} {self.directory}>"

    # ----------------------------------------------------------------- lifecycle

    def stop(self, mode: str = "fast", timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server like a host going away.

        ``mode`` is PostgreSQL's shutdown mode: ``"smart"`` waits for clients to disconnect,
        ``"fast"`` (default) terminates sessions, ``"immediate"`` quits without a checkpoint
        (crash-like). Returns once the postmaster and all its backends have exited.
        """
        super().stop(mode, timeout)

    # ----------------------------------------------------------------- internals

    def _write_instance_conf(self) -> None:
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "cluster_name": f"sqla-rebalance-{self.host}",
            **self.settings,
        }
        path = self.datadir / INSTANCE_CONF
        _write_settings(path, settings, append=False)
        _chown(_pg_account(), path)

    def _launch(self) -> None:
        if not (self.datadir / "PG_VERSION").exists():
            raise RuntimeError(f"{self.datadir} is not an initialised PostgreSQL data directory")
        socket_path = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(str(socket_path)) > _UNIX_SOCKET_PATH_MAX:
            raise RuntimeError(f"Unix socket path too long ({socket_path}); use a shorter base_dir")
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        _chown(_pg_account(), self.socket_dir)
        self._write_instance_conf()
        argv = [str(self.bindir / "postgres"), "-D", str(self.datadir)]
        self._spawn(argv, cwd=self.directory, account=_pg_account())

    def _ready(self) -> bool:
        """True once the server accepts an ``app`` login over TCP."""
        psycopg = _psycopg()
        if psycopg is not None:
            try:
                conn = psycopg.connect(self.dsn(), connect_timeout=5, autocommit=True)
            except psycopg.Error:
                return False
            conn.close()
            return True
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                pass
        except OSError:
            return False
        isready = [str(self.bindir / "pg_isready"), "-q", "-t", "5"]
        isready += ["-h", self.host, "-p", str(self.port)]
        return subprocess.run(isready, check=False, timeout=30).returncode == 0

    def _in_recovery(self) -> bool:
        """``SELECT pg_is_in_recovery()`` as ``app`` (psycopg if installed, else psql)."""
        sql = "select pg_is_in_recovery()"
        psycopg = _psycopg()
        if psycopg is not None:
            with psycopg.connect(self.dsn(), connect_timeout=5, autocommit=True) as conn:
                row = conn.execute(sql).fetchone()
            return bool(row and row[0])
        env = {**os.environ, "PGCONNECT_TIMEOUT": "5"}
        out = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-At", "-d", self.dsn(), "-c", sql],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            env=env,
        ).stdout
        return out.strip() == "t"


def _init_pg_template(bindir: Path, template: Path) -> None:
    """initdb into ``template`` (a new directory) with the common settings, pg_hba.conf and the
    ``app`` role and database; owned by the PostgreSQL account."""
    shutil.rmtree(template, ignore_errors=True)
    _run_pg(
        [
            str(bindir / "initdb"),
            "-D",
            str(template),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--wal-segsize=1",  # 1 MB WAL segments: smaller copies
        ],
        "initdb",
        cwd=template.parent,
    )
    _write_settings(template / "postgresql.conf", COMMON_SETTINGS, append=True)
    with (template / "postgresql.conf").open("a") as f:
        f.write(f"include_if_exists = '{INSTANCE_CONF}'\n")
    (template / "pg_hba.conf").write_text(PG_HBA)
    single_user = [str(bindir / "postgres"), "--single", "-F", "-c", "exit_on_error=on"]
    _run_pg(
        [*single_user, "-D", str(template), "postgres"],
        "creating the app role and database (single-user mode)",
        cwd=template.parent,
        stdin=BOOTSTRAP_SQL,
    )


# --------------------------------------------------------------------------- clusters


class PostgresCluster(_Cluster[PostgresServer]):
    """``n`` independent PostgreSQL servers on 127.0.0.2, 127.0.0.3, ... sharing one port.

    Not replicas of each other: independent databases that look like ``n`` hosts. The data lives
    under ``base_dir`` (default: a fresh temporary directory, removed again by :meth:`stop`).
    ``port`` defaults to ``$SQLA_REBALANCE_PG_PORT`` or a port that is free on every address.
    ``settings`` are extra ``postgresql.conf`` settings for every instance.
    """

    kind = "PostgreSQL"
    port_env = PORT_ENV
    first_address = FIRST_ADDRESS
    dir_prefix = "sqla-rebalance-pg-"
    server_dir_prefix = "pg"

    def _new_server(
        self, host: str, directory: Path, settings: Mapping[str, str] | None
    ) -> PostgresServer:
        return PostgresServer(host, self.port, directory, settings=settings)

    def _prepare(self) -> None:
        bindir = find_pg_bindir()
        for server in self.servers:
            server._bindir = bindir

    def _create(self) -> None:
        """initdb once into ``template/``, then ``cp -a`` it for every instance."""
        _chown(_pg_account(), self.base_dir)
        template = self.base_dir / "template"
        _init_pg_template(self.servers[0].bindir, template)
        for server in self.servers:
            shutil.rmtree(server.directory, ignore_errors=True)
            server.directory.mkdir(mode=0o700)
            _chown(_pg_account(), server.directory)
        _copy_trees(template, (server.datadir for server in self.servers))
        shutil.rmtree(template, ignore_errors=True)


class PostgresReplicaPair(_Cluster[PostgresServer]):
    """A PostgreSQL primary on 127.0.0.8 and its streaming-replication hot standby on 127.0.0.9.

    Both listen on the same port (default ``$SQLA_REBALANCE_PG_PORT`` or a free one); the standby
    is made by ``pg_basebackup -R`` from the running primary. :meth:`promote` turns the standby
    into a primary; :meth:`ensure_layout` (run before every test by the ``pg_replica_pair``
    fixture) restores the original layout: both running, the standby a fresh copy of the primary
    if it had been promoted.
    """

    kind = "PostgreSQL"
    port_env = PORT_ENV
    first_address = REPLICA_ADDRESS
    dir_prefix = "sqla-rebalance-pgrepl-"
    server_dir_prefix = "pg"

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        *,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(2, base_dir, port, settings={**REPLICA_SETTINGS, **(settings or {})})

    @property
    def primary(self) -> PostgresServer:
        return self.servers[0]

    @property
    def standby(self) -> PostgresServer:
        return self.servers[1]

    def is_promoted(self) -> bool:
        """True when the standby is no longer a standby (promotion removes ``standby.signal``)."""
        return not (self.standby.datadir / "standby.signal").exists()

    def promote(self, timeout: float = START_TIMEOUT) -> None:
        """``pg_ctl promote`` the standby; returns once ``pg_is_in_recovery()`` is false there."""
        standby = self.standby
        if not standby.is_running():
            raise RuntimeError(f"cannot promote the standby {standby.address}: it is not running")
        pg_ctl = str(standby.bindir / "pg_ctl")
        argv = [pg_ctl, "promote", "-D", str(standby.datadir), "-w", "-t", str(int(timeout))]
        _run_pg(argv, "pg_ctl promote", cwd=self.base_dir)
        if not _poll(lambda: not standby._in_recovery(), time.monotonic() + timeout):
            raise standby._start_failure("is still in recovery after pg_ctl promote")

    def ensure_layout(self, timeout: float = START_TIMEOUT) -> None:
        """Back to a running primary and a running, streaming standby of it.

        A promoted standby is stopped and rebuilt from the primary (about 0.5 s); stopped
        servers are started.
        """
        if not self._started:
            self.start(timeout)
            return
        deadline = time.monotonic() + timeout
        if not self.primary.is_running():
            _start_all([self.primary], deadline)
        if self.is_promoted():
            self.standby.stop(mode="immediate")
            self._build_standby()
        if not self.standby.is_running():
            _start_all([self.standby], deadline)

    def ensure_running(self, timeout: float = START_TIMEOUT) -> None:
        """Same as :meth:`ensure_layout`."""
        self.ensure_layout(timeout)

    # ----------------------------------------------------------------- internals

    def _new_server(
        self, host: str, directory: Path, settings: Mapping[str, str] | None
    ) -> PostgresServer:
        return PostgresServer(host, self.port, directory, settings=settings)

    def _prepare(self) -> None:
        bindir = find_pg_bindir()
        for server in self.servers:
            server._bindir = bindir

    def _create(self) -> None:
        _chown(_pg_account(), self.base_dir)
        template = self.base_dir / "template"
        _init_pg_template(self.primary.bindir, template)
        for server in self.servers:
            shutil.rmtree(server.directory, ignore_errors=True)
            server.directory.mkdir(mode=0o700)
            _chown(_pg_account(), server.directory)
        template.rename(self.primary.datadir)

    def _start_servers(self, deadline: float) -> None:
        _start_all([self.primary], deadline)
        self._build_standby()
        _start_all([self.standby], deadline)

    def _build_standby(self) -> None:
        """A fresh standby data directory: ``pg_basebackup -R`` from the running primary."""
        primary, standby = self.primary, self.standby
        shutil.rmtree(standby.datadir, ignore_errors=True)
        conninfo = primary.dsn() + " application_name=standby"
        argv = [str(standby.bindir / "pg_basebackup"), "-d", conninfo, "-D", str(standby.datadir)]
        # -R: standby.signal and primary_conninfo; fast checkpoint (not spread over minutes)
        argv += ["-R", "-X", "stream", "--checkpoint=fast", "--no-sync"]
        _run_pg(argv, "pg_basebackup", cwd=self.base_dir)
