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
  :mod:`sqla_rebalance.devservers` (the PostgreSQL server programs and psycopg
  must be installed; no repository checkout is needed). A host goes down with
  an immediate shutdown (its sessions are killed); the engine uses
  ``pool_pre_ping=True``. The only errors accepted are statements in flight on
  that server at the moment it is killed; they are counted and shown apart.

With ``url`` the original single-database demo runs instead: lifetime
replacement and a graceful ``recycle(spread=1.0)`` half-way, no hosts.

The demo is a demo: the library never imports it. Its modules, in reading
order: ``backends`` (where the hosts come from), ``workload`` (the threads),
``output`` (timestamped lines), ``book`` (what each phase did), ``timeline``
(the run over several hosts), ``report`` (phase lines and the summary) and
``single`` (the single-database demo). The public names are below.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from .backends import DemoUnavailableError, PostgresHosts, SqliteHosts
from .book import min_moves
from .single import run_single
from .timeline import run_hosts

__all__ = ["MODES", "DemoUnavailableError", "min_moves", "run_demo"]

#: Where the demo's hosts come from (see the module docstring).
MODES = ("sqlite", "postgres")


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
        return run_single(duration, threads, recycle, jitter, url, out)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    backend: SqliteHosts | PostgresHosts
    backend = SqliteHosts() if mode == "sqlite" else PostgresHosts()
    try:
        return run_hosts(backend, duration, threads, recycle, jitter, pool_size, out)
    finally:
        backend.close()
