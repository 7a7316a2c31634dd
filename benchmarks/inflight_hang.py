"""A query in flight when its host hangs: what ends the wait, and when?

No pool can rescue a statement that has already been sent: the client sits in
``recv()`` waiting for the reply. This script measures, for psycopg 3 (libpq)
and one PostgreSQL server on 127.0.0.2, how long such a wait lasts with each
kind of timeout, and whether the connection can still be used afterwards.

Cases (one connection each, ``autocommit=True``, each in a process of its
own, all run side by side against the same server):

- ``defaults (libpq)``: libpq defaults (keepalives on, with the system's 2 h
  idle time);
- ``keepalives 1/1/3``: ``keepalives=1 keepalives_idle=1
  keepalives_interval=1 keepalives_count=3``;
- ``tcp_user_timeout=3000`` (ms);
- ``keepalives + tcp_user_timeout``: both of the above;
- ``statement_timeout=2000ms``: ``SET statement_timeout = 2000`` first (a timer
  of the server's own);
- ``async asyncio.timeout(2)``: ``AsyncConnection``, the query awaited in
  ``async with asyncio.timeout(2)``; on the timeout psycopg itself tries to
  cancel the query and waits for the server to confirm (psycopg 3.3: up to
  5 s for the cancel request, then 5 s for the query to end);
- ``async watchdog: shutdown``: ``AsyncConnection``; ``loop.call_later(2,
  ...)`` shuts the connection's socket down;
- ``sync watchdog: cancel()``: a ``threading.Timer`` calls ``conn.cancel()``
  after 2 s (libpq ``PQcancel``: a new connection to the server's
  postmaster, which must read the request);
- ``sync watchdog: shutdown``: a ``threading.Timer`` calls
  ``socket.fromfd(conn.pgconn.socket, ...).shutdown(SHUT_RDWR)`` after 2 s: a
  local system call that makes the blocked ``recv()`` return at once.

A process per case, because one case can stall its whole interpreter
(psycopg's C implementation holds the GIL while ``conn.cancel()`` waits);
each client sends a heartbeat every 0.25 s, so such a stall is reported.

Scenarios (columns):

- ``alive, slow``: control, nothing hangs; the query is ``pg_sleep(60)``;
- ``frozen: in flight``: ``SELECT pg_sleep(0.5)`` is sent, and 0.2 s later
  the server gets SIGSTOP: its postmaster and every backend (a hung host:
  the kernel still completes handshakes, ACKs data and answers keepalive
  probes);
- ``frozen: sent after``: SIGSTOP first, then the query is sent;
- ``partition: in flight`` / ``partition: sent after``: the same with the
  server's packets dropped instead (nftables, or iptables, on the loopback
  interface: ``127.0.0.2:PORT`` as destination and as source, in the raw
  prerouting hook), so nothing ACKs anything. Needs root and ``nft`` or
  ``iptables``; skipped otherwise.

Each cell is the time from sending the query until the client got an error
(or "no error in N s" at the cap, ``--cap``), with the kind of error. A
second table says whether the connection was still usable after the error.
"broken" connections are
closed (``conn.closed``): SQLAlchemy's psycopg dialect counts the error as a
disconnect and invalidates the connection. At the cap the server is thawed
(SIGCONT) or the rules are removed, the clients still waiting are killed,
and their backends terminated. The freeze and the firewall rules are always
undone (``try``/``finally``, also on Ctrl-C and SIGTERM); the rules live in
a table of their own, ``inet sqla_rebalance_inflight_hang``.

Usage::

    .venv/bin/python benchmarks/inflight_hang.py [--cap 30] [--deadline 2]
        [--no-partition] [--quick]

``--quick`` caps each scenario at 15 s (about 1.5 min in all).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ipaddress
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

APP = "inflight-hang"
MP = multiprocessing.get_context("spawn")
NFT_TABLE = "sqla_rebalance_inflight_hang"
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 1,
    "keepalives_interval": 1,
    "keepalives_count": 3,
}
USER_TIMEOUT = {"tcp_user_timeout": 3000}


@dataclass(frozen=True)
class Case:
    label: str
    conninfo: dict[str, Any] = field(default_factory=dict)
    setup: str | None = None
    mode: str = "sync"  # sync | async
    watchdog: str | None = None  # cancel | shutdown | asyncio-timeout


def make_cases(deadline: float) -> list[Case]:
    """The cases, with the application deadline (and statement_timeout) ``deadline``."""
    ms = round(deadline * 1000)
    return [
        Case("defaults (libpq)"),
        Case("keepalives 1/1/3", conninfo=KEEPALIVES),
        Case("tcp_user_timeout=3000", conninfo=USER_TIMEOUT),
        Case("keepalives + tcp_user_timeout", conninfo={**KEEPALIVES, **USER_TIMEOUT}),
        Case(f"statement_timeout={ms}ms", setup=f"SET statement_timeout = {ms}"),
        Case(f"async asyncio.timeout({deadline:g})", mode="async", watchdog="asyncio-timeout"),
        Case("async watchdog: shutdown", mode="async", watchdog="shutdown"),
        Case("sync watchdog: cancel()", watchdog="cancel"),
        Case("sync watchdog: shutdown", watchdog="shutdown"),
    ]


# (key, column header, hang kind or None, query sent before the hang?)
SCENARIOS = [
    ("alive", "alive, slow", None, True),
    ("freeze-in", "frozen: in flight", "freeze", True),
    ("freeze-after", "frozen: sent after", "freeze", False),
    ("part-in", "partition: in flight", "partition", True),
    ("part-after", "partition: sent after", "partition", False),
]


def shutdown_socket(fd: int | None) -> None:
    """Shut the socket under ``fd`` down: local, never waits on the peer."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        sock = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)  # a dup of fd
        with sock:
            sock.shutdown(socket.SHUT_RDWR)


def socket_of(conn: Any) -> int | None:
    with contextlib.suppress(Exception):
        fd = conn.pgconn.socket
        if isinstance(fd, int) and fd >= 0:
            return fd
    return None


def kind_of(error: BaseException | None) -> str:
    if error is None:
        return "returned"
    text = str(error).lower()
    if isinstance(error, psycopg.errors.QueryCanceled):
        return "canceled"
    if isinstance(error, TimeoutError):
        return "TimeoutError"
    if "timed out" in text:
        return "ETIMEDOUT"
    if "closed the connection" in text or "consuming input failed" in text:
        return "closed"
    return type(error).__name__


# --------------------------------------------------------------------------- one case


class Child:
    """The client side of one case, in a process of its own.

    A process per case, because a case can stall its whole interpreter:
    psycopg's C implementation holds the GIL while ``conn.cancel()`` waits in
    ``PQcancel``. A thread sends a heartbeat every 0.25 s, so such a stall
    shows.
    """

    def __init__(self, pipe: Any, case: Case, dsn: str, query: str, deadline: float) -> None:
        self.pipe = pipe
        self.case = case
        self.dsn = dsn
        self.query = query
        self.deadline = deadline
        self.lock = threading.Lock()

    def send(self, *message: Any) -> None:
        with self.lock:
            self.pipe.send(message)

    def beat(self) -> None:
        while True:
            self.send("beat", time.monotonic())
            time.sleep(0.25)

    def main(self) -> None:
        try:
            if self.case.mode == "async":
                asyncio.run(self.run_async())
            else:
                self.run_sync()
        except BaseException as err:
            self.send("setup_error", repr(err)[:200])

    def connect_kwargs(self) -> dict[str, Any]:
        return {"autocommit": True, "application_name": APP, **self.case.conninfo}

    def ready(self) -> None:
        self.send("ready")
        threading.Thread(target=self.beat, daemon=True).start()

    def result(self, error: BaseException | None, usable: bool) -> None:
        end = time.monotonic()
        message = ""
        if error is not None:
            text = (str(error).strip().splitlines() or [""])[0][:120]
            message = f"{type(error).__name__}: {text}" if text else type(error).__name__
        self.send("result", end, kind_of(error), message, usable)

    def run_sync(self) -> None:
        conn = psycopg.connect(self.dsn, **self.connect_kwargs())
        if self.case.setup:
            conn.execute(self.case.setup)
        fd = socket_of(conn)
        self.ready()
        self.pipe.recv()  # go
        timer = None
        if self.case.watchdog == "cancel":
            timer = threading.Timer(self.deadline, self.cancel, args=(conn,))
        elif self.case.watchdog == "shutdown":
            timer = threading.Timer(self.deadline, shutdown_socket, args=(fd,))
        self.send("sent", time.monotonic())
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            conn.execute(self.query)
        except Exception as err:
            self.result(err, not conn.closed)
        else:
            self.result(None, not conn.closed)

    def cancel(self, conn: Any) -> None:
        started = time.monotonic()
        try:
            conn.cancel()
        except Exception as err:
            text = (str(err).strip().splitlines() or [""])[0][:100]
            self.send("note", f"cancel() failed after {time.monotonic() - started:.1f} s: {text}")
        else:
            self.send("note", f"cancel() returned after {time.monotonic() - started:.1f} s")

    async def run_async(self) -> None:
        conn = await psycopg.AsyncConnection.connect(self.dsn, **self.connect_kwargs())
        if self.case.setup:
            await conn.execute(self.case.setup)
        fd = socket_of(conn)
        self.ready()
        await asyncio.to_thread(self.pipe.recv)  # go
        if self.case.watchdog == "shutdown":
            asyncio.get_running_loop().call_later(self.deadline, shutdown_socket, fd)
        self.send("sent", time.monotonic())
        try:
            if self.case.watchdog == "asyncio-timeout":
                async with asyncio.timeout(self.deadline):
                    await conn.execute(self.query)
            else:
                await conn.execute(self.query)
        except Exception as err:
            self.result(err, not conn.closed)
        else:
            self.result(None, not conn.closed)


def child_main(pipe: Any, case: Case, dsn: str, query: str, deadline: float) -> None:
    logging.getLogger("psycopg").setLevel(logging.CRITICAL)  # its failed cancellations
    Child(pipe, case, dsn, query, deadline).main()


class Run:
    """One case in one scenario, seen from the main process."""

    def __init__(self, case: Case, dsn: str, query: str, deadline: float) -> None:
        self.case = case
        self.pipe, child_end = MP.Pipe()
        self.proc = MP.Process(
            target=child_main, args=(child_end, case, dsn, query, deadline), daemon=True
        )
        self.ready = False
        self.setup_error: str | None = None
        self.sent: float | None = None
        self.end: float | None = None
        self.kind = ""
        self.message = ""
        self.usable = False
        self.last_beat = 0.0
        self.notes: list[str] = []
        self.capped_at: float | None = None

    def drain(self) -> None:
        """Read what the child has sent so far (results after the cap are ignored)."""
        with contextlib.suppress(EOFError, OSError):
            while self.pipe.poll():
                what, *rest = self.pipe.recv()
                if what == "ready":
                    self.ready = True
                elif what == "setup_error":
                    self.setup_error = rest[0]
                elif what == "beat":
                    self.last_beat = rest[0]
                elif what == "sent":
                    self.sent = rest[0]
                elif what == "note" and self.capped_at is None:
                    self.notes.append(rest[0])
                elif what == "result" and self.capped_at is None:
                    self.end, self.kind, self.message, self.usable = rest

    @property
    def finished(self) -> bool:
        return self.end is not None or self.setup_error is not None

    def cap(self) -> None:
        self.drain()
        if not self.finished:
            self.capped_at = time.monotonic()
            stalled = self.capped_at - self.last_beat
            if self.last_beat and stalled > 1.0:
                self.notes.append(f"whole client process stalled for the last {stalled:.0f} s")

    def outcome(self, cap: float) -> tuple[str, str]:
        """(cell of the timing table, cell of the usable-afterwards table)."""
        if self.setup_error:
            return "setup failed", "-"
        if self.end is None or self.sent is None:
            return f"no error in {cap:.0f} s", "-"
        return f"{self.end - self.sent:.1f} s {self.kind}", "usable" if self.usable else "broken"


# --------------------------------------------------------------------------- the hangs


class Firewall:
    """Drop every packet to and from ``host:port`` on the loopback interface."""

    def __init__(self, host: str, port: int) -> None:
        address = ipaddress.ip_address(host)
        if not address.is_loopback or address.version != 4:
            raise SystemExit(f"refusing to add firewall rules for non-loopback {host}")
        self.host = host
        self.port = port
        self.tool = self._find_tool()
        self.active = False

    @staticmethod
    def _find_tool() -> str | None:
        if os.geteuid() != 0:
            return None
        path = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])
        for tool in ("nft", "iptables"):
            if shutil.which(tool, path=path):
                return str(shutil.which(tool, path=path))
        return None

    def _iptables(self, action: str) -> list[list[str]]:
        """The two ``iptables`` commands that insert (``-I``) or delete (``-D``) the rules."""
        assert self.tool is not None
        base = [self.tool, "-t", "raw", action, "PREROUTING", "-i", "lo", "-p", "tcp"]
        return [
            [*base, "-d", self.host, "--dport", str(self.port), "-j", "DROP"],
            [*base, "-s", self.host, "--sport", str(self.port), "-j", "DROP"],
        ]

    def _run(self, argv: list[str], stdin: str | None = None) -> None:
        subprocess.run(argv, input=stdin, text=True, capture_output=True, check=True, timeout=10)

    def add(self) -> None:
        assert self.tool is not None
        self.active = True  # before the call: a half-applied ruleset is removed too
        if self.tool.endswith("nft"):
            match = 'iifname "lo" ip'
            ruleset = (
                f"table inet {NFT_TABLE} {{\n"
                "  chain drop_host {\n"
                "    type filter hook prerouting priority raw; policy accept;\n"
                f"    {match} daddr {self.host} tcp dport {self.port} drop\n"
                f"    {match} saddr {self.host} tcp sport {self.port} drop\n"
                "  }\n"
                "}\n"
            )
            self._run([self.tool, "-f", "-"], stdin=ruleset)
        else:
            for argv in self._iptables("-I"):
                self._run(argv)

    def remove(self) -> None:
        if not self.active or self.tool is None:
            return
        if self.tool.endswith("nft"):
            with contextlib.suppress(subprocess.SubprocessError):
                self._run([self.tool, "delete", "table", "inet", NFT_TABLE])
        else:
            for argv in self._iptables("-D"):
                with contextlib.suppress(subprocess.SubprocessError):
                    self._run(argv)
        self.active = False

    @contextlib.contextmanager
    def dropping(self) -> Iterator[None]:
        try:
            self.add()
            yield
        finally:
            self.remove()

    def check(self) -> str | None:
        """None if a partition can be made here, else why not."""
        if os.geteuid() != 0:
            return "not root"
        if self.tool is None:
            return "neither nft nor iptables is installed"
        try:
            with self.dropping():
                try:
                    socket.create_connection((self.host, self.port), timeout=0.5).close()
                except TimeoutError:
                    return None
                return "the rules did not drop a test connect"
        except subprocess.CalledProcessError as err:
            return f"{os.path.basename(self.tool)} failed: {err.stderr.strip()[:200]}"


class Freezer:
    """SIGSTOP a PostgreSQL server: its postmaster *and* every process it forked.

    ``server.freeze()``, then each descendant of the postmaster once more by
    itself: PostgreSQL puts each child (backends included) in a session of
    its own, so a signal to the postmaster's process group would leave the
    backends of established connections answering. The postmaster is stopped
    first (it forks nothing more), then its descendants.
    """

    def __init__(self, server: Any) -> None:
        self.server = server
        self.stopped: list[int] = []

    def postmaster_pid(self) -> int:
        return int((self.server.datadir / "postmaster.pid").read_text().split()[0])

    @staticmethod
    def descendants(root: int) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
        found, todo = [], [root]
        while todo:
            for child in children.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        return found

    def freeze(self) -> None:
        root = self.postmaster_pid()
        self.server.freeze()
        self.stopped = [root]
        os.kill(root, signal.SIGSTOP)  # the same process: in case freeze() used another group
        for pid in self.descendants(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                self.stopped.append(pid)

    def thaw(self) -> None:
        for pid in reversed(self.stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.stopped = []
        self.server.thaw()


def wait_answering(server: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(server.dsn(), connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def terminate_leftovers(server: Any) -> None:
    """End the backends a scenario left behind (slow queries, abandoned sessions)."""
    wait_answering(server)
    with psycopg.connect(server.dsn(), connect_timeout=5, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s AND pid <> pg_backend_pid()",
            (APP,),
        )


def run_scenario(
    server: Any, firewall: Firewall, hang: str | None, before: bool, args: argparse.Namespace
) -> list[Run]:
    query = "SELECT pg_sleep(60)" if hang is None else "SELECT pg_sleep(0.5)"
    runs = [Run(case, server.dsn(), query, args.deadline) for case in make_cases(args.deadline)]
    freezer = Freezer(server)
    try:
        for run in runs:
            run.proc.start()
        started = time.monotonic()
        while time.monotonic() - started < 60 and not all(r.ready or r.setup_error for r in runs):
            for run in runs:
                run.drain()
            time.sleep(0.05)
        waiting = [run for run in runs if run.ready]
        undo: Callable[[], None] = lambda: None  # noqa: E731
        try:
            if before:
                for run in waiting:
                    run.pipe.send("go")
                time.sleep(0.2)  # the query has reached the server and is running
            if hang == "freeze":
                undo = freezer.thaw
                freezer.freeze()
            elif hang == "partition":
                undo = firewall.remove
                firewall.add()
            if not before:
                for run in waiting:
                    run.pipe.send("go")
            started = time.monotonic()
            while time.monotonic() - started < args.cap:
                for run in runs:
                    run.drain()
                if all(run.finished for run in runs):
                    break
                time.sleep(0.02)
            for run in runs:
                run.cap()
        finally:
            undo()
    finally:
        for run in runs:  # the clients still waiting: their sockets close with them
            if run.proc.is_alive():
                run.proc.kill()
        for run in runs:
            run.proc.join(10)
            run.pipe.close()
    terminate_leftovers(server)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=float, default=30.0, help="seconds waited per scenario")
    parser.add_argument("--deadline", type=float, default=2.0, help="application deadline (s)")
    parser.add_argument("--no-partition", action="store_true", help="only the SIGSTOP hangs")
    parser.add_argument("--quick", action="store_true", help="--cap 15")
    args = parser.parse_args(argv)
    if args.quick:
        args.cap = min(args.cap, 15.0)
    logging.basicConfig(level=logging.WARNING, format="  log: %(name)s: %(message)s")
    # SIGTERM runs the finally blocks too (thaw, firewall rules removed).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    # Here rather than at the top: each client process imports this module again.
    from _support import ensure_loopback

    from sqla_rebalance.devservers import PostgresCluster

    with PostgresCluster(n=1) as cluster:
        server = cluster.servers[0]
        ensure_loopback(server.url())
        firewall = Firewall(server.host, server.port)
        atexit.register(firewall.remove)  # belt and braces; remove() is idempotent
        why_not = "--no-partition" if args.no_partition else firewall.check()
        scenarios = [s for s in SCENARIOS if s[2] != "partition" or why_not is None]
        print(
            f"inflight_hang: psycopg {psycopg.__version__} ({psycopg.pq.__impl__}), "
            f"libpq {psycopg.pq.version()}, server {server.address}; "
            f"deadline {args.deadline:g} s, cap {args.cap:g} s"
        )
        if why_not is not None:
            print(f"partition scenarios skipped: {why_not}")
        elif firewall.tool is not None:
            print(f"partitions made with {os.path.basename(firewall.tool)}")
        results: dict[str, list[Run]] = {}
        for key, header, hang, before in scenarios:
            t0 = time.monotonic()
            results[key] = run_scenario(server, firewall, hang, before, args)
            print(f"  {header}: {time.monotonic() - t0:.0f} s")

    headers = [header for _, header, _, _ in scenarios]
    width = max(len(h) for h in headers) + 2
    cases = make_cases(args.deadline)
    label_width = max(len(c.label) for c in cases) + 2
    for title, index in (("time from send to error", 0), ("connection after the error", 1)):
        print(f"\n{title}")
        print(" " * label_width + "".join(f"{h:>{width}}" for h in headers))
        for i, case in enumerate(cases):
            cells = [results[key][i].outcome(args.cap)[index] for key, *_ in scenarios]
            print(f"{case.label:<{label_width}}" + "".join(f"{c:>{width}}" for c in cells))
    notes = [
        f"  {run.case.label}, {header}: {note}"
        for key, header, *_ in scenarios
        for run in results[key]
        for note in ([f"setup: {run.setup_error}"] if run.setup_error else []) + run.notes
    ]
    if notes:
        print("\nnotes:")
        print("\n".join(notes))
    messages: dict[str, str] = {}
    for runs in results.values():
        for run in runs:
            if run.end is not None and run.message:
                messages.setdefault(run.message, run.kind)
    print("\nerror messages:")
    for message, kind in messages.items():
        print(f"  {kind}: {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
