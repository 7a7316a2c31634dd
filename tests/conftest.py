"""Shared pytest set-up: command-line options, markers and the real-server fixtures.

Server fixtures start real servers on loopback addresses (see ``sqla_rebalance.devservers``) lazily:
only when a selected test needs them, once per session, and stop them (removing their data) at
the end of the session. Before every test, whatever a previous test broke is repaired: stopped
servers are started again, a promoted standby is rebuilt.

Fixtures (session-scoped unless noted):

``pg_cluster`` -> PostgresCluster
    PG_INSTANCES (4) PostgreSQL servers on 127.0.0.2 ... 127.0.0.5, one port; ``.servers``,
    ``.hosts`` (``["127.0.0.2:PORT", ...]``), ``.port``; role and database ``app`` (password
    ``app``, superuser). ``pg_server`` is the first server, ``pg_url`` its SQLAlchemy URL
    (``postgresql+psycopg://app:app@127.0.0.2:PORT/app``).
``pg_replica_pair`` -> PostgresReplicaPair
    PostgreSQL primary ``.primary`` on 127.0.0.8 and hot standby ``.standby`` on 127.0.0.9 (same
    port; streaming replication); ``.hosts``, ``.promote()``, ``.ensure_layout()``.
``mariadb_cluster`` -> MariaDBCluster
    2 MariaDB servers on 127.0.0.12 and 127.0.0.13, one port; ``.servers``, ``.hosts``; server
    ``.url()`` -> ``mysql+pymysql://app:app@127.0.0.12:PORT/app`` (user ``app``, all privileges).
``redis_server`` -> RedisServer
    Redis on 127.0.0.1 without persistence; ``.url()`` -> ``redis://127.0.0.1:PORT/0``.
``dns_server`` -> DnsServer
    dnsmasq on 127.0.0.1, the authority for ``*.test``; ``.nameserver`` (``"127.0.0.1:PORT"``),
    ``.set(name, addresses)`` / ``.remove(name)`` (both wait until served), ``.lookup(name)``,
    ``.stop()`` (an outage: queries time out), ``.start()``.
``dns_name`` (function scope) -> str
    a fresh name under ``.test`` (``db-<n>.test``), without records; removed after the test.

Every server has ``stop()`` (a host failure), ``start()``, ``restart()``, ``is_running()``,
``log_tail()``, ``.host``, ``.port`` and ``.address`` (``"host:port"``).

Policy for tests that need servers (marked ``servers``, or using a fixture in SERVER_FIXTURES):

* ``pytest --no-servers``: they are skipped (a developer machine without the system packages).
* otherwise a server that cannot start makes them ERROR -- never a silent skip.
* with ``CI`` set to a true value, ``--no-servers`` is refused: CI always runs everything,
  and any skipped test (a missing module behind ``importorskip``, say) is a failure, since
  CI's environment is the one that must run the whole suite.

Adding a server kind: write a session-scoped fixture that calls ``require_servers(request)``
first, add its name to SERVER_FIXTURES, and (if tests can break it) register its repair with
``_keep_repaired`` so that ``pytest_runtest_setup`` runs it before every test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from .servers import (
    DnsServer,
    MariaDBCluster,
    PostgresCluster,
    PostgresReplicaPair,
    PostgresServer,
    RedisServer,
)

# Fixtures that start real servers. Tests using them (directly or through other fixtures) get
# the ``servers`` marker automatically.
SERVER_FIXTURES: frozenset[str] = frozenset(
    {"pg_cluster", "pg_replica_pair", "mariadb_cluster", "redis_server", "dns_server"}
)

PG_INSTANCES = 4
MARIADB_INSTANCES = 2

# Repairs of the started servers, run before every test (see pytest_runtest_setup).
_repairs = pytest.StashKey[list[Callable[[], None]]]()


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
    config.stash[_repairs] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs real servers; --no-servers given")
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)
        if config.getoption("--no-servers") and item.get_closest_marker("servers"):
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On CI a skip is a failure: nothing the listed environment should run may vanish."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and ci_enabled() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped on CI, where every test must run: {reason}"


def require_servers(request: pytest.FixtureRequest) -> None:
    """Call first in every server fixture: skips under ``--no-servers``, otherwise lets
    start-up failures raise (so the test errors with the server's log in the report)."""
    if request.config.getoption("--no-servers"):
        pytest.skip("needs real servers; --no-servers given")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # A test may stop a server (a host failure) or promote a standby and fail before undoing
    # it: repair whatever is broken before the next test, so one test cannot break the others.
    for repair in item.config.stash[_repairs]:
        repair()


def _keep_repaired(
    request: pytest.FixtureRequest, repair: Callable[[], None]
) -> Callable[[], None]:
    """Run ``repair`` before every test until the returned function is called."""
    repairs = request.config.stash[_repairs]
    repairs.append(repair)
    return lambda: repairs.remove(repair)


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_cluster(request: pytest.FixtureRequest) -> Iterator[PostgresCluster]:
    """PG_INSTANCES PostgreSQL servers on 127.0.0.2, 127.0.0.3, ... (same port), role and
    database ``app`` (password ``app``, superuser)."""
    require_servers(request)
    cluster = PostgresCluster(n=PG_INSTANCES)
    cluster.start()  # cleans up after itself and raises (with the log tail) on failure
    forget = _keep_repaired(request, cluster.ensure_running)
    yield cluster
    forget()
    cluster.stop()


@pytest.fixture(scope="session")
def pg_server(pg_cluster: PostgresCluster) -> PostgresServer:
    return pg_cluster.servers[0]


@pytest.fixture(scope="session")
def pg_url(pg_server: PostgresServer) -> str:
    """SQLAlchemy URL of the first server: ``postgresql+psycopg://app:app@127.0.0.2:PORT/app``."""
    return pg_server.url()


@pytest.fixture(scope="session")
def pg_replica_pair(request: pytest.FixtureRequest) -> Iterator[PostgresReplicaPair]:
    """A PostgreSQL primary on 127.0.0.8 streaming to a hot standby on 127.0.0.9 (same port).

    Before every test both run and the standby is a standby again (rebuilt if promoted)."""
    require_servers(request)
    pair = PostgresReplicaPair()
    pair.start()
    forget = _keep_repaired(request, pair.ensure_layout)
    yield pair
    forget()
    pair.stop()


# --------------------------------------------------------------------------- MariaDB


@pytest.fixture(scope="session")
def mariadb_cluster(request: pytest.FixtureRequest) -> Iterator[MariaDBCluster]:
    """MARIADB_INSTANCES MariaDB servers on 127.0.0.12, 127.0.0.13 (same port), database and
    user ``app`` (password ``app``, all privileges)."""
    require_servers(request)
    cluster = MariaDBCluster(n=MARIADB_INSTANCES)
    cluster.start()
    forget = _keep_repaired(request, cluster.ensure_running)
    yield cluster
    forget()
    cluster.stop()


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """Redis on 127.0.0.1 (a free port), no persistence: ``redis_server.url()``."""
    require_servers(request)
    server = RedisServer()
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    forget = _keep_repaired(request, server.start)
    yield server
    forget()
    server.close()


# --------------------------------------------------------------------------- DNS


@pytest.fixture(scope="session")
def dns_server(request: pytest.FixtureRequest) -> Iterator[DnsServer]:
    """dnsmasq on 127.0.0.1 (a free port), the authority for ``*.test``, TTL 1 s."""
    require_servers(request)
    server = DnsServer()
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    forget = _keep_repaired(request, server.start)
    yield server
    forget()
    server.close()


@pytest.fixture
def dns_name(dns_server: DnsServer) -> Iterator[str]:
    """A name under ``.test`` that no other test uses (``db-<n>.test``), without records:
    ``dns_server.set(dns_name, [...])`` gives it some. Removed again after the test."""
    name = dns_server.new_name()
    yield name
    if name in dns_server.records:
        dns_server.remove(name)
