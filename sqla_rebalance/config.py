"""Validation of pool arguments, so that bad configuration fails at ``create_engine``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigurationError

__all__ = ["DEFAULT_JITTER", "DEFAULT_POOL_NAME", "PoolConfig"]

#: Default ``recycle_jitter`` when ``pool_recycle`` is set: connections opened
#: together expire spread over the last 20 % of ``pool_recycle``.
DEFAULT_JITTER = 0.2
DEFAULT_POOL_NAME = "default"


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
        return cls(
            pool_size=pool_size,
            max_overflow=max_overflow,
            timeout=timeout,
            recycle=recycle,
            recycle_jitter=jitter,
            min_size=min_size,
            max_idle=max_idle,
            pool_name=pool_name or DEFAULT_POOL_NAME,
            recycle_jitter_arg=recycle_jitter,
            pool_name_arg=pool_name,
        )
