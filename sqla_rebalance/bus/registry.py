"""One listener per bus per process: the registry, this process's id on the bus, and fork.

Split out of :mod:`.listener`: this is the per-process state that every
listener shares and that a ``fork()`` must reset. The functions that create
and find listeners (``attach``, ``detach``, ``listener_for``) live with the
:class:`~.listener.Listener` class they construct, and use the registry here
under :func:`lock`. After ``fork()`` a child starts with an empty registry, a
fresh lock (the parent's may have been held at the fork) and a new process
token, so that its heartbeats are its own.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Bus
    from .listener import Listener

__all__ = ["key", "listeners", "lock", "process_id"]

_process_token = os.urandom(4).hex()


def process_id() -> str:
    """This process on the bus: ``hostname:pid:token`` (a new token after fork)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_token}"


#: The running listener of each (bus, secret) in this process. Emptied after
#: fork, never replaced, so that a reference to it stays current.
listeners: dict[tuple[str, str], Listener] = {}
_registry_lock = threading.Lock()


def lock() -> threading.Lock:
    """The lock of :data:`listeners` (a new one after fork: call this each time)."""
    return _registry_lock


def key(bus: Bus, secret: bytes | None) -> tuple[str, str]:
    """The registry key of ``bus`` listened to with ``secret``."""
    digest = hashlib.sha256(secret).hexdigest()[:16] if secret else ""
    return (bus.key, digest)


#: Listeners inherited from the parent process: never used, never closed
#: (closing a PostgreSQL connection would end the parent's session).
_INHERITED: list[object] = []


def _after_fork_in_child() -> None:
    global _registry_lock, _process_token
    _INHERITED.append(dict(listeners))
    listeners.clear()
    _registry_lock = threading.Lock()
    _process_token = os.urandom(4).hex()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
