"""``python -m sqla_rebalance.devservers KIND``: start one kind of server and keep it up."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from typing import Any

from ._cluster import _Cluster
from .dns import DnsServer
from .mariadb import MariaDBCluster
from .postgres import PostgresCluster, PostgresReplicaPair
from .redis import RedisServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sqla_rebalance.devservers",
        description="Start test servers on loopback addresses and keep them up until interrupted.",
    )
    parser.add_argument(
        "kind",
        nargs="?",
        default="postgres",
        choices=["postgres", "replica", "mariadb", "redis", "dns"],
        help="postgres (default): PostgreSQL on 127.0.0.2...; replica: PostgreSQL primary "
        "127.0.0.8 + standby 127.0.0.9; mariadb: MariaDB on 127.0.0.12...; redis, dns: 127.0.0.1",
    )
    parser.add_argument(
        "-n", type=int, default=None, help="number of servers (postgres: 4, mariadb: 2)"
    )
    parser.add_argument("--port", type=int, default=None, help="port (default: env or free)")
    parser.add_argument("--base-dir", default=None, help="data directory (default: temporary)")
    parser.add_argument(
        "--record",
        action="append",
        default=[],
        metavar="NAME=ADDR[,ADDR]",
        help="dns: serve these records (repeatable)",
    )
    args = parser.parse_args(argv)
    # Stop cleanly on kill, from now on: a SIGTERM as soon as the lines are out (or while the
    # servers start) must still stop them and remove their data.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        lines: list[str] = []
        if args.kind in {"postgres", "mariadb", "replica"}:
            cluster: _Cluster[Any]
            if args.kind == "postgres":
                cluster = PostgresCluster(n=args.n or 4, base_dir=args.base_dir, port=args.port)
            elif args.kind == "mariadb":
                cluster = MariaDBCluster(n=args.n or 2, base_dir=args.base_dir, port=args.port)
            else:
                cluster = PostgresReplicaPair(base_dir=args.base_dir, port=args.port)
            stack.enter_context(cluster)
            lines += [f"  {s.url()}    log: {s.logfile}" for s in cluster.servers]
        elif args.kind == "redis":
            redis = stack.enter_context(RedisServer(args.port, directory=args.base_dir))
            lines.append(f"  {redis.url()}    log: {redis.logfile}")
        else:
            dns = stack.enter_context(DnsServer(args.port, directory=args.base_dir))
            for record in args.record:
                name, _, addresses = record.partition("=")
                dns.set(name, [a for a in addresses.split(",") if a])
            lines.append(f"  nameserver {dns.nameserver}    hosts: {dns.hosts_file}")
            lines.append(f"  log: {dns.logfile}")
            lines.append(f"  dig @{dns.host} -p {dns.port} NAME.{dns.domain}")
        print(f"{args.kind} up in {time.monotonic() - began:.2f}s:", flush=True)
        print("\n".join(lines), flush=True)
        print("Ctrl-C to stop.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0
