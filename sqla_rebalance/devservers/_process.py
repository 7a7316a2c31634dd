"""A server program run as a direct child of this process, and the clean-up at exit.

:class:`_ServerProcess` is the base of every server: start (with retries on another port when
the port was taken meanwhile), stop like a host going away, freeze (a *hung* host), log tail.
:class:`_StandaloneServer` adds a temporary directory and an automatic port for servers that
come one at a time (Redis, dnsmasq). Servers and clusters still running at interpreter exit are
stopped and their temporary directories removed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from ._common import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    _as_account,
    _chown,
    _descendants,
    _poll,
    _port_from_env,
    _tail,
    default_parent_dir,
    find_free_port,
)

_BIND_FAILURE = re.compile(r"could not bind|address already in use", re.IGNORECASE)

# --------------------------------------------------------------------------- registry for atexit

_OWNER_PID = os.getpid()
_live: set[Any] = set()  # servers and clusters with an ``_at_exit()`` method
_registry_lock = threading.Lock()


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
    # Clusters first (``_at_exit_first``): they stop their servers in parallel.
    for thing in sorted(_live, key=lambda t: not getattr(t, "_at_exit_first", False)):
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
            log.write(f"\n=== sqla_rebalance.devservers: starting {self.address}\n".encode())
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
            directory = tempfile.mkdtemp(prefix=self.dir_prefix, dir=default_parent_dir())
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
