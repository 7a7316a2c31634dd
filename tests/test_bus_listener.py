"""The listener's bookkeeping under a fake clock: order, duplicates, replays, catch-up, coalescing.

No thread and no server here: messages are fed to ``Listener._receive`` and the
coalescing timer is driven by hand. The real transports are tested against real
servers in ``test_bus_redis.py``, ``test_bus_postgres.py`` and ``test_bus_pool.py``.
"""

from __future__ import annotations

import dataclasses
import types
import weakref
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sqla_rebalance.bus import listener as listener_mod
from sqla_rebalance.bus.base import DEFAULT_CHANNEL
from sqla_rebalance.bus.message import encode, new_command
from sqla_rebalance.bus.sqlite_bus import SQLiteBus

from .helpers import FakeClock

SECRET = b"s"


class FakePool:
    """What the listener needs of a pool, recording the commands applied."""

    def __init__(self, name: str, interval: float) -> None:
        self.pool_name = name
        self.config = types.SimpleNamespace(min_recycle_interval=interval)
        self.applied: list[tuple[str, str | None, float, float]] = []

    def _apply_command(self, command: Any, cutoff: float) -> None:
        self.applied.append((command.action, command.host, command.spread, cutoff))


class FakeSubscription:
    """A log to catch up from (the listener only calls ``since`` here)."""

    def __init__(self, log: list[tuple[int, bytes]]) -> None:
        self.log = log

    def since(self, gen: int, limit: int = 1000) -> list[tuple[int, bytes]]:
        return [(g, raw) for g, raw in self.log if g > gen][:limit]


@pytest.fixture
def clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(listener_mod, "time", types.SimpleNamespace(time=clock, monotonic=clock))
    return clock


@pytest.fixture
def make(clock, tmp_path):
    """A listener (no thread) with some fake pools attached."""
    made = []

    def make(*pools: FakePool) -> listener_mod.Listener:
        bus = SQLiteBus(f"sqlite:///{tmp_path}/bus.db", DEFAULT_CHANNEL)
        listener = listener_mod.Listener(bus, SECRET, ("k", ""))
        for pool in pools:
            listener._members[id(pool)] = listener_mod._Member(weakref.ref(pool))
        made.append(pools)  # keep the pools alive
        return listener

    return make


def message(clock: FakeClock, gen: int, action: str = "recycle", **kw: Any) -> bytes:
    cmd = dataclasses.replace(new_command(action, **kw), gen=gen, issued_at=clock.now)
    return encode(cmd, SECRET, channel=DEFAULT_CHANNEL)


def test_each_generation_is_applied_once(clock, make):
    pool = FakePool("orders", 0.0)
    lst = make(pool)
    clock.advance(10)
    first = message(clock, 100)
    lst._receive(first, live=False)  # read from the log at a reconnect...
    lst._receive(first, live=True)  # ...and delivered live as well
    assert len(pool.applied) == 1
    assert lst.duplicates == 1
    assert sum(lst.rejected.values()) == 0
    assert lst.applied == 100
    # Delivered live a second time: somebody re-published it.
    lst._receive(first, live=True)
    assert lst.rejected["replayed"] == 1
    assert len(pool.applied) == 1


def test_an_old_generation_never_seen_is_a_replay(clock, make):
    pool = FakePool("orders", 0.0)
    lst = make(pool)
    clock.advance(10)
    lst._receive(message(clock, 100), live=True)
    lst._receive(message(clock, 99), live=True)
    assert lst.rejected["replayed"] == 1
    assert len(pool.applied) == 1


def test_commands_reach_only_matching_pools(clock, make):
    orders, orders_eu, billing = (FakePool(n, 0.0) for n in ("orders", "orders-eu", "billing"))
    lst = make(orders, orders_eu, billing)
    clock.advance(10)
    lst._receive(message(clock, 1, pool="orders*"), live=True)
    lst._receive(message(clock, 2, action="rebalance", pool="billing"), live=True)
    assert [p.applied[0][0] for p in (orders, orders_eu)] == ["recycle", "recycle"]
    assert [a[0] for a in billing.applied] == ["rebalance"]


def test_catch_up_skips_history_from_before_the_listener(clock, make):
    pool = FakePool("orders", 0.0)
    before = message(clock, 1)  # in the log before this process started
    clock.advance(listener_mod.ATTACH_GRACE + 1)
    lst = make(pool)
    lst._catch_up(FakeSubscription([(1, before)]))
    assert pool.applied == []
    assert sum(lst.rejected.values()) == 0
    assert lst._members[id(pool)].settled == 1  # done, as far as --wait is concerned
    clock.advance(1)
    missed = message(clock, 2, spread=3)  # sent while disconnected
    clock.advance(20)
    lst._receive(missed, live=False)
    # Applied late, and only to connections older than the command itself.
    assert pool.applied == [("recycle", None, 3.0, clock.now - 20)]


def test_history_that_fails_verification_is_neither_counted_nor_taken_as_done(clock, make):
    """After a secret rotation the history is signed with the old secret: it raises no
    alarm, and it moves nothing either (only a verified message may)."""
    pool = FakePool("orders", 0.0)
    before = message(clock, 1)
    clock.advance(listener_mod.ATTACH_GRACE + 1)
    lst = make(pool)
    lst.secret = b"rotated since"
    lst._catch_up(FakeSubscription([(1, before)]))
    assert pool.applied == []
    assert sum(lst.rejected.values()) == 0
    assert (lst._history, lst._log_cursor, lst.applied) == (0, 0, 0)
    assert lst._members[id(pool)].settled == 0


def test_catch_up_skips_commands_older_than_its_window(clock, make):
    pool = FakePool("orders", 0.0)
    lst = make(pool)
    clock.advance(1)
    old = message(clock, 1)
    clock.advance(listener_mod.CATCH_UP_MAX_AGE + 1)
    lst._receive(old, live=False)
    assert pool.applied == []
    assert lst.rejected["stale"] == 1


def test_commands_faster_than_the_interval_are_coalesced(clock, make):
    pool = FakePool("orders", 10.0)
    lst = make(pool)
    clock.advance(100)
    lst._receive(message(clock, 1, spread=1), live=True)
    assert len(pool.applied) == 1
    for gen in range(2, 1002):  # a flood: 1,000 more within the same second
        lst._receive(message(clock, gen, spread=gen % 7), live=True)
    assert len(pool.applied) == 1
    clock.advance(9.9)
    lst._run_pending(clock.now)
    assert len(pool.applied) == 1
    clock.advance(0.2)
    lst._run_pending(clock.now)
    # One more recycle, with the widest spread asked for.
    assert [a[:3] for a in pool.applied[1:]] == [("recycle", None, 6.0)]
    assert lst._members[id(pool)].coalesced == 999
    lst._run_pending(clock.now + 100)
    assert len(pool.applied) == 2


def test_coalescing_keeps_distinct_actions_and_merges_hosts(clock, make):
    pool = FakePool("orders", 5.0)
    lst = make(pool)
    clock.advance(100)
    lst._receive(message(clock, 1), live=True)
    lst._receive(message(clock, 2, host="db-a:5432"), live=True)
    lst._receive(message(clock, 3, action="rebalance"), live=True)
    lst._receive(message(clock, 4, host="db-b:5432"), live=True)
    lst._receive(message(clock, 5, spread=2), live=True)  # every host: covers db-a and db-b
    lst._receive(message(clock, 6, host="db-c:5432"), live=True)  # covered as well
    clock.advance(5)
    lst._run_pending(clock.now)
    assert [a[:3] for a in pool.applied[1:]] == [("rebalance", None, 0.0), ("recycle", None, 2.0)]


def test_a_pool_that_fails_does_not_stop_the_others(clock, make):
    class Broken(FakePool):
        def _apply_command(self, command: Any, cutoff: float) -> None:
            raise RuntimeError("boom")

    broken, fine = Broken("a", 0.0), FakePool("b", 0.0)
    lst = make(broken, fine)
    clock.advance(10)
    lst._receive(message(clock, 1), live=True)
    assert len(fine.applied) == 1


def test_rejections_are_logged_once_per_kind_then_summarised(clock, make, caplog):
    lst = make(FakePool("orders", 0.0))
    caplog.set_level("WARNING", logger="sqla_rebalance.bus")
    for _ in range(50):
        lst._receive(b"garbage", live=True)
    assert lst.rejected["malformed"] == 50
    assert len(caplog.records) == 1
    lst._log_summary()  # the listener's loop calls it: nothing due within the minute
    assert len(caplog.records) == 1
    clock.advance(61)
    lst._log_summary()
    assert len(caplog.records) == 2
    assert "rejected 49 more message(s) of kind malformed" in caplog.records[1].getMessage()
    clock.advance(61)
    lst._log_summary()  # a quiet minute: nothing to say, and the next one is logged again
    assert len(caplog.records) == 2
    clock.advance(61)
    lst._log_summary()
    lst._receive(b"garbage", live=True)
    assert len(caplog.records) == 3
    assert "rejected a message: malformed" in caplog.records[2].getMessage()


def test_a_stale_live_command_is_refused_not_settled(clock, make):
    pool = FakePool("orders", 0.0)
    lst = make(pool)
    clock.advance(1000)
    clock.advance(-(listener_mod.LIVE_MAX_AGE + 1))
    old = message(clock, 5)
    clock.advance(listener_mod.LIVE_MAX_AGE + 1)
    lst._receive(old, live=True)
    assert lst.rejected["stale"] == 1
    assert pool.applied == []
    member = lst._members[id(pool)]
    assert member.settled == 0  # recycle --wait must not report it applied
    lst._receive(old, live=False)  # the same command read from the log later
    assert pool.applied == []  # never applied behind the window's back


def test_acknowledgements_spread_over_a_window_that_grows_with_the_fleet(clock, make):
    """After a command, a process heartbeats within 0.2 s on a small fleet; on a big
    one at a random moment of up to fleet / ACK_RATE seconds (at most ACK_WINDOW_MAX)."""
    listener = make(FakePool("orders", 0.0))
    assert listener._ack_due(100.0) == pytest.approx(100.2)  # fleet unknown
    listener._fleet = 10
    small = [listener._ack_due(100.0) - 100.0 for _ in range(200)]
    assert all(0.2 <= d <= 0.2 + 10 / listener_mod.ACK_RATE for d in small)
    listener._fleet = 1_000_000
    big = [listener._ack_due(100.0) - 100.0 for _ in range(500)]
    assert all(0.2 <= d <= 0.2 + listener_mod.ACK_WINDOW_MAX for d in big)
    assert max(big) - min(big) > listener_mod.ACK_WINDOW_MAX / 2  # spread, not a burst


def test_a_fleet_size_from_the_bus_is_believed_only_in_range():
    from sqla_rebalance.bus.base import MAX_FLEET_HINT, Subscription

    class Sub(Subscription):
        get = generation = since = put_heartbeat = close = None  # type: ignore[assignment]

    sub = Sub()
    for junk in (-1, True, 1.5, "12", None, b"3", MAX_FLEET_HINT + 1, 10**40):
        sub.note_fleet_size(junk)
        assert sub.fleet_size is None
    sub.note_fleet_size(7)
    assert sub.fleet_size == 7


@given(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True),
        st.text(max_size=20),
        st.binary(max_size=20),
        st.lists(st.integers(), max_size=3),
    )
)
def test_any_fleet_size_reply_is_believed_only_when_an_int_in_range(value):
    from sqla_rebalance.bus.base import MAX_FLEET_HINT, Subscription

    class Sub(Subscription):
        get = generation = since = put_heartbeat = close = None  # type: ignore[assignment]

    sub = Sub()
    sub.note_fleet_size(value)
    sane = type(value) is int and 0 <= value <= MAX_FLEET_HINT
    assert sub.fleet_size == (value if sane else None)
