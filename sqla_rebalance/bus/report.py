"""How the command-line front ends word what they send and what the fleet reports.

``sqla-rebalance``, ``flask rebalance`` and ``manage.py sqla_rebalance`` print
the same lines from these functions, so an operator reads one format whatever
tool the application uses, and a script parsing ``--json`` gets the same keys.
The flow that prints them (checks, publish, wait, exit status) is
:mod:`sqla_rebalance.commands`, the command core of all three.
"""

from __future__ import annotations

import math
from typing import Any

from . import ProcessStatus, Sent, WaitResult
from .message import MAX_SPREAD

__all__ = [
    "ACTION_HELP",
    "MAX_WAIT",
    "check_seconds",
    "check_spread",
    "check_wait",
    "invalid_line",
    "process_lines",
    "sent_line",
    "sent_record",
    "wait_lines",
]

#: Longest ``--wait`` (one day): anything longer is a typo, not a plan.
MAX_WAIT = 86400.0

#: One line on what each command does (help texts of every front end).
ACTION_HELP = {
    "recycle": "replace connections gracefully: idle ones spread over --spread seconds, "
    "those in use at checkin",
    "rebalance": "move only the excess connections from over-loaded hosts to under-loaded ones",
    "refresh": "re-resolve DNS names and re-check every host now, then rebalance",
    "drain": "close every connection (idle now, in use at checkin) and open none until "
    "the application needs one again",
}


def check_seconds(value: Any, option: str, maximum: float | None = None) -> float:
    """``value`` (a number or its text) as seconds, or ``ValueError`` saying why.

    The one check of every front end for ``--wait`` and ``--spread``: a finite
    number, at least 0, at most ``maximum`` (``--wait``: :data:`MAX_WAIT`,
    ``--spread``: one day). ``nan`` and ``inf`` are refused: a NaN wait would
    never end and poll the bus as fast as it can. A bool is not a number of
    seconds (``wait=True`` from Python is a mistake, not one second).
    """
    try:
        if isinstance(value, bool):
            raise TypeError("a bool")
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{option} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{option} must be a finite number of seconds >= 0, got {value!r}")
    if maximum is not None and seconds > maximum:
        raise ValueError(f"{option} must be at most {maximum:g} seconds, got {value!r}")
    return abs(seconds)  # -0.0 is 0.0


def check_wait(value: Any) -> float:
    """``--wait SECONDS``: 0 to one day."""
    return check_seconds(value, "--wait", MAX_WAIT)


def check_spread(value: Any) -> float:
    """``--spread SECONDS``: 0 to one day."""
    return check_seconds(value, "--spread", MAX_SPREAD)


def invalid_line(invalid: int) -> str | None:
    """The warning for unreadable heartbeats that were skipped (None: there were none)."""
    if not invalid:
        return None
    return (
        f"skipped {invalid} unreadable heartbeat(s) on this bus (not written by "
        "sqla-rebalance, or corrupted)"
    )


def sent_line(sent: Sent, where: str | None = None) -> str:
    """``sent generation N: recycle pool=orders spread=30s, 4 listener(s) reached``."""
    reached = "" if sent.receivers is None else f", {sent.receivers} listener(s) reached"
    on = f" on {where}" if where else ""
    return f"sent generation {sent.generation}: {sent.command.describe()}{on}{reached}"


def wait_lines(result: WaitResult, pool: str) -> list[str]:
    """Who applied it, who has not, who went away meanwhile."""
    if not result.applied and not result.pending:
        lines = [f"no live process has a pool matching {pool!r} on this bus"]
    else:
        lines = [f"applied by {len(result.applied)} process(es)"]
    lines += [f"NOT applied by {p.process} (at generation {p.generation})" for p in result.pending]
    lines += [f"gone before applying it: {p.process} (its heartbeat expired)" for p in result.lost]
    skipped = invalid_line(result.invalid)
    if skipped:
        lines.append(skipped)
    return lines


def sent_record(
    sent: Sent, result: WaitResult | None = None, bus: str | None = None
) -> dict[str, Any]:
    """The ``--json`` form of one published command (and of its wait)."""
    record: dict[str, Any] = {
        "generation": sent.generation,
        "command": sent.command.describe(),
        "pool": sent.command.pool,
        "receivers": sent.receivers,
    }
    if bus is not None:
        record["bus"] = bus
    if result is not None:
        record["applied"] = [p.process for p in result.applied]
        record["pending"] = [p.process for p in result.pending]
        record["lost"] = [p.process for p in result.lost]
        if result.invalid:
            record["invalid_heartbeats"] = result.invalid
    return record


def process_lines(proc: ProcessStatus, *, where: str | None = None) -> list[str]:
    """A process, its pools (connections, churn, commands) and their hosts."""
    mine = " (this process)" if proc.is_this_process() else ""
    on = f"  on {where}" if where else ""
    lines = [
        f"{proc.process}{mine}{on}  generation {proc.generation}  (heartbeat {proc.age:.1f}s ago)"
    ]
    for pool in proc.pools:
        churn = pool.get("churn_per_min", {})
        pending = pool.get("commands_pending")
        lines.append(
            f"  pool {pool.get('pool')}: open {pool.get('open')} "
            f"(idle {pool.get('idle')}, in use {pool.get('in_use')}), "
            f"churn/min connects {churn.get('connects', 0)} "
            f"retirements {churn.get('retirements', 0)}, "
            f"commands applied {pool.get('commands_applied', 0)}"
            + (f", {pending} pending" if pending else "")
        )
        lines += [
            f"    {key:<24} open {host.get('open')} idle {host.get('idle')} "
            f"in use {host.get('in_use')}  {host.get('health')} {host.get('role')}"
            for key, host in sorted(pool.get("hosts", {}).items())
        ]
    return lines
