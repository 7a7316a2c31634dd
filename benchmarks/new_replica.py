"""A replica added to DNS: does it get traffic?

Four PostgreSQL servers run on 127.0.0.2-5 and a real dnsmasq serves a name
(TTL 1 s) that first resolves to the first three. ``--processes`` OS
processes each hold one engine (``pool_size=12, max_overflow=0``) and run a
steady load (12 threads: check out, ``SELECT 1``, check in, think 1-3 ms).
After warm-up the fourth address is added to the name. Both variants run in
one invocation, one after the other:

- ``queuepool``: plain ``QueuePool`` on psycopg's multi-host URL with
  ``load_balance_hosts=random`` over the three addresses the name had at
  start-up. libpq cannot use our dnsmasq, and a long-lived ``QueuePool``
  never connects again anyway: it is what such a pool sees, for ever.
- ``rebalance``: ``RebalancingQueuePool`` on the DNS name itself
  (``dns_nameservers`` = the dnsmasq, ``dns_min_refresh=0.5``, defaults
  otherwise: ``rebalance_spread=1``).

Connections per host are counted on the servers (``pg_stat_activity`` by
``application_name``), every 100 ms. Printed per variant: the spread before
the change (max/min per host), the time from the DNS change until the new
host holds >= 90 % of its even share, and the connections moved against the
minimum ``sum(max(0, count - share))``.

Usage::

    .venv/bin/python benchmarks/new_replica.py [--processes 4] [--pool-size 12]
        [--window 10] [--quick] [--check]

``--check`` exits 1 if ``rebalance`` misses a target: the new host's share
within TTL + 2 s, moves <= minimum + hosts, no error.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import random
import sys
import threading
import time
from typing import Any

from _support import BASELINE, OURS, ensure_loopback, server_counts
from sqlalchemy import create_engine, text
from sqlalchemy.pool import QueuePool

from sqla_rebalance import RebalancingQueuePool

TTL = 1.0


def worker(
    variant: str, url: str, nameserver: str, pool_size: int, app: str, ctl: Any, out: Any
) -> None:
    """One application process: an engine, a load, then its figures."""
    kw: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": 0,
        "connect_args": {"application_name": app},
    }
    if variant == OURS:
        kw.update(poolclass=RebalancingQueuePool, dns_nameservers=[nameserver], dns_min_refresh=0.5)
    else:
        kw.update(poolclass=QueuePool)
    engine = create_engine(url, **kw)
    stop = threading.Event()
    errors: list[str] = []

    def load(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
            except Exception as err:
                errors.append(repr(err)[:200])
            stop.wait(rng.uniform(0.001, 0.003))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(pool_size)]
    for t in threads:
        t.start()
    ctl.get()  # wait for "stop"
    stop.set()
    for t in threads:
        t.join()
    retired = {}
    if isinstance(engine.pool, RebalancingQueuePool):
        retired = {k: v for k, v in engine.pool.stats().retirements.items() if v}
    engine.dispose()
    out.put({"errors": errors, "retired": retired})


def run_variant(variant: str, cluster: Any, dns: Any, args: argparse.Namespace) -> dict[str, Any]:
    servers = cluster.servers
    addresses = [s.host for s in servers]
    port = servers[0].port
    name = dns.new_name("replicas")
    dns.set(name, addresses[:3])
    if variant == OURS:
        url = f"postgresql+psycopg://app:app@{name}:{port}/app"
    else:
        hosts = "&".join(f"host={a}:{port}" for a in addresses[:3])
        url = f"postgresql+psycopg://app:app@/app?{hosts}&load_balance_hosts=random"
    app = f"new-replica-{variant}"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    ctls = []
    procs = []
    for _ in range(args.processes):
        ctl = ctx.Queue()
        p = ctx.Process(
            target=worker, args=(variant, url, dns.nameserver, args.pool_size, app, ctl, out)
        )
        p.start()
        ctls.append(ctl)
        procs.append(p)
    total = args.processes * args.pool_size
    deadline = time.monotonic() + 60
    while sum(server_counts(servers, app).values()) < total:
        if time.monotonic() > deadline:
            raise SystemExit(f"{variant}: the pools did not fill up")
        time.sleep(0.1)
    time.sleep(args.warmup)
    before = server_counts(servers, app)
    share = total // len(servers)
    minimum = sum(max(0, n - share) for n in before.values())
    dns.set(name, addresses)
    changed = time.monotonic()
    reached = None
    after = before
    while time.monotonic() - changed < args.window:
        after = server_counts(servers, app)
        if reached is None and after[addresses[3]] >= 0.9 * share:
            reached = time.monotonic() - changed
            if variant == OURS:
                time.sleep(2.0)  # let the last moves finish before counting
                after = server_counts(servers, app)
                break
        time.sleep(0.1)
    for ctl in ctls:
        ctl.put("stop")
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    errors = [e for r in results for e in r["errors"]]
    moved = sum(
        r["retired"].get(k, 0) for r in results for k in ("rebalance", "host_removed", "host_down")
    )
    dns.remove(name)
    return {
        "before": before,
        "after": after,
        "reached": reached,
        "moved": moved,
        "minimum": minimum,
        "errors": errors,
        "retired": [r["retired"] for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--pool-size", type=int, default=12)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--window", type=float, default=10.0, help="seconds watched after")
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
        args.warmup, args.window = 1.0, 6.0

    from sqla_rebalance.devservers import DnsServer, PostgresCluster

    results = {}
    with PostgresCluster(n=4) as cluster, DnsServer(ttl=int(TTL)) as dns:
        for server in cluster.servers:
            ensure_loopback(server.url())
        print(
            f"new_replica: {args.processes} processes x pool_size={args.pool_size} over 3 hosts; "
            f"a 4th address is added to a DNS name (TTL {TTL:.0f} s) after warm-up"
        )
        for variant in (BASELINE, OURS):
            results[variant] = r = run_variant(variant, cluster, dns, args)
            print(f"\n[{variant}]")
            print(f"  connections per host before: {r['before']}")
            print(f"  connections per host after:  {r['after']}")
    share = args.processes * args.pool_size // 4
    rows = [
        ("spread before (max/min per host)", lambda r: _spread(r["before"], 3)),
        (
            f"new host at >= 90 % of its share ({share})",
            lambda r: "never" if r["reached"] is None else f"{r['reached']:.2f} s",
        ),
        ("connections moved / minimum", lambda r: f"{r['moved']} / {r['minimum']}"),
        ("spread after (max/min per host)", lambda r: _spread(r["after"], 4)),
        ("checkout errors", lambda r: str(len(r["errors"]))),
    ]
    print(f"\n{'':<44}{BASELINE:>14}{OURS:>14}")
    for label, fmt in rows:
        print(f"{label:<44}{fmt(results[BASELINE]):>14}{fmt(results[OURS]):>14}")
    print(
        f"\n{BASELINE}: libpq load_balance_hosts=random over the start-up addresses; a "
        "long-lived QueuePool never reconnects, so the new host gets nothing until a recycle."
    )
    for r in results.values():
        for err in r["errors"][:3]:
            print(f"  error: {err}")
    if not args.check:
        return 0
    ours = results[OURS]
    problems = []  # promises: any machine
    slow = []  # timing targets: --check-timing
    if ours["reached"] is None:
        problems.append("the new host never got its share")
    elif ours["reached"] > TTL + 2.0:
        slow.append(f"new host's share not reached within TTL + 2 s ({ours['reached']})")
    if ours["moved"] > ours["minimum"] + 4:
        problems.append(f"moved {ours['moved']} > minimum {ours['minimum']} + 4")
    if ours["errors"]:
        problems.append(f"{len(ours['errors'])} checkout errors")
    for p in problems:
        print(f"CHECK FAILED: {p}")
    for p in slow:
        print(f"TIMING TARGET MISSED: {p}")
    return 1 if problems or (slow and args.check_timing) else 0


def _spread(counts: dict[str, int], hosts: int) -> str:
    values = sorted(counts.values(), reverse=True)[:hosts] if hosts == 3 else counts.values()
    return f"{max(values)}/{min(values)}"


if __name__ == "__main__":
    sys.exit(main())
