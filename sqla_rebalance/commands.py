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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .bus import (
    Bus,
    BusUnavailableError,
    ProcessStatus,
    Sent,
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

__all__ = [
    "BUS_ERROR",
    "CLI",
    "DJANGO",
    "EXIT_STATUSES",
    "FLASK",
    "INCOMPLETE",
    "MAX_RATE",
    "OK",
    "USAGE",
    "CommandFailure",
    "Layout",
    "Request",
    "Target",
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


#: The highest ``--rate`` (new connections per second per host) accepted.
MAX_RATE = 1_000_000.0


def check_rate(value: Any) -> float:
    """``--rate``: a finite number of new connections per second, above 0 (ValueError)."""
    if isinstance(value, bool):
        raise ValueError(f"--rate must be a number of connections per second, got {value!r}")
    try:
        rate = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(
            f"--rate must be a number of connections per second, got {str(value)[:40]!r}"
        ) from None
    if not 0.0 < rate <= MAX_RATE:  # refuses nan too
        raise ValueError(f"--rate must be above 0 and at most {MAX_RATE:g} per second, got {rate}")
    return rate


def rate_spread(
    processes: Sequence[ProcessStatus], patterns: Sequence[str], host: str | None, rate: float
) -> tuple[float, int, str | None]:
    """The spread that keeps a fleet's reconnects to each database host at or under
    ``rate`` per second: the busiest host's open connections (summed over every
    process's pools matching one of ``patterns``, from their heartbeats) divided by
    ``rate``. Pools whose heartbeat names no host count as one host together (the
    cautious reading). Returns ``(spread, connections on that host, the host)``.

    Each pool spreads its share evenly over the spread (``recycle`` stratifies its
    moments), so the fleet's rate stays near the budget in every second.
    """
    probes = [new_command("recycle", pool=pattern) for pattern in patterns]
    per_host: dict[str, int] = {}
    for proc in processes:
        for pool in proc.pools:  # each a dict: parse_heartbeat refused the rest
            name = str(pool.get("pool", ""))
            if not any(probe.matches(name) for probe in probes):
                continue
            hosts = pool.get("hosts")
            if isinstance(hosts, dict) and hosts:
                for key, figures in hosts.items():
                    if host is not None and not (key == host or key.startswith(f"{host}:")):
                        continue
                    n = figures.get("open") if isinstance(figures, dict) else None
                    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                        per_host[str(key)] = per_host.get(str(key), 0) + n
            elif host is None:
                n = pool.get("open")
                if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                    per_host["(unnamed)"] = per_host.get("(unnamed)", 0) + n
    if not per_host:
        return 0.0, 0, None
    busiest = max(per_host, key=lambda k: per_host[k])
    return per_host[busiest] / rate, per_host[busiest], busiest


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
    if spread > MAX_SPREAD:
        raise CommandFailure(
            f"--rate {req.rate:g}/s: {connections} connections on {busiest} would take "
            f"{spread:.0f}s, over a day; raise --rate"
        )
    if not req.as_json:
        out(
            f"rate {req.rate:g}/s per host: {connections} open connections on the busiest "
            f"host ({busiest or 'none'}): spread {spread:.1f}s"
        )
    return dataclasses.replace(req, spread=spread)


def send(req: Request, targets: Sequence[Target], layout: Layout, out: Echo) -> int:
    """Publish ``req`` on every target (one command per pool), wait if asked,
    print what happened; return :data:`OK` or :data:`INCOMPLETE`.

    Raises :class:`CommandFailure`: :data:`USAGE` before anything is
    published, :data:`BUS_ERROR` when a bus fails. One ``--wait`` deadline
    covers every command.
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
        for i, (target, bus, pool, sent) in enumerate(done):
            try:
                result = wait_for(
                    bus,
                    sent.generation,
                    pool=pool,
                    timeout=max(0.0, deadline - time.monotonic()),
                )
            except BusUnavailableError as err:
                raise CommandFailure(
                    f"cannot read status{layout.on(target, 'from')}: {err}", BUS_ERROR
                ) from None
            results[i] = result
            if not req.as_json:
                prefix = (layout.wait_prefix_several if several else layout.wait_prefix).format(
                    pool=pool, bus=target.display
                )
                for line in wait_lines(result, pool):
                    out(f"{prefix}{line}")
    if req.as_json:
        records = [
            sent_record(sent, result, bus=layout.where(target))
            for (target, _, _, sent), result in zip(done, results, strict=True)
        ]
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
