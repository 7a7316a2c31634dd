"""Shared pytest set-up: command-line options, markers and the real-server fixtures.

Server fixtures start real servers on loopback addresses (see ``tests/servers.py``) lazily:
only when a selected test needs them, once per session.

Policy for tests that need servers (marked ``servers``, or using a fixture in SERVER_FIXTURES):

* ``pytest --no-servers``: they are skipped (a developer machine without the system packages).
* otherwise a server that cannot start makes them ERROR -- never a silent skip.
* with ``CI`` set to a true value, ``--no-servers`` is refused: CI always runs everything.

Adding a server kind (Redis, MariaDB, dnsmasq, ...): write a session-scoped fixture that calls
``require_servers(request)`` first, add its name to SERVER_FIXTURES, and (if started clusters
can be broken by tests) let ``pytest_runtest_setup`` repair it like ``pg_cluster``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .servers import PostgresCluster, PostgresServer

# Fixtures that start real servers. Tests using them (directly or through other fixtures) get
# the ``servers`` marker automatically.
SERVER_FIXTURES: frozenset[str] = frozenset({"pg_cluster"})

PG_INSTANCES = 4

_started_pg_clusters = pytest.StashKey[list[PostgresCluster]]()


def ci_enabled() -> bool:
    """True when the ``CI`` environment variable is set to a true value (``true``, ``1``, ...)."""
    value = os.environ.get("CI", "").strip().lower()
    return value not in {"", "0", "false", "no", "off"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-servers",
        action="store_true",
        default=False,
        help="skip the tests that need real servers (PostgreSQL, ...) started by fixtures; "
        "not allowed when $CI is set",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "servers: needs real servers started by fixtures")
    if config.getoption("--no-servers") and ci_enabled():
        raise pytest.UsageError(
            "--no-servers is not allowed when CI is set: CI must run the server tests"
        )
    config.stash[_started_pg_clusters] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs real servers; --no-servers given")
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)
        if config.getoption("--no-servers") and item.get_closest_marker("servers"):
            item.add_marker(skip)


def require_servers(request: pytest.FixtureRequest) -> None:
    """Call first in every server fixture: skips under ``--no-servers``, otherwise lets
    start-up failures raise (so the test errors with the server's log in the report)."""
    if request.config.getoption("--no-servers"):
        pytest.skip("needs real servers; --no-servers given")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # A test may stop a server (a host failure) and fail before restarting it: restart whatever
    # is down before the next test, so one test cannot break the others.
    for cluster in item.config.stash[_started_pg_clusters]:
        cluster.ensure_running()


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_cluster(request: pytest.FixtureRequest) -> Iterator[PostgresCluster]:
    """PG_INSTANCES PostgreSQL servers on 127.0.0.2, 127.0.0.3, ... (same port), role and
    database ``app`` (password ``app``, superuser)."""
    require_servers(request)
    cluster = PostgresCluster(n=PG_INSTANCES)
    cluster.start()  # cleans up after itself and raises (with the log tail) on failure
    started = request.config.stash[_started_pg_clusters]
    started.append(cluster)
    yield cluster
    started.remove(cluster)
    cluster.stop()


@pytest.fixture(scope="session")
def pg_server(pg_cluster: PostgresCluster) -> PostgresServer:
    return pg_cluster.servers[0]


@pytest.fixture(scope="session")
def pg_url(pg_server: PostgresServer) -> str:
    """SQLAlchemy URL of the first server: ``postgresql+psycopg://app:app@127.0.0.2:PORT/app``."""
    return pg_server.url()
