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
        help="run a small workload and watch the pool replace connections",
        description="Run a multi-threaded workload through a RebalancingQueuePool and print "
        "every connection it opens and retires. "
        "Uses a temporary SQLite file unless --url is given.",
    )
    demo.add_argument("--duration", type=float, default=12.0, help="seconds to run (default 12)")
    demo.add_argument("--threads", type=int, default=4, help="worker threads (default 4)")
    demo.add_argument(
        "--recycle", type=float, default=4.0, help="pool_recycle in seconds (default 4)"
    )
    demo.add_argument("--jitter", type=float, default=0.5, help="recycle_jitter (default 0.5)")
    demo.add_argument("--url", help="database URL (default: a temporary SQLite file)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "demo":
        from .demo import run_demo

        if args.duration <= 0 or args.threads <= 0:
            print("sqla-rebalance: --duration and --threads must be positive", file=sys.stderr)
            return 2
        run_demo(
            duration=args.duration,
            threads=args.threads,
            recycle=args.recycle,
            jitter=args.jitter,
            url=args.url,
        )
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
