"""Private PostgreSQL servers on loopback addresses, for tests and benchmarks.

Several independent instances listen on 127.0.0.2, 127.0.0.3, ... -- all on the *same* port -- so
they look like distinct database hosts; stopping one is a real host failure. Standard library only;
psycopg is used for the readiness check when it is importable (``pg_isready`` otherwise)::

    from tests.servers import PostgresCluster

    with PostgresCluster(n=3) as cluster:
        for server in cluster.servers:
            print(server.url())     # postgresql+psycopg://app:app@127.0.0.2:PORT/app
        cluster.servers[1].stop()   # host failure
        cluster.servers[1].restart()

Every instance has a role ``app`` (password ``app``, SUPERUSER) owning a database ``app``.
``python -m tests.servers -n 4`` starts a cluster and keeps it up until interrupted.

Environment:

``SQLA_REBALANCE_PG_PORT``
    the port to use when none is given (default: a free port, found by binding on every address).
``TMPDIR``
    where the temporary data directories go; if unset, ``/dev/shm`` when it has 2 GB free
    (several times faster than a virtual disk), else the usual temporary directory.
``SQLA_REBALANCE_PG_BINDIR``
    directory holding ``initdb``/``postgres`` (default: the newest ``/usr/lib/postgresql/*/bin``,
    then ``pg_config --bindir``, then ``PATH``).

PostgreSQL refuses to run as root: as root, every server program runs as the ``postgres`` system
user (the child process switches user before ``exec``, like ``runuser -u postgres``); as any other
user, the programs run as that user. Servers still running at interpreter exit are stopped.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import ipaddress
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any
from urllib.parse import quote

__all__ = ["PostgresCluster", "PostgresServer", "find_free_port", "find_pg_bindir"]

INSTALL_HINT = (
    "install them with scripts/install-system-deps.sh (Debian: apt-get install postgresql)"
)
PORT_ENV = "SQLA_REBALANCE_PG_PORT"
BINDIR_ENV = "SQLA_REBALANCE_PG_BINDIR"
FIRST_ADDRESS = "127.0.0.2"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0

APP_USER = "app"
APP_PASSWORD = "app"
APP_DATABASE = "app"

# Settings shared by every instance (written once into the template's postgresql.conf).
COMMON_SETTINGS: dict[str, str] = {
    "max_connections": "200",
    "shared_buffers": "16MB",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "huge_pages": "off",
    "password_encryption": "scram-sha-256",
    "logging_collector": "off",
    "log_destination": "stderr",
    "log_line_prefix": "%m [%p] %q%u@%d ",
    "lc_messages": "C",
    "timezone": "UTC",
}
INSTANCE_CONF = "sqla_rebalance.conf"  # per-instance settings (address, port, socket, extras)

PG_HBA = """\
# Written by tests/servers.py
# TYPE  DATABASE  USER      ADDRESS        METHOD
local   all       postgres                 trust
local   all       all                      scram-sha-256
host    all       all       127.0.0.0/8    scram-sha-256
"""

BOOTSTRAP_SQL = f"""\
CREATE ROLE {APP_USER} LOGIN SUPERUSER PASSWORD '{APP_PASSWORD}';
CREATE DATABASE {APP_DATABASE} OWNER {APP_USER};
"""

STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_BIND_FAILURE = re.compile(r"could not bind|address already in use", re.IGNORECASE)
_UNIX_SOCKET_PATH_MAX = 107  # sizeof(sun_path) - 1 on Linux


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


@functools.cache
def _psycopg() -> ModuleType | None:
    """psycopg if installed (optional): a real ``app`` login is the best readiness check."""
    try:
        import psycopg
    except ImportError:
        return None
    return psycopg


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _pg_account() -> pwd.struct_passwd | None:
    """The account server programs run as: ``postgres`` when we are root, else None (ourselves)."""
    if not _running_as_root():
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError(
            "running as root, but there is no 'postgres' system user to run PostgreSQL as "
            f"(PostgreSQL refuses to run as root); {INSTALL_HINT}"
        ) from None


def _as_pg_user() -> dict[str, Any]:
    """``subprocess`` keyword arguments that run the child as the PostgreSQL account."""
    account = _pg_account()
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _chown_to_pg(*paths: Path) -> None:
    account = _pg_account()
    if account is not None:
        for path in paths:
            os.chown(path, account.pw_uid, account.pw_gid)


def _run_pg(argv: list[str], what: str, *, cwd: Path, stdin: str | None = None) -> str:
    """Run a PostgreSQL program as the PostgreSQL account; RuntimeError with output on failure."""
    proc = subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,  # never the caller's cwd: /root is not readable by postgres
        check=False,
        timeout=300,
        **_as_pg_user(),
    )
    output: str = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise RuntimeError(
            f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{_tail(output, 40)}"
        )
    return output


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


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
            f.write("\n# --- tests/servers.py ---\n")
        f.writelines(lines)


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # PostgreSQL sets SO_REUSEADDR too: TIME_WAIT leftovers must not count as "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def find_free_port(hosts: Iterable[str], attempts: int = 200) -> int:
    """A port on which every one of ``hosts`` can listen.

    Chosen at random below the Linux ephemeral range (32768+), so that outgoing client
    connections never hold it. Another process may still take it before the server binds;
    :meth:`PostgresCluster.start` retries with another port when that happens.
    """
    hosts = list(hosts)
    rng = random.Random()
    for _ in range(attempts):
        port = rng.randrange(20000, 32000)
        if all(_port_is_free(host, port) for host in hosts):
            return port
    raise RuntimeError(f"no free port shared by {', '.join(hosts)} after {attempts} attempts")


def _default_parent_dir() -> str | None:
    """Where temporary data directories go: ``/dev/shm`` (RAM) unless ``$TMPDIR`` says otherwise.

    On a virtual disk, copying the template and starting the servers is several times slower than
    in memory (measured: 4 servers in 4.2 s on ext4, 1.2 s on tmpfs), and the data is throw-away.
    """
    if os.environ.get("TMPDIR"):
        return None
    shm = "/dev/shm"
    try:
        stat = os.statvfs(shm)
    except OSError:
        return None
    if os.access(shm, os.W_OK | os.X_OK) and stat.f_bavail * stat.f_frsize >= 2 * 1024**3:
        return shm
    return None


def loopback_addresses(n: int, first: str = FIRST_ADDRESS) -> list[str]:
    start = ipaddress.IPv4Address(first)
    addresses = [start + i for i in range(n)]
    loopback = ipaddress.IPv4Network("127.0.0.0/8")
    if not all(a in loopback and a != loopback.broadcast_address for a in addresses):
        raise ValueError(f"{n} addresses from {first} do not all fit in 127.0.0.0/8")
    return [str(a) for a in addresses]


# --------------------------------------------------------------------------- registry for atexit

_OWNER_PID = os.getpid()
_live_servers: set[PostgresServer] = set()
_live_clusters: set[PostgresCluster] = set()
_registry_lock = threading.Lock()


@atexit.register
def _cleanup_at_exit() -> None:
    # A forked child inherits this handler and the registry; it must not stop its parent's servers.
    if os.getpid() != _OWNER_PID:
        return
    for cluster in list(_live_clusters):
        with contextlib.suppress(Exception):
            cluster.stop(mode="immediate")
    for server in list(_live_servers):
        with contextlib.suppress(Exception):
            server.stop(mode="immediate")


# --------------------------------------------------------------------------- one server


class PostgresServer:
    """One PostgreSQL instance listening on ``host:port`` only.

    ``directory`` holds ``data/`` (the data directory, already initialised, e.g. by
    :class:`PostgresCluster`), ``sock/`` (its Unix socket directory) and ``postgres.log``.
    The postmaster is a direct child of this process, so its state is known without polling files.
    """

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
        self._proc: subprocess.Popen[bytes] | None = None

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

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

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

    @property
    def address(self) -> str:
        """``host:port``, the form the pool's ``hosts=`` argument takes."""
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<PostgresServer {self.address} {state} {self.directory}>"

    # ----------------------------------------------------------------- lifecycle

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server (no-op if running) and wait until it accepts logins."""
        if self.is_running():
            return
        self._launch()
        self._wait_ready(time.monotonic() + timeout)

    def stop(self, mode: str = "fast", timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server like a host going away.

        ``mode`` is PostgreSQL's shutdown mode: ``"smart"`` waits for clients to disconnect,
        ``"fast"`` (default) terminates sessions, ``"immediate"`` quits without a checkpoint
        (crash-like). Returns once the postmaster and all its backends have exited.
        """
        self._signal_stop(mode)
        self._wait_stopped(timeout)

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        self.stop()
        self.start(timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return _tail(self.logfile.read_text(errors="replace"), lines)
        except OSError as exc:
            return f"(no log: {exc})"

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
        _chown_to_pg(path)

    def _launch(self) -> None:
        """Spawn the postmaster without waiting for it to become ready."""
        if not (self.datadir / "PG_VERSION").exists():
            raise RuntimeError(f"{self.datadir} is not an initialised PostgreSQL data directory")
        socket_path = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(str(socket_path)) > _UNIX_SOCKET_PATH_MAX:
            raise RuntimeError(f"Unix socket path too long ({socket_path}); use a shorter base_dir")
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        _chown_to_pg(self.socket_dir)
        self._write_instance_conf()
        with self.logfile.open("ab") as log:
            _chown_to_pg(self.logfile)
            log.write(f"\n=== tests/servers.py: starting {self.address}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.datadir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,  # a Ctrl-C in the terminal must not reach it directly
                **_as_pg_user(),
            )
        with _registry_lock:
            _live_servers.add(self)

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

    def _start_failure(self, why: str) -> RuntimeError:
        return RuntimeError(
            f"PostgreSQL on {self.address} {why}; last lines of {self.logfile}:\n{self.log_tail()}"
        )

    def _poll_ready(self) -> bool:
        """One readiness probe; RuntimeError (with the log tail) if the postmaster has exited."""
        if self._proc is None:
            raise RuntimeError(f"PostgreSQL on {self.address} was not started")
        if self._proc.poll() is not None:
            code = self._proc.returncode
            with _registry_lock:
                _live_servers.discard(self)
            raise self._start_failure(f"exited during start-up (exit status {code})")
        return self._ready()

    def _wait_ready(self, deadline: float) -> None:
        interval = 0.005
        while not self._poll_ready():
            if time.monotonic() > deadline:
                raise self._start_failure("did not accept connections in time")
            time.sleep(interval)
            interval = min(interval * 1.5, 0.1)

    def _signal_stop(self, mode: str) -> None:
        if mode not in STOP_SIGNALS:
            raise ValueError(f"mode must be one of {', '.join(STOP_SIGNALS)}, not {mode!r}")
        if self.is_running() and self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(STOP_SIGNALS[mode])

    def _wait_stopped(self, timeout: float) -> None:
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Escalate: immediate shutdown (backends get SIGQUIT), and as a last resort SIGKILL.
                proc.send_signal(signal.SIGQUIT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        with _registry_lock:
            _live_servers.discard(self)


# --------------------------------------------------------------------------- a set of servers


class PostgresCluster:
    """``n`` independent PostgreSQL servers on 127.0.0.2, 127.0.0.3, ... sharing one port.

    Not replicas of each other: independent databases that look like ``n`` hosts. The data lives
    under ``base_dir`` (default: a fresh temporary directory, removed again by :meth:`stop`).
    ``port`` defaults to ``$SQLA_REBALANCE_PG_PORT`` or a port that is free on every address.
    ``settings`` are extra ``postgresql.conf`` settings for every instance.
    """

    def __init__(
        self,
        n: int = 1,
        base_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        *,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("n must be at least 1")
        if port is None and os.environ.get(PORT_ENV):
            port = int(os.environ[PORT_ENV])
        self._fixed_port = port is not None
        hosts = loopback_addresses(n)
        self.port: int = port if port is not None else find_free_port(hosts)
        self._owns_base_dir = base_dir is None
        if base_dir is None:
            base_dir = tempfile.mkdtemp(prefix="sqla-rebalance-pg-", dir=_default_parent_dir())
        self.base_dir = Path(base_dir).absolute()
        self.servers: list[PostgresServer] = [
            PostgresServer(host, self.port, self.base_dir / f"pg-{host}", settings=settings)
            for host in hosts
        ]
        self._started = False
        with _registry_lock:
            _live_clusters.add(self)  # so that the temporary directory goes away at exit

    def __repr__(self) -> str:
        state = "started" if self._started else "stopped"
        return f"<PostgresCluster {len(self.servers)}x port {self.port} {state} {self.base_dir}>"

    def __len__(self) -> int:
        return len(self.servers)

    def __iter__(self) -> Iterator[PostgresServer]:
        return iter(self.servers)

    def __getitem__(self, index: int) -> PostgresServer:
        return self.servers[index]

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def hosts(self) -> list[str]:
        """``["127.0.0.2:PORT", ...]``, ready for the pool's ``hosts=`` argument."""
        return [server.address for server in self.servers]

    # ----------------------------------------------------------------- lifecycle

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Create the instances (initdb once, then copies) and start them all in parallel.

        Returns once every instance accepts ``app`` logins. On failure everything is stopped
        and removed again, and RuntimeError carries the failing server's log tail.
        """
        if self._started:
            self.ensure_running(timeout)
            return
        with _registry_lock:
            _live_clusters.add(self)
        try:
            bindir = find_pg_bindir()  # fail early, with the install hint
            for server in self.servers:
                server._bindir = bindir
            self._check_port()  # before the slow part: an explicit port in use fails at once
            self._create(bindir)
            for attempt in range(3):
                self._check_port()
                try:
                    self._start_all(self.servers, time.monotonic() + timeout)
                    break
                except RuntimeError as exc:
                    self._stop_all("immediate")
                    if self._fixed_port or attempt == 2 or not _BIND_FAILURE.search(str(exc)):
                        raise
                    # Somebody took the port between our probe and the bind: take another one.
                    self._set_port(find_free_port(server.host for server in self.servers))
        except BaseException:
            self.stop(mode="immediate")
            raise
        self._started = True

    def ensure_running(self, timeout: float = START_TIMEOUT) -> None:
        """(Re)start, in parallel, every server that is not running (e.g. a test stopped it)."""
        if not self._started:
            self.start(timeout)
            return
        stopped = [server for server in self.servers if not server.is_running()]
        if stopped:
            self._start_all(stopped, time.monotonic() + timeout)

    def stop(self, mode: str = "fast") -> None:
        """Stop every server (in parallel) and remove what :meth:`start` created."""
        self._stop_all(mode)
        self._started = False
        if self._owns_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        else:
            for server in self.servers:
                shutil.rmtree(server.directory, ignore_errors=True)
            shutil.rmtree(self.base_dir / "template", ignore_errors=True)
        with _registry_lock:
            _live_clusters.discard(self)

    # ----------------------------------------------------------------- internals

    def _set_port(self, port: int) -> None:
        self.port = port
        for server in self.servers:
            server.port = port

    def _check_port(self) -> None:
        busy = [s.host for s in self.servers if not _port_is_free(s.host, self.port)]
        if not busy:
            return
        if self._fixed_port:
            raise RuntimeError(
                f"port {self.port} is already in use on {', '.join(busy)} "
                f"(port given explicitly or by {PORT_ENV})"
            )
        self._set_port(find_free_port(server.host for server in self.servers))

    def _create(self, bindir: Path) -> None:
        """initdb once into ``template/``, then ``cp -a`` it for every instance."""
        self.base_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _chown_to_pg(self.base_dir)
        template = self.base_dir / "template"
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
            cwd=self.base_dir,
        )
        _write_settings(template / "postgresql.conf", COMMON_SETTINGS, append=True)
        with (template / "postgresql.conf").open("a") as f:
            f.write(f"include_if_exists = '{INSTANCE_CONF}'\n")
        (template / "pg_hba.conf").write_text(PG_HBA)
        single_user = [str(bindir / "postgres"), "--single", "-F", "-c", "exit_on_error=on"]
        _run_pg(
            [*single_user, "-D", str(template), "postgres"],
            "creating the app role and database (single-user mode)",
            cwd=self.base_dir,
            stdin=BOOTSTRAP_SQL,
        )
        copies = []
        for server in self.servers:
            shutil.rmtree(server.directory, ignore_errors=True)
            server.directory.mkdir(mode=0o700)
            _chown_to_pg(server.directory)
            # cp -a keeps the owner (postgres) and modes (data directory 0700).
            argv = ["cp", "-a", "--reflink=auto", str(template), str(server.datadir)]
            copies.append((argv, subprocess.Popen(argv, stderr=subprocess.PIPE)))
        for argv, proc in copies:
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} failed: {err.decode(errors='replace')}")
        shutil.rmtree(template, ignore_errors=True)

    @staticmethod
    def _start_all(servers: list[PostgresServer], deadline: float) -> None:
        for server in servers:
            server._launch()
        pending = list(servers)
        interval = 0.005
        while pending:
            pending = [server for server in pending if not server._poll_ready()]
            if not pending:
                break
            if time.monotonic() > deadline:
                raise pending[0]._start_failure("did not accept connections in time")
            time.sleep(interval)
            interval = min(interval * 1.5, 0.1)

    def _stop_all(self, mode: str) -> None:
        for server in self.servers:
            server._signal_stop(mode)
        for server in self.servers:
            server._wait_stopped(STOP_TIMEOUT)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.servers",
        description="Start PostgreSQL servers on 127.0.0.2... and keep them up until interrupted.",
    )
    parser.add_argument("-n", type=int, default=4, help="number of servers (default 4)")
    parser.add_argument(
        "--port", type=int, default=None, help=f"port (default ${PORT_ENV} or free)"
    )
    parser.add_argument("--base-dir", default=None, help="data directory (default: temporary)")
    args = parser.parse_args(argv)
    began = time.monotonic()
    with PostgresCluster(n=args.n, base_dir=args.base_dir, port=args.port) as cluster:
        print(f"{len(cluster)} servers up in {time.monotonic() - began:.2f}s:", flush=True)
        for server in cluster.servers:
            print(f"  {server.url()}    log: {server.logfile}", flush=True)
        print("Ctrl-C to stop.", flush=True)
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # stop cleanly on kill
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
