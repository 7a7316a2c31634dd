"""Coalescing: the commands a pool must wait for, folded into one batch.

Split out of :mod:`.listener`. A pool applies at most one batch of commands
per ``min_recycle_interval`` (the listener's point 4, "protects the
databases"); commands that arrive faster wait in a :class:`Pending`, which
keeps one command per (action, host), lets a recycle or drain of every host
cover the recycles of single hosts, and keeps the widest spread and the
latest cutoff of the commands it merges. The listener decides when it is due.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .message import Command

__all__ = ["Pending"]


@dataclass
class Pending:
    """Commands for one pool waiting for its ``min_recycle_interval``."""

    due: float
    #: (action, host) -> (command, cutoff)
    commands: dict[tuple[str, str | None], tuple[Command, float]] = field(default_factory=dict)

    def add(self, command: Command, cutoff: float) -> None:
        key = (command.action, command.host)
        if command.action == "recycle" and ("recycle", None) in self.commands:
            key = ("recycle", None)  # a recycle of every host covers one of a host
        elif command.action in ("recycle", "drain") and command.host is None:
            # Covers the recycles of single hosts queued before it.
            for k in [k for k in self.commands if k[0] == "recycle" and k[1] is not None]:
                del self.commands[k]
        old = self.commands.get(key)
        if old is not None:
            spread = max(old[0].spread, command.spread)
            command = dataclasses.replace(command, spread=spread, host=key[1])
            cutoff = max(cutoff, old[1])
        self.commands[key] = (command, cutoff)

    def ordered(self) -> list[tuple[Command, float]]:
        return sorted(self.commands.values(), key=lambda item: item[0].gen)
