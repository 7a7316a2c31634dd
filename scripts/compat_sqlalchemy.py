#!/usr/bin/env python3
"""Run SQLAlchemy's own tests with our pools in place of QueuePool, and compare with stock.

    .venv/bin/python scripts/compat_sqlalchemy.py           # SQLAlchemy of .venv (2.1.x)
    .venv-sa20/bin/python scripts/compat_sqlalchemy.py      # ... of .venv-sa20 (2.0.x)

The Python that runs this script is the one under test (``--python`` to choose another).
It downloads the sdist of the SQLAlchemy release installed there (``pip download``, once,
into ``.compat-cache/``) and runs, from the sdist's directory, SQLAlchemy's pytest suite
with its own plugin (``test/conftest.py``), against the *installed* SQLAlchemy (Python
``-s``: the sdist's ``lib/`` is not put on ``sys.path``):

1. ``test/engine/test_pool.py``, ``test_reconnect.py``, ``test_logging.py``,
   ``test_transaction.py``, ``test_execute.py`` and ``test/ext/asyncio/test_engine.py`` on
   SQLAlchemy's ``sqlite_file`` target (``--db sqlite_file --dbdriver=sqlite
   --dbdriver=aiosqlite``): a file database, whose default pool class is ``QueuePool`` (and
   ``AsyncAdaptedQueuePool`` for aiosqlite). The in-memory default would use
   ``SingletonThreadPool``/``StaticPool``, and our pool would only be seen where a test
   builds a ``QueuePool`` itself.
2. ``test/aaa_profiling/test_pool.py`` (function call counts) on the in-memory database that
   the profiling tests require. The sdist ships no ``test/profiles.txt``: the counts are
   first recorded with the stock pool (``--write-profiles``), on this machine, then both
   runs are checked against them (SQLAlchemy's tolerance: 10 %).

Each is run twice: ``--compat-pool=stock`` and ``--compat-pool=ours``
(``compat/sa_pool_swap.py``, which replaces the classes and proves that the pools built
are ours). The outcomes are compared (``compat/common.py``): every test that fails, errors
or is skipped only with our pool must be listed in ``compat/expected.txt`` with its reason,
or this script exits 1. Logs and JSON reports: ``.compat-cache/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "compat"))

from common import (
    CACHE,
    EXPECTED,
    compare,
    load_expected,
    log,
    python_version_of,
    report,
    sdist,
    write_summary,
)

ENGINE_FILES = [
    "test/engine/test_pool.py",
    "test/engine/test_reconnect.py",
    "test/engine/test_logging.py",
    "test/engine/test_transaction.py",
    "test/engine/test_execute.py",
    "test/ext/asyncio/test_engine.py",
]
PROFILING_FILES = ["test/aaa_profiling/test_pool.py"]
ENGINE_DB = ["--db", "sqlite_file", "--dbdriver=sqlite", "--dbdriver=aiosqlite"]
PROFILING_DB = ["--db", "sqlite"]
#: Our pool's class names in test ids (parametrized by pool class) -> the stock ones.
RENAMES = (
    ("AsyncRebalancingQueuePool", "AsyncAdaptedQueuePool"),
    ("RebalancingQueuePool", "QueuePool"),
)


def normalize(test_id: str) -> str:
    for ours, stock in RENAMES:
        test_id = test_id.replace(ours, stock)
    return test_id


class Runner:
    def __init__(self, python: str, src: Path, results: Path, timeout: int) -> None:
        self.python = python
        self.src = src
        self.results = results
        self.timeout = timeout
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).resolve().parent.parent / "compat")]
            + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        )
        # SQLAlchemy's suite must not see our CI's settings (warnings as errors & co.).
        self.env.pop("PYTEST_ADDOPTS", None)

    def pytest(self, name: str, mode: str, db: list[str], files: list[str], *extra: str) -> dict:
        report_path = self.results / f"{name}-{mode}.json"
        log_path = self.results / f"{name}-{mode}.log"
        report_path.unlink(missing_ok=True)
        cmd = [
            self.python,
            "-s",
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-p",
            "sa_pool_swap",
            f"--compat-pool={mode}",
            f"--compat-report={report_path}",
            *(["--timeout", str(self.timeout)] if self.timeout else []),
            *db,
            *extra,
            *files,
        ]
        began = time.monotonic()
        with log_path.open("w") as out:
            proc = subprocess.run(
                cmd, cwd=self.src, env=self.env, stdout=out, stderr=subprocess.STDOUT, check=False
            )
        lines = log_path.read_text().splitlines()
        last = lines[-1].strip("= ") if lines else "(no output)"
        log(f"   {name:9} {mode:5} {time.monotonic() - began:6.1f} s  {last}")
        if not report_path.exists():
            raise SystemExit(
                f"pytest wrote no report (exit {proc.returncode}); see {log_path}:\n"
                + "\n".join(lines[-30:])
            )
        data: dict = json.loads(report_path.read_text())
        data["log"] = str(log_path)
        return data


def check_run(data: dict, mode: str, version: str) -> list[str]:
    """What makes a run unusable for the comparison, whatever its outcomes."""
    problems = []
    if data.get("sqlalchemy_version") != version:
        problems.append(f"ran SQLAlchemy {data.get('sqlalchemy_version')}, not {version}")
    pools = data.get("pools", {})
    if mode == "ours":
        if data.get("unswapped"):
            problems.append(f"stock pools built with ours swapped in: {data['unswapped']}")
        if not any(name.startswith("sqla_rebalance.") for name in pools):
            problems.append("no pool of ours was built")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the Python under test")
    parser.add_argument("--expected", type=Path, default=EXPECTED)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument(
        "--timeout", type=int, default=300, help="per-test timeout (pytest-timeout), 0: none"
    )
    args = parser.parse_args(argv)

    began = time.monotonic()
    version = python_version_of(args.python, "sqlalchemy")
    suite = "sqlalchemy-" + ".".join(version.split(".")[:2])
    entries = load_expected(args.expected)
    src = sdist(args.python, "SQLAlchemy", version, args.cache)
    results = args.cache / "results" / suite
    results.mkdir(parents=True, exist_ok=True)
    log(f"SQLAlchemy {version}: its own tests from {src}, stock QueuePool vs ours")
    try:
        subprocess.run(
            [args.python, "-c", "import pytest_timeout"], check=True, capture_output=True
        )
    except subprocess.CalledProcessError:
        args.timeout = 0
    runner = Runner(args.python, src, results, args.timeout)

    # The call counts of reference: recorded with the stock pool, here and now.
    (src / "test" / "profiles.txt").unlink(missing_ok=True)
    runner.pytest("profiles", "stock", PROFILING_DB, PROFILING_FILES, "--write-profiles")

    outcomes: dict[str, dict[str, str]] = {}
    details: dict[str, str] = {}
    problems: list[str] = []
    pools: dict[str, dict[str, int]] = {}
    for mode in ("stock", "ours"):
        merged: dict[str, str] = {}
        pools[mode] = {}
        for name, db, files in (
            ("engine", ENGINE_DB, ENGINE_FILES),
            ("profiling", PROFILING_DB, PROFILING_FILES),
        ):
            data = runner.pytest(name, mode, db, files)
            problems += [f"{name} ({mode}): {p}" for p in check_run(data, mode, version)]
            for test, outcome in data["outcomes"].items():
                merged[normalize(test)] = outcome
            if mode == "ours":
                details.update({normalize(t): d for t, d in data["details"].items()})
            for cls, n in data["pools"].items():
                pools[mode][cls] = pools[mode].get(cls, 0) + n
        outcomes[mode] = merged

    cmp = compare(suite, outcomes["stock"], outcomes["ours"], entries)
    report(cmp, details, f"{suite} (SQLAlchemy {version}): stock pool vs ours")
    for mode in ("stock", "ours"):
        built = ", ".join(f"{k.rsplit('.', 1)[-1]} {v}" for k, v in sorted(pools[mode].items()))
        log(f"   pools built ({mode}): {built}")
    for problem in problems:
        log(f"   RUN PROBLEM: {problem}")
    elapsed = time.monotonic() - began
    write_summary(
        args.cache / "results" / f"summary-{suite}.json",
        cmp,
        {"version": version, "seconds": round(elapsed), "problems": problems},
    )
    ok = cmp.ok and not problems
    log(f"   {suite}: {'OK' if ok else 'FAILED'} in {elapsed:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
