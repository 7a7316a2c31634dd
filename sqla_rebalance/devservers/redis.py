"""Redis on 127.0.0.1, without persistence: one :class:`RedisServer`, a
:class:`RedisSentinel` watching one, or a :class:`RedisCluster` of several nodes."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from ._common import (
    LOCALHOST,
    START_TIMEOUT,
    STOP_TIMEOUT,
    _account,
    _chown,
    _poll,
    _port_is_free,
    default_parent_dir,
    find_free_port,
    find_program,
    install_hint,
)
from ._process import _register, _StandaloneServer, _start_all, _unregister

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


# --------------------------------------------------------------------------- Redis Cluster

#: Hash slots of a Redis Cluster.
CLUSTER_SLOTS = 16384
#: A node's cluster bus listens on its port + this (Redis' default ``cluster-port``).
_BUS_PORT_OFFSET = 10000


class _RespError(Exception):
    """An error reply (``-ERR ...``) from a server."""


def _read_reply(reader: Any) -> Any:
    """One RESP2 reply from ``reader`` (a binary file of a socket)."""
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed in the middle of a reply")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        return _RespError(body.decode(errors="replace"))
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        data: bytes = reader.read(size + 2)[:-2]
        return data
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise ConnectionError(f"not a RESP reply: {line[:40]!r}")


def _request(*args: str | int) -> bytes:
    parts = [str(a).encode() for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def _command(
    host: str, port: int, *args: str | int, password: str | None = None, timeout: float = 2.0
) -> Any:
    """Send one command to ``host:port`` (after ``AUTH password``, if given) and return
    its reply (``_RespError`` raised).

    A few lines of RESP, so that the servers need no client library.
    """
    with (
        socket.create_connection((host, port), timeout=timeout) as sock,
        sock.makefile("rb") as reader,
    ):
        if password is not None:
            sock.sendall(_request("AUTH", password))
            reply = _read_reply(reader)
            if isinstance(reply, _RespError):
                raise reply
        sock.sendall(_request(*args))
        reply = _read_reply(reader)
    if isinstance(reply, _RespError):
        raise reply
    return reply


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _info_fields(text: str) -> dict[str, str]:
    """``CLUSTER INFO`` (or ``INFO``) as a dict."""
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip()] = value.strip()
    return fields


def _free_cluster_port(host: str, taken: set[int]) -> int:
    """A free port whose cluster bus port (+10000) is free too, not in ``taken``."""
    for _ in range(200):
        port = find_free_port([host])
        bus = port + _BUS_PORT_OFFSET
        if port not in taken and bus not in taken and _port_is_free(host, bus):
            return port
    raise RuntimeError(f"no free pair of ports (port, port + {_BUS_PORT_OFFSET}) on {host}")


class _ClusterNode(RedisServer):
    """One node of a :class:`RedisCluster` (named so in errors)."""

    kind = "Redis Cluster node"

    def _ready(self) -> bool:
        """True once the node answers PING (``NOAUTH``: it answers, and wants a password)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<Redis Cluster node {self.address} {state}>"


class RedisCluster:
    """A Redis Cluster of ``n`` masters (``replicas`` replicas each) on ``127.0.0.1``.

    Every node is a :class:`RedisServer` (``.nodes``; masters first, then the replicas in
    the order of their masters) in cluster mode, without persistence, each in its own
    directory (with its ``nodes.conf``) under one temporary directory, on a free port whose
    cluster bus port (port + 10000) is free too. :meth:`start` assigns the slots evenly to
    the masters, joins the nodes (``CLUSTER MEET``, then ``CLUSTER REPLICATE``) and returns
    once every node says ``cluster_state:ok``, knows every other node and sees every slot
    served. :meth:`url` gives ``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,.../``.

    ``node_timeout`` (ms) is ``cluster-node-timeout``: how long a node may be unreachable
    (stopped, or frozen with :meth:`RedisServer.freeze`) before the others mark it failed,
    and a replica of a failed master takes over. ``cluster-require-full-coverage`` is
    ``no``, so that the slots of the healthy masters stay served while one master is
    down; ``settings`` are extra ``redis-server`` options for every node, which win.

    A node stopped or frozen by a test is a host failure; :meth:`ensure_running` thaws and
    restarts them (a node restarts empty, keeping its identity in ``nodes.conf``) and waits
    until the cluster is healthy again. :meth:`node_for` tells which node serves a key now
    (after a failover, a former replica). :meth:`close` stops everything and removes the
    directory.
    """

    kind = "Redis Cluster"
    dir_prefix = "sqla-rebalance-redis-cluster-"
    #: stopped before lone servers at interpreter exit, like the other clusters
    _at_exit_first = True

    def __init__(
        self,
        n: int = 3,
        *,
        replicas: int = 0,
        node_timeout: int = 2000,
        host: str = LOCALHOST,
        password: str | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("n must be at least 1 (masters)")
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        self.n = n
        self.replicas = replicas
        self.node_timeout = node_timeout
        self.host = host
        self.password = password
        self._owns_base_dir = base_dir is None
        if base_dir is None:
            base_dir = tempfile.mkdtemp(prefix=self.dir_prefix, dir=default_parent_dir())
        self.base_dir = Path(base_dir).absolute()
        self.settings = {
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-node-timeout": str(node_timeout),
            "cluster-require-full-coverage": "no",
            **({"requirepass": password, "masterauth": password} if password else {}),
            **dict(settings or {}),
        }
        self.nodes: list[RedisServer] = []
        self._started = False
        _register(self)  # so that the temporary directory goes away at exit

    def __repr__(self) -> str:
        state = "started" if self._started else "stopped"
        ports = ",".join(str(node.port) for node in self.nodes) or "-"
        return f"<RedisCluster {self.n}x{1 + self.replicas} ports {ports} {state}>"

    def __enter__(self) -> RedisCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------- addresses

    @property
    def addresses(self) -> list[str]:
        """``["127.0.0.1:P1", ...]``: every node, masters first."""
        return [node.address for node in self.nodes]

    def url(self, scheme: str = "redis+cluster") -> str:
        """``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,.../`` (every node is a seed;
        ``redis+cluster://:PASSWORD@...`` with a password)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"{scheme}://{auth}{','.join(self.addresses)}/"

    def keyslot(self, key: str) -> int:
        """The hash slot of ``key`` (asked of a running node: ``CLUSTER KEYSLOT``)."""
        return int(self._ask("CLUSTER", "KEYSLOT", key))

    def node_for(self, key: str) -> RedisServer:
        """The node that serves ``key`` now (the master of its slot)."""
        slot = self.keyslot(key)
        for entry in self._ask("CLUSTER", "SLOTS"):
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            if start <= slot <= end:
                port = int(master[1])
                for node in self.nodes:
                    if node.port == port:
                        return node
        raise RuntimeError(f"no node of {self!r} serves slot {slot} (of {key!r})")

    def others(self, key: str) -> list[RedisServer]:
        """The masters that do *not* serve ``key`` now."""
        owner = self.node_for(key)
        masters = {int(e[2][1]) for e in self._ask("CLUSTER", "SLOTS")}
        return [node for node in self.nodes if node.port in masters and node is not owner]

    # ----------------------------------------------------------------- lifecycle

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start every node, build the cluster, and wait until it is healthy.

        On failure everything is stopped and removed again, and RuntimeError carries the
        failing node's log tail.
        """
        if self._started:
            self.ensure_running(timeout)
            return
        _register(self)
        deadline = time.monotonic() + timeout
        try:
            find_program("redis-server", "redis-server")  # fail early, with the install hint
            self.base_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            _chown(_redis_account(), self.base_dir)  # the nodes' directories are below it
            for attempt in range(3):
                self._make_nodes()
                try:
                    _start_all(self.nodes, deadline)
                    break
                except RuntimeError:
                    self._stop_nodes("immediate")
                    if attempt == 2 or not any(node._bind_failed() for node in self.nodes):
                        raise
                    # Somebody took a port between our probe and the bind: other ports.
            self._join(deadline)
            self._wait_healthy(deadline)
        except BaseException:
            self.close()
            raise
        self._started = True

    def ensure_running(self, timeout: float = START_TIMEOUT) -> None:
        """Thaw every frozen node, restart every stopped one, and wait until the cluster is
        healthy again (every node ``cluster_state:ok``, every slot served)."""
        if not self._started:
            self.start(timeout)
            return
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            node.thaw()
        stopped = [node for node in self.nodes if not node.is_running()]
        if stopped:
            _start_all(stopped, deadline)
        self._wait_healthy(deadline)

    def stop(self, mode: str = "fast") -> None:
        """Stop every node (kept: :meth:`start` builds a new cluster, :meth:`close` removes)."""
        self._stop_nodes(mode)
        self._started = False

    def close(self) -> None:
        """Stop every node for good and remove the temporary directory."""
        self._stop_nodes("immediate")
        self._started = False
        if self._owns_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        else:
            for node in self.nodes:
                shutil.rmtree(node.directory, ignore_errors=True)
        _unregister(self)

    def _at_exit(self) -> None:
        self.close()

    # ----------------------------------------------------------------- internals

    def _make_nodes(self) -> None:
        """New nodes on fresh ports, in fresh directories (none started yet)."""
        for node in self.nodes:
            shutil.rmtree(node.directory, ignore_errors=True)
            _unregister(node)
        taken: set[int] = set()
        self.nodes = []
        for i in range(self.n * (1 + self.replicas)):
            port = _free_cluster_port(self.host, taken)
            taken |= {port, port + _BUS_PORT_OFFSET}
            directory = self.base_dir / f"node-{i}"
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(mode=0o700)
            node = _ClusterNode(port, host=self.host, directory=directory, settings=self.settings)
            self.nodes.append(node)

    def _stop_nodes(self, mode: str) -> None:
        for node in self.nodes:
            node._signal_stop(mode)
        for node in self.nodes:
            node._wait_stopped(STOP_TIMEOUT)

    def _on(self, node: RedisServer, *args: str | int) -> Any:
        """A command's reply from ``node`` (authenticated with the cluster's password)."""
        return _command(node.host, node.port, *args, password=self.password)

    def _ask(self, *args: str | int) -> Any:
        """A command's reply from the first running, not frozen, node that answers."""
        error: Exception | None = None
        for node in self.nodes:
            if node.is_running() and not node.is_frozen:
                try:
                    return self._on(node, *args)
                except (OSError, _RespError) as exc:
                    error = exc
        raise RuntimeError(f"no node of {self!r} answered {' '.join(map(str, args))}: {error}")

    def _join(self, deadline: float) -> None:
        masters, replicas = self.nodes[: self.n], self.nodes[self.n :]
        # Distinct config epochs, as redis-cli --cluster create sets them: no collisions
        # to resolve before the slots settle.
        for epoch, node in enumerate(self.nodes, 1):
            self._on(node, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for i, node in enumerate(masters):
            first = i * CLUSTER_SLOTS // self.n
            last = (i + 1) * CLUSTER_SLOTS // self.n - 1
            self._on(node, "CLUSTER", "ADDSLOTSRANGE", first, last)
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            self._on(seed, "CLUSTER", "MEET", node.host, node.port)
        if not replicas:
            return
        total = len(self.nodes)

        def everyone_known() -> bool:
            return all(self._known_nodes(node) == total for node in self.nodes)

        if not _poll(everyone_known, deadline, longest=0.05):
            raise self._failure("did not learn of every node in time")
        for i, node in enumerate(replicas):
            master = masters[i % self.n]
            master_id = _text(self._on(master, "CLUSTER", "MYID"))
            self._on(node, "CLUSTER", "REPLICATE", master_id)

    def _known_nodes(self, node: RedisServer) -> int:
        try:
            info = _info_fields(_text(self._on(node, "CLUSTER", "INFO")))
        except (OSError, _RespError):
            return 0
        return int(info.get("cluster_known_nodes", "0"))

    def _healthy(self, node: RedisServer) -> bool:
        """Does ``node`` see the whole cluster up: state ok, every node known, every slot
        served by a master it considers healthy, and (a replica) its master's link up?"""
        try:
            info = _info_fields(_text(self._on(node, "CLUSTER", "INFO")))
            if not (
                info.get("cluster_state") == "ok"
                and info.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
                and info.get("cluster_known_nodes") == str(len(self.nodes))
                and info.get("cluster_slots_pfail") == "0"
                and info.get("cluster_slots_fail") == "0"
            ):
                return False
            replication = _info_fields(_text(self._on(node, "INFO", "replication")))
        except (OSError, _RespError):
            return False
        return replication.get("role") != "slave" or replication.get("master_link_status") == "up"

    def _wait_healthy(self, deadline: float) -> None:
        pending = list(self.nodes)

        def all_healthy() -> bool:
            for node in pending:
                node._poll_ready()  # RuntimeError with the log tail if it exited
            pending[:] = [node for node in pending if not self._healthy(node)]
            return not pending

        if not _poll(all_healthy, deadline, longest=0.05):
            node = pending[0]
            raise node._start_failure(f"did not see {self!r} healthy in time")

    def _failure(self, why: str) -> RuntimeError:
        tails = "\n".join(f"--- {node.address}:\n{node.log_tail(10)}" for node in self.nodes)
        return RuntimeError(f"{self!r} {why}; last lines of the nodes' logs:\n{tails}")
