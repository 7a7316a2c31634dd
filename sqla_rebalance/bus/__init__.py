"""Cluster-wide commands: ``recycle``, ``rebalance``, ``refresh``, ``drain``.

A pool created with ``broadcast=URL`` listens on that bus; anybody with the
secret can then act on every pool of the fleet at once::

    from sqla_rebalance.bus import send_command, wait_for

    sent = send_command("redis://redis.internal:6379/0", "recycle",
                        pool="orders", spread=60, secret=os.environ["SQLA_REBALANCE_SECRET"])
    result = wait_for("redis://redis.internal:6379/0", sent.generation, pool="orders")

Transports, chosen by URL scheme: ``redis://``/``rediss://`` (redis-py;
``redis+sentinel://`` through Redis Sentinel), ``postgresql://`` (psycopg;
``LISTEN``/``NOTIFY``, or polling with ``mode=poll``) and ``sqlite:///path``
(an embedded bus polling a file, no server). A ``channel=NAME`` query
parameter separates independent fleets on one server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError
from .base import (
    DEFAULT_CHANNEL,
    Bus,
    BusDataError,
    BusUnavailableError,
    Subscription,
    redact,
    split_channel,
)
from .message import ACTIONS, Command, encode, new_command
from .process_status import MAX_HEARTBEAT_BYTES, ProcessStatus, _generation_of, parse_heartbeat

__all__ = [
    "ACTIONS",
    "MAX_HEARTBEAT_BYTES",
    "Bus",
    "BusDataError",
    "BusUnavailableError",
    "Command",
    "Fleet",
    "ProcessStatus",
    "Sent",
    "Subscription",
    "WaitProgress",
    "WaitResult",
    "fleet_status",
    "open_bus",
    "parse_heartbeat",
    "read_fleet",
    "send_command",
    "wait_for",
]

_CHANNEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _check_channel(channel: str) -> str:
    if (
        not channel
        or len(channel) > 63
        or not set(channel) <= _CHANNEL_CHARS
        or channel[0].isdigit()
    ):
        raise ConfigurationError(
            f"bus channel must be 1-63 letters, digits or underscores, not starting with a "
            f"digit (it names a Redis key prefix and a PostgreSQL NOTIFY channel), "
            f"got {channel!r}"
        )
    return channel


def open_bus(bus: str | Bus, channel: str | None = None) -> Bus:
    """The bus for ``bus`` (a URL, or a :class:`Bus`, returned as is).

    Raises :class:`~sqla_rebalance.ConfigurationError` for a URL this
    package cannot serve (unknown scheme, driver not installed). Connects
    to nothing: a bus that is down never fails here.
    """
    if isinstance(bus, Bus):
        return bus
    if not isinstance(bus, str) or "://" not in bus:
        raise ConfigurationError(
            "broadcast must be a bus URL (redis://..., postgresql://..., sqlite:///path) "
            f"or a sqla_rebalance.bus.Bus, got {bus!r}"
        )
    url, url_channel = split_channel(bus, channel or DEFAULT_CHANNEL)
    channel = _check_channel(url_channel)
    scheme = url.split("://", 1)[0].lower()
    try:
        if scheme in ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel"):
            from .redis_bus import RedisBus

            return RedisBus(url, channel)
        if scheme in ("redis+cluster", "rediss+cluster"):
            from .redis_cluster import RedisClusterBus

            return RedisClusterBus(url, channel)
        if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
            from .postgres_bus import PostgresBus

            return PostgresBus(url, channel)
        if scheme == "sqlite":
            from .sqlite_bus import SQLiteBus

            return SQLiteBus(url, channel)
    except ImportError as err:
        extra = "redis" if scheme.startswith(("redis", "unix")) else "postgresql"
        raise ConfigurationError(
            f"broadcast={redact(bus)} needs the {err.name} package: "
            f"pip install 'sqla-rebalance[{extra}]'"
        ) from err
    except ValueError as err:
        raise ConfigurationError(f"broadcast={redact(bus)}: {err}") from err
    raise ConfigurationError(
        f"broadcast: unknown bus scheme {scheme!r} in {redact(bus)} "
        "(use redis://, rediss://, redis+sentinel://, redis+cluster://, postgresql:// or "
        "sqlite:///path)"
    )


def _secret_bytes(secret: str | bytes | None) -> bytes | None:
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes) or not secret:
        raise ConfigurationError("broadcast_secret must be a non-empty string or bytes")
    return secret


@dataclass(frozen=True)
class Sent:
    """A published command."""

    generation: int
    command: Command
    #: Listeners that received it at once (Redis only; None where unknown).
    receivers: int | None


def send_command(
    bus: str | Bus,
    action: str,
    *,
    pool: str = "*",
    host: str | None = None,
    spread: float = 0.0,
    secret: str | bytes | None,
) -> Sent:
    """Publish one command to every listening process; return its generation.

    ``secret`` signs it (pools with a ``broadcast_secret`` reject anything
    else); pass None explicitly to send an unsigned command to pools
    configured without a secret. Raises :class:`BusUnavailableError` if the
    bus cannot be reached, ``ValueError`` for bad arguments.
    """
    target = open_bus(bus)
    key = _secret_bytes(secret)
    command = new_command(action, pool=pool, host=host, spread=spread)
    built: dict[str, Command] = {}

    def build(gen: int) -> bytes:
        built["command"] = stamped = dataclasses.replace(command, gen=gen)
        # Signed for this channel: a copy replayed on another one is refused.
        return encode(stamped, key, channel=target.channel)

    gen, receivers = target.publish(build)
    return Sent(generation=gen, command=built["command"], receivers=receivers)


@dataclass(frozen=True)
class Fleet:
    """What :func:`read_fleet` found on a bus."""

    processes: list[ProcessStatus]
    #: Heartbeats that could not be read (junk on the bus), skipped.
    invalid: int = 0


def read_fleet(bus: str | Bus) -> Fleet:
    """Every live process listening on ``bus``, and how many heartbeats were junk."""
    target = open_bus(bus)
    now = time.time()
    out = []
    invalid = 0
    for raw in target.heartbeats():
        try:
            out.append(parse_heartbeat(raw, now))
        except ValueError:
            invalid += 1  # a heartbeat we cannot read is not a process we can report on
    out.sort(key=lambda p: p.process)
    return Fleet(out, invalid)


def fleet_status(bus: str | Bus) -> list[ProcessStatus]:
    """Every live process listening on ``bus``, with its pools' figures
    (unreadable heartbeats are skipped: :func:`read_fleet` counts them)."""
    return read_fleet(bus).processes


@dataclass(frozen=True)
class WaitProgress:
    """Where a :func:`wait_for` stands, after one look at the heartbeats.

    Passed to its ``progress`` callback after every look, and kept as
    :attr:`WaitResult.progress`. Every count only grows from one look to the
    next (a process that applied the command and then exited still counts as
    applied); ``pending`` is the live processes not done yet.
    """

    generation: int
    #: Seconds since the wait began.
    elapsed: float
    #: Processes seen done with the generation (every matching pool).
    applied: int
    #: Live processes with a matching pool, not done yet.
    pending: int
    #: Seen not done, then gone (their heartbeat expired).
    lost: int
    #: Open connections of the matching pools (on ``host``, if given) when each
    #: process was first seen; None until a heartbeat reports a figure.
    connections: int | None = None
    #: Connections retired by a command (reason ``signal``) since each process was
    #: first seen, from the heartbeats (which lag by up to a heartbeat interval).
    retired: int | None = None
    #: Seconds still to go, estimated: from the planned spread when following a
    #: rollout, else from the pace of the processes so far; None: no basis yet.
    #: Always finite and >= 0 when given.
    eta: float | None = None
    #: ``applying`` (processes still to apply it), ``replacing`` (every process
    #: has; the rollout's connections are being replaced), ``done``, or
    #: ``timeout`` (the last look, before it was done).
    phase: str = "applying"

    @property
    def remaining(self) -> int | None:
        """Connections not reported retired yet (None: unknown)."""
        if self.connections is None:
            return None
        return max(0, self.connections - (self.retired or 0))

    @property
    def fraction(self) -> float:
        """How far along, 0 to 1: connections replaced while following a rollout
        (once known), else processes done."""
        if self.phase == "done":
            return 1.0
        if self.phase != "applying" and self.connections:
            return min(1.0, (self.retired or 0) / self.connections)
        total = self.applied + self.pending
        return self.applied / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able counts (``--json``)."""
        return {
            "phase": self.phase,
            "processes": self.applied + self.pending,
            "applied": self.applied,
            "pending": self.pending,
            "lost": self.lost,
            "connections": self.connections,
            "retired": self.retired,
            "elapsed": round(self.elapsed, 3),
            "eta": None if self.eta is None else round(self.eta, 3),
        }


@dataclass(frozen=True)
class WaitResult:
    """Who has applied a generation, after :func:`wait_for`."""

    generation: int
    applied: list[ProcessStatus]
    #: Live, with a matching pool, and not done yet.
    pending: list[ProcessStatus]
    #: Seen not done during the wait, then gone (exited, or lost the bus).
    lost: list[ProcessStatus] = field(default_factory=list)
    #: Heartbeats skipped as unreadable at the last look (junk on the bus).
    invalid: int = 0
    #: The counts at the last look (elapsed time, connections retired, ETA).
    progress: WaitProgress | None = None

    @property
    def complete(self) -> bool:
        """Every live process with a matching pool has applied it (and there was one)."""
        return not self.pending and bool(self.applied)

    @property
    def replaced(self) -> bool:
        """After a wait that followed a rollout: it ended, every connection counted
        at the start reported retired, or the spread and a heartbeat passed."""
        return self.progress is not None and self.progress.phase == "done"


#: How late a heartbeat may report a retirement (the listener's heartbeat
#: interval) plus a margin: a rollout is over this long after its spread.
_REPORT_LAG = 6.0


def _pool_counts(proc: ProcessStatus, pattern: str, host: str | None) -> tuple[int, int]:
    """(open connections, retirements by a command) of ``proc``'s pools matching
    ``pattern``; open ones on ``host`` only, if given (retirements are per pool)."""
    probe = Command(action="recycle", pool=pattern)
    opened = retired = 0
    for p in proc._pools():
        if not probe.matches(str(p.get("pool", ""))):
            continue
        signal = p.get("retirements", {}).get("signal", 0)
        retired += int(signal) if isinstance(signal, (int, float)) else 0
        if host is None:
            opened += _generation_of(p.get("open"))
            continue
        for key, figures in p.get("hosts", {}).items():
            if key == host or str(key).startswith(f"{host}:"):
                opened += _generation_of(figures.get("open"))
    return opened, retired


class _Progress:
    """The counts of one :func:`wait_for`, kept monotone across looks."""

    def __init__(self, generation: int, pool: str, host: str | None, rollout: float | None):
        self.generation = generation
        self.pool = pool
        self.host = host
        self.rollout = rollout
        self.started = time.monotonic()
        self.applied: set[str] = set()
        self.first: dict[str, tuple[int, int]] = {}  # process: (open, signal) when first seen
        self.retired: dict[str, int] = {}
        self.all_applied_at: float | None = None
        #: The most processes counted done by their acknowledgements at one look,
        #: and those seen pending there that went away.
        self.acknowledged = 0
        self.lost: set[str] = set()

    def look_acknowledged(self, applied: int, pending: int) -> WaitProgress:
        """A look from the acknowledgements (no figures of connections)."""
        self.acknowledged = max(self.acknowledged, applied)
        applied = max(self.acknowledged, len(self.applied))
        elapsed = time.monotonic() - self.started
        phase, eta = "applying", (elapsed * pending / applied if applied else None)
        if applied and not pending:
            phase, eta = "done", 0.0
        return WaitProgress(
            self.generation, elapsed, applied, pending, len(self.lost), eta=eta, phase=phase
        )

    def look(
        self, procs: list[ProcessStatus], applied: list[ProcessStatus], pending: int, lost: int
    ) -> WaitProgress:
        now = time.monotonic()
        for proc in procs:
            opened, signal = _pool_counts(proc, self.pool, self.host)
            base = self.first.setdefault(proc.process, (opened, signal))
            self.retired[proc.process] = max(self.retired.get(proc.process, 0), signal - base[1])
        self.applied.update(p.process for p in applied)
        if applied and not pending and self.all_applied_at is None:
            self.all_applied_at = now  # as wait_for always did: live ones, all done
        connections = sum(o for o, _ in self.first.values()) if self.first else None
        retired = sum(self.retired.values()) if self.first else None
        elapsed = now - self.started
        phase, eta = "applying", None
        if self.all_applied_at is None:
            if self.rollout is not None:
                eta = self.rollout
            elif self.applied and pending:
                eta = elapsed * pending / len(self.applied)
        elif self.rollout is None:
            phase, eta = "done", 0.0
        else:
            end = self.all_applied_at + self.rollout
            replaced = connections is not None and (retired or 0) >= connections
            if replaced or now >= end + _REPORT_LAG:
                phase, eta = "done", 0.0
            else:
                phase, eta = "replacing", max(0.0, end - now)
        return WaitProgress(
            self.generation,
            elapsed,
            max(len(self.applied), self.acknowledged),
            pending,
            max(lost, len(self.lost)),
            connections,
            retired,
            eta,
            phase,
        )


def wait_for(
    bus: str | Bus,
    generation: int,
    *,
    pool: str = "*",
    timeout: float = 30.0,
    interval: float = 0.1,
    progress: Callable[[WaitProgress], None] | None = None,
    rollout: float | None = None,
    host: str | None = None,
) -> WaitResult:
    """Wait until every live process with a pool matching ``pool`` has
    processed ``generation`` (like PgBouncer's ``WAIT_CLOSE``), or ``timeout``.

    A process whose heartbeat expires meanwhile (it exited, or lost the bus)
    is no longer waited for, and is reported in ``lost``. Returns who has and
    who has not; ``complete`` is False when no process has a matching pool.
    ``timeout`` and ``interval`` must be finite numbers of seconds, ``timeout``
    >= 0 and ``interval`` > 0 (``ValueError`` otherwise: a NaN would poll
    forever, as fast as it can).

    ``progress`` is called with a :class:`WaitProgress` after every look, the
    last one in phase ``done`` or ``timeout``. ``rollout`` (a recycle's spread,
    in seconds) also follows the rollout once every process has applied it:
    the wait goes on until the connections open at the start (on ``host``, if
    given) have been reported retired, or the spread and a heartbeat interval
    have passed, or ``timeout``; ``complete`` still means applied.
    """
    for name, value, least in (("timeout", timeout, 0.0), ("interval", interval, 1e-3)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < least
        ):
            raise ValueError(f"{name} must be a finite number of seconds >= {least:g}")
    if rollout is not None and (
        isinstance(rollout, bool) or not math.isfinite(rollout) or rollout < 0
    ):
        raise ValueError("rollout must be a finite number of seconds >= 0")
    target = open_bus(bus).for_waiting()
    try:
        return _wait(target, generation, pool, timeout, interval, progress, rollout, host)
    finally:
        if target is not bus:  # this wait's own: release the client kept for the looks
            target.close()


def _ack_look(
    target: Bus, generation: int, pool: str, waiting: dict[str, ProcessStatus], counts: _Progress
) -> WaitProgress | None:
    """One cheap look, from the command's acknowledgements: only the processes
    that have not acknowledged it are read. None: the transport keeps none."""
    acks = target.acknowledgements(generation, pool)
    if acks is None:
        return None
    now = time.time()
    procs = []
    for raw in acks.heartbeats:
        with contextlib.suppress(ValueError):  # junk: the final full look counts it
            proc = parse_heartbeat(raw, now)
            if proc.has_pool(pool):
                procs.append(proc)
    applied = [p for p in procs if p.has_applied(generation, pool)]
    pending = [p for p in procs if not p.has_applied(generation, pool)]
    waiting.update((p.process, p) for p in pending)
    counts.lost.update(name for name in acks.gone if name in waiting)
    return counts.look_acknowledged(acks.applied + len(applied), len(pending))


def _wait(
    target: Bus,
    generation: int,
    pool: str,
    timeout: float,
    interval: float,
    progress: Callable[[WaitProgress], None] | None,
    rollout: float | None,
    host: str | None,
) -> WaitResult:
    deadline = time.monotonic() + timeout
    waiting: dict[str, ProcessStatus] = {}
    counts = _Progress(generation, pool, host, rollout)
    # Following a rollout needs every matching process's figures: heartbeats.
    use_acks = rollout is None
    while True:
        if use_acks:
            state = _ack_look(target, generation, pool, waiting, counts)
            if state is None:
                use_acks = False
            elif state.pending and time.monotonic() < deadline:
                if progress is not None:
                    progress(state)
                time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
                continue
            # Nothing pending by the acknowledgements (done, or no process known
            # to have a matching pool: one may have made it since it acknowledged),
            # or out of time: the answer, with its lists, comes from a full look.
        fleet = read_fleet(target)
        procs = [p for p in fleet.processes if p.has_pool(pool)]
        applied = [p for p in procs if p.has_applied(generation, pool)]
        pending = [p for p in procs if not p.has_applied(generation, pool)]
        waiting.update((p.process, p) for p in pending)
        live = {p.process for p in procs}
        lost = [p for key, p in sorted(waiting.items()) if key not in live]
        state = counts.look(procs, applied, len(pending), len(lost))
        if state.phase != "done" and time.monotonic() >= deadline:
            state = dataclasses.replace(state, phase="timeout")
        if progress is not None:
            progress(state)
        if state.phase in ("done", "timeout"):
            return WaitResult(generation, applied, pending, lost, fleet.invalid, state)
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
