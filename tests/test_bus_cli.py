"""The ``sqla-rebalance`` bus commands: arguments, secrets, exit codes and output (embedded bus)."""

from __future__ import annotations

import json
import os

import pytest
from sqlalchemy import create_engine

from sqla_rebalance import RebalancingQueuePool
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
    from sqla_rebalance.bus import open_bus

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
