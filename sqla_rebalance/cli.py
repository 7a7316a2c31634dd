"""The ``sqla-rebalance`` command (also ``python -m sqla_rebalance``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from . import __version__, commands
from .bus.base import redact
from .bus.message import ACTIONS
from .bus.report import ACTION_HELP, check_seconds, check_spread, check_wait
from .pool import SECRET_ENV

#: Default bus URL of the commands.
BUS_ENV = "SQLA_REBALANCE_BUS"

__all__ = ["main"]


def _number(check: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type from one of report.py's checks: a bad number is a usage error
    (exit 2, with the usage line), whatever the front end."""

    def convert(text: str) -> float:
        try:
            return check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = "seconds"  # argparse names the type in some messages
    return convert


def _positive(option: str) -> Callable[[str], float]:
    def check(text: str) -> float:
        value = check_seconds(text, option)
        if value <= 0:
            raise ValueError(f"{option} must be positive, got {text!r}")
        return value

    return _number(check)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sqla-rebalance",
        allow_abbrev=False,
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
        "host is added (25%), one host goes down (50%) and comes back (75%); then a "
        "cluster-wide recycle is sent by this CLI, from another process, over an embedded bus "
        "(a SQLite file). The hosts are "
        "SQLite files in temporary directories (default, no server needed), or with --postgres "
        "four local PostgreSQL servers started with sqla_rebalance.devservers (needs the "
        "PostgreSQL server programs). "
        "--url runs the single-database demo (no hosts) on that database.",
    )
    demo.add_argument(
        "--duration", type=_positive("--duration"), default=16.0, help="seconds to run (default 16)"
    )
    demo.add_argument("--threads", type=int, default=4, help="worker threads (default 4)")
    demo.add_argument(
        "--pool-size",
        type=int,
        default=12,
        help="pool_size and min_size with hosts (default 12); with --url: --threads",
    )
    demo.add_argument(
        "--recycle",
        type=_positive("--recycle"),
        default=4.0,
        help="pool_recycle in seconds (default 4)",
    )
    demo.add_argument(
        "--jitter",
        type=_number(lambda text: check_seconds(text, "--jitter", 1.0)),
        default=0.5,
        help="recycle_jitter, 0 to 1 (default 0.5)",
    )
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
        "server programs and psycopg)",
    )
    where.add_argument("--url", help="one database, no hosts: the single-database demo")
    _bus_commands(sub)
    return parser


def _bus_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bus",
        default=os.environ.get(BUS_ENV),
        help=f"bus URL: redis://..., postgresql://..., sqlite:///path (default ${BUS_ENV})",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _bus_commands(sub: Any) -> None:
    for action in ACTIONS:
        # No abbreviations: "--secret S" must be an error, not "--secret-env S".
        p = sub.add_parser(
            action,
            help=ACTION_HELP[action],
            description=ACTION_HELP[action],
            allow_abbrev=False,
        )
        _bus_options(p)
        p.add_argument("--pool", default="*", help="pool name or glob (default: every pool, '*')")
        if action == "recycle":
            p.add_argument(
                "--host", help="only the connections to this host (address:port or name)"
            )
            p.add_argument(
                "--spread",
                type=_number(check_spread),
                default=None,
                help="seconds over which each process spreads its reconnects (default 0)",
            )
            p.add_argument(
                "--rate",
                type=_number(commands.check_rate),
                default=None,
                metavar="PER_SECOND",
                help="instead of --spread: at most this many new connections per second to "
                "each database host, fleet-wide (the spread is computed from fleet status)",
            )
        p.add_argument(
            "--secret-env",
            default=SECRET_ENV,
            metavar="VAR",
            help=f"environment variable holding the signing secret (default {SECRET_ENV}); "
            "the secret is never taken on the command line",
        )
        p.add_argument(
            "--unsigned",
            action="store_true",
            help="send without a signature (only pools configured without a secret accept it)",
        )
        p.add_argument(
            "--wait",
            nargs="?",
            type=_number(check_wait),
            const=30.0,
            default=None,
            metavar="SECONDS",
            help="wait until every live process with a matching pool has applied the "
            "command (default 30 s when given); exit status 1 if some have not",
        )
    status = sub.add_parser(
        "status",
        allow_abbrev=False,
        help="every live process on the bus: pools, hosts, connections, generation applied",
        description="Show every live process listening on the bus (from their heartbeats): "
        "its pools with connection counts per host, churn and the command generation applied.",
    )
    _bus_options(status)
    status.add_argument("--pool", default="*", help="only pools matching this name or glob")


def _fail(message: str) -> None:
    """An error on stderr (the core has masked every password in it)."""
    print(f"sqla-rebalance: {redact(message)}", file=sys.stderr)


def _echo(line: str) -> None:
    print(line)


def _bus_command(args: argparse.Namespace) -> int:
    """``recycle|rebalance|refresh|drain|status``: the command core's flow, on one bus."""
    if not args.bus:
        _fail(f"--bus URL is required (or set ${BUS_ENV})")
        return commands.USAGE
    try:
        if args.command == "status":
            target = commands.Target(args.bus, pools=(args.pool,))
            return commands.status([target], (), commands.CLI, _echo, _fail, as_json=args.json)
        req = commands.request(
            args.command,
            pools=(args.pool,),
            host=getattr(args, "host", None),
            spread=getattr(args, "spread", None),
            rate=getattr(args, "rate", None),
            wait=args.wait,
            unsigned=args.unsigned,
            as_json=args.json,
        )
        secret = None if args.unsigned else (os.environ.get(args.secret_env) or None)
        target = commands.Target(
            args.bus,
            secret,
            no_secret=f"${args.secret_env} is not set: set it to the pools' broadcast_secret, "
            "or pass --unsigned for pools configured without one",
        )
        progress = commands.ProgressPrinter.on(sys.stderr, as_json=args.json)
        return commands.send(req, [target], commands.CLI, _echo, progress)
    except commands.CommandFailure as err:
        _fail(err.message)
        return err.code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    else:  # the pool's warnings (a host down, up again), lined up with the demo's lines
        logging.basicConfig(level=logging.WARNING, format="          %(levelname)-8s %(message)s")
    if args.command in (*ACTIONS, "status"):
        return _bus_command(args)
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
