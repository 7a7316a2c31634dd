"""Cluster-wide commands: how fast a fleet applies them, and how a recycle spreads.

One PostgreSQL server runs on 127.0.0.2 and one Redis on 127.0.0.1.
``--processes`` OS processes (multiprocessing, spawn) form the fleet. Each
holds one engine on the PostgreSQL server; the same processes run every
phase, one after the other, with a fresh engine and its own bus channel
(``?channel=``) per phase:

1. **Latency**, with the bus on Redis (``redis://127.0.0.1:PORT/0``) and on
   PostgreSQL (``postgresql://app:app@127.0.0.2:PORT/app``, the database
   server itself). Each engine is a ``RebalancingQueuePool``
   (``pool_size=min_size=--pool-size``, 2; ``broadcast=<bus>``,
   ``broadcast_secret``, ``min_recycle_interval=0``); no load by default
   (``--latency-load-threads``). A ``signals.recycle_requested`` receiver
   records ``time.time()`` and the generation being applied
   (``pool.listener.applied``). The parent publishes ``--commands`` commands
   with ``send_command(bus, "recycle", spread=0, secret=...)``, 50-100 ms
   apart, reading ``time.time()`` just before each call; then each process
   waits (up to 10 s) until its listener has processed the last generation,
   and reports. Latency = applied time - publish time, one figure per
   (process, command) pair, on the same machine clock. It includes the
   publish call itself (a new bus connection per call, as the CLI makes).
   Two variants per transport:

   - ``every connection``: the commands as above; each one recycles all
     ``processes x pool_size`` connections at once, so on one machine the
     fleet's reconnects (about 430/s with the defaults) compete for the CPU
     with the publisher and the listeners;
   - ``bus only``: the same commands with ``host=`` an address no connection
     uses (:data:`NO_HOST`): the same path through the bus, the listener and
     ``pool.recycle``, but nothing to reconnect.

   Printed: p50, p99, max (nearest rank); the publish call's own duration;
   how long after the first process the last one applied a command; pairs
   applied / expected (and duplicates, rejections).
2. **Reconnect spread.** ``pool_size=min_size=--spread-pool-size`` (8) per
   process, bus on Redis, and a light load (``--load-threads`` threads: check
   out, ``SELECT 1``, check in, think ``--think-ms`` ms +- 50 %). Once the
   pools are full, one ``recycle`` with ``spread=--spread`` (10 s) is sent.
   Each process timestamps every ``connection_opened`` signal; the parent bins
   the fleet's background reconnects per second from the publish time and
   prints the peak bin against the uniform rate (total / spread), their ratio
   (target <= 2), and the connects made inside a checkout (the delta of
   ``pool.stats().checkouts_waited``; target 0).
3. **Baseline.** What plain ``QueuePool`` users do today: the same fleet and
   load with ``QueuePool`` (``pool_size=8, max_overflow=0``, warmed to 8
   connections) is told to ``engine.dispose()``, all processes at once; each
   then opens its 8 connections again (8 concurrent checkouts, as a process
   whose load used 8 connections does on its next requests). Every connect
   (SQLAlchemy ``connect`` pool event) is timestamped and binned the same
   way; every one of them is paid inside a checkout.

Usage::

    .venv/bin/python benchmarks/broadcast_latency.py [--processes 16] [--commands 50]
        [--spread 10] [--transport redis|postgresql|both] [--quick] [--check]

``--quick`` (4 processes, 10 commands, spread 3 s) is the smoke run of
``scripts/test.sh``. The script is a report and exits 0; with ``--check`` it
exits 1 if a promise breaks, on any machine: every (process, command) pair
applied exactly once, no checkout waited for a connect, no error; with
``--check-timing`` also if a timing target is missed: latency p99 < 100 ms in
every variant, peak/uniform <= 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import multiprocessing as mp
import os
import queue
import random
import sys
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from _support import BASELINE, OURS, ensure_loopback
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from sqla_rebalance import RebalancingQueuePool, signals
from sqla_rebalance.bus import Bus, open_bus, send_command

SECRET = "broadcast-latency-benchmark-secret"
POOL_NAME = "bench"
#: ``host=`` of the ``bus only`` commands: no connection of the fleet is to it,
#: so a recycle marks nothing (nothing is ever sent to this address).
NO_HOST = "127.0.0.254:1"
QUERY = text("SELECT 1")
READY_TIMEOUT = 120.0
MAX_ERRORS_KEPT = 5
LATENCY_TARGET_MS = 100.0
SPREAD_TARGET = 2.0
TRANSPORTS = ("redis", "postgresql")
#: Latency variants: label -> ``host`` argument of the commands.
VARIANTS: dict[str, str | None] = {"every connection": None, "bus only": NO_HOST}


# --------------------------------------------------------------------------- the fleet


@dataclass(frozen=True)
class ChildConfig:
    db_url: str
    think_ms: float


class Load:
    """``threads`` threads looping: check out, ``SELECT 1``, check in, think."""

    def __init__(self, engine: Engine, threads: int, think_ms: float, seed: int) -> None:
        self.engine = engine
        self.stop_event = threading.Event()
        self.errors: list[str] = []
        self.transactions = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(seed * 100 + i, think_ms / 1000.0))
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def _run(self, seed: int, think: float) -> None:
        rng = random.Random(seed)
        while not self.stop_event.is_set():
            try:
                with self.engine.connect() as conn:
                    conn.execute(QUERY)
                with self._lock:
                    self.transactions += 1
            except Exception as err:  # counted and printed by the parent
                with self._lock:
                    self.errors.append(repr(err)[:200])
            self.stop_event.wait(rng.uniform(0.5 * think, 1.5 * think))

    def stop(self) -> None:
        self.stop_event.set()
        for t in self._threads:
            t.join()


def warm(engine: Engine, n: int) -> None:
    """Have ``n`` connections checked out at once, then return them all."""
    barrier = threading.Barrier(n + 1)
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            with engine.connect() as conn:
                conn.execute(QUERY)
                barrier.wait(30)
        except BaseException as err:
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=hold) for _ in range(n)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a holder failed: raised below
        barrier.wait(30)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def poll(predicate: Callable[[], bool], timeout: float) -> bool:
    """Wait until ``predicate()`` is true (True) or ``timeout`` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    if not poll(predicate, timeout):
        raise RuntimeError(f"timed out waiting for {what}")


def run_ours(index: int, cfg: ChildConfig, spec: dict[str, Any], ctl: Any, out: Any) -> None:
    """One phase with ``RebalancingQueuePool`` on a bus (latency or spread)."""
    size = int(spec["pool_size"])
    engine = create_engine(
        cfg.db_url,
        poolclass=RebalancingQueuePool,
        pool_size=size,
        min_size=size,
        max_overflow=0,
        pool_name=POOL_NAME,
        broadcast=spec["bus"],
        broadcast_secret=SECRET,
        min_recycle_interval=0,
    )
    pool = engine.pool
    assert isinstance(pool, RebalancingQueuePool)
    applied: list[tuple[int, float]] = []
    opened: list[tuple[float, bool]] = []

    def on_recycle(sender: Any, **kw: Any) -> None:
        if sender is pool and kw.get("reason") == "signal":
            now = time.time()
            listener = pool.listener  # its ``applied`` is the generation being applied
            applied.append((listener.applied if listener is not None else -1, now))

    def on_opened(sender: Any, **kw: Any) -> None:
        if sender is pool:
            opened.append((time.time(), bool(kw.get("background"))))

    signals.recycle_requested.connect(on_recycle, weak=False)
    signals.connection_opened.connect(on_opened, weak=False)
    load = None
    try:
        with engine.connect() as conn:  # attaches the pool to its bus, starts the prefill
            conn.execute(QUERY)
        load = Load(engine, int(spec["load_threads"]), cfg.think_ms, index)
        wait_until(
            lambda: (
                pool.listener is not None and pool.listener.connected and pool.stats().open >= size
            ),
            "the bus listener and a full pool",
        )
        before = pool.stats()
        out.put({"i": index, "ev": "ready"})
        msg = ctl.get()
        assert msg["op"] == "report", msg
        last = int(msg.get("gen", 0))
        listener = pool.listener
        caught_up = poll(lambda: listener is not None and listener.applied >= last, 10.0)
        after = pool.stats()
        load.stop()
        out.put(
            {
                "i": index,
                "ev": "report",
                "applied": applied,
                "opened": opened,
                "caught_up": caught_up,
                "waited": after.checkouts_waited - before.checkouts_waited,
                "retired": after.retirements.get("signal", 0) - before.retirements.get("signal", 0),
                "rejected": after.bus.messages_rejected if after.bus else 0,
                "errors": load.errors,
            }
        )
    finally:
        if load is not None:
            load.stop()
        signals.recycle_requested.disconnect(on_recycle)
        signals.connection_opened.disconnect(on_opened)
        engine.dispose()


def run_baseline(index: int, cfg: ChildConfig, spec: dict[str, Any], ctl: Any, out: Any) -> None:
    """Plain ``QueuePool``: on ``dispose``, ``engine.dispose()`` and reopen the pool."""
    size = int(spec["pool_size"])
    engine = create_engine(cfg.db_url, poolclass=QueuePool, pool_size=size, max_overflow=0)
    opened: list[float] = []
    event.listen(engine, "connect", lambda dbapi, rec: opened.append(time.time()))
    load = None
    try:
        warm(engine, size)
        load = Load(engine, int(spec["load_threads"]), cfg.think_ms, index)
        out.put({"i": index, "ev": "ready"})
        msg = ctl.get()
        assert msg["op"] == "dispose", msg
        disposed_at = time.time()
        engine.dispose()
        warm(engine, size)
        msg = ctl.get()
        assert msg["op"] == "report", msg
        load.stop()
        out.put(
            {
                "i": index,
                "ev": "report",
                "disposed_at": disposed_at,
                "opened": opened,
                "errors": load.errors,
            }
        )
    finally:
        if load is not None:
            load.stop()
        engine.dispose()


def child(index: int, cfg: ChildConfig, ctl: Any, out: Any) -> None:
    """One application process: runs the phases the parent asks for, until ``quit``."""
    logging.basicConfig(level=logging.WARNING, format=f"  log[{index}]: %(name)s: %(message)s")
    while True:
        spec = ctl.get()
        if spec["op"] == "quit":
            return
        try:
            if spec["op"] == "ours":
                run_ours(index, cfg, spec, ctl, out)
            else:
                run_baseline(index, cfg, spec, ctl, out)
        except BaseException:
            out.put({"i": index, "ev": "error", "error": traceback.format_exc()})
            return


class Fleet:
    """The application processes and their control queues."""

    def __init__(self, n: int, cfg: ChildConfig) -> None:
        ctx = mp.get_context("spawn")
        self.out: Any = ctx.Queue()
        self.ctls: list[Any] = [ctx.Queue() for _ in range(n)]
        self.procs = [
            ctx.Process(target=child, args=(i, cfg, self.ctls[i], self.out), daemon=True)
            for i in range(n)
        ]
        for p in self.procs:
            p.start()

    def send(self, msg: dict[str, Any]) -> None:
        for ctl in self.ctls:
            ctl.put(msg)

    def gather(self, ev: str, timeout: float = READY_TIMEOUT) -> list[dict[str, Any]]:
        """One ``ev`` message from every process, in process order."""
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.procs):
            try:
                msg = self.out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                missing = len(self.procs) - len(got)
                raise RuntimeError(f"{missing} processes sent no {ev!r}") from None
            if msg["ev"] == "error":
                raise RuntimeError(f"process {msg['i']} failed:\n{msg['error']}")
            if msg["ev"] != ev:
                raise RuntimeError(f"expected {ev!r} from process {msg['i']}, got {msg['ev']!r}")
            got[msg["i"]] = msg
        return [got[i] for i in sorted(got)]

    def close(self) -> None:
        self.send({"op": "quit"})
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


# --------------------------------------------------------------------------- phases


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def phase_bus(base_url: str, channel: str) -> tuple[str, Bus]:
    """The URL and bus of one phase: its own channel (log, heartbeats, wake-ups).

    A pool applies a logged command issued up to ``ATTACH_GRACE`` (5 s) before
    it attached; a channel per phase keeps one phase's commands out of the next.
    """
    url = f"{base_url}?channel={channel}"
    return url, open_bus(url)


def latency_phase(
    fleet: Fleet, url: str, bus: Bus, host: str | None, args: argparse.Namespace
) -> dict[str, Any]:
    fleet.send(
        {
            "op": "ours",
            "bus": url,
            "pool_size": args.pool_size,
            "load_threads": args.latency_load_threads,
        }
    )
    fleet.gather("ready")
    time.sleep(0.5)
    published: dict[int, float] = {}
    publish_ms: list[float] = []
    rng = random.Random(1)
    last = 0
    for _ in range(args.commands):
        t0 = time.time()
        sent = send_command(bus, "recycle", host=host, spread=0, secret=SECRET)
        publish_ms.append((time.time() - t0) * 1000.0)
        published[sent.generation] = t0
        last = sent.generation
        time.sleep(rng.uniform(0.05, 0.1))
    fleet.send({"op": "report", "gen": last})  # each process waits for it, then reports
    reports = fleet.gather("report")
    latencies: list[float] = []
    pairs: Counter[tuple[int, int]] = Counter()
    per_command: dict[int, list[float]] = defaultdict(list)
    unknown = 0
    for r in reports:
        for gen, t in r["applied"]:
            if gen not in published:
                unknown += 1
                continue
            pairs[(r["i"], gen)] += 1
            if pairs[(r["i"], gen)] == 1:
                latencies.append((t - published[gen]) * 1000.0)
                per_command[gen].append(t)
    fleet_ms = sorted((max(ts) - min(ts)) * 1000.0 for ts in per_command.values())
    order = {gen: k for k, gen in enumerate(sorted(published))}
    missing = sorted(
        (r["i"], order[gen]) for r in reports for gen in published if (r["i"], gen) not in pairs
    )
    return {
        "latencies": sorted(latencies),
        "publish_ms": sorted(publish_ms),
        "fleet_ms": fleet_ms,
        "expected": len(published) * len(reports),
        "applied": len(pairs),
        "missing": missing,
        "duplicates": sum(n - 1 for n in pairs.values()),
        "unknown": unknown,
        "behind": sum(1 for r in reports if not r["caught_up"]),
        "rejected": sum(r["rejected"] for r in reports),
        "retired": sum(r["retired"] for r in reports),
        "errors": [e for r in reports for e in r["errors"]],
    }


def bins(times: list[float], start: float, seconds: int) -> list[int]:
    """Counts per 1-second bin of ``times`` in ``[start, start + seconds)``."""
    counts = [0] * seconds
    for t in times:
        k = math.floor(t - start)
        if 0 <= k < seconds:
            counts[k] += 1
    return counts


def spread_phase(fleet: Fleet, url: str, bus: Bus, args: argparse.Namespace) -> dict[str, Any]:
    size = args.spread_pool_size
    fleet.send(
        {
            "op": "ours",
            "bus": url,
            "pool_size": size,
            "load_threads": args.load_threads,
        }
    )
    fleet.gather("ready")
    time.sleep(1.0)
    t0 = time.time()
    send_command(bus, "recycle", spread=args.spread, secret=SECRET)
    window = math.ceil(args.spread) + args.tail
    time.sleep(window)
    fleet.send({"op": "report"})
    reports = fleet.gather("report")
    background = [t for r in reports for t, bg in r["opened"] if bg and t >= t0]
    counts = bins(background, t0, window)
    total = sum(counts)
    return {
        "bins": counts,
        "total": total,
        "uniform": total / args.spread,
        "peak": max(counts),
        "waited": sum(r["waited"] for r in reports),
        "retired": sum(r["retired"] for r in reports),
        "expected": len(reports) * size,
        "errors": [e for r in reports for e in r["errors"]],
    }


def baseline_phase(fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    size = args.spread_pool_size
    fleet.send({"op": "baseline", "pool_size": size, "load_threads": args.load_threads})
    fleet.gather("ready")
    time.sleep(1.0)
    t0 = time.time()
    fleet.send({"op": "dispose"})
    window = args.tail + 2
    time.sleep(window)
    fleet.send({"op": "report"})
    reports = fleet.gather("report")
    connects = [t for r in reports for t in r["opened"] if t >= t0]
    counts = bins(connects, t0, window)
    disposed = [r["disposed_at"] for r in reports]
    return {
        "bins": counts,
        "total": len(connects),
        "uniform": len(connects) / args.spread,
        "peak": max(counts),
        "dispose_skew_ms": (max(disposed) - min(disposed)) * 1000.0,
        "errors": [e for r in reports for e in r["errors"]],
    }


# --------------------------------------------------------------------------- main


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    return (
        f"p50 {percentile(values, 50):.1f}  p99 {percentile(values, 99):.1f}  max {values[-1]:.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=16)
    parser.add_argument("--commands", type=int, default=50, help="per transport and variant")
    parser.add_argument("--pool-size", type=int, default=2, help="per process, latency phases")
    parser.add_argument("--latency-load-threads", type=int, default=0, help="per process")
    parser.add_argument("--spread", type=float, default=10.0, help="seconds (spread phase)")
    parser.add_argument("--spread-pool-size", type=int, default=8, help="per process")
    parser.add_argument("--tail", type=int, default=3, help="seconds watched after the spread")
    parser.add_argument("--load-threads", type=int, default=2, help="per process (spread phases)")
    parser.add_argument("--think-ms", type=float, default=5.0, help="mean think time per query")
    parser.add_argument("--transport", choices=[*TRANSPORTS, "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="short run for CI smoke tests")
    parser.add_argument("--check", action="store_true")
    parser.add_argument(
        "--check-timing",
        action="store_true",
        help="with --check, also exit 1 on a missed timing target (noisy on shared machines)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.processes, args.commands, args.spread, args.tail = 4, 10, 3.0, 2
    logging.basicConfig(level=logging.WARNING, format="  log: %(name)s: %(message)s")
    began = time.monotonic()

    from sqla_rebalance.devservers import PostgresCluster, RedisServer

    # While replacing, a process may hold up to twice its pool (make-before-break),
    # plus its bus listener's connection.
    need = args.processes * (2 * max(args.pool_size, args.spread_pool_size) + 1) + 20
    settings = {"max_connections": str(max(200, need))}
    transports = list(TRANSPORTS) if args.transport == "both" else [args.transport]
    latency: dict[tuple[str, str], dict[str, Any]] = {}
    with PostgresCluster(n=1, settings=settings) as cluster, RedisServer() as redis_server:
        server = cluster.servers[0]
        buses = {
            "redis": ensure_loopback(redis_server.url()),
            "postgresql": ensure_loopback(server.url(driver=None)),
        }
        print(
            f"broadcast_latency: {args.processes} processes (spawn); PostgreSQL "
            f"{server.address}, Redis {redis_server.address}; {os.cpu_count()} CPUs"
        )
        fleet = Fleet(args.processes, ChildConfig(ensure_loopback(server.url()), args.think_ms))
        try:
            for name in transports:
                for variant, host in VARIANTS.items():
                    url, bus = phase_bus(buses[name], f"latency_{variant.split()[0]}")
                    latency[name, variant] = r = latency_phase(fleet, url, bus, host, args)
                    print(
                        f"\n[latency, bus {name}, {variant}] {args.commands} x recycle "
                        f"(spread=0{', host=' + host if host else ''}) to {args.processes} "
                        f"pools of {args.pool_size}, 50-100 ms apart, "
                        f"{args.latency_load_threads} load threads"
                    )
                    print(f"  applied - published (ms):       {_ms(r['latencies'])}")
                    print(f"  send_command() call (ms):       {_ms(r['publish_ms'])}")
                    print(f"  last - first process (ms):      {_ms(r['fleet_ms'])}")
                    print(
                        f"  (process, command) pairs applied {r['applied']} / {r['expected']}, "
                        f"duplicates {r['duplicates']}, unknown {r['unknown']}, rejected "
                        f"{r['rejected']}; connections retired {r['retired']}"
                    )
                    if r["missing"]:
                        shown = ", ".join(f"#{c} in process {i}" for i, c in r["missing"][:5])
                        print(f"  NOT APPLIED: command {shown}")
                    if r["behind"]:
                        print(
                            f"  {r['behind']} processes had not processed the last one after 10 s"
                        )
            ours = spread_phase(fleet, *phase_bus(buses["redis"], "spread"), args)
            print(
                f"\n[{OURS}, spread] one recycle (spread={args.spread:g} s, bus redis) to "
                f"{args.processes} pools of {args.spread_pool_size}, {args.load_threads} load "
                f"threads each (think ~{args.think_ms:g} ms)"
            )
            print(f"  background reconnects per second: {ours['bins']}")
            print(
                f"  reconnects {ours['total']} (connections {ours['expected']}), "
                f"retired by the command {ours['retired']}"
            )
            base = baseline_phase(fleet, args)
            print(
                f"\n[{BASELINE}, dispose] engine.dispose() in {args.processes} processes "
                f"(within {base['dispose_skew_ms']:.0f} ms), each reopens its "
                f"{args.spread_pool_size} connections; same load"
            )
            print(f"  connects per second: {base['bins']}")
        finally:
            fleet.close()

    def ratio(r: dict[str, Any]) -> str:
        return f"{r['peak'] / r['uniform']:.2f}" if r["uniform"] else "-"

    rows = [
        ("reconnects", str(base["total"]), str(ours["total"])),
        ("peak reconnects in a 1 s bin", str(base["peak"]), str(ours["peak"])),
        (
            f"uniform total/{args.spread:g} s per s",
            f"{base['uniform']:.1f}",
            f"{ours['uniform']:.1f}",
        ),
        (f"peak / uniform (target <= {SPREAD_TARGET:g})", ratio(base), ratio(ours)),
        ("connects inside a checkout", str(base["total"]), str(ours["waited"])),
        ("load errors", str(len(base["errors"])), str(len(ours["errors"]))),
    ]
    print(f"\n{'':<40}{BASELINE + ' dispose':>18}{OURS + ' recycle':>18}")
    for label, a, c in rows:
        print(f"{label:<40}{a:>18}{c:>18}")
    print(f"\nruntime {time.monotonic() - began:.1f} s")

    problems = []  # promises: any machine
    slow = []  # timing targets: --check-timing
    for (name, variant), r in latency.items():
        where = f"{name}, {variant}"
        p99 = percentile(r["latencies"], 99) if r["latencies"] else math.inf
        if p99 >= LATENCY_TARGET_MS:
            slow.append(f"{where}: latency p99 {p99:.1f} ms >= {LATENCY_TARGET_MS:g} ms")
        if r["applied"] != r["expected"] or r["duplicates"] or r["unknown"]:
            problems.append(
                f"{where}: {r['applied']} / {r['expected']} pairs applied, "
                f"{r['duplicates']} duplicates, {r['unknown']} unknown"
            )
        if r["errors"] or r["rejected"]:
            problems.append(f"{where}: {len(r['errors'])} errors, {r['rejected']} rejected")
    if not ours["uniform"] or ours["peak"] / ours["uniform"] > SPREAD_TARGET:
        slow.append(f"spread: peak {ours['peak']} > {SPREAD_TARGET:g} x {ours['uniform']:.1f}")
    if ours["waited"]:
        problems.append(f"spread: {ours['waited']} connects inside a checkout")
    if ours["errors"]:
        problems.append(f"spread: {len(ours['errors'])} load errors")
    for r in (*latency.values(), ours, base):
        for err in r["errors"][:MAX_ERRORS_KEPT]:
            print(f"  error: {err}")
    for p in problems:
        print(f"CHECK FAILED ({OURS}): {p}")
    for p in slow:
        print(f"TIMING TARGET MISSED ({OURS}): {p}")
    return 1 if args.check and (problems or (slow and args.check_timing)) else 0


if __name__ == "__main__":
    sys.exit(main())
