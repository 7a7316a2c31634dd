"""The demo's report: a line when each phase ends, and the summary at the end."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .book import ADDED, DOWNED, Book, Phase, fmt_counts, fmt_reasons
from .output import Out
from .workload import Workload


def _from(phase: Phase, reason: str) -> dict[str, int]:
    """Retirements of one reason in a phase, by host label."""
    return {h: n for (h, r), n in sorted(phase.retired_from.items()) if r == reason}


def _of(phase: Phase, label: str) -> dict[str, int]:
    """Retirements of one host in a phase, by reason."""
    return {r: n for (h, r), n in sorted(phase.retired_from.items()) if h == label}


def _labels(counts: Mapping[str, int]) -> str:
    return " ".join(f"{h}={n}" for h, n in counts.items()) or "none"


def summarise_phase(
    book: Book, out: Out, added: Mapping[str, Any], failback: Mapping[str, int]
) -> None:
    """A line on what the phase that just ended did."""
    if not book.phases:
        return
    phase = book.phases[-1]
    h_add, h_down = f"h{ADDED + 1}", f"h{DOWNED + 1}"
    if phase.name == f"{h_add} added":
        moved = _from(phase, "rebalance")
        out.say(
            f"phase    {phase.name}: the rebalance moved {sum(moved.values())} "
            f"(off {_labels(moved)}; minimum for an even spread {added.get('minimum')}, never "
            f"more; lifetime replacements open on the least-loaded host too); "
            f"{h_add} got {phase.opened.get(h_add, 0)} connections"
        )
    elif phase.name == f"{h_down} down":
        seen = book.first("host_down", h_down, phase.start)
        gone = _of(phase, h_down)
        when = (
            f"marked down {seen - phase.start:.2f}s after it went"
            if seen is not None
            else "never marked down: no connect reached it (a connection is replaced when its "
            "lifetime ends; with --duration of at least 4 x --recycle every one does while the "
            "host is away)"
        )
        # Until the phase ends: the host is back only in the next phase.
        while_down = book.opened_between(h_down, seen, out.elapsed()) if seen is not None else 0
        out.say(
            f"phase    {phase.name}: {when}; {sum(gone.values())} of its connections retired "
            f"({fmt_reasons(gone)}), {while_down} opened there while it was marked down"
        )
    elif phase.name == f"{h_down} back":
        seen = book.first("host_up", h_down, phase.start)
        was_down = book.first("host_down", h_down, 0.0) is not None
        when = (
            f"marked up {seen - phase.start:.2f}s after it came back"
            if seen is not None
            else "never marked up"
            if was_down
            else "it was never marked down: no failback"
        )
        moved = _from(phase, "rebalance")
        out.say(
            f"phase    {phase.name}: {when}; failback: the rebalance moved "
            f"{sum(moved.values())} (off {_labels(moved)}; minimum {failback.get('minimum')}); "
            f"{h_down} got {phase.opened.get(h_down, 0)} connections"
        )


def make_summary(
    book: Book,
    workload: Workload,
    added: Mapping[str, Any],
    failback: Mapping[str, int],
    final: Any,
    threads: int,
) -> dict[str, Any]:
    by_name = {p.name: p for p in book.phases}
    h_add, h_down = f"h{ADDED + 1}", f"h{DOWNED + 1}"
    add_phase = by_name.get(f"{h_add} added")
    down_phase = by_name.get(f"{h_down} down")
    back_phase = by_name.get(f"{h_down} back")
    down_seen = book.first("host_down", h_down, down_phase.start) if down_phase else None
    up_seen = book.first("host_up", h_down, back_phase.start) if back_phase else None
    return {
        "transactions": workload.transactions,
        "errors": len(workload.errors),
        "killed_in_flight": len(workload.in_flight),
        "threads": threads,
        "hosts": {label: key for key, label in book.labels.items()},
        "added": {
            "host": h_add,
            "before": {book.label(k): n for k, n in added.get("before", {}).items()},
            "minimum": added.get("minimum"),
            "moved": add_phase.retired.get("rebalance", 0) if add_phase else None,
            "moved_off": _from(add_phase, "rebalance") if add_phase else {},
            "opened": add_phase.opened.get(h_add, 0) if add_phase else None,
        },
        "down": {
            "host": h_down,
            "marked_after": None
            if down_seen is None or not down_phase
            else down_seen - down_phase.start,
            "retired": _of(down_phase, h_down) if down_phase else {},
            # Connections opened on it between host_down and the end of the phase.
            "opened_while_down": (
                book.opened_between(h_down, down_seen, down_phase.end or down_seen)
                if down_phase and down_seen is not None
                else None
            ),
        },
        "up": {
            "host": h_down,
            "marked_after": None
            if up_seen is None or not back_phase
            else up_seen - back_phase.start,
            "minimum": failback.get("minimum"),
            "moved": back_phase.retired.get("rebalance", 0) if back_phase else None,
            "moved_off": _from(back_phase, "rebalance") if back_phase else {},
            "opened": back_phase.opened.get(h_down, 0) if back_phase else None,
        },
        "events": [{"t": round(t, 3), "event": k, "host": h} for t, k, h in book.events],
        "phases": [p.as_dict() for p in book.phases],
        "final": {book.label(k): h.open for k, h in final.hosts.items()},
        "final_health": {book.label(k): h.health for k, h in final.hosts.items()},
    }


def print_summary(
    out: Out,
    book: Book,
    summary: Mapping[str, Any],
    stats: Mapping[str, Any],
    mode: str,
) -> None:
    lines = [
        "",
        f"done: {summary['transactions']} transactions, {summary['errors']} errors",
    ]
    if mode == "postgres":
        n = summary["killed_in_flight"]
        lines.append(
            f"statements in flight on h{DOWNED + 1} when it was killed: {n}, not counted as "
            "errors. They failed with the server: a crash ends every session on it, and no pool "
            "can save a statement already running there. Every other request went on, on the "
            "other hosts."
        )
    lines.append(
        f"connections opened: {stats['connects']} "
        f"(of which inside a checkout: {stats['checkouts_waited']}; the rest in the background)"
    )
    if mode == "postgres" and stats["checkouts_waited"]:
        lines.append(
            "  (inside a checkout: pool_pre_ping found a connection to the killed server dead "
            "and reconnected it, to another host, before handing it out)"
        )
    retired = {k: v for k, v in stats["retirements"].items() if v}
    lines.append(f"retired by reason: {fmt_reasons(retired)}")
    lines.append("by phase:")
    for p in book.phases:
        end = p.end if p.end is not None else p.start
        opened = fmt_counts(p.opened, book) if p.opened else "none"
        lines.append(
            f"  {p.start:5.1f}-{end:5.1f}s {p.name:<18} retired: {fmt_reasons(p.retired)}; "
            f"opened: {opened}"
        )
    added, up = summary["added"], summary["up"]
    failback = (
        f"failback to {up['host']} {up['moved']} (minimum {up['minimum']})"
        if up["minimum"] is not None
        else f"no failback ({up['host']} was not marked down and up)"
    )
    lines.append(
        f"rebalance moves: adding {added['host']} {added['moved']} (minimum {added['minimum']}), "
        + failback
    )
    cluster = summary.get("cluster") or {}
    if cluster:
        lines.append(
            f"cluster-wide recycle (CLI over the embedded bus): exit {cluster['cli_exit']}, "
            f"{cluster['retired']} connections replaced by it, "
            f"{cluster['waited']} connects inside a checkout"
        )
    final = summary["final"]
    health = summary["final_health"]
    lines.append(
        "final:   "
        + " ".join(f"{h}={final[h]}" for h in sorted(final))
        + " ("
        + "/".join(health[h] for h in sorted(final))
        + ")"
    )
    out.plain("\n".join(lines))
