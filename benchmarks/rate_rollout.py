#!/usr/bin/env python3
"""Rate-budgeted rollouts: ``recycle --rate N`` on a fleet, counted by the database server.

One PostgreSQL server (127.0.0.2, ``log_connections=on``) and one Redis bus
(127.0.0.1), both from ``sqla_rebalance.devservers``. ``--processes`` OS
processes (multiprocessing, spawn) each hold one engine on the server:
``RebalancingQueuePool`` with ``pool_size=min_size=--pool-size``,
``max_overflow=0``, ``broadcast=<Redis>``, ``min_recycle_interval=0`` and
``application_name=rate_rollout``, and, with ``--load-threads``, a light load.

Once every process is listening and its pool is full *in the heartbeats* (which
the sender reads), the parent runs ``recycle --rate N --wait`` through the
command core, exactly as ``sqla-rebalance recycle`` does
(``commands.send``): it reads fleet status, publishes the recycle with
``spread = busiest host's connections / N``, and follows the rollout, its
progress (and ETA) shown on stderr. The new connections are then read from
the **server's log**: every ``connection received`` line of a backend whose
``connection authorized`` line names ``application_name=rate_rollout``, at the
millisecond (``log_timezone=UTC``). Printed:

- the new connections per second and the **peak in any 1-s window** (sliding,
  from each connect), against ``N``: the issue's target is ``peak <= 1.2 x N``
  with 32 or more processes;
- the rollout's duration (first to last new connection) against the planned
  spread, and what ``--wait`` reported (elapsed, connections replaced);
- the ETA given while waiting, against the time the rollout actually took;
- the fleet's own counts: retirements by the command, checkouts that waited
  for a connect.

Usage::

    .venv/bin/python benchmarks/rate_rollout.py [--processes 64] [--pool-size 8] [--rate 50]
        [--load-threads 0] [--quick] [--check]

``--mean-spread`` sends ``recycle --spread total/N`` instead, for comparison: the
fleet's mean rate at ``N`` with no margin for the pools' chance coincidences
(what ``--rate`` planned before :func:`sqla_rebalance.commands.budget_spread`).
``--quick`` runs 32 processes (about a minute on 2 CPUs). ``--check`` exits 1
if the peak 1-s window is above 1.2 x N, if not every connection was replaced
(``pg_stat_activity``: no ``rate_rollout`` backend from before the command),
if a new connection was made inside a checkout, or on any error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import re
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _support import ensure_loopback
from sqlalchemy import create_engine, text

from sqla_rebalance import RebalancingQueuePool, commands
from sqla_rebalance.bus import WaitProgress, read_fleet

SECRET = "rate-rollout-benchmark-secret"
POOL_NAME = "rollout"
APP = "rate_rollout"
PEAK_TARGET = 1.2
READY_TIMEOUT = 180.0
MAX_ERRORS_KEPT = 5


# --------------------------------------------------------------------------- the fleet


def child(index: int, spec: dict[str, Any], ctl: Any, out: Any) -> None:
    """One application process: a full pool on the bus, until ``report``."""
    logging.basicConfig(level=logging.WARNING, format=f"  log[{index}]: %(name)s: %(message)s")
    try:
        size = int(spec["pool_size"])
        engine = create_engine(
            spec["db_url"],
            poolclass=RebalancingQueuePool,
            pool_size=size,
            min_size=size,
            max_overflow=0,
            pool_name=POOL_NAME,
            broadcast=spec["bus_url"],
            broadcast_secret=SECRET,
            min_recycle_interval=0,
            connect_args={"application_name": APP},
        )
        pool = engine.pool
        assert isinstance(pool, RebalancingQueuePool)
        with engine.connect() as conn:  # attaches the pool to its bus, starts the prefill
            conn.execute(text("SELECT 1"))
        deadline = time.monotonic() + 60
        while not (
            pool.listener is not None and pool.listener.connected and pool.stats().open >= size
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("no bus listener or no full pool after 60 s")
            time.sleep(0.05)
        before = pool.stats()
        stop = threading.Event()
        errors: list[str] = []

        def load(seed: int) -> None:
            think = float(spec["think_ms"]) / 1000.0
            while not stop.is_set():
                try:
                    with engine.connect() as conn:
                        conn.execute(text("SELECT 1"))
                except Exception as err:  # reported by the parent
                    errors.append(repr(err)[:200])
                stop.wait(think * (0.5 + (seed * 7919 + time.monotonic_ns()) % 1000 / 1000))

        threads = [
            threading.Thread(target=load, args=(index * 100 + k,), daemon=True)
            for k in range(int(spec["load_threads"]))
        ]
        for t in threads:
            t.start()
        out.put({"i": index, "ev": "ready"})
        msg = ctl.get()
        assert msg["op"] == "report", msg
        stop.set()
        for t in threads:
            t.join(10)
        after = pool.stats()
        out.put(
            {
                "i": index,
                "ev": "report",
                "retired": after.retirements.get("signal", 0) - before.retirements.get("signal", 0),
                "waited": after.checkouts_waited - before.checkouts_waited,
                "connects": after.connects - before.connects,
                "errors": errors,
            }
        )
        ctl.get()  # quit
        engine.dispose()
    except BaseException:
        out.put({"i": index, "ev": "error", "error": traceback.format_exc()})


class Fleet:
    def __init__(self, n: int, spec: dict[str, Any]) -> None:
        ctx = mp.get_context("spawn")
        self.out: Any = ctx.Queue()
        self.ctls: list[Any] = [ctx.Queue() for _ in range(n)]
        self.procs = [
            ctx.Process(target=child, args=(i, spec, self.ctls[i], self.out), daemon=True)
            for i in range(n)
        ]
        for p in self.procs:
            p.start()

    def send(self, op: str) -> None:
        for ctl in self.ctls:
            ctl.put({"op": op})

    def gather(self, ev: str, timeout: float = READY_TIMEOUT) -> list[dict[str, Any]]:
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.procs):
            try:
                msg = self.out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(
                    f"{len(self.procs) - len(got)} processes sent no {ev!r}"
                ) from None
            if msg["ev"] == "error":
                raise RuntimeError(f"process {msg['i']} failed:\n{msg['error']}")
            got[msg["i"]] = msg
        return [got[i] for i in sorted(got)]

    def close(self) -> None:
        self.send("quit")
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


# --------------------------------------------------------------------------- measuring

_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC \[(\d+)\] .*?LOG:\s+connection "
    r"(received|authorized): (.*)$"
)


def new_connections(logfile: Path, offset: int) -> list[float]:
    """Wall-clock times (the server's ``connection received``) of the ``rate_rollout``
    backends started in ``logfile`` after byte ``offset``, sorted."""
    received: dict[str, float] = {}
    times = []
    with logfile.open("rb") as f:
        f.seek(offset)
        for raw in f:
            m = _LINE.match(raw.decode("utf-8", "replace").rstrip("\n"))
            if m is None:
                continue
            stamp, pid, what, rest = m.groups()
            at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone.utc)
            if what == "received":
                received[pid] = at.timestamp()
            elif f"application_name={APP}" in rest and pid in received:
                times.append(received.pop(pid))
    return sorted(times)


def peak_window(times: list[float], width: float = 1.0) -> tuple[int, float]:
    """The most events in any window ``[t, t + width)`` (sliding), and where it starts."""
    best, start, j = 0, times[0] if times else 0.0, 0
    for i, t in enumerate(times):
        while times[j] <= t - width:
            j += 1
        if i - j + 1 > best:
            best, start = i - j + 1, times[j]
    return best, start


def backends(url: str, since: float) -> tuple[int, int]:
    """(``rate_rollout`` backends now, those of them started before ``since``)."""
    engine = create_engine(url, poolclass=None)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT count(*), count(*) FILTER (WHERE backend_start < to_timestamp(:t)) "
                    "FROM pg_stat_activity WHERE application_name = :a"
                ),
                {"a": APP, "t": since},
            ).one()
        return int(row[0]), int(row[1])
    finally:
        engine.dispose()


class Recorder(commands.ProgressPrinter):
    """The CLI's progress printer (a bar on a terminal), keeping every snapshot."""

    def __init__(self) -> None:
        printer = commands.ProgressPrinter.on(sys.stderr)
        super().__init__(sys.stderr.write, tty=printer.tty, flush=sys.stderr.flush)
        self.seen: list[tuple[float, WaitProgress]] = []

    def update(self, p: WaitProgress) -> None:
        self.seen.append((time.time(), p))
        super().update(p)


def wait_full(bus_url: str, processes: int, size: int, timeout: float = 60.0) -> None:
    """Until the heartbeats (what ``--rate`` reads) show every pool full."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = [p for p in read_fleet(bus_url).processes if p.has_pool(POOL_NAME)]
        full = [p for p in procs if all(q.get("open") == size for q in p.pools)]
        if len(full) == processes:
            return
        time.sleep(0.2)
    raise RuntimeError(f"heartbeats show {len(full)} of {processes} full pools after {timeout} s")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=64)
    parser.add_argument("--pool-size", type=int, default=8, help="per process (= min_size)")
    parser.add_argument("--rate", type=float, default=50.0, help="new connections per second")
    parser.add_argument("--load-threads", type=int, default=0, help="per process")
    parser.add_argument("--think-ms", type=float, default=20.0, help="load: mean think time")
    parser.add_argument(
        "--mean-spread",
        action="store_true",
        help="for comparison: recycle --spread total/N (the mean rate at N, no margin) "
        "instead of --rate N",
    )
    parser.add_argument("--quick", action="store_true", help="32 processes (CI smoke run)")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.processes = min(args.processes, 32)
    logging.basicConfig(level=logging.WARNING, format="  log: %(name)s: %(message)s")
    began = time.monotonic()
    from sqla_rebalance.devservers import PostgresCluster, RedisServer

    size = args.pool_size
    expected = args.processes * size
    settings = {
        # Make-before-break: up to twice the pool while replacing, and our own queries.
        "max_connections": str(max(200, args.processes * (2 * size + 1) + 20)),
        "log_connections": "on",
        "log_timezone": "UTC",
    }
    with PostgresCluster(n=1, settings=settings) as cluster, RedisServer() as redis_server:
        server = cluster.servers[0]
        db_url = ensure_loopback(server.url())
        bus_url = ensure_loopback(redis_server.url()) + "?channel=rate_rollout"
        print(
            f"rate_rollout: {args.processes} processes (spawn) x pool_size {size} = {expected} "
            f"connections to PostgreSQL {server.address}; bus Redis {redis_server.address}; "
            f"--rate {args.rate:g}; {args.load_threads} load threads each; {os.cpu_count()} CPUs"
        )
        spec = {
            "db_url": db_url,
            "bus_url": bus_url,
            "pool_size": size,
            "load_threads": args.load_threads,
            "think_ms": args.think_ms,
        }
        fleet = Fleet(args.processes, spec)
        try:
            fleet.gather("ready")
            wait_full(bus_url, args.processes, size)
            started = time.monotonic() - began
            planned = expected / args.rate
            offset = server.logfile.stat().st_size
            lines: list[str] = []
            recorder = Recorder()
            t0 = time.time()
            code = commands.send(
                commands.request(
                    "recycle",
                    pools=[POOL_NAME],
                    rate=None if args.mean_spread else args.rate,
                    spread=planned if args.mean_spread else None,
                    wait=planned + 30,
                    as_json=True,
                ),
                [commands.Target(bus_url, SECRET)],
                commands.CLI,
                lines.append,
                recorder,
            )
            record = json.loads(lines[-1])
            # The heartbeats lag: make sure the server has every replacement.
            deadline = time.monotonic() + 30
            while backends(db_url, t0)[1] and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(0.5)
            total, old = backends(db_url, t0)
            fleet.send("report")
            reports = fleet.gather("report")
        finally:
            fleet.close()
        times = [t for t in new_connections(server.logfile, offset) if t >= t0 - 0.5]

    spread = float(record.get("spread", planned))
    peak, peak_at = peak_window(times)
    first, last = (times[0], times[-1]) if times else (t0, t0)
    bins = [0] * (math.ceil(last - t0) + 1 if times else 1)
    for t in times:
        bins[max(0, math.floor(t - t0))] += 1
    progress = record.get("progress") or {}
    errors = [e for r in reports for e in r["errors"]]
    waited = sum(r["waited"] for r in reports)
    retired = sum(r["retired"] for r in reports)
    # ETA while replacing, against the time the server's last new connection came.
    eta_errors = [
        abs((p.eta or 0.0) - (last - at))
        for at, p in recorder.seen
        if p.phase == "replacing" and p.eta is not None and at < last
    ]

    print(f"\nfleet ready in {started:.1f} s; published {record['command']!r} (exit {code})")
    print(f"  new connections per second (from the publish): {bins}")
    print(f"  new {APP} connections on the server:           {len(times)} (connections {expected})")
    print(
        f"  peak in any 1-s window:                         {peak} at +{peak_at - t0:.2f} s "
        f"= {peak / args.rate:.2f} x N (target <= {PEAK_TARGET:g})"
    )
    print(
        f"  rollout: first to last new connection           {last - first:.2f} s "
        f"(planned spread {spread:.2f} s; publish to last {last - t0:.2f} s)"
    )
    print(
        f"  --wait: elapsed {progress.get('elapsed')} s, processes {progress.get('applied')}"
        f"/{progress.get('processes')}, connections replaced {progress.get('retired')}"
        f"/{progress.get('connections')} ({progress.get('phase')})"
    )
    if eta_errors:
        print(
            f"  ETA while replacing vs the real end:            mean error "
            f"{sum(eta_errors) / len(eta_errors):.2f} s, max {max(eta_errors):.2f} s "
            f"({len(eta_errors)} looks)"
        )
    print(
        f"  fleet: retired by the command {retired}, checkouts that waited {waited}, "
        f"errors {len(errors)}; server: {total} {APP} backends, {old} from before the command"
    )
    print(f"\nruntime {time.monotonic() - began:.1f} s")

    problems = []
    if peak > PEAK_TARGET * args.rate:
        problems.append(f"peak {peak} in a 1-s window > {PEAK_TARGET:g} x {args.rate:g}")
    if old or total != expected or len(times) < expected:
        problems.append(
            f"not every connection replaced: {old} old backends left, {total} now, "
            f"{len(times)} new (expected {expected})"
        )
    if code != commands.OK or (progress.get("phase") != "done" and not args.mean_spread):
        problems.append(f"--wait: exit {code}, phase {progress.get('phase')}")
    if waited:
        problems.append(f"{waited} checkouts waited for a connect")
    for err in errors[:MAX_ERRORS_KEPT]:
        print(f"  error: {err}")
    if errors:
        problems.append(f"{len(errors)} load errors")
    for p in problems:
        print(f"CHECK FAILED: {p}")
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
