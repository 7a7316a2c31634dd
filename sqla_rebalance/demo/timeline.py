"""The demo over several hosts: the pool, the signals it prints, and the timeline.

Three hosts; a fourth added at 25 %; one down at 50 % and back at 75 %; then a cluster-wide
recycle sent by the real CLI from another process over an embedded bus (a SQLite file).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, TextIO

from sqlalchemy import create_engine, exc

from .. import signals
from ..pool import RebalancingQueuePool
from .backends import PostgresHosts, SqliteHosts
from .book import ADDED, DOWNED, Book, fmt_counts, host_line, min_moves, open_counts
from .output import REPORT_EVERY, Out
from .report import make_summary, print_summary, summarise_phase
from .workload import Failure, Workload


def run_hosts(
    backend: SqliteHosts | PostgresHosts,
    duration: float,
    threads: int,
    recycle: float,
    jitter: float,
    pool_size: int,
    stream: TextIO,
) -> dict[str, Any]:
    out = Out(stream)
    out.plain(
        f"sqla-rebalance demo: {backend.describe()}\n"
        f"{threads} threads, pool_size={pool_size}, pool_recycle={recycle}s, "
        f"recycle_jitter={jitter} (lifetimes in [{recycle * (1 - jitter):.1f}, {recycle:.1f}]s), "
        f"{duration:.0f}s"
    )
    if backend.mode == "postgres":
        out.say("starting 4 PostgreSQL servers ...")
    backend.prepare()
    keys = backend.keys
    book = Book(keys, out)
    out.plain(
        "hosts: "
        + ", ".join(f"{book.label(k)}={k}" for k in keys)
        + f"\ntimeline (from the end of the warm-up): 3 hosts; {duration * 0.25:.0f}s add "
        f"h{ADDED + 1}; "
        f"{duration * 0.5:.0f}s h{DOWNED + 1} goes down; {duration * 0.75:.0f}s it comes back"
    )
    # The embedded bus: a SQLite file any process on this machine can publish to.
    bus_dir = tempfile.mkdtemp(prefix="sqla-rebalance-demo-bus-")
    bus_url = f"sqlite:///{bus_dir}/bus.db"
    secret = os.urandom(16).hex()
    engine = create_engine(
        backend.url,
        poolclass=RebalancingQueuePool,
        pool_size=pool_size,
        max_overflow=2,
        pool_recycle=recycle,
        recycle_jitter=jitter,
        min_size=pool_size,
        pool_name="demo",
        hosts=keys[:ADDED],
        health_check_interval=1.0,
        unhealthy_threshold=2,
        rebalance_spread=1.0,
        broadcast=bus_url,
        broadcast_secret=secret,
        min_recycle_interval=1.0,
        **backend.engine_kw,
    )
    pool = engine.pool
    assert isinstance(pool, RebalancingQueuePool)
    downed_key = keys[DOWNED]
    down_window = [0.0, 0.0]  # when the kill started and ended (monotonic; 0: not yet)

    def expected(failure: Failure) -> bool:
        # PostgreSQL only: a statement that was running on the killed server
        # when it died. Anything else is an error.
        return (
            backend.mode == "postgres"
            and down_window[0] > 0
            and failure.host == downed_key
            and failure.started <= down_window[1]
            and failure.failed >= down_window[0]
            # A driver error that SQLAlchemy recognised as a disconnect.
            and isinstance(failure.error, exc.DBAPIError)
            and failure.error.connection_invalidated
        )

    failback: dict[str, int] = {}
    cluster: dict[str, Any] = {}

    def on_opened(sender: Any, **kw: Any) -> None:
        book.opened(kw["host"])
        how = "background" if kw["background"] else "inside a checkout"
        out.say(f"open     {book.label(kw['host'])}  {how}")

    def on_retired(sender: Any, **kw: Any) -> None:
        book.retired(kw["host"], kw["reason"])
        out.say(
            f"retire   {book.label(kw['host'])}  after {kw['age']:5.2f}s  reason={kw['reason']}"
        )

    def on_down(sender: Any, **kw: Any) -> None:
        book.event("host_down", kw["host"])
        out.say(f"host_down {book.label(kw['host'])}: its connections move to the other hosts")

    def on_up(sender: Any, **kw: Any) -> None:
        book.event("host_up", kw["host"])
        # Before the pool rebalances (signals come first): what failback must move.
        counts = open_counts(pool)
        eligible = [k for k, h in pool.stats().hosts.items() if h.health == "up"]
        failback["minimum"] = min_moves(counts, eligible)
        failback["total"] = sum(counts.values())
        out.say(
            f"host_up  {book.label(kw['host'])}: failback; an even spread now needs "
            f"{failback['minimum']} of {failback['total']} connections to move"
        )

    def on_changed(sender: Any, **kw: Any) -> None:
        added = ", ".join(book.label(k) for k in kw["added"]) or "none"
        removed = ", ".join(book.label(k) for k in kw["removed"]) or "none"
        out.say(f"hosts_changed added={added} removed={removed}")

    receivers: list[tuple[Any, Callable[..., None]]] = [
        (signals.connection_opened, on_opened),
        (signals.connection_retired, on_retired),
        (signals.host_down, on_down),
        (signals.host_up, on_up),
        (signals.hosts_changed, on_changed),
    ]
    for signal, receiver in receivers:
        signal.connect(receiver, sender=pool)
    workload = Workload(engine, threads, out, expected)
    added: dict[str, Any] = {}
    timeline: list[tuple[float, str]] = [
        (0.25, f"h{ADDED + 1} added"),
        (0.5, f"h{DOWNED + 1} down"),
        (0.75, f"h{DOWNED + 1} back"),
    ]
    try:
        book.begin("warm-up")
        deadline = time.monotonic() + 15.0
        while pool.stats().open < pool_size and time.monotonic() < deadline:
            time.sleep(0.02)
        out.say(
            f"warm     {host_line(pool, book)}  (min_size={pool_size}, opened in the background)"
        )
        t0 = out.elapsed()  # the timeline starts after the warm-up
        book.begin("3 hosts")
        workload.start()
        next_report = REPORT_EVERY
        step = 0
        while (elapsed := out.elapsed() - t0) < duration:
            if step < len(timeline) and elapsed >= timeline[step][0] * duration:
                summarise_phase(book, out, added, failback)
                book.begin(timeline[step][1])
                label = book.label(downed_key)
                if step == 0:
                    counts = open_counts(pool)
                    added["before"] = counts
                    added["minimum"] = min_moves(counts, keys)
                    added["total"] = sum(counts.values())
                    out.say(
                        f"ADD      h{ADDED + 1}: pool.set_hosts([h1, h2, h3, h4]); before: "
                        f"{fmt_counts(counts, book)}; an even spread needs "
                        f"{added['minimum']} of {added['total']} connections to move"
                    )
                    pool.set_hosts(keys)
                elif step == 1:
                    out.say(f"DOWN     {label}: {backend.down_how}")
                    # Until the server is gone, a statement starting there may still die with it.
                    down_window[1] = math.inf
                    down_window[0] = time.monotonic()
                    backend.take_down(DOWNED)
                    down_window[1] = time.monotonic()
                else:
                    out.say(f"BACK     {label}: {backend.up_how}")
                    backend.bring_back(DOWNED)
                step += 1
            if elapsed >= next_report:
                next_report += REPORT_EVERY
                out.say(f"hosts    {host_line(pool, book)}  transactions={workload.transactions}")
            workload.stop_event.wait(0.05)
        summarise_phase(book, out, added, failback)
        book.begin("cluster recycle")
        cluster_recycle(pool, out, book, bus_url, secret, cluster, workload)
        workload.stop()
        book.finish()
        summarise_phase(book, out, added, failback)
        final = pool.stats()
    finally:
        workload.stop()
        for signal, receiver in receivers:
            signal.disconnect(receiver, sender=pool)
        engine.dispose()
        shutil.rmtree(bus_dir, ignore_errors=True)
    stats = final.as_dict()
    summary = make_summary(book, workload, added, failback, final, threads)
    summary["cluster"] = cluster
    stats["demo"] = summary
    print_summary(out, book, summary, stats, backend.mode)
    if workload.errors:
        first = workload.errors[0].error
        raise RuntimeError(
            f"demo workload failed ({len(workload.errors)} errors): {first!r}"
        ) from first
    return stats


def run_cli(args: list[str], secret: str) -> subprocess.CompletedProcess[str]:
    """Run ``sqla-rebalance ARGS`` as its own process, as an operator would."""
    env = dict(os.environ, SQLA_REBALANCE_SECRET=secret)
    return subprocess.run(
        [sys.executable, "-m", "sqla_rebalance", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def cluster_recycle(
    pool: RebalancingQueuePool,
    out: Out,
    book: Book,
    bus_url: str,
    secret: str,
    cluster: dict[str, Any],
    workload: Workload,
) -> None:
    """The last phase: a recycle of every pool of the fleet, sent from another process."""
    before = pool.stats()
    args = ["recycle", "--bus", bus_url, "--pool", "demo", "--spread", "1", "--wait", "10"]
    out.say(f"RECYCLE  from another process: sqla-rebalance {' '.join(args)}")
    done = run_cli(args, secret)
    for line in (done.stdout + done.stderr).splitlines():
        out.say(f"  cli    {line}")
    # The spread (1 s), and in-use connections retire at their checkin.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        if pool.stats().retirements["signal"] - before.retirements["signal"] >= before.open:
            break
        workload.stop_event.wait(0.05)
    after = pool.stats()
    status = run_cli(["status", "--bus", bus_url], secret)
    out.say("STATUS   sqla-rebalance status --bus ...")
    for line in status.stdout.splitlines():
        out.say(f"  cli    {line}")
    cluster.update(
        cli_exit=done.returncode,
        status_exit=status.returncode,
        open_before=before.open,
        retired=after.retirements["signal"] - before.retirements["signal"],
        waited=after.checkouts_waited - before.checkouts_waited,
        applied=after.bus.commands_applied - before.bus.commands_applied,
    )
    others = (
        f"; the other {before.open - cluster['retired']} open when it was sent reached their "
        "lifetime first"
        if cluster["retired"] < before.open
        else ""
    )
    out.say(
        f"phase    cluster recycle: applied by this process ({cluster['applied']} command); "
        f"{cluster['retired']} connections replaced by it (reason=signal){others}; "
        f"{cluster['waited']} connects inside a checkout"
    )
