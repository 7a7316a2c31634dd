#!/usr/bin/env python3
"""The PostgreSQL bus in its two modes: LISTEN/NOTIFY and polling (``mode=poll``).

N listeners (real bus subscriptions, one thread each, as N processes would
hold them) follow one channel, first in listen mode, then in poll mode. Measured
for each mode:

- **server connections held** between commands (``pg_stat_activity``, sampled
  20 times over 2 s): listen mode holds one backend per listener, poll mode none
  but the reads in flight;
- **delivery**: the time from ``publish`` until every listener has the command
  (median and worst of ``--commands``), which poll mode bounds by its interval;
- **server connects per second** while idle (``pg_stat_database.sessions``);
- the **cost of one poll** (connect, one indexed read, close) on loopback;
- the **heartbeat clean-up** ``DELETE`` with 10,000 live heartbeat rows in the
  channel, with the expiry index and without it (``EXPLAIN ANALYZE``).

Usage::

    .venv/bin/python benchmarks/pg_bus_modes.py [--listeners 100] [--interval 1]
        [--commands 5] [--dsn URL] [--quick] [--check]

``--check`` exits 1 if a promise breaks: every listener received every command
exactly once in both modes, and poll mode held no connection in at least half
of the samples (a read takes milliseconds). Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from typing import Any

import _support
import psycopg
from sqlalchemy.engine import make_url

from sqla_rebalance.bus import open_bus, send_command
from sqla_rebalance.bus.message import decode

SECRET = "pg-bus-modes"


class Follower:
    """One listener: a subscription read by its own thread, recording arrivals."""

    def __init__(self, bus_url: str) -> None:
        self.sub = open_bus(bus_url).subscribe()
        self.channel = open_bus(bus_url).channel
        self.got: dict[int, float] = {}
        self.duplicates = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            raw = self.sub.get(0.2)
            if raw is None:
                continue
            command = decode(raw, SECRET.encode(), channel=self.channel, max_age=None)
            if command.gen in self.got:
                self.duplicates += 1
            self.got.setdefault(command.gen, time.perf_counter())

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sub.close()


def _ours(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'sqla-rebalance-%%'"
        ).fetchone()
    return int(row[0]) if row else 0


def _sessions(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


def run_mode(dsn: str, bus_url: str, args: argparse.Namespace) -> dict[str, Any]:
    followers = [Follower(bus_url) for _ in range(args.listeners)]
    try:
        time.sleep(1.0)
        before = _sessions(dsn)
        samples = []
        for _ in range(20):
            samples.append(_ours(dsn))
            time.sleep(0.1)
        # Sessions opened over the 2 s, minus the 21 this function opened itself.
        idle_connects = (_sessions(dsn) - before - 21) / 2.0
        delays = []
        sent = []
        for _ in range(args.commands):
            started = time.perf_counter()
            gen = send_command(bus_url, "refresh", secret=SECRET).generation
            sent.append(gen)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not all(gen in f.got for f in followers):
                time.sleep(0.005)
            arrived = [f.got[gen] - started for f in followers if gen in f.got]
            delays.append(max(arrived) if arrived else float("inf"))
        time.sleep(0.5)
        missing = sum(1 for f in followers for gen in sent if gen not in f.got)
        duplicates = sum(f.duplicates for f in followers)
    finally:
        for f in followers:
            f.stop()
    return {
        "held_median": statistics.median(samples),
        "held_max": max(samples),
        "held_zero_share": sum(1 for s in samples if s == 0) / len(samples),
        "idle_connects_per_s": idle_connects,
        "delay_median_ms": statistics.median(delays) * 1000,
        "delay_max_ms": max(delays) * 1000,
        "missing": missing,
        "duplicates": duplicates,
    }


def poll_cost(bus_url: str, rounds: int) -> float:
    """Median seconds of one poll read (connect, read, close)."""
    sub = open_bus(bus_url).subscribe()
    try:
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            sub._read(sub._seen, 100, False)  # type: ignore[attr-defined]
            times.append(time.perf_counter() - started)
    finally:
        sub.close()
    return statistics.median(times)


def cleanup_cost(dsn: str, rows: int) -> dict[str, float]:
    """Execution time (ms) of the heartbeat clean-up with ``rows`` live rows in the channel."""
    out = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM sqla_rebalance_heartbeats WHERE channel = 'bench_cleanup'")
        conn.execute(
            "INSERT INTO sqla_rebalance_heartbeats"
            " SELECT 'bench_cleanup', 'p' || i, '{}', now() + interval '15 seconds'"
            " FROM generate_series(1, %s) AS i",
            (rows,),
        )
        conn.execute("ANALYZE sqla_rebalance_heartbeats")
        statement = (
            "EXPLAIN (ANALYZE, FORMAT JSON) DELETE FROM sqla_rebalance_heartbeats"
            " WHERE channel = 'bench_cleanup' AND expires_at < now() - interval '60 seconds'"
        )
        for label in ("with index", "without index"):
            if label == "without index":
                conn.execute("DROP INDEX IF EXISTS sqla_rebalance_heartbeats_expiry")
            runs = []
            for _ in range(20):
                plan = conn.execute(statement).fetchone()
                runs.append(float(plan[0][0]["Execution Time"]) if plan else 0.0)
            out[label] = statistics.median(runs)
        conn.execute(
            "CREATE INDEX IF NOT EXISTS sqla_rebalance_heartbeats_expiry"
            " ON sqla_rebalance_heartbeats (channel, expires_at)"
        )
        conn.execute("DELETE FROM sqla_rebalance_heartbeats WHERE channel = 'bench_cleanup'")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listeners", type=int, default=100)
    parser.add_argument("--interval", type=float, default=1.0, help="poll_interval (s)")
    parser.add_argument("--commands", type=int, default=5)
    parser.add_argument("--dsn", help="a running loopback PostgreSQL (default: start one)")
    parser.add_argument("--quick", action="store_true", help="20 listeners, 3 commands")
    parser.add_argument("--check", action="store_true", help="exit 1 if a promise breaks")
    args = parser.parse_args(argv)
    if args.quick:
        args.listeners, args.commands = 20, 3

    with _support.postgres_url(args.dsn) as url:
        dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        channel = f"bench{int(time.time())}"
        listen_url = f"{dsn}?channel={channel}"
        poll_url = f"{listen_url}&mode=poll&poll_interval={args.interval:g}"
        send_command(listen_url, "refresh", secret=SECRET)  # creates the tables
        results = {
            "listen": run_mode(dsn, listen_url, args),
            f"poll {args.interval:g}s": run_mode(dsn, poll_url, args),
        }
        one_poll = poll_cost(poll_url, 50)
        cleanup = cleanup_cost(dsn, 10_000)

    print(f"\n{args.listeners} listeners, {args.commands} commands (PostgreSQL on loopback)\n")
    print(
        f"{'mode':12} {'held med':>8} {'held max':>8} {'zero %':>7} {'connects/s':>10}"
        f" {'delay med ms':>13} {'delay max ms':>13} {'missing':>8} {'dupes':>6}"
    )
    for mode, r in results.items():
        print(
            f"{mode:12} {r['held_median']:>8.0f} {r['held_max']:>8} "
            f"{r['held_zero_share'] * 100:>6.0f}% {r['idle_connects_per_s']:>10.1f}"
            f" {r['delay_median_ms']:>13.1f} {r['delay_max_ms']:>13.1f}"
            f" {r['missing']:>8} {r['duplicates']:>6}"
        )
    print(f"\none poll (connect, indexed read, close): {one_poll * 1000:.2f} ms median")
    print(
        "heartbeat clean-up DELETE, 10,000 live rows in the channel: "
        + ", ".join(f"{k} {v:.3f} ms" for k, v in cleanup.items())
    )
    problems = []
    for mode, r in results.items():
        if r["missing"] or r["duplicates"]:
            problems.append(f"{mode}: {r['missing']} missing, {r['duplicates']} duplicates")
    poll_result = results[f"poll {args.interval:g}s"]
    if poll_result["held_zero_share"] < 0.5:
        problems.append(f"poll mode held connections in {poll_result['held_zero_share']:.0%}")
    for p in problems:
        print(f"CHECK FAILED: {p}")
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
