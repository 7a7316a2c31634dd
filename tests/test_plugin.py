"""The ``rebalance`` SQLAlchemy plugin: pool class and settings from the URL.

SQLite (file and memory, sync and aiosqlite) for the mechanics; four real PostgreSQL
servers for the proof that URL-configured hosts really spread connections.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine, exc, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool, QueuePool

from sqla_rebalance import AsyncRebalancingQueuePool, RebalancingQueuePool
from sqla_rebalance.errors import ConfigurationError
from sqla_rebalance.plugin import SECRET_ENV, parse_hosts_param

from .helpers import wait_for


@pytest.fixture
def made():
    """Engines made by a test, disposed after it (their pools stop their maintenance)."""
    engines: list[Any] = []
    yield engines
    for engine in engines:
        engine.dispose()


@pytest.fixture
def db(tmp_path):
    return f"sqlite:///{tmp_path}/app.db"


def test_url_plugin_selects_pool_and_applies_settings(db, made):
    engine = create_engine(
        f"{db}?plugin=rebalance&rebalance_recycle=600&rebalance_jitter=0.25"
        "&rebalance_min_size=2&rebalance_max_idle=30&rebalance_pool_name=orders",
        pool_size=4,
    )
    made.append(engine)
    pool = engine.pool
    assert type(pool) is RebalancingQueuePool
    cfg = pool.config
    assert (cfg.recycle, cfg.recycle_jitter, cfg.min_size, cfg.max_idle, cfg.pool_name) == (
        600.0,
        0.25,
        2,
        30.0,
        "orders",
    )
    assert cfg.pool_size == 4  # an explicit keyword is honoured next to URL settings
    # min_size came from the URL and really drives the pool: two connections prefilled.
    wait_for(lambda: pool.stats().open == 2)
    assert pool.stats().checkouts_waited == 0


def test_parameters_are_removed_before_the_dbapi_sees_them(db, made):
    engine = create_engine(f"{db}?plugin=rebalance&rebalance_recycle=600&rebalance_jitter=0.1")
    made.append(engine)
    assert dict(engine.url.query) == {}
    args, kwargs = engine.dialect.create_connect_args(engine.url)
    assert not any("rebalance" in str(a) for a in args)
    assert not any(k.startswith("rebalance") or k == "plugin" for k in kwargs)
    with engine.connect() as conn:
        assert conn.execute(text("select 1")).scalar() == 1


def test_plugins_keyword_on_a_memory_database(made):
    engine = create_engine(
        "sqlite://?rebalance_recycle=60&rebalance_jitter=0", plugins=["rebalance"], pool_size=2
    )
    made.append(engine)
    assert type(engine.pool) is RebalancingQueuePool
    assert (engine.pool.config.recycle, engine.pool.config.recycle_jitter) == (60.0, 0.0)
    assert dict(engine.url.query) == {}
    with engine.connect() as conn:
        assert conn.execute(text("select 2")).scalar() == 2


def test_plugin_without_parameters_is_a_plain_rebalancing_pool(db, made):
    engine = create_engine(db, plugins=["rebalance"])
    made.append(engine)
    assert type(engine.pool) is RebalancingQueuePool
    assert engine.pool.config.recycle == -1


def test_every_host_parameter_is_typed(tmp_path, made):
    files = [str(tmp_path / f"h{i}.db") for i in range(3)]
    url = (
        f"sqlite:///{files[0]}?plugin=rebalance"
        f"&rebalance_hosts={files[0]},{files[1]}|{files[2]}"
        "&rebalance_target_role=any"
        "&rebalance_dns_nameservers=127.0.0.1:5353,127.0.0.1:5354"
        "&rebalance_dns_min_refresh=2&rebalance_dns_max_refresh=30"
        "&rebalance_health_check_interval=none&rebalance_unhealthy_threshold=5"
        "&rebalance_rebalance_spread=0.5"
    )
    engine = create_engine(url, pool_size=3, max_overflow=0)
    made.append(engine)
    cfg = engine.pool.config
    assert cfg.hosts == [files[0], files[1], [files[2]]]
    assert cfg.dns_nameservers == ["127.0.0.1:5353", "127.0.0.1:5354"]
    assert (cfg.dns_min_refresh, cfg.dns_max_refresh) == (2.0, 30.0)
    assert cfg.health_check_interval is None
    assert (cfg.unhealthy_threshold, cfg.rebalance_spread) == (5, 0.5)
    # The tiers are real: three connections spread over the two first-tier files only.
    conns = [engine.connect() for _ in range(3)]
    try:
        hosts = engine.pool.stats().hosts
        assert {k: h.tier for k, h in hosts.items()} == {files[0]: 0, files[1]: 0, files[2]: 1}
        assert sorted(h.open for h in hosts.values()) == [0, 1, 2]
        assert hosts[files[2]].open == 0
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a:5432,b:5432|dr:5432", ["a:5432", "b:5432", ["dr:5432"]]),
        ("a|b|c", ["a", ["b"], ["c"]]),
        (" a:1 , b:2 ", ["a:1", "b:2"]),
    ],
)
def test_hosts_parameter_syntax(raw, expected):
    assert parse_hosts_param(raw) == expected


@pytest.mark.parametrize("raw", ["a,,b", "|b", "a|", "a,"])
def test_hosts_parameter_rejects_empty_entries(raw):
    with pytest.raises(ConfigurationError, match="rebalance_hosts"):
        parse_hosts_param(raw)


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("rebalance_recycle=abc", r"rebalance_recycle must be a number, got 'abc'"),
        ("rebalance_recycle=nan", r"rebalance_recycle must be a finite number"),
        (
            "rebalance_recycle=60&rebalance_jitter=1.5",
            r"^rebalance_jitter=1\.5 \(URL.*recycle_jitter must be in \[0, 1\)",
        ),
        ("rebalance_jitter=0.2", r"^rebalance_jitter=0\.2 \(URL.*needs pool_recycle"),
        ("rebalance_recycle=0", r"^rebalance_recycle=0 \(URL.*pool_recycle must be a positive"),
        ("rebalance_min_size=two", r"rebalance_min_size must be an integer"),
        ("rebalance_min_size=9", r"^rebalance_min_size=9 \(URL.*cannot be larger than pool_size"),
        ("rebalance_max_idle=0", r"^rebalance_max_idle=0 \(URL.*max_idle must be a positive"),
        ("rebalance_target_role=leader", r"^rebalance_target_role=leader .*must be one of"),
        ("rebalance_health_check_interval=-1", r"^rebalance_health_check_interval=-1 "),
        ("rebalance_unhealthy_threshold=0", r"^rebalance_unhealthy_threshold=0 .*>= 1"),
        ("rebalance_unhealthy_threshold=1.5", r"rebalance_unhealthy_threshold must be an integer"),
        (
            "rebalance_dns_min_refresh=10&rebalance_dns_max_refresh=5",
            r"^rebalance_dns_max_refresh=5 .*must be >= dns_min_refresh",
        ),
        ("rebalance_rebalance_spread=-1", r"^rebalance_rebalance_spread=-1 .*>= 0"),
        ("rebalance_pool_name=%20", r"rebalance_pool_name must not be empty"),
        ("rebalance_hosts=a,,b", r"rebalance_hosts must be a comma-separated list"),
        ("rebalance_recycle=60&rebalance_recycle=70", r"rebalance_recycle is given more than once"),
        ("rebalance_colour=blue", r"unknown URL parameter rebalance_colour.*known: rebalance_"),
        ("rebalance_broadcast=not-a-url", r"rebalance_broadcast must be a URL"),
        (
            "rebalance_broadcast=redis%3A%2F%2F%3Apw%40127.0.0.1%3A6379%2F0",
            r"rebalance_broadcast must not contain a password",
        ),
        ("rebalance_min_recycle_interval=soon", r"rebalance_min_recycle_interval must be a number"),
    ],
)
def test_bad_values_fail_at_create_engine_naming_the_parameter(db, query, match):
    with pytest.raises(exc.ArgumentError, match=match) as info:
        create_engine(f"{db}?plugin=rebalance&{query}")
    assert isinstance(info.value, ConfigurationError)


def test_unknown_parameter_lists_every_known_one(db):
    with pytest.raises(ConfigurationError) as info:
        create_engine(f"{db}?plugin=rebalance&rebalance_recylce=60")
    message = str(info.value)
    for name in ("rebalance_recycle", "rebalance_hosts", "rebalance_min_recycle_interval"):
        assert name in message


def test_a_secret_in_the_url_is_refused_without_echoing_it(db):
    with pytest.raises(ConfigurationError, match=SECRET_ENV) as info:
        create_engine(f"{db}?plugin=rebalance&rebalance_broadcast_secret=hunter2")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("query", "keywords", "names"),
    [
        ("rebalance_recycle=60", {"pool_recycle": 30}, ("rebalance_recycle", "pool_recycle")),
        (
            "rebalance_recycle=60&rebalance_jitter=0.1",
            {"recycle_jitter": 0.3},
            ("rebalance_jitter", "recycle_jitter"),
        ),
        ("rebalance_pool_name=a", {"pool_name": "b"}, ("rebalance_pool_name", "pool_name")),
    ],
)
def test_url_parameter_and_keyword_for_the_same_setting_conflict(db, query, keywords, names):
    with pytest.raises(exc.ArgumentError, match="conflicts with") as info:
        create_engine(f"{db}?plugin=rebalance&{query}", **keywords)
    for name in names:
        assert name in str(info.value)


def test_plugin_named_twice_is_not_a_conflict(db, made):
    engine = create_engine(f"{db}?plugin=rebalance&rebalance_recycle=60", plugins=["rebalance"])
    made.append(engine)
    assert engine.pool.config.recycle == 60.0


def test_keywords_without_url_counterpart_are_honoured(db, made):
    engine = create_engine(
        f"{db}?plugin=rebalance&rebalance_recycle=60", recycle_jitter=0.3, max_idle=5
    )
    made.append(engine)
    assert (engine.pool.config.recycle_jitter, engine.pool.config.max_idle) == (0.3, 5.0)


def test_foreign_poolclass_is_refused(db):
    with pytest.raises(ConfigurationError, match=r"poolclass.*NullPool"):
        create_engine(f"{db}?plugin=rebalance", poolclass=NullPool)


def test_ready_made_foreign_pool_is_refused(db):
    plain = QueuePool(lambda: None)
    with pytest.raises(ConfigurationError, match="pool= is a QueuePool"):
        create_engine(f"{db}?plugin=rebalance", pool=plain)


class _MyPool(RebalancingQueuePool):
    pass


def test_own_subclass_is_kept(db, made):
    engine = create_engine(f"{db}?plugin=rebalance&rebalance_recycle=90", poolclass=_MyPool)
    made.append(engine)
    assert type(engine.pool) is _MyPool
    assert engine.pool.config.recycle == 90.0


def test_dispose_keeps_the_url_settings(tmp_path, made):
    files = [str(tmp_path / "a.db"), str(tmp_path / "b.db")]
    engine = create_engine(
        f"sqlite:///{files[0]}?plugin=rebalance&rebalance_recycle=120&rebalance_jitter=0.3"
        f"&rebalance_pool_name=keep&rebalance_hosts={files[0]},{files[1]}",
        pool_size=2,
    )
    made.append(engine)
    before = engine.pool
    engine.dispose()
    after = engine.pool
    assert after is not before
    assert type(after) is RebalancingQueuePool
    for field in ("recycle", "recycle_jitter", "pool_name", "hosts", "pool_size"):
        assert getattr(after.config, field) == getattr(before.config, field), field


def test_async_engine_gets_the_async_pool(tmp_path):
    async def main() -> tuple[Any, Any]:
        engine = create_async_engine(
            f"sqlite+aiosqlite:///{tmp_path}/a.db?plugin=rebalance&rebalance_recycle=60"
        )
        try:
            async with engine.connect() as conn:
                value = (await conn.execute(text("select 3"))).scalar()
            return engine.pool, value
        finally:
            await engine.dispose()

    pool, value = asyncio.run(main())
    assert type(pool) is AsyncRebalancingQueuePool
    assert pool.config.recycle == 60.0
    assert value == 3


def test_async_engine_with_plugins_keyword(tmp_path):
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path}/a.db?rebalance_min_size=1", plugins=["rebalance"]
    )
    try:
        assert type(engine.pool) is AsyncRebalancingQueuePool
        assert engine.pool.config.min_size == 1
    finally:
        asyncio.run(engine.dispose())


# -- bus arguments: passed only to a pool whose __init__ takes them ----------------------


class _BusPool(RebalancingQueuePool):
    """Stands in for a pool with a bus: records what the plugin gave it."""

    def __init__(
        self,
        creator: Any,
        broadcast: Any = None,
        broadcast_secret: str | None = None,
        min_recycle_interval: float | None = None,
        **kw: Any,
    ) -> None:
        self.seen = (broadcast, broadcast_secret, min_recycle_interval)
        super().__init__(creator, **kw)


_BUS_QUERY = (
    "rebalance_broadcast=redis%3A%2F%2F127.0.0.1%3A6379%2F0&rebalance_min_recycle_interval=5"
)


def test_bus_parameters_reach_a_pool_that_accepts_them(db, made, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "from-env")
    engine = create_engine(f"{db}?plugin=rebalance&{_BUS_QUERY}", poolclass=_BusPool)
    made.append(engine)
    # The secret is left to the pool, which reads the environment itself.
    assert engine.pool.seen == ("redis://127.0.0.1:6379/0", None, 5.0)


def test_a_file_bus_url_is_accepted(db, made):
    engine = create_engine(
        f"{db}?plugin=rebalance&rebalance_broadcast=sqlite%3A%2F%2F%2F%2Ftmp%2Fbus.db",
        poolclass=_BusPool,
    )
    made.append(engine)
    assert engine.pool.seen[0] == "sqlite:////tmp/bus.db"


def test_bus_url_parameter_and_keyword_conflict(db):
    with pytest.raises(
        ConfigurationError, match=r"rebalance_broadcast=.*conflicts with broadcast="
    ):
        create_engine(
            f"{db}?plugin=rebalance&{_BUS_QUERY}",
            poolclass=_BusPool,
            broadcast="redis://127.0.0.1:6379/1",
        )


def test_bus_parameters_configure_the_real_pool(tmp_path, made, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "from-env")
    bus = f"sqlite:///{tmp_path}/bus.db"
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db?plugin=rebalance"
        f"&rebalance_broadcast={quote(bus, safe='')}&rebalance_min_recycle_interval=3"
    )
    made.append(engine)
    for pool in (engine.pool, engine.pool.recreate()):
        assert pool.config.broadcast == bus
        assert pool.config.min_recycle_interval == 3.0
        if pool is not engine.pool:
            pool.dispose()


# -- real PostgreSQL: four servers configured from the URL alone ---------------------------

_app_names = itertools.count()


def test_url_hosts_spread_connections_over_four_postgresql_servers(pg_cluster, pg_url):
    app = f"plugin-{next(_app_names)}"
    engine = create_engine(
        f"{pg_url}?plugin=rebalance&application_name={app}"
        f"&rebalance_hosts={','.join(pg_cluster.hosts)}&rebalance_pool_name=pg-plugin",
        pool_size=8,
        max_overflow=0,
    )
    conns = []
    try:
        assert type(engine.pool) is RebalancingQueuePool
        # application_name (not ours) still reaches psycopg; ours do not (psycopg would refuse).
        assert dict(engine.url.query) == {"application_name": app}
        conns = [engine.connect() for _ in range(8)]
        stats = engine.pool.stats()
        assert stats.pool_name == "pg-plugin"
        assert {k: h.open for k, h in stats.hosts.items()} == dict.fromkeys(pg_cluster.hosts, 2)
        # ... and the servers agree: two sessions of this engine on each of them.
        for server in pg_cluster.servers:
            admin = create_engine(server.url(), poolclass=NullPool)
            try:
                with admin.connect() as c:
                    n = c.execute(
                        text("select count(*) from pg_stat_activity where application_name = :a"),
                        {"a": app},
                    ).scalar()
            finally:
                admin.dispose()
            assert n == 2, server.address
    finally:
        for conn in conns:
            conn.close()
        engine.dispose()


# -- issue 11: typos in any case, hosts named by the parameter, huge numbers ----------------


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("REBALANCE_RECYCLE", "did you mean rebalance_recycle? parameter names are lower case"),
        ("Rebalance_Min_Size", "did you mean rebalance_min_size? parameter names are lower case"),
        ("rebalance-recycle", "did you mean rebalance_recycle? parameter names are lower case"),
        ("REBALANCE_RECYLCE", "did you mean rebalance_recycle?"),
        ("REBALANCE_COLOUR", "; known: rebalance_recycle"),
    ],
)
def test_a_parameter_in_another_case_is_an_error_not_ignored(db, key, hint):
    with pytest.raises(ConfigurationError) as info:
        create_engine(f"{db}?plugin=rebalance&{key}=60")
    message = str(info.value)
    assert message.startswith(f"unknown URL parameter {key} for plugin=rebalance")
    assert hint in message


@pytest.mark.parametrize("key", ["REBALANCE_BROADCAST_SECRET", "rebalance-broadcast-secret"])
def test_the_secret_in_any_spelling_is_refused_without_echoing_it(db, key):
    with pytest.raises(ConfigurationError, match=SECRET_ENV) as info:
        create_engine(f"{db}?plugin=rebalance&{key}=hunter2")
    assert "hunter2" not in str(info.value)


def test_other_query_parameters_still_reach_the_driver(db, made):
    engine = create_engine(f"{db}?plugin=rebalance&rebalance_recycle=60&timeout=7")
    made.append(engine)
    assert engine.url.query == {"timeout": "7"}  # only ours are taken out


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("rebalance_recycle=-0.5", r"^rebalance_recycle=-0\.5 \(URL.*pool_recycle must be a posi"),
        ("rebalance_recycle=1" + "0" * 400, r"^rebalance_recycle must be a finite number"),
        ("rebalance_min_size=1" + "0" * 400, r"^rebalance_min_size=1000.*\.\.\. \(URL.*min_size"),
        ("rebalance_min_size=1" + "0" * 5000, r"^rebalance_min_size is out of range: an integer"),
        ("rebalance_health_check_timeout=1e10", r"^rebalance_health_check_timeout=1e10 \(URL"),
        ("rebalance_pool_name=a%0Ab", r"^rebalance_pool_name=a\\nb \(URL.*must be printable"),
        ("rebalance_dns_nameservers=ns.example", r"^rebalance_dns_nameservers: DNS nameserver"),
    ],
)
def test_out_of_range_values_name_the_parameter(db, query, match):
    with pytest.raises(ConfigurationError, match=match):
        create_engine(f"{db}?plugin=rebalance&{query}")


@pytest.mark.parametrize(
    ("hosts", "match"),
    [
        ("db-a:5432,DB-A:5432", r"DB-A:5432 is listed twice \(as db-a:5432: the same host\)"),
        ("db-a%20b:5432", r"'db-a b:5432' is not a valid host: a host cannot contain spaces"),
        ("a" * 64 + ":5432", r"label 'a+' is longer than 63 characters"),
        ("db:99999", r"port of 'db:99999' is out of range"),
        ("[db]:5432", r"brackets are for IPv6"),
    ],
)
def test_bad_hosts_fail_at_create_engine_naming_the_parameter(pg_url, hosts, match):
    """A network dialect: hosts are DNS names or addresses, checked when the pool is made
    (the dialect tells the pool that these are not SQLite files)."""
    with pytest.raises(
        ConfigurationError, match=r"^rebalance_hosts=.* \(URL, plugin=rebalance\): "
    ):
        create_engine(f"{pg_url}?plugin=rebalance&rebalance_hosts={hosts}")
    with pytest.raises(ConfigurationError, match=match):
        create_engine(f"{pg_url}?plugin=rebalance&rebalance_hosts={hosts}")


def test_sqlite_hosts_stay_file_paths(tmp_path, made):
    a, b = tmp_path / "A.db", tmp_path / "a b.db"
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db?plugin=rebalance&rebalance_hosts={a},{quote(str(b))}"
    )
    made.append(engine)
    assert engine.pool.config.hosts == [str(a), str(b)]
