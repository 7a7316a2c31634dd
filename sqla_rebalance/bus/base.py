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
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "DEFAULT_CHANNEL",
    "LOG_LENGTH",
    "Bus",
    "BusUnavailableError",
    "Subscription",
    "next_generation",
    "redact",
    "split_channel",
]

log = logging.getLogger("sqla_rebalance.bus")

DEFAULT_CHANNEL = "sqla_rebalance"
#: Commands kept in the durable log (older ones are trimmed on publish).
LOG_LENGTH = 1000


class BusUnavailableError(Exception):
    """The bus could not be reached or the connection to it was lost."""


def next_generation(last: int, now: float | None = None) -> int:
    """The generation after ``last``: ``max(last + 1, now in ms)``."""
    ms = int((time.time() if now is None else now) * 1000)
    return max(last + 1, ms)


def redact(url: str) -> str:
    """``url`` without its password, for logs and status output."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


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


class Subscription(ABC):
    """A live connection to the wake-up channel (one listener thread uses it)."""

    #: Set by transports that reconnect on their own (redis-py does): the
    #: listener then re-reads the durable log, as after its own reconnects.
    reconnected: bool = False
    #: False once the bus refused a heartbeat write (privileges): not retried.
    _can_heartbeat: bool = True

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
    def put_heartbeat(self, process: str, payload: bytes, ttl: float) -> None:
        """Publish this process's status, visible for ``ttl`` seconds."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection (never raises)."""


class Bus(ABC):
    """One transport at one URL.

    A bus object holds no connection of its own between calls, so it can be
    shared by pools and survive ``fork()``: each call of :meth:`publish`,
    :meth:`heartbeats` and :meth:`subscribe` opens what it needs.
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
        return redact(self.url)

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

    @abstractmethod
    def subscribe(self) -> Subscription:
        """Connect to the wake-up channel (raises :class:`BusUnavailableError`)."""

    def close(self) -> None:  # noqa: B027 - optional hook, most transports hold nothing
        """Release anything cached (a bus holds nothing by default)."""
