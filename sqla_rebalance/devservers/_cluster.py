"""``n`` servers of one kind on consecutive loopback addresses, sharing one port."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Generic, TypeVar

from ._common import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    _port_from_env,
    _port_is_free,
    default_parent_dir,
    find_free_port,
    loopback_addresses,
)
from ._process import _register, _ServerProcess, _start_all, _unregister

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
    #: stopped before lone servers at interpreter exit (it stops its servers in parallel)
    _at_exit_first: ClassVar[bool] = True

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
            base_dir = tempfile.mkdtemp(prefix=self.dir_prefix, dir=default_parent_dir())
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
