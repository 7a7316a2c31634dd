"""The package's one source of randomness: jitter that no application seed can line up.

Lifetimes, recycle spreads, back-offs and host tie-breaks are what keep a
fleet's processes from acting in step. They are drawn from the operating
system's random source (:class:`random.SystemRandom`), not from the ``random``
module's global generator, because that generator belongs to the application:

- an application that calls ``random.seed(n)`` in each worker process (for
  reproducible sampling, say, or a test run) would give every process the same
  lifetimes and back-offs, and the fleet would reconnect in step: the storm
  jitter is there to prevent;
- the pool's background threads would advance the application's seeded
  sequence at moments it cannot predict.

``SystemRandom`` keeps no state, so a forked child draws its own numbers with
no reseeding. A draw costs about a microsecond; none is on the checkout path
(they happen when a connection is opened or marked, or a bus reconnects).
Tests that want repeatable draws replace :data:`rng` with a seeded
``random.Random`` (every call site reads it through this module).
"""

from __future__ import annotations

import random

__all__ = ["rng"]

#: The generator every draw of the package uses.
rng: random.Random = random.SystemRandom()
