"""``sqla-rebalance demo``: watch a rebalancing pool work, with no server needed.

A few threads run a small read/write workload on a SQLite file through a
``RebalancingQueuePool`` with a short ``pool_recycle``. The demo prints each
connection the pool opens and retires (and why), a stats line every couple
of seconds, triggers a manual graceful ``recycle(spread=...)`` half-way, and
ends with the pool's counters: every lifetime replacement happened in the
background, so no checkout waited for a connect after warm-up.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import create_engine, text

from . import signals
from .pool import RebalancingQueuePool

__all__ = ["run_demo"]


def run_demo(
    duration: float = 12.0,
    threads: int = 4,
    recycle: float = 4.0,
    jitter: float = 0.5,
    url: str | None = None,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Run the demo; return the final ``pool.stats().as_dict()``."""
    import sys

    out = out or sys.stdout
    start = time.monotonic()
    lock = threading.Lock()

    def say(msg: str) -> None:
        with lock:
            print(f"[{time.monotonic() - start:6.2f}s] {msg}", file=out, flush=True)

    tmp = None
    if url is None:
        tmp = tempfile.TemporaryDirectory(prefix="sqla-rebalance-demo-")
        url = f"sqlite:///{Path(tmp.name) / 'demo.db'}"
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
    names: dict[int, str] = {}

    def name(rec_dbapi: Any) -> str:
        return names.setdefault(id(rec_dbapi), f"conn-{len(names) + 1}")

    def on_opened(sender: Any, **kw: Any) -> None:
        if sender is pool:
            how = "in the background" if kw["background"] else "inside a checkout"
            say(f"opened   a connection to {kw['host']} {how}")

    def on_retired(sender: Any, **kw: Any) -> None:
        if sender is pool:
            say(f"retired  a connection after {kw['age']:5.2f}s  reason={kw['reason']}")

    signals.connection_opened.connect(on_opened)
    signals.connection_retired.connect(on_retired)
    print(
        f"sqla-rebalance demo: {threads} threads, pool_recycle={recycle}s, "
        f"recycle_jitter={jitter} "
        f"(lifetimes drawn in [{recycle * (1 - jitter):.1f}, {recycle:.1f}]s), "
        f"{duration:.0f}s on {url}",
        file=out,
    )
    with engine.begin() as conn:
        conn.execute(text("create table if not exists events (id integer primary key, who text)"))

    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0]

    def workload(i: int) -> None:
        rng = random.Random(i)
        try:
            while not stop.is_set():
                with engine.begin() as conn:
                    conn.execute(text("insert into events (who) values (:w)"), {"w": f"t{i}"})
                    conn.execute(text("select count(*) from events")).scalar()
                with lock:
                    done[0] += 1
                stop.wait(rng.uniform(0.005, 0.02))
        except BaseException as err:  # shown at the end; a demo must not hide errors
            errors.append(err)

    workers = [threading.Thread(target=workload, args=(i,), daemon=True) for i in range(threads)]
    for t in workers:
        t.start()
    recycled = False
    next_report = 2.0
    try:
        while (elapsed := time.monotonic() - start) < duration:
            if not recycled and elapsed >= duration / 2:
                recycled = True
                n = pool.recycle(spread=1.0, reason="manual")
                say(f"pool.recycle(spread=1.0): {n} connections to replace gracefully")
            if elapsed >= next_report:
                next_report += 2.0
                s = pool.stats()
                say(
                    f"stats    open={s.open} idle={s.idle} in_use={s.in_use} "
                    f"connects={s.connects} waited={s.checkouts_waited} "
                    f"transactions={done[0]}"
                )
            time.sleep(0.05)
    finally:
        stop.set()
        for t in workers:
            t.join()
        signals.connection_opened.disconnect(on_opened)
        signals.connection_retired.disconnect(on_retired)
    stats = pool.stats().as_dict()
    engine.dispose()
    if tmp is not None:
        tmp.cleanup()
    retirements = {k: v for k, v in stats["retirements"].items() if v}
    print(
        f"\ndone: {done[0]} transactions, {len(errors)} errors\n"
        f"connections opened: {stats['connects']} "
        f"(of which by a waiting checkout: {stats['checkouts_waited']}, "
        f"warm-up included; the rest in the background)\n"
        f"retired by reason: {retirements}",
        file=out,
    )
    if errors:
        raise RuntimeError(f"demo workload failed: {errors[0]!r}") from errors[0]
    return stats
