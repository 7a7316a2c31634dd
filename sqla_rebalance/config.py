"""Pool settings once checked (``pool.config``), so that bad configuration fails at
``create_engine``.

The checks are the validators of :data:`sqla_rebalance.parameters.PARAMETERS`,
run in table order by :meth:`PoolConfig.build`; this module holds the result.
The bounds and the shared checks are in ``sqla_rebalance.validation``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .parameters import PARAMETERS

__all__ = ["PoolConfig"]

#: ``PoolConfig.build`` keyword -> its row.
_CHECKED = {p.build: p for p in PARAMETERS if p.build}


@dataclass(frozen=True)
class PoolConfig:
    """The validated settings of one pool (``pool.config``): made by :meth:`build`,
    each field the value the pool uses (the defaults are the table's)."""

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
    hosts: Any
    target_role: str
    #: As given: nameserver strings, a dnspython ``Resolver``, or None (system).
    dns_nameservers: Any
    dns_min_refresh: float
    dns_max_refresh: float
    health_check_interval: float | None
    health_check_timeout: float
    connect_deadline: float
    unhealthy_threshold: int
    rebalance_spread: float
    #: ``broadcast`` as given: a bus URL, a ``Bus`` object, or None.
    broadcast: Any = field(repr=False)
    min_recycle_interval: float
    # As given, so ``recreate()`` passes on exactly what the user passed.
    recycle_jitter_arg: float | None
    pool_name_arg: str | None

    @classmethod
    def build(cls, **given: Any) -> PoolConfig:
        """Check the settings (by ``build`` name) with each row's validator, in
        table order, and keep the result. A setting left out takes its default,
        and so does one of this package's given as None, unless None has a
        meaning there (``max_idle``, ``health_check_interval``).

        The first failure is raised: a :class:`~sqla_rebalance.ConfigurationError`
        whose message starts with the setting's ``create_engine`` name.
        """
        unknown = sorted(set(given) - set(_CHECKED))
        if unknown:
            raise TypeError(f"PoolConfig.build() got unexpected arguments: {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for name, p in _CHECKED.items():
            raw = given.get(name, p.default)
            value = p.default if raw is None and not (p.none_is_value or p.sqlalchemy) else raw
            values[name] = p.check(value, values) if p.check is not None else value
            if p.stored != name and p.stored:
                values[p.stored] = raw  # as given, for recreate()
        return cls(**values)
