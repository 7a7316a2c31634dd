"""The command core: the one flow behind ``sqla-rebalance``, ``flask rebalance``
and ``manage.py sqla_rebalance``.

A front end parses its framework's arguments, finds the bus (or buses) and the
secret, builds a :class:`Request` with :func:`request` and calls :func:`send`
or :func:`status`. Everything else is here, once: the checks of every value
(before anything is published), publishing, waiting for the fleet, the text
and ``--json`` output (worded by :mod:`.bus.report`, laid out per front end
by a :class:`Layout`) and the exit status. A failure is a
:class:`CommandFailure` carrying its exit status, which the front end maps to
its framework's way of exiting (a return code, ``click``, ``CommandError``).

Exit statuses (:data:`EXIT_STATUSES`):

==  =========================================================================
0   done; with ``--wait``, every live process with a matching pool applied it
1   ``--wait`` ran out first, or no live process has a matching pool
    (the command was published)
2   usage or configuration: a bad value, no bus, no secret; nothing was published
3   the bus: unreachable, or holding data this package did not write
==  =========================================================================
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .bus import (
    Bus,
    BusUnavailableError,
    ProcessStatus,
    Sent,
    WaitProgress,
    WaitResult,
    open_bus,
    read_fleet,
    send_command,
    wait_for,
)
from .bus.base import redact
from .bus.message import ACTIONS, MAX_SPREAD, new_command
from .bus.report import (
    check_spread,
    check_wait,
    invalid_line,
    process_lines,
    sent_line,
    sent_record,
    wait_lines,
)
from .errors import ConfigurationError
from .rollout import MAX_RATE, MAX_WIDENING, budget_spread, check_rate, rate_spread

__all__ = [
    "BUS_ERROR",
    "CLI",
    "DJANGO",
    "EXIT_STATUSES",
    "FLASK",
    "INCOMPLETE",
    "MAX_RATE",
    "MAX_WIDENING",
    "OK",
    "USAGE",
    "CommandFailure",
    "Layout",
    "ProgressPrinter",
    "Request",
    "Target",
    "budget_spread",
    "bus_display",
    "check_rate",
    "rate_spread",
    "request",
    "send",
    "status",
]

OK = 0
INCOMPLETE = 1
USAGE = 2
BUS_ERROR = 3

#: Every exit status of the commands and what it means (the same for every front end).
EXIT_STATUSES = {
    OK: "done; with --wait, every live process with a matching pool applied the command",
    INCOMPLETE: "--wait ran out first, or no live process has a matching pool "
    "(the command was published)",
    USAGE: "usage or configuration (a bad value, no bus, no secret): nothing was published",
    BUS_ERROR: "the bus could not be reached, or holds data this package did not write",
}

#: Where a front end prints one line (stdout or stderr).
Echo = Callable[[str], None]


class CommandFailure(Exception):
    """A command that stops: ``message`` says why, ``code`` is the exit status
    (:data:`USAGE` or :data:`BUS_ERROR`). Every password in it is masked."""

    def __init__(self, message: str, code: int = USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Request:
    """The checked values of one ``recycle|rebalance|refresh|drain`` (see :func:`request`)."""

    action: str
    #: Pool names or globs, one command each on every bus; empty: each target's own.
    pools: tuple[str, ...] = ()
    host: str | None = None
    spread: float = 0.0
    #: ``recycle`` only: new connections per second allowed to each database host,
    #: fleet-wide; the spread is then computed from fleet status (:func:`rate_spread`).
    rate: float | None = None
    #: Seconds to wait for the fleet to apply it; None: do not wait.
    wait: float | None = None
    unsigned: bool = False
    as_json: bool = False


def request(
    action: str,
    *,
    pools: Sequence[str] = (),
    host: str | None = None,
    spread: Any = None,
    wait: Any = None,
    unsigned: bool = False,
    as_json: bool = False,
    rate: Any = None,
) -> Request:
    """Check the values of a command, as typed (text) or as numbers.

    ``host`` and ``spread`` are ``recycle``'s only (None: not given);
    ``wait`` and ``spread`` must be finite numbers of seconds from 0 to one
    day (:func:`~.bus.report.check_wait`, :func:`~.bus.report.check_spread`).
    Raises :class:`CommandFailure` (:data:`USAGE`) naming the option.
    """
    if action not in ACTIONS:
        raise CommandFailure(f"unknown command {action!r}: one of {', '.join(ACTIONS)}")
    if action != "recycle":
        for name, value in (("host", host), ("spread", spread), ("rate", rate)):
            if value is not None:
                raise CommandFailure(f"--{name} applies to recycle only")
    if isinstance(pools, str):
        pools = (pools,)
    try:
        seconds = None if wait is None else check_wait(wait)
        spread_s = 0.0 if spread is None else check_spread(spread)
        rate_n = None if rate is None else check_rate(rate)
    except ValueError as err:
        raise CommandFailure(str(err)) from None
    if rate_n is not None and spread is not None:
        raise CommandFailure("--rate and --spread exclude each other: --rate computes the spread")
    return Request(
        action,
        pools=tuple(pools),
        host=host,
        spread=spread_s,
        wait=seconds,
        unsigned=bool(unsigned),
        as_json=bool(as_json),
        rate=rate_n,
    )


def bus_display(bus: str | Bus) -> str:
    """A bus as shown to the operator: its URL (with the channel), passwords masked."""
    return redact(bus) if isinstance(bus, str) else bus.display_url


@dataclass(frozen=True)
class Target:
    """One bus to act on, the secret its pools check, and its default pool names."""

    bus: str | Bus
    #: The secret to sign with (None: none found; fine only with ``--unsigned``).
    secret: str | bytes | None = None
    #: Pools to send to, or to show in ``status``, when the request names none.
    pools: tuple[str, ...] = ("*",)
    #: What to tell the operator when ``secret`` is None and the command is to be signed.
    no_secret: str = ""

    @property
    def display(self) -> str:
        return bus_display(self.bus)

    @property
    def url(self) -> str | None:
        """The URL (None for a bus object), whose passwords a driver's message may quote."""
        return self.bus if isinstance(self.bus, str) else None


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    """How one front end lays out the lines of :mod:`.bus.report`.

    Each front end keeps its documented format; the words are the same.
    """

    #: Sent lines, ``--json`` records and errors name the bus (front ends that may use several).
    name_bus: bool
    #: Put before each line about a wait: ``{pool}`` is the pool name or glob,
    #: ``{bus}`` the bus; ``wait_prefix_several`` when the command went to several buses.
    wait_prefix: str
    wait_prefix_several: str
    #: ``--json`` of a command: ``"one"`` (the one command's record), ``"list"``
    #: (a record per command) or ``"buses"`` (``{"buses": [records]}``).
    sent_json: Literal["one", "list", "buses"]
    #: ``status``: ``"processes"`` (process after process; JSON, a list of
    #: heartbeats) or ``"buses"`` (a header per bus; JSON, ``{"mode": "bus", ...}``).
    status_by: Literal["processes", "buses"]
    #: ``status`` when no live process matches (``"processes"`` only).
    no_process: str = ""

    def where(self, target: Target) -> str | None:
        return target.display if self.name_bus else None

    def on(self, target: Target, preposition: str) -> str:
        """`` on redis://...`` (or nothing, for a front end with one bus)."""
        return f" {preposition} {target.display}" if self.name_bus else ""

    def sent_out(self, records: list[dict[str, Any]]) -> Any:
        if self.sent_json == "one":
            return records[0]
        if self.sent_json == "buses":
            return {"buses": records}
        return records

    def status_out(self, found: list[tuple[Target, list[ProcessStatus]]]) -> Any:
        if self.status_by == "buses":
            buses = [{"bus": t.display, "processes": [p.raw for p in ps]} for t, ps in found]
            return {"mode": "bus", "buses": buses}
        if not self.name_bus:
            return [p.raw for _, ps in found for p in ps]
        return [
            {**p.raw, "bus": t.display, "this_process": p.is_this_process()}
            for t, ps in found
            for p in ps
        ]

    def status_lines(self, found: list[tuple[Target, list[ProcessStatus]]]) -> list[str]:
        lines: list[str] = []
        if self.status_by == "buses":
            for target, procs in found:
                lines.append(f"bus {target.display}: {len(procs)} live process(es)")
                lines += [f"  {line}" for p in procs for line in process_lines(p)]
            return lines
        for target, procs in found:
            for proc in procs:
                lines += process_lines(proc, where=self.where(target))
        return lines or [self.no_process]


#: ``sqla-rebalance``: one bus, one pool pattern, nothing named twice.
CLI = Layout(
    name_bus=False,
    wait_prefix="",
    wait_prefix_several="{bus}: ",
    sent_json="one",
    status_by="processes",
    no_process="no live process on this bus",
)
#: ``flask rebalance``: a command per pool of the app, on each of its buses.
FLASK = Layout(
    name_bus=True,
    wait_prefix="pool {pool}: ",
    wait_prefix_several="pool {pool} on {bus}: ",
    sent_json="list",
    status_by="processes",
    no_process="no live process with this app's pools on the bus",
)
#: ``manage.py sqla_rebalance``: one pool pattern, on each configured bus.
DJANGO = Layout(
    name_bus=True,
    wait_prefix="  ",
    wait_prefix_several="  on {bus}: ",
    sent_json="buses",
    status_by="buses",
)


# --------------------------------------------------------------------------- flow


def _usage(err: Exception, target: Target) -> CommandFailure:
    return CommandFailure(redact(str(err), target.url), USAGE)


def _plan(req: Request, targets: Sequence[Target]) -> list[tuple[Target, Bus, str]]:
    """Every (target, its bus, pool) to publish to, after every check: a command
    reaches all its buses and pools or, for anything but an unreachable bus, none."""
    if not targets:
        raise CommandFailure("no bus to publish on")
    try:  # again: a Request may be built by hand, and a NaN must never reach wait_for
        if req.wait is not None:
            check_wait(req.wait)
        check_spread(req.spread)
    except ValueError as err:
        raise CommandFailure(str(err)) from None
    if not req.unsigned:
        for target in targets:
            if target.secret is None:
                raise CommandFailure(
                    target.no_secret
                    or f"no secret to sign with for {target.display}: pass --unsigned for "
                    "pools configured without one"
                )
    plan = []
    for target in targets:
        try:
            bus = open_bus(target.bus)  # the scheme and the driver; connects to nothing
            for pool in req.pools or target.pools:
                new_command(req.action, pool=pool, host=req.host, spread=req.spread)
                plan.append((target, bus, pool))
        except (ValueError, ConfigurationError) as err:
            raise _usage(err, target) from None
    return plan


def _with_rate_spread(
    req: Request, plan: list[tuple[Target, Bus, str]], layout: Layout, out: Echo
) -> Request:
    """``req`` with the spread that holds ``req.rate`` (see :func:`rate_spread`), read
    from the status of every bus of the plan; nothing is published yet."""
    assert req.rate is not None
    processes: list[ProcessStatus] = []
    for target, bus in {id(b): (t, b) for t, b, _ in plan}.values():
        try:
            processes += read_fleet(bus).processes
        except BusUnavailableError as err:
            raise CommandFailure(
                f"cannot read status{layout.on(target, 'from')}: {err}", BUS_ERROR
            ) from None
    patterns = sorted({pool for _, _, pool in plan})  # pools that may share hosts: summed
    spread, connections, busiest = rate_spread(processes, patterns, req.host, req.rate)
    spread = math.ceil(spread * 100.0 - 1e-6) / 100.0  # to 10 ms, up: within the budget
    if spread > MAX_SPREAD:
        raise CommandFailure(
            f"--rate {req.rate:g}/s: {connections} connections on {busiest} would take "
            f"{spread:.0f}s, over a day; raise --rate"
        )
    if not req.as_json:
        widened = (
            f" ({connections}/{req.rate:g} = {connections / req.rate:.1f}s, widened for the "
            "chance peaks of independent pools)"
            if connections and spread > connections / req.rate * 1.001
            else ""
        )
        out(
            f"rate {req.rate:g}/s per host: {connections} open connections on the busiest "
            f"host ({busiest or 'none'}): spread {spread:.1f}s{widened}"
        )
    return dataclasses.replace(req, spread=spread)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class ProgressPrinter:
    """``--wait``'s progress, on the operator's stream (stderr).

    On a terminal: a one-line bar with the counts and an ETA, redrawn in place
    (at most every ``redraw`` seconds) and erased when the wait ends, before
    the result lines. Elsewhere: in text mode a line every ``every`` seconds,
    with ``--json`` nothing (the final JSON has the counts).
    """

    def __init__(
        self,
        write: Echo,
        *,
        tty: bool,
        flush: Callable[[], None] | None = None,
        as_json: bool = False,
        every: float = 5.0,
        redraw: float = 0.1,
        width: int = 24,
    ) -> None:
        self.tty = tty
        self._write = write
        self._flush = flush
        self._as_json = as_json
        self._every = every if not tty else redraw
        self._width = width
        self._prefix = ""
        self._shown = False
        self._next = 0.0

    @classmethod
    def on(cls, stream: Any, *, as_json: bool = False) -> ProgressPrinter:
        """A printer on a file-like ``stream`` (a bar if ``stream.isatty()``)."""
        try:
            tty = bool(stream.isatty())
        except (AttributeError, ValueError, OSError):  # no isatty, or closed
            tty = False
        flush = getattr(stream, "flush", None)
        return cls(stream.write, tty=tty, flush=flush, as_json=as_json)

    def start(self, prefix: str = "") -> Callable[[WaitProgress], None]:
        """The ``progress`` callback of one wait; ``prefix`` goes before its line."""
        self._prefix = prefix
        self._next = time.monotonic() + (0.0 if self.tty else self._every)
        return self.update

    @staticmethod
    def describe(p: WaitProgress) -> str:
        """``3/32 processes applied, 120/600 connections replaced, 4s, ETA 8s``."""
        parts = [f"{p.applied}/{p.applied + p.pending} processes applied"]
        if p.phase != "applying" and p.connections:
            parts.append(f"{p.retired or 0}/{p.connections} connections replaced")
        parts.append(_duration(p.elapsed))
        parts.append("ETA ?" if p.eta is None else f"ETA {_duration(p.eta)}")
        return ", ".join(parts)

    def update(self, p: WaitProgress) -> None:
        final = p.phase in ("done", "timeout")
        now = time.monotonic()
        if self.tty:
            if final:
                self.finish()
                return
            if now < self._next:
                return
            filled = round(p.fraction * self._width)
            bar = "#" * filled + "-" * (self._width - filled)
            self._out(f"\r{self._prefix}[{bar}] {self.describe(p)}\x1b[K")
            self._shown = True
        elif final or self._as_json or now < self._next:
            return
        else:
            self._out(f"{self._prefix}waiting: {self.describe(p)}\n")
        self._next = now + self._every

    def finish(self) -> None:
        """Erase the bar (a terminal), so that the result lines start clean."""
        if self._shown:
            self._out("\r\x1b[K")
            self._shown = False

    def _out(self, text: str) -> None:
        self._write(text)
        if self._flush is not None:
            self._flush()


def _rollout_line(result: WaitResult, spread: float) -> str | None:
    """After a wait that followed a rate rollout: how far the replacement got."""
    p = result.progress
    if p is None or not result.complete or p.connections is None:
        return None
    counts = f"{p.retired or 0} of {p.connections} connection(s)"
    if p.phase == "done":
        return f"replaced {counts} in {p.elapsed:.1f}s (planned spread {spread:.1f}s)"
    left = "" if p.eta is None else f", about {_duration(p.eta)} left"
    return f"rollout still running after {p.elapsed:.1f}s: {counts} replaced{left}"


def send(
    req: Request,
    targets: Sequence[Target],
    layout: Layout,
    out: Echo,
    progress: ProgressPrinter | None = None,
) -> int:
    """Publish ``req`` on every target (one command per pool), wait if asked,
    print what happened; return :data:`OK` or :data:`INCOMPLETE`.

    Raises :class:`CommandFailure`: :data:`USAGE` before anything is
    published, :data:`BUS_ERROR` when a bus fails. One ``--wait`` deadline
    covers every command. ``progress`` shows each wait as it goes. With
    ``--rate``, the wait also follows the rollout (see :func:`~.bus.wait_for`'s
    ``rollout``), until its connections are replaced or the deadline.
    """
    plan = _plan(req, targets)
    if req.rate is not None:
        req = _with_rate_spread(req, plan, layout, out)
    done: list[tuple[Target, Bus, str, Sent]] = []
    for target, bus, pool in plan:
        try:
            sent = send_command(
                bus,
                req.action,
                pool=pool,
                host=req.host,
                spread=req.spread,
                secret=None if req.unsigned else target.secret,
            )
        except BusUnavailableError as err:  # BusDataError too: junk on the bus is its problem
            raise CommandFailure(
                f"cannot publish{layout.on(target, 'on')}: {err}", BUS_ERROR
            ) from None
        except (ValueError, ConfigurationError) as err:  # pragma: no cover - checked in _plan
            raise _usage(err, target) from None
        done.append((target, bus, pool, sent))
        if not req.as_json:
            out(sent_line(sent, where=layout.where(target)))
    results: list[WaitResult | None] = [None] * len(done)
    if req.wait is not None:
        deadline = time.monotonic() + req.wait
        several = len(targets) > 1
        rollout = req.spread if req.rate is not None else None
        for i, (target, bus, pool, sent) in enumerate(done):
            prefix = (layout.wait_prefix_several if several else layout.wait_prefix).format(
                pool=pool, bus=target.display
            )
            try:
                result = wait_for(
                    bus,
                    sent.generation,
                    pool=pool,
                    timeout=max(0.0, deadline - time.monotonic()),
                    progress=None if progress is None else progress.start(prefix),
                    rollout=rollout,
                    host=req.host,
                )
            except BusUnavailableError as err:
                raise CommandFailure(
                    f"cannot read status{layout.on(target, 'from')}: {err}", BUS_ERROR
                ) from None
            finally:
                if progress is not None:
                    progress.finish()
            results[i] = result
            if not req.as_json:
                lines = wait_lines(result, pool)
                if rollout is not None:
                    lines += [line for line in [_rollout_line(result, rollout)] if line]
                for line in lines:
                    out(f"{prefix}{line}")
    if req.as_json:
        records = []
        for (target, _, _, sent), waited in zip(done, results, strict=True):
            record = sent_record(sent, waited, bus=layout.where(target))
            if req.rate is not None:
                record.update(rate=req.rate, spread=req.spread)
            if waited is not None and waited.progress is not None:
                record["progress"] = waited.progress.as_dict()
            records.append(record)
        out(json.dumps(layout.sent_out(records), indent=2))
    complete = all(r is not None and r.complete for r in results)
    return OK if req.wait is None or complete else INCOMPLETE


def status(
    targets: Sequence[Target],
    patterns: Sequence[str],
    layout: Layout,
    out: Echo,
    err: Echo,
    *,
    as_json: bool = False,
) -> int:
    """Print every live process with a pool matching ``patterns`` (empty: each
    target's own pools) on each bus, from their heartbeats; return :data:`OK`.

    Every bus is read before anything is printed. Unreadable heartbeats are
    skipped and counted on ``err``. Raises :class:`CommandFailure`.
    """
    found: list[tuple[Target, list[ProcessStatus]]] = []
    for target in targets:
        wanted = tuple(patterns) or target.pools
        try:
            fleet = read_fleet(target.bus)
        except BusUnavailableError as error:
            raise CommandFailure(
                f"cannot read status{layout.on(target, 'from')}: {error}", BUS_ERROR
            ) from None
        except (ValueError, ConfigurationError) as error:
            raise _usage(error, target) from None
        skipped = invalid_line(fleet.invalid)
        if skipped:
            err(f"{target.display}: {skipped}" if layout.name_bus else skipped)
        found.append((target, [p for p in fleet.processes if any(map(p.has_pool, wanted))]))
    if as_json:
        out(json.dumps(layout.status_out(found), indent=2))
        return OK
    for line in layout.status_lines(found):
        out(line)
    return OK
