"""Recycle storm: QueuePool's synchronized ``pool_recycle`` against jittered lifetimes.

``--threads`` threads share one engine (``pool_size=24, max_overflow=10,
pool_recycle=10`` by default) against PostgreSQL. Each loops: check out a
connection (timed), ``SELECT 1``, check in, think 0-2 ms. With ``QueuePool``
every connection opened at start-up expires at the same moment and is
reconnected inside a checkout; ``RebalancingQueuePool`` draws each lifetime
in ``[R(1-j), R]`` and replaces connections in the background.

Everything is measured independently of the pool's own counters, with
SQLAlchemy pool events on the engine:

- every ``connect`` event is timestamped; those after warm-up are the
  lifetime reconnects (warm-up ends at ``--warmup`` seconds, or earlier once
  ``min(threads, pool_size + max_overflow)`` connections have been opened);
- a connect that fires in a load thread while that thread is inside
  ``engine.connect()`` (a thread-local flag) is a checkout that waited for a
  connect;
- the peak number of connects in any 1-second sliding window is compared
  with the uniform rate ``N / (j * R)`` (N connections open after warm-up);
  that rate is printed for QueuePool too, for contrast.

The two pools run one after the other in the same process. Usage::

    .venv/bin/python benchmarks/recycle_storm.py [--duration 30] [--threads 24]
        [--recycle 10] [--pool queuepool|rebalance|both] [--dsn URL] [--check]

Without ``--dsn`` a 1-instance PostgreSQL cluster is started on 127.0.0.x.
Exits 0 (it is a report); with ``--check``, 1 if RebalancingQueuePool breaks a
promise (a checkout waited for a connect after warm-up, an error); with
``--check-timing`` also if it misses its timing target (peak <= 2x uniform).
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from _support import BASELINE, OURS, postgres_url
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import ConnectionPoolEntry, Pool, QueuePool

from sqla_rebalance import RebalancingQueuePool

POOL_CLASSES: dict[str, type[Pool]] = {BASELINE: QueuePool, OURS: RebalancingQueuePool}
QUERY = text("SELECT 1")
MAX_ERRORS_KEPT = 5


@dataclass(frozen=True)
class Settings:
    duration: float
    threads: int
    pool_size: int
    max_overflow: int
    recycle: float
    jitter: float
    warmup: float
    max_think: float
    seed: int


@dataclass(frozen=True)
class ConnectEvent:
    t: float  # time.perf_counter()
    load_thread: bool  # fired in one of our load threads
    in_checkout: bool  # ... while it was inside engine.connect()


class Probe:
    """Pool events of one engine, recorded as they fire (the pool's stats are not used)."""

    def __init__(self, engine: Engine) -> None:
        self.local = threading.local()
        self.connects: list[ConnectEvent] = []
        self.closes: list[float] = []
        event.listen(engine, "connect", self._on_connect)
        event.listen(engine, "close", self._on_close)

    def _on_connect(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        self.connects.append(
            ConnectEvent(
                time.perf_counter(),
                getattr(self.local, "load_thread", False),
                getattr(self.local, "in_checkout", False),
            )
        )

    def _on_close(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        self.closes.append(time.perf_counter())


@dataclass
class LoadThread:
    """One client: checkout (timed), query, checkin, think."""

    engine: Engine
    probe: Probe
    stop: threading.Event
    max_think: float
    rng: random.Random
    starts: array[float] = field(default_factory=lambda: array("d"))
    latencies_ns: array[int] = field(default_factory=lambda: array("q"))
    errors: list[str] = field(default_factory=list)
    error_count: int = 0

    def run(self) -> None:
        local = self.probe.local
        local.load_thread = True
        connect = self.engine.connect
        perf, perf_ns = time.perf_counter, time.perf_counter_ns
        while not self.stop.is_set():
            try:
                started = perf()
                t0 = perf_ns()
                local.in_checkout = True
                try:
                    conn = connect()
                finally:
                    local.in_checkout = False
                elapsed = perf_ns() - t0
                self.starts.append(started)
                self.latencies_ns.append(elapsed)
                try:
                    conn.execute(QUERY)
                finally:
                    conn.close()
            except Exception as err:
                self.error_count += 1
                if len(self.errors) < MAX_ERRORS_KEPT:
                    self.errors.append(f"{type(err).__name__}: {err}")
                time.sleep(0.01)
            time.sleep(self.rng.uniform(0.0, self.max_think))


@dataclass
class Report:
    pool: str
    n_open: int
    warmup_end: float  # seconds since start
    reconnects: int
    peak: int
    peak_at: float  # seconds since start
    uniform: float
    waited: int
    background: int
    other: int
    closes: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    checkouts: int
    checkouts_after_warmup: int
    errors: int
    error_samples: list[str]
    pool_stats: dict[str, Any] | None


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of a sorted list (``q`` in [0, 1])."""
    if not sorted_values:
        return 0
    rank = max(0, min(len(sorted_values) - 1, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def peak_window(times: list[float], width: float = 1.0) -> tuple[int, float]:
    """Most events in any window ``[t, t + width)``, and where it starts."""
    best, best_at, lo = 0, 0.0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= width:
            lo += 1
        if hi - lo + 1 > best:
            best, best_at = hi - lo + 1, times[lo]
    return best, best_at


def run_scenario(name: str, url: str, s: Settings) -> Report:
    kw: dict[str, Any] = {
        "poolclass": POOL_CLASSES[name],
        "pool_size": s.pool_size,
        "max_overflow": s.max_overflow,
        "pool_recycle": s.recycle,
    }
    if name == OURS:
        kw["recycle_jitter"] = s.jitter
    engine = create_engine(url, **kw)
    probe = Probe(engine)
    stop = threading.Event()
    loads = [
        LoadThread(engine, probe, stop, s.max_think, random.Random(s.seed + i))
        for i in range(s.threads)
    ]
    threads = [
        threading.Thread(target=load.run, name=f"load-{i}", daemon=True)
        for i, load in enumerate(loads)
    ]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    stop.wait(s.duration)
    stop.set()
    for t in threads:
        t.join()
    t_end = time.perf_counter()
    pool_stats = None
    if isinstance(engine.pool, RebalancingQueuePool):
        pool_stats = engine.pool.stats().as_dict()
    engine.dispose()

    connects = sorted(probe.connects, key=lambda e: e.t)
    closes = sorted(c for c in probe.closes if c <= t_end)
    initial = min(s.threads, s.pool_size + s.max_overflow)
    warmup_end = t_start + s.warmup
    if len(connects) >= initial:
        warmup_end = min(warmup_end, connects[initial - 1].t)
    n_open = sum(e.t <= warmup_end for e in connects) - sum(c <= warmup_end for c in closes)
    after = [e for e in connects if e.t > warmup_end and e.t <= t_end]
    peak, peak_at = peak_window([e.t for e in after])

    latencies: list[int] = []
    checkouts = 0
    for load in loads:
        checkouts += len(load.latencies_ns)
        latencies.extend(
            lat
            for started, lat in zip(load.starts, load.latencies_ns, strict=True)
            if started > warmup_end
        )
    latencies.sort()
    return Report(
        pool=name,
        n_open=n_open,
        warmup_end=warmup_end - t_start,
        reconnects=len(after),
        peak=peak,
        peak_at=(peak_at - t_start) if after else 0.0,
        uniform=n_open / (s.jitter * s.recycle),
        waited=sum(e.in_checkout for e in after),
        background=sum(not e.load_thread for e in after),
        other=sum(e.load_thread and not e.in_checkout for e in after),
        closes=sum(c > warmup_end for c in closes),
        p50_ms=percentile(latencies, 0.50) / 1e6,
        p99_ms=percentile(latencies, 0.99) / 1e6,
        max_ms=(latencies[-1] if latencies else 0) / 1e6,
        checkouts=checkouts,
        checkouts_after_warmup=len(latencies),
        errors=sum(load.error_count for load in loads),
        error_samples=[e for load in loads for e in load.errors][:MAX_ERRORS_KEPT],
        pool_stats=pool_stats,
    )


def print_reports(reports: list[Report], s: Settings, where: str) -> None:
    print(
        f"recycle storm: {s.threads} threads, pool_size={s.pool_size}, "
        f"max_overflow={s.max_overflow}, pool_recycle={s.recycle:g}s, "
        f"recycle_jitter={s.jitter:g} (rebalance only), {s.duration:g}s, {where}"
    )
    rows: list[tuple[str, list[str]]] = [
        ("connections open after warm-up (N)", [f"{r.n_open}" for r in reports]),
        ("warm-up ended at (s)", [f"{r.warmup_end:.2f}" for r in reports]),
        ("lifetime reconnects after warm-up", [f"{r.reconnects}" for r in reports]),
        ("  in a checkout (checkouts waited)", [f"{r.waited}" for r in reports]),
        ("  in the background (other thread)", [f"{r.background}" for r in reports]),
        ("  in a load thread, not in checkout", [f"{r.other}" for r in reports]),
        ("closes after warm-up", [f"{r.closes}" for r in reports]),
        ("peak reconnects in a 1 s window", [f"{r.peak} @{r.peak_at:.1f}s" for r in reports]),
        ("uniform N/(j*R) per s, j=" + f"{s.jitter:g}", [f"{r.uniform:.1f}" for r in reports]),
        ("checkout latency p50 (ms)", [f"{r.p50_ms:.3f}" for r in reports]),
        ("checkout latency p99 (ms)", [f"{r.p99_ms:.3f}" for r in reports]),
        ("checkout latency max (ms)", [f"{r.max_ms:.3f}" for r in reports]),
        (
            "checkouts (total / after warm-up)",
            [f"{r.checkouts}/{r.checkouts_after_warmup}" for r in reports],
        ),
        ("errors", [f"{r.errors}" for r in reports]),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"{'':<{width}}" + "".join(f" {r.pool:>14}" for r in reports))
    for label, values in rows:
        print(f"{label:<{width}}" + "".join(f" {v:>14}" for v in values))
    for r in reports:
        for sample in r.error_samples:
            print(f"{r.pool} error: {sample}")
        if r.pool_stats is not None:
            st = r.pool_stats
            retired = {k: v for k, v in st["retirements"].items() if v}
            print(
                f"{r.pool} pool.stats(): connects={st['connects']} "
                f"checkouts_waited={st['checkouts_waited']} (includes warm-up) "
                f"retirements={retired} open={st['open']} spares={st['spares']}"
            )


def failures(r: Report) -> tuple[list[str], list[str]]:
    """Promises (any machine) and timing targets of RebalancingQueuePool this run missed."""
    broken, slow = [], []
    if r.peak > 2 * r.uniform:
        slow.append(f"peak {r.peak}/s > 2 x uniform {r.uniform:.1f}/s")
    if r.waited:
        broken.append(f"{r.waited} checkouts waited for a connect after warm-up")
    if r.errors:
        broken.append(f"{r.errors} errors")
    return broken, slow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per pool (30)")
    parser.add_argument("--threads", type=int, default=24, help="client threads (24)")
    parser.add_argument("--pool-size", type=int, default=24, help="pool_size (24)")
    parser.add_argument("--max-overflow", type=int, default=10, help="max_overflow (10)")
    parser.add_argument("--recycle", type=float, default=10.0, help="pool_recycle, s (10)")
    parser.add_argument("--jitter", type=float, default=0.2, help="recycle_jitter (0.2)")
    parser.add_argument("--warmup", type=float, default=2.0, help="longest warm-up, s (2)")
    parser.add_argument("--think-ms", type=float, default=2.0, help="max think time (2)")
    parser.add_argument("--seed", type=int, default=1, help="think-time seed (1)")
    parser.add_argument("--pool", choices=(BASELINE, OURS, "both"), default="both")
    parser.add_argument("--dsn", help="PostgreSQL URL (loopback only); default: start a server")
    parser.add_argument("--check", action="store_true", help="exit 1 if rebalance breaks a promise")
    parser.add_argument(
        "--check-timing",
        action="store_true",
        help="with --check, also exit 1 on a missed timing target (noisy on shared machines)",
    )
    args = parser.parse_args(argv)
    settings = Settings(
        duration=args.duration,
        threads=args.threads,
        pool_size=args.pool_size,
        max_overflow=args.max_overflow,
        recycle=args.recycle,
        jitter=args.jitter,
        warmup=args.warmup,
        max_think=args.think_ms / 1000.0,
        seed=args.seed,
    )
    names = [BASELINE, OURS] if args.pool == "both" else [args.pool]
    with postgres_url(args.dsn) as url:
        reports = [run_scenario(name, url, settings) for name in names]
        where = f"PostgreSQL at {url.rsplit('@', 1)[-1]}"
    print_reports(reports, settings, where)

    broken = [m for r in reports if r.pool == OURS for m in failures(r)[0]]
    slow = [m for r in reports if r.pool == OURS for m in failures(r)[1]]
    for m in broken:
        print(f"CHECK FAILED ({OURS}): {m}")
    for m in slow:
        print(f"TIMING TARGET MISSED ({OURS}): {m}")
    if args.check and (broken or (slow and args.check_timing)):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
