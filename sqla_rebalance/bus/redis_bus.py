"""The Redis bus (``redis://``, ``rediss://`` and ``redis+sentinel://`` URLs; needs redis-py).

This module is its transport (publish, generation, log, the listener's
subscription) to one server, or to the master a Sentinel names, looked up
again at each connect (:mod:`.redis_sentinel`). The heartbeats, the
acknowledgements and the fleet reads, shared with the Cluster bus, are in
:mod:`.redis_fleet`.

Keys, all under the channel name (default ``sqla_rebalance``):

- ``<channel>:gen``: the current generation;
- ``<channel>:log``: the last :data:`~.base.LOG_LENGTH` commands, a sorted set
  scored by generation;
- ``<channel>:hb:<process>`` and ``<channel>:hb`` (their index): the live
  listeners' heartbeats; ``<channel>:ack:...`` and ``<channel>:hit:...``: who
  applied each command (:mod:`.redis_fleet` says how they are kept and read);
- pub/sub channel ``<channel>:commands``: the wake-up hint.

A publish is one ``WATCH``/``MULTI`` transaction (generation, log, publish),
so publishers never interleave: generations reach every listener in order.

What is read back is untrusted: a generation key that does not hold a
decimal integer raises :class:`~.base.BusDataError`; one out of range (a junk
``1e15``) is ignored by the next publish, which overwrites it; log entries
are read only within ``(cursor, now + 2 days]`` by score, so a ``+inf`` or
``1e15`` entry is never even returned.

Connections: a listening process holds **one** connection to Redis (client
name ``sqla-rebalance-listener``): with RESP3 (Redis >= 6) a subscribed
connection may still send commands, so the log reads and the heartbeats go
over the connection that receives the wake-ups (see :class:`_RedisSubscription`,
which also says how a dead server is noticed without PINGs). Against a server
without RESP3 it falls back to two (pub/sub, and commands), and says so once.
Publishers and ``status`` open short-lived clients (``sqla-rebalance``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import redis
from redis.client import PubSub

from .base import (
    LOG_LENGTH,
    Ack,
    Bus,
    BusDataError,
    BusUnavailableError,
    Subscription,
    log_generation,
    next_generation,
    publish_ceiling,
    read_ceiling,
)
from .redis_fleet import (  # re-exported (__all__): imported from here by redis_cluster
    _MAX_COUNT,  # noqa: F401 - imported from here by the tests
    ACK_TTL,
    FleetReads,
    ack_commands,
    ack_keys,
    heartbeat_written,
    read_acknowledgements,
    read_heartbeats,
)
from .redis_sentinel import _sentinel_target, master_client

__all__ = [
    "ACK_TTL",
    "FleetReads",
    "RedisBus",
    "ack_commands",
    "ack_keys",
    "heartbeat_written",
    "read_acknowledgements",
    "read_heartbeats",
]

log = logging.getLogger("sqla_rebalance.bus")


_CONNECT_TIMEOUT = 2.0
_SOCKET_TIMEOUT = 5.0
#: redis-py's health check (a PING when a connection was idle this long) on
#: the short-lived clients, and on both connections of the two-connection
#: fallback. The one-connection listener does not use it (see below).
_HEALTH_CHECK_INTERVAL = 5
#: The one-connection listener sends a PING only after hearing nothing from
#: the server (no reply, no message) for this long. The listener writes a
#: heartbeat every ``listener.HEARTBEAT_INTERVAL`` (5 s), which proves the
#: connection alive as well as a PING would: so this only fires when those
#: writes stop (an ACL refused them). Must stay above that interval.
_IDLE_PING_AFTER = 10.0
#: The client name of the listener's connection (``CLIENT LIST``).
_LISTENER_NAME = "sqla-rebalance-listener"


class _PubSub(PubSub):
    """redis-py's PubSub, telling us when it reconnected on its own."""

    owner: _TwoConnectionSubscription | None = None

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


class RedisBus(FleetReads, Bus):
    schemes = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")

    def __init__(self, url: str, channel: str = "sqla_rebalance") -> None:
        super().__init__(url, channel)
        #: The Sentinel set-up of a ``redis+sentinel://`` URL (None: a plain URL).
        self.sentinel = (
            _sentinel_target(url) if url.lower().startswith(("redis+", "rediss+")) else None
        )
        self._init_fleet_reads()

    def _keys(self) -> tuple[str, str, str]:
        c = self.channel
        return f"{c}:gen", f"{c}:log", f"{c}:commands"

    def client(self) -> redis.Redis:
        """A new client (connections are made lazily, one pool per client)."""
        return self._client()

    def _client(self, **overrides: Any) -> redis.Redis:
        """:meth:`client`, with some connection options replaced (``protocol=3``...)."""
        options: dict[str, Any] = {
            "socket_connect_timeout": _CONNECT_TIMEOUT,
            "socket_timeout": _SOCKET_TIMEOUT,
            "socket_keepalive": True,
            "health_check_interval": _HEALTH_CHECK_INTERVAL,
            "client_name": "sqla-rebalance",
            **overrides,
        }
        target = self.sentinel
        if target is None:
            return redis.Redis.from_url(self.url, **options)
        # The master is looked up again at each (re)connect of this client.
        return master_client(target, options, _CONNECT_TIMEOUT, _SOCKET_TIMEOUT)

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

    def subscribe(self) -> Subscription:
        try:
            return _RedisSubscription(self)
        except _NoResp3 as why:
            _say_two_connections(self, str(why))
            return _TwoConnectionSubscription(self)


def _log_entries(rows: list[Any], gen: int, ceiling: int) -> list[tuple[int, bytes]]:
    """``(position, message)`` from ZRANGEBYSCORE ... WITHSCORES replies (pairs of
    member and score, the score a float, or text on RESP2), oldest first: a row of
    another shape, or a score out of ``(gen, ceiling]``, is skipped (untrusted)."""
    out = []
    for row in rows:
        if not isinstance(row, (list, tuple)) or len(row) != 2:
            continue
        member, score = row
        if isinstance(score, (bytes, str)):
            try:
                score = float(score)
            except ValueError:
                continue
        position = log_generation(score, gen, ceiling)
        if position is not None:
            out.append((position, _as_bytes(member)))
    return out


def _current(bus: RedisBus, value: Any) -> int:
    """The current generation for readers: junk raises, out of range reads as 0."""
    gen = _stored_generation(bus, value)
    return gen if gen <= publish_ceiling() else 0


class _TwoConnectionSubscription(Subscription):
    """The fallback for a server without RESP3 (Redis < 6): a subscribed RESP2
    connection accepts no other command, so the log reads and the heartbeats
    go over a second connection. redis-py PINGs both when idle
    (``_HEALTH_CHECK_INTERVAL``), and reconnects the pub/sub one on its own."""

    def __init__(self, bus: RedisBus) -> None:
        self._bus = bus
        self._gen_key, self._log_key, channel = bus._keys()
        # RESP2 said at once: no HELLO 3 refused (and warned about) at each connect.
        self._client = bus._client(protocol=2)
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
        return _log_entries(cast("list[Any]", rows), gen, ceiling)

    def put_heartbeat(
        self, process: str, payload: bytes, ttl: float, acks: Sequence[Ack] = ()
    ) -> None:
        if not self._can_heartbeat:
            return
        channel = self._bus.channel
        written = ack_commands(channel, process, acks) if self._can_ack else []
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.set(f"{channel}:hb:{process}", payload, px=max(1, int(ttl * 1000)))
            pipe.sadd(f"{channel}:hb", process)
            for command in written:
                pipe.execute_command(*command)  # type: ignore[no-untyped-call]
            pipe.scard(f"{channel}:hb")  # the fleet's size, to spread acknowledgements
            heartbeat_written(self, self._bus, pipe.execute(raise_on_error=False), len(written))
        except redis.RedisError as err:
            raise self._fail(err) from err

    def close(self) -> None:
        self._pubsub.owner = None
        for close in (self._pubsub.close, self._client.close):
            with contextlib.suppress(Exception):  # closing must never raise into the listener
                close()


class _NoResp3(Exception):
    """The server (or the URL) does not give the listener a RESP3 connection."""


#: Buses whose fallback to two connections was logged already (once per process).
_two_connections_said: set[str] = set()


def _say_two_connections(bus: RedisBus, why: str) -> None:
    if bus.key in _two_connections_said:
        return
    _two_connections_said.add(bus.key)
    log.warning(
        "bus %s: no RESP3 (%s): listening with two connections (pub/sub and commands) "
        "instead of one; Redis >= 6 needs only one",
        bus,
        bus.redact(why),
    )


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _frame_kind(frame: Any) -> bytes:
    if isinstance(frame, list) and frame:
        return _as_bytes(frame[0]).lower()
    return b""


class _RedisSubscription(Subscription):
    """The listener's one connection (RESP3): subscribed, and serving commands too.

    With RESP3 a subscribed connection may still send any command; what the
    channel delivers arrives as *push* frames, interleaved with the replies.
    redis-py's RESP3 parser hands every push frame to a handler (ours keeps
    the messages of our channel in a queue, :meth:`get` returns them first)
    and goes on reading until the reply: a message that arrives while a
    command waits for its reply is kept, never lost, and comes out of
    :meth:`get` in the order the server sent it.

    Used by one thread (the listener's). Never reconnects on its own: any
    error on the connection is final (:class:`~.base.BusUnavailableError`),
    and the listener subscribes again, with a new connection, then re-reads
    the log. So a ``redis+sentinel://`` master is looked up again at each
    reconnect, and nothing is ever sent on a connection redis-py reopened
    behind our back without the subscription.

    Deadlines: connecting, :data:`_CONNECT_TIMEOUT`; every command waits at
    most :data:`_SOCKET_TIMEOUT` for its reply; :meth:`get` returns within
    its ``timeout``.

    **Liveness, without redundant PINGs.** The listener writes a heartbeat
    (SET + SADD, one round trip) every ``HEARTBEAT_INTERVAL`` (5 s; every
    second just after a connect) and reads the generation on a slow timer:
    any reply proves the server alive, so redis-py's health-check PINGs are
    off on this connection. A dead or hung server is noticed within
    ``HEARTBEAT_INTERVAL + _SOCKET_TIMEOUT`` = 10 s (plus the listener's
    0.5 s tick), as with the PINGs before, and no PING is sent. Only when
    nothing was heard from the server for :data:`_IDLE_PING_AFTER` (10 s:
    heartbeats refused by an ACL) does :meth:`get` send one PING, without
    waiting for it; no PONG within :data:`_SOCKET_TIMEOUT` is a lost
    connection. At most one PING per ``_IDLE_PING_AFTER``, so a dead server
    is noticed within ``_IDLE_PING_AFTER + _SOCKET_TIMEOUT`` = 15 s then.
    """

    def __init__(self, bus: RedisBus) -> None:
        self._bus = bus
        self._gen_key, self._log_key, channel = bus._keys()
        self._channel = channel.encode()
        #: Messages of our channel received and not yet returned by get().
        self._messages: deque[bytes] = deque()
        self._subscribed = False
        self._broken = False
        #: When the server was last heard from (a reply or a message).
        self._heard = time.monotonic()
        #: When the PING in flight was sent (None: none).
        self._ping_sent: float | None = None
        self._client = bus._client(protocol=3, health_check_interval=0, client_name=_LISTENER_NAME)
        self._conn: Any = None
        try:
            self._conn = self._client.connection_pool.get_connection()
            if str(self._conn.protocol) != "3":
                # protocol=2 in the URL: the URL's options win over ours.
                raise _NoResp3(f"the connection speaks RESP{self._conn.protocol}")
            self._conn._parser.set_pubsub_push_handler(self._on_push)
            self._subscribe(channel)
        except _NoResp3:
            self.close()
            raise
        except redis.ResponseError as err:
            self.close()
            text = str(err).lower()
            if "hello" in text or "noproto" in text:  # Redis < 6: HELLO 3 unknown
                raise _NoResp3(f"HELLO 3 refused: {str(err).strip()}") from err
            raise bus._error(err) from err
        except (redis.RedisError, OSError, ValueError) as err:
            self.close()
            raise bus._error(err) from err

    def _on_push(self, frame: Any) -> None:
        """redis-py's parser calls this for each push frame, whatever read it was in."""
        kind = _frame_kind(frame)
        if kind == b"message" and len(frame) >= 3:
            if _as_bytes(frame[1]) == self._channel:
                self._messages.append(_as_bytes(frame[2]))
        elif kind == b"subscribe":
            self._subscribed = True

    def _subscribe(self, channel: str) -> None:
        conn = self._conn
        conn.send_command("SUBSCRIBE", channel, check_health=False)
        deadline = time.monotonic() + _SOCKET_TIMEOUT
        while not self._subscribed:
            left = deadline - time.monotonic()
            if left <= 0:
                raise redis.TimeoutError(f"no SUBSCRIBE confirmation in {_SOCKET_TIMEOUT:g}s")
            # The confirmation is a push frame, not a reply: read it as one.
            conn.read_response(push_request=True, timeout=left)
        self._heard = time.monotonic()

    def _fail(self, err: Exception) -> BusUnavailableError:
        self._broken = True
        return self._bus._error(err)

    def _live(self) -> Any:
        """The connection, or an error if it is gone (redis-py would reopen it silently,
        unsubscribed)."""
        conn = self._conn
        if self._broken or conn is None or not conn.is_connected:
            self._broken = True
            raise self._bus._error(redis.ConnectionError("the connection was closed"))
        return conn

    def _execute(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Send ``commands`` in one write; their replies (a ResponseError as a value).

        Messages received before a reply are queued for get() by :meth:`_on_push`.
        """
        conn = self._live()
        replies: list[Any] = []
        try:
            conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            if self._ping_sent is not None:  # its PONG comes first
                self._pong(conn.read_response())
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as err:  # NOPERM, WRONGTYPE...: that command's
                    replies.append(err)
        except (redis.RedisError, OSError, ValueError) as err:
            # ValueError: redis-py reading from a connection closed under it.
            raise self._fail(err) from err
        self._heard = time.monotonic()
        return replies

    def _pong(self, reply: Any) -> None:
        if reply not in (b"PONG", "PONG"):
            raise redis.ConnectionError(f"PING answered with {reply!r}")
        self._ping_sent = None

    def _call(self, *args: Any) -> Any:
        (reply,) = self._execute(args)
        if isinstance(reply, Exception):
            raise self._fail(reply)
        return reply

    def get(self, timeout: float) -> bytes | None:
        if self._messages:
            return self._messages.popleft()
        conn = self._live()
        now = time.monotonic()
        deadline = now + max(0.0, timeout)
        try:
            if self._ping_sent is None and now - self._heard >= _IDLE_PING_AFTER:
                conn.send_command("PING", check_health=False)
                self._ping_sent = now
            while True:
                if self._ping_sent is not None and now - self._ping_sent > _SOCKET_TIMEOUT:
                    raise redis.TimeoutError(
                        f"no answer to PING within {_SOCKET_TIMEOUT:g}s (server hung?)"
                    )
                left = max(0.0, deadline - now)
                if not conn.can_read(timeout=left):
                    return None
                try:
                    reply = conn.read_response(
                        push_request=True, timeout=left, disconnect_on_error=False
                    )
                except redis.TimeoutError:
                    # Part of a frame arrived: the parser keeps it, the next call resumes.
                    if not conn.is_connected:
                        raise
                    return None
                self._heard = time.monotonic()
                if self._ping_sent is not None and reply in (b"PONG", "PONG"):
                    self._ping_sent = None
                if self._messages:
                    return self._messages.popleft()
                now = time.monotonic()
                if now >= deadline:
                    return None
        except (redis.RedisError, OSError, ValueError) as err:
            raise self._fail(err) from err

    def generation(self) -> int:
        return _current(self._bus, self._call("GET", self._gen_key))

    def since(self, gen: int, limit: int = LOG_LENGTH) -> list[tuple[int, bytes]]:
        ceiling = read_ceiling()
        if gen >= ceiling:
            return []
        rows = self._call(
            "ZRANGEBYSCORE", self._log_key, f"({gen}", ceiling, "WITHSCORES", "LIMIT", 0, limit
        )
        if not isinstance(rows, list):
            return []
        if rows and not isinstance(rows[0], list):  # RESP2 shape: member, score, ...
            rows = [rows[i : i + 2] for i in range(0, len(rows) - 1, 2)]
        return _log_entries(rows, gen, ceiling)

    def put_heartbeat(
        self, process: str, payload: bytes, ttl: float, acks: Sequence[Ack] = ()
    ) -> None:
        if not self._can_heartbeat:
            return
        channel = self._bus.channel
        written = ack_commands(channel, process, acks) if self._can_ack else []
        replies = self._execute(
            ("SET", f"{channel}:hb:{process}", payload, "PX", max(1, int(ttl * 1000))),
            ("SADD", f"{channel}:hb", process),
            *written,
            ("SCARD", f"{channel}:hb"),  # the fleet's size, to spread acknowledgements
        )
        try:
            heartbeat_written(self, self._bus, replies, len(written))
        except redis.RedisError as err:
            raise self._fail(err) from err

    def close(self) -> None:
        self._broken = True
        conn, self._conn = self._conn, None
        for close in (getattr(conn, "disconnect", None), self._client.close):
            if close is not None:
                with contextlib.suppress(Exception):  # closing must never raise
                    close()
