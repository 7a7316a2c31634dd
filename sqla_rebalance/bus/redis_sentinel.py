"""Redis Sentinel for the Redis bus: ``redis+sentinel://`` URLs, parsed, and the client.

``redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/DB]``
finds the master of ``SERVICE`` through Redis Sentinel (the password is the
master's; ``sentinel_password=`` for the sentinels), asked again at each
connect, so that after a failover publishers and listeners reach the new
master: a listener sees its connection drop and reconnects to it.

Split out of :mod:`.redis_bus`, which calls :func:`_sentinel_target` when a bus
is made (a malformed URL is refused at once) and :func:`master_client` in place
of ``redis.Redis.from_url`` for each client of such a bus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

import redis
from redis.sentinel import Sentinel

from ..errors import ConfigurationError
from .base import host_ports, redact

__all__ = ["master_client"]


@dataclass(frozen=True)
class _SentinelTarget:
    """A ``redis+sentinel://`` URL, parsed."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None
    sentinel_password: str | None
    ssl: bool


def _sentinel_target(url: str) -> _SentinelTarget:
    scheme, _, rest = url.partition("://")
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = host_ports(url, hosts, 26379, "sentinel")
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ConfigurationError(
            f"{redact(url)}: a Sentinel bus URL is redis+sentinel://host:port[,host:port...]"
            "/SERVICE[/DB]"
        )
    options = dict(parse_qsl(query))
    unknown = set(options) - {"sentinel_password"}
    if unknown:
        raise ConfigurationError(
            f"{redact(url)}: unknown parameter(s) {', '.join(sorted(unknown))} "
            "(a Sentinel bus URL takes channel= and sentinel_password=)"
        )
    return _SentinelTarget(
        sentinels=sentinels,
        service=unquote(parts[0]),
        db=int(parts[1]) if len(parts) == 2 else 0,
        username=username,
        password=password,
        sentinel_password=options.get("sentinel_password"),
        ssl=scheme.lower().startswith("rediss"),
    )


def master_client(
    target: _SentinelTarget, options: dict[str, Any], connect_timeout: float, socket_timeout: float
) -> redis.Redis:
    """A client of ``target``'s master, with the connection ``options``: the
    master is looked up again at each (re)connect of this client. The sentinels
    are asked within ``connect_timeout`` and ``socket_timeout``."""
    sentinel = Sentinel(
        target.sentinels,
        sentinel_kwargs={
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": socket_timeout,
            "password": target.sentinel_password,
        },
        socket_connect_timeout=connect_timeout,
    )
    master: redis.Redis = sentinel.master_for(
        target.service,
        db=target.db,
        username=target.username,
        password=target.password,
        ssl=target.ssl,
        **options,
    )
    return master
