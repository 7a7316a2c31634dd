"""Reading the durable log by polling: the transports without a push channel.

The SQLite bus (a file, no server) and the PostgreSQL bus in poll mode (no
LISTEN connection held: ``?mode=poll``) learn of new commands by reading the
log every so often. Both keep a *polling position*: the highest generation
handed to the listener. That position is the transport's own and is moved by
rows nobody has verified yet (the listener verifies each message), so it
must never get stuck: when a junk row far ahead raised it and was then
deleted, the log's head falls below the position and the position comes back
down (:meth:`PollingSubscription._rewind`), to the last row delivered that is
still in the log, so that nothing is skipped and nothing is read twice.
"""

from __future__ import annotations

import threading
import time
from abc import abstractmethod
from collections import deque

from .. import randomness
from .base import LOG_LENGTH, Subscription

__all__ = ["Entries", "PollingSubscription"]

#: ``(generation, message)`` pairs read from the log, oldest first.
Entries = list[tuple[int, bytes]]
#: Rows read by one poll; more wait for the next read, which comes at once.
_BATCH = 100


class PollingSubscription(Subscription):
    """A subscription that reads the log every :attr:`poll_interval` seconds."""

    #: Seconds between two reads of the log (jittered by :attr:`jitter`).
    poll_interval: float = 0.1
    #: Each wait between reads is drawn in ``poll_interval * (1 ± jitter)``, so
    #: that a fleet started together does not read in step.
    jitter: float = 0.0
    #: Seconds between two checks that the log's head is not below the polling
    #: position (an extra read, only when a poll found nothing new).
    head_check_every: float = 1.0

    def __init__(self, head: int) -> None:
        #: The polling position: the highest generation delivered (or the head at start).
        self._seen = head
        #: Positions delivered, in order (they only grow).
        self._delivered: deque[int] = deque([head], maxlen=LOG_LENGTH)
        self._buffer: deque[bytes] = deque()
        self._head_checked = time.monotonic()
        self._next_poll = 0.0
        self._closed = threading.Event()

    @abstractmethod
    def _read(
        self, seen: int, limit: int, head: bool
    ) -> tuple[list[tuple[int, bytes]], int | None]:
        """One poll: logged entries above ``seen`` (oldest first, at most ``limit``),
        and, when ``head`` is asked for and no entry was found, the log's head
        (None otherwise). Raises :class:`BusUnavailableError`."""

    def _interval(self) -> float:
        spread = self.poll_interval * self.jitter
        return self.poll_interval + (randomness.rng.uniform(-spread, spread) if spread else 0.0)

    def get(self, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while not self._buffer:
            now = time.monotonic()
            if now >= self._next_poll:
                self._next_poll = now + self._interval()
                self._poll(now)
                if self._buffer:
                    break
            wake = min(self._next_poll, deadline)
            if time.monotonic() >= deadline:
                return None
            if self._closed.wait(max(0.0, wake - time.monotonic())):
                return None
        return self._buffer.popleft()

    def _poll(self, now: float) -> None:
        check_head = now - self._head_checked >= self.head_check_every
        rows, head = self._read(self._seen, _BATCH, check_head)
        if head is not None:
            self._head_checked = now
            self._rewind(head)
        for gen, message in rows:
            self._seen = max(self._seen, gen)
            self._delivered.append(gen)
            self._buffer.append(message)
        if len(rows) >= _BATCH:
            self._next_poll = now  # more to read: at once

    def _rewind(self, head: int) -> None:
        """Come back down to the last row delivered at or below ``head`` when the
        polling position is above it (see the module docstring)."""
        if self._seen <= head:
            return
        while self._delivered and self._delivered[-1] > head:
            self._delivered.pop()
        self._seen = self._delivered[-1] if self._delivered else 0

    def close(self) -> None:
        self._closed.set()
