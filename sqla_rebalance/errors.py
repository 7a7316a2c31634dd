"""Exceptions raised by sqla-rebalance.

Configuration errors are :class:`sqlalchemy.exc.ArgumentError` (what
``create_engine`` raises for any bad argument), so existing error handling
keeps working; :class:`ConfigurationError` subclasses it to be specific.
"""

from __future__ import annotations

from sqlalchemy import exc

__all__ = [
    "ConfigurationError",
    "InsecureBroadcastWarning",
    "NoHostAvailableError",
    "NotPooledError",
    "RebalanceError",
]


class RebalanceError(Exception):
    """Base class of sqla-rebalance's own runtime errors."""


class ConfigurationError(exc.ArgumentError, RebalanceError):
    """A pool argument is out of range or inconsistent with another one."""


class NotPooledError(TypeError, RebalanceError):
    """The object given is not a connection checked out from a rebalancing pool."""


class NoHostAvailableError(RebalanceError):
    """No host can take a new connection (none matches ``target_role``, say).

    When hosts were tried and failed, the last driver error is raised instead,
    so that SQLAlchemy reports it as usual (``OperationalError``).
    """


class InsecureBroadcastWarning(UserWarning):
    """A pool listens for cluster-wide commands without a secret to check them with."""
