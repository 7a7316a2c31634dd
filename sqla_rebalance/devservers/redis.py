"""Redis: one :class:`RedisServer` on 127.0.0.1, without persistence."""

from __future__ import annotations

import os
import pwd
import socket
from collections.abc import Mapping
from pathlib import Path

from ._common import LOCALHOST, _account, _chown, find_program, install_hint
from ._process import _StandaloneServer

REDIS_PORT_ENV = "SQLA_REBALANCE_REDIS_PORT"


def _answers_ping(host: str, port: int) -> bool:
    """Does a Redis (or a sentinel) at ``host:port`` answer PING, within a second?"""
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _redis_account() -> pwd.struct_passwd | None:
    return _account("redis", "Redis", install_hint("redis-server"))


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
        return _answers_ping(self.host, self.port)


class RedisSentinel(_StandaloneServer):
    """One Redis Sentinel on ``127.0.0.1:PORT`` watching ``master`` as ``service``.

    Quorum 1 and short timeouts (down after 1 s, failover timeout 3 s), so that a
    test sees a failover within seconds: stop the master, and the sentinel promotes
    a replica (a :class:`RedisServer` started with ``settings={"replicaof": ...}``).
    """

    kind = "Redis Sentinel"
    port_env = ""
    dir_prefix = "sqla-rebalance-sentinel-"

    def __init__(
        self,
        master: RedisServer,
        service: str = "mymaster",
        port: int | None = None,
        *,
        host: str = LOCALHOST,
        directory: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(host, port, directory)
        self.master = master
        self.service = service

    @property
    def logfile(self) -> Path:
        return self.directory / "sentinel.log"

    def url(self, db: int = 0) -> str:
        """``redis+sentinel://127.0.0.1:PORT/SERVICE/0``"""
        return f"redis+sentinel://{self.host}:{self.port}/{self.service}/{db}"

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<RedisSentinel {self.address} {self.service} {state}>"

    def _launch(self) -> None:
        account = _redis_account()
        config = self.directory / "sentinel.conf"
        # Sentinel rewrites its configuration file: it must be its own, and writable.
        config.write_text(
            f"bind {self.host}\nport {self.port}\ndir {self.directory}\n"
            f"sentinel monitor {self.service} {self.master.host} {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.service} 1000\n"
            f"sentinel failover-timeout {self.service} 3000\n"
            f"sentinel parallel-syncs {self.service} 1\n"
        )
        _chown(account, self.directory)
        _chown(account, config)
        argv = [str(find_program("redis-server", "redis-server")), str(config), "--sentinel"]
        argv += ["--daemonize", "no", "--logfile", ""]
        self._spawn(argv, cwd=self.directory, account=account)

    def _ready(self) -> bool:
        """True once the sentinel answers PING."""
        return _answers_ping(self.host, self.port)
