"""``manage.py sqla_rebalance recycle|rebalance|refresh|drain|status``.

The same commands as the ``sqla-rebalance`` CLI, with the bus and secret
taken from the project's ``SQLA_REBALANCE`` settings: an operator runs it
from any host of the deployment and every process with a pool on that bus
obeys, including the web workers, which the ``manage.py`` process itself
has no other way to reach.

Without ``BROADCAST`` there is nothing to publish on: the actions fail with
a clear error (they would reach only this ``manage.py`` process, which holds
no pools), and ``status`` shows this process's configuration and pools.

Exit status: 0 done; 1 ``--wait`` ran out before every process applied the
command; 2 bad arguments or configuration (no bus, no secret); 3 bus
unreachable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from sqla_rebalance import bus as bus_api
from sqla_rebalance.bus.base import redact
from sqla_rebalance.bus.listener import process_id
from sqla_rebalance.bus.message import ACTIONS
from sqla_rebalance.bus.report import process_lines, sent_line, sent_record, wait_lines
from sqla_rebalance.contrib.django import conf, pools
from sqla_rebalance.errors import ConfigurationError

STATUS = "status"


@dataclass(frozen=True)
class _Target:
    """One bus to publish on, with the secret its pools check."""

    url: Any
    secret: str | bytes | None
    aliases: tuple[str, ...]

    @property
    def display(self) -> str:
        return redact(self.url) if isinstance(self.url, str) else str(self.url)


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
        parser.add_argument(
            "--spread",
            type=float,
            default=None,
            help="recycle: seconds over which each process spreads its reconnects (default 0)",
        )
        parser.add_argument(
            "--wait",
            nargs="?",
            type=float,
            const=30.0,
            default=None,
            metavar="SECONDS",
            help="wait until every live process with a matching pool has applied the command "
            "(default 30 s when given); exit status 1 if some have not",
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
        action = options["action"]
        if action == STATUS:
            for name in ("host", "spread", "wait", "unsigned"):
                if options[name] not in (None, False):
                    raise CommandError(f"--{name} does not apply to status", returncode=2)
        elif action != "recycle":
            # The other actions apply to whole pools (the bus rejects a host for them).
            for name in ("host", "spread"):
                if options[name] is not None:
                    raise CommandError(f"--{name} applies to recycle only", returncode=2)
        try:
            targets = self._targets(options)
        except ConfigurationError as err:
            raise CommandError(str(err), returncode=2) from err
        if action == STATUS:
            if targets:
                self._bus_status(targets, options)
            else:
                self._local_status(options)
            return
        if not targets:
            raise CommandError(
                "no bus configured: set SQLA_REBALANCE['BROADCAST'] (e.g. 'redis://host:6379/0') "
                "so that the pools of every process listen for commands, or pass --bus URL. "
                f"Without a bus, '{action}' could only reach this manage.py process, which holds "
                "no pools.",
                returncode=2,
            )
        self._send(action, targets, options)

    # -- which buses -------------------------------------------------------
    def _targets(self, options: dict[str, Any]) -> list[_Target]:
        cfg = conf.get_settings()
        alias = options["database"]
        if alias is not None and alias not in settings.DATABASES:
            raise ConfigurationError(f"--database {alias}: no such alias in settings.DATABASES")
        secret_env = options["secret_env"]
        if options["bus"]:
            source = cfg.for_alias(alias) if alias is not None else cfg.top
            return [_Target(options["bus"], source.secret(secret_env), ())]
        # Every pooled alias, and the top level (aliases made at run time use it).
        configs = (
            [cfg.for_alias(alias)]
            if alias is not None
            else [
                *(cfg.aliases[a] for a in cfg.pooled),
                cfg.top,
            ]
        )
        grouped: dict[tuple[str, Any], list[str]] = {}
        objects: dict[tuple[str, Any], Any] = {}
        for config in configs:
            if config.broadcast is None:
                continue
            secret = config.secret(secret_env)
            key = (repr(config.broadcast), secret)
            objects[key] = config.broadcast
            names = grouped.setdefault(key, [])
            if config is not cfg.top and config.alias not in names:
                names.append(config.alias)
        return [_Target(objects[key], key[1], tuple(names)) for key, names in grouped.items()]

    # -- actions -----------------------------------------------------------
    def _send(self, action: str, targets: list[_Target], options: dict[str, Any]) -> None:
        # Every secret first: a command must reach all the buses or none.
        if not options["unsigned"]:
            for target in targets:
                if target.secret is None:
                    env = (
                        options["secret_env"]
                        or conf.for_alias(
                            target.aliases[0] if target.aliases else "default"
                        ).secret_env
                    )
                    raise CommandError(
                        f"${env} is not set: set it to the pools' secret (the one their "
                        "processes read), or pass --unsigned for pools configured without one",
                        returncode=2,
                    )
        results: list[dict[str, Any]] = []
        incomplete = False
        for target in targets:
            secret = None if options["unsigned"] else target.secret
            try:
                sent = bus_api.send_command(
                    target.url,
                    action,
                    pool=options["pool"],
                    host=options["host"],
                    spread=options["spread"] or 0.0,
                    secret=secret,
                )
            except (ValueError, ConfigurationError) as err:
                raise CommandError(str(err), returncode=2) from err
            except bus_api.BusUnavailableError as err:
                raise CommandError(
                    f"cannot publish on {target.display}: {err}", returncode=3
                ) from err
            result = sent_record(sent, bus=target.display)
            if not options["json"]:
                self.stdout.write(sent_line(sent, where=target.display))
            if options["wait"] is not None:
                try:
                    waited = bus_api.wait_for(
                        target.url, sent.generation, pool=options["pool"], timeout=options["wait"]
                    )
                except bus_api.BusUnavailableError as err:
                    raise CommandError(
                        f"cannot read status from {target.display}: {err}", returncode=3
                    ) from err
                result = sent_record(sent, waited, bus=target.display)
                incomplete |= not waited.complete
                if not options["json"]:
                    for line in wait_lines(waited, options["pool"]):
                        self.stdout.write(f"  {line}")
            results.append(result)
        if options["json"]:
            self.stdout.write(json.dumps({"buses": results}, indent=2))
        if incomplete:
            raise CommandError(
                f"not every live process with a pool matching {options['pool']!r} applied "
                f"the command within {options['wait']} s",
                returncode=1,
            )

    def _bus_status(self, targets: list[_Target], options: dict[str, Any]) -> None:
        buses: list[dict[str, Any]] = []
        for target in targets:
            try:
                procs = [p for p in bus_api.fleet_status(target.url) if p.has_pool(options["pool"])]
            except bus_api.BusUnavailableError as err:
                raise CommandError(
                    f"cannot read status from {target.display}: {err}", returncode=3
                ) from err
            buses.append({"bus": target.display, "processes": [p.raw for p in procs]})
            if options["json"]:
                continue
            self.stdout.write(f"bus {target.display}: {len(procs)} live process(es)")
            for proc in procs:
                for line in process_lines(proc):
                    self.stdout.write(f"  {line}")
        if options["json"]:
            self.stdout.write(json.dumps({"mode": "bus", "buses": buses}, indent=2))

    def _local_status(self, options: dict[str, Any]) -> None:
        cfg = conf.get_settings()
        live = pools.all_pools()
        entries: list[dict[str, Any]] = []
        aliases = [options["database"]] if options["database"] else list(cfg.pooled)
        for alias in aliases:
            config = cfg.for_alias(alias)
            pool = live.get(alias)
            if pool is not None and not bus_api.Command(
                action="recycle", pool=options["pool"]
            ).matches(pool.pool_name):
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
