"""sqla-rebalance: SQLAlchemy connection pools that behave well in front of clusters.

>>> from sqlalchemy import create_engine
>>> from sqla_rebalance import RebalancingQueuePool
>>> engine = create_engine("sqlite:///app.db", poolclass=RebalancingQueuePool,
...                        pool_recycle=1800, recycle_jitter=0.2)
"""

from __future__ import annotations

from . import signals
from .config import PoolConfig
from .errors import (
    ConfigurationError,
    InsecureBroadcastWarning,
    NoHostAvailableError,
    NotPooledError,
    RebalanceError,
)
from .pinning import is_pinned, pin, unpin
from .pool import AsyncRebalancingQueuePool, RebalancingQueuePool
from .stats import RETIREMENT_REASONS, BusStats, HostStats, PoolStats

__version__ = "0.1.0"

__all__ = [
    "RETIREMENT_REASONS",
    "AsyncRebalancingQueuePool",
    "BusStats",
    "ConfigurationError",
    "HostStats",
    "InsecureBroadcastWarning",
    "NoHostAvailableError",
    "NotPooledError",
    "PoolConfig",
    "PoolStats",
    "RebalanceError",
    "RebalancingQueuePool",
    "__version__",
    "is_pinned",
    "pin",
    "signals",
    "unpin",
]
