"""The bus interface every transport implements, and what they share.

A bus has two halves:

- a **durable log** of commands, each with its generation (a Redis sorted
  set, a PostgreSQL or SQLite table), and the current generation;
- a **wake-up channel** (Redis pub/sub, ``LISTEN``/``NOTIFY``, or polling the
  table) that delivers new commands at once to whoever is connected.

Pub/sub and ``NOTIFY`` lose what is sent while a listener is disconnected,
so the log is the truth and the channel only a hint: a listener re-reads the
log on every (re)connect and on a slow timer, and applies what it missed.

Generations come from :func:`next_generation`, a hybrid logical clock: the
larger of the last generation + 1 and the current time in milliseconds. They
only grow, even when the store loses its data (a Redis without persistence
restarted, a table truncated): a receiver never mistakes a new command for
a replay of an old one.

Whatever a transport reads from the store is untrusted: anybody with write
access to the bus can put junk there. Generations read back are bounded
(:func:`publish_ceiling`, :func:`read_ceiling`), so a junk entry far in the
future (``1e15``, ``+inf``, ``2**63-1``) can neither push the next generation
out of ``bigint`` range nor hide the commands that follow it; only a verified
message moves a listener's state (see ``listener.py``). Data a transport
cannot read at all raises :class:`BusDataError`.
"""

from __future__ import annotations

import logging
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlencode

from ..errors import ConfigurationError

__all__ = [
    "DEFAULT_CHANNEL",
    "FUTURE_LIMIT",
    "LOG_LENGTH",
    "MAX_GENERATION",
    "Ack",
    "Acknowledgements",
    "Bus",
    "BusDataError",
    "BusUnavailableError",
    "Subscription",
    "host_ports",
    "log_generation",
    "next_generation",
    "publish_ceiling",
    "read_ceiling",
    "redact",
    "split_channel",
]

log = logging.getLogger("sqla_rebalance.bus")

DEFAULT_CHANNEL = "sqla_rebalance"
#: Commands kept in the durable log (older ones are trimmed on publish).
LOG_LENGTH = 1000


#: Largest generation a store can hold (PostgreSQL ``bigint``, SQLite ``INTEGER``).
MAX_GENERATION = 2**63 - 1
#: Seconds: a generation stored further than this ahead of the publisher's
#: clock (in ms) is not one this package wrote, and is ignored when the next
#: generation is computed. Readers accept twice as much (clocks differ).
FUTURE_LIMIT = 86400.0


class BusUnavailableError(Exception):
    """The bus could not be reached or the connection to it was lost."""


class BusDataError(BusUnavailableError):
    """The bus holds data this package cannot read (a key or row overwritten
    with junk): a problem of the bus, like an unreachable one (CLI exit 3)."""


def publish_ceiling(now: float | None = None) -> int:
    """Highest stored generation a publisher continues from (now + 1 day, in ms)."""
    now = time.time() if now is None else now
    return min(MAX_GENERATION, int((now + FUTURE_LIMIT) * 1000))


def read_ceiling(now: float | None = None) -> int:
    """Highest generation a reader takes from the log or a message (now + 2 days, in ms)."""
    now = time.time() if now is None else now
    return min(MAX_GENERATION, int((now + 2 * FUTURE_LIMIT) * 1000))


def next_generation(last: int, now: float | None = None) -> int:
    """The generation after ``last``: ``max(last + 1, now in ms)``.

    A ``last`` outside ``0 .. now + 1 day`` (junk written into the store, or
    a clock that was far ahead) is ignored, so the result always fits in an
    int64 and stays close to the clock.
    """
    now = time.time() if now is None else now
    ms = int(now * 1000)
    if isinstance(last, bool) or not isinstance(last, int) or not 0 <= last <= publish_ceiling(now):
        last = 0
    return max(last + 1, ms)


def log_generation(value: object, floor: int, ceiling: int) -> int | None:
    """A log entry's generation as a store returned it (a Redis score, a column),
    or None when it is not one: not a finite number, or outside ``(floor, ceiling]``.

    A fractional score is rounded up, so that every generation returned is
    above ``floor`` and a reader paging through the log always moves on.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        gen = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            return None
        gen = math.ceil(value)
    else:
        return None
    return gen if floor < gen <= ceiling else None


# -- hiding passwords ---------------------------------------------------------------
#: Query or conninfo parameters whose value is a secret.
_SECRET_KEYS = r"password|passwd|pwd|pass|sslpassword|secret|token|auth"
_QUERY_SECRET = re.compile(
    rf"(?i)(?P<key>(?:^|(?<=[?&;\s]))(?:{_SECRET_KEYS}))=(?P<value>'[^']*'|[^&;#\s]*)"
)
#: ``scheme://user:password@`` anywhere in a text (the password may hold ``@``
#: or ``:`` unencoded: the last ``@`` before the host ends it).
_USERINFO = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*)"
    r":(?P<pw>[^/?#\s]*)@(?=[^@/?#\s]*(?:[/?#\s]|$))"
)


def _secret_values(url: str) -> set[str]:
    values = {m.group("pw") for m in _USERINFO.finditer(url)}
    values |= {m.group("value").strip("'") for m in _QUERY_SECRET.finditer(url)}
    values |= {unquote(v) for v in values}
    # Too short to replace in free text without mangling it (and ``***`` itself).
    return {v for v in values if len(v) >= 3 and v != "***"}


def redact(text: str, url: str | None = None) -> str:
    """``text`` with every password masked as ``***``: the one helper for every
    place a bus URL or an error about it is shown (stats, logs, warnings, CLI).

    Masks the password of any ``scheme://user:password@host`` and the value of
    any ``password=`` (``passwd``, ``sslpassword``, ``secret``, ``token``...)
    query or conninfo parameter in ``text``. With ``url``, also every literal
    occurrence of that URL's passwords (raw or percent-decoded): a driver's
    error message may quote them. Never raises.
    """
    try:
        out = _USERINFO.sub(lambda m: f"{m.group('head')}:***@", text)
        out = _QUERY_SECRET.sub(lambda m: f"{m.group('key')}=***", out)
        if url:
            for value in sorted(_secret_values(url), key=len, reverse=True):
                out = out.replace(value, "***")
        return out
    except Exception:  # pragma: no cover - a display helper must not break its caller
        return "<a bus URL (not shown)>"


def host_ports(url: str, hosts: str, default_port: int, what: str) -> list[tuple[str, int]]:
    """The comma-separated ``host[:port]`` list of a Redis Sentinel or Cluster URL
    (``[v6]:port`` too), each port in range; a ConfigurationError naming ``what``
    (with the URL's password masked) for any item that is not."""
    out = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon:
            host, port = port, str(default_port)
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigurationError(
                f"{redact(url)}: each {what} must be host:port, got {item.strip()!r}"
            )
        out.append((host, int(port)))
    return out


def split_channel(url: str, default: str = DEFAULT_CHANNEL) -> tuple[str, str]:
    """Take our own ``channel=`` query parameter out of a bus URL.

    Returns the URL the driver should see and the channel name.
    """
    base, sep, query = url.partition("?")
    if not sep:
        return url, default
    channel = default
    kept = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "channel":
            channel = value
        else:
            kept.append((key, value))
    # Rebuilt by hand: urlunsplit would turn sqlite:////abs/path into sqlite://abs/path.
    return (f"{base}?{urlencode(kept)}" if kept else base), channel


#: The largest fleet size a subscription believes (see ``Subscription.fleet_size``).
MAX_FLEET_HINT = 10_000_000


#: What a listener acknowledges with its heartbeat: ``(generation, the command's
#: pool pattern, whether this process has a pool matching it)``, once every
#: such pool has applied it (see ``listener.py``).
Ack = tuple[int, str, bool]


@dataclass(frozen=True)
class Acknowledgements:
    """One look at the acknowledgements of a command, for ``wait_for``.

    A transport that keeps them answers in O(processes not done) instead of
    reading every heartbeat: the processes that acknowledged are counted,
    not read. Untrusted like the heartbeats (anybody who can write the bus
    can write them): they only shorten the look; the final answer of
    ``wait_for`` comes from the heartbeats.
    """

    #: Processes that acknowledged with a pool matching the pattern.
    applied: int
    #: Heartbeats of the live processes that have not acknowledged.
    heartbeats: list[bytes]
    #: Processes found gone meanwhile (their heartbeat expired).
    gone: list[str]


class Subscription(ABC):
    """A live connection to the wake-up channel (one listener thread uses it)."""

    #: Set by transports that reconnect on their own (redis-py does): the
    #: listener then re-reads the durable log, as after its own reconnects.
    reconnected: bool = False
    #: False once the bus refused a heartbeat write (privileges): not retried.
    _can_heartbeat: bool = True
    #: About how many processes heartbeat on this channel, where the transport
    #: learns it with its heartbeat write at no extra round trip (None: unknown).
    #: A hint only (it spreads this process's acknowledgements): never trusted
    #: beyond ``0 <= fleet_size <= MAX_FLEET_HINT``.
    fleet_size: int | None = None

    def note_fleet_size(self, value: object) -> None:
        """Keep ``value`` (a reply of the bus) as :attr:`fleet_size` if it is sane."""
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_FLEET_HINT:
            self.fleet_size = value

    #: False once the bus refused an acknowledgement write (privileges): the
    #: heartbeats go on without them (``--wait`` then reads this process's).
    _can_ack: bool = True

    def acks_refused(self, bus: Bus, err: Exception) -> None:
        """The bus does not let this role write acknowledgements: stop sending
        them, say so once; heartbeats and commands are not affected."""
        self._can_ack = False
        log.warning(
            "bus %s: cannot write acknowledgements (%s): recycle --wait reads this "
            "process's heartbeat instead",
            bus,
            err,
        )

    def heartbeats_refused(self, bus: Bus, err: Exception) -> None:
        """The bus does not let this role write heartbeats: stop trying, say so once.

        Commands still arrive; the process is only invisible to ``status`` and
        ``recycle --wait``. Not a lost connection, so no reconnect.
        """
        self._can_heartbeat = False
        log.warning(
            "bus %s: cannot write heartbeats (%s): this process will not appear in "
            "status or recycle --wait",
            bus,
            err,
        )

    @abstractmethod
    def get(self, timeout: float) -> bytes | None:
        """The next message, or None after ``timeout`` seconds.

        Raises :class:`BusUnavailableError` when the connection is lost.
        """

    @abstractmethod
    def generation(self) -> int:
        """The current generation of the durable log (0 if nothing was ever sent)."""

    @abstractmethod
    def since(self, gen: int, limit: int = LOG_LENGTH) -> list[tuple[int, bytes]]:
        """Logged ``(generation, message)`` pairs above ``gen``, oldest first.

        The generation is the log's own (a sorted-set score, a column), so a
        reader can move past an entry it cannot parse.
        """

    @abstractmethod
    def put_heartbeat(
        self, process: str, payload: bytes, ttl: float, acks: Sequence[Ack] = ()
    ) -> None:
        """Publish this process's status, visible for ``ttl`` seconds, and its
        acknowledgements of commands (transports that keep none ignore them)."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection (never raises)."""


class Bus(ABC):
    """One transport at one URL.

    A bus object holds no connection of its own between calls, so it can be
    shared by pools and survive ``fork()``: each call of :meth:`publish`,
    :meth:`heartbeats` and :meth:`subscribe` opens what it needs. Only the
    copy that one ``wait_for`` makes (:meth:`for_waiting`) keeps a client for
    its looks, until it closes it.
    """

    #: URL schemes this transport serves.
    schemes: tuple[str, ...] = ()

    def __init__(self, url: str, channel: str = DEFAULT_CHANNEL) -> None:
        self.url = url
        self.channel = channel

    @property
    def key(self) -> str:
        """Identity for sharing one listener between pools (same URL, same channel)."""
        return f"{self.url}#{self.channel}"

    @property
    def display_url(self) -> str:
        """The URL with its passwords masked (see :func:`redact`)."""
        return redact(self.url)

    def redact(self, text: str) -> str:
        """``text`` (a driver's error message, say) with this bus's passwords masked."""
        return redact(text, self.url)

    def error(self, kind: str, err: BaseException) -> BusUnavailableError:
        """The error to raise for ``err``: the URL masked, and the driver's message too."""
        return BusUnavailableError(f"{kind} {self.display_url}: {self.redact(str(err))}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.display_url} channel={self.channel}>"

    @abstractmethod
    def publish(self, build: Callable[[int], bytes]) -> tuple[int, int | None]:
        """Log and send one command.

        ``build(gen)`` returns the signed wire form for the generation the
        bus allocated. Returns the generation and, where the transport knows
        it, how many listeners received it at once (None otherwise).
        """

    @abstractmethod
    def generation(self) -> int:
        """The current generation (0 if nothing was ever sent)."""

    @abstractmethod
    def heartbeats(self) -> list[bytes]:
        """The live processes' latest heartbeats."""

    def for_waiting(self) -> Bus:
        """The bus object one ``wait_for`` uses and closes: a copy where reads
        keep a client between looks (the Redis buses), else this bus itself."""
        return self

    def acknowledgements(self, generation: int, pattern: str) -> Acknowledgements | None:
        """Who has not acknowledged command ``generation`` (sent to the pools
        matching ``pattern``); None when this transport keeps no acknowledgements
        (``wait_for`` then reads every heartbeat at each look)."""
        return None

    @abstractmethod
    def subscribe(self) -> Subscription:
        """Connect to the wake-up channel (raises :class:`BusUnavailableError`)."""

    def close(self) -> None:  # noqa: B027 - optional hook, most transports hold nothing
        """Release anything cached (a bus holds nothing by default)."""
