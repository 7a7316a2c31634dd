"""A pool's link to its bus of cluster-wide commands (``broadcast=``).

The bus itself, its listener thread and the commands are in ``bus/``; here
is what one pool keeps of them: the bus and the secret commands must be
signed with (validated when the pool is made, connecting to nothing), and
the process-wide listener the pool is attached to. A forked child does not
inherit the parent's listener: it attaches to one of its own at its next
connection. The listener hands commands to ``pool._apply_command``.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

from .bus import open_bus
from .bus.base import Bus
from .bus.listener import Listener
from .bus.listener import attach as attach_listener
from .bus.listener import detach as detach_listener
from .errors import ConfigurationError, InsecureBroadcastWarning

if TYPE_CHECKING:
    from .pool import RebalancingQueuePool

__all__ = ["SECRET_ENV", "Wiring"]

#: Where the bus secret is read from when ``broadcast_secret`` is not given.
SECRET_ENV = "SQLA_REBALANCE_SECRET"


class Wiring:
    """The bus of one pool, its secret, and the listener it is attached to."""

    def __init__(
        self, pool_name: str, broadcast: Any, secret: str | bytes | None, recreated: bool
    ) -> None:
        """Validate ``broadcast`` and its secret (connects to nothing)."""
        self.bus: Bus | None = None
        self.secret: bytes | None = None
        #: The listener this pool is attached to, and the process it was
        #: attached in (a forked child attaches again).
        self._listener: Listener | None = None
        self._pid = 0
        if broadcast is None:
            if secret is not None:
                raise ConfigurationError("broadcast_secret is set but broadcast is not")
            return
        bus = open_bus(broadcast)
        if secret is None:
            secret = os.environ.get(SECRET_ENV) or None
        if isinstance(secret, str):
            secret = secret.encode()
        if secret is not None and (not isinstance(secret, bytes) or not secret):
            raise ConfigurationError("broadcast_secret must be a non-empty string or bytes")
        if secret is None and not recreated:
            warnings.warn(
                f"pool {pool_name}: broadcast={bus.display_url} without "
                f"broadcast_secret (or ${SECRET_ENV}): anyone who can publish on the bus "
                "can recycle this pool, and unsigned commands are accepted",
                InsecureBroadcastWarning,
                stacklevel=4,  # create_engine()'s caller
            )
        self.bus, self.secret = bus, secret

    @property
    def listener(self) -> Listener | None:
        """The listener of this process the pool is attached to, if any."""
        return self._listener if self._pid == os.getpid() else None

    def attach(self, pool: RebalancingQueuePool, disposed: bool) -> None:
        """Attach ``pool`` to its bus's listener in this process, once."""
        bus = self.bus
        if bus is None or disposed:
            return
        if self._listener is not None and self._pid == os.getpid():
            return
        self._listener = attach_listener(pool, bus, self.secret)
        self._pid = os.getpid()

    def reattach(self, pool: RebalancingQueuePool, disposed: bool) -> None:
        """At a connection: attach in a forked child (cheap when nothing to do)."""
        if self.bus is not None and self._pid != os.getpid():
            self.attach(pool, disposed)

    def detach(self, pool: RebalancingQueuePool) -> None:
        listener = self.listener
        if listener is not None:
            detach_listener(pool, listener)
        self._listener = None
