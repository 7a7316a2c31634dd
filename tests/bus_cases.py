"""Bus test scenarios shared by the transports (Redis, PostgreSQL): real servers, real tools."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from sqla_rebalance import RebalancingQueuePool, signals
from sqla_rebalance.bus import open_bus, send_command
from sqla_rebalance.bus.message import encode, new_command

from .helpers import wait_for as poll


def raw_messages(pool: str, secret: bytes, channel: str) -> dict[str, bytes]:
    """One message of every kind a listener must refuse (``secret``: the pool's own)."""
    now = time.time()

    def cmd(**kw):
        base = dataclasses.replace(new_command("recycle", pool=pool), **kw)
        # A generation as a publisher would give it: its issue time in ms, and above every
        # generation applied so far (the commands of the test were sent just before).
        return dataclasses.replace(base, gen=int(base.issued_at * 1000) + 1000)

    good = json.loads(encode(cmd(), secret, channel=channel))
    unsigned = {k: v for k, v in good.items() if k != "mac"}
    tampered = {**good, "spread": 99.0}
    return {
        "malformed": b"this is not json",
        "oversized": json.dumps({**good, "nonce": "x" * 2000}).encode(),
        "version": json.dumps({**good, "v": 99}).encode(),
        "unsigned": json.dumps(unsigned).encode(),
        "bad_signature": json.dumps(tampered).encode(),
        "stale": encode(cmd(issued_at=now - 3600), secret, channel=channel),
        "unknown_action": encode(cmd(action="shutdown"), secret, channel=channel),
    }


def check_bad_messages_are_rejected(
    bus: str,
    secret: str,
    tmp_path: Path,
    publish_raw: Callable[[bytes], None],
    logged_first: Callable[[], bytes],
) -> None:
    """Every kind of bad message, published raw with the server's own tool: each is
    rejected and counted once, and none recycles anything.

    ``publish_raw`` sends bytes on the bus's wake-up channel (redis-cli, psql);
    ``logged_first`` returns the first command in the durable log, re-published as a
    replay.
    """
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        min_size=2,
        broadcast=bus,
        broadcast_secret=secret,
        min_recycle_interval=0,
    )
    pool = engine.pool
    recycles: list[str] = []

    def on_recycle(sender, **kw):
        recycles.append(kw["reason"])

    signals.recycle_requested.connect(on_recycle, pool)
    try:
        poll(lambda: pool.listener is not None and pool.listener.connected)
        poll(lambda: pool.stats().idle == 2)
        first = send_command(bus, "recycle", secret=secret)
        poll(lambda: pool.stats().bus.generation_applied == first.generation)
        messages = raw_messages("*", secret.encode(), open_bus(bus).channel)
        # A replay: the exact bytes of the command already applied, published again.
        messages["replayed"] = logged_first()
        for payload in messages.values():
            publish_raw(payload)
        poll(lambda: pool.stats().bus.messages_rejected == len(messages))
        last = send_command(bus, "rebalance", secret=secret)
        poll(lambda: pool.stats().bus.generation_applied == last.generation)
        stats = pool.stats()
        assert stats.bus.rejected == dict.fromkeys(messages, 1)
        assert stats.bus.messages_accepted == 2
        assert recycles == ["signal"]  # the first command only
        assert stats.retirements["signal"] == 2
    finally:
        signals.recycle_requested.disconnect(on_recycle)
        engine.dispose()


# -- untrusted data in the store: the durable log and the heartbeats ----------------------


class Store:
    """Raw access to one transport's store, as somebody with write access to the bus
    (redis-cli, psql, sqlite3) would use it: what the package itself never writes."""

    #: Log positions a junk entry is written at (beyond int64, +inf... where the store
    #: can hold them).
    huge_positions: tuple[float | int, ...] = ()

    def add_log(self, position: float | int, payload: bytes) -> None:
        raise NotImplementedError

    def remove_log(self, position: float | int) -> None:
        raise NotImplementedError

    def log_only(self, payload_for: Callable[[int], bytes]) -> int:
        """Log a command as a publisher would, without the wake-up (a lost NOTIFY)."""
        raise NotImplementedError

    def add_heartbeat(self, name: str, payload: bytes) -> None:
        raise NotImplementedError

    def reconnect(self, engine: Engine) -> None:
        """Make the engine's listener reconnect (it then re-reads the log)."""
        raise NotImplementedError


def _engine(bus: str, secret: str, tmp_path: Path, name: str = "orders") -> Engine:
    return create_engine(
        f"sqlite:///{tmp_path}/{name}.db",
        poolclass=RebalancingQueuePool,
        min_size=1,
        pool_name=name,
        broadcast=bus,
        broadcast_secret=secret,
        min_recycle_interval=0,
    )


def _reconnected(engine: Engine, before: int) -> bool:
    stats = engine.pool.stats().bus
    return stats.reconnects > before and stats.connected and stats.last_error is None


def junk_commands(channel: str, secret: bytes, position: int) -> list[bytes]:
    """What a junk writer puts in the log: garbage, and commands that must not verify."""
    now = time.time()
    cmd = dataclasses.replace(new_command("recycle"), gen=position, issued_at=now)
    good = json.loads(encode(cmd, secret, channel=channel))
    return [
        f"junk at {position}".encode(),  # distinct: a Redis sorted set keeps one of each
        encode(cmd, b"not the secret", channel=channel),  # wrong secret
        encode(cmd, secret, channel="another_channel"),  # signed for another channel
        json.dumps({k: v for k, v in good.items() if k != "mac"}).encode(),  # unsigned
        json.dumps({**good, "v": 1}).encode(),  # wire v1
    ]


def check_junk_in_the_log_moves_nothing(
    bus: str, secret: str, tmp_path: Path, store: Store, *, catch_up: bool = True
) -> None:
    """Unverified log entries, far ahead (``1e15``, ``+inf``, ``2**63-1``) or just ahead
    (an hour), move no generation, cursor or ``--wait`` answer; missed commands are still
    caught up; publishing still works, from a generation near the clock."""
    from sqla_rebalance.bus import wait_for
    from sqla_rebalance.bus.base import publish_ceiling

    channel = open_bus(bus).channel
    key = secret.encode()
    engine = _engine(bus, secret, tmp_path)
    pool = engine.pool
    try:
        poll(lambda: pool.listener is not None and pool.listener.connected)
        first = send_command(bus, "recycle", secret=secret)
        poll(lambda: pool.stats().bus.generation_applied == first.generation)
        near = int(time.time() * 1000) + 3_600_000  # an hour ahead: within every bound
        entries = [(near + i, raw) for i, raw in enumerate(junk_commands(channel, key, near))]
        for position in store.huge_positions:
            # Signed with the wrong secret (PostgreSQL and SQLite hold one row per position).
            entries.append((position, junk_commands(channel, key, position)[1]))
        # Counted before the first entry lands: a polling listener may read some of them
        # while the others are still being written.
        rejected = pool.stats().bus.messages_rejected
        for position, raw in entries:
            store.add_log(position, raw)
        if catch_up:
            reconnects = pool.stats().bus.reconnects
            store.reconnect(engine)
            poll(lambda: _reconnected(engine, reconnects), timeout=30)
        # The five junk entries an hour ahead are read (and refused); the others are
        # beyond what a reader takes at all.
        poll(lambda: pool.stats().bus.messages_rejected >= rejected + 5, timeout=15)
        listener = pool.listener
        assert listener is not None
        assert pool.stats().bus.generation_applied == first.generation
        assert listener.applied == first.generation
        assert listener._log_cursor <= first.generation
        assert listener._history <= first.generation
        # A command signed with the wrong secret is not reported applied by --wait.
        wrong = send_command(bus, "recycle", secret="not the secret")
        assert wrong.generation <= publish_ceiling()
        result = wait_for(bus, wrong.generation, timeout=2)
        assert not result.complete
        assert [p.process for p in result.pending] == [pool.stats().bus.process]
        # A command that only reached the log (its wake-up lost) is caught up.
        if catch_up:
            missed = store.log_only(
                lambda gen: encode(
                    dataclasses.replace(new_command("rebalance"), gen=gen), key, channel=channel
                )
            )
            reconnects = pool.stats().bus.reconnects
            store.reconnect(engine)
            poll(lambda: pool.stats().bus.generation_applied == missed, timeout=30)
        # Publishing works (no bigint overflow) from a generation near the clock.
        sent = send_command(bus, "recycle", secret=secret)
        assert sent.generation <= publish_ceiling()
        poll(lambda: pool.stats().bus.generation_applied == sent.generation)
        assert wait_for(bus, sent.generation, timeout=10).complete
        # Junk removed: the listener still hears the next command at once.
        for position, _raw in entries:
            store.remove_log(position)
        last = send_command(bus, "rebalance", secret=secret)
        poll(lambda: pool.stats().bus.generation_applied == last.generation, timeout=5)
        # And no reconnect loop (an OverflowError on +inf used to look like a lost bus).
        reconnects = pool.stats().bus.reconnects
        time.sleep(1.0)
        assert pool.stats().bus.reconnects == reconnects
        assert pool.stats().bus.connected and pool.stats().bus.last_error is None
    finally:
        engine.dispose()


#: Heartbeats that no listener of this package writes: each must be skipped and counted.
JUNK_HEARTBEATS: dict[str, bytes] = {
    "not_json": b"not json",
    "a_list": b"[1, 2, 3]",
    "no_process": b'{"pools": []}',
    "process_not_text": b'{"process": 5}',
    "pools_not_a_list": b'{"process": "x", "pools": {"pool": "orders"}}',
    "pool_not_a_dict": b'{"process": "x", "pools": [1]}',
    "generation_text": b'{"process": "x", "generation": "12", "pools": []}',
    "pool_generation_text": b'{"process": "x", "pools": [{"pool": "orders", "generation": "9"}]}',
    "generation_huge": b'{"process": "x", "generation": 1' + b"0" * 400 + b', "pools": []}',
    "generation_negative": b'{"process": "x", "generation": -1, "pools": []}',
    "ts_nan": b'{"process": "x", "ts": NaN, "pools": []}',
    "ts_huge": b'{"process": "x", "ts": 1e400, "pools": []}',
    "pid_float": b'{"process": "x", "pid": 1.5, "pools": []}',
    "hosts_a_list": b'{"process": "x", "pools": [{"pool": "orders", "hosts": [1]}]}',
    "host_not_a_dict": b'{"process": "x", "pools": [{"pool": "orders", "hosts": {"h": 1}}]}',
    "churn_a_list": b'{"process": "x", "pools": [{"pool": "orders", "churn_per_min": [1]}]}',
    "open_text": b'{"process": "x", "pools": [{"pool": "orders", "open": "2"}]}',
    "deep": b"[" * 100_000 + b"]" * 100_000,
}


def check_junk_heartbeats_are_skipped(
    bus: str, secret: str, tmp_path: Path, store: Store, extra: dict[str, bytes] | None = None
) -> None:
    """``status``, ``--wait`` and ``fleet_status`` list the live process and skip (and
    count) every junk heartbeat next to it: no traceback, the right exit status."""
    import contextlib
    import io
    import os

    from sqla_rebalance.bus import fleet_status, read_fleet
    from sqla_rebalance.cli import main

    junk = {**JUNK_HEARTBEATS, **(extra or {})}
    engine = _engine(bus, secret, tmp_path)
    pool = engine.pool
    try:
        poll(lambda: pool.listener is not None and pool.listener.connected)
        me = pool.stats().bus.process
        poll(lambda: [p.process for p in fleet_status(bus)] == [me])
        for name, payload in junk.items():
            store.add_heartbeat(f"junk_{name}", payload)
        fleet = read_fleet(bus)
        assert [p.process for p in fleet.processes] == [me]
        assert fleet.invalid == len(junk)
        for args in (["status"], ["status", "--json"], ["status", "--pool", "orders"]):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                assert main([*args, "--bus", bus]) == 0
            assert me in out.getvalue()
            assert f"skipped {len(junk)} unreadable heartbeat(s)" in err.getvalue()
        out = io.StringIO()
        old = os.environ.get("SQLA_REBALANCE_SECRET")
        os.environ["SQLA_REBALANCE_SECRET"] = secret
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                code = main(["recycle", "--bus", bus, "--pool", "orders", "--wait", "20"])
        finally:
            if old is None:
                del os.environ["SQLA_REBALANCE_SECRET"]
            else:
                os.environ["SQLA_REBALANCE_SECRET"] = old
        assert code == 0, out.getvalue()
        assert "applied by 1 process(es)" in out.getvalue()
        assert f"skipped {len(junk)} unreadable heartbeat(s)" in out.getvalue()
    finally:
        engine.dispose()
