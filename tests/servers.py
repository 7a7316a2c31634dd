"""Private database, DNS and cache servers on loopback addresses, for tests and benchmarks.

Several independent instances listen on distinct loopback addresses -- all on the *same* port --
so they look like distinct hosts; stopping one is a real host failure. Every server program is a
direct child of this process (its state is known without polling files) and writes its output to
a log file, whose last lines are in the error when it cannot start. Standard library only; the
client libraries (psycopg, pymysql, dnspython) are used when they are importable::

    from tests.servers import PostgresCluster

    with PostgresCluster(n=3) as cluster:
        for server in cluster.servers:
            print(server.url())     # postgresql+psycopg://app:app@127.0.0.2:PORT/app
        cluster.servers[1].stop()   # host failure
        cluster.servers[1].restart()

Kinds (``python -m tests.servers KIND`` starts one and keeps it up until interrupted):

``PostgresCluster`` (``postgres``)
    ``n`` independent PostgreSQL servers on 127.0.0.2, 127.0.0.3, ...; role ``app`` (password
    ``app``, SUPERUSER) owning a database ``app``.
``PostgresReplicaPair`` (``replica``)
    a streaming-replication primary on 127.0.0.8 and its hot standby on 127.0.0.9 (same port).
``MariaDBCluster`` (``mariadb``)
    ``n`` independent MariaDB servers on 127.0.0.12, 127.0.0.13, ...; user ``app`` (password
    ``app``, all privileges, from any host) and a database ``app``.
``RedisServer`` (``redis``)
    one Redis on 127.0.0.1, without persistence.
``DnsServer`` (``dns``)
    one dnsmasq on 127.0.0.1, authoritative for ``*.test``, answering from a hosts file that
    :meth:`DnsServer.set` rewrites (and waits until the new records are served).

Environment:

``SQLA_REBALANCE_PG_PORT``, ``SQLA_REBALANCE_MARIADB_PORT``, ``SQLA_REBALANCE_REDIS_PORT``,
``SQLA_REBALANCE_DNS_PORT``
    the port to use when none is given (default: a free port, found by binding on every address).
``TMPDIR``
    where the temporary data directories go; if unset, ``/dev/shm`` when it has 2 GB free
    (several times faster than a virtual disk), else the usual temporary directory.
``SQLA_REBALANCE_PG_BINDIR``
    directory holding ``initdb``/``postgres`` (default: the newest ``/usr/lib/postgresql/*/bin``,
    then ``pg_config --bindir``, then ``PATH``).

PostgreSQL refuses to run as root: as root, every PostgreSQL program runs as the ``postgres``
system user (the child process switches user before ``exec``, like ``runuser -u postgres``),
MariaDB as ``mysql`` and Redis as ``redis``; dnsmasq drops its privileges itself. As any other
user, the programs run as that user. Servers still running at interpreter exit are stopped and
their temporary directories removed.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import ipaddress
import itertools
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, ClassVar, Generic, TypeVar
from urllib.parse import quote

__all__ = [
    "DnsServer",
    "MariaDBCluster",
    "MariaDBServer",
    "PostgresCluster",
    "PostgresReplicaPair",
    "PostgresServer",
    "RedisServer",
    "find_free_port",
    "find_pg_bindir",
    "find_program",
]

INSTALL_HINT = (
    "install them with scripts/install-system-deps.sh (Debian: apt-get install postgresql)"
)
PORT_ENV = "SQLA_REBALANCE_PG_PORT"
MARIADB_PORT_ENV = "SQLA_REBALANCE_MARIADB_PORT"
REDIS_PORT_ENV = "SQLA_REBALANCE_REDIS_PORT"
DNS_PORT_ENV = "SQLA_REBALANCE_DNS_PORT"
BINDIR_ENV = "SQLA_REBALANCE_PG_BINDIR"
FIRST_ADDRESS = "127.0.0.2"  # PostgresCluster: 127.0.0.2, .3, ...
REPLICA_ADDRESS = "127.0.0.8"  # PostgresReplicaPair: primary .8, standby .9
MARIADB_ADDRESS = "127.0.0.12"  # MariaDBCluster: 127.0.0.12, .13, ...
LOCALHOST = "127.0.0.1"  # RedisServer, DnsServer
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
# Written by tests/servers.py
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

# mariadbd options for the template (mariadb-install-db) and every instance: small and fast,
# throw-away data. /dev/shm (tmpfs) has neither O_DIRECT nor native AIO.
MARIADB_COMMON_OPTIONS: tuple[str, ...] = (
    "--innodb-data-file-path=ibdata1:4M:autoextend",  # must stay the same for the copies
    "--innodb-autoextend-increment=4",
    "--innodb-log-file-size=4M",
    "--innodb-buffer-pool-size=32M",
    "--innodb-use-native-aio=0",
    "--innodb-flush-method=fsync",
    "--innodb-flush-log-at-trx-commit=0",
    "--innodb-doublewrite=0",
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_general_ci",
    "--performance-schema=OFF",
)
# SQL run once into the template by mariadb-install-db (bootstrap mode runs with the grant tables
# disabled; FLUSH PRIVILEGES enables them so that CREATE USER works).
MARIADB_BOOTSTRAP_SQL = f"""\
FLUSH PRIVILEGES;
CREATE DATABASE {APP_DATABASE};
CREATE USER '{APP_USER}'@'%' IDENTIFIED BY '{APP_PASSWORD}';
GRANT ALL PRIVILEGES ON *.* TO '{APP_USER}'@'%' WITH GRANT OPTION;
"""

STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_BIND_FAILURE = re.compile(r"could not bind|address already in use", re.IGNORECASE)
_UNIX_SOCKET_PATH_MAX = 107  # sizeof(sun_path) - 1 on Linux
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


# --------------------------------------------------------------------------- helpers


def install_hint(package: str) -> str:
    return f"install it with scripts/install-system-deps.sh (Debian: apt-get install {package})"


def find_program(name: str, package: str) -> Path:
    """``name`` on ``PATH`` or in the ``sbin`` directories; RuntimeError naming the package."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN_DIRS])
    found = shutil.which(name, path=path)
    if found is None:
        raise RuntimeError(f"{name} not found; {install_hint(package)}")
    return Path(found)


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
def _optional_module(name: str) -> ModuleType | None:
    """An optional client library (psycopg, pymysql, dns.resolver), or None if not installed."""
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        return None


def _psycopg() -> ModuleType | None:
    """psycopg if installed (optional): a real ``app`` login is the best readiness check."""
    return _optional_module("psycopg")


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _account(name: str, what: str, hint: str) -> pwd.struct_passwd | None:
    """The system account ``what`` runs as: ``name`` when we are root, else None (ourselves)."""
    if not _running_as_root():
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(
            f"running as root, but there is no {name!r} system user to run {what} as; {hint}"
        ) from None


def _pg_account() -> pwd.struct_passwd | None:
    return _account("postgres", "PostgreSQL (PostgreSQL refuses to run as root)", INSTALL_HINT)


def _mysql_account() -> pwd.struct_passwd | None:
    return _account("mysql", "MariaDB", install_hint("mariadb-server"))


def _redis_account() -> pwd.struct_passwd | None:
    return _account("redis", "Redis", install_hint("redis-server"))


def _as_account(account: pwd.struct_passwd | None) -> dict[str, Any]:
    """``subprocess`` keyword arguments that run the child as ``account`` (None: ourselves)."""
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _chown(account: pwd.struct_passwd | None, *paths: Path) -> None:
    if account is not None:
        for path in paths:
            os.chown(path, account.pw_uid, account.pw_gid)


def _run_as(
    account: pwd.struct_passwd | None,
    argv: list[str],
    what: str,
    *,
    cwd: Path,
    stdin: str | None = None,
) -> str:
    """Run a program as ``account``; RuntimeError with its output on failure."""
    proc = subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,  # never the caller's cwd: /root is not readable by postgres or mysql
        check=False,
        timeout=300,
        **_as_account(account),
    )
    output: str = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise RuntimeError(
            f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{_tail(output, 40)}"
        )
    return output


def _run_pg(argv: list[str], what: str, *, cwd: Path, stdin: str | None = None) -> str:
    """Run a PostgreSQL program as the PostgreSQL account; RuntimeError with output on failure."""
    return _run_as(_pg_account(), argv, what, cwd=cwd, stdin=stdin)


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


def _port_is_free(host: str, port: int, *, udp: bool = False) -> bool:
    kinds = [socket.SOCK_STREAM, socket.SOCK_DGRAM] if udp else [socket.SOCK_STREAM]
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sock:
            # The servers set SO_REUSEADDR too: TIME_WAIT leftovers must not count as "in use".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def find_free_port(hosts: Iterable[str], attempts: int = 200, *, udp: bool = False) -> int:
    """A port on which every one of ``hosts`` can listen (with ``udp``: for UDP as well).

    Chosen at random below the Linux ephemeral range (32768+), so that outgoing client
    connections never hold it. Another process may still take it before the server binds;
    the first start of a cluster or server retries with another port when that happens.
    """
    hosts = list(hosts)
    rng = random.Random()
    for _ in range(attempts):
        port = rng.randrange(20000, 32000)
        if all(_port_is_free(host, port, udp=udp) for host in hosts):
            return port
    raise RuntimeError(f"no free port shared by {', '.join(hosts)} after {attempts} attempts")


def _port_from_env(port: int | None, env: str) -> int | None:
    if port is None and os.environ.get(env):
        return int(os.environ[env])
    return port


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


def _copy_trees(source: Path, destinations: Iterable[Path]) -> None:
    """``cp -a`` (owner and modes kept) of ``source`` to every destination, in parallel."""
    copies = []
    for destination in destinations:
        argv = ["cp", "-a", "--reflink=auto", str(source), str(destination)]
        copies.append((argv, subprocess.Popen(argv, stderr=subprocess.PIPE)))
    for argv, proc in copies:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {err.decode(errors='replace')}")


def _poll(
    condition: Callable[[], bool], deadline: float, *, first: float = 0.002, longest: float = 0.1
) -> bool:
    """Call ``condition()`` until it is true (True) or ``deadline`` passes (False)."""
    interval = first
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
        interval = min(interval * 1.5, longest)
    return True


# --------------------------------------------------------------------------- registry for atexit

_OWNER_PID = os.getpid()
_live: set[Any] = set()  # servers and clusters with an ``_at_exit()`` method
_registry_lock = threading.Lock()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), parents before children."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = list(children.get(pid, ()))
    while todo:
        child = todo.pop(0)
        found.append(child)
        todo.extend(children.get(child, ()))
    return found


def _register(thing: object) -> None:
    with _registry_lock:
        _live.add(thing)


def _unregister(thing: object) -> None:
    with _registry_lock:
        _live.discard(thing)


@atexit.register
def _cleanup_at_exit() -> None:
    # A forked child inherits this handler and the registry; it must not stop its parent's servers.
    if os.getpid() != _OWNER_PID:
        return
    # Clusters first: they stop their servers in parallel.
    for thing in sorted(_live, key=lambda t: not isinstance(t, _Cluster)):
        with contextlib.suppress(Exception):
            thing._at_exit()


# --------------------------------------------------------------------------- one server process


class _ServerProcess:
    """A server program run as a direct child of this process, its output in ``logfile``.

    Subclasses say how to launch it (:meth:`_launch`, usually via :meth:`_spawn`) and how to
    tell that it is ready (:meth:`_ready`).
    """

    kind: ClassVar[str] = "server"
    #: stop mode -> signal
    stop_signals: ClassVar[Mapping[str, signal.Signals]] = {
        "fast": signal.SIGTERM,
        "immediate": signal.SIGKILL,
    }
    #: signals sent, in turn, when the process has not exited STOP_TIMEOUT after the stop signal
    escalation: ClassVar[tuple[signal.Signals, ...]] = ()

    host: str
    port: int
    directory: Path
    _proc: subprocess.Popen[bytes] | None = None
    _log_offset: int = 0
    #: may :meth:`start` move to another port when the port is taken? (until the first start)
    _may_change_port: bool = False

    @property
    def logfile(self) -> Path:
        raise NotImplementedError

    @property
    def address(self) -> str:
        """``host:port``, the form the pool's ``hosts=`` argument takes."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    # ----------------------------------------------------------------- lifecycle

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server (no-op if running) and wait until it answers.

        On failure the process is gone and RuntimeError carries the log tail.
        """
        if self.is_running():
            return
        for attempt in range(3):
            try:
                self._launch()
                self._wait_ready(time.monotonic() + timeout)
            except BaseException as exc:
                self._signal_stop("immediate")  # not stop(): a DnsServer would hold the port
                self._wait_stopped(STOP_TIMEOUT)
                retry = isinstance(exc, RuntimeError) and self._may_change_port and attempt < 2
                if not (retry and self._bind_failed()):
                    raise
                # Somebody took the port between our probe and the bind: take another one.
                self.port = find_free_port([self.host], udp=self._needs_udp())
            else:
                self._may_change_port = False  # clients know the port from now on
                return

    def stop(self, mode: str = "fast", timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server like a host going away; returns once the process has exited.

        ``mode``: ``"fast"`` (default) is a clean shutdown (SIGTERM), ``"immediate"`` a crash
        (SIGKILL) -- PostgreSQL has its own modes, see :meth:`PostgresServer.stop`.
        """
        self._signal_stop(mode)
        self._wait_stopped(timeout)

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        self.stop()
        self.start(timeout)

    # ----------------------------------------------------------------- hangs (frozen host)

    _frozen: bool = False
    _frozen_pids: list[int] = []  # noqa: RUF012 - replaced, never mutated, per instance

    def freeze(self) -> None:
        """Stop the server and all its processes with SIGSTOP: a *hung* host.

        The kernel still completes TCP handshakes and ACKs data, but nothing answers:
        what a frozen VM or a stuck server looks like to a client (a refused connection is
        :meth:`stop`). The server process and all its descendants (PostgreSQL's postmaster
        and every backend, MariaDB's one process) are stopped.
        """
        if self._proc is None or not self.is_running():
            raise RuntimeError(f"{self.kind} on {self.address} is not running")
        # The parent first, so that it forks no new child meanwhile; then every
        # descendant (PostgreSQL's backends each call setsid(): a process-group
        # signal would miss them, and existing sessions would keep answering).
        os.kill(self._proc.pid, signal.SIGSTOP)
        self._frozen_pids = [self._proc.pid]
        for pid in _descendants(self._proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                self._frozen_pids.append(pid)
        self._frozen = True

    def thaw(self) -> None:
        """Resume a server stopped by :meth:`freeze` (SIGCONT); a no-op otherwise."""
        if self._frozen:
            for pid in reversed(self._frozen_pids):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        self._frozen = False
        self._frozen_pids = []

    @property
    def is_frozen(self) -> bool:
        return self._frozen

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """``with server.frozen(): ...``: hung for the block, thawed after (even on error)."""
        self.freeze()
        try:
            yield
        finally:
            self.thaw()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return _tail(self.logfile.read_text(errors="replace"), lines)
        except OSError as exc:
            return f"(no log: {exc})"

    def _at_exit(self) -> None:
        self.stop(mode="immediate")

    # ----------------------------------------------------------------- internals

    def _launch(self) -> None:
        """Spawn the server without waiting for it to become ready."""
        raise NotImplementedError

    def _ready(self) -> bool:
        """One probe: True once the server answers."""
        raise NotImplementedError

    def _needs_udp(self) -> bool:
        return False

    def _spawn(
        self, argv: list[str], *, cwd: Path, account: pwd.struct_passwd | None = None
    ) -> None:
        with self.logfile.open("ab") as log:
            _chown(account, self.logfile)
            self._log_offset = log.tell()
            log.write(f"\n=== tests/servers.py: starting {self.address}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,  # a Ctrl-C in the terminal must not reach it directly
                **_as_account(account),
            )
        self._track()

    def _track(self) -> None:
        """Register for the clean-up at exit while the process runs."""
        _register(self)

    def _untrack(self) -> None:
        _unregister(self)

    def _bind_failed(self) -> bool:
        """Did the last start fail because the port was taken? (judged by its log)"""
        try:
            with self.logfile.open("rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return False
        return bool(_BIND_FAILURE.search(text))

    def _start_failure(self, why: str) -> RuntimeError:
        return RuntimeError(
            f"{self.kind} on {self.address} {why}; last lines of {self.logfile}:\n{self.log_tail()}"
        )

    def _poll_ready(self) -> bool:
        """One readiness probe; RuntimeError (with the log tail) if the process has exited."""
        if self._proc is None:
            raise RuntimeError(f"{self.kind} on {self.address} was not started")
        if self._proc.poll() is not None:
            code = self._proc.returncode
            self._untrack()
            raise self._start_failure(f"exited during start-up (exit status {code})")
        return self._ready()

    def _wait_ready(self, deadline: float) -> None:
        if not _poll(self._poll_ready, deadline, first=0.005):
            raise self._start_failure("did not answer in time")

    def _signal_stop(self, mode: str) -> None:
        self.thaw()  # a stopped process would not act on the stop signal
        if mode not in self.stop_signals:
            raise ValueError(f"mode must be one of {', '.join(self.stop_signals)}, not {mode!r}")
        if self.is_running() and self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(self.stop_signals[mode])

    def _wait_stopped(self, timeout: float) -> None:
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for signum in self.escalation:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signum)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(10)
                        break
                else:
                    proc.kill()
                    proc.wait()
        self._untrack()


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


# --------------------------------------------------------------------------- a set of servers

ServerT = TypeVar("ServerT", bound=_ServerProcess)


class _Cluster(Generic[ServerT]):
    """``n`` servers on consecutive loopback addresses sharing one port.

    The data lives under ``base_dir`` (default: a fresh temporary directory, removed again by
    :meth:`stop`). ``port`` defaults to ``$<port_env>`` or a port that is free on every address.
    Subclasses create the data directories (:meth:`_create`) and make the servers.
    """

    kind: ClassVar[str] = ""
    port_env: ClassVar[str] = ""
    first_address: ClassVar[str] = ""
    dir_prefix: ClassVar[str] = ""  # of the temporary base directory
    server_dir_prefix: ClassVar[str] = ""  # of each server's directory under it

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
        port = _port_from_env(port, self.port_env)
        self._fixed_port = port is not None
        hosts = loopback_addresses(n, self.first_address)
        self.port: int = port if port is not None else find_free_port(hosts)
        self._owns_base_dir = base_dir is None
        if base_dir is None:
            base_dir = tempfile.mkdtemp(prefix=self.dir_prefix, dir=_default_parent_dir())
        self.base_dir = Path(base_dir).absolute()
        self.servers: list[ServerT] = [
            self._new_server(host, self.base_dir / f"{self.server_dir_prefix}-{host}", settings)
            for host in hosts
        ]
        self._started = False
        _register(self)  # so that the temporary directory goes away at exit

    def __repr__(self) -> str:
        state = "started" if self._started else "stopped"
        name = type(self).__name__
        return f"<{name} {len(self.servers)}x port {self.port} {state} {self.base_dir}>"

    def __len__(self) -> int:
        return len(self.servers)

    def __iter__(self) -> Iterator[ServerT]:
        return iter(self.servers)

    def __getitem__(self, index: int) -> ServerT:
        return self.servers[index]

    def __enter__(self: _ClusterT) -> _ClusterT:
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
        """``["127.0.0.x:PORT", ...]``, ready for the pool's ``hosts=`` argument."""
        return [server.address for server in self.servers]

    # ----------------------------------------------------------------- lifecycle

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Create the instances (one template, then copies) and start them all in parallel.

        Returns once every instance accepts ``app`` logins. On failure everything is stopped
        and removed again, and RuntimeError carries the failing server's log tail.
        """
        if self._started:
            self.ensure_running(timeout)
            return
        _register(self)
        try:
            self._prepare()  # find the programs: fail early, with the install hint
            self._check_port()  # before the slow part: an explicit port in use fails at once
            self.base_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._create()
            for attempt in range(3):
                self._check_port()
                try:
                    self._start_servers(time.monotonic() + timeout)
                    break
                except RuntimeError:
                    self._stop_all("immediate")
                    bind_failed = any(server._bind_failed() for server in self.servers)
                    if self._fixed_port or attempt == 2 or not bind_failed:
                        raise
                    # Somebody took the port between our probe and the bind: take another one.
                    self._set_port(find_free_port(server.host for server in self.servers))
        except BaseException:
            self.stop(mode="immediate")
            raise
        self._started = True

    def ensure_running(self, timeout: float = START_TIMEOUT) -> None:
        """(Re)start, in parallel, every server that is not running (e.g. a test stopped it),
        and thaw every frozen one."""
        for server in self.servers:
            server.thaw()
        if not self._started:
            self.start(timeout)
            return
        stopped = [server for server in self.servers if not server.is_running()]
        if stopped:
            _start_all(stopped, time.monotonic() + timeout)

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
        _unregister(self)

    def _at_exit(self) -> None:
        self.stop(mode="immediate")

    # ----------------------------------------------------------------- internals

    def _new_server(
        self, host: str, directory: Path, settings: Mapping[str, str] | None
    ) -> ServerT:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Find the programs (RuntimeError with the install hint if they are missing)."""

    def _create(self) -> None:
        """Create every server's data directory (``base_dir`` exists)."""
        raise NotImplementedError

    def _start_servers(self, deadline: float) -> None:
        _start_all(self.servers, deadline)

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
                f"(port given explicitly or by {self.port_env})"
            )
        self._set_port(find_free_port(server.host for server in self.servers))

    def _stop_all(self, mode: str) -> None:
        for server in self.servers:
            server._signal_stop(mode)
        for server in self.servers:
            server._wait_stopped(STOP_TIMEOUT)


_ClusterT = TypeVar("_ClusterT", bound=_Cluster[Any])


def _start_all(servers: Sequence[_ServerProcess], deadline: float) -> None:
    """Launch ``servers`` at once and wait until all are ready (RuntimeError with a log tail)."""
    for server in servers:
        server._launch()
    pending = list(servers)

    def all_ready() -> bool:
        pending[:] = [server for server in pending if not server._poll_ready()]
        return not pending

    if not _poll(all_ready, deadline, first=0.005):
        raise pending[0]._start_failure("did not answer in time")


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


# --------------------------------------------------------------------------- MariaDB


class MariaDBServer(_ServerProcess):
    """One MariaDB instance listening on ``host:port`` only (``--skip-name-resolve``).

    ``directory`` holds ``data/`` (already initialised, e.g. by :class:`MariaDBCluster`), the
    Unix socket, the pid file and ``mariadb.log``. ``settings`` are extra ``mariadbd`` options
    (``{"max_connections": "300"}`` -> ``--max-connections=300``).
    """

    kind = "MariaDB"

    def __init__(
        self,
        host: str,
        port: int,
        directory: str | os.PathLike[str],
        *,
        settings: Mapping[str, str] | None = None,
        mariadbd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.directory = Path(directory)
        self.settings = dict(settings or {})
        self._mariadbd = Path(mariadbd) if mariadbd is not None else None
        self._proc = None

    @property
    def datadir(self) -> Path:
        return self.directory / "data"

    @property
    def socket_path(self) -> Path:
        return self.directory / "mysqld.sock"

    @property
    def logfile(self) -> Path:
        return self.directory / "mariadb.log"

    @property
    def mariadbd(self) -> Path:
        if self._mariadbd is None:
            self._mariadbd = find_program("mariadbd", "mariadb-server")
        return self._mariadbd

    def url(
        self,
        driver: str | None = "pymysql",
        user: str = APP_USER,
        password: str = APP_PASSWORD,
        database: str = APP_DATABASE,
    ) -> str:
        """A SQLAlchemy URL: ``mysql+pymysql://app:app@127.0.0.12:PORT/app``
        (``driver=None`` gives a plain ``mysql://`` URL)."""
        scheme = f"mysql+{driver}" if driver else "mysql"
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"{scheme}://{auth}@{self.host}:{self.port}/{quote(database, safe='')}"

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<MariaDBServer {self.address} {state} {self.directory}>"

    def _launch(self) -> None:
        if not (self.datadir / "mysql").is_dir():
            raise RuntimeError(f"{self.datadir} is not an initialised MariaDB data directory")
        if len(str(self.socket_path)) > _UNIX_SOCKET_PATH_MAX:
            raise RuntimeError(f"Unix socket path too long ({self.socket_path})")
        argv = [
            str(self.mariadbd),
            "--no-defaults",  # never /etc/mysql/my.cnf
            f"--datadir={self.datadir}",
            f"--socket={self.socket_path}",
            f"--pid-file={self.directory / 'mysqld.pid'}",
            f"--bind-address={self.host}",
            f"--port={self.port}",
            "--skip-name-resolve",
            "--host-cache-size=0",  # never "host blocked because of many connection errors"
            "--max-connections=200",
            *MARIADB_COMMON_OPTIONS,
            *(f"--{name.replace('_', '-')}={value}" for name, value in self.settings.items()),
        ]  # no --log-error: the log goes to stderr, i.e. to self.logfile
        self._spawn(argv, cwd=self.directory, account=_mysql_account())

    def _ready(self) -> bool:
        """True once the server accepts an ``app`` login over TCP."""
        pymysql = _optional_module("pymysql")
        if pymysql is not None:
            try:
                conn = pymysql.connect(
                    host=self.host,
                    port=self.port,
                    user=APP_USER,
                    password=APP_PASSWORD,
                    database=APP_DATABASE,
                    connect_timeout=5,
                )
            except pymysql.err.MySQLError:
                return False
            conn.close()
            return True
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                pass
        except OSError:
            return False
        admin = find_program("mariadb-admin", "mariadb-client")
        argv = [str(admin), "--no-defaults", f"--host={self.host}", f"--port={self.port}"]
        argv += [f"--user={APP_USER}", f"--password={APP_PASSWORD}", "--connect-timeout=5", "ping"]
        return subprocess.run(argv, capture_output=True, check=False, timeout=30).returncode == 0


class MariaDBCluster(_Cluster[MariaDBServer]):
    """``n`` independent MariaDB servers on 127.0.0.12, 127.0.0.13, ... sharing one port.

    Every instance has a database ``app`` and a user ``app`` (password ``app``, all privileges,
    from any host). ``port`` defaults to ``$SQLA_REBALANCE_MARIADB_PORT`` or a free one;
    ``settings`` are extra ``mariadbd`` options for every instance.
    """

    kind = "MariaDB"
    port_env = MARIADB_PORT_ENV
    first_address = MARIADB_ADDRESS
    dir_prefix = "sqla-rebalance-mariadb-"
    server_dir_prefix = "mariadb"

    def __init__(
        self,
        n: int = 2,
        base_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        *,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(n, base_dir, port, settings=settings)

    def _new_server(
        self, host: str, directory: Path, settings: Mapping[str, str] | None
    ) -> MariaDBServer:
        return MariaDBServer(host, self.port, directory, settings=settings)

    def _prepare(self) -> None:
        mariadbd = find_program("mariadbd", "mariadb-server")
        self._install_db = find_program("mariadb-install-db", "mariadb-server")
        for server in self.servers:
            server._mariadbd = mariadbd

    def _create(self) -> None:
        """mariadb-install-db once into ``template/``, then ``cp -a`` it for every instance."""
        account = _mysql_account()
        _chown(account, self.base_dir)
        template = self.base_dir / "template"
        shutil.rmtree(template, ignore_errors=True)
        bootstrap = self.base_dir / "bootstrap.sql"
        # mariadb-install-db also makes root@<hostname>, which --skip-name-resolve warns about.
        hostname = socket.gethostname().replace("'", "")
        bootstrap.write_text(f"{MARIADB_BOOTSTRAP_SQL}DROP USER IF EXISTS 'root'@'{hostname}';\n")
        bootstrap.chmod(0o644)
        _run_as(
            account,
            [
                str(self._install_db),
                "--no-defaults",
                f"--datadir={template}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
                f"--extra-file={bootstrap}",
                *MARIADB_COMMON_OPTIONS,
            ],
            "mariadb-install-db",
            cwd=self.base_dir,
        )
        for server in self.servers:
            shutil.rmtree(server.directory, ignore_errors=True)
            server.directory.mkdir(mode=0o700)
            _chown(account, server.directory)
        _copy_trees(template, (server.datadir for server in self.servers))
        shutil.rmtree(template, ignore_errors=True)
        bootstrap.unlink()


# --------------------------------------------------------------------------- standalone servers


class _StandaloneServer(_ServerProcess):
    """A server with its own temporary directory, on an automatic port unless one is given."""

    port_env: ClassVar[str] = ""
    dir_prefix: ClassVar[str] = ""

    def __init__(
        self, host: str, port: int | None, directory: str | os.PathLike[str] | None
    ) -> None:
        port = _port_from_env(port, self.port_env)
        self.host = host
        self._may_change_port = port is None  # until the first start
        self.port = port if port is not None else find_free_port([host], udp=self._needs_udp())
        self._owns_directory = directory is None
        if directory is None:
            directory = tempfile.mkdtemp(prefix=self.dir_prefix, dir=_default_parent_dir())
        self.directory = Path(directory).absolute()
        self._proc = None
        _register(self)  # so that the temporary directory goes away at exit

    def __enter__(self: _StandaloneT) -> _StandaloneT:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server for good and remove its temporary directory."""
        self.stop(mode="immediate")
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        _unregister(self)

    def _at_exit(self) -> None:
        self.close()

    # Registered for the clean-up at exit from construction to close(), running or not.
    def _track(self) -> None:
        pass

    def _untrack(self) -> None:
        pass


_StandaloneT = TypeVar("_StandaloneT", bound=_StandaloneServer)


class RedisServer(_StandaloneServer):
    """One Redis on ``127.0.0.1:PORT`` without persistence (``--save "" --appendonly no``).

    ``port`` defaults to ``$SQLA_REBALANCE_REDIS_PORT`` or a free one (kept across restarts);
    ``settings`` are extra ``redis-server`` options (``{"maxclients": "100"}``).
    :meth:`stop` is a host failure, :meth:`close` removes everything.
    """

    kind = "Redis"
    port_env = REDIS_PORT_ENV
    dir_prefix = "sqla-rebalance-redis-"

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = LOCALHOST,
        directory: str | os.PathLike[str] | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(host, port, directory)
        self.settings = dict(settings or {})

    @property
    def logfile(self) -> Path:
        return self.directory / "redis.log"

    def url(self, db: int = 0) -> str:
        """``redis://127.0.0.1:PORT/0``"""
        return f"redis://{self.host}:{self.port}/{db}"

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<RedisServer {self.address} {state} {self.directory}>"

    def _launch(self) -> None:
        account = _redis_account()
        _chown(account, self.directory)
        argv = [str(find_program("redis-server", "redis-server"))]
        argv += ["--bind", self.host, "--port", str(self.port), "--dir", str(self.directory)]
        argv += ["--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", ""]
        for name, value in self.settings.items():
            argv += [f"--{name}", value]
        self._spawn(argv, cwd=self.directory, account=account)

    def _ready(self) -> bool:
        """True once the server answers PING."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class DnsServer(_StandaloneServer):
    """A real dnsmasq on ``127.0.0.1:PORT``, the only authority for names under ``.test``.

    It answers from a hosts file (``--addn-hosts``) that :meth:`set` rewrites -- then it sends
    SIGHUP and waits until dnsmasq serves the new records. Names under the domain without
    records get NXDOMAIN, a name with A records only gets NODATA for AAAA (at once, no timeout),
    other domains get REFUSED. Records have a TTL of ``ttl`` seconds (``--local-ttl``).
    :meth:`stop` is an outage: queries time out (the port stays bound by a socket that never
    answers) until :meth:`start`. ``port`` defaults to ``$SQLA_REBALANCE_DNS_PORT`` or a port
    free for UDP and TCP, kept across restarts. Waiting uses dnspython.
    """

    kind = "dnsmasq"
    port_env = DNS_PORT_ENV
    dir_prefix = "sqla-rebalance-dns-"

    def __init__(
        self,
        port: int | None = None,
        *,
        ttl: int = 1,
        domain: str = "test",
        host: str = LOCALHOST,
        directory: str | os.PathLike[str] | None = None,
    ) -> None:
        if int(ttl) != ttl or ttl < 0:
            raise ValueError(f"ttl must be a whole number of seconds >= 0, not {ttl!r}")
        domain = domain.lower().strip(".")
        if not domain or not all(_DNS_LABEL.match(label) for label in domain.split(".")):
            raise ValueError(f"not a domain name: {domain!r}")
        self.ttl = int(ttl)
        self.domain = domain
        self._records: dict[str, tuple[str, ...]] = {}
        self._held: list[socket.socket] = []  # while stopped: the port, bound but never answering
        self._names = itertools.count(1)
        super().__init__(host, port, directory)
        # dnsmasq drops root privileges (to 'nobody') and then still reads the hosts file.
        self.directory.chmod(0o755)
        self._write_hosts()

    @property
    def nameserver(self) -> str:
        """``"127.0.0.1:PORT"``, the form of the pool's ``dns_nameservers=`` entries."""
        return self.address

    @property
    def hosts_file(self) -> Path:
        return self.directory / "hosts"

    @property
    def logfile(self) -> Path:
        return self.directory / "dnsmasq.log"

    @property
    def records(self) -> dict[str, list[str]]:
        """The records now served: ``{name: [address, ...]}``."""
        return {name: list(addresses) for name, addresses in self._records.items()}

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<DnsServer {self.nameserver} .{self.domain} {state} {self.directory}>"

    def new_name(self, prefix: str = "db") -> str:
        """A name under the domain not handed out before by this server: ``db-1.test``, ..."""
        return f"{prefix}-{next(self._names)}.{self.domain}"

    # ----------------------------------------------------------------- records

    def set(self, name: str, addresses: Iterable[str], timeout: float = 10.0) -> None:
        """Make ``name`` resolve to exactly ``addresses`` (IPv4 -> A, IPv6 -> AAAA records; only
        loopback addresses) and wait until the server answers so. An empty list removes the name
        (NXDOMAIN). While the server is stopped, the records are served once it starts again."""
        name = self._check_name(name)
        parsed = [ipaddress.ip_address(address) for address in addresses]
        outside = [str(address) for address in parsed if not address.is_loopback]
        if outside:
            raise ValueError(f"only loopback addresses may be served, not {', '.join(outside)}")
        if parsed:
            self._records[name] = tuple(dict.fromkeys(str(address) for address in parsed))
        else:
            self._records.pop(name, None)
        self._write_hosts()
        if self.is_running() and self._proc is not None:
            self._proc.send_signal(signal.SIGHUP)  # re-read the hosts file
            v4 = {str(a) for a in parsed if a.version == 4}
            v6 = {str(a) for a in parsed if a.version == 6}
            self._wait_served(name, v4, v6, time.monotonic() + timeout)

    def remove(self, name: str, timeout: float = 10.0) -> None:
        """Remove ``name`` (NXDOMAIN from now on); waits like :meth:`set`."""
        self.set(name, [], timeout)

    def resolver(self, timeout: float = 2.0) -> Any:
        """A ``dns.resolver.Resolver`` asking only this server (no search list, no cache)."""
        resolver = _dns_resolver().Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        resolver.timeout = resolver.lifetime = timeout
        return resolver

    def lookup(self, name: str, rdtype: str = "A", timeout: float = 2.0) -> list[str] | None:
        """The sorted addresses this server answers for ``name``: None for NXDOMAIN, ``[]`` for
        NODATA. dnspython's exceptions otherwise (``dns.resolver.LifetimeTimeout`` on an outage)."""
        resolver_module = _dns_resolver()
        try:
            answer = self.resolver(timeout).resolve(name, rdtype)
        except resolver_module.NXDOMAIN:
            return None
        except resolver_module.NoAnswer:
            return []
        return sorted(record.to_text() for record in answer)

    # ----------------------------------------------------------------- lifecycle

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start dnsmasq (no-op if running) and wait until it answers queries."""
        if self.is_running():
            return
        self._release_port()
        super().start(timeout)

    def stop(
        self, mode: str = "fast", timeout: float = STOP_TIMEOUT, *, silent: bool = True
    ) -> None:
        """Stop dnsmasq: a DNS outage. With ``silent`` (default), the port stays bound by
        sockets that never answer, so that queries time out as with a host that went away
        (instead of UDP "port unreachable" errors) and nobody else takes the port."""
        was_started = self._proc is not None
        super().stop(mode, timeout)
        if silent and was_started:
            self._hold_port()

    def close(self) -> None:
        super().close()
        self._release_port()

    # ----------------------------------------------------------------- internals

    def _check_name(self, name: str) -> str:
        name = name.lower().rstrip(".")
        labels = name.split(".")
        if not name.endswith(f".{self.domain}") or not all(map(_DNS_LABEL.match, labels)):
            raise ValueError(f"{name!r} is not a host name under .{self.domain}")
        return name

    def _write_hosts(self) -> None:
        lines = ["# Written by tests/servers.py (DnsServer)\n"]
        for name, addresses in sorted(self._records.items()):
            lines += [f"{address} {name}\n" for address in addresses]
        temporary = self.directory / ".hosts.new"
        temporary.write_text("".join(lines))
        temporary.chmod(0o644)
        os.replace(temporary, self.hosts_file)  # never a half-written file for dnsmasq

    def _wait_served(self, name: str, v4: set[str], v6: set[str], deadline: float) -> None:
        dns_exception = _optional_module("dns.exception")
        assert dns_exception is not None  # imported with dns.resolver
        seen: list[object] = []

        def served() -> bool:
            try:
                a = self.lookup(name, "A", timeout=0.5)
                if not (v4 or v6):
                    seen[:] = [a]
                    return a is None
                aaaa = self.lookup(name, "AAAA", timeout=0.5)
            except dns_exception.DNSException as exc:
                seen[:] = [exc]
                return False
            seen[:] = [a, aaaa]
            return a is not None and aaaa is not None and (set(a), set(aaaa)) == (v4, v6)

        if not _poll(served, deadline):
            wanted = sorted(v4 | v6) or "NXDOMAIN"
            raise RuntimeError(
                f"dnsmasq on {self.nameserver} does not serve {name} -> {wanted} in time "
                f"(answers: {seen}); last lines of {self.logfile}:\n{self.log_tail()}"
            )

    def _needs_udp(self) -> bool:
        return True

    def _launch(self) -> None:
        self._write_hosts()
        argv = [
            str(find_program("dnsmasq", "dnsmasq")),
            "--conf-file=/dev/null",  # not /etc/dnsmasq.conf
            "--keep-in-foreground",  # our child: no daemon, no pid file games
            "--log-facility=-",  # stderr, i.e. self.logfile
            "--log-queries",
            f"--listen-address={self.host}",
            "--bind-interfaces",  # bind 127.0.0.1:PORT only, not the wildcard address
            f"--port={self.port}",
            "--no-resolv",  # no upstream servers
            "--no-hosts",  # not /etc/hosts
            f"--addn-hosts={self.hosts_file}",
            f"--local=/{self.domain}/",  # authoritative: unknown names NXDOMAIN, not forwarded
            f"--local-ttl={self.ttl}",
            f"--pid-file={self.directory / 'dnsmasq.pid'}",
        ]
        if not _running_as_root():
            argv.append(f"--user={pwd.getpwuid(os.geteuid()).pw_name}")  # cannot switch users
        self._spawn(argv, cwd=self.directory)

    def _ready(self) -> bool:
        """True once dnsmasq answers a query (TCP first: a closed UDP port looks like a hang)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                pass
        except OSError:
            return False
        dns_exception = _optional_module("dns.exception")
        if _optional_module("dns.resolver") is None or dns_exception is None:
            return True
        try:
            self.lookup(f"ready-probe.{self.domain}", timeout=0.5)
        except dns_exception.Timeout:
            return False
        except dns_exception.DNSException:
            return True  # an answer, if an unexpected one
        return True

    def _hold_port(self) -> None:
        if self._held:
            return
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._held = [udp, tcp]
        for sock in self._held:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        tcp.listen(16)  # connections complete but never get an answer

    def _release_port(self) -> None:
        for sock in self._held:
            sock.close()
        self._held = []


def _dns_resolver() -> Any:
    module = _optional_module("dns.resolver")
    if module is None:
        raise RuntimeError("DnsServer needs dnspython (pip install dnspython)")
    return module


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.servers",
        description="Start test servers on loopback addresses and keep them up until interrupted.",
    )
    parser.add_argument(
        "kind",
        nargs="?",
        default="postgres",
        choices=["postgres", "replica", "mariadb", "redis", "dns"],
        help="postgres (default): PostgreSQL on 127.0.0.2...; replica: PostgreSQL primary "
        "127.0.0.8 + standby 127.0.0.9; mariadb: MariaDB on 127.0.0.12...; redis, dns: 127.0.0.1",
    )
    parser.add_argument(
        "-n", type=int, default=None, help="number of servers (postgres: 4, mariadb: 2)"
    )
    parser.add_argument("--port", type=int, default=None, help="port (default: env or free)")
    parser.add_argument("--base-dir", default=None, help="data directory (default: temporary)")
    parser.add_argument(
        "--record",
        action="append",
        default=[],
        metavar="NAME=ADDR[,ADDR]",
        help="dns: serve these records (repeatable)",
    )
    args = parser.parse_args(argv)
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        lines: list[str] = []
        if args.kind in {"postgres", "mariadb", "replica"}:
            cluster: _Cluster[Any]
            if args.kind == "postgres":
                cluster = PostgresCluster(n=args.n or 4, base_dir=args.base_dir, port=args.port)
            elif args.kind == "mariadb":
                cluster = MariaDBCluster(n=args.n or 2, base_dir=args.base_dir, port=args.port)
            else:
                cluster = PostgresReplicaPair(base_dir=args.base_dir, port=args.port)
            stack.enter_context(cluster)
            lines += [f"  {s.url()}    log: {s.logfile}" for s in cluster.servers]
        elif args.kind == "redis":
            redis = stack.enter_context(RedisServer(args.port, directory=args.base_dir))
            lines.append(f"  {redis.url()}    log: {redis.logfile}")
        else:
            dns = stack.enter_context(DnsServer(args.port, directory=args.base_dir))
            for record in args.record:
                name, _, addresses = record.partition("=")
                dns.set(name, [a for a in addresses.split(",") if a])
            lines.append(f"  nameserver {dns.nameserver}    hosts: {dns.hosts_file}")
            lines.append(f"  log: {dns.logfile}")
            lines.append(f"  dig @{dns.host} -p {dns.port} NAME.{dns.domain}")
        print(f"{args.kind} up in {time.monotonic() - began:.2f}s:", flush=True)
        print("\n".join(lines), flush=True)
        print("Ctrl-C to stop.", flush=True)
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # stop cleanly on kill
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
