"""The connection event log, against real databases: SQLite files, and PostgreSQL.

The application pools are RebalancingQueuePools on SQLite files (a file per
"host"); the log writes to another SQLite file, or to the PostgreSQL server of
the ``pg_url`` fixture. Connections are retired with ``invalidate()`` (reason
``error``) and ``engine.dispose()`` (reason ``dispose``), which retire at once
and in the calling thread, so no test waits for the maintenance worker.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, delete, event, select, text
from sqlalchemy.pool import QueuePool, StaticPool

from sqla_rebalance import RebalancingQueuePool, signals
from sqla_rebalance.eventlog import DEFAULT_TABLE, EventLog

from .helpers import manual_maintenance, wait_for

PROCESS = f"{socket.gethostname()}:{os.getpid()}"


def utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=timezone.utc)


@pytest.fixture
def make_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Engine]]:
    """Application engines on SQLite files, disposed after the test.

    Kept out of the maintenance worker, which would otherwise reconnect an
    invalidated connection in the background: an extra event, at any time.
    """
    manual_maintenance(monkeypatch)
    made: list[Engine] = []

    def make(**kw: Any) -> Engine:
        kw.setdefault("pool_size", 5)
        kw.setdefault("max_overflow", 0)
        kw.setdefault("pool_name", "evlog-app")
        engine = create_engine(f"sqlite:///{tmp_path}/app.db", poolclass=RebalancingQueuePool, **kw)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.dispose()


@pytest.fixture
def make_log(tmp_path: Path) -> Iterator[Callable[..., EventLog]]:
    """Event logs, by default on ``tmp_path/log.db`` with no background thread."""
    made: list[EventLog] = []

    def make(target: Any = None, **kw: Any) -> EventLog:
        kw.setdefault("flush_interval", None)
        event_log = EventLog(target or f"sqlite:///{tmp_path}/log.db", **kw)
        made.append(event_log)
        return event_log

    yield make
    for event_log in made:
        event_log.close(timeout=5)


@pytest.fixture
def sent() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Every connection signal of this test's pools (named ``evlog-*``), as (name, kwargs)."""
    got: list[tuple[str, dict[str, Any]]] = []

    def ours(sender: Any) -> bool:  # not the pools other tests left behind
        return str(getattr(sender, "pool_name", "")).startswith("evlog-")

    def opened(sender: Any, **kw: Any) -> None:
        if ours(sender):
            got.append(("opened", kw))

    def retired(sender: Any, **kw: Any) -> None:
        if ours(sender):
            got.append(("retired", kw))

    signals.connection_opened.connect(opened, weak=False)
    signals.connection_retired.connect(retired, weak=False)
    yield got
    signals.connection_opened.disconnect(opened)
    signals.connection_retired.disconnect(retired)


def rows(event_log: EventLog, engine: Engine | None = None) -> list[dict[str, Any]]:
    table = event_log.table
    with (engine or event_log.engine).connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(table).order_by(table.c.id))]


# --------------------------------------------------------------------------- rows


def test_rows_have_host_reason_and_times(make_app, make_log, tmp_path, sent):
    files = [str(tmp_path / "a.db"), str(tmp_path / "b.db")]
    engine = make_app(hosts=files, pool_name="evlog-orders")
    event_log = make_log().watch(engine)
    c1, c2 = engine.connect(), engine.connect()
    c1.invalidate()  # retired now, reason "error"
    c1.close()
    c2.close()  # back to the pool, still open
    assert event_log.flush() == 3

    (o1, o2, r1) = (kw for _name, kw in sent)
    assert [name for name, _ in sent] == ["opened", "opened", "retired"]
    assert r1["connection_id"] == o1["connection_id"]
    got = rows(event_log)
    assert len(got) == 2
    by_id = {r["connection_id"]: r for r in got}
    closed, still_open = by_id[o1["connection_id"]], by_id[o2["connection_id"]]
    assert {closed["host"], still_open["host"]} == set(files)  # one per host
    assert closed["host"] == o1["host"] and still_open["host"] == o2["host"]
    assert closed["opened_at"] == utc(o1["connected_at"])
    assert closed["closed_at"] == utc(r1["closed_at"])
    assert closed["reason"] == "error"
    assert still_open["opened_at"] == utc(o2["connected_at"])
    assert still_open["closed_at"] is None and still_open["reason"] is None
    for row in got:
        assert row["pool"] == "evlog-orders"
        assert row["process"] == PROCESS
        assert row["background"] is False  # opened by the checkout itself
        assert row["opened_at"].tzinfo is not None  # aware UTC, even on SQLite


def test_open_and_retire_in_one_batch_become_one_row(make_app, make_log, sent):
    engine = make_app()
    event_log = make_log().watch(engine)
    conn = engine.connect()
    conn.invalidate()
    conn.close()
    event_log.flush()
    (opened, retired) = (kw for _name, kw in sent)
    (row,) = rows(event_log)
    assert row["connection_id"] == opened["connection_id"]
    assert row["opened_at"] == utc(opened["connected_at"])  # the original connect time
    assert row["closed_at"] == utc(retired["closed_at"])
    assert row["reason"] == "error"
    stats = event_log.stats()
    assert (stats.written, stats.batches, stats.pending, stats.dropped) == (2, 1, 0, 0)


def test_retire_in_a_later_batch_updates_the_row(make_app, make_log, sent):
    engine = make_app()
    event_log = make_log().watch(engine)
    conn = engine.connect()
    event_log.flush()
    (before,) = rows(event_log)
    assert before["closed_at"] is None

    conn.invalidate()
    conn.close()
    assert event_log.flush() == 1
    (after,) = rows(event_log)  # the same row, closed: no second row
    assert after["id"] == before["id"]
    assert after["opened_at"] == before["opened_at"]
    assert after["closed_at"] == utc(sent[-1][1]["closed_at"])
    assert after["reason"] == "error"
    assert event_log.stats().batches == 2


def test_retire_whose_row_is_missing_inserts_a_closed_row(make_app, make_log, sent):
    engine = make_app()
    event_log = make_log().watch(engine)
    conn = engine.connect()
    event_log.flush()
    with event_log.engine.begin() as c:  # the open's row is gone (deleted, or never written)
        c.execute(delete(event_log.table))
    conn.invalidate()
    conn.close()
    event_log.flush()
    (row,) = rows(event_log)
    opened = sent[0][1]
    assert row["connection_id"] == opened["connection_id"]
    assert row["opened_at"] == utc(opened["connected_at"])  # from the retire event itself
    assert row["reason"] == "error" and row["closed_at"] is not None
    assert row["background"] is None  # only the open event knows


def test_retire_of_an_earlier_process_with_the_same_pid_is_left_alone(make_app, make_log, sent):
    # A row left open by a process that died, whose pid and connection id
    # happen to be ours again: matched on the connect time, so never closed.
    engine = make_app()
    event_log = make_log().watch(engine)
    conn = engine.connect()
    event_log.flush()
    with event_log.engine.begin() as c:
        c.execute(
            event_log.table.update().values(opened_at=datetime(2001, 1, 1, tzinfo=timezone.utc))
        )
    conn.invalidate()
    conn.close()
    event_log.flush()
    old, new = rows(event_log)
    assert old["closed_at"] is None
    assert new["closed_at"] is not None and new["opened_at"] == utc(sent[0][1]["connected_at"])


def test_the_table_is_created_with_its_name_and_columns(make_app, make_log, tmp_path):
    assert make_log().table.name == DEFAULT_TABLE
    engine = make_app()
    event_log = make_log(table="events_custom").watch(engine)
    assert event_log.table.name == "events_custom"
    with engine.connect():
        pass
    event_log.flush()
    with sqlite3.connect(tmp_path / "log.db") as raw:
        cols = [r[1] for r in raw.execute("pragma table_info(events_custom)")]
        indexes = {r[1] for r in raw.execute("pragma index_list(events_custom)")}
    assert cols == [
        "id",
        "pool",
        "process",
        "connection_id",
        "host",
        "opened_at",
        "closed_at",
        "reason",
        "background",
    ]
    assert indexes == {"ix_events_custom_process_conn", "ix_events_custom_opened_at"}


# --------------------------------------------------------------------------- limits


def test_full_buffer_counts_drops_exactly(make_app, make_log, caplog):
    engine = make_app(pool_size=5)
    event_log = make_log(buffer_size=3).watch(engine)
    conns = [engine.connect() for _ in range(5)]  # five opened events, room for three
    for conn in conns:
        conn.close()  # back to the pool: no more events
    for _ in range(3):  # reading the counter must not change it
        stats = event_log.stats()
        assert (stats.dropped, stats.dropped_full, stats.pending) == (2, 2, 3)
    with caplog.at_level(logging.WARNING, logger="sqla_rebalance.eventlog"):
        assert event_log.flush() == 3
    assert len(rows(event_log)) == 3
    stats = event_log.stats()
    assert (stats.written, stats.dropped, stats.dropped_failed, stats.pending) == (3, 2, 0, 0)
    assert any("2 connection events dropped" in r.getMessage() for r in caplog.records)


def test_failed_flush_is_retried_once_then_counted(make_app, make_log, tmp_path, caplog):
    engine = make_app()
    event_log = make_log(f"sqlite:///{tmp_path}/missing-dir/log.db").watch(engine)
    caplog.set_level(logging.WARNING, logger="sqla_rebalance.eventlog")
    a, b = engine.connect(), engine.connect()
    assert event_log.flush() == 0
    stats = event_log.stats()
    # First failure: kept for its one retry, nothing lost yet, nothing said yet.
    assert (stats.flush_errors, stats.failed_flushes, stats.pending, stats.dropped) == (1, 0, 2, 0)
    assert "unable to open database file" in (stats.last_error or "")
    assert not caplog.records

    assert event_log.flush() == 0  # the retry fails too: counted as dropped
    stats = event_log.stats()
    assert (stats.flush_errors, stats.failed_flushes, stats.pending) == (2, 1, 0)
    assert (stats.dropped, stats.dropped_failed, stats.written) == (2, 2, 0)
    assert len(caplog.records) == 1
    assert "write failed twice: 2" in caplog.records[0].getMessage()

    a.invalidate()  # one more event, lost the same way, but not reported again so soon
    event_log.flush()
    event_log.flush()
    stats = event_log.stats()
    assert (stats.failed_flushes, stats.dropped, stats.flush_errors) == (2, 3, 4)
    assert len(caplog.records) == 1  # rate-limited
    a.close()
    b.close()


def test_a_retry_that_succeeds_writes_the_batch(make_app, make_log, tmp_path):
    engine = make_app()
    event_log = make_log(f"sqlite:///{tmp_path}/later/log.db").watch(engine)
    with engine.connect(), engine.connect():
        pass
    assert event_log.flush() == 0
    (tmp_path / "later").mkdir()  # the log database is back
    assert event_log.flush() == 2
    stats = event_log.stats()
    assert (stats.written, stats.dropped, stats.flush_errors, stats.failed_flushes) == (2, 0, 1, 0)
    assert len(rows(event_log)) == 2


# --------------------------------------------------------------------------- when it flushes


def test_close_flushes_and_stops_logging(make_app, make_log, tmp_path):
    engine = make_app()
    event_log = make_log(flush_interval=3600.0).watch(engine)  # the timer never fires here
    with engine.connect():
        pass
    assert event_log.stats().pending == 1
    event_log.close()
    reader = create_engine(f"sqlite:///{tmp_path}/log.db")
    assert len(rows(event_log, reader)) == 1
    assert event_log.stats().written == 1
    conn = engine.connect()  # a new connection after close() is not logged
    conn.invalidate()
    conn.close()
    assert event_log.stats().pending == 0
    event_log.close()  # idempotent
    reader.dispose()


def test_background_thread_flushes_on_its_interval(make_app, make_log):
    engine = make_app()
    event_log = make_log(flush_interval=0.05).watch(engine)
    with engine.connect():
        pass
    wait_for(lambda: event_log.stats().written == 1)
    assert len(rows(event_log)) == 1


def test_a_full_batch_wakes_the_flusher_early(make_app, make_log):
    engine = make_app(pool_size=3)
    event_log = make_log(flush_interval=3600.0, batch_size=3).watch(engine)
    conns = [engine.connect() for _ in range(3)]
    wait_for(lambda: event_log.stats().written == 3)
    for conn in conns:
        conn.close()


def test_engine_dispose_flushes_and_the_engine_stays_watched(make_app, make_log, tmp_path):
    engine = make_app()
    event_log = make_log(flush_interval=3600.0).watch(engine)
    a, b = engine.connect(), engine.connect()
    a.close()
    b.close()
    engine.dispose()  # retires both ("dispose") and flushes, without flush()/close()
    reader = create_engine(f"sqlite:///{tmp_path}/log.db")
    got = rows(event_log, reader)
    assert [r["reason"] for r in got] == ["dispose", "dispose"]
    assert event_log.stats().pending == 0

    with engine.connect():  # the engine's new pool is logged too
        pass
    assert event_log.stats().pending == 1
    event_log.flush()
    assert len(rows(event_log, reader)) == 3
    reader.dispose()


def test_a_garbage_collected_pool_wakes_the_flusher(make_log, tmp_path):
    event_log = make_log(flush_interval=3600.0)
    engine = create_engine(f"sqlite:///{tmp_path}/gc.db", poolclass=RebalancingQueuePool)
    event_log.watch(engine)
    with engine.connect():
        pass
    assert event_log.stats().pending == 1
    del engine
    # Collected in the poll: a maintenance pass running on the pool's own
    # thread at the first collection holds the pool until it ends.
    wait_for(lambda: gc.collect() is not None and event_log.stats().written == 1)
    assert not event_log._pools  # no reference left behind


SCRIPT = textwrap.dedent(
    """
    import os, sys
    from sqlalchemy import create_engine
    from sqla_rebalance import RebalancingQueuePool
    from sqla_rebalance.eventlog import EventLog

    app = create_engine(f"sqlite:///{sys.argv[1]}", poolclass=RebalancingQueuePool,
                        pool_name="exiting")
    EventLog(f"sqlite:///{sys.argv[2]}", flush_interval=3600).watch(app)  # not even kept
    conn = app.connect()
    conn.invalidate()
    conn.close()
    conn = app.connect()  # a second connection, still open at exit
    print(os.getpid())
    # exits without close() or flush()
    """
)


def test_interpreter_exit_flushes(tmp_path):
    log_db = tmp_path / "exit-log.db"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "exit-app.db"), str(log_db)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pid = int(done.stdout.strip())
    with sqlite3.connect(log_db) as raw:
        got = raw.execute(
            f"select pool, process, reason, closed_at is null from {DEFAULT_TABLE} order by id"
        ).fetchall()
    assert got == [
        ("exiting", f"{socket.gethostname()}:{pid}", "error", 0),
        ("exiting", f"{socket.gethostname()}:{pid}", None, 1),
    ]


# --------------------------------------------------------------------------- never in the way


def test_checkout_path_makes_no_log_db_calls(make_app, make_log):
    engine = make_app()
    event_log = make_log(flush_interval=0.02).watch(engine)
    with engine.connect():
        pass
    wait_for(lambda: event_log.stats().written == 1)
    calls: list[str] = []
    event.listen(event_log.engine, "checkout", lambda *a: calls.append("checkout"))
    event.listen(event_log.engine, "connect", lambda *a: calls.append("connect"))
    cycles = event_log._cycles
    for _ in range(2000):
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    # The flusher kept running all along (and a few cycles more), with nothing to write.
    wait_for(lambda: event_log._cycles >= cycles + 5)
    assert calls == []
    assert event_log.stats().pending == 0 and event_log.stats().written == 1
    # The listeners do see the log's own database use.
    conn = engine.connect()
    conn.invalidate()
    conn.close()
    event_log.flush()
    assert "checkout" in calls


def test_checkin_never_blocks_while_the_log_db_hangs(make_app, make_log, tmp_path):
    entered, release = threading.Event(), threading.Event()

    def hanging_connect() -> sqlite3.Connection:
        entered.set()
        release.wait(60)  # a log database that does not answer
        return sqlite3.connect(tmp_path / "hang.db", check_same_thread=False)

    log_engine = create_engine("sqlite://", creator=hanging_connect, poolclass=StaticPool)
    engine = make_app(pool_size=1, max_overflow=0)
    event_log = make_log(log_engine, flush_interval=0.02).watch(engine)
    with engine.connect():
        pass
    wait_for(entered.is_set)  # the flusher is stuck in the connect
    stats_seen: list[int] = []

    def churn() -> None:
        for _ in range(50):
            conn = engine.connect()  # opens a new connection (event; not the first time)
            conn.invalidate()  # retires it inside the request (event)
            conn.close()  # checkin
        stats_seen.append(event_log.stats().pending)  # stats() must not wait either

    worker = threading.Thread(target=churn, daemon=True)
    worker.start()
    worker.join(20)
    try:
        assert not worker.is_alive(), "checkout/checkin blocked on the event log"
        assert stats_seen == [100]  # 1 being written + 49 opened + 50 retired, buffered
    finally:
        release.set()
    wait_for(lambda: event_log.stats().written == 100)
    assert len(rows(event_log)) == 50  # open+retire pairs merged; the first one updated
    log_engine.dispose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_logs_on_its_own(make_app, make_log):
    engine = make_app()
    event_log = make_log(flush_interval=3600.0).watch(engine)
    a = engine.connect()
    event_log.flush()  # the log engine now holds a connection of the parent's
    parent_log_pool = event_log.engine.pool
    b = engine.connect()  # buffered in the parent at fork time
    assert event_log.stats().pending == 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            stats = event_log.stats()
            ok = stats.pending == 0 and stats.written == 0  # the parent's own
            ok &= event_log._thread is None  # no thread inherited
            engine.dispose(close=False)
            with engine.connect():
                pass
            ok &= event_log._thread is not None  # restarted lazily
            ok &= event_log.flush() == 1
            ok &= event_log.engine.pool is not parent_log_pool  # never the parent's sockets
            os.write(write, b"ok" if ok else b"bad")
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 10) == b"ok"
    assert os.waitstatus_to_exitcode(status) == 0
    assert event_log.engine.pool is parent_log_pool
    assert event_log.flush() == 1  # the buffered event, written once, by the parent
    procs = sorted(r["process"] == PROCESS for r in rows(event_log))
    assert procs == [False, True, True]  # child's row, and the parent's two (not three)
    assert [r["process"] for r in rows(event_log) if r["process"] != PROCESS] == [
        f"{socket.gethostname()}:{pid}"
    ]
    a.close()
    b.close()


# --------------------------------------------------------------------------- arguments


def doc_queries() -> list[str]:
    """The SQL blocks of docs/eventlog.md, in order."""
    doc = (Path(__file__).parent.parent / "docs" / "eventlog.md").read_text()
    return [block.split("```", 1)[0].strip() for block in doc.split("```sql\n")[1:]]


def test_documented_sqlite_churn_query_runs(make_app, make_log, tmp_path):
    engine = make_app()
    event_log = make_log().watch(engine)
    conn = engine.connect()
    conn.invalidate()
    conn.close()
    with engine.connect():
        pass
    event_log.flush()
    (query,) = [q for q in doc_queries() if "strftime('%Y-%m-%d %H:%M', opened_at)" in q]
    with sqlite3.connect(tmp_path / "log.db") as raw:
        got = raw.execute(query).fetchall()
    # Two connects and one retirement, within a minute or across its boundary.
    assert sum(o for _h, _m, o, _c in got) == 2 and sum(c for _h, _m, _o, c in got) == 1
    assert {h for h, *_ in got} == {"local"}


def test_bad_arguments_are_refused(make_app, make_log, tmp_path):
    url = f"sqlite:///{tmp_path}/log.db"
    with pytest.raises(ValueError, match="buffer_size"):
        EventLog(url, buffer_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        EventLog(url, batch_size=0)
    with pytest.raises(ValueError, match="flush_interval"):
        EventLog(url, flush_interval=0)
    with pytest.raises(ValueError, match="in-memory"):
        EventLog("sqlite://")
    event_log = make_log()
    plain = create_engine(f"sqlite:///{tmp_path}/plain.db", poolclass=QueuePool)
    with pytest.raises(TypeError, match="RebalancingQueuePool"):
        event_log.watch(plain)
    with pytest.raises(ValueError, match="cannot watch the engine it writes with"):
        event_log.watch(event_log.engine)
    event_log.close()
    with pytest.raises(RuntimeError, match="closed"):
        event_log.watch(make_app())
    plain.dispose()


# --------------------------------------------------------------------------- PostgreSQL


def test_log_table_on_postgresql(make_app, make_log, pg_url, sent):
    table = f"evlog_{uuid.uuid4().hex[:8]}"
    engine = make_app()
    event_log = make_log(pg_url, table=table).watch(engine)
    conn = engine.connect()
    event_log.flush()
    conn.invalidate()
    conn.close()
    with engine.connect():  # a second connection, opened and left in the pool
        pass
    event_log.flush()
    try:
        got = rows(event_log)
        opened, retired, reopened = (kw for _name, kw in sent)
        assert len(got) == 2
        assert got[0]["connection_id"] == opened["connection_id"]
        assert got[0]["opened_at"] == utc(opened["connected_at"])  # microseconds kept
        assert got[0]["closed_at"] == utc(retired["closed_at"])
        assert got[0]["reason"] == "error" and got[0]["process"] == PROCESS
        assert got[1]["connection_id"] == reopened["connection_id"]
        assert got[1]["closed_at"] is None
        with event_log.engine.connect() as c:
            kinds = dict(
                c.execute(
                    text(
                        "select column_name, data_type from information_schema.columns "
                        "where table_name = :t"
                    ),
                    {"t": table},
                ).all()
            )
            per_minute = c.execute(
                text(
                    f"select host, date_trunc('minute', closed_at) as minute, count(*) "
                    f"from {table} where closed_at is not null group by 1, 2"
                )
            ).all()
        assert kinds["opened_at"] == "timestamp with time zone"
        assert kinds["background"] == "boolean"
        assert [(h, n) for h, _m, n in per_minute] == [("local", 1)]
        # Every PostgreSQL query of the documentation runs (DELETE last: it empties nothing
        # recent, and is rolled back anyway).
        queries = [q for q in doc_queries() if "strftime" not in q and "CREATE" not in q]
        assert len(queries) >= 6
        with event_log.engine.connect() as c:
            for query in queries:
                c.execute(text(query.replace(DEFAULT_TABLE, table)))
            churn = c.execute(text(queries[0].replace(DEFAULT_TABLE, table))).all()
            c.rollback()
        # Two connects and one retirement, within a minute or across its boundary.
        assert sum(o for _h, _m, o, _c in churn) == 2 and sum(c for *_, c in churn) == 1
    finally:
        with event_log.engine.begin() as c:
            c.execute(text(f"drop table {table}"))


# --------------------------------------------------------------------------- pool_disposed

pool_disposed = signals.namespace.signal("pool-disposed")


@pytest.fixture
def pool_sends_disposed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``pool.dispose()`` send ``pool-disposed``, unless the pool already does."""
    if hasattr(signals, "pool_disposed"):
        return
    original = RebalancingQueuePool.dispose

    def dispose(self: RebalancingQueuePool) -> None:
        original(self)
        pool_disposed.send(self)

    monkeypatch.setattr(RebalancingQueuePool, "dispose", dispose)


def test_pool_dispose_flushes_a_watched_pool(make_app, make_log, pool_sends_disposed):
    engine = make_app()
    event_log = make_log(flush_interval=3600.0).watch(engine.pool)  # the pool, not the engine
    with engine.connect():
        pass
    engine.pool.dispose()
    assert event_log.stats().pending == 0
    (row,) = rows(event_log)
    assert row["reason"] == "dispose"


def test_engine_dispose_flushes_once_when_the_pool_says_it_was_disposed(
    make_app, make_log, pool_sends_disposed
):
    engine = make_app()
    event_log = make_log(flush_interval=3600.0).watch(engine)
    with engine.connect():
        pass
    cycles = event_log._cycles
    engine.dispose()
    assert event_log._cycles == cycles + 1  # pool_disposed flushed; engine_disposed did not
    assert [r["reason"] for r in rows(event_log)] == ["dispose"]


# --------------------------------------------------------------------------- MariaDB


def test_log_table_on_mariadb_keeps_microseconds(make_app, make_log, mariadb_cluster, sent):
    table = f"evlog_{uuid.uuid4().hex[:8]}"
    engine = make_app()
    event_log = make_log(mariadb_cluster.servers[0].url(), table=table).watch(engine)
    conn = engine.connect()
    event_log.flush()
    conn.invalidate()
    conn.close()
    event_log.flush()
    try:
        (row,) = rows(event_log)
        opened, retired = (kw for _name, kw in sent)
        # DATETIME(6), naive UTC in the server, aware UTC when read back.
        assert row["opened_at"] == utc(opened["connected_at"])
        assert row["closed_at"] == utc(retired["closed_at"])
        assert row["reason"] == "error" and row["background"] is False
    finally:
        with event_log.engine.begin() as c:
            c.execute(text(f"drop table {table}"))
