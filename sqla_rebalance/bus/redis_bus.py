"""The Redis bus (``redis://``, ``rediss://`` and ``redis+sentinel://`` URLs; needs redis-py).

``redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/DB]``
finds the master of ``SERVICE`` through Redis Sentinel (the password is the
master's; ``sentinel_password=`` for the sentinels), asked again at each
connect, so that after a failover publishers and listeners reach the new
master: a listener sees its connection drop and reconnects to it.

Keys, all under the channel name (default ``sqla_rebalance``):

- ``<channel>:gen``: the current generation;
- ``<channel>:log``: the last :data:`~.base.LOG_LENGTH` commands, a sorted set
  scored by generation;
- ``<channel>:hb:<process>``: each live listener's heartbeat, with a TTL, and
  ``<channel>:hb``: the set of their names (pruned by readers when one expires);
- pub/sub channel ``<channel>:commands``: the wake-up hint.

A publish is one ``WATCH``/``MULTI`` transaction (generation, log, publish),
so publishers never interleave: generations reach every listener in order.

What is read back is untrusted: a generation key that does not hold a
decimal integer raises :class:`~.base.BusDataError`; one out of range (a junk
``1e15``) is ignored by the next publish, which overwrites it; log entries
are read only within ``(cursor, now + 2 days]`` by score, so a ``+inf`` or
``1e15`` entry is never even returned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

import redis
from redis.client import PubSub
from redis.sentinel import Sentinel

from ..errors import ConfigurationError
from .base import (
    LOG_LENGTH,
    Bus,
    BusDataError,
    BusUnavailableError,
    Subscription,
    log_generation,
    next_generation,
    publish_ceiling,
    read_ceiling,
    redact,
)

__all__ = ["RedisBus"]


_CONNECT_TIMEOUT = 2.0
_SOCKET_TIMEOUT = 5.0
#: A subscribed connection sends a PING this often when idle, so a dead
#: server is noticed even when no command is sent.
_HEALTH_CHECK_INTERVAL = 5


class _PubSub(PubSub):
    """redis-py's PubSub, telling us when it reconnected on its own."""

    owner: _RedisSubscription | None = None

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)
        if self.owner is not None:
            self.owner.reconnected = True


def _stored_generation(bus: RedisBus, value: Any) -> int:
    """The generation key's value as an int (0: none), or BusDataError if it is junk."""
    if value is None:
        return 0
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    if not (1 <= len(text) <= 20 and text.isdigit() and text.isascii()):
        raise BusDataError(
            f"redis {bus.display_url}: the key {bus.channel}:gen holds {text[:40]!r}, not a "
            "generation (written by something else?): DEL it, and the next command "
            "starts again from the clock"
        )
    return int(text)


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
    sentinels = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon:
            host, port = port, "26379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigurationError(
                f"{redact(url)}: each sentinel must be host:port, got {item.strip()!r}"
            )
        sentinels.append((host, int(port)))
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


class RedisBus(Bus):
    schemes = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")

    def __init__(self, url: str, channel: str = "sqla_rebalance") -> None:
        super().__init__(url, channel)
        #: The Sentinel set-up of a ``redis+sentinel://`` URL (None: a plain URL).
        self.sentinel = (
            _sentinel_target(url) if url.lower().startswith(("redis+", "rediss+")) else None
        )

    def _keys(self) -> tuple[str, str, str]:
        c = self.channel
        return f"{c}:gen", f"{c}:log", f"{c}:commands"

    def client(self) -> redis.Redis:
        """A new client (connections are made lazily, one pool per client)."""
        options: dict[str, Any] = {
            "socket_connect_timeout": _CONNECT_TIMEOUT,
            "socket_timeout": _SOCKET_TIMEOUT,
            "socket_keepalive": True,
            "health_check_interval": _HEALTH_CHECK_INTERVAL,
            "client_name": "sqla-rebalance",
        }
        target = self.sentinel
        if target is None:
            return redis.Redis.from_url(self.url, **options)
        sentinel = Sentinel(
            target.sentinels,
            sentinel_kwargs={
                "socket_connect_timeout": _CONNECT_TIMEOUT,
                "socket_timeout": _SOCKET_TIMEOUT,
                "password": target.sentinel_password,
            },
            socket_connect_timeout=_CONNECT_TIMEOUT,
        )
        # The master is looked up again at each (re)connect of this client.
        master: redis.Redis = sentinel.master_for(
            target.service,
            db=target.db,
            username=target.username,
            password=target.password,
            ssl=target.ssl,
            **options,
        )
        return master

    def publish(self, build: Callable[[int], bytes]) -> tuple[int, int | None]:
        gen_key, log_key, channel = self._keys()
        out: dict[str, int] = {}

        def txn(pipe: Any) -> None:
            # Out of range (beyond now + 1 day, or int64): ignored, and overwritten.
            gen = next_generation(_stored_generation(self, pipe.get(gen_key)))
            data = build(gen)
            pipe.multi()
            pipe.set(gen_key, gen)
            pipe.zadd(log_key, {data: gen})
            pipe.zremrangebyrank(log_key, 0, -LOG_LENGTH - 1)
            pipe.publish(channel, data)
            out["gen"] = gen

        client = self.client()
        try:
            result = client.transaction(txn, gen_key)
        except redis.RedisError as err:
            raise self._error(err) from err
        finally:
            client.close()
        receivers = cast("list[Any]", result)[-1]
        return out["gen"], receivers if isinstance(receivers, int) else None

    def _error(self, err: Exception) -> BusUnavailableError:
        return self.error("redis", err)

    def generation(self) -> int:
        client = self.client()
        try:
            return _current(self, client.get(self._keys()[0]))
        except redis.RedisError as err:
            raise self._error(err) from err
        finally:
            client.close()

    def heartbeats(self) -> list[bytes]:
        # An index set of the heartbeat keys, not a SCAN of the whole database:
        # ``recycle --wait`` reads this several times a second.
        index = f"{self.channel}:hb"
        client = self.client()
        try:
            # Keys as bytes: a junk member (not UTF-8) must not break the read.
            members = sorted(
                m if isinstance(m, bytes) else str(m).encode() for m in client.smembers(index)
            )
            prefix = f"{self.channel}:hb:".encode()
            keys = [prefix + m for m in members]
            values = client.mget(keys) if keys else []
            gone = [m for m, v in zip(members, values, strict=True) if v is None]
            if gone:  # expired: the process exited or lost the bus
                client.srem(index, *gone)
        except redis.RedisError as err:
            raise self._error(err) from err
        finally:
            client.close()
        return [v if isinstance(v, bytes) else str(v).encode() for v in values if v is not None]

    def subscribe(self) -> Subscription:
        return _RedisSubscription(self)


def _current(bus: RedisBus, value: Any) -> int:
    """The current generation for readers: junk raises, out of range reads as 0."""
    gen = _stored_generation(bus, value)
    return gen if gen <= publish_ceiling() else 0


class _RedisSubscription(Subscription):
    def __init__(self, bus: RedisBus) -> None:
        self._bus = bus
        self._gen_key, self._log_key, channel = bus._keys()
        self._client = bus.client()
        self._pubsub = _PubSub(self._client.connection_pool, ignore_subscribe_messages=True)
        self._pubsub.owner = self
        try:
            self._pubsub.subscribe(channel)
        except redis.RedisError as err:
            self.close()
            raise bus._error(err) from err

    def _fail(self, err: Exception) -> BusUnavailableError:
        return self._bus._error(err)

    def get(self, timeout: float) -> bytes | None:
        try:
            msg = self._pubsub.get_message(timeout=timeout)
        except (redis.RedisError, OSError, ValueError) as err:
            # ValueError: redis-py reading from a connection closed under it.
            raise self._fail(err) from err
        if msg is None or msg.get("type") != "message":
            return None
        data = msg.get("data")
        return data if isinstance(data, bytes) else str(data).encode()

    def generation(self) -> int:
        try:
            return _current(self._bus, self._client.get(self._gen_key))
        except redis.RedisError as err:
            raise self._fail(err) from err

    def since(self, gen: int, limit: int = LOG_LENGTH) -> list[tuple[int, bytes]]:
        ceiling = read_ceiling()
        if gen >= ceiling:
            return []
        try:
            rows = self._client.zrangebyscore(
                self._log_key, f"({gen}", ceiling, start=0, num=limit, withscores=True
            )
        except redis.RedisError as err:
            raise self._fail(err) from err
        out = []
        for member, score in cast("list[Any]", rows):
            position = log_generation(score, gen, ceiling)
            if position is not None:
                out.append(
                    (position, member if isinstance(member, bytes) else str(member).encode())
                )
        return out

    def put_heartbeat(self, process: str, payload: bytes, ttl: float) -> None:
        if not self._can_heartbeat:
            return
        channel = self._bus.channel
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.set(f"{channel}:hb:{process}", payload, px=max(1, int(ttl * 1000)))
            pipe.sadd(f"{channel}:hb", process)
            pipe.execute()
        except redis.exceptions.NoPermissionError as err:  # an ACL without SET/SADD
            self.heartbeats_refused(self._bus, err)
        except redis.RedisError as err:
            raise self._fail(err) from err

    def close(self) -> None:
        self._pubsub.owner = None
        for close in (self._pubsub.close, self._client.close):
            with contextlib.suppress(Exception):  # closing must never raise into the listener
                close()
