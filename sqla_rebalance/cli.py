"""The ``sqla-rebalance`` command (also ``python -m sqla_rebalance``)."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sqla-rebalance",
        description="SQLAlchemy connection pools that behave well in front of database clusters.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run a small workload and watch the pool rotate connections over hosts",
        description="Run a multi-threaded workload through a RebalancingQueuePool spread over "
        "several hosts and print every connection it opens and retires. Over the run a 4th "
        "host is added (25%), one host goes down (50%) and comes back (75%). The hosts are "
        "SQLite files in temporary directories (default, no server needed), or with --postgres "
        "four local PostgreSQL servers started from the repository's tests/servers.py. "
        "--url runs the single-database demo (no hosts) on that database.",
    )
    demo.add_argument("--duration", type=float, default=16.0, help="seconds to run (default 16)")
    demo.add_argument("--threads", type=int, default=4, help="worker threads (default 4)")
    demo.add_argument(
        "--pool-size",
        type=int,
        default=12,
        help="pool_size and min_size with hosts (default 12); with --url: --threads",
    )
    demo.add_argument(
        "--recycle", type=float, default=4.0, help="pool_recycle in seconds (default 4)"
    )
    demo.add_argument("--jitter", type=float, default=0.5, help="recycle_jitter (default 0.5)")
    where = demo.add_mutually_exclusive_group()
    where.add_argument(
        "--sqlite",
        dest="mode",
        action="store_const",
        const="sqlite",
        help="hosts are SQLite files (the default)",
    )
    where.add_argument(
        "--postgres",
        dest="mode",
        action="store_const",
        const="postgres",
        help="hosts are four local PostgreSQL servers on 127.0.0.2-5 (needs the PostgreSQL "
        "server programs, psycopg, and the repository checkout)",
    )
    where.add_argument("--url", help="one database, no hosts: the single-database demo")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    else:  # the pool's warnings (a host down, up again), lined up with the demo's lines
        logging.basicConfig(level=logging.WARNING, format="          %(levelname)-8s %(message)s")
    if args.command == "demo":
        from .demo import DemoUnavailableError, run_demo

        if args.duration <= 0 or args.threads <= 0 or args.pool_size <= 0:
            print(
                "sqla-rebalance: --duration, --threads and --pool-size must be positive",
                file=sys.stderr,
            )
            return 2
        try:
            run_demo(
                duration=args.duration,
                threads=args.threads,
                recycle=args.recycle,
                jitter=args.jitter,
                url=args.url,
                mode=args.mode or "sqlite",
                pool_size=args.pool_size,
            )
        except DemoUnavailableError as err:
            print(f"sqla-rebalance: {err}", file=sys.stderr)
            return 2
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
