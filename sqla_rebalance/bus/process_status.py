"""What a listener's heartbeat says, read back from the bus: :class:`ProcessStatus`.

The reading side of :mod:`.heartbeat` (which writes them). :func:`parse_heartbeat`
validates a heartbeat at the boundary, so that ``sqla-rebalance status``,
``recycle --wait`` and the front ends only ever meet well-formed pool entries
and int counts; what does not parse is junk, which their callers count and skip.
Split out of :mod:`sqla_rebalance.bus`, which re-exports these names and reads
the fleet (and waits on it) with them.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from .base import MAX_GENERATION
from .message import Command

__all__ = ["MAX_HEARTBEAT_BYTES", "ProcessStatus", "parse_heartbeat"]


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

    def _pools(self) -> list[dict[str, Any]]:
        return [p for p in self.pools if isinstance(p, dict)]

    def has_pool(self, pattern: str) -> bool:
        probe = Command(action="recycle", pool=pattern)
        return any(probe.matches(str(p.get("pool", ""))) for p in self._pools())

    def has_applied(self, generation: int, pattern: str = "*") -> bool:
        """True once every pool matching ``pattern`` is done with ``generation``.

        Per pool: a command held back by ``min_recycle_interval`` is not done
        until it is applied, even though the process has received it.
        """
        probe = Command(action="recycle", pool=pattern)
        return all(
            _generation_of(p.get("generation", self.generation)) >= generation
            for p in self._pools()
            if probe.matches(str(p.get("pool", "")))
        )


def _generation_of(value: Any) -> int:
    """A reported generation; anything that is not one counts as nothing applied."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


#: Largest heartbeat read; anything bigger is not one this package wrote.
MAX_HEARTBEAT_BYTES = 1 << 20
_POOL_COUNTS = (
    "open",
    "idle",
    "in_use",
    "pool_size",
    "connects",
    "checkouts_waited",
    "commands_applied",
    "commands_pending",
)
_HOST_COUNTS = ("open", "idle", "in_use")


def _count(obj: dict[str, Any], key: str, default: int | None = 0, top: int = 2**53) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise ValueError(f"{key} is not a count")
    return value


def _text(obj: dict[str, Any], key: str, default: str | None = "", longest: int = 1000) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str) or len(value) > longest:
        raise ValueError(f"{key} is not a string")
    return value


def _finite(obj: dict[str, Any], key: str, default: float) -> float:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} is not a number")
    number = float(value)  # OverflowError for 10**400: a ValueError's sibling, caught too
    if not math.isfinite(number):
        raise ValueError(f"{key} is not finite")
    return number


def _check_pool(pool: Any) -> dict[str, Any]:
    if not isinstance(pool, dict):
        raise ValueError("a pool entry is not an object")
    _text(pool, "pool", None, 200)
    if "generation" in pool:
        _count(pool, "generation", None, MAX_GENERATION)
    for key in _POOL_COUNTS:
        _count(pool, key)
    for key in ("churn_per_min", "retirements"):
        figures = pool.get(key, {})
        if not isinstance(figures, dict):
            raise ValueError(f"{key} is not an object")
        for name in figures:
            _finite(figures, name, 0.0)
    hosts = pool.get("hosts", {})
    if not isinstance(hosts, dict):
        raise ValueError("hosts is not an object")
    for host in hosts.values():
        if not isinstance(host, dict):
            raise ValueError("a host entry is not an object")
        for key in _HOST_COUNTS:
            _count(host, key)
        for key in ("health", "role"):
            if host.get(key) is not None:
                _text(host, key, None, 100)
    return pool


def parse_heartbeat(raw: bytes | str, now: float | None = None) -> ProcessStatus:
    """One heartbeat as read from the bus, validated; ``ValueError`` if it is not
    one this package could have written (junk, or a mistyped field anywhere).

    Validated at the boundary, so that ``status``, ``--wait`` and the front ends
    never meet a pool entry that is not an object or a generation that is not
    an int. Unknown fields are allowed (a newer version may add some).
    """
    now = time.time() if now is None else now
    try:
        if len(raw) > MAX_HEARTBEAT_BYTES:
            raise ValueError("too large")
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        pools = data.get("pools", [])
        if not isinstance(pools, list):
            raise ValueError("pools is not a list")
        process = _text(data, "process", None, 300)
        if not process:
            raise ValueError("no process name")
        return ProcessStatus(
            process=process,
            hostname=_text(data, "hostname", "", 255),
            pid=_count(data, "pid", 0, 2**32),
            generation=_count(data, "generation", 0, MAX_GENERATION),
            age=max(0.0, now - _finite(data, "ts", now)),
            pools=[_check_pool(p) for p in pools],
            raw=data,
        )
    except (ValueError, TypeError, OverflowError, RecursionError) as err:
        raise ValueError(f"not a heartbeat: {err}") from None
