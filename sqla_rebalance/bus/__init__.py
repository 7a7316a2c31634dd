"""Cluster-wide commands: ``recycle``, ``rebalance``, ``refresh``, ``drain``.

A pool created with ``broadcast=URL`` listens on that bus; anybody with the
secret can then act on every pool of the fleet at once::

    from sqla_rebalance.bus import send_command, wait_for

    sent = send_command("redis://redis.internal:6379/0", "recycle",
                        pool="orders", spread=60, secret=os.environ["SQLA_REBALANCE_SECRET"])
    result = wait_for("redis://redis.internal:6379/0", sent.generation, pool="orders")

Transports, chosen by URL scheme: ``redis://``/``rediss://`` (redis-py),
``postgresql://`` (psycopg; ``LISTEN``/``NOTIFY``) and ``sqlite:///path``
(an embedded bus polling a file, no server). A ``channel=NAME`` query
parameter separates independent fleets on one server.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError
from .base import DEFAULT_CHANNEL, Bus, BusUnavailableError, Subscription, redact, split_channel
from .message import ACTIONS, Command, encode, new_command

__all__ = [
    "ACTIONS",
    "Bus",
    "BusUnavailableError",
    "Command",
    "ProcessStatus",
    "Sent",
    "Subscription",
    "WaitResult",
    "fleet_status",
    "open_bus",
    "send_command",
    "wait_for",
]

_CHANNEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _check_channel(channel: str) -> str:
    if (
        not channel
        or len(channel) > 63
        or not set(channel) <= _CHANNEL_CHARS
        or channel[0].isdigit()
    ):
        raise ConfigurationError(
            f"bus channel must be 1-63 letters, digits or underscores, not starting with a "
            f"digit (it names a Redis key prefix and a PostgreSQL NOTIFY channel), "
            f"got {channel!r}"
        )
    return channel


def open_bus(bus: str | Bus, channel: str | None = None) -> Bus:
    """The bus for ``bus`` (a URL, or a :class:`Bus`, returned as is).

    Raises :class:`~sqla_rebalance.ConfigurationError` for a URL this
    package cannot serve (unknown scheme, driver not installed). Connects
    to nothing: a bus that is down never fails here.
    """
    if isinstance(bus, Bus):
        return bus
    if not isinstance(bus, str) or "://" not in bus:
        raise ConfigurationError(
            "broadcast must be a bus URL (redis://..., postgresql://..., sqlite:///path) "
            f"or a sqla_rebalance.bus.Bus, got {bus!r}"
        )
    url, url_channel = split_channel(bus, channel or DEFAULT_CHANNEL)
    channel = _check_channel(url_channel)
    scheme = url.split("://", 1)[0].lower()
    try:
        if scheme in ("redis", "rediss", "unix"):
            from .redis_bus import RedisBus

            return RedisBus(url, channel)
        if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
            from .postgres_bus import PostgresBus

            return PostgresBus(url, channel)
        if scheme == "sqlite":
            from .sqlite_bus import SQLiteBus

            return SQLiteBus(url, channel)
    except ImportError as err:
        extra = "redis" if scheme.startswith(("redis", "unix")) else "postgresql"
        raise ConfigurationError(
            f"broadcast={redact(bus)} needs the {err.name} package: "
            f"pip install 'sqla-rebalance[{extra}]'"
        ) from err
    except ValueError as err:
        raise ConfigurationError(f"broadcast={redact(bus)}: {err}") from err
    raise ConfigurationError(
        f"broadcast: unknown bus scheme {scheme!r} in {redact(bus)} "
        "(use redis://, rediss://, postgresql:// or sqlite:///path)"
    )


def _secret_bytes(secret: str | bytes | None) -> bytes | None:
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes) or not secret:
        raise ConfigurationError("broadcast_secret must be a non-empty string or bytes")
    return secret


@dataclass(frozen=True)
class Sent:
    """A published command."""

    generation: int
    command: Command
    #: Listeners that received it at once (Redis only; None where unknown).
    receivers: int | None


def send_command(
    bus: str | Bus,
    action: str,
    *,
    pool: str = "*",
    host: str | None = None,
    spread: float = 0.0,
    secret: str | bytes | None,
) -> Sent:
    """Publish one command to every listening process; return its generation.

    ``secret`` signs it (pools with a ``broadcast_secret`` reject anything
    else); pass None explicitly to send an unsigned command to pools
    configured without a secret. Raises :class:`BusUnavailableError` if the
    bus cannot be reached, ``ValueError`` for bad arguments.
    """
    target = open_bus(bus)
    key = _secret_bytes(secret)
    command = new_command(action, pool=pool, host=host, spread=spread)
    built: dict[str, Command] = {}

    def build(gen: int) -> bytes:
        built["command"] = stamped = dataclasses.replace(command, gen=gen)
        return encode(stamped, key)

    gen, receivers = target.publish(build)
    return Sent(generation=gen, command=built["command"], receivers=receivers)


@dataclass(frozen=True)
class ProcessStatus:
    """One live process on the bus (one of its listeners), from its latest heartbeat."""

    #: ``hostname:pid:token.n``: the process, and which of its listeners.
    process: str
    hostname: str
    pid: int
    generation: int
    #: Seconds since the heartbeat was written (by this machine's clock).
    age: float
    pools: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def is_this_process(self) -> bool:
        """True for a listener of the calling process."""
        return self.pid == os.getpid() and self.hostname == socket.gethostname()

    def has_pool(self, pattern: str) -> bool:
        probe = Command(action="recycle", pool=pattern)
        return any(probe.matches(str(p.get("pool", ""))) for p in self.pools)

    def has_applied(self, generation: int, pattern: str = "*") -> bool:
        """True once every pool matching ``pattern`` is done with ``generation``.

        Per pool: a command held back by ``min_recycle_interval`` is not done
        until it is applied, even though the process has received it.
        """
        probe = Command(action="recycle", pool=pattern)
        return all(
            int(p.get("generation", self.generation)) >= generation
            for p in self.pools
            if probe.matches(str(p.get("pool", "")))
        )


def fleet_status(bus: str | Bus) -> list[ProcessStatus]:
    """Every live process listening on ``bus``, with its pools' figures."""
    target = open_bus(bus)
    now = time.time()
    out = []
    for raw in target.heartbeats():
        try:
            data = json.loads(raw)
            out.append(
                ProcessStatus(
                    process=str(data["process"]),
                    hostname=str(data.get("hostname", "")),
                    pid=int(data.get("pid", 0)),
                    generation=int(data.get("generation", 0)),
                    age=max(0.0, now - float(data.get("ts", now))),
                    pools=list(data.get("pools", [])),
                    raw=data,
                )
            )
        except (ValueError, KeyError, TypeError):
            continue  # a heartbeat we cannot read is not a process we can report on
    out.sort(key=lambda p: p.process)
    return out


@dataclass(frozen=True)
class WaitResult:
    """Who has applied a generation, after :func:`wait_for`."""

    generation: int
    applied: list[ProcessStatus]
    #: Live, with a matching pool, and not done yet.
    pending: list[ProcessStatus]
    #: Seen not done during the wait, then gone (exited, or lost the bus).
    lost: list[ProcessStatus] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every live process with a matching pool has applied it (and there was one)."""
        return not self.pending and bool(self.applied)


def wait_for(
    bus: str | Bus,
    generation: int,
    *,
    pool: str = "*",
    timeout: float = 30.0,
    interval: float = 0.1,
) -> WaitResult:
    """Wait until every live process with a pool matching ``pool`` has
    processed ``generation`` (like PgBouncer's ``WAIT_CLOSE``), or ``timeout``.

    A process whose heartbeat expires meanwhile (it exited, or lost the bus)
    is no longer waited for, and is reported in ``lost``. Returns who has and
    who has not; ``complete`` is False when no process has a matching pool.
    """
    target = open_bus(bus)
    deadline = time.monotonic() + timeout
    waiting: dict[str, ProcessStatus] = {}
    while True:
        procs = [p for p in fleet_status(target) if p.has_pool(pool)]
        applied = [p for p in procs if p.has_applied(generation, pool)]
        pending = [p for p in procs if not p.has_applied(generation, pool)]
        waiting.update((p.process, p) for p in pending)
        live = {p.process for p in procs}
        lost = [p for key, p in sorted(waiting.items()) if key not in live]
        if (applied and not pending) or time.monotonic() >= deadline:
            return WaitResult(generation, applied, pending, lost)
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
