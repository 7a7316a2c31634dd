"""Rate-budgeted rollouts: how long a fleet-wide recycle must last so that the
fleet's new connections to each database host stay within ``--rate`` a second.

The sender of ``recycle --rate N`` reads fleet status (each live process's pools
and their open connections per host, from the heartbeats) and publishes the
recycle with the spread computed here; each pool then spreads its own share
over it (``Ledger.mark_recycle`` stratifies the moments). Used by every front
end through ``commands.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .bus import ProcessStatus
from .bus.message import new_command

__all__ = ["MAX_RATE", "MAX_WIDENING", "budget_spread", "check_rate", "rate_spread"]


#: The highest ``--rate`` (new connections per second per host) accepted.
MAX_RATE = 1_000_000.0


def check_rate(value: Any) -> float:
    """``--rate``: a finite number of new connections per second, above 0 (ValueError)."""
    if isinstance(value, bool):
        raise ValueError(f"--rate must be a number of connections per second, got {value!r}")
    try:
        rate = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(
            f"--rate must be a number of connections per second, got {str(value)[:40]!r}"
        ) from None
    if not 0.0 < rate <= MAX_RATE:  # refuses nan too
        raise ValueError(f"--rate must be above 0 and at most {MAX_RATE:g} per second, got {rate}")
    return rate


def _window_variance(per_second: float) -> float:
    """Variance of one pool's reconnects in a 1-s window, its moments stratified at
    ``per_second`` a second: a point or none from each partial slice at the two ends
    (at most 0.5), like a Bernoulli draw when the slices are longer than a second."""
    return per_second * (1.0 - per_second / 2.0) if per_second <= 1.0 else 0.5


#: :func:`budget_spread` widens a rollout to at most this many times ``total / rate``.
MAX_WIDENING = 2.0


def budget_spread(counts: Sequence[int], rate: float) -> float:
    """The shortest spread over which pools holding ``counts`` connections to one
    host, each reconnecting at its own stratified moments, stay at or under
    ``rate`` new connections in every 1-s window (sliding), as expected.

    The pools draw independently, so the fleet's count in a window wanders around
    the mean ``total / spread``: by about the square root of the summed
    variances (:func:`_window_variance`), and the busiest of the rollout's
    windows by ``sqrt(2 ln(3 spread))`` of those (the maximum of that many
    near-normal counts). The spread is widened until mean plus that margin fits
    the budget: in simulations and on real servers (``benchmarks/rate_rollout.py``)
    the peak window stays near ``rate`` instead of 1.15-1.3 times it, for
    10-40 % more time than ``total / rate``. A rollout that fits in one second
    (``total <= rate``) keeps ``total / rate``; none is widened beyond
    :data:`MAX_WIDENING` times it (at a few connections a second over few pools,
    a window with one more than the budget cannot be ruled out by waiting).
    """
    total = sum(counts)
    spread = total / rate
    if total <= rate:
        return spread

    def peak(seconds: float) -> float:
        deviation = math.sqrt(sum(_window_variance(c / seconds) for c in counts))
        return total / seconds + math.sqrt(2.0 * math.log(3.0 * max(seconds, 1.0))) * deviation

    low, high = spread, spread * MAX_WIDENING
    if peak(high) > rate:  # a low rate over few pools: chance peaks cannot be ruled out
        return high
    for _ in range(40):
        middle = (low + high) / 2.0
        low, high = (middle, high) if peak(middle) > rate else (low, middle)
    return high


def rate_spread(
    processes: Sequence[ProcessStatus], patterns: Sequence[str], host: str | None, rate: float
) -> tuple[float, int, str | None]:
    """The spread that keeps a fleet's reconnects to each database host at or under
    ``rate`` per second: per host, the open connections of every process's pools
    matching one of ``patterns`` (from their heartbeats) given to
    :func:`budget_spread`; the longest of those. Pools whose heartbeat names no
    host count as one host together (the cautious reading). Returns ``(spread,
    connections on that host, the host)``.

    Each pool spreads its share evenly over the spread (``recycle`` stratifies its
    moments), independently of the others: the margin of :func:`budget_spread`
    covers their chance coincidences.
    """
    probes = [new_command("recycle", pool=pattern) for pattern in patterns]
    per_host: dict[str, list[int]] = {}  # host: each pool's open connections on it
    for proc in processes:
        for pool in proc.pools:  # each a dict: parse_heartbeat refused the rest
            name = str(pool.get("pool", ""))
            if not any(probe.matches(name) for probe in probes):
                continue
            hosts = pool.get("hosts")
            if isinstance(hosts, dict) and hosts:
                for key, figures in hosts.items():
                    if host is not None and not (key == host or key.startswith(f"{host}:")):
                        continue
                    n = figures.get("open") if isinstance(figures, dict) else None
                    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                        per_host.setdefault(str(key), []).append(n)
            elif host is None:
                n = pool.get("open")
                if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                    per_host.setdefault("(unnamed)", []).append(n)
    if not per_host:
        return 0.0, 0, None
    spreads = {key: budget_spread(counts, rate) for key, counts in per_host.items()}
    busiest = max(spreads, key=lambda k: (spreads[k], sum(per_host[k])))
    return spreads[busiest], sum(per_host[busiest]), busiest
