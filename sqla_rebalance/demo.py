"""``sqla-rebalance demo``: watch a rebalancing pool rotate connections over hosts.

A few threads run a small read/write workload through a ``RebalancingQueuePool``
with a short, jittered ``pool_recycle``. The demo prints every connection the
pool opens and retires (with its host and the reason), a per-host line every
2 s, and plays a timeline over ``duration``:

- 0 %: three hosts share the pool evenly;
- 25 %: a fourth host is added with ``pool.set_hosts()``; only the excess moves
  (the demo compares the moves with the minimum an even spread needs);
- 50 %: one host goes down; the pool marks it down and moves its connections;
- 75 %: it comes back; the pool marks it up and fails back onto it;
- then, for 3 s more: a **cluster-wide recycle**, sent from another process
  with the real CLI (``sqla-rebalance recycle --bus sqlite:///... --spread 1
  --wait``) over the embedded bus (a SQLite file: no server), signed with a
  secret the demo made up; the pool replaces every connection over 1 s (in-use
  ones at checkin), and ``sqla-rebalance status`` shows the fleet (this one
  process).

It ends with a summary: transactions, errors (any error fails the demo),
connects paid inside a checkout, retirements by reason and per phase, and
the final per-host counts.

Where the hosts come from:

- ``sqlite`` (default, no server needed): four SQLite files, each in its own
  temporary directory. A host goes "down" when its directory is renamed:
  new connects fail, while open connections keep their files and keep
  working (like a server that stops accepting connections). Each file is in
  WAL mode and each connection reads it as it opens, so that it holds every
  file it needs from the start.
- ``postgres``: four local PostgreSQL servers on 127.0.0.2-5 started with
  ``tests/servers.py`` from the repository checkout. A host goes down with an
  immediate shutdown (its sessions are killed); the engine uses
  ``pool_pre_ping=True``. The only errors accepted are statements in flight on
  that server at the moment it is killed; they are counted and shown apart.

With ``url`` the original single-database demo runs instead: lifetime
replacement and a graceful ``recycle(spread=1.0)`` half-way, no hosts.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, create_engine, exc, text
from sqlalchemy.pool import NullPool

from . import signals
from .lifetime import state_of
from .pool import RebalancingQueuePool

__all__ = ["MODES", "DemoUnavailableError", "run_demo"]

#: Where the demo's hosts come from (see the module docstring).
MODES = ("sqlite", "postgres")

#: Index (in the list of four hosts) of the host added at 25 %, and of the one taken down.
_ADDED = 3
_DOWNED = 1
_REPORT_EVERY = 2.0


class DemoUnavailableError(RuntimeError):
    """The chosen mode cannot run here (say, PostgreSQL mode outside the repository)."""


# --------------------------------------------------------------------------- output


class _Out:
    """Timestamped lines, one writer at a time (signals arrive from several threads)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lock = threading.Lock()
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, msg: str) -> None:
        with self.lock:
            print(f"[{self.elapsed():6.2f}s] {msg}", file=self.out, flush=True)

    def plain(self, msg: str = "") -> None:
        with self.lock:
            print(msg, file=self.out, flush=True)


# --------------------------------------------------------------------------- workload


@dataclass
class _Failure:
    error: BaseException
    host: str | None
    started: float
    failed: float
    #: The transaction was the first use of its connection (never checked out before).
    first_use: bool = False


class _Workload:
    """Threads running short read/write transactions until stopped.

    A failed transaction is shown and counted, and the thread goes on.
    ``expected(failure)`` tells the failures the demo provoked on purpose
    (statements in flight on a killed server) from real errors.
    """

    def __init__(
        self,
        engine: Engine,
        threads: int,
        out: _Out,
        expected: Callable[[_Failure], bool] = lambda failure: False,
    ) -> None:
        self.engine = engine
        self.out = out
        self.expected = expected
        self.stop_event = threading.Event()
        self.started = False
        self.lock = threading.Lock()
        self.transactions = 0
        self.errors: list[_Failure] = []
        self.in_flight: list[_Failure] = []
        self.threads = [
            threading.Thread(target=self._run, args=(i,), name=f"demo-{i}", daemon=True)
            for i in range(threads)
        ]

    def start(self) -> None:
        self.started = True
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.started:
            for t in self.threads:
                t.join()

    def _run(self, i: int) -> None:
        rng = random.Random(i)
        while not self.stop_event.is_set():
            started = time.monotonic()
            host, first_use = None, False
            try:
                with self.engine.begin() as conn:
                    host, first_use = _where(conn)
                    conn.execute(text("insert into events (who) values (:w)"), {"w": f"t{i}"})
                    conn.execute(text("select count(*) from events")).scalar()
            except Exception as err:  # shown and counted: a demo must not hide errors
                failure = _Failure(err, host, started, time.monotonic(), first_use)
                self._failed(failure)
                self.stop_event.wait(0.05)
                continue
            with self.lock:
                self.transactions += 1
            self.stop_event.wait(rng.uniform(0.005, 0.02))

    def _failed(self, failure: _Failure) -> None:
        expected = self.expected(failure)
        with self.lock:
            (self.in_flight if expected else self.errors).append(failure)
            shown = len(self.errors) <= 5 or expected
        if shown:
            what = "in flight on the killed server" if expected else "ERROR"
            first_line = (str(failure.error).strip().splitlines() or [""])[0]
            where = failure.host or "host unknown"
            if failure.first_use:
                where += ", first use of this connection"
            self.out.say(f"{what}: {type(failure.error).__name__}: {first_line[:120]} [{where}]")


def _create_table(engine: Engine) -> None:
    """The workload's table, in any database's dialect (autoincrement id)."""
    metadata = MetaData()
    Table(
        "events",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("who", String(20)),
    )
    metadata.create_all(engine)


def _where(conn: Any) -> tuple[str | None, bool]:
    """The host key of the pooled connection behind a SQLAlchemy ``Connection``,
    and whether this is its first checkout (SQLAlchemy's ``fresh`` flag)."""
    record = getattr(conn.connection, "_connection_record", None)
    state = state_of(record) if record is not None else None
    return (state.host if state is not None else None), bool(getattr(record, "fresh", False))


# --------------------------------------------------------------------------- hosts


class _ReadingConnection(sqlite3.Connection):
    """A SQLite connection that reads its database as it opens.

    In WAL mode SQLite opens the ``-wal`` and ``-shm`` files at the first
    read, by path. Reading at once means a connection holds every file it
    needs from the moment the pool has it; a connect that cannot read fails
    inside the pool's connect (and is tried on another host), never later in
    a request.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            self.execute("select count(*) from events").fetchall()
        except BaseException:
            self.close()
            raise


class _SqliteHosts:
    """Four SQLite files, each in its own directory; renaming a directory downs a host."""

    mode = "sqlite"

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="sqla-rebalance-demo-")
        base = Path(self._tmp.name)
        self._dirs = [base / f"host{i + 1}" for i in range(4)]
        self.keys = [str(d / "demo.db") for d in self._dirs]
        self.url = f"sqlite:///{self.keys[0]}"
        self.engine_kw: dict[str, Any] = {"connect_args": {"factory": _ReadingConnection}}

    def describe(self) -> str:
        return f"SQLite files as hosts, each in its own directory under {self._tmp.name}"

    def prepare(self) -> None:
        for d, key in zip(self._dirs, self.keys, strict=True):
            d.mkdir()
            conn = sqlite3.connect(key)
            try:
                conn.execute("pragma journal_mode=wal")
                conn.execute("create table if not exists events (id integer primary key, who text)")
                conn.commit()
            finally:
                conn.close()

    def _away(self, i: int) -> Path:
        return self._dirs[i].with_name(self._dirs[i].name + "-away")

    down_how = (
        "renaming its directory: new connects fail, open connections keep working "
        "(a host that stops accepting connections)"
    )
    up_how = "renaming its directory back: connects work again"

    def take_down(self, i: int) -> None:
        self._dirs[i].rename(self._away(i))

    def bring_back(self, i: int) -> None:
        self._away(i).rename(self._dirs[i])

    def close(self) -> None:
        self._tmp.cleanup()


def _have_psycopg() -> bool:
    return importlib.util.find_spec("psycopg") is not None


def _load_servers() -> ModuleType:
    """``tests.servers`` of the repository checkout (not part of the installed package)."""
    try:
        return importlib.import_module("tests.servers")
    except ImportError:
        pass
    # An editable install run from elsewhere: the checkout is the package's parent.
    root = Path(__file__).resolve().parent.parent
    if (root / "tests" / "servers.py").is_file():
        sys.path.insert(0, str(root))
        try:
            return importlib.import_module("tests.servers")
        except ImportError:
            sys.path.remove(str(root))
    raise DemoUnavailableError(
        "the PostgreSQL demo starts its servers with tests/servers.py: run it from the "
        "repository checkout (scripts/demo.sh --postgres, or python -m sqla_rebalance demo "
        "--postgres from the repository root)"
    )


class _PostgresHosts:
    """Four local PostgreSQL servers; an immediate shutdown downs a host."""

    mode = "postgres"

    def __init__(self) -> None:
        if not _have_psycopg():
            raise DemoUnavailableError(
                "the PostgreSQL demo needs psycopg: pip install 'sqla-rebalance[postgresql]'"
            )
        servers = _load_servers()
        try:
            servers.find_pg_bindir()
        except RuntimeError as err:
            raise DemoUnavailableError(str(err)) from None
        self.cluster: Any = servers.PostgresCluster(n=4)
        self.keys: list[str] = list(self.cluster.hosts)
        self.url: str = self.cluster.servers[0].url()
        self.engine_kw: dict[str, Any] = {"pool_pre_ping": True}

    def describe(self) -> str:
        first, last = self.cluster.servers[0].host, self.cluster.servers[-1].host
        return f"PostgreSQL servers on {first}-{last.rsplit('.', 1)[1]} as hosts"

    def prepare(self) -> None:
        try:
            self.cluster.start()
        except RuntimeError as err:
            raise DemoUnavailableError(f"could not start the PostgreSQL servers: {err}") from err
        # start() may have moved to another free port.
        self.keys = list(self.cluster.hosts)
        self.url = self.cluster.servers[0].url()
        for server in self.cluster.servers:
            engine = create_engine(server.url(), poolclass=NullPool)
            try:
                _create_table(engine)
            finally:
                engine.dispose()

    down_how = (
        "immediate shutdown of its server: its sessions die (statements running there fail), "
        "new connects are refused"
    )
    up_how = "starting its server again"

    def take_down(self, i: int) -> None:
        self.cluster.servers[i].stop("immediate")

    def bring_back(self, i: int) -> None:
        self.cluster.servers[i].start()

    def close(self) -> None:
        self.cluster.stop()


# --------------------------------------------------------------------------- bookkeeping


def min_moves(counts: Mapping[str, int], eligible: list[str]) -> int:
    """The fewest connections to move so that ``eligible`` hosts hold an even share.

    Each eligible host ends with ``total // k`` or one more; a host that is not
    eligible ends with none. The hosts that keep the extra one are those
    holding the most already.
    """
    if not eligible:
        return 0
    total = sum(counts.values())
    base, extra = divmod(total, len(eligible))
    ranked = sorted(eligible, key=lambda k: -counts.get(k, 0))
    share = {k: base + (1 if n < extra else 0) for n, k in enumerate(ranked)}
    return sum(max(0, c - share.get(k, 0)) for k, c in counts.items())


@dataclass
class _Phase:
    name: str
    start: float
    end: float | None = None
    retired: dict[str, int] = field(default_factory=dict)
    #: (host label, reason) -> count
    retired_from: dict[tuple[str, str], int] = field(default_factory=dict)
    opened: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "start": round(self.start, 3),
            "end": None if self.end is None else round(self.end, 3),
            "retired": dict(self.retired),
            "retired_from": {f"{h}/{r}": n for (h, r), n in self.retired_from.items()},
            "opened": dict(self.opened),
        }


class _Book:
    """What happened, by phase; fed by the pool's signals (any thread)."""

    def __init__(self, keys: list[str], out: _Out) -> None:
        self.labels = {key: f"h{i + 1}" for i, key in enumerate(keys)}
        self.out = out
        self.lock = threading.Lock()
        self.phases: list[_Phase] = []
        self.events: list[tuple[float, str, str]] = []
        #: (time, host label) of every connection opened.
        self.opens: list[tuple[float, str]] = []

    def label(self, key: str) -> str:
        return self.labels.get(key, key)

    def begin(self, name: str) -> _Phase:
        now = self.out.elapsed()
        with self.lock:
            if self.phases:
                self.phases[-1].end = now
            phase = _Phase(name, now)
            self.phases.append(phase)
        return phase

    def finish(self) -> None:
        with self.lock:
            if self.phases:
                self.phases[-1].end = self.out.elapsed()

    def opened(self, key: str) -> None:
        now = self.out.elapsed()
        with self.lock:
            self.opens.append((now, self.label(key)))
            if self.phases:
                d = self.phases[-1].opened
                d[self.label(key)] = d.get(self.label(key), 0) + 1

    def retired(self, key: str, reason: str) -> None:
        with self.lock:
            if self.phases:
                phase = self.phases[-1]
                phase.retired[reason] = phase.retired.get(reason, 0) + 1
                k = (self.label(key), reason)
                phase.retired_from[k] = phase.retired_from.get(k, 0) + 1

    def event(self, kind: str, key: str) -> float:
        now = self.out.elapsed()
        with self.lock:
            self.events.append((now, kind, self.label(key)))
        return now

    def opened_between(self, label: str, start: float, end: float) -> int:
        with self.lock:
            return sum(1 for t, h in self.opens if h == label and start < t < end)

    def first(self, kind: str, label: str, after: float) -> float | None:
        with self.lock:
            return next(
                (t for t, k, h in self.events if k == kind and h == label and t >= after), None
            )


def _counts(pool: RebalancingQueuePool) -> dict[str, int]:
    return {key: h.open for key, h in pool.stats().hosts.items() if h.open}


def _host_line(pool: RebalancingQueuePool, book: _Book) -> str:
    hosts = pool.stats().hosts
    order = sorted(hosts, key=lambda k: (k not in book.labels, book.label(k)))
    counts = " ".join(f"{book.label(k)}={hosts[k].open}" for k in order)
    health = "/".join(hosts[k].health for k in order)
    return f"{counts} ({health})"


def _fmt_counts(counts: Mapping[str, int], book: _Book) -> str:
    return " ".join(f"{book.label(k)}={n}" for k, n in sorted(counts.items(), key=lambda i: i[0]))


def _fmt_reasons(reasons: Mapping[str, int]) -> str:
    return ", ".join(f"{r}={n}" for r, n in sorted(reasons.items())) or "none"


# --------------------------------------------------------------------------- the demo


def run_demo(
    duration: float = 16.0,
    threads: int = 4,
    recycle: float = 4.0,
    jitter: float = 0.5,
    url: str | None = None,
    out: TextIO | None = None,
    mode: str = "sqlite",
    pool_size: int = 12,
) -> dict[str, Any]:
    """Run the demo; return the final ``pool.stats().as_dict()``.

    With hosts (``mode`` ``"sqlite"`` or ``"postgres"``, no ``url``) the
    returned dict has a ``"demo"`` entry too: transactions, errors, statements
    killed in flight, what each phase did, and the host events seen.
    Raises RuntimeError if the workload saw an error (other than statements
    in flight on a server the demo killed), DemoUnavailableError if ``mode``
    cannot run here.
    """
    out = out or sys.stdout
    if url is not None:
        return _run_single(duration, threads, recycle, jitter, url, out)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    backend: _SqliteHosts | _PostgresHosts
    backend = _SqliteHosts() if mode == "sqlite" else _PostgresHosts()
    try:
        return _run_hosts(backend, duration, threads, recycle, jitter, pool_size, out)
    finally:
        backend.close()


def _run_hosts(
    backend: _SqliteHosts | _PostgresHosts,
    duration: float,
    threads: int,
    recycle: float,
    jitter: float,
    pool_size: int,
    stream: TextIO,
) -> dict[str, Any]:
    out = _Out(stream)
    out.plain(
        f"sqla-rebalance demo: {backend.describe()}\n"
        f"{threads} threads, pool_size={pool_size}, pool_recycle={recycle}s, "
        f"recycle_jitter={jitter} (lifetimes in [{recycle * (1 - jitter):.1f}, {recycle:.1f}]s), "
        f"{duration:.0f}s"
    )
    if backend.mode == "postgres":
        out.say("starting 4 PostgreSQL servers ...")
    backend.prepare()
    keys = backend.keys
    book = _Book(keys, out)
    out.plain(
        "hosts: "
        + ", ".join(f"{book.label(k)}={k}" for k in keys)
        + f"\ntimeline (from the end of the warm-up): 3 hosts; {duration * 0.25:.0f}s add "
        f"h{_ADDED + 1}; "
        f"{duration * 0.5:.0f}s h{_DOWNED + 1} goes down; {duration * 0.75:.0f}s it comes back"
    )
    # The embedded bus: a SQLite file any process on this machine can publish to.
    bus_dir = tempfile.mkdtemp(prefix="sqla-rebalance-demo-bus-")
    bus_url = f"sqlite:///{bus_dir}/bus.db"
    secret = os.urandom(16).hex()
    engine = create_engine(
        backend.url,
        poolclass=RebalancingQueuePool,
        pool_size=pool_size,
        max_overflow=2,
        pool_recycle=recycle,
        recycle_jitter=jitter,
        min_size=pool_size,
        pool_name="demo",
        hosts=keys[:_ADDED],
        health_check_interval=1.0,
        unhealthy_threshold=2,
        rebalance_spread=1.0,
        broadcast=bus_url,
        broadcast_secret=secret,
        min_recycle_interval=1.0,
        **backend.engine_kw,
    )
    pool = engine.pool
    assert isinstance(pool, RebalancingQueuePool)
    downed_key = keys[_DOWNED]
    down_window = [0.0, 0.0]  # when the kill started and ended (monotonic; 0: not yet)

    def expected(failure: _Failure) -> bool:
        # PostgreSQL only: a statement that was running on the killed server
        # when it died. Anything else is an error.
        return (
            backend.mode == "postgres"
            and down_window[0] > 0
            and failure.host == downed_key
            and failure.started <= down_window[1]
            and failure.failed >= down_window[0]
            # A driver error that SQLAlchemy recognised as a disconnect.
            and isinstance(failure.error, exc.DBAPIError)
            and failure.error.connection_invalidated
        )

    failback: dict[str, int] = {}
    cluster: dict[str, Any] = {}

    def on_opened(sender: Any, **kw: Any) -> None:
        book.opened(kw["host"])
        how = "background" if kw["background"] else "inside a checkout"
        out.say(f"open     {book.label(kw['host'])}  {how}")

    def on_retired(sender: Any, **kw: Any) -> None:
        book.retired(kw["host"], kw["reason"])
        out.say(
            f"retire   {book.label(kw['host'])}  after {kw['age']:5.2f}s  reason={kw['reason']}"
        )

    def on_down(sender: Any, **kw: Any) -> None:
        book.event("host_down", kw["host"])
        out.say(f"host_down {book.label(kw['host'])}: its connections move to the other hosts")

    def on_up(sender: Any, **kw: Any) -> None:
        book.event("host_up", kw["host"])
        # Before the pool rebalances (signals come first): what failback must move.
        counts = _counts(pool)
        eligible = [k for k, h in pool.stats().hosts.items() if h.health == "up"]
        failback["minimum"] = min_moves(counts, eligible)
        failback["total"] = sum(counts.values())
        out.say(
            f"host_up  {book.label(kw['host'])}: failback; an even spread now needs "
            f"{failback['minimum']} of {failback['total']} connections to move"
        )

    def on_changed(sender: Any, **kw: Any) -> None:
        added = ", ".join(book.label(k) for k in kw["added"]) or "none"
        removed = ", ".join(book.label(k) for k in kw["removed"]) or "none"
        out.say(f"hosts_changed added={added} removed={removed}")

    receivers: list[tuple[Any, Callable[..., None]]] = [
        (signals.connection_opened, on_opened),
        (signals.connection_retired, on_retired),
        (signals.host_down, on_down),
        (signals.host_up, on_up),
        (signals.hosts_changed, on_changed),
    ]
    for signal, receiver in receivers:
        signal.connect(receiver, sender=pool)
    workload = _Workload(engine, threads, out, expected)
    added: dict[str, Any] = {}
    timeline: list[tuple[float, str]] = [
        (0.25, f"h{_ADDED + 1} added"),
        (0.5, f"h{_DOWNED + 1} down"),
        (0.75, f"h{_DOWNED + 1} back"),
    ]
    try:
        book.begin("warm-up")
        deadline = time.monotonic() + 15.0
        while pool.stats().open < pool_size and time.monotonic() < deadline:
            time.sleep(0.02)
        out.say(
            f"warm     {_host_line(pool, book)}  (min_size={pool_size}, opened in the background)"
        )
        t0 = out.elapsed()  # the timeline starts after the warm-up
        book.begin("3 hosts")
        workload.start()
        next_report = _REPORT_EVERY
        step = 0
        while (elapsed := out.elapsed() - t0) < duration:
            if step < len(timeline) and elapsed >= timeline[step][0] * duration:
                _summarise_phase(book, out, added, failback)
                book.begin(timeline[step][1])
                label = book.label(downed_key)
                if step == 0:
                    counts = _counts(pool)
                    added["before"] = counts
                    added["minimum"] = min_moves(counts, keys)
                    added["total"] = sum(counts.values())
                    out.say(
                        f"ADD      h{_ADDED + 1}: pool.set_hosts([h1, h2, h3, h4]); before: "
                        f"{_fmt_counts(counts, book)}; an even spread needs "
                        f"{added['minimum']} of {added['total']} connections to move"
                    )
                    pool.set_hosts(keys)
                elif step == 1:
                    out.say(f"DOWN     {label}: {backend.down_how}")
                    # Until the server is gone, a statement starting there may still die with it.
                    down_window[1] = math.inf
                    down_window[0] = time.monotonic()
                    backend.take_down(_DOWNED)
                    down_window[1] = time.monotonic()
                else:
                    out.say(f"BACK     {label}: {backend.up_how}")
                    backend.bring_back(_DOWNED)
                step += 1
            if elapsed >= next_report:
                next_report += _REPORT_EVERY
                out.say(f"hosts    {_host_line(pool, book)}  transactions={workload.transactions}")
            workload.stop_event.wait(0.05)
        _summarise_phase(book, out, added, failback)
        book.begin("cluster recycle")
        _cluster_recycle(pool, out, book, bus_url, secret, cluster, workload)
        workload.stop()
        book.finish()
        _summarise_phase(book, out, added, failback)
        final = pool.stats()
    finally:
        workload.stop()
        for signal, receiver in receivers:
            signal.disconnect(receiver, sender=pool)
        engine.dispose()
        shutil.rmtree(bus_dir, ignore_errors=True)
    stats = final.as_dict()
    summary = _summary(book, workload, added, failback, final, threads)
    summary["cluster"] = cluster
    stats["demo"] = summary
    _print_summary(out, book, summary, stats, backend.mode)
    if workload.errors:
        first = workload.errors[0].error
        raise RuntimeError(
            f"demo workload failed ({len(workload.errors)} errors): {first!r}"
        ) from first
    return stats


def _cli(args: list[str], secret: str) -> subprocess.CompletedProcess[str]:
    """Run ``sqla-rebalance ARGS`` as its own process, as an operator would."""
    env = dict(os.environ, SQLA_REBALANCE_SECRET=secret)
    return subprocess.run(
        [sys.executable, "-m", "sqla_rebalance", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _cluster_recycle(
    pool: RebalancingQueuePool,
    out: _Out,
    book: _Book,
    bus_url: str,
    secret: str,
    cluster: dict[str, Any],
    workload: _Workload,
) -> None:
    """The last phase: a recycle of every pool of the fleet, sent from another process."""
    before = pool.stats()
    args = ["recycle", "--bus", bus_url, "--pool", "demo", "--spread", "1", "--wait", "10"]
    out.say(f"RECYCLE  from another process: sqla-rebalance {' '.join(args)}")
    done = _cli(args, secret)
    for line in (done.stdout + done.stderr).splitlines():
        out.say(f"  cli    {line}")
    # The spread (1 s), and in-use connections retire at their checkin.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        if pool.stats().retirements["signal"] - before.retirements["signal"] >= before.open:
            break
        workload.stop_event.wait(0.05)
    after = pool.stats()
    status = _cli(["status", "--bus", bus_url], secret)
    out.say("STATUS   sqla-rebalance status --bus ...")
    for line in status.stdout.splitlines():
        out.say(f"  cli    {line}")
    cluster.update(
        cli_exit=done.returncode,
        status_exit=status.returncode,
        open_before=before.open,
        retired=after.retirements["signal"] - before.retirements["signal"],
        waited=after.checkouts_waited - before.checkouts_waited,
        applied=after.bus.commands_applied - before.bus.commands_applied,
    )
    others = (
        f"; the other {before.open - cluster['retired']} open when it was sent reached their "
        "lifetime first"
        if cluster["retired"] < before.open
        else ""
    )
    out.say(
        f"phase    cluster recycle: applied by this process ({cluster['applied']} command); "
        f"{cluster['retired']} connections replaced by it (reason=signal){others}; "
        f"{cluster['waited']} connects inside a checkout"
    )


def _from(phase: _Phase, reason: str) -> dict[str, int]:
    """Retirements of one reason in a phase, by host label."""
    return {h: n for (h, r), n in sorted(phase.retired_from.items()) if r == reason}


def _of(phase: _Phase, label: str) -> dict[str, int]:
    """Retirements of one host in a phase, by reason."""
    return {r: n for (h, r), n in sorted(phase.retired_from.items()) if h == label}


def _labels(counts: Mapping[str, int]) -> str:
    return " ".join(f"{h}={n}" for h, n in counts.items()) or "none"


def _summarise_phase(
    book: _Book, out: _Out, added: Mapping[str, Any], failback: Mapping[str, int]
) -> None:
    """A line on what the phase that just ended did."""
    if not book.phases:
        return
    phase = book.phases[-1]
    h_add, h_down = f"h{_ADDED + 1}", f"h{_DOWNED + 1}"
    if phase.name == f"{h_add} added":
        moved = _from(phase, "rebalance")
        out.say(
            f"phase    {phase.name}: the rebalance moved {sum(moved.values())} "
            f"(off {_labels(moved)}; minimum for an even spread {added.get('minimum')}, never "
            f"more; lifetime replacements open on the least-loaded host too); "
            f"{h_add} got {phase.opened.get(h_add, 0)} connections"
        )
    elif phase.name == f"{h_down} down":
        seen = book.first("host_down", h_down, phase.start)
        gone = _of(phase, h_down)
        when = (
            f"marked down {seen - phase.start:.2f}s after it went"
            if seen is not None
            else "never marked down: no connect reached it (a connection is replaced when its "
            "lifetime ends; with --duration of at least 4 x --recycle every one does while the "
            "host is away)"
        )
        # Until the phase ends: the host is back only in the next phase.
        while_down = book.opened_between(h_down, seen, out.elapsed()) if seen is not None else 0
        out.say(
            f"phase    {phase.name}: {when}; {sum(gone.values())} of its connections retired "
            f"({_fmt_reasons(gone)}), {while_down} opened there while it was marked down"
        )
    elif phase.name == f"{h_down} back":
        seen = book.first("host_up", h_down, phase.start)
        was_down = book.first("host_down", h_down, 0.0) is not None
        when = (
            f"marked up {seen - phase.start:.2f}s after it came back"
            if seen is not None
            else "never marked up"
            if was_down
            else "it was never marked down: no failback"
        )
        moved = _from(phase, "rebalance")
        out.say(
            f"phase    {phase.name}: {when}; failback: the rebalance moved "
            f"{sum(moved.values())} (off {_labels(moved)}; minimum {failback.get('minimum')}); "
            f"{h_down} got {phase.opened.get(h_down, 0)} connections"
        )


def _summary(
    book: _Book,
    workload: _Workload,
    added: Mapping[str, Any],
    failback: Mapping[str, int],
    final: Any,
    threads: int,
) -> dict[str, Any]:
    by_name = {p.name: p for p in book.phases}
    h_add, h_down = f"h{_ADDED + 1}", f"h{_DOWNED + 1}"
    add_phase = by_name.get(f"{h_add} added")
    down_phase = by_name.get(f"{h_down} down")
    back_phase = by_name.get(f"{h_down} back")
    down_seen = book.first("host_down", h_down, down_phase.start) if down_phase else None
    up_seen = book.first("host_up", h_down, back_phase.start) if back_phase else None
    return {
        "transactions": workload.transactions,
        "errors": len(workload.errors),
        "killed_in_flight": len(workload.in_flight),
        "threads": threads,
        "hosts": {label: key for key, label in book.labels.items()},
        "added": {
            "host": h_add,
            "before": {book.label(k): n for k, n in added.get("before", {}).items()},
            "minimum": added.get("minimum"),
            "moved": add_phase.retired.get("rebalance", 0) if add_phase else None,
            "moved_off": _from(add_phase, "rebalance") if add_phase else {},
            "opened": add_phase.opened.get(h_add, 0) if add_phase else None,
        },
        "down": {
            "host": h_down,
            "marked_after": None
            if down_seen is None or not down_phase
            else down_seen - down_phase.start,
            "retired": _of(down_phase, h_down) if down_phase else {},
            # Connections opened on it between host_down and the end of the phase.
            "opened_while_down": (
                book.opened_between(h_down, down_seen, down_phase.end or down_seen)
                if down_phase and down_seen is not None
                else None
            ),
        },
        "up": {
            "host": h_down,
            "marked_after": None
            if up_seen is None or not back_phase
            else up_seen - back_phase.start,
            "minimum": failback.get("minimum"),
            "moved": back_phase.retired.get("rebalance", 0) if back_phase else None,
            "moved_off": _from(back_phase, "rebalance") if back_phase else {},
            "opened": back_phase.opened.get(h_down, 0) if back_phase else None,
        },
        "events": [{"t": round(t, 3), "event": k, "host": h} for t, k, h in book.events],
        "phases": [p.as_dict() for p in book.phases],
        "final": {book.label(k): h.open for k, h in final.hosts.items()},
        "final_health": {book.label(k): h.health for k, h in final.hosts.items()},
    }


def _print_summary(
    out: _Out,
    book: _Book,
    summary: Mapping[str, Any],
    stats: Mapping[str, Any],
    mode: str,
) -> None:
    lines = [
        "",
        f"done: {summary['transactions']} transactions, {summary['errors']} errors",
    ]
    if mode == "postgres":
        n = summary["killed_in_flight"]
        lines.append(
            f"statements in flight on h{_DOWNED + 1} when it was killed: {n}, not counted as "
            "errors. They failed with the server: a crash ends every session on it, and no pool "
            "can save a statement already running there. Every other request went on, on the "
            "other hosts."
        )
    lines.append(
        f"connections opened: {stats['connects']} "
        f"(of which inside a checkout: {stats['checkouts_waited']}; the rest in the background)"
    )
    if mode == "postgres" and stats["checkouts_waited"]:
        lines.append(
            "  (inside a checkout: pool_pre_ping found a connection to the killed server dead "
            "and reconnected it, to another host, before handing it out)"
        )
    retired = {k: v for k, v in stats["retirements"].items() if v}
    lines.append(f"retired by reason: {_fmt_reasons(retired)}")
    lines.append("by phase:")
    for p in book.phases:
        end = p.end if p.end is not None else p.start
        opened = _fmt_counts(p.opened, book) if p.opened else "none"
        lines.append(
            f"  {p.start:5.1f}-{end:5.1f}s {p.name:<18} retired: {_fmt_reasons(p.retired)}; "
            f"opened: {opened}"
        )
    added, up = summary["added"], summary["up"]
    failback = (
        f"failback to {up['host']} {up['moved']} (minimum {up['minimum']})"
        if up["minimum"] is not None
        else f"no failback ({up['host']} was not marked down and up)"
    )
    lines.append(
        f"rebalance moves: adding {added['host']} {added['moved']} (minimum {added['minimum']}), "
        + failback
    )
    cluster = summary.get("cluster") or {}
    if cluster:
        lines.append(
            f"cluster-wide recycle (CLI over the embedded bus): exit {cluster['cli_exit']}, "
            f"{cluster['retired']} connections replaced by it, "
            f"{cluster['waited']} connects inside a checkout"
        )
    final = summary["final"]
    health = summary["final_health"]
    lines.append(
        "final:   "
        + " ".join(f"{h}={final[h]}" for h in sorted(final))
        + " ("
        + "/".join(health[h] for h in sorted(final))
        + ")"
    )
    out.plain("\n".join(lines))


# --------------------------------------------------------------------------- one database


def _run_single(
    duration: float, threads: int, recycle: float, jitter: float, url: str, out: TextIO
) -> dict[str, Any]:
    """The single-database demo: lifetime replacement and a graceful recycle, no hosts."""
    start = time.monotonic()
    lock = threading.Lock()

    def say(msg: str) -> None:
        with lock:
            print(f"[{time.monotonic() - start:6.2f}s] {msg}", file=out, flush=True)

    engine = create_engine(
        url,
        poolclass=RebalancingQueuePool,
        pool_size=threads,
        max_overflow=2,
        pool_recycle=recycle,
        recycle_jitter=jitter,
        min_size=threads,
        pool_name="demo",
    )
    pool = engine.pool
    assert isinstance(pool, RebalancingQueuePool)

    def on_opened(sender: Any, **kw: Any) -> None:
        how = "in the background" if kw["background"] else "inside a checkout"
        say(f"opened   a connection to {kw['host']} {how}")

    def on_retired(sender: Any, **kw: Any) -> None:
        say(f"retired  a connection after {kw['age']:5.2f}s  reason={kw['reason']}")

    signals.connection_opened.connect(on_opened, sender=pool)
    signals.connection_retired.connect(on_retired, sender=pool)
    print(
        f"sqla-rebalance demo: {threads} threads, pool_recycle={recycle}s, "
        f"recycle_jitter={jitter} "
        f"(lifetimes drawn in [{recycle * (1 - jitter):.1f}, {recycle:.1f}]s), "
        f"{duration:.0f}s on {url}",
        file=out,
    )
    workload = None
    try:
        _create_table(engine)
        shim = _Out(out)
        shim.start = start
        workload = _Workload(engine, threads, shim)
        workload.start()
        recycled = False
        next_report = _REPORT_EVERY
        while (elapsed := time.monotonic() - start) < duration:
            if not recycled and elapsed >= duration / 2:
                recycled = True
                n = pool.recycle(spread=1.0, reason="manual")
                say(f"pool.recycle(spread=1.0): {n} connections to replace gracefully")
            if elapsed >= next_report:
                next_report += _REPORT_EVERY
                s = pool.stats()
                say(
                    f"stats    open={s.open} idle={s.idle} in_use={s.in_use} "
                    f"connects={s.connects} waited={s.checkouts_waited} "
                    f"transactions={workload.transactions}"
                )
            workload.stop_event.wait(0.05)
    finally:
        if workload is not None:
            workload.stop()
        signals.connection_opened.disconnect(on_opened, sender=pool)
        signals.connection_retired.disconnect(on_retired, sender=pool)
    stats = pool.stats().as_dict()
    engine.dispose()
    retirements = {k: v for k, v in stats["retirements"].items() if v}
    errors = workload.errors
    print(
        f"\ndone: {workload.transactions} transactions, {len(errors)} errors\n"
        f"connections opened: {stats['connects']} "
        f"(of which by a waiting checkout: {stats['checkouts_waited']}, "
        f"warm-up included; the rest in the background)\n"
        f"retired by reason: {retirements}",
        file=out,
    )
    if errors:
        raise RuntimeError(f"demo workload failed: {errors[0].error!r}") from errors[0].error
    return stats
