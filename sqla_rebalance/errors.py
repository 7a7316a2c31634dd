"""Exceptions raised by sqla-rebalance.

Configuration errors are :class:`sqlalchemy.exc.ArgumentError` (what
``create_engine`` raises for any bad argument), so existing error handling
keeps working; :class:`ConfigurationError` subclasses it to be specific.
"""

from __future__ import annotations

from sqlalchemy import exc

__all__ = [
    "ConfigurationError",
    "DeadlineExceeded",
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


class DeadlineExceeded(RebalanceError, TimeoutError):
    """A network operation the pool started got no answer in time.

    The host is hung rather than refusing (a frozen server or VM, a network
    partition): counted as a host failure with the reason ``deadline exceeded``.
    """

    def __init__(self, what: str, host: str | None, seconds: float) -> None:
        self.what = what
        self.host = host
        self.seconds = seconds
        where = f" to {host}" if host else ""
        super().__init__(f"deadline exceeded: {what}{where} got no answer in {seconds:g}s")

    def __reduce__(self) -> tuple[type, tuple[str, str | None, float]]:
        return (type(self), (self.what, self.host, self.seconds))


class InsecureBroadcastWarning(UserWarning):
    """A pool listens for cluster-wide commands without a secret to check them with."""
