"""One of three hosts hangs under load (SIGSTOP), then resumes.

Three PostgreSQL servers run on 127.0.0.2-4. A main pool per variant
(``pool_size=12, max_overflow=0, pool_pre_ping=True``, the same lifetime
``--recycle``) serves ``--threads`` threads, each looping: check out (timed),
``SELECT pg_sleep(0.002)``, check in, think (uniform in ``[0, 2 * --think-ms]``;
without a pause each thread keeps getting its own connection back and the
pool never chooses). After ``--warmup`` seconds the second
server is frozen for ``--freeze`` seconds, then thawed and watched for
``--after`` seconds. A frozen server is a *hung* host: the kernel still
accepts TCP connections and ACKs data, but nothing answers, so a connect
runs into ``connect_timeout`` and a statement (or a pre-ping) on an existing
connection waits, with no error, until the thaw.

The freeze is ``server.freeze()`` of ``sqla_rebalance.devservers``: SIGSTOP to the
postmaster and every process below it. PostgreSQL makes each backend the
leader of a session of its own (``setsid()``), so a process-group signal
alone would leave the existing sessions answering (``freeze()`` stopped only
the process group before the frozen-host fix). ``--postmaster-only`` runs
that narrower case on purpose: only the postmaster is stopped (new connects hang, sessions answer).

Variants, side by side in one invocation:

- ``queuepool``: ``QueuePool`` on psycopg's multi-host URL
  (``host=a&host=b&host=c``, ``load_balance_hosts=random``,
  ``connect_timeout=2``);
- ``psycopg_pool``: ``psycopg_pool.ConnectionPool`` on the same multi-host
  conninfo, ``min_size=max_size=12``,
  ``check=ConnectionPool.check_connection`` (its pre-ping);
- ``rebalance``: ``RebalancingQueuePool`` with ``hosts=`` the three servers,
  ``health_check_interval=1``, ``unhealthy_threshold=3``.

Each variant also has a *second pool* in the same process, on a healthy
server only (127.0.0.4), ``size=2``, prefilled where the pool can
(``min_size=2``), a short lifetime (``--second-recycle``, 4 s) and a light
load (one thread, ``SELECT 1`` every 50 ms). It shows whether a hung host of
one pool holds up the background work of another: ``RebalancingQueuePool``
schedules every pool of a process from one worker thread (before the
frozen-host fix that thread also ran every check and connect), so a lifetime
replacement of the second pool that is not done in the background is paid
inside a checkout (``pool.stats().checkouts_waited``). ``QueuePool`` has no
background work: each of its lifetime reconnects is paid in a checkout, by
design, freeze or not. psycopg_pool never connects in a checkout; its
``requests_queued`` counts checkouts that waited for a connection its
workers had not opened yet.

The variants run one after the other, each with its own fresh freeze of the
same server, not concurrently: each gets both CPUs for itself (a throughput
figure measured next to two other loads on 2 vCPUs says little), and the
process-wide worker thread of ``RebalancingQueuePool``, whose stalls are
one of the things measured, then serves only that variant's pools.

Figures per variant:

- *marked down*: ``rebalance`` only, the time from the freeze until
  ``pool.stats().hosts[key].health == "down"`` (polled every 50 ms), and until
  ``signals.host_down`` fired for the host;
- *maintenance thread: longest stall*: ``rebalance`` only, the longest time
  without a pass of the process-wide maintenance thread (its internal
  ``passes`` counter, polled every 50 ms) during the freeze; an idle worker
  makes a pass at least every second, so more than about 1 s is a stall;
- *checkouts onto the frozen host*: for every variant, how many checkouts
  running at the freeze or begun during it got a connection to the frozen
  host (each then hangs in its pre-ping until the thaw), and how long after
  the freeze the last of them began: after that, no new checkout landed on
  the frozen host;
- *in flight*: statements on a connection to the frozen host that was checked
  out before the freeze; no pool can save those, they are counted apart from
  the checkouts made after (how many, and for how long the longest hung);
- *checkouts that waited > 100 ms*: among checkouts still running at the
  freeze or begun after it; and the longest;
- *failed checkouts*: exceptions from checking out or from the statement,
  in-flight statements excepted (``rebalance``: also those begun after the
  host was marked down);
- *transactions/s* in 1-second buckets: before the freeze (mean of the last
  warm-up seconds), during the freeze (min bucket / mean), after the thaw;
- *second pool*: checkouts that had to wait for a connect during the freeze
  (see above), and its slowest checkout then;
- *failback*: ``rebalance``: from the thaw until the host's health is ``up``
  and it holds a connection of the pool; every variant: until the first
  checkout begun after the thaw lands on the thawed host;
- *threads* alive before the variant and after its pools were closed (leak
  check, waiting up to 10 s for threads to exit), and threads still stuck
  when the run was over.

Every load thread has a bounded loop (a stop event and a hard deadline);
threads are joined with a timeout (``--join-timeout``) and reported, never
waited for; the server is thawed in ``finally``, at exit, on SIGTERM and by a
watchdog that interrupts the run when it overstays its plan (by a minute, plus
30 s and ``--join-timeout`` per variant).

Usage::

    .venv/bin/python benchmarks/frozen_host.py [--threads 8] [--think-ms 5] [--freeze 20]
        [--after 8] [--recycle 30] [--second-recycle 4]
        [--variants queuepool,psycopg_pool,rebalance] [--postmaster-only] [--quick] [--check]

``--quick``: warm-up 2 s, freeze 8 s, 4 s after (about 45 s in all).

``--check`` exits 1 when a promise of ``rebalance`` (not a timing) breaks:
a checkout begun after the host was marked down failed, the frozen host was
never marked down, the second pool made a checkout wait for a connect
during the freeze, the host never failed back, or threads leaked or stuck.
"""

from __future__ import annotations

import _thread
import argparse
import atexit
import contextlib
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _support import BASELINE, OURS, ensure_loopback
from sqlalchemy import create_engine, event, text
from sqlalchemy.pool import QueuePool

import sqla_rebalance
from sqla_rebalance import RebalancingQueuePool, signals

PSYCOPG_POOL = "psycopg_pool"
VARIANTS = (BASELINE, PSYCOPG_POOL, OURS)
QUERY = "SELECT pg_sleep(0.002)"
SECOND_QUERY = "SELECT 1"
SLOW = 0.1  # a checkout that waited longer than this (s) is counted as slow
POLL = 0.05  # health polling period (s)
POOL_SIZE = 12
SECOND_SIZE = 2
SECOND_THINK = 0.05


# --------------------------------------------------------------------- helpers


def now() -> float:
    return time.monotonic()


def call_bounded(fn: Callable[[], Any], timeout: float) -> tuple[bool, Any]:
    """Run ``fn`` in a daemon thread; (False, None) if it did not return in time."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except Exception as err:
            box["value"] = err

    t = threading.Thread(target=run, name="frozen-host-bounded-call", daemon=True)
    t.start()
    t.join(timeout)
    return (not t.is_alive(), box.get("value"))


class Freezer:
    """Freeze one server: ``server.freeze()`` (the postmaster and every backend),
    or (``postmaster_only``) the postmaster alone."""

    def __init__(self, server: Any, postmaster_only: bool) -> None:
        self.server = server
        self.postmaster_only = postmaster_only
        self.stopped: list[int] = []
        self.frozen = False

    def freeze(self) -> None:
        pid = self.server.pid
        if pid is None:
            raise RuntimeError(f"{self.server.address} is not running")
        self.frozen = True
        if self.postmaster_only:
            os.kill(pid, signal.SIGSTOP)
            self.stopped.append(pid)
            return
        self.server.freeze()  # the postmaster and every backend (devservers)

    def thaw(self) -> None:
        if not self.frozen:
            return
        stopped, self.stopped = self.stopped, []
        for pid in reversed(stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if not self.postmaster_only:
            self.server.thaw()
        self.frozen = False


def host_of_psycopg(conn: Any) -> str | None:
    info = getattr(conn, "info", None)
    return None if info is None else str(info.host)


# --------------------------------------------------------------------- records


@dataclass
class Txn:
    t0: float  # checkout began
    t1: float  # checkout returned (or failed)
    t2: float  # checked in
    host: str | None
    error: str | None = None
    in_checkout: bool = False  # the error came from the checkout itself


@dataclass
class Timeline:
    start: float = 0.0
    freeze: float = math.inf
    thaw: float = math.inf
    end: float = math.inf


@dataclass
class Result:
    variant: str
    timeline: Timeline
    frozen_host: str
    txns: list[Txn]
    second: list[Txn]
    second_samples: list[tuple[float, int]]
    health: list[tuple[float, str, int]] = field(default_factory=list)
    passes: list[tuple[float, int]] = field(default_factory=list)
    signal_down: float | None = None
    signal_up: float | None = None
    stuck: list[str] = field(default_factory=list)
    threads_before: int = 0
    threads_after: int = 0
    leaked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    second_label: str = ""


# --------------------------------------------------------------------- variants


class Variant:
    """One kind of pool: a main pool over three hosts and a second pool on one."""

    name = ""
    second_label = ""

    def __init__(self, servers: list[Any], args: argparse.Namespace) -> None:
        self.servers = servers
        self.args = args

    # main pool
    def checkout(self) -> Any:
        raise NotImplementedError

    def execute(self, handle: Any) -> None:
        raise NotImplementedError

    def release(self, handle: Any) -> None:
        raise NotImplementedError

    def host_of(self, handle: Any) -> str | None:
        raise NotImplementedError

    # second pool
    def checkout2(self) -> Any:
        raise NotImplementedError

    def execute2(self, handle: Any) -> None:
        raise NotImplementedError

    def release2(self, handle: Any) -> None:
        raise NotImplementedError

    def second_counter(self) -> int:
        """The second pool's "checkouts that waited for a connect" counter."""
        raise NotImplementedError

    def health(self, key: str) -> tuple[str, int] | None:
        """(health, open connections) of ``key`` in the main pool; None: not known."""
        return None

    def details(self) -> list[str]:
        return []

    def close(self) -> None:
        raise NotImplementedError


class _SAVariant(Variant):
    engine: Any
    engine2: Any

    def checkout(self) -> Any:
        return self.engine.connect()

    def execute(self, handle: Any) -> None:
        handle.execute(text(QUERY))

    def release(self, handle: Any) -> None:
        handle.close()

    def host_of(self, handle: Any) -> str | None:
        return host_of_psycopg(handle.connection.driver_connection)

    def checkout2(self) -> Any:
        return self.engine2.connect()

    def execute2(self, handle: Any) -> None:
        handle.execute(text(SECOND_QUERY))

    def release2(self, handle: Any) -> None:
        handle.close()

    def close(self) -> None:
        self.engine.dispose()
        self.engine2.dispose()


class QueuePoolVariant(_SAVariant):
    name = BASELINE
    second_label = "connects (every one in a checkout)"

    def __init__(self, servers: list[Any], args: argparse.Namespace) -> None:
        super().__init__(servers, args)
        hosts = "&".join(f"host={s.host}:{s.port}" for s in servers)
        query = f"{hosts}&load_balance_hosts=random&connect_timeout=2"
        self.engine = create_engine(
            f"postgresql+psycopg://app:app@/app?{query}",
            poolclass=QueuePool,
            pool_size=POOL_SIZE,
            max_overflow=0,
            pool_pre_ping=True,
            pool_recycle=args.recycle,
        )
        self.engine2 = create_engine(
            f"{servers[2].url()}?connect_timeout=2",
            poolclass=QueuePool,
            pool_size=SECOND_SIZE,
            max_overflow=0,
            pool_pre_ping=True,
            pool_recycle=args.second_recycle,
        )
        self.connects = self.connects2 = 0
        event.listen(self.engine, "connect", self._connected)
        event.listen(self.engine2, "connect", self._connected2)

    def _connected(self, dbapi: Any, rec: Any) -> None:
        self.connects += 1

    def _connected2(self, dbapi: Any, rec: Any) -> None:
        self.connects2 += 1

    def second_counter(self) -> int:
        return self.connects2

    def details(self) -> list[str]:
        return [
            f"main pool: {self.connects} connects; second pool: {self.connects2} connects "
            "(every one in a checkout)"
        ]


class RebalanceVariant(_SAVariant):
    name = OURS
    second_label = "stats().checkouts_waited"

    def __init__(self, servers: list[Any], args: argparse.Namespace) -> None:
        super().__init__(servers, args)
        self.engine = create_engine(
            f"{servers[0].url()}?connect_timeout=2",
            poolclass=RebalancingQueuePool,
            hosts=[s.address for s in servers],
            health_check_interval=1.0,
            unhealthy_threshold=3,
            pool_size=POOL_SIZE,
            max_overflow=0,
            pool_pre_ping=True,
            pool_recycle=args.recycle,
            pool_name="frozen-main",
        )
        self.engine2 = create_engine(
            f"{servers[2].url()}?connect_timeout=2",
            poolclass=RebalancingQueuePool,
            pool_size=SECOND_SIZE,
            max_overflow=0,
            min_size=SECOND_SIZE,
            pool_pre_ping=True,
            pool_recycle=args.second_recycle,
            pool_name="frozen-second",
        )
        self.pool = self.engine.pool
        self.pool2 = self.engine2.pool

    def second_counter(self) -> int:
        return int(self.pool2.stats().checkouts_waited)

    def health(self, key: str) -> tuple[str, int] | None:
        h = self.pool.stats().hosts.get(key)
        return None if h is None else (h.health, h.open)

    def details(self) -> list[str]:
        s, s2 = self.pool.stats(), self.pool2.stats()
        retired = {k: v for k, v in s.retirements.items() if v}
        retired2 = {k: v for k, v in s2.retirements.items() if v}
        return [
            f"main pool: {s.connects} connects ({s.checkouts_waited} in a checkout), "
            f"{s.connect_failures} failed; retirements {retired or '{}'}",
            "main pool per host: "
            + ", ".join(f"{k} {h.health} open={h.open}" for k, h in sorted(s.hosts.items())),
            f"second pool: {s2.connects} connects ({s2.checkouts_waited} in a checkout); "
            f"retirements {retired2 or '{}'}",
        ]


class PsycopgPoolVariant(Variant):
    name = PSYCOPG_POOL
    second_label = "get_stats()['requests_queued']"

    def __init__(self, servers: list[Any], args: argparse.Namespace) -> None:
        super().__init__(servers, args)
        from psycopg_pool import ConnectionPool

        check = getattr(ConnectionPool, "check_connection", None)
        hosts = ",".join(s.host for s in servers)
        ports = ",".join(str(s.port) for s in servers)
        conninfo = (
            f"host={hosts} port={ports} dbname=app user=app password=app "
            "load_balance_hosts=random connect_timeout=2"
        )
        self.pool = ConnectionPool(
            conninfo,
            min_size=POOL_SIZE,
            max_size=POOL_SIZE,
            check=check,
            max_lifetime=args.recycle,
            name="frozen-main",
            open=False,
        )
        self.pool2 = ConnectionPool(
            f"{servers[2].dsn()} connect_timeout=2",
            min_size=SECOND_SIZE,
            max_size=SECOND_SIZE,
            check=check,
            max_lifetime=args.second_recycle,
            name="frozen-second",
            open=False,
        )
        self.check_available = check is not None
        self.pool.open(wait=True, timeout=30)
        self.pool2.open(wait=True, timeout=30)

    def checkout(self) -> Any:
        return self.pool.getconn()

    def execute(self, handle: Any) -> None:
        handle.execute(QUERY)

    def release(self, handle: Any) -> None:
        # End the transaction as SQLAlchemy's checkin does (putconn would roll
        # back too, with a warning per call).
        try:
            handle.rollback()
        finally:
            self.pool.putconn(handle)

    def host_of(self, handle: Any) -> str | None:
        return host_of_psycopg(handle)

    def checkout2(self) -> Any:
        return self.pool2.getconn()

    def execute2(self, handle: Any) -> None:
        handle.execute(SECOND_QUERY)

    def release2(self, handle: Any) -> None:
        try:
            handle.rollback()
        finally:
            self.pool2.putconn(handle)

    def second_counter(self) -> int:
        return int(self.pool2.get_stats().get("requests_queued", 0))

    def details(self) -> list[str]:
        keys = ("connections_num", "connections_errors", "connections_lost", "requests_errors")
        s, s2 = self.pool.get_stats(), self.pool2.get_stats()
        return [
            "main pool: " + ", ".join(f"{k}={s.get(k, 0)}" for k in keys),
            "second pool: " + ", ".join(f"{k}={s2.get(k, 0)}" for k in keys),
            f"check=ConnectionPool.check_connection: {'yes' if self.check_available else 'n/a'}",
        ]

    def close(self) -> None:
        self.pool.close(timeout=5)
        self.pool2.close(timeout=5)


VARIANT_CLASSES: dict[str, type[Variant]] = {
    BASELINE: QueuePoolVariant,
    PSYCOPG_POOL: PsycopgPoolVariant,
    OURS: RebalanceVariant,
}


# --------------------------------------------------------------------- one run


class Run:
    """One variant: load, freeze, thaw, watch, tear down."""

    def __init__(
        self, variant: Variant, freezer: Freezer, frozen_key: str, args: argparse.Namespace
    ) -> None:
        self.v = variant
        self.freezer = freezer
        self.frozen_key = frozen_key
        self.frozen_host = frozen_key.rsplit(":", 1)[0]
        self.args = args
        self.stop = threading.Event()
        self.tl = Timeline()
        planned = args.warmup + args.freeze + args.after
        self.deadline = now() + planned + 30.0  # hard bound of every loop
        self.txns: list[Txn] = []
        self.second: list[Txn] = []
        self.where: dict[str, tuple[str, float, str | None]] = {}
        self.second_samples: list[tuple[float, int]] = []
        self.health: list[tuple[float, str, int]] = []
        self.passes: list[tuple[float, int]] = []
        self.signal_down: float | None = None
        self.signal_up: float | None = None
        self.threads: list[threading.Thread] = []

    # -- threads ------------------------------------------------------------
    def _load(self, name: str) -> None:
        v = self.v
        think = self.args.think_ms / 1000.0
        while not self.stop.is_set() and now() < self.deadline:
            t0 = now()
            self.where[name] = ("checking out", t0, None)
            try:
                handle = v.checkout()
            except Exception as err:
                t = now()
                self.txns.append(Txn(t0, t, t, None, _short(err), in_checkout=True))
                self.where[name] = ("backing off", t, None)
                time.sleep(0.05)  # a failing checkout must not spin
                continue
            t1 = now()
            host = None
            with contextlib.suppress(Exception):
                host = v.host_of(handle)
            self.where[name] = ("executing", t1, host)
            error = None
            try:
                v.execute(handle)
            except Exception as err:
                error = _short(err)
            finally:
                self.where[name] = ("checking in", t1, host)
                with contextlib.suppress(Exception):
                    v.release(handle)
            self.txns.append(Txn(t0, t1, now(), host, error))
            if think > 0:
                self.where[name] = ("thinking", now(), None)
                self.stop.wait(random.uniform(0.0, 2.0 * think))
        self.where.pop(name, None)

    def _load2(self, name: str) -> None:
        v = self.v
        while not self.stop.is_set() and now() < self.deadline:
            t0 = now()
            self.where[name] = ("checking out (second pool)", t0, None)
            try:
                handle = v.checkout2()
            except Exception as err:
                t = now()
                self.second.append(Txn(t0, t, t, None, _short(err), in_checkout=True))
                self.stop.wait(SECOND_THINK)
                continue
            t1 = now()
            self.where[name] = ("executing (second pool)", t1, None)
            error = None
            try:
                v.execute2(handle)
            except Exception as err:
                error = _short(err)
            finally:
                with contextlib.suppress(Exception):
                    v.release2(handle)
            self.second.append(Txn(t0, t1, now(), None, error))
            self.where[name] = ("thinking (second pool)", now(), None)
            self.stop.wait(SECOND_THINK)
        self.where.pop(name, None)

    def _watch_second(self, name: str) -> None:
        while not self.stop.is_set() and now() < self.deadline:
            with contextlib.suppress(Exception):
                self.second_samples.append((now(), self.v.second_counter()))
            self.stop.wait(POLL)
        with contextlib.suppress(Exception):
            self.second_samples.append((now(), self.v.second_counter()))

    def _watch_health(self, name: str) -> None:
        from sqla_rebalance import worker

        while not self.stop.is_set() and now() < self.deadline:
            t = now()
            # Maintenance passes of the process-wide worker (internal; None if gone).
            passes = getattr(worker.get_worker(), "passes", None)
            if isinstance(passes, int):
                self.passes.append((t, passes))
            with contextlib.suppress(Exception):
                h = self.v.health(self.frozen_key)
                if h is not None:
                    self.health.append((t, h[0], h[1]))
            self.stop.wait(POLL)

    def _on_host_down(self, sender: Any, host: str | None = None, **kw: Any) -> None:
        pool = getattr(self.v, "pool", None)
        if sender is pool and host == self.frozen_key and self.signal_down is None:
            self.signal_down = now()

    def _on_host_up(self, sender: Any, host: str | None = None, **kw: Any) -> None:
        pool = getattr(self.v, "pool", None)
        if sender is pool and host == self.frozen_key and now() > self.tl.thaw:
            self.signal_up = self.signal_up or now()

    def _spawn(self, target: Callable[[str], None], name: str) -> None:
        t = threading.Thread(target=target, args=(name,), name=name, daemon=True)
        self.threads.append(t)
        t.start()

    # -- the scenario -------------------------------------------------------
    def run(self) -> list[str]:
        """Returns the names (and whereabouts) of threads still stuck at the end."""
        args = self.args
        signals.host_down.connect(self._on_host_down)
        signals.host_up.connect(self._on_host_up)
        try:
            self.tl.start = now()
            for i in range(args.threads):
                self._spawn(self._load, f"frozen-host-load-{i}")
            self._spawn(self._load2, "frozen-host-second-load")
            self._spawn(self._watch_second, "frozen-host-watch-second")
            if isinstance(self.v, RebalanceVariant):
                self._spawn(self._watch_health, "frozen-host-watch-health")
            time.sleep(args.warmup)
            try:
                self.freezer.freeze()
                self.tl.freeze = now()
                print(f"  frozen {self.frozen_key} at +{self.tl.freeze - self.tl.start:.1f} s")
                time.sleep(args.freeze)
            finally:
                self.tl.thaw = now()
                self.freezer.thaw()
            print(f"  thawed at +{self.tl.thaw - self.tl.start:.1f} s")
            time.sleep(args.after)
        finally:
            self.tl.end = now()
            self.stop.set()
            give_up = now() + args.join_timeout
            for t in self.threads:
                t.join(max(0.0, give_up - now()))
            signals.host_down.disconnect(self._on_host_down)
            signals.host_up.disconnect(self._on_host_up)
        stuck = []
        for t in self.threads:
            if t.is_alive():
                what, since, host = self.where.get(t.name, ("?", self.tl.end, None))
                on = f" on {host}" if host else ""
                stuck.append(f"{t.name}: {what}{on} for {now() - since:.1f} s")
        return stuck


def run_variant(
    name: str, servers: list[Any], freezer: Freezer, args: argparse.Namespace
) -> Result:
    before = set(threading.enumerate())
    frozen_key = freezer.server.address
    variant = VARIANT_CLASSES[name](servers, args)
    run = Run(variant, freezer, frozen_key, args)
    stuck = run.run()
    notes = []
    ok, details = call_bounded(variant.details, 10.0)
    if ok and isinstance(details, list):
        notes.extend(details)
    else:
        notes.append(f"pool details unavailable: {details!r}")
    ok, err = call_bounded(variant.close, 15.0)
    if not ok:
        notes.append("closing the pools did not return within 15 s")
    elif err is not None:
        notes.append(f"closing the pools failed: {err!r}")
    # Leak check: threads of this variant (pools, workers, probes, ours) must go.
    give_up = now() + 10.0
    while True:
        alive = threading.enumerate()
        leaked = [t.name for t in alive if t not in before]
        if not leaked or now() >= give_up:
            break
        time.sleep(0.1)
    return Result(
        variant=name,
        timeline=run.tl,
        frozen_host=run.frozen_host,
        txns=list(run.txns),
        second=list(run.second),
        second_samples=list(run.second_samples),
        health=list(run.health),
        passes=list(run.passes),
        signal_down=run.signal_down,
        signal_up=run.signal_up,
        stuck=stuck,
        threads_before=len(before),
        threads_after=len(alive),
        leaked=leaked,
        notes=notes,
        second_label=variant.second_label,
    )


# --------------------------------------------------------------------- figures


def _short(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:200]


def figures(r: Result) -> dict[str, Any]:
    tl = r.timeline
    frozen = r.frozen_host
    ok = [x for x in r.txns if x.error is None]
    in_flight = [
        x for x in r.txns if not x.in_checkout and x.t1 < tl.freeze < x.t2 and x.host == frozen
    ]
    in_flight_ids = {id(x) for x in in_flight}
    others = [x for x in r.txns if id(x) not in in_flight_ids]
    after_freeze = [x for x in others if x.t1 >= tl.freeze]
    slow = [x for x in after_freeze if x.t1 - x.t0 > SLOW]
    failed = [x for x in others if x.error is not None]
    # Checkouts still running at the freeze or begun during it that got a
    # connection to the frozen host (they hung in their pre-ping).
    landed = [x.t0 for x in after_freeze if x.host == frozen and x.t0 < tl.thaw]
    back = [x.t0 for x in others if x.host == frozen and x.t0 >= tl.thaw]

    def bucket_counts(start: float, seconds: int) -> list[int]:
        counts = [0] * max(0, seconds)
        for x in ok:
            k = math.floor(x.t2 - start)
            if 0 <= k < len(counts):
                counts[k] += 1
        return counts

    freeze_len = int(tl.thaw - tl.freeze)
    during = bucket_counts(tl.freeze, freeze_len)
    pre_n = max(1, min(3, int(tl.freeze - tl.start) - 1))
    before = bucket_counts(tl.freeze - pre_n, pre_n)
    after = bucket_counts(tl.thaw, int(tl.end - tl.thaw))

    def counter_at(t: float) -> int | None:
        seen = [v for ts, v in r.second_samples if ts <= t]
        return seen[-1] if seen else None

    c0, c1 = counter_at(tl.freeze), counter_at(tl.thaw)
    second_waits = None if c0 is None or c1 is None else c1 - c0
    second_during = [x for x in r.second if tl.freeze <= x.t0 < tl.thaw]
    second_errors = [x for x in r.second if x.error is not None]

    down_at = next((t for t, h, _ in r.health if t >= tl.freeze and h == "down"), None)
    up_at = next(
        (t for t, h, n in r.health if t >= tl.thaw and h == "up" and n > 0),
        None,
    )
    ever_down = any(h == "down" for _, h, _ in r.health)
    # Longest time without a maintenance pass, over stalls that overlap the freeze.
    stall = None
    if r.passes:
        stall = 0.0
        since, last = r.passes[0]
        for t, p in [*r.passes[1:], (math.inf, -1)]:
            if p != last:
                end = min(t, r.passes[-1][0])
                if end > tl.freeze and since < tl.thaw:
                    stall = max(stall, end - since)
                since, last = t, p
    failed_after_down = [] if down_at is None else [x for x in failed if x.t0 >= down_at]
    return {
        "txns": len(ok),
        "before": before,
        "during": during,
        "after": after,
        "in_flight": in_flight,
        "in_flight_hung": [x for x in in_flight if x.t2 - tl.freeze > SLOW],
        "in_flight_failed": [x for x in in_flight if x.error is not None],
        "slow": slow,
        "longest": max((x.t1 - x.t0 for x in after_freeze), default=0.0),
        "failed": failed,
        "failed_after_down": failed_after_down,
        "landed": max(0.0, max(landed) - tl.freeze) if landed else None,
        "landed_n": len(landed),
        "back": (min(back) - tl.thaw) if back else None,
        "down": None if down_at is None else down_at - tl.freeze,
        "signal_down": None if r.signal_down is None else r.signal_down - tl.freeze,
        "ever_down": ever_down,
        "failback": None if up_at is None else up_at - tl.thaw,
        "second_waits": second_waits,
        "second_slowest": max((x.t1 - x.t0 for x in second_during), default=None),
        "second_errors": second_errors,
        "has_health": bool(r.health),
        "stall": stall,
    }


def _secs(value: float | None, none: str = "never") -> str:
    return none if value is None else f"{value:.2f} s"


def _rate(counts: list[int], how: str) -> str:
    if not counts:
        return "-"
    return str(min(counts)) if how == "min" else f"{sum(counts) / len(counts):.0f}"


def print_results(results: dict[str, Result], figs: dict[str, dict[str, Any]]) -> None:
    names = list(results)

    def ours_only(key: str, fmt: Callable[[Any], str]) -> Callable[[str], str]:
        return lambda n: fmt(figs[n][key]) if n == OURS else "n/a"

    rows: list[tuple[str, Callable[[str], str]]] = [
        ("transactions (whole run)", lambda n: str(figs[n]["txns"])),
        ("tx/s before the freeze (mean)", lambda n: _rate(figs[n]["before"], "mean")),
        ("tx/s during the freeze: min 1-s bucket", lambda n: _rate(figs[n]["during"], "min")),
        ("tx/s during the freeze: mean", lambda n: _rate(figs[n]["during"], "mean")),
        ("tx/s after the thaw (mean)", lambda n: _rate(figs[n]["after"], "mean")),
        ("frozen host marked down after", ours_only("down", _secs)),
        ("host_down signal after", ours_only("signal_down", _secs)),
        (
            "maintenance thread: longest stall, freeze",
            ours_only("stall", lambda v: _secs(v, "n/a")),
        ),
        (
            "checkouts onto the frozen host: last began at (n)",
            lambda n: _secs(figs[n]["landed"], "none") + f" ({figs[n]['landed_n']})",
        ),
        (
            "in flight at the freeze: n / hung / failed",
            lambda n: (
                f"{len(figs[n]['in_flight'])} / {len(figs[n]['in_flight_hung'])}"
                f" / {len(figs[n]['in_flight_failed'])}"
            ),
        ),
        (f"checkouts after the freeze > {SLOW * 1000:.0f} ms", lambda n: str(len(figs[n]["slow"]))),
        ("longest checkout after the freeze", lambda n: _secs(figs[n]["longest"])),
        ("failed checkouts (in flight excepted)", lambda n: str(len(figs[n]["failed"]))),
        (
            "... begun after marked down",
            ours_only("failed_after_down", lambda v: str(len(v))),
        ),
        (
            "2nd pool: waited for a connect, freeze",
            lambda n: "n/a" if figs[n]["second_waits"] is None else str(figs[n]["second_waits"]),
        ),
        (
            "2nd pool: slowest checkout, freeze",
            lambda n: (
                "-"
                if figs[n]["second_slowest"] is None
                else f"{figs[n]['second_slowest'] * 1000:.1f} ms"
            ),
        ),
        ("2nd pool: errors", lambda n: str(len(figs[n]["second_errors"]))),
        ("first new checkout on the thawed host", lambda n: _secs(figs[n]["back"])),
        (
            "failback: up with connections after thaw",
            lambda n: (
                "n/a"
                if n != OURS
                else _secs(figs[n]["failback"]) + ("" if figs[n]["ever_down"] else " (never down)")
            ),
        ),
        (
            "threads before -> after (leaked)",
            lambda n: (
                f"{results[n].threads_before} -> {results[n].threads_after}"
                f" ({len(results[n].leaked)})"
            ),
        ),
        ("threads stuck at the end", lambda n: str(len(results[n].stuck))),
    ]
    width = max(len(label) for label, _ in rows) + 1
    col = max(15, *(len(fmt(n)) + 2 for _, fmt in rows for n in names))
    print("\n" + " " * width + "".join(f"{n:>{col}}" for n in names))
    for label, fmt in rows:
        print(f"{label:<{width}}" + "".join(f"{fmt(n):>{col}}" for n in names))
    print(
        "\nTimes are from the freeze (or, for failback, from the thaw). '2nd pool: waited "
        "for a connect' is, per variant: "
        + "; ".join(f"{n}: {results[n].second_label}" for n in names)
        + "."
    )


# --------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument(
        "--think-ms", type=float, default=5.0, help="mean pause between transactions (ms)"
    )
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--freeze", type=float, default=20.0, help="seconds the host hangs")
    parser.add_argument("--after", type=float, default=8.0, help="seconds watched after")
    parser.add_argument("--recycle", type=float, default=30.0, help="main pools' lifetime (s)")
    parser.add_argument(
        "--second-recycle", type=float, default=4.0, help="second pools' lifetime (s)"
    )
    parser.add_argument("--join-timeout", type=float, default=10.0)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--postmaster-only",
        action="store_true",
        help="stop only the postmaster: new connects hang, open sessions keep answering",
    )
    parser.add_argument("--quick", action="store_true", help="short run for CI smoke tests")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.quick:
        args.warmup, args.freeze, args.after = 2.0, 8.0, 4.0
        args.join_timeout = min(args.join_timeout, 5.0)
    logging.basicConfig(level=logging.WARNING, format="  log: %(name)s: %(message)s")
    logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)

    from sqla_rebalance.devservers import PostgresCluster

    # SIGTERM runs the finally blocks (thaw, stop the servers) like Ctrl-C does.
    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    per_variant = args.warmup + args.freeze + args.after + args.join_timeout + 30.0
    budget = 60.0 + len(names) * per_variant
    freezers: list[Freezer] = []

    def thaw_all() -> None:
        for f in freezers:
            with contextlib.suppress(Exception):
                f.thaw()

    atexit.register(thaw_all)
    watchdog_fired = threading.Event()

    def watchdog() -> None:
        if not watchdog_fired.wait(budget):
            print(f"\nWATCHDOG: the run overstayed its {budget:.0f} s budget; thawing, stopping")
            thaw_all()
            _thread.interrupt_main()

    threading.Thread(target=watchdog, name="frozen-host-watchdog", daemon=True).start()

    results: dict[str, Result] = {}
    try:
        with PostgresCluster(n=3) as cluster:
            servers = cluster.servers[:3]
            for server in servers:
                ensure_loopback(server.url())
            victim = servers[1]
            freezer = Freezer(victim, args.postmaster_only)
            freezers.append(freezer)
            what = "postmaster only" if args.postmaster_only else "postmaster and every backend"
            print(
                f"frozen_host: {args.threads} threads (think {args.think_ms:g} ms), pool size "
                f"{POOL_SIZE} over 3 hosts, pre-ping on; {victim.address} hangs for "
                f"{args.freeze:g} s ({what}), then {args.after:g} s watched; "
                f"sqla_rebalance from {Path(sqla_rebalance.__file__).parent}"
            )
            try:
                for name in names:
                    cluster.ensure_running()
                    print(f"\n[{name}]")
                    r = results[name] = run_variant(name, servers, freezer, args)
                    for note in r.notes:
                        print(f"  {note}")
                    for s in r.stuck:
                        print(f"  STUCK {s}")
                    if r.leaked:
                        print(f"  leaked threads: {', '.join(r.leaked)}")
            finally:
                thaw_all()  # before the cluster stops: a stopped backend ignores SIGTERM
    finally:
        watchdog_fired.set()
        thaw_all()
    figs = {n: figures(r) for n, r in results.items()}
    for n, f in figs.items():
        print(
            f"\n[{n}] tx per second from freeze-{len(f['before'])} s: "
            f"{f['before']} | frozen {f['during']} | thawed {f['after']}"
        )
        tl = results[n].timeline
        for x in sorted(f["slow"], key=lambda x: x.t0)[:8]:
            print(
                f"  slow checkout: began at freeze{x.t0 - tl.freeze:+.2f} s, waited "
                f"{x.t1 - x.t0:.2f} s, got {x.host or 'nothing'}"
                + (f" ({x.error})" if x.error else "")
            )
        for x in f["failed"][:3]:
            print(f"  failed: {x.error}")
        for x in f["second_errors"][:3]:
            print(f"  second pool failed: {x.error}")
    print_results(results, figs)
    if not args.check or OURS not in figs:
        return 0
    f, r = figs[OURS], results[OURS]
    problems = []
    if f["failed_after_down"]:
        problems.append(f"{len(f['failed_after_down'])} failed checkouts after marked down")
    if f["down"] is None:
        problems.append("the frozen host was never marked down")
    if f["second_waits"] is None or f["second_waits"] > 0:
        problems.append(
            f"the second pool connected inside {f['second_waits']} checkouts during the freeze"
        )
    if f["failback"] is None:
        problems.append("the host never failed back (up with connections)")
    if r.leaked or r.stuck:
        problems.append(f"{len(r.leaked)} threads leaked, {len(r.stuck)} stuck")
    for p in problems:
        print(f"CHECK FAILED: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
