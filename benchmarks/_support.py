"""Shared helpers of the benchmark suite and scenario scripts.

Imported as a top-level module: the scripts run with ``benchmarks/`` as
``sys.path[0]``, and pytest puts ``benchmarks/`` on ``sys.path`` because the
directory has no ``__init__.py`` (rootdir-relative "prepend" import mode).
"""

from __future__ import annotations

import contextlib
import ipaddress
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import Pool, QueuePool

#: The repository root, so that ``sqla_rebalance`` (development servers included)
#: imports from a checkout even when the package is not installed.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqla_rebalance import RebalancingQueuePool  # noqa: E402

__all__ = [
    "BASELINE",
    "CHECKOUT_POOLS",
    "OURS",
    "ROOT",
    "PoolVariant",
    "ensure_loopback",
    "make_engine",
    "postgres_url",
    "server_counts",
]

#: Pool variant names used in every table and benchmark id.
BASELINE = "queuepool"
OURS = "rebalance"

PoolVariant = tuple[type[Pool], dict[str, Any]]

#: The checkout-overhead comparison: both pools with the same ``pool_recycle``
#: (SQLAlchemy then does the same ``time.time()`` comparison at every
#: checkout), ours with its jitter on top.
CHECKOUT_POOLS: dict[str, PoolVariant] = {
    BASELINE: (QueuePool, {"pool_recycle": 1800}),
    OURS: (RebalancingQueuePool, {"pool_recycle": 1800, "recycle_jitter": 0.2}),
}


def make_engine(url: str, variant: PoolVariant, **kw: Any) -> Engine:
    """An engine for ``url`` with the pool class and options of ``variant``."""
    poolclass, options = variant
    return create_engine(url, poolclass=poolclass, **{**options, **kw})


def ensure_loopback(url: str) -> str:
    """Return ``url`` if its host is on this machine (127.0.0.0/8, ::1, a socket).

    Benchmarks generate load; they must never point at a remote server.
    """
    host = make_url(url).host
    if host in (None, "", "localhost"):
        return url
    try:
        if ipaddress.ip_address(host).is_loopback:
            return url
    except ValueError:
        pass
    raise SystemExit(f"refusing to benchmark against non-loopback host {host!r}")


@contextlib.contextmanager
def postgres_url(dsn: str | None = None) -> Iterator[str]:
    """Yield a PostgreSQL URL: ``dsn`` if given, else a fresh 1-instance cluster."""
    if dsn:
        yield ensure_loopback(dsn)
        return
    from sqla_rebalance.devservers import PostgresCluster

    with PostgresCluster(n=1) as cluster:
        yield ensure_loopback(cluster.servers[0].url(driver="psycopg"))


def server_counts(servers: list[Any], app: str) -> dict[str, int]:
    """Connections with ``application_name = app`` on each server (0 when it is down),
    as the servers themselves see them."""
    counts = {}
    for server in servers:
        if not server.is_running():
            counts[server.host] = 0
            continue
        engine = create_engine(server.url(), poolclass=None)
        with engine.connect() as conn:
            counts[server.host] = conn.execute(
                text("select count(*) from pg_stat_activity where application_name = :a"),
                {"a": app},
            ).scalar()
        engine.dispose()
    return counts
