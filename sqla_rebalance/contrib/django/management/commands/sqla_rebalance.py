"""``manage.py sqla_rebalance recycle|rebalance|refresh|drain|status``.

The same commands as the ``sqla-rebalance`` CLI, with the bus and secret
taken from the project's ``SQLA_REBALANCE`` settings: an operator runs it
from any host of the deployment and every process with a pool on that bus
obeys, including the web workers, which the ``manage.py`` process itself
has no other way to reach.

Without ``BROADCAST`` there is nothing to publish on: the actions fail with
a clear error (they would reach only this ``manage.py`` process, which holds
no pools), and ``status`` shows this process's configuration and pools.

A thin front end of :mod:`sqla_rebalance.commands` (the command core of
``sqla-rebalance`` and ``flask rebalance`` too): it reads the buses and
secrets from the settings, and raises the core's failures as
``CommandError`` with its exit status as ``returncode``. Exit status: 0 done;
1 ``--wait`` ran out before every process applied the command; 2 bad
arguments (a ``--wait`` or ``--spread`` that is not a finite number of
seconds from 0 to 86400) or configuration (no bus, no secret), nothing
published; 3 bus unreachable.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from sqla_rebalance import commands as core
from sqla_rebalance.bus import Command as BusCommand
from sqla_rebalance.bus.listener import process_id
from sqla_rebalance.bus.message import ACTIONS
from sqla_rebalance.contrib.django import conf, pools
from sqla_rebalance.errors import ConfigurationError

STATUS = "status"


def _plain(text: str) -> str:
    """No style (Django colours stderr as errors on a terminal)."""
    return text


class Command(BaseCommand):  # type: ignore[misc]
    help = (
        "Cluster-wide commands to the sqla-rebalance pools of every process on the configured "
        "bus: recycle (replace connections gracefully), rebalance (move the excess off "
        "over-loaded hosts), refresh (re-resolve DNS, re-check hosts), drain (close every "
        "connection), status (live processes and their pools, from heartbeats; without a bus: "
        "this process)."
    )
    # A bus command must work when an unrelated check fails (that is when it is needed).
    requires_system_checks: list[str] = []  # noqa: RUF012

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("action", choices=[*ACTIONS, STATUS])
        parser.add_argument(
            "--pool", default="*", help="pool name or glob (default: every pool, '*')"
        )
        parser.add_argument(
            "--host", help="recycle: only the connections to this host (address:port or name)"
        )
        # --spread and --wait are checked by the command core (exit status 2 whether
        # run by manage.py or call_command, before anything is published).
        parser.add_argument(
            "--spread",
            default=None,
            metavar="SECONDS",
            help="recycle: seconds over which each process spreads its reconnects "
            "(default 0, at most 86400)",
        )
        parser.add_argument(
            "--rate",
            default=None,
            metavar="PER_SECOND",
            help="recycle, instead of --spread: at most this many new connections per second "
            "to each database host, fleet-wide (the spread is computed from fleet status)",
        )
        parser.add_argument(
            "--wait",
            nargs="?",
            const=30.0,
            default=None,
            metavar="SECONDS",
            help="wait until every live process with a matching pool has applied the command "
            "(default 30 s when given, at most 86400); exit status 1 if some have not",
        )
        parser.add_argument("--json", action="store_true", help="print JSON instead of text")
        parser.add_argument(
            "--database",
            metavar="ALIAS",
            help="use the bus of this database alias only (default: every configured bus)",
        )
        parser.add_argument("--bus", help="bus URL to use instead of SQLA_REBALANCE['BROADCAST']")
        parser.add_argument(
            "--secret-env",
            metavar="VAR",
            help="environment variable holding the signing secret (default: the "
            "SQLA_REBALANCE['SECRET_ENV'] setting); never taken on the command line",
        )
        parser.add_argument(
            "--unsigned",
            action="store_true",
            help="send without a signature (only pools configured without a secret accept it)",
        )

    # -- entry point -------------------------------------------------------
    def handle(self, *args: Any, **options: Any) -> None:
        try:
            self._handle(options)
        except core.CommandFailure as err:
            raise CommandError(err.message, returncode=err.code) from None
        except ConfigurationError as err:  # the settings, read when first needed
            raise CommandError(str(err), returncode=core.USAGE) from None

    def _handle(self, options: dict[str, Any]) -> None:
        action = options["action"]
        if action == STATUS:
            for name in ("host", "spread", "rate", "wait", "unsigned"):
                if options[name] not in (None, False):
                    raise core.CommandFailure(f"--{name} does not apply to status")
            targets = self._targets(options)
            if not targets:
                self._local_status(options)
                return
            core.status(
                targets,
                (options["pool"],),
                core.DJANGO,
                self.stdout.write,
                self.stderr.write,
                as_json=options["json"],
            )
            return
        # Every value is checked before anything else, and long before publishing.
        req = core.request(
            action,
            pools=(options["pool"],),
            host=options["host"],
            spread=options["spread"],
            rate=options.get("rate"),
            wait=options["wait"],
            unsigned=options["unsigned"],
            as_json=options["json"],
        )
        targets = self._targets(options)
        if not targets:
            raise core.CommandFailure(
                "no bus configured: set SQLA_REBALANCE['BROADCAST'] (e.g. 'redis://host:6379/0') "
                "so that the pools of every process listen for commands, or pass --bus URL. "
                f"Without a bus, '{action}' could only reach this manage.py process, which holds "
                "no pools."
            )
        # --wait's progress bar (a terminal) or lines, on stderr: stdout keeps the result.
        progress = core.ProgressPrinter(
            lambda text: self.stderr.write(text, style_func=_plain, ending=""),
            tty=self.stderr.isatty(),
            flush=self.stderr.flush,
            as_json=options["json"],
        )
        if core.send(req, targets, core.DJANGO, self.stdout.write, progress) == core.INCOMPLETE:
            raise CommandError(
                f"not every live process with a pool matching {options['pool']!r} applied "
                f"the command within {req.wait:g} s",
                returncode=core.INCOMPLETE,
            )

    # -- which buses -------------------------------------------------------
    def _targets(self, options: dict[str, Any]) -> list[core.Target]:
        """Every distinct bus (and secret) of the pooled aliases and the top level."""
        cfg = conf.get_settings()
        alias = options["database"]
        if alias is not None and alias not in settings.DATABASES:
            raise core.CommandFailure(f"--database {alias}: no such alias in settings.DATABASES")
        secret_env = options["secret_env"]
        if options["bus"]:
            source = cfg.for_alias(alias) if alias is not None else cfg.top
            return [self._target(options["bus"], source, secret_env)]
        # Every pooled alias, and the top level (aliases made at run time use it).
        configs = (
            [cfg.for_alias(alias)]
            if alias is not None
            else [*(cfg.aliases[a] for a in cfg.pooled), cfg.top]
        )
        grouped: dict[tuple[str, Any], core.Target] = {}
        for config in configs:
            if config.broadcast is None:
                continue
            target = self._target(config.broadcast, config, secret_env)
            grouped.setdefault((repr(config.broadcast), target.secret), target)
        return list(grouped.values())

    @staticmethod
    def _target(bus: Any, config: conf.AliasConfig, secret_env: str | None) -> core.Target:
        env = secret_env or config.secret_env
        return core.Target(
            bus,
            config.secret(secret_env),
            no_secret=f"${env} is not set: set it to the pools' secret (the one their "
            "processes read), or pass --unsigned for pools configured without one",
        )

    # -- status without a bus ----------------------------------------------
    def _local_status(self, options: dict[str, Any]) -> None:
        cfg = conf.get_settings()
        live = pools.all_pools()
        entries: list[dict[str, Any]] = []
        aliases = [options["database"]] if options["database"] else list(cfg.pooled)
        for alias in aliases:
            config = cfg.for_alias(alias)
            pool = live.get(alias)
            if pool is not None and not BusCommand(action="recycle", pool=options["pool"]).matches(
                pool.pool_name
            ):
                continue
            entries.append(
                {
                    "alias": alias,
                    "pool": config.pool_name,
                    "created": pool is not None,
                    "stats": pool.stats().as_dict() if pool is not None else None,
                }
            )
        if options["json"]:
            out = {"mode": "local", "process": process_id(), "pools": entries}
            self.stdout.write(json.dumps(out, indent=2, default=str))
            return
        self.stdout.write(
            "no bus configured (SQLA_REBALANCE['BROADCAST']): showing this process only, "
            f"{process_id()}"
        )
        if not entries:
            self.stdout.write("  no database uses a sqla_rebalance backend")
        for entry in entries:
            stats = entry["stats"]
            if stats is None:
                self.stdout.write(
                    f"  {entry['alias']} (pool {entry['pool']}): no pool yet "
                    "(created at the alias's first connection)"
                )
                continue
            self.stdout.write(
                f"  {entry['alias']} (pool {entry['pool']}): open {stats['open']} "
                f"(idle {stats['idle']}, in use {stats['in_use']}), connects {stats['connects']}"
            )
            for key, host in sorted(stats["hosts"].items()):
                self.stdout.write(
                    f"    {key:<24} open {host['open']} idle {host['idle']} "
                    f"in use {host['in_use']}  {host['health']} {host['role']}"
                )
