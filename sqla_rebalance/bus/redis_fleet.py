"""The fleet's side of a Redis bus: heartbeats and acknowledgements, written and read.

Split out of :mod:`.redis_bus` because both Redis buses share it: the one-server
bus (:mod:`.redis_bus`) and the Cluster bus (:mod:`.redis_cluster`) write the
same heartbeat and acknowledgement commands, and read the fleet back the same
way (:class:`FleetReads`), only under another key base (the Cluster's hash tag).

Keys, under that base (the channel name; on a Cluster, its hash tag):

- ``<base>:hb:<process>``: each live listener's heartbeat, with a TTL, and
  ``<base>:hb``: the set of their names (pruned by readers when one expires);
- ``<base>:ack:<generation>:<pattern>``: the processes that applied a command
  (to every pool of theirs matching its pattern), and ``<base>:hit:...`` those
  of them that have such a pool: written with the heartbeat, kept an hour
  (:data:`ACK_TTL`). ``recycle --wait`` reads who is *not* there (``SDIFF`` of
  the heartbeat index) and counts who is, instead of reading every heartbeat.

What is read back is untrusted: a set member that is not UTF-8, a count out of
range, a key holding something else than a set, never break a read.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any, cast

import redis

from .base import Ack, Acknowledgements, Bus, BusUnavailableError, Subscription

__all__ = [
    "ACK_TTL",
    "FleetReads",
    "ack_commands",
    "ack_keys",
    "heartbeat_written",
    "read_acknowledgements",
    "read_heartbeats",
]

#: Seconds a command's acknowledgements are kept: longer than any ``--wait``.
ACK_TTL = 3600
#: Largest count of acknowledgements believed (a reply is untrusted).
_MAX_COUNT = 10**7


def ack_keys(base: str, gen: int, pattern: str) -> tuple[str, str]:
    """The acknowledgement sets of command ``gen`` (for pools matching ``pattern``):
    the processes that applied it, and those of them with a matching pool."""
    return f"{base}:ack:{gen}:{pattern}", f"{base}:hit:{gen}:{pattern}"


def ack_commands(base: str, process: str, acks: Sequence[Ack]) -> list[tuple[Any, ...]]:
    """The commands that write ``acks`` (sent in the heartbeat's round trip)."""
    out: list[tuple[Any, ...]] = []
    for gen, pattern, hit in acks:
        ack, hits = ack_keys(base, gen, pattern)
        out += [("SADD", ack, process), ("EXPIRE", ack, ACK_TTL)]
        if hit:
            out += [("SADD", hits, process), ("EXPIRE", hits, ACK_TTL)]
    return out


def heartbeat_written(sub: Subscription, bus: Bus, replies: list[Any], acks: int) -> None:
    """Read the replies of one heartbeat round trip: ``SET`` and ``SADD``, then
    ``acks`` acknowledgement commands, then ``SCARD``.

    Only the heartbeat's own replies count: a refused one (an ACL without
    ``SET``/``SADD``) stops heartbeats, another error is raised (the connection
    is in doubt). An acknowledgement refused by an ACL stops acknowledgements;
    one that fails otherwise (``WRONGTYPE`` on a key somebody wrote junk to) is
    lost, nothing else; a ``SCARD`` that fails leaves the fleet size unknown.
    """
    for reply in replies[:2]:
        if isinstance(reply, redis.exceptions.NoPermissionError):
            sub.heartbeats_refused(bus, reply)
            return
        if isinstance(reply, Exception):
            raise reply
    for reply in replies[2 : 2 + acks]:
        if isinstance(reply, redis.exceptions.NoPermissionError):
            sub.acks_refused(bus, reply)
            break
    if len(replies) > 2 + acks:
        sub.note_fleet_size(replies[-1])  # an error is not an int: ignored


def _members(reply: Any) -> list[bytes]:
    """Set members as bytes, sorted (a junk member, not UTF-8, must not break a read)."""
    if not isinstance(reply, (list, set, tuple)):
        return []
    return sorted(m if isinstance(m, bytes) else str(m).encode() for m in reply)


def read_heartbeats(
    client: Any, index: str, prefix: str, members: list[bytes]
) -> tuple[list[bytes], list[bytes]]:
    """The heartbeats of ``members`` of the index, and the members whose heartbeat
    expired (removed from the index: the process exited or lost the bus)."""
    keys = [prefix.encode() + m for m in members]
    values = cast("list[Any]", client.mget(keys)) if keys else []
    gone = [m for m, v in zip(members, values, strict=True) if v is None]
    if gone:
        client.srem(index, *gone)
    found = [v if isinstance(v, bytes) else str(v).encode() for v in values if v is not None]
    return found, gone


def read_acknowledgements(
    client: Any, index: str, prefix: str, keys: tuple[str, str]
) -> Acknowledgements | None:
    """One look for ``wait_for``: the index minus the acknowledgement set (the
    processes not done, whose heartbeats are read), and the count of hits.
    None when a key holds something else than a set (junk): ``wait_for`` then
    reads every heartbeat, as without acknowledgements."""
    ack, hits = keys
    try:
        # Two calls, not a pipeline: Redis Cluster refuses multi-key commands
        # in one (the keys share the channel's slot; SDIFF alone is fine).
        missing = client.sdiff(index, ack)
        applied = client.scard(hits)
    except redis.ResponseError:
        return None  # WRONGTYPE: a key that is not ours
    found, gone = read_heartbeats(client, index, prefix, _members(missing))
    if isinstance(applied, bool) or not isinstance(applied, int) or not 0 <= applied <= _MAX_COUNT:
        applied = 0
    return Acknowledgements(applied, found, [g.decode("utf-8", "replace") for g in gone])


class FleetReads:
    """Reading the fleet on a Redis bus (one server or a Cluster): the heartbeats,
    and the acknowledgements ``wait_for`` looks at.

    The keys are under :meth:`_key_base` (the channel; its hash tag on a
    Cluster). A copy made for one ``wait_for`` (:meth:`for_waiting`) keeps one
    client for all its looks until :meth:`close`; otherwise each read opens a
    client of its own and closes it.
    """

    url: str
    channel: str
    #: What a read may raise (the Cluster client adds its own errors).
    _read_errors: tuple[type[Exception], ...] = (redis.RedisError,)

    def _init_fleet_reads(self) -> None:
        self._reader_client: Any = None
        self._reader_lock = threading.Lock()
        #: A copy for one ``wait_for`` (see :meth:`for_waiting`).
        self._waiting = False

    def client(self) -> Any:  # pragma: no cover - each bus has its own
        raise NotImplementedError

    def _error(self, err: Exception) -> BusUnavailableError:  # pragma: no cover
        raise NotImplementedError

    def _key_base(self) -> str:
        return self.channel

    def _reader(self) -> Any:
        """One client kept for the looks of a wait (several a second): not a
        new connection per look."""
        with self._reader_lock:
            if self._reader_client is None:
                self._reader_client = self.client()
            return self._reader_client

    def close(self) -> None:
        with self._reader_lock:
            client, self._reader_client = self._reader_client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def heartbeats(self) -> list[bytes]:
        # An index set of the heartbeat keys, not a SCAN of the whole database.
        index = f"{self._key_base()}:hb"
        own = not self._waiting
        client = None
        try:
            client = self.client() if own else self._reader()
            members = _members(client.smembers(index))
            found, _gone = read_heartbeats(client, index, f"{index}:", members)
        except self._read_errors as err:
            if not own:
                self.close()
            raise self._error(err) from err
        finally:
            if own and client is not None:
                client.close()
        return found

    def for_waiting(self) -> Any:
        copy = type(self)(self.url, self.channel)  # type: ignore[call-arg]
        copy._waiting = True
        return copy

    def acknowledgements(self, generation: int, pattern: str) -> Acknowledgements | None:
        # On a Cluster, SDIFF of the index and the ack set is one slot (one hash tag).
        base = self._key_base()
        index = f"{base}:hb"
        try:
            keys = ack_keys(base, generation, pattern)
            return read_acknowledgements(self._reader(), index, f"{index}:", keys)
        except self._read_errors as err:
            self.close()
            raise self._error(err) from err
