"""Application processes for the bus tests: real OS processes running ``tests/bus_child.py``."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CHILD = Path(__file__).with_name("bus_child.py")
ROOT = CHILD.parent.parent


class AppProcess:
    """One child process with an engine on a bus; its events arrive as dicts."""

    def __init__(self, **cfg: Any) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()
        self.process = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self._events.put(json.loads(line))
            except ValueError:
                self.stderr.append(line)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def _pump(self, timeout: float) -> dict[str, Any] | None:
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        self.seen.append(event)
        return event

    def wait_event(self, kind: str, timeout: float = 20.0, after: int = 0) -> dict[str, Any]:
        """The first event of ``kind`` (beyond the first ``after`` of them)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.seen if e["event"] == kind]
            if len(found) > after:
                return found[after]
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and self._events.empty()):
                raise AssertionError(
                    f"no {kind!r} event within {timeout}s; seen {self.seen[-5:]}; "
                    f"stderr: {''.join(self.stderr[-20:])}"
                )
            self._pump(min(left, 0.2))

    def ready(self, timeout: float = 30.0) -> AppProcess:
        self.process = self.wait_event("ready", timeout)["process"]
        return self

    def drain_events(self) -> None:
        while self._pump(0.0) is not None:
            pass

    def count(self, kind: str) -> int:
        self.drain_events()
        return sum(1 for e in self.seen if e["event"] == kind)

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def stats(self) -> dict[str, Any]:
        n = self.count("stats")
        self.send("stats")
        return self.wait_event("stats", after=n)["stats"]

    def quit(self, timeout: float = 30.0) -> dict[str, Any]:
        self.send("quit")
        bye = self.wait_event("bye", timeout)
        self.proc.wait(timeout)
        return bye

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_apps(n: int, **cfg: Any) -> list[AppProcess]:
    apps = [AppProcess(**cfg) for _ in range(n)]
    try:
        for app in apps:
            app.ready()
    except BaseException:
        for app in apps:
            app.kill()
        raise
    return apps
