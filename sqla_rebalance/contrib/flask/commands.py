"""The ``flask rebalance`` commands: ``recycle``, ``rebalance``, ``refresh``,
``drain`` and ``status``, for the pools of this app.

A thin front end of :mod:`sqla_rebalance.commands`: it reads the app's buses,
secrets and pool names, and maps the core's exit statuses to click's (2 for
usage and configuration, 3 for the bus, 1 when ``--wait`` runs out).
``status`` without a bus (or with ``--local``) shows this process's own pools.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup
from sqlalchemy.engine import Engine

from ... import commands as core
from ...bus import Bus
from ...bus.listener import process_id
from ...bus.message import ACTIONS
from ...bus.report import ACTION_HELP, check_spread, check_wait
from ...pool import SECRET_ENV, RebalancingQueuePool
from .plans import FSA_KEY, AppState, app_state

__all__ = ["cli"]

_NO_BUS = (
    "no bus configured: set SQLA_REBALANCE_BROADCAST (redis://..., postgresql://... or "
    "sqlite:///path) in the app config. Commands reach the app's processes through that bus; "
    "this CLI process serves no requests, so acting on its own pools would change nothing."
)


class _Fail(click.ClickException):
    """A usage or configuration problem: ``Error: ...``, exit status 2."""

    exit_code = core.USAGE


class _BusFail(_Fail):
    """The bus failed: exit status 3."""

    exit_code = core.BUS_ERROR


def _run(call: Callable[[], int]) -> None:
    """Run a flow of the core; its exit status becomes click's."""
    try:
        code = call()
    except core.CommandFailure as err:
        raise (_BusFail if err.code == core.BUS_ERROR else _Fail)(err.message) from None
    if code:
        raise click.exceptions.Exit(code)


def _seconds(check: Callable[[Any], float]) -> Callable[..., float | None]:
    """An option callback from the core's checks (``--wait``, ``--spread``): a bad
    number is a usage error (exit 2) before anything is sent."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> float | None:
        if value is None:
            return None
        try:
            return check(value)
        except ValueError as err:
            raise click.BadParameter(str(err), ctx, param) from None

    return callback


def _targets(state: AppState) -> list[core.Target]:
    """Each bus of the app's pools, its secret (else ``$SQLA_REBALANCE_SECRET``) and pools."""
    grouped: dict[tuple[str, str | bytes | None], tuple[str | Bus, set[str]]] = {}
    for plan in state.managed_plans():
        bus = plan.bus
        if bus is None:
            continue
        key = (bus if isinstance(bus, str) else bus.key, plan.bus_secret)
        grouped.setdefault(key, (bus, set()))[1].add(plan.pool_name)
    targets = []
    for (_, secret), (bus, names) in grouped.items():
        shown = core.bus_display(bus)
        targets.append(
            core.Target(
                bus,
                secret or os.environ.get(SECRET_ENV) or None,
                tuple(sorted(names)),
                no_secret=f"no secret to sign with for {shown}: set SQLA_REBALANCE_SECRET in "
                f"the app config or ${SECRET_ENV} (the pools' broadcast_secret), or pass "
                "--unsigned for pools configured without one",
            )
        )
    return targets


def _send(action: str, pool: tuple[str, ...], **values: Any) -> None:
    targets = _targets(app_state(current_app))
    if not targets:
        raise _Fail(_NO_BUS)
    # --wait's progress bar (a terminal) or lines, on stderr: stdout keeps the result.
    progress = core.ProgressPrinter.on(sys.stderr, as_json=bool(values.get("as_json")))
    _run(
        lambda: core.send(
            core.request(action, pools=pool, **values), targets, core.FLASK, click.echo, progress
        )
    )


def _action_command(action: str) -> click.Command:
    def run(**kwargs: Any) -> None:
        _send(action, **kwargs)

    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option(
            "--pool",
            multiple=True,
            metavar="NAME",
            help="pool name or glob; repeat for several (default: every pool this app "
            "configures; '*' is every pool on the bus)",
        )
    ]
    if action == "recycle":
        options.append(
            click.option("--host", default=None, help="only the connections to this host")
        )
        options.append(
            click.option(
                "--spread",
                type=click.STRING,
                callback=_seconds(check_spread),
                default=None,
                metavar="SECONDS",
                help="seconds over which each process spreads its reconnects (0 to 86400; "
                "default 0)",
            )
        )
        options.append(
            click.option(
                "--rate",
                type=click.STRING,
                callback=_seconds(core.check_rate),
                default=None,
                metavar="PER_SECOND",
                help="instead of --spread: at most this many new connections per second to "
                "each database host, fleet-wide (the spread is computed from fleet status)",
            )
        )
    options += [
        click.option(
            "--wait",
            type=click.STRING,
            callback=_seconds(check_wait),
            is_flag=False,
            flag_value="30",
            default=None,
            metavar="[SECONDS]",
            help="wait until every live process with a matching pool has applied it "
            "(30 s when given without a value, 0 to 86400); exit status 1 if some have not",
        ),
        click.option(
            "--unsigned",
            is_flag=True,
            help="send without a signature (only pools configured without a secret accept it)",
        ),
        click.option("--json", "as_json", is_flag=True, help="print JSON instead of text"),
    ]
    func: Callable[..., Any] = run
    for option in reversed(options):
        func = option(func)
    summary = ACTION_HELP[action]
    help_text = (
        f"{summary[:1].upper()}{summary[1:]}, in every process of this app (over the bus "
        "configured by SQLA_REBALANCE_BROADCAST, signed with SQLA_REBALANCE_SECRET)."
    )
    # AppGroup.command (not click.command + add_command): it runs the
    # callback inside the app context, where the app's settings are.
    command: click.Command = cli.command(action, help=help_text)(func)
    return command


cli = AppGroup(
    "rebalance",
    help="Cluster-wide commands for this app's RebalancingQueuePool pools (sqla-rebalance).",
)
for _action in ACTIONS:
    _action_command(_action)


def _local_engines(state: AppState) -> list[tuple[str | None, Engine]]:
    found: list[tuple[str | None, Engine]] = []
    fsa = current_app.extensions.get(FSA_KEY)
    if fsa is not None:
        engines: Mapping[str | None, Engine] = getattr(fsa, "engines", {})
        found.extend(engines.items())
    for bind, registered in state.engines.items():
        found.extend((bind, engine) for engine in registered)
    seen: set[int] = set()
    unique = []
    for bind, engine in found:
        if id(engine) not in seen:
            seen.add(id(engine))
            unique.append((bind, engine))
    return unique


def _local_status(state: AppState, as_json: bool, bus_configured: bool) -> None:
    pools: list[dict[str, Any]] = []
    for bind, engine in _local_engines(state):
        pool = engine.pool
        plan = state.plans.get(bind)
        if isinstance(pool, RebalancingQueuePool):
            entry: dict[str, Any] = {"bind": bind, "pool": pool.pool_name, "managed": True}
            entry.update(pool.stats().as_dict())
        else:
            entry = {
                "bind": bind,
                "pool": None,
                "managed": False,
                "poolclass": type(pool).__name__,
                "reason": plan.reason if plan is not None and plan.reason else None,
            }
        pools.append(entry)
    if as_json:
        process = {
            "process": process_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "bus": None,
            "this_process": True,
            "pools": pools,
        }
        click.echo(json.dumps([process], indent=2, default=str))
        return
    if bus_configured:
        click.echo(f"this process ({process_id()}), its own pools only:")
    else:
        click.echo(
            f"no bus configured (SQLA_REBALANCE_BROADCAST): this process ({process_id()}) "
            "only, whose pools serve no requests; configure a bus to see the app's processes"
        )
    if not pools:
        click.echo("  no engine found (register your own with rebalance.register_engine())")
    for entry in pools:
        bind = "default" if entry["bind"] is None else entry["bind"]
        if not entry["managed"]:
            why = f": {entry['reason']}" if entry["reason"] else ""
            click.echo(f"  bind {bind}: not managed ({entry['poolclass']}){why}")
            continue
        recycle = entry["recycle"]
        lifetime = (
            f"recycle {recycle:g}s jitter {entry['recycle_jitter']:g}"
            if recycle > 0
            else "no recycle"
        )
        retired = {k: v for k, v in entry["retirements"].items() if v}
        click.echo(
            f"  bind {bind}: pool {entry['pool']}: open {entry['open']} (idle {entry['idle']}, "
            f"in use {entry['in_use']}), pool_size {entry['pool_size']}, min_size "
            f"{entry['min_size']}, {lifetime}; connects {entry['connects']} (waited "
            f"{entry['checkouts_waited']}), retirements {retired or 'none'}"
        )
        for key, h in sorted(entry["hosts"].items()):
            click.echo(
                f"    {key:<24} open {h['open']} idle {h['idle']} in use {h['in_use']}  "
                f"{h['health']} {h['role']}"
            )


def _err(line: str) -> None:
    click.echo(line, err=True)


@cli.command("status")
@click.option(
    "--pool",
    multiple=True,
    metavar="NAME",
    help="only processes with a pool matching this name or glob; repeat for several "
    "(default: this app's pools)",
)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
@click.option(
    "--local",
    is_flag=True,
    help="show this process's own pools (pool.stats()) even when a bus is configured",
)
def status(pool: tuple[str, ...], as_json: bool, local: bool) -> None:
    """Every live process of this app on the bus: pools, hosts, connections, the
    command generation applied. Without a bus (or with --local): this process's
    own pools."""
    state = app_state(current_app)
    targets = _targets(state)
    if local or not targets:
        _local_status(state, as_json, bus_configured=bool(targets))
        return
    _run(lambda: core.status(targets, pool, core.FLASK, click.echo, _err, as_json=as_json))
