"""How the command-line front ends word what they send and what the fleet reports.

``sqla-rebalance``, ``flask rebalance`` and ``manage.py sqla_rebalance`` print
the same lines from these functions, so an operator reads one format whatever
tool the application uses, and a script parsing ``--json`` gets the same keys.
"""

from __future__ import annotations

from typing import Any

from . import ProcessStatus, Sent, WaitResult

__all__ = ["ACTION_HELP", "process_lines", "sent_line", "sent_record", "wait_lines"]

#: One line on what each command does (help texts of every front end).
ACTION_HELP = {
    "recycle": "replace connections gracefully: idle ones spread over --spread seconds, "
    "those in use at checkin",
    "rebalance": "move only the excess connections from over-loaded hosts to under-loaded ones",
    "refresh": "re-resolve DNS names and re-check every host now, then rebalance",
    "drain": "close every connection (idle now, in use at checkin) and open none until "
    "the application needs one again",
}


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
