"""Checkout+checkin overhead of ``RebalancingQueuePool`` against ``QueuePool``.

Both pools are measured in the same process, alternately: each round times
``--ops`` checkouts of one pool, then of the other (the order flips every
round), timeit-style (``time.perf_counter_ns``, garbage collector off while
timing). The median per-operation time of each pool over the rounds gives
the ratio; ``paired`` is the median of the per-round ratios, a second view
that cancels slow drifts of the machine. Target: ratio <= 1.05.

Two checkout paths, on SQLite (file database) and PostgreSQL (a 1-instance
cluster on 127.0.0.x, or ``--dsn``):

- ``pool``: ``engine.pool.connect()`` then ``.close()``;
- ``engine``: ``with engine.connect(): pass``.

Usage::

    .venv/bin/python benchmarks/checkout_overhead.py [--rounds 20] [--ops 2000]
        [--backend sqlite|postgresql|both] [--dsn URL] [--quick] [--check]

Prints a table and exits 0 (``--check``: 1 if a ratio exceeds ``--max-ratio``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from _support import BASELINE, CHECKOUT_POOLS, OURS, make_engine, postgres_url
from sqlalchemy.engine import Engine

Timer = Callable[[Engine, int], int]


def time_pool_connect(engine: Engine, ops: int) -> int:
    """Nanoseconds for ``ops`` x ``engine.pool.connect().close()``."""
    connect = engine.pool.connect
    perf = time.perf_counter_ns
    t0 = perf()
    for _ in range(ops):
        connect().close()
    return perf() - t0


def time_engine_connect(engine: Engine, ops: int) -> int:
    """Nanoseconds for ``ops`` x ``with engine.connect(): pass``."""
    connect = engine.connect
    perf = time.perf_counter_ns
    t0 = perf()
    for _ in range(ops):
        with connect():
            pass
    return perf() - t0


PATHS: dict[str, Timer] = {"pool": time_pool_connect, "engine": time_engine_connect}


@dataclass
class Result:
    backend: str
    path: str
    per_op_ns: dict[str, list[float]]  # pool variant -> per-round ns/op

    def median(self, variant: str) -> float:
        return statistics.median(self.per_op_ns[variant])

    @property
    def ratio(self) -> float:
        return self.median(OURS) / self.median(BASELINE)

    @property
    def paired(self) -> float:
        pairs = zip(self.per_op_ns[OURS], self.per_op_ns[BASELINE], strict=True)
        return statistics.median(o / b for o, b in pairs)


def timed(timer: Timer, engine: Engine, ops: int) -> float:
    """One timed batch, in ns per operation, with the garbage collector off."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        return timer(engine, ops) / ops
    finally:
        if enabled:
            gc.enable()


def compare(backend: str, url: str, rounds: int, ops: int) -> list[Result]:
    engines = {name: make_engine(url, variant) for name, variant in CHECKOUT_POOLS.items()}
    try:
        results = []
        for path, timer in PATHS.items():
            for engine in engines.values():  # warm up: first connect, dialect init
                timer(engine, max(ops // 4, 100))
            per_op: dict[str, list[float]] = {name: [] for name in engines}
            order = list(engines)
            for _ in range(rounds):
                for name in order:
                    per_op[name].append(timed(timer, engines[name], ops))
                order.reverse()
            results.append(Result(backend, path, per_op))
        return results
    finally:
        for engine in engines.values():
            engine.dispose()


@contextlib.contextmanager
def sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="sqla-rebalance-bench-") as tmp:
        yield f"sqlite:///{Path(tmp) / 'bench.db'}"


def print_table(results: list[Result], max_ratio: float) -> None:
    header = (
        f"{'pool':<10} {'backend':<11} {'path':<7} {'median ns/op':>13} {'ratio':>7} {'paired':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        for name in (BASELINE, OURS):
            ratio = f"{r.ratio:7.3f}" if name == OURS else f"{'1':>7}"
            paired = f"{r.paired:7.3f}" if name == OURS else f"{'':>7}"
            print(f"{name:<10} {r.backend:<11} {r.path:<7} {r.median(name):13.0f} {ratio} {paired}")
    worst = max(r.ratio for r in results)
    verdict = "ok" if worst <= max_ratio else "OVER TARGET"
    print(f"\nworst ratio {worst:.3f} (target <= {max_ratio:.2f}): {verdict}")
    unsteady = [f"{r.backend}/{r.path}" for r in results if abs(r.ratio - r.paired) > 0.05]
    if unsteady:
        print(
            f"note: ratio and paired differ by more than 0.05 for {', '.join(unsteady)}: "
            "the machine's load changed during the run; rerun on a quiet machine"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="alternating rounds (20)")
    parser.add_argument("--ops", type=int, default=2000, help="checkouts per round (2000)")
    parser.add_argument(
        "--backend", choices=("sqlite", "postgresql", "both"), default="both", help="(both)"
    )
    parser.add_argument("--dsn", help="PostgreSQL URL (loopback only); default: start a server")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 rounds x 1000 ops")
    parser.add_argument("--max-ratio", type=float, default=1.05, help="target ratio (1.05)")
    parser.add_argument("--check", action="store_true", help="exit 1 if over --max-ratio")
    args = parser.parse_args(argv)
    rounds, ops = (10, 1000) if args.quick else (args.rounds, args.ops)

    results: list[Result] = []
    if args.backend in ("sqlite", "both"):
        with sqlite_url() as url:
            results += compare("sqlite", url, rounds, ops)
    if args.backend in ("postgresql", "both"):
        with postgres_url(args.dsn) as url:
            results += compare("postgresql", url, rounds, ops)

    print(f"{rounds} alternating rounds x {ops} checkout+checkin per pool")
    print_table(results, args.max_ratio)
    if args.check and max(r.ratio for r in results) > args.max_ratio:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
