"""The driver matrix: every driver the README names, against real servers.

One set of tests, parametrized over the four sync and four asyncio drivers of
PostgreSQL (``pg_cluster``, ``pg_replica_pair``) and MariaDB (``mariadb_cluster``).
Each proves, for that driver:

1. host steering: a pool over two hosts spreads its connections evenly;
2. role: ``target_role="primary"`` uses the primary and learns the standby's role;
3. failover: a stopped host is marked down and checkouts keep working on the other;
4. recycle: ``pool.recycle()`` replaces every connection;
5. a hung host (``freeze()``) is marked down with the reason ``deadline exceeded``, and
   the connection whose health check hung is abandoned (``socket_fd()`` + ``abandon()``).

Where a connection is, and which session it is, is asked of the server
(``inet_server_addr()``/``pg_backend_pid()``, ``@@bind_address``/``CONNECTION_ID()``),
not only read from the pool's figures. The sync drivers run the same scenario code as the
asyncio ones (inside ``asyncio.run``; their calls simply do not await), so that the eight
drivers are held to exactly the same assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

from sqla_rebalance import AsyncRebalancingQueuePool, RebalancingQueuePool
from sqla_rebalance.deadlines import socket_fd
from sqla_rebalance.stats import HostStats

from .helpers import async_wait_for

pytestmark = [pytest.mark.servers, pytest.mark.timeout(90)]

#: Fast failure detection, so that each test takes a second or two.
FAST_CHECKS: dict[str, Any] = {
    "health_check_interval": 0.2,
    "health_check_timeout": 0.3,
    "unhealthy_threshold": 2,
}
#: Generous bounds for a loaded CI machine (detection takes well under 2 s here).
WITHIN = 15.0


@dataclass(frozen=True)
class Driver:
    backend: str  # "postgresql" or "mysql"
    driver: str  # the SQLAlchemy driver name in the URL
    module: str  # the DBAPI module
    is_async: bool

    @property
    def name(self) -> str:
        return f"{self.backend}+{self.driver}"

    @property
    def postgres(self) -> bool:
        return self.backend == "postgresql"


DRIVERS = [
    Driver("postgresql", "psycopg", "psycopg", is_async=False),
    Driver("postgresql", "psycopg2", "psycopg2", is_async=False),
    Driver("mysql", "pymysql", "pymysql", is_async=False),
    Driver("mysql", "mysqldb", "MySQLdb", is_async=False),  # mysqlclient
    Driver("postgresql", "psycopg_async", "psycopg", is_async=True),
    Driver("postgresql", "asyncpg", "asyncpg", is_async=True),
    Driver("mysql", "aiomysql", "aiomysql", is_async=True),
    Driver("mysql", "asyncmy", "asyncmy", is_async=True),
]

#: The server's own address for the connection, and the session's id on that server.
WHO = {
    "postgresql": "SELECT host(inet_server_addr()), pg_backend_pid()",
    "mysql": "SELECT @@bind_address, CONNECTION_ID()",
}
#: The ids of every session open on the server.
SESSIONS = {
    "postgresql": "SELECT pid FROM pg_stat_activity",
    "mysql": "SELECT id FROM information_schema.processlist",
}


@pytest.fixture(params=DRIVERS, ids=[d.name for d in DRIVERS])
def driver(request: pytest.FixtureRequest) -> Driver:
    drv: Driver = request.param
    pytest.importorskip(drv.module)  # a failure on CI, where every test must run
    return drv


@pytest.fixture
def servers(driver: Driver, request: pytest.FixtureRequest) -> list[Any]:
    """Two servers of the driver's database (only that cluster is started)."""
    if driver.postgres:
        return list(request.getfixturevalue("pg_cluster").servers[:2])
    return list(request.getfixturevalue("mariadb_cluster").servers)


class Conn:
    """A checked-out connection of either kind, used the same way."""

    def __init__(self, conn: Any, driver: Driver) -> None:
        self.conn = conn
        self.driver = driver

    async def rows(self, sql: str) -> list[Any]:
        result = self.conn.execute(text(sql))
        if self.driver.is_async:
            result = await result
        return list(result.all())

    async def who(self) -> tuple[str, int]:
        """(server address, session id), as the server sees this connection."""
        [(address, session)] = await self.rows(WHO[self.driver.backend])
        return str(address), int(session)

    @property
    def dbapi_connection(self) -> Any:
        """What the pool holds (and health-checks, and abandons) for this connection."""
        sync = self.conn.sync_connection if self.driver.is_async else self.conn
        return sync.connection.dbapi_connection

    async def close(self) -> None:
        closed = self.conn.close()
        if self.driver.is_async:
            await closed


class Pools:
    """Engines of one driver over the two servers, disposed at the end of the test."""

    def __init__(self, driver: Driver, servers: list[Any]) -> None:
        self.driver = driver
        self.servers = servers
        self.engines: list[Any] = []

    @property
    def hosts(self) -> list[str]:
        return [s.address for s in self.servers]

    def make(self, **kw: Any) -> Any:
        """An engine of this driver over the servers (the URL names the first one)."""
        kw.setdefault("pool_size", 4)
        kw.setdefault("max_overflow", 0)
        kw.setdefault("hosts", self.hosts)
        url = self.servers[0].url(driver=self.driver.driver)
        if self.driver.is_async:
            engine = create_async_engine(url, poolclass=AsyncRebalancingQueuePool, **kw)
        else:
            engine = create_engine(url, poolclass=RebalancingQueuePool, **kw)
        assert (engine.url.drivername, engine.dialect.is_async) == (
            self.driver.name,
            self.driver.is_async,
        )
        self.engines.append(engine)
        return engine

    async def connect(self, engine: Any) -> Conn:
        conn = engine.connect()
        if self.driver.is_async:
            conn = await conn
        return Conn(conn, self.driver)

    async def fill(self, engine: Any, n: int) -> list[tuple[str, int]]:
        """Check out ``n`` connections at once; return where each one is, then return them."""
        conns = [await self.connect(engine) for _ in range(n)]
        try:
            return [await c.who() for c in conns]
        finally:
            for conn in conns:
                await conn.close()

    @contextlib.asynccontextmanager
    async def held(self, engine: Any, n: int) -> AsyncIterator[list[Conn]]:
        conns = [await self.connect(engine) for _ in range(n)]
        try:
            yield conns
        finally:
            for conn in conns:
                await conn.close()

    async def dispose(self) -> None:
        for engine in self.engines:
            disposed = engine.dispose()
            if self.driver.is_async:
                await disposed


def run(driver: Driver, servers: list[Any], scenario: Callable[[Pools], Awaitable[None]]) -> None:
    """Run ``scenario`` in an event loop of its own (the one an asyncio pool works in)."""

    async def main() -> None:
        pools = Pools(driver, servers)
        try:
            await scenario(pools)
        finally:
            await pools.dispose()

    asyncio.run(main())


async def eventually(predicate: Callable[[], Any], what: str, timeout: float = WITHIN) -> Any:
    """Poll ``predicate`` (sync or async) without blocking the event loop."""
    return await async_wait_for(predicate, timeout, interval=0.02, what=what)


def hosts_of(engine: Any) -> dict[str, HostStats]:
    stats: dict[str, HostStats] = engine.pool.stats().hosts
    return stats


def open_per_host(engine: Any) -> dict[str, int]:
    return {key: h.open for key, h in hosts_of(engine).items()}


def addresses(where: list[tuple[str, int]]) -> list[str]:
    return sorted(address for address, _ in where)


def peer_of(fd: int) -> tuple[str, int]:
    """The remote address of the socket ``fd`` (left open: the driver owns it)."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        host, port = sock.getpeername()[:2]
    return str(host), int(port)


# --------------------------------------------------------------------------- the tests


def test_host_steering_spreads_evenly(driver, servers):
    async def scenario(pools: Pools) -> None:
        engine = pools.make()
        where = await pools.fill(engine, 4)
        # The servers say so: two sessions on each address, four distinct sessions.
        assert addresses(where) == sorted([s.host for s in servers] * 2)
        assert len(set(where)) == 4
        assert open_per_host(engine) == dict.fromkeys(pools.hosts, 2)
        for host in hosts_of(engine).values():
            assert (host.health, host.failures) == ("up", 0)

    run(driver, servers, scenario)


@pytest.fixture
def primary_and_standby(driver, request):
    """[primary, standby]: PostgreSQL's streaming replica pair, or two MariaDB servers of
    which the second is made read-only (a standby, for the pool) for the test."""
    if driver.postgres:
        pair = request.getfixturevalue("pg_replica_pair")
        yield [pair.primary, pair.standby]
        return
    primary, standby = request.getfixturevalue("mariadb_cluster").servers

    def read_only(value: bool) -> None:
        admin = create_engine(standby.url(), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f"SET GLOBAL read_only = {int(value)}"))
        finally:
            admin.dispose()

    read_only(True)
    try:
        yield [primary, standby]
    finally:
        if standby.is_running():
            read_only(False)


def test_target_role_primary(driver, primary_and_standby):
    primary, standby = primary_and_standby

    async def scenario(pools: Pools) -> None:
        engine = pools.make(target_role="primary", pool_size=3)
        # Every connection is on the primary (each connect asks the role; the
        # standby is tried, found out and left).
        assert addresses(await pools.fill(engine, 3)) == [primary.host] * 3
        hosts = hosts_of(engine)
        assert (hosts[primary.address].role, hosts[primary.address].health) == ("primary", "up")
        assert hosts[primary.address].open == 3
        await eventually(
            lambda: hosts_of(engine)[standby.address].role == "standby", "standby role learnt"
        )
        assert hosts_of(engine)[standby.address].open == 0

    run(driver, primary_and_standby, scenario)


def test_failover_to_the_other_host(driver, servers):
    survivor, victim = servers

    async def scenario(pools: Pools) -> None:
        engine = pools.make(pool_pre_ping=True, **FAST_CHECKS)
        assert addresses(await pools.fill(engine, 4)) == sorted([survivor.host, victim.host] * 2)
        victim.stop()  # refuses connections; conftest starts it again before the next test
        # No checkout fails: the dead connections fail their ping, the reconnects
        # that try the victim fail over to the survivor inside the checkout.
        assert addresses(await pools.fill(engine, 4)) == [survivor.host] * 4
        await eventually(
            lambda: hosts_of(engine)[victim.address].health == "down", "stopped host down"
        )
        hosts = hosts_of(engine)
        assert hosts[victim.address].reason == "refused"  # each driver's wording understood
        assert (hosts[victim.address].open, hosts[survivor.address].open) == (0, 4)
        assert hosts[survivor.address].health == "up"
        assert addresses(await pools.fill(engine, 4)) == [survivor.host] * 4

    run(driver, servers, scenario)


def test_recycle_replaces_every_connection(driver, servers):
    async def scenario(pools: Pools) -> None:
        engine = pools.make()
        old = await pools.fill(engine, 4)
        assert engine.pool.recycle() == 4
        await eventually(
            lambda: engine.pool.stats().retirements["manual"] == 4, "4 connections recycled"
        )
        async with pools.held(engine, 4) as conns:
            new = [await c.who() for c in conns]
            assert not set(new) & set(old), (old, new)
            assert addresses(new) == addresses(old)  # still two per host

            # The servers agree: none of the old sessions is left.
            async def old_sessions_gone() -> bool:
                for conn, (address, _) in zip(conns, new, strict=True):
                    live = {row[0] for row in await conn.rows(SESSIONS[driver.backend])}
                    if {s for a, s in old if a == address} & live:
                        return False
                return True

            await eventually(old_sessions_gone, "old sessions gone on the servers")
        stats = engine.pool.stats()
        assert stats.open == 4
        assert stats.connects == 8

    run(driver, servers, scenario)


def test_hung_host_is_marked_down(driver, servers):
    healthy, frozen = servers

    async def scenario(pools: Pools) -> None:
        engine = pools.make(pool_size=2, min_size=2, **FAST_CHECKS)
        # socket_fd() finds each connection's socket: it is connected to that server.
        async with pools.held(engine, 2) as conns:
            for conn in conns:
                address, _ = await conn.who()
                fd = socket_fd(conn.dbapi_connection)
                assert fd is not None, type(conn.dbapi_connection)
                server = next(s for s in servers if s.host == address)
                assert peer_of(fd) == (server.host, server.port)
        await eventually(
            lambda: open_per_host(engine) == dict.fromkeys(pools.hosts, 1), "one idle per host"
        )
        with frozen.frozen():
            await eventually(
                lambda: hosts_of(engine)[frozen.address].health == "down", "frozen host down"
            )
            host = hosts_of(engine)[frozen.address]
            assert host.reason == "deadline exceeded"
            assert "deadline exceeded" in (host.last_error or "")
            # The health check that hung on the idle connection returned once its
            # deadline passed: abandon() shut the socket down (the server never answers),
            # and the connection was closed, all while the host is still frozen.
            await eventually(
                lambda: hosts_of(engine)[frozen.address].open == 0,
                "the hung health check's connection abandoned and closed",
            )
            assert addresses(await pools.fill(engine, 2)) == [healthy.host] * 2
            assert hosts_of(engine)[healthy.address].health == "up"

    run(driver, servers, scenario)
