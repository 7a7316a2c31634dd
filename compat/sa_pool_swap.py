"""pytest plugin: run SQLAlchemy's own test suite with our pools in place of QueuePool.

Loaded with ``-p sa_pool_swap`` (``compat/`` on ``PYTHONPATH``) by
``scripts/compat_sqlalchemy.py``, from the directory of SQLAlchemy's sdist, before
SQLAlchemy's own conftest and testing plugin::

    python -s -m pytest -p sa_pool_swap --compat-pool=ours --compat-report=out.json test/...

``--compat-pool=ours``
    ``sqlalchemy.pool.QueuePool`` and ``AsyncAdaptedQueuePool`` become
    ``RebalancingQueuePool`` and ``AsyncRebalancingQueuePool``, in every module that
    bound those names (``sqlalchemy``, ``sqlalchemy.pool``, ``sqlalchemy.pool.impl``,
    ``sqlalchemy.testing.requirements``, ...), before any test module is imported. So:

    * ``pool.QueuePool(creator, ...)`` and ``from sqlalchemy.pool import QueuePool`` in the
      tests give our pool;
    * the dialects' default pool class (``DefaultDialect.get_pool_class`` and the SQLite
      dialects' overrides read ``pool.QueuePool`` / ``pool.AsyncAdaptedQueuePool`` when
      called) is ours, so the test database's engine (``--db sqlite_file``) and every
      ``testing_engine()`` / ``create_engine()`` without ``poolclass=`` use it.

    Proof, not hope: a ``__new__`` given to SQLAlchemy's ``Pool`` counts the class of
    every pool built. A pool that is *exactly* the stock
    ``QueuePool`` or ``AsyncAdaptedQueuePool`` in this mode raises ``AssertionError`` (that
    test then fails, and the comparison reports it), and the session fails when no pool of
    ours was built at all, or when SQLAlchemy was not imported from site-packages (the
    sdist's ``lib/`` must not shadow the installed release: run Python with ``-s``).

``--compat-pool=stock``
    nothing is replaced: the reference run (pool classes are counted all the same).

``--compat-report=PATH``
    writes JSON: the outcome of every test (``passed``, ``failed``, ``error``, ``skipped``,
    ``xfailed``, ``xpassed``), the failure text of those that did not pass, and the
    pool classes built.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path
from typing import Any

import pytest

_STATE: dict[str, Any] = {
    "mode": "stock",
    "pools": collections.Counter(),
    "unswapped": [],
    "current": None,
}
_OUTCOMES: dict[str, str] = {}
_DETAILS: dict[str, str] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sqla-rebalance compat")
    group.addoption(
        "--compat-pool",
        choices=("ours", "stock"),
        default="stock",
        help="ours: replace QueuePool/AsyncAdaptedQueuePool by sqla-rebalance's pools",
    )
    group.addoption("--compat-report", default=None, help="write outcomes as JSON here")


def _rebind(replacements: dict[type, type]) -> list[str]:
    """Point every name bound to a stock class in a loaded ``sqlalchemy*`` module at ours."""
    rebound = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "sqlalchemy" or name.startswith("sqlalchemy.")):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, type) and value in replacements:
                setattr(module, attr, replacements[value])
                rebound.append(f"{name}.{attr}")
    return rebound


def _count_pools(base: type, forbidden: tuple[type, ...]) -> None:
    """Count the class of every pool built, by giving SQLAlchemy's ``Pool`` a ``__new__``.

    ``__init__`` is left alone: ``create_engine`` reads the pool's keyword arguments from
    the ``__init__`` signatures (``util.get_cls_kwargs``), which a wrapper would hide.
    """

    def __new__(cls: type, *args: Any, **kw: Any) -> Any:
        _STATE["pools"][f"{cls.__module__}.{cls.__qualname__}"] += 1
        if _STATE["mode"] == "ours" and cls in forbidden:
            _STATE["unswapped"].append(_STATE["current"] or "<outside a test>")
            raise AssertionError(
                f"compat: a stock {cls.__qualname__} was built although the pools are "
                "swapped: the swap missed a reference"
            )
        return object.__new__(cls)

    base.__new__ = __new__  # type: ignore[method-assign]


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    # Runs before SQLAlchemy's conftest (which bootstraps its testing plugin) is loaded,
    # so before the test database's engine or any test module exists.
    import sqlalchemy
    from sqlalchemy import pool

    mode = early_config.known_args_namespace.compat_pool
    _STATE["mode"] = mode
    stock = (pool.QueuePool, pool.AsyncAdaptedQueuePool)
    _count_pools(pool.Pool, stock)
    _STATE["sqlalchemy_file"] = sqlalchemy.__file__
    _STATE["sqlalchemy_version"] = sqlalchemy.__version__
    if mode == "ours":
        from sqla_rebalance import AsyncRebalancingQueuePool, RebalancingQueuePool

        _STATE["rebound"] = _rebind(
            {
                pool.QueuePool: RebalancingQueuePool,
                pool.AsyncAdaptedQueuePool: AsyncRebalancingQueuePool,
            }
        )
        assert pool.QueuePool is RebalancingQueuePool
        assert pool.impl.QueuePool is RebalancingQueuePool
        assert pool.AsyncAdaptedQueuePool is AsyncRebalancingQueuePool


def pytest_configure(config: pytest.Config) -> None:
    # The installed SQLAlchemy (the one our pool subclasses) must be the one under test,
    # not the sdist's lib/ that SQLAlchemy's conftest puts first on sys.path.
    import sqlalchemy

    where = Path(sqlalchemy.__file__).resolve()
    if "site-packages" not in where.parts and "dist-packages" not in where.parts:
        raise pytest.UsageError(f"compat: SQLAlchemy imported from {where}, not site-packages")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    if _STATE["mode"] != "ours":
        return
    # The dialects pick their default pool class when an engine is made: check the
    # two this suite relies on (file SQLite, sync and asyncio) without building a pool.
    from sqlalchemy.engine import make_url
    from sqlalchemy.engine.default import DefaultDialect

    from sqla_rebalance import AsyncRebalancingQueuePool, RebalancingQueuePool

    checks = {
        "sqlite:///x.db": RebalancingQueuePool,
        "postgresql+psycopg2://": RebalancingQueuePool,
    }
    try:
        import aiosqlite  # noqa: F401
    except ImportError:  # pragma: no cover - the asyncio tests then skip in both runs
        pass
    else:
        checks["sqlite+aiosqlite:///x.db"] = AsyncRebalancingQueuePool
    for url, wanted in checks.items():
        u = make_url(url)
        dialect_cls = u.get_dialect()
        got = dialect_cls.get_pool_class(u)
        assert got is wanted, f"compat: {url} picks {got}, not {wanted}"
    assert DefaultDialect.get_pool_class(make_url("postgresql://")) is RebalancingQueuePool


def pytest_runtest_setup(item: pytest.Item) -> None:
    _STATE["current"] = item.nodeid


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    nodeid = report.nodeid
    if report.when == "call":
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        else:
            outcome = report.outcome
    elif report.failed:
        outcome = "error"
    elif report.skipped:
        outcome = "skipped"
    else:
        return
    # The first bad phase wins (a teardown error after a failed call stays a failure).
    if _OUTCOMES.get(nodeid) in ("failed", "error"):
        return
    _OUTCOMES[nodeid] = outcome
    if outcome in ("failed", "error"):
        lines = report.longreprtext.splitlines()
        _DETAILS[nodeid] = "\n".join(lines[-40:])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    pools = dict(_STATE["pools"])
    if _STATE["mode"] == "ours":
        ours = sum(n for name, n in pools.items() if name.startswith("sqla_rebalance."))
        if ours == 0 and session.testscollected:
            # scripts/compat_sqlalchemy.py fails on this too (from the report).
            sys.stderr.write("compat: no pool of ours was built: the swap did not happen\n")
    path = session.config.getoption("compat_report")
    if path:
        data = {
            "mode": _STATE["mode"],
            "sqlalchemy_version": _STATE.get("sqlalchemy_version"),
            "sqlalchemy_file": _STATE.get("sqlalchemy_file"),
            "rebound": _STATE.get("rebound", []),
            "pools": pools,
            "unswapped": _STATE["unswapped"],
            "outcomes": _OUTCOMES,
            "details": _DETAILS,
        }
        Path(path).write_text(json.dumps(data, indent=1, sort_keys=True))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    pools = ", ".join(f"{name}: {n}" for name, n in sorted(_STATE["pools"].items()))
    terminalreporter.write_line(f"compat ({_STATE['mode']}): pools built: {pools}")
