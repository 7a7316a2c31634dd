"""Blinker signals sent by sqla-rebalance pools.

Every signal's sender is the pool. Receivers run in the thread that caused
the event (a checkout, a checkin, or the maintenance worker), so keep them
short and never block in them. Accept ``**kwargs``: keywords may be added in
later releases. A receiver that raises is logged (at most once a minute per
receiver) and skipped; it never breaks the pool, nor stops other receivers.

- ``connection_opened``: a new DBAPI connection was opened.
  Keyword arguments: ``host``, ``background`` (True if the maintenance worker
  opened it, False if a checkout had to wait for it), ``connection_id`` (a
  number unique in this process), ``connected_at`` (epoch seconds).
- ``connection_retired``: a connection was closed by the pool.
  Keyword arguments: ``host``, ``reason`` (one of
  :data:`sqla_rebalance.stats.RETIREMENT_REASONS`), ``age`` (seconds open),
  ``connection_id``, ``connected_at`` and ``closed_at`` (epoch seconds).
- ``host_up`` / ``host_down``: a host changed health. Keyword: ``host``;
  ``host_down`` also has ``reason`` (``deadline exceeded`` for a host that
  hangs, ``refused``, or ``error``) and ``error`` (the last error's text).
- ``host_suspect``: a host that was up failed once (a check or connect got
  an error or no answer within ``health_check_timeout``): new connections
  avoid it from now on. Keywords: ``host``, ``reason``, ``error``.
- ``hosts_changed``: the set of hosts changed. Keywords: ``added``, ``removed``.
- ``recycle_requested``: ``pool.recycle()`` was called (locally or by a
  cluster-wide command). Keywords: ``host``, ``spread``, ``reason``.
- ``refresh_requested``: ``pool.refresh()`` was called (locally or by a
  cluster-wide ``refresh``), before DNS names are re-resolved. No keywords. A
  receiver that keeps the host list elsewhere (a file, a config service) can
  re-read it and call ``sender.set_hosts(...)`` here.
- ``pool_disposed``: ``pool.dispose()`` finished (its idle connections are
  closed). No keywords. The connection event log flushes on it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from blinker import Namespace, Signal

__all__ = [
    "connection_opened",
    "connection_retired",
    "emit",
    "host_down",
    "host_suspect",
    "host_up",
    "hosts_changed",
    "namespace",
    "pool_disposed",
    "recycle_requested",
    "refresh_requested",
]

namespace = Namespace()

connection_opened = namespace.signal("connection-opened", doc="A new DBAPI connection was opened.")
connection_retired = namespace.signal(
    "connection-retired", doc="A pooled connection was closed by the pool, with a reason."
)
host_up = namespace.signal("host-up", doc="A host became healthy.")
host_down = namespace.signal("host-down", doc="A host was marked down.")
host_suspect = namespace.signal("host-suspect", doc="A host failed once; avoided for now.")
hosts_changed = namespace.signal("hosts-changed", doc="The set of hosts changed.")
recycle_requested = namespace.signal("recycle-requested", doc="A recycle was requested.")
refresh_requested = namespace.signal(
    "refresh-requested", doc="A refresh was requested: re-read hosts and settings now."
)
pool_disposed = namespace.signal("pool-disposed", doc="A pool was disposed.")

log = logging.getLogger("sqla_rebalance.signals")
_LOG_EVERY = 60.0
_last_logged: dict[int, float] = {}


def emit(signal: Signal, sender: object, **kwargs: Any) -> None:
    """Send ``signal``, calling each receiver on its own.

    blinker's ``send`` stops at the first receiver that raises, and the
    exception would then surface in the pool's checkin or maintenance pass.
    Here each receiver's failure is logged and the others still run.
    """
    for receiver in signal.receivers_for(sender):
        try:
            receiver(sender, **kwargs)
        except Exception:
            key = id(receiver)
            now = time.monotonic()
            if now - _last_logged.get(key, -_LOG_EVERY) >= _LOG_EVERY:
                _last_logged[key] = now
                name = getattr(signal, "name", None) or "a signal"
                log.exception("a receiver of %s failed: %r", name, receiver)
