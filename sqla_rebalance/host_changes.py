"""What one host-set update changed: the :class:`Changes` record.

Split out of :mod:`sqla_rebalance.hosts`: a DNS refresh, a health transition
or a new host list hands one of these to the maintenance worker, the health
checks and the steering code, which signal and rebalance on it; they need the
record, not the state machine that fills it in. Also importable from
:mod:`sqla_rebalance.hosts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Changes"]


@dataclass
class Changes:
    """What a DNS refresh or a health transition changed (for signals and rebalancing)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    up: list[str] = field(default_factory=list)
    down: list[str] = field(default_factory=list)
    #: Hosts that were up and failed once (not down yet: new connections avoid them).
    suspect: list[str] = field(default_factory=list)
    #: Hosts whose role changed in a way that matters for ``target_role``.
    roles: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.added or self.removed or self.up or self.down or self.roles or self.suspect
        )
