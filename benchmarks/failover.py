"""One of three hosts fails under load, then comes back.

Three PostgreSQL servers run on 127.0.0.2-4. One engine per variant
(``pool_size=12, max_overflow=0, pool_pre_ping=True``) serves ``--threads``
threads, each looping: check out, ``SELECT host(inet_server_addr())``,
``SELECT pg_sleep(0.002)``, check in. After warm-up one server is stopped
with ``pg_ctl stop -m immediate`` (a crash: its sessions die), kept down for
``--down`` seconds, and restarted. Both variants run in one invocation:

- ``queuepool``: ``QueuePool`` on psycopg's multi-host URL with
  ``load_balance_hosts=random`` (libpq itself tries the next host when one
  refuses);
- ``rebalance``: ``RebalancingQueuePool`` on the same URL (it reads the
  multi-host form as its host list), ``health_check_interval=1``.

Errors are split in two, because no pool can save the first kind:

- *in flight*: a statement failed on a connection checked out before the
  server was confirmed dead (``pg_ctl stop -m immediate`` returned): its
  server died under it;
- *failed checkouts*: ``engine.connect()`` raised, or a statement failed on a
  connection checked out after that.

Also printed: the time from the stop until the pool holds no connection to
the dead host (counted with pool ``connect``/``close``/``invalidate``
events), and connections per host (counted on the servers) before, during
the outage, and ``--after`` seconds after the restart.

Usage::

    .venv/bin/python benchmarks/failover.py [--threads 16] [--down 6] [--after 5]
        [--quick] [--check]

``--check`` exits 1 if ``rebalance`` has a failed checkout (a promise, on any
machine); with ``--check-timing`` also if it is not back to an even spread
(max - min <= 1) ``--after`` seconds after the restart (a timing target).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import threading
import time
from collections import Counter
from typing import Any

from _support import BASELINE, OURS, ensure_loopback, server_counts
from sqlalchemy import create_engine, event, text
from sqlalchemy.pool import QueuePool

from sqla_rebalance import RebalancingQueuePool


class Tracker:
    """Connections of one engine per host, from pool events (independent of the pool)."""

    def __init__(self, engine: Any) -> None:
        self.lock = threading.Lock()
        self.live: Counter[str] = Counter()
        self.owner: dict[int, str] = {}
        event.listen(engine, "connect", self.on_connect)
        event.listen(engine, "close", self.on_close)
        event.listen(engine, "invalidate", self.on_close_invalid)
        event.listen(engine, "close_detached", self.on_close_detached)

    @staticmethod
    def host_of(dbapi: Any) -> str:
        info = dbapi.info
        return str(info.hostaddr or info.host)

    def on_connect(self, dbapi: Any, rec: Any) -> None:
        with self.lock:
            host = self.host_of(dbapi)
            self.owner[id(dbapi)] = host
            self.live[host] += 1

    def _gone(self, dbapi: Any) -> None:
        with self.lock:
            host = self.owner.pop(id(dbapi), None)
            if host is not None:
                self.live[host] -= 1

    def on_close(self, dbapi: Any, rec: Any) -> None:
        self._gone(dbapi)

    def on_close_invalid(self, dbapi: Any, rec: Any, exc: Any) -> None:
        self._gone(dbapi)

    def on_close_detached(self, dbapi: Any) -> None:
        self._gone(dbapi)


def run_variant(variant: str, cluster: Any, args: argparse.Namespace) -> dict[str, Any]:
    servers = cluster.servers[:3]
    port = servers[0].port
    hosts = "&".join(f"host={s.host}:{port}" for s in servers)
    url = f"postgresql+psycopg://app:app@/app?{hosts}&load_balance_hosts=random"
    app = f"failover-{variant}"
    kw: dict[str, Any] = {
        "pool_size": 12,
        "max_overflow": 0,
        "pool_pre_ping": not args.no_pre_ping,
        "connect_args": {"application_name": app},
    }
    if variant == OURS:
        kw.update(poolclass=RebalancingQueuePool, health_check_interval=1.0)
    else:
        kw.update(poolclass=QueuePool)
    engine = create_engine(url, **kw)
    tracker = Tracker(engine)
    stop = threading.Event()
    lock = threading.Lock()
    stopped_at = [float("inf")]
    failed_checkouts: list[str] = []
    in_flight: list[str] = []
    done = [0]

    def load() -> None:
        while not stop.is_set():
            checked_out = time.monotonic()
            try:
                conn = engine.connect()
            except Exception as err:
                with lock:
                    failed_checkouts.append(f"checkout: {err!r}"[:200])
                continue
            try:
                conn.execute(text("SELECT host(inet_server_addr())"))
                conn.execute(text("SELECT pg_sleep(0.002)"))
                with lock:
                    done[0] += 1
            except Exception as err:
                with lock:
                    if checked_out < stopped_at[0]:
                        in_flight.append(repr(err)[:200])
                    else:
                        failed_checkouts.append(f"statement: {err!r}"[:200])
            finally:
                # Closing rolls back, which fails on a connection whose server
                # died; that failure was counted above.
                with contextlib.suppress(Exception):
                    conn.close()

    threads = [threading.Thread(target=load) for _ in range(args.threads)]
    for t in threads:
        t.start()
    time.sleep(args.warmup)
    before = server_counts(servers, app)
    victim = servers[1]
    stop_called = time.monotonic()
    victim.stop("immediate")
    stopped_at[0] = time.monotonic()  # the server is gone from here on
    cleared = None
    while time.monotonic() - stop_called < args.down:
        with tracker.lock:
            live = tracker.live[victim.host]
        if cleared is None and live <= 0:
            cleared = time.monotonic() - stop_called
        time.sleep(0.02)
    during = server_counts(servers, app)
    victim.restart()
    time.sleep(args.after)
    after = server_counts(servers, app)
    stop.set()
    for t in threads:
        t.join()
    retired = {}
    if isinstance(engine.pool, RebalancingQueuePool):
        retired = {k: v for k, v in engine.pool.stats().retirements.items() if v}
    engine.dispose()
    return {
        "before": before,
        "during": during,
        "after": after,
        "cleared": cleared,
        "failed": failed_checkouts,
        "in_flight": in_flight,
        "done": done[0],
        "retired": retired,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--down", type=float, default=6.0, help="seconds the host stays down")
    parser.add_argument("--after", type=float, default=5.0, help="seconds watched after")
    parser.add_argument("--no-pre-ping", action="store_true", help="run without pool_pre_ping")
    parser.add_argument("--quick", action="store_true", help="short run for CI smoke tests")
    parser.add_argument("--check", action="store_true")
    parser.add_argument(
        "--check-timing",
        action="store_true",
        help="with --check, also exit 1 on a missed timing target (noisy on shared machines)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="  log: %(name)s: %(message)s")
    # SQLAlchemy logs a traceback for each connection it cannot reset after its
    # server died; the figures below count those failures already.
    logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)
    if args.quick:
        args.warmup, args.down, args.after = 1.0, 4.0, 4.0

    from sqla_rebalance.devservers import PostgresCluster

    results = {}
    with PostgresCluster(n=3) as cluster:
        for server in cluster.servers:
            ensure_loopback(server.url())
        print(
            f"failover: {args.threads} threads, pool_size=12 over 3 hosts, "
            f"pool_pre_ping={not args.no_pre_ping}; one host crashes for {args.down:.0f} s"
        )
        for variant in (BASELINE, OURS):
            cluster.ensure_running()
            results[variant] = r = run_variant(variant, cluster, args)
            print(f"\n[{variant}] {r['done']} transactions")
            for phase in ("before", "during", "after"):
                print(f"  connections per host {phase + ':':<8}{r[phase]}")
            if r["retired"]:
                print(f"  retirements by reason: {r['retired']}")
    rows = [
        ("failed checkouts", lambda r: str(len(r["failed"]))),
        ("statements in flight on the crashed server", lambda r: str(len(r["in_flight"]))),
        (
            "no connection to the dead host after",
            lambda r: "never" if r["cleared"] is None else f"{r['cleared']:.2f} s",
        ),
        ("spread during the outage (max/min)", lambda r: _spread(r["during"], skip_zero=True)),
        (f"spread {args.after:.0f} s after restart (max/min)", lambda r: _spread(r["after"])),
    ]
    print(f"\n{'':<46}{BASELINE:>14}{OURS:>14}")
    for label, fmt in rows:
        print(f"{label:<46}{fmt(results[BASELINE]):>14}{fmt(results[OURS]):>14}")
    print(
        "\nIn-flight statements died with their server; no pool can save them. After the "
        "restart QueuePool never moves a connection back; ours rebalances onto the host."
    )
    for variant, r in results.items():
        for err in r["failed"][:3]:
            print(f"  {variant} failed: {err}")
    if not args.check:
        return 0
    ours = results[OURS]
    problems = []  # promises: any machine
    slow = []  # timing targets: --check-timing
    if ours["failed"] and not args.no_pre_ping:
        problems.append(f"{len(ours['failed'])} failed checkouts")
    after = list(ours["after"].values())
    if max(after) - min(after) > 1:
        slow.append(f"not even {args.after:g} s after the restart: {ours['after']}")
    for p in problems:
        print(f"CHECK FAILED: {p}")
    for p in slow:
        print(f"TIMING TARGET MISSED: {p}")
    return 1 if problems or (slow and args.check_timing) else 0


def _spread(counts: dict[str, int], skip_zero: bool = False) -> str:
    values = [v for v in counts.values() if v or not skip_zero] or [0]
    return f"{max(values)}/{min(values)}"


if __name__ == "__main__":
    sys.exit(main())
