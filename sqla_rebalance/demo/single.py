"""The single-database demo (``--url``): lifetime replacement and a graceful recycle, no hosts."""

from __future__ import annotations

import threading
import time
from typing import Any, TextIO

from sqlalchemy import create_engine

from .. import signals
from ..pool import RebalancingQueuePool
from .output import REPORT_EVERY, Out
from .workload import Workload, create_table


def run_single(
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
        create_table(engine)
        shim = Out(out)
        shim.start = start
        workload = Workload(engine, threads, shim)
        workload.start()
        recycled = False
        next_report = REPORT_EVERY
        while (elapsed := time.monotonic() - start) < duration:
            if not recycled and elapsed >= duration / 2:
                recycled = True
                n = pool.recycle(spread=1.0, reason="manual")
                say(f"pool.recycle(spread=1.0): {n} connections to replace gracefully")
            if elapsed >= next_report:
                next_report += REPORT_EVERY
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
