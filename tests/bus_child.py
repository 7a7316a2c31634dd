"""An application process for the multi-process bus tests (run by ``tests/bus_proc.py``).

Reads one JSON object from argv[1]: ``db`` (SQLAlchemy URL), ``bus``, ``pool``
(pool name), ``secret`` (or null), ``pool_size``, ``interval``
(``min_recycle_interval``), optional ``fixed_backoff`` (seconds the listener
waits before each reconnect) and ``load`` (threads running transactions).

Prints one JSON line per event on stdout: ``ready`` (with ``process``),
``recycle`` (a ``recycle_requested`` signal: ``reason``, ``spread``,
``host``, ``t``), and on ``stats`` / ``quit`` lines on stdin, ``stats``
(``pool.stats().as_dict()``) and ``bye`` (with the load's commits and errors).
"""

from __future__ import annotations

import json
import sys
import threading
import time
import types
from typing import Any

from sqlalchemy import create_engine, text

from sqla_rebalance import RebalancingQueuePool, signals
from sqla_rebalance.bus import listener as bus_listener

_lock = threading.Lock()


def emit(event: str, **data: Any) -> None:
    with _lock:
        sys.stdout.write(json.dumps({"event": event, **data}) + "\n")
        sys.stdout.flush()


def main() -> None:
    cfg = json.loads(sys.argv[1])
    if cfg.get("fixed_backoff"):
        # Reconnect exactly this long after a failure (no jitter), so that a test can send a
        # command while every listener is certainly disconnected.
        pause = float(cfg["fixed_backoff"])
        bus_listener._BACKOFF_MIN = bus_listener._BACKOFF_MAX = pause
        bus_listener.random = types.SimpleNamespace(uniform=lambda a, b: b)  # type: ignore[assignment]
    engine = create_engine(
        cfg["db"],
        poolclass=RebalancingQueuePool,
        pool_size=cfg.get("pool_size", 4),
        min_size=cfg.get("pool_size", 4),
        max_overflow=0,
        pool_name=cfg["pool"],
        broadcast=cfg["bus"],
        broadcast_secret=cfg.get("secret"),
        min_recycle_interval=cfg.get("interval", 0.0),
    )
    pool = engine.pool
    assert isinstance(pool, RebalancingQueuePool)

    def on_recycle(sender: Any, **kw: Any) -> None:
        if sender is pool:
            emit("recycle", t=time.time(), **kw)

    signals.recycle_requested.connect(on_recycle)
    stop = threading.Event()
    results = {"commits": 0, "errors": []}  # type: dict[str, Any]

    def load() -> None:
        while not stop.is_set():
            try:
                with engine.begin() as conn:
                    conn.execute(text("SELECT 1"))
                    conn.execute(text("SELECT 2"))
                results["commits"] += 1
            except Exception as err:  # counted: the test asserts there are none
                results["errors"].append(repr(err)[:300])
            stop.wait(0.002)

    threads = [threading.Thread(target=load) for _ in range(cfg.get("load", 0))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    # Ready: listening, and min_size connections open (a recycle then has them all to do).
    while (
        pool.listener is None
        or not pool.listener.connected
        or pool.stats().open < cfg.get("pool_size", 4)
    ):
        if time.monotonic() > deadline:
            emit("error", message="listener never connected")
            return
        time.sleep(0.01)
    emit("ready", process=pool.stats().bus.process)
    for line in sys.stdin:
        word = line.strip()
        if word == "stats":
            emit("stats", stats=pool.stats().as_dict())
        elif word == "quit":
            break
    stop.set()
    for t in threads:
        t.join()
    emit("bye", commits=results["commits"], errors=results["errors"])
    engine.dispose()


if __name__ == "__main__":
    main()
