"""The ``sqla-rebalance`` bus commands: arguments, secrets, exit codes and output (embedded bus),
and the command core they share with ``flask rebalance`` and ``manage.py sqla_rebalance``
(``sqla_rebalance.commands``): its checks of every value, before anything is published."""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine

from sqla_rebalance import RebalancingQueuePool
from sqla_rebalance import commands as core
from sqla_rebalance.bus import WaitProgress, fleet_status, open_bus, send_command
from sqla_rebalance.bus import wait_for as bus_wait_for
from sqla_rebalance.cli import main

from .helpers import wait_for

SECRET = "cli-secret"


@pytest.fixture
def bus(tmp_path):
    return f"sqlite:///{tmp_path}/bus.db"


@pytest.fixture
def engine(tmp_path, bus):
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        min_size=2,
        pool_name="orders",
        broadcast=bus,
        broadcast_secret=SECRET,
        min_recycle_interval=0,
    )
    wait_for(lambda: engine.pool.listener is not None and engine.pool.listener.connected)
    # Both connections open before a test sends anything: a recycle leaves alone
    # the connections opened after it was issued (on a loaded machine, the
    # background prefill can come that late).
    wait_for(lambda: engine.pool.checkedin() == 2)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("SQLA_REBALANCE_SECRET", raising=False)
    monkeypatch.delenv("SQLA_REBALANCE_BUS", raising=False)


def test_recycle_wait_json(engine, bus, monkeypatch, capsys):
    monkeypatch.setenv("SQLA_REBALANCE_SECRET", SECRET)
    code = main(["recycle", "--bus", bus, "--pool", "ord*", "--spread", "0.1", "--wait", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["applied"] == [engine.pool.stats().bus.process]
    assert out["pending"] == []
    assert out["command"] == "recycle pool=ord* spread=0.1s"
    wait_for(lambda: engine.pool.stats().retirements["signal"] == 2)


def test_bus_and_secret_from_the_environment(engine, bus, monkeypatch, capsys):
    monkeypatch.setenv("SQLA_REBALANCE_BUS", bus)
    monkeypatch.setenv("MY_SECRET", SECRET)
    assert main(["rebalance", "--secret-env", "MY_SECRET", "--wait", "10"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sent generation ")
    assert "applied by 1 process(es)" in out
    assert engine.pool.stats().bus.messages_rejected == 0


def test_the_secret_is_required_and_never_an_argument(bus, capsys):
    assert main(["recycle", "--bus", bus]) == 2
    assert "SQLA_REBALANCE_SECRET is not set" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["recycle", "--bus", bus, "--secret", SECRET])


def test_unsigned_commands_are_rejected_by_pools_with_a_secret(engine, bus, capsys):
    assert main(["recycle", "--bus", bus, "--unsigned", "--wait", "0.5"]) == 1
    out = capsys.readouterr().out
    assert "NOT applied by" in out
    wait_for(lambda: engine.pool.stats().bus.rejected.get("unsigned") == 1)
    assert engine.pool.stats().retirements["signal"] == 0


@pytest.mark.parametrize("action", ["drain", "rebalance", "refresh"])
def test_only_recycle_has_a_host_option(bus, action):
    with pytest.raises(SystemExit):
        main([action, "--bus", bus, "--host", "db-a"])


def test_bad_arguments_and_unreachable_bus(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SQLA_REBALANCE_SECRET", SECRET)
    assert main(["recycle"]) == 2
    assert "--bus URL is required" in capsys.readouterr().err
    assert main(["recycle", "--bus", "amqp://x/"]) == 2
    assert "unknown bus scheme" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["recycle", "--bus", f"sqlite:///{tmp_path}/b.db", "--spread", "-1"])
    assert exit_.value.code == 2
    assert "--spread must be a finite number of seconds >= 0" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path}/no/such/dir/bus.db"
    assert main(["recycle", "--bus", missing]) == 3
    assert "cannot publish" in capsys.readouterr().err
    assert main(["status", "--bus", missing]) == 3


def heartbeat_open(bus, capsys) -> int:
    """Open connections of the first pool in this process's latest heartbeat (-1: none)."""
    assert main(["status", "--bus", bus, "--json"]) == 0
    procs = json.loads(capsys.readouterr().out)
    return procs[0]["pools"][0]["open"] if procs else -1


def test_status_text_and_json(engine, bus, capsys):
    # The first heartbeat may predate the min_size prefill: wait for one after it.
    wait_for(lambda: heartbeat_open(bus, capsys) == 2)
    assert main(["status", "--bus", bus, "--json"]) == 0
    (proc,) = json.loads(capsys.readouterr().out)
    assert proc["pid"] == os.getpid()
    assert proc["pools"][0]["pool"] == "orders"
    assert main(["status", "--bus", bus]) == 0
    text = capsys.readouterr().out
    assert "pool orders: open 2 (idle 2, in use 0)" in text
    assert "churn/min" in text
    assert main(["status", "--bus", bus, "--pool", "billing"]) == 0
    assert capsys.readouterr().out.strip() == "no live process on this bus"


@pytest.mark.parametrize(
    "argv",
    [
        ["recycle", "--wait", "nan"],
        ["recycle", "--wait", "NaN"],
        ["recycle", "--wait", "-1"],
        ["recycle", "--wait", "-0.001"],
        ["recycle", "--wait", "inf"],
        ["recycle", "--wait", "1e400"],
        ["recycle", "--wait", "86401"],
        ["recycle", "--wait", "soon"],
        ["rebalance", "--wait", "nan"],
        ["recycle", "--spread", "nan"],
        ["recycle", "--spread", "inf"],
        ["recycle", "--spread", "-inf"],
        ["demo", "--duration", "nan"],
        ["demo", "--duration", "0"],
        ["demo", "--recycle", "inf"],
        ["demo", "--jitter", "nan"],
    ],
)
def test_bad_numbers_are_usage_errors_and_publish_nothing(bus, argv, monkeypatch, capsys):
    """--wait nan used to poll the bus for ever, as fast as it could; negatives passed."""
    monkeypatch.setenv("SQLA_REBALANCE_SECRET", SECRET)
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--bus", bus] if argv[0] != "demo" else argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and argv[1] in err
    assert open_bus(bus).generation() == 0  # nothing was published


def test_a_wait_of_zero_is_one_look(engine, bus, monkeypatch, capsys):
    monkeypatch.setenv("SQLA_REBALANCE_SECRET", SECRET)
    assert main(["rebalance", "--bus", bus, "--wait", "0"]) in (0, 1)
    assert "sent generation" in capsys.readouterr().out


def test_wait_for_refuses_a_nan_timeout(bus):
    from sqla_rebalance.bus import wait_for as bus_wait_for

    for timeout in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="timeout"):
            bus_wait_for(bus, 1, timeout=timeout)
    with pytest.raises(ValueError, match="interval"):
        bus_wait_for(bus, 1, timeout=1, interval=float("nan"))


# --------------------------------------------------------------------------- the command core

#: Every float, the edges spelled out, as a number and as the text an operator types.
_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, -1.0, 5e-324, 86400.0, 86400.5]),
)
_seconds = st.one_of(
    _floats,
    _floats.map(repr),
    st.sampled_from(["nan", "-nan", "NaN", "inf", "-inf", "1e400", "-1", "soon", "", " 5 "]),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.booleans(),
    st.none(),
)


def _in_range(value):
    """What the core must make of ``value``: its seconds, or None for a usage error."""
    if isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return seconds if math.isfinite(seconds) and 0 <= seconds <= 86400 else None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wait=_seconds, spread=_seconds, action=st.sampled_from(["recycle", "drain"]))
def test_the_core_accepts_finite_seconds_in_range_and_refuses_the_rest_as_usage(
    wait, spread, action
):
    """The one check of every front end: any value of --wait and --spread, number or text,
    is a finite number of seconds from 0 to 86400, or a usage error naming the option."""
    if action != "recycle" and spread is not None:
        with pytest.raises(core.CommandFailure, match="--spread applies to recycle only") as err:
            core.request(action, wait=wait, spread=spread)
        assert err.value.code == core.USAGE
        return
    expected_wait = None if wait is None else _in_range(wait)
    expected_spread = 0.0 if spread is None else _in_range(spread)
    if (wait is not None and expected_wait is None) or expected_spread is None:
        with pytest.raises(core.CommandFailure, match=r"^--(wait|spread) must be") as err:
            core.request(action, wait=wait, spread=spread)
        assert err.value.code == core.USAGE
        return
    req = core.request(action, wait=wait, spread=spread)
    assert (req.wait, req.spread) == (expected_wait, expected_spread)
    assert math.copysign(1, req.spread) == 1  # -0 is 0


@pytest.mark.parametrize("field", ["wait", "spread"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 86401.0])
def test_a_hand_made_request_with_a_bad_number_publishes_nothing(bus, field, value):
    req = core.Request("recycle", **{field: value})
    with pytest.raises(core.CommandFailure, match=f"--{field}") as err:
        core.send(req, [core.Target(bus, "s")], core.CLI, print)
    assert err.value.code == core.USAGE
    assert open_bus(bus).generation() == 0


def test_every_bus_is_checked_before_anything_is_published(tmp_path, bus, capsys):
    """A command reaches all its buses or, for a usage error on any of them, none."""
    good = core.Target(bus, "s")
    for bad, message in [
        (core.Target("amqp://x/", "s"), "unknown bus scheme"),
        (core.Target(f"sqlite:///{tmp_path}/b.db", None, no_secret="no secret here"), "no secret"),
    ]:
        with pytest.raises(core.CommandFailure, match=message) as err:
            core.send(core.request("recycle"), [good, bad], core.FLASK, print)
        assert err.value.code == core.USAGE
    with pytest.raises(core.CommandFailure, match="pool must be") as err:
        core.send(core.request("rebalance", pools=["orders", ""]), [good], core.FLASK, print)
    assert open_bus(bus).generation() == 0
    assert capsys.readouterr().out == ""


def test_one_wait_deadline_covers_every_command(tmp_path, engine, bus, capsys):
    """Two buses, the second with no process on it: the layouts of the front ends with
    several buses, and one --wait deadline for every command (not one per bus)."""
    other = f"sqlite:///{tmp_path}/other.db"
    targets = [core.Target(bus, SECRET), core.Target(other, SECRET)]
    req = core.request("recycle", pools=["orders"], wait=0.5, as_json=True)
    assert core.send(req, targets, core.DJANGO, print) == core.INCOMPLETE
    first, second = json.loads(capsys.readouterr().out)["buses"]
    assert first["applied"] == [engine.pool.stats().bus.process] and first["pending"] == []
    assert second["applied"] == second["pending"] == [] and second["bus"] == other

    assert core.send(core.request("rebalance", pools=["orders"]), targets, core.FLASK, print) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        f"rebalance pool=orders on {bus}",
        f"rebalance pool=orders on {other}",
    ]

    started = time.monotonic()
    req = core.request("refresh", pools=["nobody"], wait=1.0)
    assert core.send(req, targets, core.FLASK, print) == core.INCOMPLETE
    assert time.monotonic() - started < 1.8  # two waits of 1 s each would take 2 s
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:] == [
        f"pool nobody on {where}: no live process has a pool matching 'nobody' on this bus"
        for where in (bus, other)
    ]


def test_status_layouts(engine, bus, capsys):
    """The documented ``status`` output of the Flask and Django front ends."""
    wait_for(lambda: any(p.is_this_process() for p in fleet_status(bus)))
    target = core.Target(bus, pools=("orders",))
    assert core.status([target], (), core.DJANGO, print, print, as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "bus" and out["buses"][0]["bus"] == bus
    assert [p["pid"] for p in out["buses"][0]["processes"]] == [os.getpid()]
    assert core.status([target], (), core.FLASK, print, print, as_json=True) == 0
    (proc,) = json.loads(capsys.readouterr().out)
    assert (proc["bus"], proc["this_process"]) == (bus, True)
    assert core.status([target], ["billing"], core.FLASK, print, print) == 0
    assert capsys.readouterr().out == "no live process with this app's pools on the bus\n"
    assert core.status([target], (), core.DJANGO, print, print) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == f"bus {bus}: 1 live process(es)" and text[1].startswith("  ")


def test_recycle_at_a_rate_spreads_over_connections_divided_by_rate(
    engine, bus, monkeypatch, capsys
):
    # Two open connections (min_size=2) on the busiest host, 4 per second: 0.5 s.
    monkeypatch.setenv("SQLA_REBALANCE_SECRET", SECRET)
    wait_for(lambda: _open_in_status(bus) == 2)
    assert main(["recycle", "--bus", bus, "--pool", "orders", "--rate", "4", "--wait"]) == 0
    out = capsys.readouterr().out
    assert "rate 4/s per host: 2 open connections on the busiest host" in out
    assert "spread 0.5s" in out and "recycle pool=orders spread=0.5s" in out
    wait_for(lambda: engine.pool.stats().retirements["signal"] == 2)


def _open_in_status(bus: str) -> int:
    return sum(p.get("open", 0) for proc in fleet_status(bus) for p in proc.pools)


@pytest.mark.parametrize(
    "argv",
    [
        ["--rate", "0"],
        ["--rate", "-3"],
        ["--rate", "nan"],
        ["--rate", "inf"],
        ["--rate", "lots"],
        ["--rate", "5", "--spread", "3"],
    ],
)
def test_bad_rates_are_usage_errors_before_anything_is_published(bus, argv, monkeypatch, capsys):
    monkeypatch.setenv("SQLA_REBALANCE_SECRET", SECRET)
    try:
        code = main(["recycle", "--bus", bus, *argv])
    except SystemExit as exited:  # argparse's own usage error
        code = exited.code
    assert code == 2
    assert open_bus(bus).generation() == 0


def test_rate_spread_budgets_the_busiest_host_over_the_fleet():
    from sqla_rebalance.bus import ProcessStatus

    def proc(name: str, pools: list[dict]) -> ProcessStatus:
        return ProcessStatus(process=name, hostname="h", pid=1, generation=0, age=0, pools=pools)

    fleet = [
        proc(
            "a",
            [
                {
                    "pool": "orders",
                    "open": 9,
                    "hosts": {"db1:5432": {"open": 6}, "db2:5432": {"open": 3}},
                }
            ],
        ),
        proc(
            "b",
            [
                {
                    "pool": "orders",
                    "open": 6,
                    "hosts": {"db1:5432": {"open": 4}, "db2:5432": {"open": 2}},
                }
            ],
        ),
        proc("c", [{"pool": "reports", "open": 50, "hosts": {"db1:5432": {"open": 50}}}]),
        proc("d", [{"pool": "orders", "open": 7}]),  # one host, not named
    ]
    # Per host, each pool's connections go to budget_spread: at least total / rate.
    assert core.rate_spread(fleet, ["orders"], None, 5.0) == (
        core.budget_spread([6, 4], 5.0),
        10,
        "db1:5432",
    )
    assert core.rate_spread(fleet, ["orders", "reports"], None, 10.0) == (
        core.budget_spread([6, 4, 50], 10.0),
        60,
        "db1:5432",
    )
    assert core.rate_spread(fleet, ["orders"], "db2", 1.0) == (10.0, 5, "db2:5432")
    assert core.rate_spread(fleet, ["nothing"], None, 1.0) == (0.0, 0, None)
    assert 2.0 < core.budget_spread([6, 4], 5.0) <= 2.0 * core.MAX_WIDENING
    with pytest.raises(core.CommandFailure):
        core.request("rebalance", rate=3)


def _peak_window(times: list[float]) -> int:
    times.sort()
    best = j = 0
    for i, t in enumerate(times):
        while times[j] <= t - 1.0:
            j += 1
        best = max(best, i - j + 1)
    return best


def _stratified(counts: list[int], spread: float, rng: random.Random) -> list[float]:
    """Each pool's moments as ``recycle`` draws them (ledger.mark_recycle)."""
    return [
        (k + rng.random()) * spread / n + rng.uniform(0, 0.02) for n in counts for k in range(n)
    ]


def test_budget_spread_keeps_the_peak_window_near_the_rate():
    """64 pools of 8 at 50/s: with spread = total / rate, the busiest 1-s window of
    independent stratified pools is about 1.2 x the rate; the budgeted spread keeps it
    near the rate (the issue's target: <= 1.2 x), for at most twice the time."""
    rng = random.Random(7)
    counts = [8] * 64
    mean = sum(counts) / 50.0
    budget = core.budget_spread(counts, 50.0)
    assert mean < budget <= core.MAX_WIDENING * mean
    plain = sorted(_peak_window(_stratified(counts, mean, rng)) for _ in range(40))
    ours = sorted(_peak_window(_stratified(counts, budget, rng)) for _ in range(40))
    assert plain[20] > 55  # the median run of the old plan: over 1.1 x
    assert ours[-1] <= 60 and ours[20] <= 52
    assert core.budget_spread([10, 20], 50.0) == 30 / 50.0  # fits in a second: not widened


def _monotone(values: list) -> bool:
    return all(a <= b for a, b in itertools.pairwise(values))


def test_wait_progress_counts_grow_and_end_complete(engine, bus):
    wait_for(lambda: _open_in_status(bus) == 2)
    sent = send_command(bus, "recycle", pool="orders", spread=0.3, secret=SECRET)
    seen: list[WaitProgress] = []
    result = bus_wait_for(
        bus, sent.generation, pool="orders", timeout=20, progress=seen.append, rollout=0.3
    )
    assert result.complete and result.replaced and result.progress is seen[-1]
    last = seen[-1]
    assert (last.phase, last.applied, last.pending, last.lost) == ("done", 1, 0, 0)
    assert (last.connections, last.retired, last.remaining, last.fraction) == (2, 2, 0, 1.0)
    for name in ("applied", "lost", "connections", "retired", "elapsed"):
        assert _monotone([getattr(p, name) or 0 for p in seen]), name
    assert all(p.phase in ("applying", "replacing") for p in seen[:-1])
    etas = [p.eta for p in seen if p.eta is not None]
    assert etas and all(math.isfinite(e) and 0 <= e <= 0.3 + 1e-6 for e in etas)
    assert last.as_dict()["processes"] == 1


def test_wait_progress_without_a_rollout_ends_when_applied(engine, bus):
    sent = send_command(bus, "rebalance", pool="orders", secret=SECRET)
    seen: list[WaitProgress] = []
    result = bus_wait_for(bus, sent.generation, pool="orders", timeout=10, progress=seen.append)
    assert result.complete and seen[-1].phase == "done" and seen[-1].eta == 0.0
    nobody = bus_wait_for(bus, sent.generation, pool="nobody", timeout=0.3, progress=seen.append)
    assert not nobody.complete and seen[-1].phase == "timeout"
    assert (seen[-1].applied, seen[-1].pending, seen[-1].connections) == (0, 0, None)


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _rate_recycle(bus: str, stream: io.StringIO, as_json: bool = False) -> list[str]:
    lines: list[str] = []
    req = core.request("recycle", pools=["orders"], rate=4, wait=20, as_json=as_json)
    printer = core.ProgressPrinter.on(stream, as_json=as_json)
    assert core.send(req, [core.Target(bus, SECRET)], core.CLI, lines.append, printer) == core.OK
    return lines


def test_the_progress_bar_is_drawn_only_on_a_terminal(engine, bus):
    wait_for(lambda: _open_in_status(bus) == 2)
    tty = FakeTTY()
    lines = _rate_recycle(bus, tty)
    drawn = tty.getvalue()
    assert drawn.startswith("\r[") and "processes applied" in drawn and "ETA " in drawn
    assert drawn.endswith("\r\x1b[K")  # erased before the result lines
    assert lines[-1].startswith("replaced 2 of 2 connection(s) in ")
    assert "applied by 1 process(es)" in lines

    plain = io.StringIO()  # not a terminal: no bar; a line only every 5 s
    wait_for(lambda: _open_in_status(bus) == 2)
    _rate_recycle(bus, plain)
    assert "\r" not in plain.getvalue() and "[" not in plain.getvalue()


def test_progress_printer_lines():
    out = io.StringIO()
    printer = core.ProgressPrinter(out.write, tty=False, every=0.0)
    update = printer.start("pool orders: ")
    update(WaitProgress(1, 2.0, 3, 1, 0, 40, 10, 62.0, "replacing"))
    update(WaitProgress(1, 3.0, 4, 0, 0, 40, 40, 0.0, "done"))  # the final state: no line
    assert out.getvalue() == (
        "pool orders: waiting: 3/4 processes applied, 10/40 connections replaced, 2s, ETA 1m02s\n"
    )
    bar = FakeTTY()
    update = core.ProgressPrinter.on(bar).start()
    update(WaitProgress(1, 1.0, 1, 1, 0, None, None, None, "applying"))
    assert bar.getvalue() == ("\r[############------------] 1/2 processes applied, 1s, ETA ?\x1b[K")
    quiet = io.StringIO()  # --json, not a terminal: nothing
    update = core.ProgressPrinter.on(quiet, as_json=True).start()
    update(WaitProgress(1, 9.0, 1, 1, 0, None, None, None, "applying"))
    assert quiet.getvalue() == ""


def test_rate_wait_json_has_the_counts(engine, bus, monkeypatch, capsys):
    monkeypatch.setenv("SQLA_REBALANCE_SECRET", SECRET)
    wait_for(lambda: _open_in_status(bus) == 2)
    argv = ["recycle", "--bus", bus, "--pool", "orders", "--rate", "4", "--wait", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert (out["rate"], out["spread"]) == (4.0, 0.5)
    progress = out["progress"]
    assert {k: progress[k] for k in ("phase", "processes", "applied", "pending", "lost")} == {
        "phase": "done",
        "processes": 1,
        "applied": 1,
        "pending": 0,
        "lost": 0,
    }
    assert progress["connections"] == progress["retired"] == 2
    assert progress["elapsed"] >= 0 and progress["eta"] == 0
    assert captured.err == ""  # stderr is not a terminal: no bar
    assert main(["rebalance", "--bus", bus, "--wait", "--json"]) == 0
    progress = json.loads(capsys.readouterr().out)["progress"]
    assert (progress["phase"], progress["applied"], progress["connections"]) == ("done", 1, 2)
