"""Validation of pool arguments, so that bad configuration fails at ``create_engine``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigurationError

__all__ = ["DEFAULT_JITTER", "DEFAULT_POOL_NAME", "PoolConfig"]

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


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be a number, got {value!r}")
    if math.isnan(value) or math.isinf(value):
        raise ConfigurationError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class PoolConfig:
    """The validated settings of one pool (``pool.config``)."""

    pool_size: int
    max_overflow: int
    timeout: float
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
        timeout: float,
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
        pool_size = _integer("pool_size", pool_size)
        if pool_size < 0:
            raise ConfigurationError(f"pool_size must be >= 0, got {pool_size}")
        max_overflow = _integer("max_overflow", max_overflow)
        if max_overflow < -1:
            raise ConfigurationError(
                f"max_overflow must be >= 0, or -1 for no limit, got {max_overflow}"
            )
        timeout = _number("pool_timeout", timeout)
        if timeout < 0:
            raise ConfigurationError(f"pool_timeout must be >= 0 seconds, got {timeout}")
        recycle = _number("pool_recycle", recycle)
        if recycle == 0 or recycle < -1:
            raise ConfigurationError(
                "pool_recycle must be a positive number of seconds, or -1 to disable, "
                f"got {recycle}"
            )
        if recycle_jitter is None:
            jitter = DEFAULT_JITTER if recycle > 0 else 0.0
        else:
            jitter = _number("recycle_jitter", recycle_jitter)
            if not 0.0 <= jitter < 1.0:
                raise ConfigurationError(
                    f"recycle_jitter must be in [0, 1) (a fraction of pool_recycle), got {jitter}"
                )
            if recycle <= 0:
                raise ConfigurationError(
                    "recycle_jitter needs pool_recycle: set pool_recycle (the maximum "
                    "lifetime in seconds) or leave recycle_jitter out"
                )
        min_size = _integer("min_size", min_size)
        if min_size < 0:
            raise ConfigurationError(f"min_size must be >= 0, got {min_size}")
        if pool_size and min_size > pool_size:
            raise ConfigurationError(
                f"min_size ({min_size}) cannot be larger than pool_size ({pool_size})"
            )
        if max_idle is not None:
            max_idle = _number("max_idle", max_idle)
            if max_idle <= 0:
                raise ConfigurationError(
                    f"max_idle must be a positive number of seconds or None, got {max_idle}"
                )
        if pool_name is not None and (not isinstance(pool_name, str) or not pool_name.strip()):
            raise ConfigurationError(f"pool_name must be a non-empty string, got {pool_name!r}")
        role = target_role if target_role is not None else "any"
        if role not in TARGET_ROLES:
            raise ConfigurationError(
                f"target_role must be one of {', '.join(TARGET_ROLES)}, got {target_role!r}"
            )
        dns_min = _number(
            "dns_min_refresh",
            DEFAULT_DNS_MIN_REFRESH if dns_min_refresh is None else dns_min_refresh,
        )
        dns_max = _number(
            "dns_max_refresh",
            max(DEFAULT_DNS_MAX_REFRESH, dns_min) if dns_max_refresh is None else dns_max_refresh,
        )
        if dns_min <= 0:
            raise ConfigurationError(f"dns_min_refresh must be > 0 seconds, got {dns_min}")
        if dns_max < dns_min:
            raise ConfigurationError(
                f"dns_max_refresh ({dns_max}) must be >= dns_min_refresh ({dns_min})"
            )
        if health_check_interval is not None:
            health_check_interval = _number("health_check_interval", health_check_interval)
            if health_check_interval <= 0:
                raise ConfigurationError(
                    "health_check_interval must be a positive number of seconds, or None "
                    f"to check only hosts that failed, got {health_check_interval}"
                )
        check_timeout = _number(
            "health_check_timeout",
            DEFAULT_HEALTH_CHECK_TIMEOUT if health_check_timeout is None else health_check_timeout,
        )
        if not 0 < check_timeout <= 3600:
            raise ConfigurationError(
                f"health_check_timeout must be > 0 and <= 3600 seconds, got {check_timeout}"
            )
        deadline = _number(
            "connect_deadline",
            DEFAULT_CONNECT_DEADLINE if connect_deadline is None else connect_deadline,
        )
        if not 0 < deadline <= 3600:
            raise ConfigurationError(
                f"connect_deadline must be > 0 and <= 3600 seconds, got {deadline}"
            )
        threshold = _integer(
            "unhealthy_threshold",
            DEFAULT_UNHEALTHY_THRESHOLD if unhealthy_threshold is None else unhealthy_threshold,
        )
        if threshold < 1:
            raise ConfigurationError(f"unhealthy_threshold must be >= 1, got {threshold}")
        spread = _number(
            "rebalance_spread",
            DEFAULT_REBALANCE_SPREAD if rebalance_spread is None else rebalance_spread,
        )
        if spread < 0:
            raise ConfigurationError(f"rebalance_spread must be >= 0 seconds, got {spread}")
        interval = _number(
            "min_recycle_interval",
            DEFAULT_MIN_RECYCLE_INTERVAL if min_recycle_interval is None else min_recycle_interval,
        )
        if interval < 0:
            raise ConfigurationError(f"min_recycle_interval must be >= 0 seconds, got {interval}")
        return cls(
            pool_size=pool_size,
            max_overflow=max_overflow,
            timeout=timeout,
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
