#!/usr/bin/env python3
"""What the maintenance worker costs a process, idle and at work.

Each configuration runs in a fresh child process (its own worker): ``P`` engines
on SQLite (in-memory, so only the pool's own work is measured), each with
``min_size = pool_size = C`` connections open and idle. After the pools' executor
threads have gone quiet, the child measures over a window:

- **CPU** of the whole process (``time.process_time``), in ms per second;
- the worker's **wake-ups** per second and the pools' **full scans** (passes that
  looked at every connection) per second;
- **threads** alive at the end.

The ``work`` configuration has lifetimes due all the time (``pool_recycle`` short
enough for several replacements a second): its figure is scans per replacement,
which batching keeps at or below one.

Usage::

    .venv/bin/python benchmarks/worker_cost.py [--quick] [--check] [--window 130]

``--check`` exits 1 if a promise breaks: idle wake-ups stay near what the safety
net of one look per pool every ``IDLE_PASS`` seconds explains (``pools / 10 + 1``
a second at most), no idle pool holds a thread, and at work every replacement was
made in the background with at most one full scan each. CPU figures are printed
only. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

CHILD = "--child"


def child(pools: int, conns: int, window: float, recycle: float | None) -> None:
    from sqlalchemy import create_engine, text

    from sqla_rebalance import RebalancingQueuePool
    from sqla_rebalance.worker import get_worker

    engines = []
    for _ in range(pools):
        engine = create_engine(
            "sqlite:///:memory:",
            # Connections are opened and closed on the pool's own threads.
            connect_args={"check_same_thread": False},
            poolclass=RebalancingQueuePool,
            pool_size=conns,
            max_overflow=0,
            min_size=conns,
            pool_recycle=recycle or 3600,
            recycle_jitter=0.5,
        )
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engines.append(engine)
    deadline = time.monotonic() + 120
    while any(e.pool.checkedin() < conns for e in engines):
        if time.monotonic() > deadline:
            raise SystemExit("pools did not fill in 120 s")
        time.sleep(0.05)
    # Executor threads exit after 5 s without work: let the warm-up's go.
    settle = time.monotonic() + 6.0
    while time.monotonic() < settle:
        time.sleep(0.1)
    worker = get_worker()

    def scans() -> int:
        return sum(e.pool._maintenance.scans for e in engines)

    def replaced() -> int:
        return sum(e.pool.stats().retirements["lifetime"] for e in engines)

    passes0, scans0, replaced0 = worker.passes, scans(), replaced()
    t0, c0 = time.monotonic(), time.process_time()
    time.sleep(window)
    t1, c1 = time.monotonic(), time.process_time()
    elapsed = t1 - t0
    print(
        json.dumps(
            {
                "pools": pools,
                "conns": conns,
                "recycle": recycle,
                "cpu_ms_per_s": (c1 - c0) / elapsed * 1000,
                "wakes_per_s": (worker.passes - passes0) / elapsed,
                "scans_per_s": (scans() - scans0) / elapsed,
                "replaced": replaced() - replaced0,
                "waited": sum(e.pool.stats().checkouts_waited for e in engines) - pools,
                "threads": threading.active_count(),
                "window": elapsed,
            }
        )
    )


def start(
    pools: int, conns: int, window: float, recycle: float | None = None
) -> subprocess.Popen[str]:
    args = [sys.executable, __file__, CHILD, str(pools), str(conns), str(window)]
    if recycle:
        args.append(str(recycle))
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


def result(child: subprocess.Popen[str]) -> dict[str, float]:
    out, _err = child.communicate(timeout=900)
    if child.returncode:
        raise SystemExit(f"a child failed: exit {child.returncode}")
    parsed: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return parsed


def run(pools: int, conns: int, window: float, recycle: float | None = None) -> dict[str, float]:
    return result(start(pools, conns, window, recycle))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer configurations, 5 s windows")
    parser.add_argument("--check", action="store_true", help="exit 1 if a promise breaks")
    parser.add_argument(
        "--window", type=float, default=130.0, help="idle window (s); over IDLE_PASS to see it"
    )
    args = parser.parse_args()
    window = 5.0 if args.quick else args.window
    work_window = 5.0 if args.quick else 35.0
    idle = (
        [(1, 10), (1, 400), (100, 10), (1000, 2)]
        if args.quick
        else [(1, 10), (1, 50), (1, 100), (1, 200), (1, 400), (10, 2), (100, 2), (100, 10),
              (1000, 2)]
    )  # fmt: skip
    failures: list[str] = []
    print(f"idle, {window:.0f} s window (pools x connections)")
    print(f"{'pools':>6} {'conns':>6} {'CPU ms/s':>9} {'wakes/s':>8} {'scans/s':>8} {'threads':>8}")
    # Idle children measure their own CPU time and mostly sleep: they run side by side.
    children = [start(pools, conns, window) for pools, conns in idle]
    for (pools, conns), child in zip(idle, children, strict=True):
        r = result(child)
        print(
            f"{pools:>6} {conns:>6} {r['cpu_ms_per_s']:>9.2f} {r['wakes_per_s']:>8.2f} "
            f"{r['scans_per_s']:>8.2f} {r['threads']:>8}"
        )
        if r["wakes_per_s"] > pools / 10 + 1:
            failures.append(f"{pools}x{conns}: {r['wakes_per_s']:.1f} idle wake-ups/s")
        if r["threads"] > 2 + pools / 10:  # main, worker, and a pool's pass now and then
            failures.append(f"{pools}x{conns}: {r['threads']} threads while idle")
    recycle = 20.0
    work = [(1, 100)] if args.quick else [(1, 100), (1, 400), (10, 40)]
    print(f"\nat work: pool_recycle={recycle:g} s, jitter 0.5, {work_window:.0f} s window")
    head = ("pools", "conns", "CPU ms/s", "repl./s", "scans/s", "scans/repl.")
    print("{:>6} {:>6} {:>9} {:>8} {:>8} {:>12}".format(*head))
    for pools, conns in work:
        r = run(pools, conns, work_window, recycle)
        per = r["scans_per_s"] * r["window"] / max(1, r["replaced"])
        print(
            f"{pools:>6} {conns:>6} {r['cpu_ms_per_s']:>9.2f} "
            f"{r['replaced'] / r['window']:>8.2f} {r['scans_per_s']:>8.2f} {per:>12.2f}"
        )
        if r["replaced"] == 0:
            failures.append(f"at work {pools}x{conns}: nothing replaced")
        if per > 1.0:
            failures.append(f"at work {pools}x{conns}: {per:.2f} full scans per replacement")
        if r["waited"] > 0:
            failures.append(f"at work {pools}x{conns}: {r['waited']} checkouts waited")
    for failure in failures:
        print("FAILED:", failure)
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        child(
            int(sys.argv[2]),
            int(sys.argv[3]),
            float(sys.argv[4]),
            float(sys.argv[5]) if len(sys.argv) > 5 else None,
        )
    else:
        sys.exit(main())
