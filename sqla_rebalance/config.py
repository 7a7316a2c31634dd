"""Validation of pool arguments, so that bad configuration fails at ``create_engine``."""

from __future__ import annotations

import math
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigurationError

__all__ = [
    "DEFAULT_JITTER",
    "DEFAULT_POOL_NAME",
    "MAX_COUNT",
    "MAX_POOL_NAME",
    "MAX_SECONDS",
    "PoolConfig",
    "brief_repr",
]

#: Default ``recycle_jitter`` when ``pool_recycle`` is set: connections opened
#: together expire spread over the last 20 % of ``pool_recycle``.
DEFAULT_JITTER = 0.2
DEFAULT_POOL_NAME = "default"

#: ``target_role`` values (libpq's ``target_session_attrs`` names).
TARGET_ROLES = ("any", "primary", "standby", "prefer-standby")
#: DNS answers are re-resolved after their TTL, clamped to this range (s):
#: at most once a second per name, and at least once a minute.
DEFAULT_DNS_MIN_REFRESH = 1.0
DEFAULT_DNS_MAX_REFRESH = 60.0
#: Seconds between health checks of each host (CockroachDB's guidance is to
#: notice a failure in under 10 s; a failed connect is noticed at once, a
#: hung host within interval + threshold x timeout: about 4 s by default).
DEFAULT_HEALTH_CHECK_INTERVAL = 1.0
#: Seconds a health check (a query on an idle connection, a connect probe),
#: a role query or a connect may go unanswered before it counts as a host
#: failure ("deadline exceeded"). A ping on a LAN takes well under a
#: millisecond; a second without an answer is a host that hangs.
DEFAULT_HEALTH_CHECK_TIMEOUT = 1.0
#: The driver's connect timeout for the connections the pool opens, when the
#: URL and connect_args give none (libpq's default is to wait forever).
DEFAULT_CONNECT_DEADLINE = 5.0
DEFAULT_UNHEALTHY_THRESHOLD = 3
#: Seconds over which a rebalance moves connections (so that a new replica
#: is not hit by every process's reconnects in the same instant).
DEFAULT_REBALANCE_SPREAD = 1.0
#: A pool applies at most one batch of cluster-wide commands per this many
#: seconds; commands arriving faster are coalesced (a flood, a script run in
#: a loop by mistake, several operators at once).
DEFAULT_MIN_RECYCLE_INTERVAL = 10.0


#: The longest wait Python's threading accepts (``Lock.acquire``,
#: ``Condition.wait``, hence ``queue.Queue.get``): about 292 years on Linux and
#: macOS, 49.7 days on Windows. ``pool_timeout`` is such a wait at checkout,
#: and no duration setting may go beyond it: a larger value would pass here
#: and fail later (an ``OverflowError`` at the first checkout that waits).
MAX_SECONDS = threading.TIMEOUT_MAX
#: The largest connection count or threshold (``sys.maxsize``, what ``len()``
#: and ``queue.Queue`` sizes are bounded by).
MAX_COUNT = sys.maxsize
#: Intervals and timeouts below this would make the background work a busy
#: loop (a health check or a DNS query per host every few microseconds).
MIN_INTERVAL = 0.01
#: The bound of ``health_check_timeout`` and ``connect_deadline`` (an hour).
MAX_DEADLINE = 3600.0
#: ``rebalance_spread`` at most a day, as the spread of a cluster-wide recycle.
MAX_REBALANCE_SPREAD = 86400.0
#: The longest pool name a cluster-wide command can address (``--pool``).
MAX_POOL_NAME = 200


def brief_repr(value: object) -> str:
    """``repr(value)`` for a message: short, and never failing.

    A huge integer is described rather than printed (``str()`` of one with
    more than 4,300 digits raises ``ValueError``), a long repr is cut.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        digits = int(value.bit_length() * math.log10(2)) + 1
        return f"{'a negative' if value < 0 else 'an'} integer of about {digits} digits"
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real problem
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= 80 else text[:77] + "..."


def _number(name: str, value: object) -> float:
    """A finite ``float``; an integer too large for one gives ``±inf`` (out of every range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be a number, got {brief_repr(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond 1.8e308: the range checks refuse it
        return math.inf if value > 0 else -math.inf
    if math.isnan(number) or math.isinf(number):
        raise ConfigurationError(f"{name} must be a finite number, got {brief_repr(value)}")
    return number


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an integer, got {brief_repr(value)}")
    return int(value)


def _count(name: str, value: object, least: int) -> int:
    """An integer in ``[least, sys.maxsize]``."""
    number = _integer(name, value)
    if not least <= number <= MAX_COUNT:
        raise ConfigurationError(
            f"{name} must be >= {least} and <= {MAX_COUNT} (sys.maxsize), got {brief_repr(value)}"
        )
    return number


def _seconds(
    name: str, value: object, least: float, most: float = MAX_SECONDS, *, above: bool = False
) -> float:
    """A number of seconds in ``[least, most]`` (``(least, most]`` with ``above``)."""
    number = _number(name, value)
    if (number <= least if above else number < least) or number > most:
        low = f"> {least:g}" if above else f">= {least:g}"
        high = f"{most:.0f}" + (" (threading.TIMEOUT_MAX)" if most == MAX_SECONDS else "")
        raise ConfigurationError(
            f"{name} must be {low} and <= {high} seconds, got {brief_repr(value)}"
        )
    return number


@dataclass(frozen=True)
class PoolConfig:
    """The validated settings of one pool (``pool.config``)."""

    pool_size: int
    #: -1 when ``pool_size`` is 0 (no limit), as ``QueuePool`` stores it.
    max_overflow: int
    #: ``pool_timeout``; None: a checkout waits without a limit (``QueuePool``).
    timeout: float | None
    #: ``pool_recycle`` in seconds; -1 when lifetimes are unlimited.
    recycle: float
    recycle_jitter: float
    min_size: int
    max_idle: float | None
    pool_name: str
    #: ``hosts=`` as given (parsed by the pool, which knows the dialect).
    hosts: Any = None
    target_role: str = "any"
    #: As given: nameserver strings, a dnspython ``Resolver``, or None (system).
    dns_nameservers: Any = None
    dns_min_refresh: float = DEFAULT_DNS_MIN_REFRESH
    dns_max_refresh: float = DEFAULT_DNS_MAX_REFRESH
    health_check_interval: float | None = DEFAULT_HEALTH_CHECK_INTERVAL
    health_check_timeout: float = DEFAULT_HEALTH_CHECK_TIMEOUT
    connect_deadline: float = DEFAULT_CONNECT_DEADLINE
    unhealthy_threshold: int = DEFAULT_UNHEALTHY_THRESHOLD
    rebalance_spread: float = DEFAULT_REBALANCE_SPREAD
    #: ``broadcast`` as given: a bus URL, a ``Bus`` object, or None.
    broadcast: Any = field(default=None, repr=False)
    min_recycle_interval: float = DEFAULT_MIN_RECYCLE_INTERVAL
    # As given, so ``recreate()`` passes on exactly what the user passed.
    recycle_jitter_arg: float | None = None
    pool_name_arg: str | None = None

    @classmethod
    def build(
        cls,
        *,
        pool_size: int,
        max_overflow: int,
        timeout: float | None,
        recycle: float,
        recycle_jitter: float | None,
        min_size: int,
        max_idle: float | None,
        pool_name: str | None,
        hosts: Any = None,
        target_role: str | None = None,
        dns_nameservers: Any = None,
        dns_min_refresh: float | None = None,
        dns_max_refresh: float | None = None,
        health_check_interval: float | None = DEFAULT_HEALTH_CHECK_INTERVAL,
        health_check_timeout: float | None = None,
        connect_deadline: float | None = None,
        unhealthy_threshold: int | None = None,
        rebalance_spread: float | None = None,
        broadcast: Any = None,
        min_recycle_interval: float | None = None,
    ) -> PoolConfig:
        pool_size = _count("pool_size", pool_size, 0)
        if pool_size == 0:
            # QueuePool: no limit at all, and max_overflow is not looked at
            # (it stores -1); refusing a value it ignores would not be drop-in.
            max_overflow = -1
        else:
            max_overflow = _integer("max_overflow", max_overflow)
            if not -1 <= max_overflow <= MAX_COUNT:
                raise ConfigurationError(
                    f"max_overflow must be >= 0, or -1 for no limit (and <= {MAX_COUNT}, "
                    f"sys.maxsize), got {brief_repr(max_overflow)}"
                )
        checkout_timeout: float | None = None
        if timeout is not None:  # None: wait without a limit, as QueuePool
            checkout_timeout = _number("pool_timeout", timeout)
            if not 0 <= checkout_timeout <= MAX_SECONDS:
                raise ConfigurationError(
                    f"pool_timeout must be >= 0 seconds and <= {MAX_SECONDS:.0f} "
                    "(threading.TIMEOUT_MAX, the longest wait Python accepts), or None to wait "
                    f"without a limit, got {brief_repr(timeout)}"
                )
        given_recycle = recycle
        recycle = _number("pool_recycle", recycle)
        if recycle != -1 and not 0 < recycle <= MAX_SECONDS:
            # -0.5 is no "disabled" value: QueuePool would reconnect at every checkout.
            raise ConfigurationError(
                f"pool_recycle must be a positive number of seconds (<= {MAX_SECONDS:.0f}, "
                f"threading.TIMEOUT_MAX), or -1 to disable, got {brief_repr(given_recycle)}"
            )
        if recycle_jitter is None:
            jitter = DEFAULT_JITTER if recycle > 0 else 0.0
        else:
            jitter = _number("recycle_jitter", recycle_jitter)
            if not 0.0 <= jitter < 1.0:
                raise ConfigurationError(
                    "recycle_jitter must be in [0, 1) (a fraction of pool_recycle), "
                    f"got {brief_repr(recycle_jitter)}"
                )
            if recycle <= 0:
                raise ConfigurationError(
                    "recycle_jitter needs pool_recycle: set pool_recycle (the maximum "
                    "lifetime in seconds) or leave recycle_jitter out"
                )
        min_size = _count("min_size", min_size, 0)
        if pool_size and min_size > pool_size:
            raise ConfigurationError(
                f"min_size ({min_size}) cannot be larger than pool_size ({pool_size})"
            )
        if max_idle is not None:
            given_idle = max_idle
            max_idle = _number("max_idle", max_idle)
            if not 0 < max_idle <= MAX_SECONDS:
                raise ConfigurationError(
                    f"max_idle must be a positive number of seconds (<= {MAX_SECONDS:.0f}, "
                    f"threading.TIMEOUT_MAX) or None, got {brief_repr(given_idle)}"
                )
        if pool_name is not None:
            if not isinstance(pool_name, str) or not pool_name.strip():
                raise ConfigurationError(
                    f"pool_name must be a non-empty string, got {brief_repr(pool_name)}"
                )
            if len(pool_name) > MAX_POOL_NAME:
                raise ConfigurationError(
                    f"pool_name must be at most {MAX_POOL_NAME} characters (the longest name "
                    f"a cluster-wide command can address), got {len(pool_name)}"
                )
            if not pool_name.isprintable():
                raise ConfigurationError(
                    "pool_name must be printable text, without line breaks, tabs or other "
                    f"control characters (it is written to logs and matched by cluster-wide "
                    f"commands), got {brief_repr(pool_name)}"
                )
        role = target_role if target_role is not None else "any"
        if not isinstance(role, str) or role not in TARGET_ROLES:
            raise ConfigurationError(
                f"target_role must be one of {', '.join(TARGET_ROLES)}, "
                f"got {brief_repr(target_role)}"
            )
        dns_min = _seconds(
            "dns_min_refresh",
            DEFAULT_DNS_MIN_REFRESH if dns_min_refresh is None else dns_min_refresh,
            MIN_INTERVAL,
        )
        dns_max = _seconds(
            "dns_max_refresh",
            max(DEFAULT_DNS_MAX_REFRESH, dns_min) if dns_max_refresh is None else dns_max_refresh,
            MIN_INTERVAL,
        )
        if dns_max < dns_min:
            raise ConfigurationError(
                f"dns_max_refresh ({dns_max:g}) must be >= dns_min_refresh ({dns_min:g})"
            )
        if health_check_interval is not None:
            given_interval = health_check_interval
            health_check_interval = _number("health_check_interval", health_check_interval)
            if not MIN_INTERVAL <= health_check_interval <= MAX_SECONDS:
                raise ConfigurationError(
                    f"health_check_interval must be a positive number of seconds (>= "
                    f"{MIN_INTERVAL:g} and <= {MAX_SECONDS:.0f}, threading.TIMEOUT_MAX), or "
                    f"None to check only hosts that failed, got {brief_repr(given_interval)}"
                )
        check_timeout = _seconds(
            "health_check_timeout",
            DEFAULT_HEALTH_CHECK_TIMEOUT if health_check_timeout is None else health_check_timeout,
            MIN_INTERVAL,
            MAX_DEADLINE,
        )
        deadline = _seconds(
            "connect_deadline",
            DEFAULT_CONNECT_DEADLINE if connect_deadline is None else connect_deadline,
            MIN_INTERVAL,
            MAX_DEADLINE,
        )
        threshold = _count(
            "unhealthy_threshold",
            DEFAULT_UNHEALTHY_THRESHOLD if unhealthy_threshold is None else unhealthy_threshold,
            1,
        )
        spread = _seconds(
            "rebalance_spread",
            DEFAULT_REBALANCE_SPREAD if rebalance_spread is None else rebalance_spread,
            0.0,
            MAX_REBALANCE_SPREAD,
        )
        interval = _seconds(
            "min_recycle_interval",
            DEFAULT_MIN_RECYCLE_INTERVAL if min_recycle_interval is None else min_recycle_interval,
            0.0,
        )
        return cls(
            pool_size=pool_size,
            max_overflow=max_overflow,
            timeout=checkout_timeout,
            recycle=recycle,
            recycle_jitter=jitter,
            min_size=min_size,
            max_idle=max_idle,
            pool_name=pool_name or DEFAULT_POOL_NAME,
            hosts=hosts,
            target_role=role,
            dns_nameservers=dns_nameservers,
            dns_min_refresh=dns_min,
            dns_max_refresh=dns_max,
            health_check_interval=health_check_interval,
            health_check_timeout=check_timeout,
            connect_deadline=deadline,
            unhealthy_threshold=threshold,
            rebalance_spread=spread,
            broadcast=broadcast,
            min_recycle_interval=interval,
            recycle_jitter_arg=recycle_jitter,
            pool_name_arg=pool_name,
        )
