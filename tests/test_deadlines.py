"""The machinery that keeps a hung host from stalling anything: per-pool executors, the
worker's timers, deadlines and abandoning a socket (pure units, no server)."""

from __future__ import annotations

import pickle
import socket
import threading
import time
from typing import Any

import pytest

from sqla_rebalance.deadlines import Deadline, abandon, socket_fd
from sqla_rebalance.errors import DeadlineExceeded
from sqla_rebalance.executor import Executor
from sqla_rebalance.hosts import failure_reason
from sqla_rebalance.worker import get_worker

from .helpers import wait_for


def test_executor_runs_jobs_on_its_own_threads_and_lets_them_go():
    ex = Executor("t", max_workers=2, idle_timeout=0.1)
    ran: list[str] = []
    done = threading.Event()
    assert ex.submit("a", lambda: (ran.append(threading.current_thread().name), done.set()))
    assert done.wait(5)
    assert ran == ["sqla-rebalance-t"]
    wait_for(lambda: ex.threads == 0)  # idle threads exit


def test_executor_caps_jobs_per_key_so_a_hung_host_cannot_pile_up_work():
    ex = Executor("t", max_workers=4)
    release = threading.Event()
    assert ex.submit("check:h", release.wait)
    assert not ex.submit("check:h", release.wait)  # one check per host at a time
    assert ex.submit("check:other", lambda: None)  # other hosts are not held up
    assert ex.submit("connect", release.wait, cap=2) and ex.submit("connect", release.wait, cap=2)
    assert not ex.submit("connect", release.wait, cap=2)
    release.set()
    wait_for(lambda: ex.busy("check:h") == 0 and ex.busy("connect") == 0)
    assert ex.submit("check:h", lambda: None)
    ex.close()


def test_executor_survives_a_job_raising_a_base_exception():
    class Killer(BaseException):  # like gevent's Timeout
        pass

    def boom() -> None:
        raise Killer

    ex = Executor("t", max_workers=1)
    done = threading.Event()
    assert ex.submit("a", boom)
    assert ex.submit("b", done.set)
    assert done.wait(5)  # the same (only) thread went on
    ex.close()
    assert not ex.submit("c", done.set)  # closed: refused


def test_worker_timers_run_repeat_and_cancel():
    worker = get_worker()
    fired: list[float] = []

    def tick() -> float | None:
        fired.append(time.monotonic())
        return 0.05 if len(fired) < 3 else None

    worker.call_later(0.01, tick)
    wait_for(lambda: len(fired) == 3)
    cancelled: list[int] = []
    timer = worker.call_later(0.05, lambda: cancelled.append(1))
    timer.cancel()
    time.sleep(0.2)
    assert cancelled == []


def test_a_timer_raising_never_stops_the_worker():
    worker = get_worker()

    def bad() -> None:
        raise SystemExit  # even this

    worker.call_later(0.0, bad)
    ok = threading.Event()
    worker.call_later(0.05, ok.set)
    assert ok.wait(5)


class _Owner:
    def __init__(self) -> None:
        self.misses: list[int] = []

    def missed(self, deadline: Deadline) -> None:
        self.misses.append(deadline.misses)


def test_deadline_counts_each_period_unanswered_and_stops_at_finish():
    owner = _Owner()
    deadline = Deadline("probe", "h:1", 0.05, owner.missed)
    wait_for(lambda: len(owner.misses) >= 3)
    assert owner.misses[:3] == [1, 2, 3] and deadline.expired
    deadline.finish()
    seen = len(owner.misses)
    time.sleep(0.2)
    assert len(owner.misses) == seen
    err = deadline.error()
    assert isinstance(err, DeadlineExceeded) and isinstance(err, TimeoutError)
    assert "deadline exceeded: probe to h:1" in str(err)
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_deadline_met_never_fires():
    owner = _Owner()
    with Deadline("health check", "h:1", 0.2, owner.missed) as deadline:
        pass
    time.sleep(0.4)
    assert owner.misses == [] and not deadline.expired


def test_deadline_holds_its_owner_weakly():
    owner = _Owner()
    Deadline("connect", "h:1", 0.05, owner.missed)
    del owner  # gone: the timer finds nobody to tell and stops
    time.sleep(0.2)


class _Conn:
    """A DBAPI-like connection over one end of a socket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock


def test_abandon_wakes_a_thread_blocked_reading_without_the_peer():
    mine, peer = socket.socketpair()  # the peer never answers: a frozen server
    conn = _Conn(mine)
    got: list[Any] = []

    def blocked_read() -> None:
        try:
            got.append(mine.recv(10))
        except OSError as err:
            got.append(err)

    reader = threading.Thread(target=blocked_read)
    reader.start()
    owner = _Owner()
    Deadline("health check", "h:1", 0.1, owner.missed, conn)
    reader.join(5)
    assert not reader.is_alive()
    assert got == [b""] or isinstance(got[0], OSError)
    # The socket is shut before the owner hears of the miss: wait for the notice.
    wait_for(lambda: owner.misses[:1] == [1])
    mine.close()  # the descriptor stayed the driver's to close
    peer.close()


def test_socket_fd_finds_each_drivers_socket_or_none():
    a, b = socket.socketpair()
    with a, b:
        assert socket_fd(_Conn(a)) == a.fileno()

        class Adapted:  # SQLAlchemy's AdaptedConnection
            driver_connection = _Conn(a)

        assert socket_fd(Adapted()) == a.fileno()
    assert socket_fd(object()) is None
    assert abandon(object()) is False  # SQLite: nothing to shut


def _caused(error: Exception, cause: BaseException) -> Exception:
    error.__cause__ = cause
    return error


def _orig(error: Exception, orig: BaseException) -> Exception:
    error.orig = orig  # type: ignore[attr-defined]  # sqlalchemy.exc.DBAPIError
    return error


def test_failure_reason_survives_a_cause_cycle() -> None:
    a, b = Exception("a"), Exception("b")
    a.__cause__, b.__cause__ = b, a
    assert failure_reason(a) == "error"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (DeadlineExceeded("probe", "h", 1.0), "deadline exceeded"),
        (ConnectionRefusedError(111, "Connection refused"), "refused"),
        (
            Exception(
                'connection failed: connection to server at "127.0.0.9", port 5 failed: '
                "Connection refused"
            ),
            "refused",
        ),
        (Exception("connection timeout expired"), "deadline exceeded"),
        (TimeoutError(), "deadline exceeded"),
        (Exception("password authentication failed"), "error"),
        ("refused by policy", "refused"),
        # asyncmy / asyncio
        (OSError(111, "Connect call failed ('127.0.0.3', 3306)"), "refused"),
        (Exception("[Errno 111] Connect call failed ('127.0.0.3', 3306)"), "refused"),
        # mysqlclient (libmariadb): a refused non-blocking connect
        (Exception("(2002, \"Can't connect to server on '127.0.0.3' (115)\")"), "refused"),
        (Exception("(2002, \"Can't connect to server on '127.0.0.3' (113)\")"), "error"),
        # aiomysql: the refusal only in the cause
        (_caused(Exception("Can't connect to MySQL server"), ConnectionRefusedError()), "refused"),
        (_caused(Exception("wrapped"), TimeoutError()), "deadline exceeded"),
        (_orig(Exception("(OperationalError) wrapped"), ConnectionRefusedError()), "refused"),
    ],
)
def test_failure_reasons(error: Any, reason: str) -> None:
    assert failure_reason(error) == reason
