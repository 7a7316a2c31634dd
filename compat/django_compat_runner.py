"""``TEST_RUNNER`` for Django's own test suite: Django's runner, plus a JSON record of
the outcome of every test (``$COMPAT_DJANGO_REPORT``), read by ``scripts/compat_django.py``.

Outcomes: ``passed``, ``failed``, ``error``, ``skipped``, ``xfailed`` (expected failure),
``xpassed`` (unexpected success), keyed by the test's id (``module.Class.method``; errors in
class or module fixtures have ids such as ``setUpClass (module.Class)``). A test whose
subtest fails is ``failed``. Works with ``--parallel``: the workers' events are replayed on
the main process's result object.
"""

from __future__ import annotations

import json
import os
import unittest
from typing import Any

from django.test.runner import DiscoverRunner

_BAD = ("failed", "error")


class CompatResult(unittest.TextTestResult):
    outcomes: dict[str, str]
    details: dict[str, str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outcomes = {}
        self.details = {}

    def _record(self, test: Any, outcome: str, err: Any = None) -> None:
        test_id = test.id()
        if self.outcomes.get(test_id) in _BAD:
            return
        self.outcomes[test_id] = outcome
        if err is not None and outcome in _BAD:
            try:
                text = self._exc_info_to_string(err, test)
            except Exception as exc:  # a replayed error from a --parallel worker
                text = f"{err!r} ({exc!r})"
            self.details[test_id] = "\n".join(text.splitlines()[-40:])

    def addSuccess(self, test: Any) -> None:
        super().addSuccess(test)
        self._record(test, "passed")

    def addFailure(self, test: Any, err: Any) -> None:
        super().addFailure(test, err)
        self._record(test, "failed", err)

    def addError(self, test: Any, err: Any) -> None:
        super().addError(test, err)
        self._record(test, "error", err)

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        self._record(test, "skipped")

    def addExpectedFailure(self, test: Any, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self._record(test, "xfailed")

    def addUnexpectedSuccess(self, test: Any) -> None:
        super().addUnexpectedSuccess(test)
        self._record(test, "xpassed")

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            failure = issubclass(err[0], test.failureException)
            self._record(test, "failed" if failure else "error", err)


def _what_served() -> dict[str, Any]:
    """Proof of what the run used: each alias's backend module, and its pool class (ours
    only: None for Django's own backends, and for an alias that never connected)."""
    from django.db import connections

    backends = {alias: type(connections[alias]).__module__ for alias in connections}
    try:
        from sqla_rebalance.contrib.django import get_pool
    except ImportError:  # pragma: no cover - the package is installed where this runs
        pools: dict[str, Any] = {}
    else:
        pools = {}
        for alias in connections:
            pool = get_pool(alias)
            pools[alias] = None if pool is None else type(pool).__name__
    return {"backends": backends, "pools": pools}


class CompatRunner(DiscoverRunner):
    def get_resultclass(self) -> Any:
        base = super().get_resultclass()
        if base is None:
            return CompatResult
        # --debug-sql / --pdb: keep Django's behaviour, add the record.
        return type("CompatResult" + base.__name__, (CompatResult, base), {})

    def run_suite(self, suite: Any, **kwargs: Any) -> Any:
        result = super().run_suite(suite, **kwargs)
        path = os.environ.get("COMPAT_DJANGO_REPORT")
        if path:
            data = {
                "engine": os.environ.get("COMPAT_DJANGO_BACKEND"),
                **_what_served(),
                "outcomes": getattr(result, "outcomes", {}),
                "details": getattr(result, "details", {}),
                "tests_run": result.testsRun,
            }
            with open(path, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
        return result
