"""What a listener does with messages it refuses: rate-limited warnings, and history.

Split out of :mod:`.listener`. A bus can carry junk at any rate (a
misconfigured sender, a flood, somebody probing), and the listener must say
so without flooding the application's log: :class:`RejectionLog` logs the
first rejection of each kind, then at most one summary per kind every
:data:`LOG_EVERY` seconds. :func:`issued_before` tells a rejected log entry
that is merely old history (not counted) from one that is news. The
listener keeps the counters themselves (``Listener.rejected``) and the clock.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from .base import Bus
from .message import MAX_BYTES

__all__ = ["LOG_EVERY", "RejectionLog", "issued_before"]

# The listener's logger: these warnings are the listener's.
log = logging.getLogger("sqla_rebalance.bus")

#: Rejections of one kind are logged once, then at most once per this.
LOG_EVERY = 60.0


class RejectionLog:
    """The warnings about rejected messages of one listener, rate-limited per kind.

    ``clock`` is the listener's monotonic clock, called at each use.
    """

    def __init__(self, bus: Bus, clock: Callable[[], float]) -> None:
        self._bus = bus
        self._clock = clock
        #: kind -> (when its last line was logged, rejections left out since)
        self._logged: dict[str, tuple[float, int]] = {}

    def note(self, kind: str, detail: str) -> None:
        """One rejection: logged if it is the first of its kind in a while, else counted."""
        # Per message: one dict update. The log gets the first rejection of a
        # kind, then a summary at most once per LOG_EVERY (see summary()).
        logged = self._logged.get(kind)
        if logged is not None:
            self._logged[kind] = (logged[0], logged[1] + 1)
            return
        self._logged[kind] = (self._clock(), 0)
        log.warning("bus %s: rejected a message: %s: %s", self._bus, kind, detail[:200])

    def summary(self, force: bool = False) -> None:
        """Say how many rejections were left out of the log, once per LOG_EVERY."""
        if not self._logged:
            return
        now = self._clock()
        for kind, (since, suppressed) in list(self._logged.items()):
            if now - since < LOG_EVERY and not force:
                continue
            if suppressed:
                log.warning(
                    "bus %s: rejected %d more message(s) of kind %s in the last %.0fs",
                    self._bus,
                    suppressed,
                    kind,
                    now - since,
                )
                self._logged[kind] = (now, 0)
            else:
                del self._logged[kind]  # quiet for a whole period: the next one is logged


def issued_before(raw: bytes, floor: float) -> bool:
    """True if ``raw`` says it was issued before ``floor``: unverified, so only used
    to decide whether a rejected log entry is counted (history is not)."""
    if len(raw) > MAX_BYTES:
        return False
    try:
        issued = json.loads(raw).get("issued_at")
    except (ValueError, AttributeError, RecursionError):
        return False
    return isinstance(issued, (int, float)) and not isinstance(issued, bool) and issued < floor
