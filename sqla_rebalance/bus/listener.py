"""The listener: one thread per process per bus, applying commands to pools.

Pools attach to the listener of their bus (same URL and channel, same
secret) and are held by weak reference; the thread exits once no pool is
left, and a pool attaching later starts a new one. After ``fork()`` a child
starts with no listener (a thread cannot be inherited, and the parent's
sockets must not be used or closed): its pools attach again, lazily, on
their next connect.

What a listener does, in order of importance:

1. **Never affects checkout.** It runs in its own thread; a dead bus only
   makes it reconnect, with exponential backoff and full jitter.
2. **Applies each command once, in order.** Every command carries a
   generation that only grows; anything at or below the last one applied
   is a duplicate (read twice: once live, once from the log) or a replay.
3. **Misses nothing for long.** Pub/sub and ``NOTIFY`` lose what is sent
   while a listener is disconnected, so the durable log is re-read on every
   (re)connect and on a slow jittered timer; a missed command is applied
   late rather than never.
4. **Protects the databases.** A pool applies at most one batch of commands
   per ``min_recycle_interval``: commands arriving faster are coalesced
   into one, applied when the interval has passed.
5. **Reports.** A heartbeat with every attached pool's figures is written
   every few seconds (and soon after a command), for ``sqla-rebalance
   status`` and ``recycle --wait``.
6. **Trusts nothing it has not verified.** Only a message that passed
   :func:`~.message.decode` (signature included) moves the generation
   applied, the log cursor, the history mark or what the heartbeats report
   to ``--wait``. A rejected log entry is read past within one catch-up, but
   the next catch-up starts below it again (it is remembered, so it is
   counted once). Junk is rejected cheaply (size before parse) and logged
   as a rate-limited summary, never once per message.

Beside the loop here: :mod:`.registry` (per-process state, fork),
:mod:`.coalescing` (4), :mod:`.heartbeat` (5), :mod:`.rejections` (6).
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

from .. import randomness
from . import registry
from .base import Ack, Bus, BusDataError, BusUnavailableError, Subscription
from .coalescing import Pending as _Pending
from .heartbeat import bus_stats, status_payload
from .message import REJECTION_KINDS, REPLAYED, STALE, Command, Rejected, decode
from .registry import listeners as _registry
from .registry import process_id
from .rejections import RejectionLog
from .rejections import issued_before as _issued_before

if TYPE_CHECKING:
    from ..pool import RebalancingQueuePool
    from ..stats import BusStats

__all__ = [
    "CATCH_UP_MAX_AGE",
    "HEARTBEAT_INTERVAL",
    "LIVE_MAX_AGE",
    "Listener",
    "attach",
    "detach",
    "listener_for",
    "process_id",
]

log = logging.getLogger("sqla_rebalance.bus")

#: A live message must be issued within this many seconds of now (either
#: way: clocks of a fleet differ by a little).
LIVE_MAX_AGE = 300.0
#: A command read from the log at catch-up older than this is skipped (and
#: counted as stale): after an hour, a new deploy has done its work.
CATCH_UP_MAX_AGE = 3600.0
#: A command issued this long before a pool attached does not apply to it.
ATTACH_GRACE = 5.0
HEARTBEAT_INTERVAL = 5.0
#: A heartbeat is visible for this many intervals.
HEARTBEAT_TTL_FACTOR = 3.0
#: The durable generation is re-read every this many seconds (jittered
#: 50-150 %), in case a wake-up was lost without a disconnect.
POLL_INTERVAL = 30.0
#: After a command, a process heartbeats (its acknowledgement for ``--wait``)
#: within 0.2 s plus a random delay over a window that grows with the fleet:
#: ``fleet / ACK_RATE`` seconds, at most ``ACK_WINDOW_MAX``, so that 10,000
#: processes write about 2,000 heartbeats a second rather than all at once.
ACK_RATE = 2000.0
ACK_WINDOW_MAX = 5.0
#: Longest blocking read; bounds how late the thread notices it must stop.
_TICK = 0.5
_BACKOFF_MIN = 0.5
_BACKOFF_MAX = 30.0
#: A connection that stayed up this long resets the backoff.
_STABLE = 5.0
_RECENT = 4096
#: Commands waiting to be acknowledged (their pools still applying them): the
#: oldest is dropped past this many (its ``--wait`` falls back to heartbeats).
_ACKS_HELD = 64
#: Messages handled in a row before the thread lets the others run. A flood must
#: not hold the GIL: the application's threads would wait for it up to the
#: switch interval (5 ms) at each step. Measured (benchmarks/bus_flood.py, 10,000
#: junk msg/s, docs/benchmarks.md): every 8 keeps the application's p99 round
#: trip near 1 ms (7 ms without), and the listener still keeps up with the flood;
#: every message gains a little more p99 but lets the listener fall seconds behind.
_YIELD_EVERY = 8
#: Seconds after a (re)connect during which heartbeats come every second.
_FAST_HEARTBEATS = 5.0


def _jitter(value: float, low: float = 0.5, high: float = 1.5) -> float:
    return value * randomness.rng.uniform(low, high)


_listener_numbers = itertools.count(1)


def _monotonic() -> float:
    # Read through this module's ``time`` at each call (the tests replace it).
    return time.monotonic()


class _Member:
    """A pool attached to a listener, and its share of the bookkeeping."""

    __slots__ = (
        "applied",
        "attached_at",
        "coalesced",
        "last_applied",
        "pending",
        "ref",
        "samples",
        "settled",
    )

    def __init__(self, ref: weakref.ref[RebalancingQueuePool]) -> None:
        self.ref = ref
        self.attached_at = time.time()
        self.last_applied = -1e18
        self.pending: _Pending | None = None
        #: Commands applied to this pool, and those folded into another.
        self.applied = 0
        self.coalesced = 0
        #: Every generation up to this one is done for this pool: applied,
        #: or not meant for it. Coalesced commands still waiting hold it back
        #: (``recycle --wait`` waits for this, per pool).
        self.settled = 0
        #: (time, connects, retirements) for the churn figures.
        self.samples: deque[tuple[float, int, int]] = deque(maxlen=32)


class Listener:
    """Receives the commands of one bus for the pools of this process."""

    def __init__(self, bus: Bus, secret: bytes | None, key: tuple[str, str]) -> None:
        self.bus = bus
        self.secret = secret
        self.key = key
        self.created_at = time.time()
        self._members: dict[int, _Member] = {}
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._wake = threading.Event()
        #: Highest generation processed, and the recent ones with how they
        #: arrived (True: live), to tell a duplicate read from a replay.
        self.applied = 0
        #: Where the next catch-up read of the log starts: the highest verified
        #: generation read there (never moved by an entry that was rejected).
        self._log_cursor = 0
        #: Highest verified generation in the log from before this listener existed.
        self._history = 0
        #: Log entries rejected already, by (position, hash): read past again
        #: at each catch-up, counted once.
        self._log_rejected: dict[tuple[int, int], None] = {}
        self._recent: deque[int] = deque(maxlen=_RECENT)
        self._recent_live: dict[int, bool] = {}
        self.accepted = 0
        self.rejected: dict[str, int] = dict.fromkeys(REJECTION_KINDS, 0)
        self.duplicates = 0
        self.connected = False
        self.connects = 0
        self.last_error: str | None = None
        self.heartbeats = 0
        self._heartbeat_due = 0.0
        #: About how many processes share the channel (``Subscription.fleet_size``).
        self._fleet: int | None = None
        #: Commands accepted and not acknowledged yet, by generation (see :meth:`_acks`).
        self._to_ack: dict[int, Command] = {}
        #: Heartbeats come every second at first (the pools are still filling),
        #: then every HEARTBEAT_INTERVAL.
        self._fast_heartbeats_until = 0.0
        #: This listener on the bus: the process, and which of its listeners
        #: (one process may listen on one bus with two secrets).
        self.ident = f"{process_id()}.{next(_listener_numbers)}"
        self._rejections = RejectionLog(bus, _monotonic)

    # -- membership (under registry.lock()) ------------------------------------
    def _add(self, pool: RebalancingQueuePool) -> None:
        key = id(pool)
        member = self._members.get(key)
        if member is not None and member.ref() is pool:
            return

        def gone(ref: weakref.ref[RebalancingQueuePool]) -> None:
            # Weakref callback: any thread, any time; dict.pop is atomic.
            if self._members.get(key) is not None and self._members[key].ref is ref:
                self._members.pop(key, None)
            self._wake.set()

        member = self._members[key] = _Member(weakref.ref(pool, gone))
        # Commands from before it attached are not for it: done, as far as
        # recycle --wait is concerned.
        member.settled = max(self.applied, self._history)
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"sqla-rebalance-bus-{self.bus.channel}", daemon=True
            )
            self._thread.start()

    def _remove(self, pool: RebalancingQueuePool) -> None:
        member = self._members.get(id(pool))
        if member is not None and member.ref() is pool:
            del self._members[id(pool)]
        self._wake.set()

    def _should_exit(self) -> bool:
        with registry.lock():
            for key, member in list(self._members.items()):
                if member.ref() is None:
                    self._members.pop(key, None)
            if self._members and not self._stopped:
                return False
            self._stopped = True
            if _registry.get(self.key) is self:
                del _registry[self.key]
            return True

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def pools(self) -> list[tuple[RebalancingQueuePool, _Member]]:
        out = []
        for member in list(self._members.values()):
            pool = member.ref()
            if pool is not None:
                out.append((pool, member))
        return out

    # -- the thread --------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.0
        try:
            while not self._should_exit():
                up_since = time.monotonic()
                try:
                    sub = self.bus.subscribe()
                except Exception as err:
                    self._lost(err)
                else:
                    try:
                        self._serve(sub)
                        return
                    except Exception as err:
                        self._lost(err)
                    finally:
                        self.connected = False
                        sub.close()
                if time.monotonic() - up_since > _STABLE:
                    backoff = 0.0
                backoff = min(_BACKOFF_MAX, max(_BACKOFF_MIN, backoff * 2))
                if self._pause(randomness.rng.uniform(0.0, backoff)):
                    return
        finally:
            self.connected = False

    def _pause(self, seconds: float) -> bool:
        """Wait while disconnected (still applying coalesced commands); True: stop."""
        deadline = time.monotonic() + seconds
        while True:
            self._run_pending(time.monotonic())
            self._log_summary()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._wake.wait(min(_TICK, left))
            self._wake.clear()
            if self._should_exit():
                return True

    def _lost(self, err: BaseException) -> None:
        was = self.connected
        first = self.last_error is None and self.connects == 0
        self.connected = False
        # Masked: a driver's message may quote the URL, password included (the
        # transports' own errors are masked already).
        shown = str(err) if isinstance(err, BusUnavailableError) else self.bus.redact(str(err))
        self.last_error = f"{type(err).__name__}: {shown}"
        if was:
            log.warning("bus %s: connection lost (%s); reconnecting", self.bus, shown)
        elif first:
            log.warning("bus %s: cannot connect (%s); retrying in the background", self.bus, shown)
        else:
            log.info("bus %s: cannot connect (%s); retrying", self.bus, shown)

    def _serve(self, sub: Subscription) -> None:
        self.connected = True
        self.connects += 1
        if self.connects > 1:
            log.info("bus %s: reconnected", self.bus)
        self._catch_up(sub)
        self.last_error = None  # connected and caught up: the old error is history
        sub.reconnected = False
        self._fast_heartbeats_until = time.monotonic() + _FAST_HEARTBEATS
        self._heartbeat(sub)
        next_poll = time.monotonic() + _jitter(POLL_INTERVAL)
        while not self._should_exit():
            raw = sub.get(self._timeout())
            burst = 0
            while raw is not None:
                self._receive(raw, live=True)
                burst += 1
                if burst % _YIELD_EVERY == 0:
                    time.sleep(0)  # let the application's threads have the GIL
                # Drain what is queued before doing anything else, but
                # stay responsive to a flood.
                raw = sub.get(0.0) if burst < 1000 else None
            if sub.reconnected:  # the transport reconnected on its own
                sub.reconnected = False
                self.connects += 1
                self._catch_up(sub)
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + _jitter(POLL_INTERVAL)
                try:
                    behind = sub.generation() > max(self.applied, self._log_cursor)
                except BusDataError:  # junk in the generation key: read the log anyway
                    behind = True
                if behind:
                    self._catch_up(sub)
            now = time.monotonic()  # schedules: a wall-clock step must not stall them
            self._run_pending(now)
            self._log_summary()
            if now >= self._heartbeat_due:
                self._heartbeat(sub)

    def _timeout(self) -> float:
        now = time.monotonic()
        wake = min(now + _TICK, self._heartbeat_due)
        for _pool, member in self.pools():
            if member.pending is not None:
                wake = min(wake, member.pending.due)
        return max(0.0, wake - now)

    # -- receiving ---------------------------------------------------------------
    def _catch_up(self, sub: Subscription) -> None:
        """Apply what the log holds beyond the last verified generation processed."""
        start = max(self.applied, self._log_cursor)
        position = start  # paging through this read only: not a cursor
        while True:
            batch = sub.since(position)
            moved = False
            for n, (gen, raw) in enumerate(batch, 1):
                if gen > position:
                    position, moved = gen, True
                self._receive_logged(gen, raw)
                if n % _YIELD_EVERY == 0:
                    time.sleep(0)
            if not batch or not moved:
                return

    def _receive_logged(self, position: int, raw: bytes) -> None:
        """One log entry: verified, then applied, skipped as history, or rejected."""
        key = (position, hash(raw))
        if key in self._log_rejected:
            return  # rejected at an earlier catch-up: counted then
        received = time.time()
        try:
            command = decode(raw, self.secret, channel=self.bus.channel, max_age=None, now=received)
        except Rejected as rejected:
            self._remember_rejected(key)
            if not _issued_before(raw, self.created_at - ATTACH_GRACE):
                self._reject(rejected.kind, rejected.detail)
            # History that fails verification (signed with a secret since
            # rotated, or junk claiming to be old) is not counted, and moves
            # nothing: not the history mark, not the cursor.
            return
        if command.issued_at < self.created_at - ATTACH_GRACE:
            # History from before this listener existed, verified: not ours
            # to apply; --wait reports take it as done.
            self._history = max(self._history, command.gen)
            self._log_cursor = max(self._log_cursor, command.gen)
            self._settle()
            return
        if not self._accept(command, live=False, received=received):
            self._remember_rejected(key)
        self._log_cursor = max(self._log_cursor, min(command.gen, self.applied))

    def _remember_rejected(self, key: tuple[int, int]) -> None:
        if len(self._log_rejected) >= _RECENT:
            self._log_rejected.pop(next(iter(self._log_rejected)))
        self._log_rejected[key] = None

    def _receive(self, raw: bytes, live: bool) -> None:
        received = time.time()
        try:
            command = decode(raw, self.secret, channel=self.bus.channel, max_age=None, now=received)
        except Rejected as rejected:
            self._reject(rejected.kind, rejected.detail)
            return
        self._accept(command, live, received)

    def _accept(self, command: Command, live: bool, received: float) -> bool:
        """Apply a verified command; False if it was refused (and counted)."""
        age = received - command.issued_at
        if (live and abs(age) > LIVE_MAX_AGE) or (not live and -age > LIVE_MAX_AGE):
            if command.gen > self.applied:
                # Genuine but too old (or from a clock far off): refused, and
                # marked processed, so that reading it from the log later does
                # not apply it behind the window's back. Not settled: --wait
                # must not report it applied.
                self._processed(command.gen, live)
            when = f"{age:.0f}s ago" if age > 0 else f"{-age:.0f}s in the future"
            self._reject(STALE, f"issued {when} (window {LIVE_MAX_AGE:g}s)")
            return False
        gen = command.gen
        if gen <= self.applied:
            seen_live = self._recent_live.get(gen)
            if seen_live is False and live:
                # Read from the log at a reconnect, then delivered live too:
                # the normal overlap of the two paths, not an attack.
                self._recent_live[gen] = True
                self.duplicates += 1
                return True
            # Pub/sub delivers a message once: the same generation again
            # (or an older one) is somebody re-publishing it.
            self._reject(REPLAYED, f"generation {gen} <= {self.applied}")
            return False
        self._processed(gen, live)
        if not live and age > CATCH_UP_MAX_AGE:
            self._settle()
            self._reject(STALE, f"logged command {gen} is older than {CATCH_UP_MAX_AGE:g}s")
            return False
        self.accepted += 1
        # Connections opened after the command was issued are already fresh.
        cutoff = received if live else min(command.issued_at, received)
        for pool, member in self.pools():
            if command.matches(pool.pool_name) and (
                command.issued_at >= member.attached_at - ATTACH_GRACE
            ):
                self._dispatch(pool, member, command, cutoff, time.monotonic())
        self._settle()
        if len(self._to_ack) >= _ACKS_HELD:
            self._to_ack.pop(next(iter(self._to_ack)))
        self._to_ack[gen] = command
        self._heartbeat_due = min(self._heartbeat_due, self._ack_due(time.monotonic()))
        return True

    def _settle(self) -> None:
        """Pools with nothing waiting have done everything up to ``applied``."""
        done = max(self.applied, self._history)
        for _pool, member in self.pools():
            if member.pending is None:
                member.settled = max(member.settled, done)

    def _processed(self, gen: int, live: bool) -> None:
        self.applied = gen
        if len(self._recent) == self._recent.maxlen:
            self._recent_live.pop(self._recent[0], None)
        self._recent.append(gen)
        self._recent_live[gen] = live

    def _dispatch(
        self,
        pool: RebalancingQueuePool,
        member: _Member,
        command: Command,
        cutoff: float,
        now: float,
    ) -> None:
        interval = pool.config.min_recycle_interval
        if member.pending is None and now - member.last_applied >= interval:
            member.last_applied = now
            self._apply(pool, member, command, cutoff)
            return
        if member.pending is None:
            member.pending = _Pending(due=member.last_applied + interval)
        else:
            member.coalesced += 1
        member.pending.add(command, cutoff)

    def _run_pending(self, now: float) -> None:
        for pool, member in self.pools():
            pending = member.pending
            if pending is None or pending.due > now:
                continue
            member.pending = None
            member.last_applied = now
            for command, cutoff in pending.ordered():
                self._apply(pool, member, command, cutoff)
            member.settled = self.applied
            self._heartbeat_due = min(self._heartbeat_due, self._ack_due(now))

    def _apply(
        self, pool: RebalancingQueuePool, member: _Member, command: Command, cutoff: float
    ) -> None:
        member.applied += 1
        try:
            pool._apply_command(command, cutoff)
        except Exception:  # one pool's failure must not stop the others
            log.exception("pool %s: applying %s failed", pool.pool_name, command.describe())

    def _reject(self, kind: str, detail: str) -> None:
        # Per message: two dict updates. The log gets the first rejection of a
        # kind, then a summary at most once per LOG_EVERY (see _log_summary).
        self.rejected[kind] = self.rejected.get(kind, 0) + 1
        self._rejections.note(kind, detail)

    def _log_summary(self, force: bool = False) -> None:
        """Say how many rejections were left out of the log, once per LOG_EVERY."""
        self._rejections.summary(force)

    # -- reporting ---------------------------------------------------------------
    def _ack_due(self, now: float) -> float:
        """When to heartbeat after a command (see :data:`ACK_RATE`)."""
        fleet = self._fleet
        window = min(ACK_WINDOW_MAX, fleet / ACK_RATE) if fleet else 0.0
        return now + 0.2 + randomness.rng.uniform(0.0, window)

    def _heartbeat(self, sub: Subscription) -> None:
        now = time.monotonic()
        fast = now < self._fast_heartbeats_until
        self._heartbeat_due = now + (1.0 if fast else HEARTBEAT_INTERVAL)
        payload = json.dumps(self.status(time.time()), separators=(",", ":")).encode()
        acks = self._acks()
        sub.put_heartbeat(self.ident, payload, HEARTBEAT_INTERVAL * HEARTBEAT_TTL_FACTOR, acks)
        for gen, _pattern, _hit in acks:  # written: a failed write keeps them for the next
            self._to_ack.pop(gen, None)
        if sub.fleet_size is not None:
            self._fleet = sub.fleet_size
        self.heartbeats += 1

    def _acks(self) -> list[Ack]:
        """The commands every pool they were meant for has now applied (settled),
        to acknowledge with this heartbeat: ``recycle --wait`` then counts this
        process as done without reading its heartbeat."""
        members = [(pool.pool_name, member) for pool, member in self.pools()]
        out: list[Ack] = []
        for gen, command in self._to_ack.items():
            matching = [m for name, m in members if command.matches(name)]
            if all(m.settled >= gen for m in matching):
                out.append((gen, command.pool, bool(matching)))
        return out

    def status(self, now: float | None = None) -> dict[str, Any]:
        """This process's part of ``sqla-rebalance status`` (JSON-able)."""
        return status_payload(self, time.time() if now is None else now)

    def stats_for(self, pool: RebalancingQueuePool) -> BusStats:
        """The bus figures of ``pool.stats()``."""
        return bus_stats(self, pool)


# -- one listener per bus (and secret) per process (the registry: .registry) -----
def attach(pool: RebalancingQueuePool, bus: Bus, secret: bytes | None) -> Listener:
    """Have ``pool`` receive the commands of ``bus``; start the listener if needed."""
    key = registry.key(bus, secret)
    with registry.lock():
        listener = _registry.get(key)
        if listener is None or listener._stopped:
            listener = _registry[key] = Listener(bus, secret, key)
        listener._add(pool)
        return listener


def detach(pool: RebalancingQueuePool, listener: Listener) -> None:
    with registry.lock():
        listener._remove(pool)


def listener_for(bus: Bus, secret: bytes | None) -> Listener | None:
    """The running listener of ``bus`` in this process, if any (for tests and status)."""
    return _registry.get(registry.key(bus, secret))
