"""One process-wide pool per database alias, shared by every thread.

Django gives each thread its own ``DatabaseWrapper``; the pool behind them
is one per alias and process, created at the first connection (not at
import or app loading: ``manage.py migrate`` or a forked worker should not
open connections it never uses).

Each pool is built from the alias's *current* connection parameters and
configuration, and replaced when they change: Django's test runner rewrites
``settings_dict["NAME"]`` in place to ``test_<name>``, ``override_settings``
changes ``TIME_ZONE`` (which changes psycopg's adapters), a parallel test
worker switches to its clone. The comparison is ``==`` on the parameters
dict, which is cheap (the values are the same objects from one connection to
the next, and equal objects compare by identity first). The replaced pool is
disposed: idle connections are closed at once, connections checked out from
it are closed when returned (the backend sees that their pool is no longer
current), so nothing keeps a test database busy when Django drops it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from ...pool import RebalancingQueuePool

__all__ = ["all_pools", "dispose", "engine_for", "get_pool", "is_current"]

log = logging.getLogger("sqla_rebalance.django")


@dataclass(frozen=True)
class _Entry:
    signature: tuple[Any, ...]
    engine: Engine


_lock = threading.Lock()
_entries: dict[str, _Entry] = {}


def engine_for(alias: str, signature: tuple[Any, ...], build: Callable[[], Engine]) -> Engine:
    """The engine of ``alias`` for ``signature``; built (and the old one disposed) if it changed.

    The fast path takes no lock: a dict read is atomic, and the entry is
    immutable.
    """
    entry = _entries.get(alias)
    if entry is not None and entry.signature == signature:
        return entry.engine
    with _lock:
        entry = _entries.get(alias)
        if entry is not None and entry.signature == signature:
            return entry.engine
        engine = build()
        _entries[alias] = _Entry(signature, engine)
    if entry is not None:
        log.info("database %s: settings changed, replacing its pool", alias)
        entry.engine.dispose()
    return engine


def is_current(alias: str, pool: object) -> bool:
    """Whether ``pool`` is still the pool of ``alias`` (not replaced or disposed)."""
    entry = _entries.get(alias)
    return entry is not None and entry.engine.pool is pool


def get_pool(alias: str = "default") -> RebalancingQueuePool | None:
    """The pool of ``alias`` in this process; None until its first connection.

    Use it for ``stats()``, or to act on this process only
    (``get_pool().recycle(spread=30)``); cluster-wide commands go over the
    bus (``manage.py sqla_rebalance``).
    """
    entry = _entries.get(alias)
    pool = entry.engine.pool if entry is not None else None
    return pool if isinstance(pool, RebalancingQueuePool) else None


def all_pools() -> dict[str, RebalancingQueuePool]:
    """Every pool of this process, by alias."""
    out = {}
    for alias in list(_entries):
        pool = get_pool(alias)
        if pool is not None:
            out[alias] = pool
    return out


def dispose(alias: str | None = None) -> None:
    """Close the idle connections of ``alias``'s pool (every alias's if None) and forget it.

    Connections in use are closed when Django returns them. The next
    connection of the alias builds a new pool.
    """
    with _lock:
        if alias is None:
            gone = list(_entries.values())
            _entries.clear()
        else:
            entry = _entries.pop(alias, None)
            gone = [entry] if entry is not None else []
    for entry in gone:
        entry.engine.dispose()


def _after_fork_in_child() -> None:
    # The lock may have been held by another thread at fork time. The pools
    # themselves are fork-safe (they drop the parent's connections).
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
