"""Where the demo's hosts come from: SQLite files, or local PostgreSQL servers.

Both give the same interface: ``keys`` (the pool's host keys), ``url``, ``engine_kw``,
``prepare()``, ``take_down(i)``, ``bring_back(i)`` (with ``down_how`` and ``up_how`` saying how)
and ``close()``.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from ..devservers import PostgresCluster, find_pg_bindir
from .workload import create_table


class DemoUnavailableError(RuntimeError):
    """The chosen mode cannot run here (say, PostgreSQL mode without the server programs)."""


class ReadingConnection(sqlite3.Connection):
    """A SQLite connection that reads its database as it opens.

    In WAL mode SQLite opens the ``-wal`` and ``-shm`` files at the first
    read, by path. Reading at once means a connection holds every file it
    needs from the moment the pool has it; a connect that cannot read fails
    inside the pool's connect (and is tried on another host), never later in
    a request.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            self.execute("select count(*) from events").fetchall()
        except BaseException:
            self.close()
            raise


class SqliteHosts:
    """Four SQLite files, each in its own directory; renaming a directory downs a host."""

    mode = "sqlite"

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="sqla-rebalance-demo-")
        base = Path(self._tmp.name)
        self._dirs = [base / f"host{i + 1}" for i in range(4)]
        self.keys = [str(d / "demo.db") for d in self._dirs]
        self.url = f"sqlite:///{self.keys[0]}"
        self.engine_kw: dict[str, Any] = {"connect_args": {"factory": ReadingConnection}}

    def describe(self) -> str:
        return f"SQLite files as hosts, each in its own directory under {self._tmp.name}"

    def prepare(self) -> None:
        for d, key in zip(self._dirs, self.keys, strict=True):
            d.mkdir()
            conn = sqlite3.connect(key)
            try:
                conn.execute("pragma journal_mode=wal")
                conn.execute("create table if not exists events (id integer primary key, who text)")
                conn.commit()
            finally:
                conn.close()

    def _away(self, i: int) -> Path:
        return self._dirs[i].with_name(self._dirs[i].name + "-away")

    down_how = (
        "renaming its directory: new connects fail, open connections keep working "
        "(a host that stops accepting connections)"
    )
    up_how = "renaming its directory back: connects work again"

    def take_down(self, i: int) -> None:
        self._dirs[i].rename(self._away(i))

    def bring_back(self, i: int) -> None:
        self._away(i).rename(self._dirs[i])

    def close(self) -> None:
        self._tmp.cleanup()


def have_psycopg() -> bool:
    return importlib.util.find_spec("psycopg") is not None


class PostgresHosts:
    """Four local PostgreSQL servers (:mod:`sqla_rebalance.devservers`); an immediate shutdown
    downs a host."""

    mode = "postgres"

    def __init__(self) -> None:
        if not have_psycopg():
            raise DemoUnavailableError(
                "the PostgreSQL demo needs psycopg: pip install 'sqla-rebalance[postgresql]'"
            )
        try:
            find_pg_bindir()
        except RuntimeError as err:
            raise DemoUnavailableError(str(err)) from None
        self.cluster = PostgresCluster(n=4)
        self.keys: list[str] = list(self.cluster.hosts)
        self.url: str = self.cluster.servers[0].url()
        self.engine_kw: dict[str, Any] = {"pool_pre_ping": True}

    def describe(self) -> str:
        first, last = self.cluster.servers[0].host, self.cluster.servers[-1].host
        return f"PostgreSQL servers on {first}-{last.rsplit('.', 1)[1]} as hosts"

    def prepare(self) -> None:
        try:
            self.cluster.start()
        except RuntimeError as err:
            raise DemoUnavailableError(f"could not start the PostgreSQL servers: {err}") from err
        # start() may have moved to another free port.
        self.keys = list(self.cluster.hosts)
        self.url = self.cluster.servers[0].url()
        for server in self.cluster.servers:
            engine = create_engine(server.url(), poolclass=NullPool)
            try:
                create_table(engine)
            finally:
                engine.dispose()

    down_how = (
        "immediate shutdown of its server: its sessions die (statements running there fail), "
        "new connects are refused"
    )
    up_how = "starting its server again"

    def take_down(self, i: int) -> None:
        self.cluster.servers[i].stop("immediate")

    def bring_back(self, i: int) -> None:
        self.cluster.servers[i].start()

    def close(self) -> None:
        self.cluster.stop()
