"""A flood of junk on the bus: what it costs the application's checkouts and the listener.

Somebody with write access to the bus (but not the secret) publishes junk on the
Redis channel as fast as ``--rate`` messages per second: garbage, oversized
messages, unsigned commands, commands signed with a wrong secret or for another
channel, and wire-v1 commands, in turn. Everything is on this machine: one Redis
on 127.0.0.1 (started here, or ``--redis URL``), and the application's database,
a SQLite file (or ``--db URL``, on a loopback address).

One application process (this one) runs ``--threads`` threads, each looping:
check out (``pool.connect()``, timed), ``SELECT 1``, check in, think
``--think-ms`` ms +- 50 %. The pool is a ``RebalancingQueuePool``
(``pool_size=--threads``, warmed up). Three phases of ``--duration`` seconds, one
after the other, each with a fresh engine:

1. ``no bus``: no ``broadcast=``;
2. ``bus, idle``: ``broadcast=redis://...`` with a secret, nothing published;
3. ``bus, junk flood``: the same, while a separate process (multiprocessing,
   spawn) publishes the junk, pipelined in batches every 10 ms. Half-way through,
   one genuine command (``rebalance``, signed) is sent, and the time until the
   listener has applied it is measured.

Printed per phase: checkouts, checkout p50 / p99 / max (nearest rank), the same
percentiles for the whole round (checkout, ``SELECT 1``, checkin), the CPU
time of the listener thread per second of wall time (``/proc/self/task/TID``; 1.00
is one core), messages rejected, the flood's achieved rate, log lines of the
``sqla_rebalance.bus`` logger, and for the flood the genuine command's latency.

Usage::

    .venv/bin/python benchmarks/bus_flood.py [--rate 10000] [--duration 10]
        [--threads 8] [--think-ms 2] [--redis URL] [--db URL] [--quick] [--check]
        [--check-timing]

``--quick`` (4 s phases) is the smoke run. The script is a report and exits 0;
with ``--check`` it exits 1 if a promise is broken: every junk message published
is rejected and counted (nothing applied), the genuine command is applied exactly
once during the flood, the listener never reconnects, and the log stays a summary
(at most one line per kind of rejection in a phase, plus the listener's own).
``--check-timing`` also fails on the timing targets: flood p99 checkout <= max(2 x
idle p99, idle p99 + 2 ms), listener CPU under the flood < 0.5 core.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import multiprocessing as mp
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from _support import ROOT, ensure_loopback
from sqlalchemy import create_engine

from sqla_rebalance import RebalancingQueuePool
from sqla_rebalance.bus import open_bus, send_command
from sqla_rebalance.bus.message import new_command

SECRET = "bus-flood-secret"
FLOOD_CPU_TARGET = 0.5  # cores
P99_FACTOR, P99_SLACK_MS = 2.0, 2.0
#: Log lines a phase may have: one per rejection kind, and the listener's own.
LOG_LINES_MAX = 8


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def junk_payloads(channel: str) -> list[bytes]:
    """One of each kind a listener must refuse (none of them signed with the secret)."""
    import dataclasses

    from sqla_rebalance.bus.message import encode

    def sign(secret: bytes, on: str) -> bytes:
        try:
            return encode(cmd, secret, channel=on)
        except TypeError:  # a version before wire v2 (for "before" figures)
            return encode(cmd, secret)  # type: ignore[call-arg]

    cmd = dataclasses.replace(new_command("recycle"), gen=int(time.time() * 1000) + 60_000)
    good = json.loads(sign(SECRET.encode(), channel))
    return [
        b"this is not json at all, just junk",
        json.dumps({**good, "nonce": "x" * 2000}).encode(),  # oversized
        json.dumps({k: v for k, v in good.items() if k != "mac"}).encode(),  # unsigned
        sign(b"a wrong secret", channel),  # bad signature
        sign(SECRET.encode(), "another_channel"),  # replayed elsewhere
        json.dumps({**good, "v": 99}).encode(),  # an unknown wire version
    ]


def flood(url: str, channel: str, rate: float, seconds: float, out: Any) -> None:
    """Child process: publish junk at ``rate`` per second for ``seconds``; report the count."""
    import redis

    client = redis.Redis.from_url(url)
    payloads = junk_payloads(channel)
    target = f"{channel}:commands"
    sent = 0
    start = time.monotonic()
    try:
        while True:
            elapsed = time.monotonic() - start
            if elapsed >= seconds:
                break
            due = int(rate * elapsed) - sent
            if due > 0:
                pipe = client.pipeline(transaction=False)
                for i in range(due):
                    pipe.publish(target, payloads[(sent + i) % len(payloads)])
                pipe.execute()
                sent += due
            time.sleep(0.01)
        out.put({"sent": sent, "seconds": time.monotonic() - start})
    finally:
        client.close()


class LogCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def thread_cpu(native_id: int | None) -> float:
    """CPU seconds (user + system) of one thread of this process."""
    if native_id is None:
        return 0.0
    try:
        with open(f"/proc/self/task/{native_id}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def redis_url(given: str | None) -> Iterator[str]:
    if given:
        yield ensure_loopback(given)
        return
    from sqla_rebalance.devservers import RedisServer

    server = RedisServer()
    try:
        server.start()
        yield server.url()
    finally:
        server.close()


def run_phase(
    name: str, args: argparse.Namespace, db: str, bus: str | None, rate: float
) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if bus:
        kw = {"broadcast": bus, "broadcast_secret": SECRET, "min_recycle_interval": 0}
    engine = create_engine(
        db,
        poolclass=RebalancingQueuePool,
        pool_size=args.threads,
        max_overflow=0,
        min_size=args.threads,
        **kw,
    )
    pool = engine.pool
    counter = LogCounter()
    bus_log = logging.getLogger("sqla_rebalance.bus")
    bus_log.addHandler(counter)
    result: dict[str, Any] = {"name": name, "errors": []}
    try:
        # Warm up: every connection open, the listener connected.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            listening = not bus or (pool.listener is not None and pool.listener.connected)
            if listening and pool.stats().idle >= args.threads:
                break
            time.sleep(0.05)
        stop = threading.Event()
        timings: list[list[float]] = [[] for _ in range(args.threads)]
        rounds: list[list[float]] = [[] for _ in range(args.threads)]

        def work(mine: list[float], whole: list[float]) -> None:
            rng = random.Random()
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    conn = pool.connect()
                except Exception as err:
                    result["errors"].append(repr(err))
                    continue
                mine.append((time.perf_counter() - t0) * 1000)
                try:
                    cur = conn.cursor()
                    cur.execute("SELECT 1")
                    cur.fetchall()
                    cur.close()
                finally:
                    conn.close()
                whole.append((time.perf_counter() - t0) * 1000)
                if args.think_ms:
                    time.sleep(args.think_ms / 1000 * rng.uniform(0.5, 1.5))

        listener = pool.listener if bus else None
        tid = listener.thread.native_id if listener and listener.thread else None
        before = pool.stats().bus
        cpu0, wall0 = thread_cpu(tid), time.monotonic()
        queue: Any = None
        child = None
        if rate:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            assert bus is not None
            channel = open_bus(bus).channel
            child = ctx.Process(
                target=flood, args=(bus.split("?")[0], channel, rate, args.duration, queue)
            )
            child.start()
        threads = [
            threading.Thread(target=work, args=(t, r)) for t, r in zip(timings, rounds, strict=True)
        ]
        for t in threads:
            t.start()
        if bus:
            time.sleep(args.duration / 2)
            sent = send_command(bus, "rebalance", secret=SECRET)
            t_sent = time.monotonic()
            while pool.stats().bus.generation_applied < sent.generation:
                if time.monotonic() - t_sent > args.duration:
                    break
                time.sleep(0.001)
            applied = pool.stats().bus.generation_applied >= sent.generation
            result["command_ms"] = (time.monotonic() - t_sent) * 1000 if applied else math.inf
            time.sleep(max(0.0, wall0 + args.duration - time.monotonic()))
        else:
            time.sleep(args.duration)
        stop.set()
        for t in threads:
            t.join()
        wall = time.monotonic() - wall0
        result["listener_cpu"] = (thread_cpu(tid) - cpu0) / wall if tid else math.nan
        if child is not None:
            child.join(30)
            report = queue.get(timeout=10)
            result["flood_sent"] = report["sent"]
            result["flood_rate"] = report["sent"] / report["seconds"]
            # Let the listener drain what is still queued, then count.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if pool.stats().bus.messages_rejected - before.messages_rejected >= report["sent"]:
                    break
                time.sleep(0.05)
        after = pool.stats().bus
        samples = [x for t in timings for x in t]
        whole = [x for t in rounds for x in t]
        result.update(
            round_p50=percentile(whole, 50),
            round_p99=percentile(whole, 99),
            checkouts=len(samples),
            p50=percentile(samples, 50),
            p99=percentile(samples, 99),
            max=max(samples, default=math.nan),
            rejected=after.messages_rejected - before.messages_rejected,
            accepted=after.messages_accepted - before.messages_accepted,
            reconnects=after.reconnects - before.reconnects,
            log_lines=len(counter.lines),
        )
        return result
    finally:
        engine.dispose()
        # The listener's thread ends within about 0.5 s once its pool is gone: wait,
        # so that stopping Redis afterwards is not logged as a lost connection.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
            t.name.startswith("sqla-rebalance-bus") for t in threading.enumerate()
        ):
            time.sleep(0.05)
        bus_log.removeHandler(counter)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=10_000.0, help="junk messages per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--think-ms", type=float, default=2.0, help="mean think time per query")
    parser.add_argument("--redis", help="a Redis URL on a loopback address (default: start one)")
    parser.add_argument("--db", help="the application's database URL (default: a SQLite file)")
    parser.add_argument("--quick", action="store_true", help="4 s phases (smoke run)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a promise is broken")
    parser.add_argument(
        "--check-timing", action="store_true", help="with --check: fail on timing targets too"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 4.0
    for name in ("rate", "duration", "think_ms"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (name == "duration" and value == 0):
            parser.error(f"--{name.replace('_', '-')} must be a finite number >= 0")
    logging.basicConfig(level=logging.WARNING, format="  log: %(name)s: %(message)s")
    began = time.monotonic()
    print(
        f"bus_flood: {args.threads} threads, think {args.think_ms:g} ms, "
        f"{args.duration:g} s per phase, junk at {args.rate:g} msg/s, from {ROOT}"
    )
    with tempfile.TemporaryDirectory() as tmp, redis_url(args.redis) as redis:
        db = ensure_loopback(args.db) if args.db else f"sqlite:///{tmp}/app.db"
        if db.startswith("sqlite"):
            create_engine(db).dispose()
        bus = f"{redis}?channel=bus_flood_{os.getpid()}"
        phases = [
            run_phase("no bus", args, db, None, 0.0),
            run_phase("bus, idle", args, db, bus, 0.0),
            run_phase("bus, junk flood", args, db, bus, args.rate),
        ]
    _none, idle, flooded = phases

    def ms(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.2f}"

    rows = [
        ("checkouts", *(str(p["checkouts"]) for p in phases)),
        ("checkout p50 (ms)", *(ms(p["p50"]) for p in phases)),
        ("checkout p99 (ms)", *(ms(p["p99"]) for p in phases)),
        ("checkout max (ms)", *(ms(p["max"]) for p in phases)),
        ("checkout+SELECT 1+checkin p50", *(ms(p["round_p50"]) for p in phases)),
        ("checkout+SELECT 1+checkin p99", *(ms(p["round_p99"]) for p in phases)),
        ("listener CPU (cores)", "-", *(f"{p['listener_cpu']:.3f}" for p in phases[1:])),
        ("junk published (msg/s)", "-", "0", f"{flooded.get('flood_rate', 0):.0f}"),
        ("messages rejected", "-", str(idle["rejected"]), str(flooded["rejected"])),
        ("genuine command applied (ms)", "-", ms(idle.get("command_ms", math.nan)),
         ms(flooded.get("command_ms", math.nan))),
        ("bus log lines", "-", str(idle["log_lines"]), str(flooded["log_lines"])),
        ("listener reconnects", "-", str(idle["reconnects"]), str(flooded["reconnects"])),
    ]  # fmt: skip
    print(f"\n{'':<30}" + "".join(f"{p['name']:>18}" for p in phases))
    for label, *cells in rows:
        print(f"{label:<30}" + "".join(f"{c:>18}" for c in cells))
    print(f"\nruntime {time.monotonic() - began:.1f} s")

    problems, slow = [], []
    for p in phases:
        if p["errors"]:
            problems.append(f"{p['name']}: {len(p['errors'])} failed checkouts: {p['errors'][:3]}")
    if flooded.get("flood_sent", 0) != flooded["rejected"]:
        problems.append(
            f"flood: {flooded['rejected']} rejected of {flooded.get('flood_sent', 0)} published"
        )
    for p in (idle, flooded):
        if p["accepted"] != 1 or not math.isfinite(p.get("command_ms", math.inf)):
            problems.append(f"{p['name']}: the genuine command: {p['accepted']} accepted")
        if p["reconnects"]:
            problems.append(f"{p['name']}: the listener reconnected {p['reconnects']} time(s)")
        if p["log_lines"] > LOG_LINES_MAX:
            problems.append(f"{p['name']}: {p['log_lines']} bus log lines (a flood of logs)")
    p99_limit = max(P99_FACTOR * idle["p99"], idle["p99"] + P99_SLACK_MS)
    if not flooded["p99"] <= p99_limit:
        slow.append(f"flood: checkout p99 {flooded['p99']:.2f} ms > {p99_limit:.2f} ms")
    if not flooded["listener_cpu"] < FLOOD_CPU_TARGET:
        slow.append(f"flood: listener CPU {flooded['listener_cpu']:.2f} cores")
    for p in problems:
        print(f"CHECK FAILED: {p}")
    for p in slow:
        print(f"TIMING TARGET MISSED: {p}")
    return 1 if args.check and (problems or (slow and args.check_timing)) else 0


if __name__ == "__main__":
    sys.exit(main())
