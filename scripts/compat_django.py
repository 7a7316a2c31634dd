#!/usr/bin/env python3
"""Run Django's own test suite on our database backends, and compare with Django's own.

    .venv/bin/python scripts/compat_django.py                      # PostgreSQL and MariaDB
    .venv/bin/python scripts/compat_django.py --db postgresql      # one of them

The Python that runs this script is the one under test. It downloads the sdist of the
Django release installed there (``pip download``, once, into ``.compat-cache/``), starts a
private server on a loopback address (``sqla_rebalance.devservers``: ``PostgresCluster(n=1)``,
``MariaDBCluster(n=1)``; user and database ``app``), and runs Django's
``tests/runtests.py`` twice with ``compat/django_settings.py``: once with Django's backend
(``django.db.backends.postgresql`` / ``.mysql``) and once with ours
(``sqla_rebalance.contrib.django.backends.*``), nothing else changed, on the labels
``backends transactions transaction_hooks select_for_update basic queries test_utils
migrations`` (``--labels`` to change). MySQL runs on PyMySQL installed as ``MySQLdb`` in
both runs (``--mysql-driver mysqldb`` for mysqlclient: suite ``django-mysql-mysqldb``, to
which the lines for ``django-mysql`` apply too).

``compat/django_compat_runner.py`` records every test's outcome; every test that fails,
errors or is skipped only with our backend must be listed in ``compat/expected.txt``
(suites ``django-postgresql``, ``django-mysql``) with its reason, or this script exits 1.
Logs and JSON reports: ``.compat-cache/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "compat"))
sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402
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

LABELS = [
    "backends",
    "transactions",
    "transaction_hooks",
    "select_for_update",
    "basic",
    "queries",
    "test_utils",
    "migrations",
]
OUR_BACKEND = "sqla_rebalance.contrib.django.backends."


@contextlib.contextmanager
def server(db: str) -> Iterator[tuple[str, int]]:
    from sqla_rebalance.devservers import MariaDBCluster, PostgresCluster

    cluster = PostgresCluster(n=1) if db == "postgresql" else MariaDBCluster(n=1)
    with cluster:
        (srv,) = cluster.servers
        log(f"   {db}: a private server on {srv.host}:{srv.port}")
        yield srv.host, srv.port


def run_tests(
    python: str,
    src: Path,
    results: Path,
    db: str,
    mode: str,
    address: tuple[str, int],
    args: argparse.Namespace,
) -> dict:
    name = f"{db}-mysqldb" if db == "mysql" and args.mysql_driver == "mysqldb" else db
    report_path = results / f"{name}-{mode}.json"
    log_path = results / f"{name}-{mode}.log"
    report_path.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(
            [str(ROOT / "compat")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        ),
        COMPAT_DJANGO_BACKEND=mode,
        COMPAT_DJANGO_DB=db,
        COMPAT_DJANGO_HOST=address[0],
        COMPAT_DJANGO_PORT=str(address[1]),
        COMPAT_DJANGO_MYSQL_DRIVER=args.mysql_driver,
        COMPAT_DJANGO_REPORT=str(report_path),
        PYTHONDONTWRITEBYTECODE="1",
    )
    cmd = [
        python,
        "runtests.py",
        "--settings=django_settings",
        "--noinput",
        f"--parallel={args.parallel}",
        *args.labels,
    ]
    began = time.monotonic()
    with log_path.open("w") as out:
        try:
            proc = subprocess.run(
                cmd,
                cwd=src / "tests",
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=args.timeout,
                check=False,
            )
            status = f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"TIMED OUT after {args.timeout} s"
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    tail = [line for line in lines[-6:] if line.startswith(("Ran ", "OK", "FAILED"))]
    log(f"   {db:10} {mode:5} {time.monotonic() - began:6.1f} s  {' '.join(tail) or status}")
    if not report_path.exists():
        raise SystemExit(
            f"runtests.py wrote no report ({status}); see {log_path}:\n" + "\n".join(lines[-30:])
        )
    data: dict = json.loads(report_path.read_text())
    data["status"] = status
    return data


def check_run(data: dict, mode: str, db: str) -> list[str]:
    problems = []
    if data["status"].startswith("TIMED OUT"):
        problems.append(data["status"])
    for alias, module in data.get("backends", {}).items():
        ours = module.startswith(OUR_BACKEND)
        if ours != (mode == "ours"):
            problems.append(f"alias {alias!r} ran on {module}")
    if mode == "ours" and data.get("pools", {}).get("default") != "RebalancingQueuePool":
        problems.append(f"the default alias was not pooled by ours: {data.get('pools')}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--db",
        action="append",
        choices=("postgresql", "mysql"),
        help="postgresql, mysql (MariaDB); repeat for both (default: both)",
    )
    parser.add_argument("--labels", nargs="+", default=LABELS)
    parser.add_argument("--parallel", type=int, default=1, help="runtests.py --parallel")
    parser.add_argument("--mysql-driver", choices=("pymysql", "mysqldb"), default="pymysql")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per runtests.py run")
    parser.add_argument("--python", default=sys.executable, help="the Python under test")
    parser.add_argument("--expected", type=Path, default=EXPECTED)
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args(argv)

    version = python_version_of(args.python, "django")
    entries = load_expected(args.expected)
    src = sdist(args.python, "Django", version, args.cache)
    results = args.cache / "results" / "django"
    results.mkdir(parents=True, exist_ok=True)
    log(f"Django {version}: its own tests from {src}, Django's backends vs ours")
    failed = False
    for db in args.db or ["postgresql", "mysql"]:
        began = time.monotonic()
        # Lines for "django-mysql" apply to "django-mysql-mysqldb" as well.
        suite = f"django-{db}" + (
            "-mysqldb" if db == "mysql" and args.mysql_driver == "mysqldb" else ""
        )
        runs, problems = {}, []
        with server(db) as address:
            for mode in ("stock", "ours"):
                runs[mode] = run_tests(args.python, src, results, db, mode, address, args)
                problems += [f"{mode}: {p}" for p in check_run(runs[mode], mode, db)]
        cmp = compare(suite, runs["stock"]["outcomes"], runs["ours"]["outcomes"], entries)
        title = f"{suite} (Django {version}): Django's backend vs ours"
        report(cmp, runs["ours"]["details"], title)
        for problem in problems:
            log(f"   RUN PROBLEM: {problem}")
        elapsed = time.monotonic() - began
        write_summary(
            args.cache / "results" / f"summary-{suite}.json",
            cmp,
            {"version": version, "seconds": round(elapsed), "problems": problems},
        )
        ok = cmp.ok and not problems
        failed |= not ok
        log(f"   {suite}: {'OK' if ok else 'FAILED'} in {elapsed:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
