"""What a listener reports: its heartbeat payload and the bus figures of ``pool.stats()``.

Split out of :mod:`.listener`, whose :class:`~.listener.Listener` keeps the
loop and the schedule (when a heartbeat is due, and the clock it is read
from) and calls these to say *what* is reported: every attached pool's
figures and churn for ``sqla-rebalance status`` and ``recycle --wait``
(:func:`status_payload`), and one pool's view of its listener
(:func:`bus_stats`). Both only read the listener's bookkeeping, apart from
the churn samples each status appends to.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any

from ..stats import BusStats

if TYPE_CHECKING:
    from ..pool import RebalancingQueuePool
    from .listener import Listener

__all__ = ["bus_stats", "status_payload"]


def status_payload(listener: Listener, now: float) -> dict[str, Any]:
    """``listener``'s process's part of ``sqla-rebalance status`` at ``now`` (JSON-able)."""
    pools = []
    for pool, member in listener.pools():
        stats = pool.stats()
        retired = sum(stats.retirements.values())
        member.samples.append((now, stats.connects, retired))
        while len(member.samples) > 1 and now - member.samples[0][0] > 60.0:
            member.samples.popleft()
        t0, c0, r0 = member.samples[0]
        minutes = max((now - t0) / 60.0, 1e-9)
        pools.append(
            {
                "pool": pool.pool_name,
                "open": stats.open,
                "idle": stats.idle,
                "in_use": stats.in_use,
                "pool_size": stats.pool_size,
                "connects": stats.connects,
                "checkouts_waited": stats.checkouts_waited,
                "retirements": {k: v for k, v in stats.retirements.items() if v},
                "churn_per_min": {
                    "connects": round((stats.connects - c0) / minutes, 1) if now > t0 else 0.0,
                    "retirements": round((retired - r0) / minutes, 1) if now > t0 else 0.0,
                },
                "generation": member.settled,
                "commands_applied": member.applied,
                "commands_pending": len(member.pending.commands) if member.pending else 0,
                "hosts": {
                    key: {
                        "open": h.open,
                        "idle": h.idle,
                        "in_use": h.in_use,
                        "health": h.health,
                        "role": h.role,
                    }
                    for key, h in stats.hosts.items()
                },
            }
        )
    return {
        "v": 1,
        "process": listener.ident,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": listener.created_at,
        "ts": now,
        "generation": listener.applied,
        "accepted": listener.accepted,
        "rejected": sum(listener.rejected.values()),
        "pools": pools,
    }


def bus_stats(listener: Listener, pool: RebalancingQueuePool) -> BusStats:
    """The bus figures of ``pool.stats()``: the listener's, and this pool's share."""
    member = listener._members.get(id(pool))
    mine = member if member is not None and member.ref() is pool else None
    return BusStats(
        generation_applied=listener.applied,
        messages_accepted=listener.accepted,
        messages_rejected=sum(listener.rejected.values()),
        rejected={k: v for k, v in listener.rejected.items() if v},
        duplicates=listener.duplicates,
        connected=listener.connected,
        url=listener.bus.display_url,
        channel=listener.bus.channel,
        reconnects=max(0, listener.connects - 1),
        commands_applied=mine.applied if mine else 0,
        commands_coalesced=mine.coalesced if mine else 0,
        commands_pending=len(mine.pending.commands) if mine and mine.pending else 0,
        last_error=listener.last_error,
        process=listener.ident,
    )
