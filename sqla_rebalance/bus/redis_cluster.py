"""The Redis Cluster bus (``redis+cluster://`` and ``rediss+cluster://`` URLs; needs redis-py).

``redis+cluster://[user:password@]host:port[,host:port...][/][?options]``
names seed nodes: a client asks the first that answers for the slot map
(``CLUSTER SLOTS``), then talks to the master that serves the channel's
slot. The query takes redis-py's connection options (``password=``,
``username=``, ``ssl_*`` with ``rediss+cluster://``...) as for ``redis://``;
the database can only be 0.

Keys, all under one hash tag, the channel name (default ``sqla_rebalance``),
so that they live in one slot and one master serves them all:

- ``{<channel>}:gen``: the current generation;
- ``{<channel>}:log``: the last :data:`~.base.LOG_LENGTH` commands, a sorted
  set scored by generation;
- ``{<channel>}:hb:<process>``: each live listener's heartbeat, with a TTL,
  and ``{<channel>}:hb``: the set of their names (pruned by readers when one
  expires);
- the sharded pub/sub channel ``{<channel>}:commands`` (``SPUBLISH`` /
  ``SSUBSCRIBE``, Redis >= 7.0): the wake-up hint, delivered by the shard
  that holds the keys, not broadcast over the whole cluster bus.

A publish reads the generation, then runs one Lua script on the slot that
sets the next generation only if the stored one is still the one read
(compare-and-set), adds the command to the log, trims it and ``SPUBLISH``-es
it: atomic, like the ``WATCH``/``MULTI`` transaction of the Redis bus, and
retried when another publisher came first. So generations reach every
listener in order.

A listener subscribes on the master of the channel's slot. When that
connection drops (the master stopped, failed over, or the slot moved away:
the server then ends the subscription with ``sunsubscribe``), the listener
reconnects, asks the cluster again who serves the slot, and re-reads the log.

What is read back is untrusted and validated as by the Redis bus
(:mod:`.redis_bus`), with the same helpers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.client import PubSub
from redis.cluster import REDIS_ALLOWED_KEYS, ClusterNode, RedisCluster
from redis.connection import SSLConnection, parse_url
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from ..errors import ConfigurationError
from .base import (
    LOG_LENGTH,
    Ack,
    Bus,
    BusUnavailableError,
    Subscription,
    host_ports,
    next_generation,
    read_ceiling,
    redact,
)
from .redis_bus import (
    _CONNECT_TIMEOUT,
    _SOCKET_TIMEOUT,
    FleetReads,
    _current,
    _log_entries,
    _stored_generation,
    ack_commands,
    heartbeat_written,
)

__all__ = ["RedisClusterBus"]

#: What redis-py raises: a RedisClusterException (no node reachable, no slot
#: map) is not a RedisError.
_ERRORS = (redis.RedisError, RedisClusterException, OSError)

#: Retries of one command by the cluster client (after a MOVED, a refused or
#: timed-out node...), so that a command's worst case stays a few socket
#: timeouts, as with the Redis bus.
_RETRIES = 2

#: Seconds a publish keeps retrying when other publishers keep moving the
#: generation between its read and its compare-and-set.
_PUBLISH_DEADLINE = 10.0

#: KEYS: generation, log, shard channel. ARGV: whether the generation existed
#: ("1"/"0"), its value as read, the new generation, the message, the log
#: length. Returns -1 when the generation moved since it was read, else what
#: SPUBLISH returns (the subscribers of this shard that received it).
_PUBLISH_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if current ~= ARGV[2] then return -1 end
elseif current then
  return -1
end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[5]) - 1)
return redis.call('SPUBLISH', KEYS[3], ARGV[4])
"""


@dataclass(frozen=True)
class _ClusterTarget:
    """A ``redis+cluster://`` URL, parsed: the seeds and redis-py's connection options."""

    seeds: list[tuple[str, int]]
    options: dict[str, Any]
    ssl: bool


def _cluster_target(url: str) -> _ClusterTarget:
    scheme, _, rest = url.partition("://")
    netloc, _, tail = rest.partition("/")
    netloc, qmark, query = netloc.partition("?")
    if qmark:  # redis+cluster://host:port?password=... (no slash before the query)
        tail = f"?{query}"
    path, _, query = tail.partition("?")
    userinfo, at, hosts = netloc.rpartition("@")
    seeds = host_ports(url, hosts, 6379, "seed node")
    if path.strip("/") not in ("", "0"):
        raise ConfigurationError(
            f"{redact(url)}: a Redis Cluster has only database 0; a cluster bus URL is "
            "redis+cluster://host:port[,host:port...][/][?options]"
        )
    ssl = scheme.lower().startswith("rediss")
    # redis-py parses the credentials and the query, as for a redis:// URL.
    first = f"{quote(seeds[0][0])}:{seeds[0][1]}"
    single = f"{'rediss' if ssl else 'redis'}://{userinfo}{at}{first}/"
    try:
        options = parse_url(f"{single}?{query}" if query else single)  # type: ignore[no-untyped-call]
    except ValueError as err:
        raise ConfigurationError(f"{redact(url)}: {redact(str(err), url)}") from err
    for name in ("host", "port", "connection_class"):
        options.pop(name, None)
    if options.pop("db", 0) != 0:
        raise ConfigurationError(f"{redact(url)}: a Redis Cluster has only database 0")
    unknown = {name for name in options if name not in REDIS_ALLOWED_KEYS} | (
        set(options) & {"retry", "connection_pool", "unix_socket_path", "redis_connect_func"}
    )
    if unknown:
        raise ConfigurationError(
            f"{redact(url)}: unknown or unsupported parameter(s) {', '.join(sorted(unknown))} "
            "for a Redis Cluster bus"
        )
    return _ClusterTarget(seeds=seeds, options=options, ssl=ssl)


class _SlotClient(RedisCluster):
    """redis-py's cluster client, sending the commands that name no key (``COMMAND``,
    which it runs when it is created, and any other) to the master of the channel's
    slot rather than to the first or a random master: the bus depends on that node
    only, and a hung master elsewhere must not cost it a socket timeout."""

    _home_key: str = ""

    def __init__(self, home_key: str, **kwargs: Any) -> None:
        self._home_key = home_key
        super().__init__(**kwargs)

    def _home(self) -> ClusterNode | None:
        try:
            return cast("ClusterNode | None", self.get_node_from_key(self._home_key))  # type: ignore[no-untyped-call]
        except Exception:  # no slot map yet, or the slot is not served: redis-py's choice
            return None

    def get_default_node(self) -> ClusterNode:
        return self._home() or cast(ClusterNode, super().get_default_node())  # type: ignore[no-untyped-call]

    def get_keyless_target_node(self, command_name: str) -> ClusterNode:
        return self._home() or super().get_keyless_target_node(command_name)


@dataclass(frozen=True)
class _Named:
    """What the Redis bus's validation helpers read of a bus, in its error messages: the
    URL shown and the key prefix (here the hash tag, ``{channel}``)."""

    display_url: str
    channel: str


class RedisClusterBus(FleetReads, Bus):
    _read_errors = _ERRORS

    schemes = ("redis+cluster", "rediss+cluster")

    def __init__(self, url: str, channel: str = "sqla_rebalance") -> None:
        super().__init__(url, channel)
        #: The seed nodes and connection options of the URL.
        self.target = _cluster_target(url)
        self._init_fleet_reads()

    def _keys(self) -> tuple[str, str, str]:
        tag = f"{{{self.channel}}}"
        return f"{tag}:gen", f"{tag}:log", f"{tag}:commands"

    def _hb_keys(self) -> tuple[str, str]:
        """The heartbeat index and the prefix of the heartbeat keys."""
        tag = f"{{{self.channel}}}"
        return f"{tag}:hb", f"{tag}:hb:"

    def _named(self) -> Any:
        """For ``_stored_generation`` / ``_current``: their errors name ``{channel}:gen``."""
        return _Named(self.display_url, f"{{{self.channel}}}")

    def client(self, retries: int = _RETRIES) -> RedisCluster:
        """A new cluster client; it reads the slot map from a seed at once (raises
        redis-py's errors when no seed answers). ``retries``: of each command."""
        options: dict[str, Any] = {
            "socket_connect_timeout": _CONNECT_TIMEOUT,
            "socket_timeout": _SOCKET_TIMEOUT,
            "socket_keepalive": True,
            "client_name": "sqla-rebalance",
        }
        if self.target.ssl:
            options["ssl"] = True
            options["connection_class"] = SSLConnection
        options.update(self.target.options)  # the URL's own options win, as with from_url
        seeds = [ClusterNode(host, port) for host, port in self.target.seeds]  # type: ignore[no-untyped-call]
        return _SlotClient(
            self._keys()[0],
            startup_nodes=seeds,
            # Only the channel's slot matters: a shard down elsewhere must not stop the bus.
            require_full_coverage=False,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries),
            **options,
        )

    def _error(self, err: BaseException) -> BusUnavailableError:
        return self.error("redis cluster", err)

    def publish(self, build: Callable[[int], bytes]) -> tuple[int, int | None]:
        gen_key, log_key, channel = self._keys()
        deadline = time.monotonic() + _PUBLISH_DEADLINE
        client = None
        try:
            client = self.client()
            while True:
                raw = client.get(gen_key)
                # Junk raises BusDataError; out of range (beyond now + 1 day) is ignored.
                gen = next_generation(_stored_generation(self._named(), raw))
                data = build(gen)
                expected = b"" if raw is None else raw
                result = client.eval(
                    _PUBLISH_SCRIPT,
                    3,
                    gen_key,
                    log_key,
                    channel,
                    "0" if raw is None else "1",
                    expected,
                    gen,
                    data,
                    LOG_LENGTH,
                )
                receivers = int(cast(Any, result))
                if receivers >= 0:
                    return gen, receivers
                if time.monotonic() >= deadline:
                    raise BusUnavailableError(
                        f"redis cluster {self.display_url}: other publishers kept moving "
                        f"{gen_key} for {_PUBLISH_DEADLINE:g}s; nothing was published"
                    )
        except _ERRORS as err:
            raise self._error(err) from err
        finally:
            if client is not None:
                client.close()

    def generation(self) -> int:
        client = None
        try:
            client = self.client()
            return _current(self._named(), client.get(self._keys()[0]))
        except _ERRORS as err:
            raise self._error(err) from err
        finally:
            if client is not None:
                client.close()

    def _key_base(self) -> str:
        return f"{{{self.channel}}}"

    def subscribe(self) -> Subscription:
        return _ClusterSubscription(self)


class _ShardPubSub(PubSub):
    """A plain PubSub on one node, telling its owner when it reconnected on its own."""

    owner: _ClusterSubscription | None = None

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)
        if self.owner is not None and self.shard_channels:  # not the first connect
            self.owner.reconnected = True


class _ClusterSubscription(Subscription):
    """``SSUBSCRIBE`` on the master that serves the channel's slot, on a connection of
    its own; keys read and written through a cluster client (same slot, same master)."""

    def __init__(self, bus: RedisClusterBus) -> None:
        self._bus = bus
        self._gen_key, self._log_key, self._channel = bus._keys()
        self._client: RedisCluster | None = None
        self._pubsub: _ShardPubSub | None = None
        try:
            # No retries: a lost node is the listener's to handle (it reconnects, asks
            # for the slot map again and re-reads the log), and it must find out within
            # one socket timeout, not several.
            self._client = bus.client(retries=0)
            node = self._client.get_node_from_key(self._channel)  # type: ignore[no-untyped-call]
            if node is None:
                raise BusUnavailableError(
                    f"redis cluster {bus.display_url}: no node serves the slot of {self._channel}"
                )
            pool = self._client.get_redis_connection(node).connection_pool
            self._pubsub = _ShardPubSub(pool)
            self._pubsub.ssubscribe(self._channel)
            self._confirm(time.monotonic() + _SOCKET_TIMEOUT)
            self._pubsub.owner = self
        except BusUnavailableError:
            self.close()
            raise
        except _ERRORS as err:
            self.close()
            raise bus._error(err) from err

    def _confirm(self, deadline: float) -> None:
        """Wait for the ``ssubscribe`` reply: a node that no longer serves the slot
        answers MOVED, a hung one nothing (a deadline, not a blind wait)."""
        assert self._pubsub is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BusUnavailableError(
                    f"redis cluster {self._bus.display_url}: no answer to SSUBSCRIBE "
                    f"{self._channel} within {_SOCKET_TIMEOUT:g}s"
                )
            msg = self._pubsub.get_sharded_message(timeout=left)
            if msg is not None and msg.get("type") == "ssubscribe":
                return

    def _fail(self, err: BaseException) -> BusUnavailableError:
        return self._bus._error(err)

    def get(self, timeout: float) -> bytes | None:
        assert self._pubsub is not None
        try:
            msg = self._pubsub.get_sharded_message(timeout=timeout)
        except (*_ERRORS, ValueError, RuntimeError) as err:
            # ValueError / RuntimeError: redis-py reading from a connection closed under it.
            raise self._fail(err) from err
        if msg is None:
            return None
        kind = msg.get("type")
        if kind == "sunsubscribe":
            # The server ended the subscription: the slot moved to another node.
            raise BusUnavailableError(
                f"redis cluster {self._bus.display_url}: the slot of {self._channel} "
                "moved to another node"
            )
        if kind != "smessage":
            return None
        data = msg.get("data")
        return data if isinstance(data, bytes) else str(data).encode()

    def generation(self) -> int:
        assert self._client is not None
        try:
            return _current(self._bus._named(), self._client.get(self._gen_key))
        except _ERRORS as err:
            raise self._fail(err) from err

    def since(self, gen: int, limit: int = LOG_LENGTH) -> list[tuple[int, bytes]]:
        assert self._client is not None
        ceiling = read_ceiling()
        if gen >= ceiling:
            return []
        try:
            rows = self._client.zrangebyscore(
                self._log_key, f"({gen}", ceiling, start=0, num=limit, withscores=True
            )
        except _ERRORS as err:
            raise self._fail(err) from err
        return _log_entries(cast("list[Any]", rows), gen, ceiling)

    def put_heartbeat(
        self, process: str, payload: bytes, ttl: float, acks: Sequence[Ack] = ()
    ) -> None:
        if not self._can_heartbeat:
            return
        assert self._client is not None
        index, prefix = self._bus._hb_keys()
        tag = f"{{{self._bus.channel}}}"
        written = ack_commands(tag, process, acks) if self._can_ack else []
        try:
            pipe = self._client.pipeline(transaction=False)  # type: ignore[no-untyped-call]
            pipe.set(f"{prefix}{process}", payload, px=max(1, int(ttl * 1000)))
            pipe.sadd(index, process)
            for command in written:
                pipe.execute_command(*command)
            pipe.scard(index)  # the fleet's size, to spread acknowledgements
            replies = pipe.execute(raise_on_error=False)
            heartbeat_written(self, self._bus, replies, len(written))
        except _ERRORS as err:
            raise self._fail(err) from err

    def close(self) -> None:
        pubsub, client = self._pubsub, self._client
        if pubsub is not None:
            pubsub.owner = None
            with contextlib.suppress(Exception):  # closing must never raise into the listener
                pubsub.close()
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
