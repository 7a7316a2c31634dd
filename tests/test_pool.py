"""Pool behaviour on SQLite files, maintenance driven by hand with a fake clock.

These tests are deterministic: no background thread and no sleeping; the
clock moves only when a test says so. The same behaviours are exercised with
the real worker against PostgreSQL in ``test_postgres.py``.
"""

from __future__ import annotations

import random

import pytest
from sqlalchemy import create_engine, text

import sqla_rebalance
from sqla_rebalance import RebalancingQueuePool, signals
from sqla_rebalance.lifetime import (
    INFO_KEY,
    draw_lifetime,
    replacement_lead,
    schedule_replacements,
)
from sqla_rebalance.maintenance import BATCH, IDLE_PASS

from .helpers import FakeClock, manual_maintenance, seed_randomness, wait_for

R = 100.0  # pool_recycle used below (seconds of fake time)


@pytest.fixture
def clock(monkeypatch):
    clock = FakeClock()
    clock.install(monkeypatch)
    manual_maintenance(monkeypatch)
    seed_randomness(monkeypatch, 1234)
    return clock


@pytest.fixture
def engine_factory(tmp_path):
    engines = []

    def make(**kw):
        kw.setdefault("pool_size", 5)
        kw.setdefault("max_overflow", 0)
        engine = create_engine(f"sqlite:///{tmp_path}/t.db", poolclass=RebalancingQueuePool, **kw)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


def open_n(pool, n):
    """Check out n connections at once and return them all (fills the pool)."""
    conns = [pool.connect() for _ in range(n)]
    for c in conns:
        c.close()


def dbapi_ids(pool):
    """The pool's open DBAPI connections, as objects: kept alive by the caller's set, so
    that a closed one's ``id()`` cannot be reused by a new one."""
    return {r.dbapi_connection for r in pool._ledger.states}


def test_lifetimes_are_drawn_in_range():
    rng = random.Random(7)
    draws = [draw_lifetime(1800, 0.2, rng) for _ in range(20000)]
    assert min(draws) >= 1800 * 0.8 and max(draws) <= 1800
    # Uniform: each fifth of the interval gets about a fifth of the draws.
    buckets = [0] * 5
    for d in draws:
        buckets[min(4, int((d - 1440) / 72))] += 1
    assert all(3600 < b < 4400 for b in buckets), buckets
    assert draw_lifetime(60, 0.0, rng) == 60


def test_replacements_are_scheduled_backwards_so_a_serial_worker_is_never_late():
    # Lone deadlines: replaced margin + connect time before each.
    starts = schedule_replacements([(100.0, "a"), (200.0, "b")], margin=1.0, connect_time=0.5)
    assert starts == {"a": 98.5, "b": 198.5}
    # A cluster: five deadlines within 0.1 s and 0.5 s per connect. The worker
    # must start 2.5 s ahead of the first to finish all five in time.
    cluster = [(100.0 + i * 0.025, i) for i in range(5)]
    starts = schedule_replacements(cluster, margin=1.0, connect_time=0.5)
    order = sorted(starts, key=starts.get)
    assert order == [0, 1, 2, 3, 4]
    for i in range(4):
        assert starts[order[i + 1]] - starts[order[i]] >= 0.5 - 1e-9
    for deadline, key in cluster:  # each one finishes before its deadline - margin
        assert starts[key] + 0.5 <= deadline - 1.0 + 1e-9
    assert starts[0] == pytest.approx(100.1 - 1.0 - 0.5 * 5)


def test_each_connection_gets_its_own_deadline_below_recycle(clock, engine_factory):
    pool = engine_factory(pool_recycle=R, recycle_jitter=0.5).pool
    open_n(pool, 5)
    states = list(pool._ledger.states.values())
    deadlines = {s.deadline - s.connected_at for s in states}
    assert len(deadlines) == 5
    assert all(R * 0.5 <= d <= R for d in deadlines)
    # SQLAlchemy's own check (now - starttime > recycle) fires at our deadline.
    for rec, state in pool._ledger.states.items():
        assert rec.starttime + R == pytest.approx(state.deadline)


def test_idle_connections_are_replaced_before_their_deadline(clock, engine_factory):
    pool = engine_factory(pool_recycle=R, recycle_jitter=0.5).pool
    open_n(pool, 5)
    first = dbapi_ids(pool)
    starts = pool._maintenance.schedule()
    deadlines = {rec: s.deadline for rec, s in pool._ledger.states.items()}
    assert all(starts[rec] < deadlines[rec] - pool._maintenance.lead for rec in deadlines)

    # Replacements due within BATCH of the pass are made in it: not before that.
    clock.now = min(starts.values()) - BATCH - 0.001
    pool._maintenance.maintain()
    assert dbapi_ids(pool) == first  # nothing due yet

    clock.now = max(starts.values())
    pool._maintenance.maintain()
    assert dbapi_ids(pool).isdisjoint(first)  # every connection replaced...
    stats = pool.stats()
    assert stats.idle == 5 and stats.open == 5
    assert stats.retirements["lifetime"] == 5
    assert stats.checkouts_waited == 5  # ...by the worker: only warm-up waited

    # No checkout pays a reconnect: checking all five out opens nothing.
    open_n(pool, 5)
    assert pool.stats().connects == 10


def test_in_use_connection_is_retired_at_checkin_with_a_spare_ready(clock, engine_factory):
    pool = engine_factory(pool_recycle=R, recycle_jitter=0.0).pool
    conn = pool.connect()
    rec = conn._connection_record
    old_dbapi = rec.dbapi_connection
    clock.advance(R)
    pool._maintenance.maintain()
    # Still open while in use; a spare waits to take its place.
    assert rec.dbapi_connection is old_dbapi
    assert rec in pool._doomed and len(pool._ledger.spares) == 1
    conn.close()  # checkin: the spare goes in, the old one goes to the worker
    assert pool._ledger.spares == [] and len(pool._ledger.retiring) == 1
    assert pool.checkedin() == 1
    pool._maintenance.maintain()
    assert rec.dbapi_connection is None  # closed, off the request path
    stats = pool.stats()
    assert stats.retirements["lifetime"] == 1 and stats.open == 1 and stats.idle == 1
    assert stats.checkouts_waited == 1


def test_doomed_checkin_without_spare_refills_the_slot(clock, engine_factory):
    pool = engine_factory(pool_recycle=R).pool
    conn = pool.connect()
    rec = conn._connection_record
    # As if marked while no spare could be opened.
    pool._doomed[rec] = ("manual", rec.info[INFO_KEY])
    conn.close()
    assert pool.checkedin() == 0  # slot empty until the worker refills it
    pool._maintenance.maintain()
    assert pool.checkedin() == 1 and rec.dbapi_connection is None
    assert pool.stats().retirements["manual"] == 1


def test_sqlalchemy_check_is_the_safety_net_when_the_worker_is_late(clock, engine_factory):
    pool = engine_factory(pool_recycle=R, recycle_jitter=0.0).pool
    open_n(pool, 1)
    clock.advance(R + 1)  # no maintenance pass ran
    conn = pool.connect()  # SQLAlchemy recycles it inside this checkout
    conn.close()
    stats = pool.stats()
    assert stats.retirements["lifetime"] == 1
    assert stats.checkouts_waited == 2


def test_recycle_is_graceful_and_spread(clock, engine_factory):
    pool = engine_factory(pool_recycle=R).pool
    open_n(pool, 4)
    in_use = pool.connect()
    cursor = in_use.cursor()
    cursor.execute("create table if not exists t (x int)")
    cursor.execute("insert into t values (1)")  # an open transaction
    received = []
    signals.recycle_requested.connect(lambda sender, **kw: received.append(kw), weak=False)
    try:
        assert pool.recycle(spread=10.0) == 4
    finally:
        signals.recycle_requested.receivers.clear()
    assert received == [{"host": None, "spread": 10.0, "reason": "manual"}]
    retire_at = sorted(s.retire_at for s in pool._ledger.states.values())
    assert retire_at[0] >= clock.now and retire_at[-1] <= clock.now + 10
    assert len(set(retire_at)) == 4  # spread, not all at once
    # Stratified: one moment in each quarter of the spread.
    assert sorted(int((t - clock.now) // 2.5) for t in retire_at) == [0, 1, 2, 3]

    clock.advance(10)
    pool._maintenance.maintain()
    stats = pool.stats()
    assert stats.retirements["manual"] == 3  # the three idle ones
    # The one in use was not touched: its transaction goes on and commits.
    cursor.execute("insert into t values (2)")
    in_use.commit()
    in_use.close()
    pool._maintenance.maintain()
    assert pool.stats().retirements["manual"] == 4
    assert pool.stats().open == 4


def test_recycle_by_host_touches_only_that_host(clock, engine_factory):
    pool = engine_factory().pool
    open_n(pool, 2)
    assert pool.recycle(host="elsewhere:5432") == 0
    assert pool.recycle(host="local") == 2


def test_recycle_validates_its_arguments(clock, engine_factory):
    pool = engine_factory().pool
    for spread in (-1, float("nan"), float("inf"), 10**400, 86400.5, "5", True):
        with pytest.raises(ValueError, match="spread"):
            pool.recycle(spread=spread)
    for host in ("", "  ", 5):
        with pytest.raises(ValueError, match="host"):
            pool.recycle(host=host)
    with pytest.raises(ValueError, match="reason"):
        pool.recycle(reason="because")
    assert pool.recycle(spread=0) == 0 and pool.recycle(spread=86400) == 0


def test_pinned_connection_is_exempt_from_every_recycle(clock, engine_factory):
    engine = engine_factory(pool_recycle=R, recycle_jitter=0.0)
    pool = engine.pool
    with engine.connect() as conn:
        sqla_rebalance.pin(conn)
        assert sqla_rebalance.is_pinned(conn)
        dbapi = conn.connection.dbapi_connection
        pool.recycle()
        for _ in range(5):  # far past its deadline, several passes
            clock.advance(R)
            pool._maintenance.maintain()
        assert conn.connection.dbapi_connection is dbapi
    # Returned to the pool while pinned: still kept, even through checkouts.
    clock.advance(R)
    pool._maintenance.maintain()
    with engine.connect() as conn:
        assert conn.connection.dbapi_connection is dbapi
        sqla_rebalance.unpin(conn)
    pool._maintenance.maintain()
    assert pool.stats().retirements["lifetime"] == 1
    assert all(r.dbapi_connection is not dbapi for r in pool._ledger.states)


def test_pin_rejects_foreign_connections(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path}/x.db")
    with engine.connect() as conn, pytest.raises(sqla_rebalance.NotPooledError):
        sqla_rebalance.pin(conn)
    with pytest.raises(sqla_rebalance.NotPooledError):
        sqla_rebalance.pin(object())


def test_min_size_prefills_in_the_background(clock, engine_factory):
    pool = engine_factory(min_size=3).pool
    assert pool.checkedin() == 0
    pool._maintenance.maintain()
    stats = pool.stats()
    assert stats.idle == 3 and stats.checkouts_waited == 0
    open_n(pool, 3)
    assert pool.stats().connects == 3


def test_max_idle_closes_unneeded_connections_down_to_min_size(clock, engine_factory):
    pool = engine_factory(min_size=1, max_idle=60).pool
    open_n(pool, 4)
    pool._maintenance.maintain()
    for _ in range(7):
        clock.advance(10)
        pool._maintenance.maintain()
    stats = pool.stats()
    assert stats.open == 1 and stats.retirements["idle"] == 3
    assert pool.checkedin() + pool.checkedout() == 1


def test_max_idle_keeps_connections_that_were_needed(clock, engine_factory):
    pool = engine_factory(min_size=0, max_idle=60).pool
    open_n(pool, 3)
    for _ in range(7):
        clock.advance(10)
        held = [pool.connect() for _ in range(3)]  # all three busy at every pass
        pool._maintenance.maintain()
        for c in held:
            c.close()
    assert pool.stats().retirements["idle"] == 0 and pool.stats().open == 3


def test_invalidated_idle_connections_are_reconnected_in_the_background(clock, engine_factory):
    pool = engine_factory().pool
    open_n(pool, 3)
    conn = pool.connect()
    clock.advance(1)
    pool._invalidate(conn)  # what a disconnect error does: all older ones are stale
    conn.close()
    clock.advance(1)
    pool._maintenance.maintain()
    assert pool.stats().retirements["error"] >= 3
    before = pool.stats().connects
    open_n(pool, 3)
    assert pool.stats().connects == before  # no checkout reconnected


def test_starttime_shift_never_crosses_an_invalidation(clock, engine_factory):
    """A connection opened right after a pool invalidation must not look invalidated
    (that would reconnect at every checkout, forever)."""
    pool = engine_factory(pool_recycle=R, recycle_jitter=0.9).pool
    open_n(pool, 1)
    conn = pool.connect()
    clock.advance(1)
    pool._invalidate(conn)
    conn.close()
    clock.advance(0.001)
    for _ in range(3):
        c = pool.connect()
        c.close()
    # One reconnect for the invalidation, then the connection is stable.
    assert pool.stats().connects == 2
    rec = next(iter(pool._ledger.states))
    assert rec.starttime > pool._invalidate_time


def test_stats_and_signals_report_retirements(clock, engine_factory):
    pool = engine_factory(pool_recycle=R, recycle_jitter=0.0, pool_name="orders").pool
    opened, retired = [], []
    signals.connection_opened.connect(lambda s, **kw: opened.append((s, kw)), weak=False)
    signals.connection_retired.connect(lambda s, **kw: retired.append((s, kw)), weak=False)
    try:
        open_n(pool, 2)
        clock.advance(R)
        pool._maintenance.maintain()
    finally:
        signals.connection_opened.receivers.clear()
        signals.connection_retired.receivers.clear()
    assert [kw["background"] for _, kw in opened] == [False, False, True, True]
    assert all(s is pool for s, _ in opened + retired)
    assert [(kw["reason"], kw["host"]) for _, kw in retired] == [("lifetime", "local")] * 2
    assert all(kw["age"] == pytest.approx(R) for _, kw in retired)
    data = pool.stats().as_dict()
    assert data["pool_name"] == "orders"
    assert data["retirements"]["lifetime"] == 2
    assert data["hosts"]["local"]["open"] == 2
    import json

    json.dumps(data)


def test_state_lives_in_record_info(clock, engine_factory):
    engine = engine_factory()
    with engine.connect() as conn:
        assert conn.connection.info[INFO_KEY].host == "local"


def test_dispose_closes_idle_and_spares_but_not_in_use(clock, engine_factory):
    engine = engine_factory(pool_recycle=R, recycle_jitter=0.0)
    pool = engine.pool
    open_n(pool, 3)
    held = pool.connect()
    clock.advance(R)
    pool._maintenance.maintain()
    assert len(pool._ledger.spares) == 1
    engine.dispose()
    assert pool._ledger.spares == [] and pool.checkedin() == 0
    assert held.dbapi_connection is not None  # in use: untouched
    assert pool.stats().retirements["dispose"] >= 1
    held.close()


def test_detached_connection_is_no_longer_managed(clock, engine_factory):
    engine = engine_factory(pool_recycle=R)
    pool = engine.pool
    conn = pool.connect()
    dbapi = conn.dbapi_connection
    conn.detach()
    assert all(s.dbapi is not dbapi for s in pool._ledger.states.values())
    clock.advance(R)
    pool._maintenance.maintain()
    dbapi.execute("select 1")  # ours to use, never closed by the pool
    conn.close()
    assert pool.stats().retirements["lifetime"] == 0


def test_marked_connection_checked_in_early_uses_its_spare(clock, engine_factory):
    pool = engine_factory(pool_recycle=R, recycle_jitter=0.0).pool
    conn = pool.connect()
    rec = conn._connection_record
    clock.advance(R)
    pool._maintenance.maintain()  # marked, spare opened
    pool._doomed.pop(rec)  # as if it was checked in just before being marked...
    conn.close()
    pool._doomed[rec] = ("lifetime", rec.info[INFO_KEY])  # ...and marked right after
    pool._schedule.request()  # (the marking pass re-reads in_use: it comes back at once)
    pool._maintenance.maintain()
    stats = pool.stats()
    assert stats.connects == 2  # the spare took its place; nothing extra opened
    assert stats.retirements["lifetime"] == 1
    assert stats.idle == 1
    assert pool._ledger.spares == []


def test_mark_is_dropped_if_the_connection_was_checked_in_while_its_spare_opened(
    clock, engine_factory
):
    pool = engine_factory(pool_size=1, max_overflow=3, pool_recycle=R, recycle_jitter=0.0).pool
    a, b = pool.connect(), pool.connect()  # b is an overflow connection
    clock.advance(R)
    real_open_spare = pool._maintenance.open_spare

    def open_spare_while_app_checks_in(now, replacing=None):
        a.close()
        b.close()  # QueuePool closes this overflow connection at checkin
        return real_open_spare(now, replacing)

    pool._maintenance.open_spare = open_spare_while_app_checks_in
    pool._maintenance.maintain()
    pool._maintenance.open_spare = real_open_spare
    assert pool._doomed == {}  # no stale mark...
    for _ in range(3):
        pool._maintenance.maintain()
    assert pool._ledger.spares == []  # ...so no spare held open for nothing


def test_connection_pinned_while_its_spare_opened_is_not_retired(clock, engine_factory):
    engine = engine_factory(pool_recycle=R, recycle_jitter=0.0)
    pool = engine.pool
    conn = engine.connect()
    clock.advance(R)
    real_open_spare = pool._maintenance.open_spare

    def open_spare_while_app_pins(now, replacing=None):
        sqla_rebalance.pin(conn)
        return real_open_spare(now, replacing)

    pool._maintenance.open_spare = open_spare_while_app_pins
    pool._maintenance.maintain()
    pool._maintenance.open_spare = real_open_spare
    dbapi = conn.connection.dbapi_connection
    conn.close()
    pool._maintenance.maintain()
    assert pool.stats().retirements["lifetime"] == 0
    with engine.connect() as again:
        assert again.connection.dbapi_connection is dbapi


def test_spare_that_waits_past_its_deadline_is_replaced(clock, engine_factory):
    pool = engine_factory(pool_size=2, pool_recycle=R, recycle_jitter=0.0).pool
    held = pool.connect()  # held for a long time
    clock.advance(R)
    pool._maintenance.maintain()
    first_spare = pool._ledger.spares[0]
    for _ in range(int(3 * R)):
        clock.advance(1)
        pool._maintenance.maintain()
    assert first_spare.dbapi_connection is None  # closed when it came due
    assert len(pool._ledger.spares) == 1
    assert clock.now - pool._ledger.spares[0].info[INFO_KEY].connected_at < R  # a fresh one
    held.close()
    before = pool.stats().checkouts_waited
    c = pool.connect()  # before the worker's next pass: gets the fresh spare
    c.close()
    assert pool.stats().checkouts_waited == before


def test_poke_during_a_pass_is_not_lost(clock, engine_factory):
    pool = engine_factory().pool
    real = pool._maintenance.maintain_pass

    def pass_during_which_a_checkin_pokes(now):
        result = real(now)
        pool._schedule.request()
        return result

    pool._maintenance.maintain_pass = pass_during_which_a_checkin_pokes
    pool._run_maintenance()
    assert pool._next_due == 0.0


def test_invalidation_during_connect_still_applies(clock, engine_factory):
    pool = engine_factory(pool_recycle=R, recycle_jitter=0.5).pool
    real_creator = pool._invoke_creator

    def connect_while_pool_is_invalidated(rec):
        clock.advance(0.5)
        pool._invalidate_time = clock.now  # e.g. another thread saw a disconnect
        clock.advance(0.5)
        return real_creator(rec)

    pool._invoke_creator = connect_while_pool_is_invalidated
    c = pool.connect()
    rec = c._connection_record
    c.close()
    from sqla_rebalance import _sa

    assert _sa.is_invalidated(pool, rec)  # as QueuePool would treat it


def test_a_failing_signal_receiver_never_breaks_the_pool(tmp_path, caplog):
    engine = create_engine(
        f"sqlite:///{tmp_path}/r.db", poolclass=RebalancingQueuePool, pool_size=2, min_size=2
    )
    calls: list[str] = []

    def broken(sender, **kw):
        raise RuntimeError("receiver bug")

    def fine(sender, **kw):
        calls.append(kw["reason"])

    signals.connection_retired.connect(broken, sender=engine.pool)
    signals.connection_retired.connect(fine, sender=engine.pool)
    try:
        wait_for(lambda: engine.pool.stats().idle == 2)
        engine.pool.recycle()
        wait_for(lambda: engine.pool.stats().retirements["manual"] == 2)
        with engine.connect() as conn:  # the pool still works
            assert conn.execute(text("select 1")).scalar() == 1
    finally:
        signals.connection_retired.disconnect(broken)
        signals.connection_retired.disconnect(fine)
        engine.dispose()
    assert calls[:2] == ["manual", "manual"]  # the other receiver still ran, every time
    assert any("receiver bug" in r.getMessage() or r.exc_info for r in caplog.records)


def test_a_do_connect_listener_added_after_create_engine_sees_the_prefill(tmp_path):
    from sqlalchemy import event

    engine = create_engine(
        f"sqlite:///{tmp_path}/p.db", poolclass=RebalancingQueuePool, pool_size=3, min_size=3
    )
    seen: list[str] = []

    @event.listens_for(engine, "do_connect")
    def provide(dialect, conn_rec, cargs, cparams):
        seen.append("do_connect")  # where an application would set the current password

    try:
        wait_for(lambda: engine.pool.stats().idle == 3)
        assert seen == ["do_connect"] * 3
    finally:
        engine.dispose()


def test_the_pool_logs_under_sqlalchemys_pool_logger(engine_factory, caplog):
    """Drop-in: the ``sqlalchemy.pool`` logger (and ``echo_pool``) sees the pool's own lines."""
    engine = engine_factory(pool_recycle=R, pool_logging_name="orders")
    assert engine.pool.logger.name == "sqlalchemy.pool.impl.RebalancingQueuePool.orders"
    with caplog.at_level("INFO", logger="sqlalchemy.pool"):
        open_n(engine.pool, 2)
        engine.pool.recycle(reason="manual")
    assert any(
        r.name.startswith("sqlalchemy.pool") and "recycle requested" in r.getMessage()
        for r in caplog.records
    )


def test_a_base_exception_from_a_connect_never_stops_maintenance(tmp_path):
    """A ``connect`` listener raising a BaseException (gevent's Timeout is one) is a failed
    background connect: retried with backoff; no thread of the pool or the worker dies."""
    from sqlalchemy import event

    from sqla_rebalance.worker import get_worker

    class Escape(BaseException):
        pass

    failures = {"left": 3}
    engine = create_engine(
        f"sqlite:///{tmp_path}/b.db", poolclass=RebalancingQueuePool, pool_size=3, min_size=3
    )

    @event.listens_for(engine, "connect")
    def flaky(dbapi_connection, record):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise Escape

    try:
        wait_for(lambda: engine.pool.checkedin() == 3, timeout=30)  # retried until filled
        assert failures["left"] == 0
        assert get_worker().thread is not None and get_worker().thread.is_alive()
        engine.pool.recycle()  # maintenance still answers
        wait_for(lambda: engine.pool.stats().retirements["manual"] == 3, timeout=30)
    finally:
        engine.dispose()


def test_a_pass_scans_the_connections_only_when_asked_or_due(clock, engine_factory):
    """The worker's cost follows the work: a pass with nothing asked for and nothing
    of its plan due looks at no connection; a request, or the plan's time, does."""
    pool = engine_factory(pool_recycle=R, recycle_jitter=0.5).pool
    open_n(pool, 5)
    maintenance = pool._maintenance
    maintenance.maintain()
    scans = maintenance.scans
    planned = maintenance.scan_due
    assert planned > clock.now
    clock.now = planned - 0.01
    maintenance.maintain()
    assert maintenance.scans == scans  # nothing due, nothing asked: no scan
    pool._schedule.request()
    maintenance.maintain()
    assert maintenance.scans == scans + 1
    clock.now = maintenance.scan_due
    maintenance.maintain()
    assert maintenance.scans == scans + 2


def test_connections_opened_by_checkouts_are_in_the_plan_of_a_pass_that_only_checks_hosts(
    clock, engine_factory
):
    """A connection opened by a checkout asks for a full scan by the time it comes due.
    A pass that comes sooner anyway (a health check, or the pass already in flight when the
    checkout connected) and does not scan must keep that in its plan. It did not: a warm-up's
    connections were left to SQLAlchemy's recycle inside a checkout (the recycle storm
    benchmark's intermittent "checkouts waited", 3 runs in 6)."""
    recycle = 30.0  # below IDLE_PASS: due before the safety-net pass
    pool = engine_factory(pool_recycle=recycle, recycle_jitter=0.5).pool
    maintenance = pool._maintenance
    maintenance.maintain()  # an empty pool: nothing planned before IDLE_PASS
    assert maintenance.scan_due >= clock.now + IDLE_PASS
    pool._schedule.next_due = clock.now  # a pass is due now anyway
    open_n(pool, 3)  # connected inside checkouts, not by a pass
    ends = [state.ends_at for state in pool._ledger.states.values()]
    assert len(ends) == 3 and max(ends) < clock.now + IDLE_PASS
    scans = maintenance.scans
    maintenance.maintain()
    assert maintenance.scans == scans  # nothing asked for now: no scan...
    assert maintenance.scan_due <= min(ends) - replacement_lead(recycle)  # ...but one is planned
    clock.now = maintenance.scan_due
    maintenance.maintain()
    assert maintenance.scans == scans + 1
    # Followed through: each connection is replaced before SQLAlchemy would recycle it.
    first = list(pool._ledger.states.values())
    for state in sorted(first, key=lambda st: st.ends_at):
        while not state.closed:
            assert maintenance.scan_due < state.ends_at
            clock.now = maintenance.scan_due
            maintenance.maintain()
    assert pool.stats().retirements["lifetime"] == 3


def test_lifetime_replacements_due_together_are_batched(clock, engine_factory):
    """Replacements due within BATCH of the first one are made in its pass."""
    pool = engine_factory(pool_recycle=R, recycle_jitter=0.5).pool
    open_n(pool, 5)
    starts = sorted(pool._maintenance.schedule().values())
    clock.now = starts[0]
    pool._maintenance.maintain()
    batched = sum(1 for s in starts if s <= starts[0] + BATCH)
    assert pool.stats().retirements["lifetime"] == batched


def test_the_worker_dispatches_only_the_pools_that_are_due():
    """One heap across pools: poking one pool's key runs that pool's pass, and no
    other pool is looked at (their due times are far)."""
    import threading

    from sqla_rebalance import clock as sched_clock
    from sqla_rebalance.worker import MaintenanceWorker

    class Fake:
        def __init__(self) -> None:
            self._next_due = sched_clock.now() + 1000.0
            self.runs = 0
            self.ran = threading.Event()

        def _run_maintenance(self) -> None:
            self.runs += 1
            self._next_due = sched_clock.now() + 1000.0
            self.ran.set()

    worker = MaintenanceWorker()
    pools = [Fake() for _ in range(200)]
    for p in pools:
        worker.register(p)
    try:
        target = pools[137]
        target._next_due = 0.0
        worker.poke(id(target))
        assert target.ran.wait(10)
        wait_for(lambda: worker._due.get(id(target), 0.0) > sched_clock.now() + 100)
        assert target.runs == 1
        assert sum(p.runs for p in pools) == 1
        # Every pool keeps exactly one live due time in the heap.
        assert len(worker._due) == 200
    finally:
        for p in pools:
            worker.unregister(p)
        wait_for(lambda: worker.thread is None)


def test_the_worker_never_sleeps_towards_a_stale_due_time():
    """A pool whose due time moved later leaves a stale heap entry behind; the worker
    drops it before sleeping instead of waking up for it (a wasted wake-up per pass)."""
    from sqla_rebalance import clock as sched_clock
    from sqla_rebalance.worker import MaintenanceWorker

    class Fake:
        def __init__(self) -> None:
            self._next_due = sched_clock.now() + 50.0

        def _run_maintenance(self) -> None:  # pragma: no cover - never due here
            self._next_due = sched_clock.now() + 1000.0

    worker = MaintenanceWorker()
    pool = Fake()
    worker.register(pool)
    try:
        wait_for(lambda: id(pool) in worker._due)
        pool._next_due = sched_clock.now() + 1000.0
        worker.poke(id(pool))

        def heap_top_is_live() -> bool:
            heap = list(worker._heap)
            return bool(heap) and heap[0][0] > sched_clock.now() + 100

        wait_for(heap_top_is_live, timeout=5)
    finally:
        worker.unregister(pool)
        wait_for(lambda: worker.thread is None)


def test_a_due_connection_a_pass_could_not_take_is_looked_at_again_soon(clock, engine_factory):
    """A connection due to retire that was neither idle nor checked out while the pass
    ran (a health check had borrowed it) is looked at again at once, not only when
    the idle safety net comes round."""
    from sqla_rebalance import _sa
    from sqla_rebalance.lifetime import state_of
    from sqla_rebalance.maintenance import IDLE_PASS, MISSED_RETRY

    pool = engine_factory().pool
    open_n(pool, 2)
    maintenance = pool._maintenance
    maintenance.maintain()
    rec = _sa.idle_records(pool)[0]
    state = state_of(rec)
    assert state is not None
    state.retire_at, state.retire_reason = clock.now - 1, "rebalance"
    assert _sa.remove_idle(pool, rec)  # borrowed while the pass runs
    pool._schedule.request()
    due = maintenance.maintain()
    assert pool.stats().retirements["rebalance"] == 0
    assert due <= clock.now + MISSED_RETRY < clock.now + IDLE_PASS
    _sa.queue_pool_return(pool, rec)  # given back
    clock.now = due
    maintenance.maintain()
    assert pool.stats().retirements["rebalance"] == 1
