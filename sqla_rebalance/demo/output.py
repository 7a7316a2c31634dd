"""What the demo prints: timestamped lines, one writer at a time."""

from __future__ import annotations

import threading
import time
from typing import TextIO

#: Seconds between two per-host lines.
REPORT_EVERY = 2.0


class Out:
    """Timestamped lines, one writer at a time (signals arrive from several threads)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lock = threading.Lock()
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, msg: str) -> None:
        with self.lock:
            print(f"[{self.elapsed():6.2f}s] {msg}", file=self.out, flush=True)

    def plain(self, msg: str = "") -> None:
        with self.lock:
            print(msg, file=self.out, flush=True)
