"""The Flask extension ``sqla_rebalance.contrib.flask.Rebalance``: real Flask apps with
Flask-SQLAlchemy, on the real PostgreSQL servers of ``pg_cluster`` (127.0.0.2-5) and a real
Redis bus; configuration checks and SQLite handling need no server.

Every bus test uses its own channel, so the only process listening on it is this one: its
pools are the app's, and ``app.test_cli_runner()`` plays the operator's shell.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import uuid
from collections import Counter

import pytest
from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool, QueuePool, StaticPool

from sqla_rebalance import (
    AsyncRebalancingQueuePool,
    ConfigurationError,
    InsecureBroadcastWarning,
    RebalanceError,
    RebalancingQueuePool,
)
from sqla_rebalance.bus import fleet_status, open_bus
from sqla_rebalance.bus.listener import process_id
from sqla_rebalance.contrib.flask import SETTINGS, InitOrderError, Rebalance
from sqla_rebalance.plugin import PARAMETERS, accepted_arguments
from sqla_rebalance.pool import SECRET_ENV

from .helpers import wait_for

SECRET = "flask-test-secret"
_counter = itertools.count()


@pytest.fixture
def unique():
    """A name no other test uses (pool names, table names)."""
    return f"flask_{next(_counter)}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def bus(redis_server):
    """The Redis bus on a channel of this test's own."""
    return f"{redis_server.url()}?channel=flask_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def no_env_secret(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)


@pytest.fixture
def apps(no_env_secret):
    """``make(config, with_db=True)`` -> (app, db, rebalance): Rebalance first, then
    Flask-SQLAlchemy, as documented. Every engine is disposed afterwards."""
    made = []

    def make(config, *, with_db=True):
        app = Flask(__name__)
        app.config.update(config)
        rebalance = Rebalance(app)
        db = None
        if with_db:
            db = SQLAlchemy()
            db.init_app(app)
        made.append((app, db))
        return app, db, rebalance

    yield make
    for app, db in made:
        if db is not None:
            with app.app_context():
                for engine in db.engines.values():
                    engine.dispose()


@pytest.fixture
def engines():
    made = []
    yield made
    for engine in made:
        engine.dispose()


def mine(pool):
    """This process's name on the bus, as its listener for ``pool`` reports it."""
    return pool.stats().bus.process


def listening(bus_url, pool_name):
    """This process's heartbeat on the bus lists ``pool_name``."""
    return any(p.is_this_process() and p.has_pool(pool_name) for p in fleet_status(bus_url))


def invoke(app, *args):
    return app.test_cli_runner().invoke(args=["rebalance", *args])


# --------------------------------------------------------------------------- configuration


def test_every_pool_argument_has_a_config_key():
    ours = {s.keyword for s in SETTINGS}
    pool_only = accepted_arguments(RebalancingQueuePool) - accepted_arguments(QueuePool)
    assert ours - {"pool_recycle"} == pool_only
    # ...and the names follow the plugin's URL parameters (rebalance_x -> SQLA_REBALANCE_X).
    keys = {s.key for s in SETTINGS}
    assert {f"SQLA_{p.name.upper()}" for p in PARAMETERS} <= keys
    assert "SQLA_REBALANCE_SECRET" in keys


def test_config_is_merged_without_touching_the_users_dicts(apps, tmp_path):
    shared_options = {"pool_size": 3, "max_overflow": 1}
    shared_binds = {"side": f"sqlite:///{tmp_path}/side.db"}
    config = {
        "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path}/main.db",
        "SQLALCHEMY_ENGINE_OPTIONS": shared_options,
        "SQLALCHEMY_BINDS": shared_binds,
        "SQLA_REBALANCE_RECYCLE": 600,
        "SQLA_REBALANCE_MIN_SIZE": 1,
    }
    app, db, _ = apps(config)
    # The module-level dicts another app may share are unchanged...
    assert shared_options == {"pool_size": 3, "max_overflow": 1}
    assert shared_binds == {"side": f"sqlite:///{tmp_path}/side.db"}
    # ...the app's config has the merged copies...
    assert app.config["SQLALCHEMY_ENGINE_OPTIONS"] == {
        "pool_size": 3,
        "max_overflow": 1,
        "poolclass": RebalancingQueuePool,
        "pool_recycle": 600,
        "min_size": 1,
    }
    # ...and the engines got them, the user's own pool_size included.
    with app.app_context():
        pool = db.engine.pool
        assert isinstance(pool, RebalancingQueuePool)
        assert (pool.size(), pool.config.recycle, pool.config.min_size) == (3, 600, 1)
        side = db.engines["side"].pool
        assert isinstance(side, RebalancingQueuePool)
        assert (side.pool_name, side.config.recycle, side.size()) == ("side", 600, 5)


def test_in_memory_sqlite_keeps_its_static_pool(apps, tmp_path):
    app, db, rebalance = apps(
        {
            "SQLALCHEMY_DATABASE_URI": "sqlite://",
            "SQLALCHEMY_BINDS": {"files": f"sqlite:///{tmp_path}/files.db"},
            "SQLA_REBALANCE_RECYCLE": 600,
        }
    )

    class Note(db.Model):
        id = db.Column(db.Integer, primary_key=True)
        body = db.Column(db.String(40))

    @app.post("/notes")
    def add_note():
        db.session.add(Note(body=request.get_json()["body"]))
        db.session.commit()
        return {"ok": True}

    @app.get("/notes")
    def notes():
        return {"notes": [n.body for n in db.session.execute(db.select(Note)).scalars()]}

    with app.app_context():
        # One shared in-memory database: our pool would give each connection its own.
        assert isinstance(db.engine.pool, StaticPool)
        assert isinstance(db.engines["files"].pool, RebalancingQueuePool)
        db.create_all()
    client = app.test_client()
    assert client.post("/notes", json={"body": "kept"}).status_code == 200
    assert client.get("/notes").get_json() == {"notes": ["kept"]}
    assert "poolclass" not in app.config["SQLALCHEMY_ENGINE_OPTIONS"]
    assert not rebalance.plans(app)[None].managed
    assert rebalance.pool_names(app) == ["files"]
    result = invoke(app, "status")
    assert result.exit_code == 0, result.output
    assert "bind default: not managed (StaticPool): SQLite in-memory database" in result.output
    assert "bind files: pool files:" in result.output


def test_bind_overrides_by_either_name_and_none_removes_an_inherited_value(apps, tmp_path):
    app, db, _ = apps(
        {
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path}/main.db",
            "SQLALCHEMY_BINDS": {
                "quiet": f"sqlite:///{tmp_path}/quiet.db",
                "tuned": f"sqlite:///{tmp_path}/tuned.db",
            },
            "SQLA_REBALANCE_RECYCLE": 600,
            "SQLA_REBALANCE_BROADCAST": f"sqlite:///{tmp_path}/bus.db",
            "SQLA_REBALANCE_SECRET": SECRET,
            "SQLA_REBALANCE_BINDS": {
                "quiet": {"broadcast": None, "recycle": None},
                "tuned": {"recycle_jitter": 0.4, "pool_recycle": 300},
            },
        }
    )
    with app.app_context():
        main, quiet, tuned = (db.engines[k].pool for k in (None, "quiet", "tuned"))
        # The default engine listens on the bus; "quiet" has no bus (so no secret either,
        # which the pool would refuse without one) and no recycle.
        assert main.config.broadcast is not None and main.listener is not None
        assert (quiet.config.broadcast, quiet.listener, quiet.config.recycle) == (None, None, -1)
        assert (tuned.config.recycle, tuned.config.recycle_jitter) == (300, 0.4)
        assert tuned.config.broadcast == f"sqlite:///{tmp_path}/bus.db"


def test_values_from_the_environment_are_parsed(apps, tmp_path, monkeypatch):
    files = [str(tmp_path / f"h{i}.db") for i in range(3)]
    monkeypatch.setenv("FLASK_SQLA_REBALANCE_RECYCLE", "600")
    monkeypatch.setenv("FLASK_SQLA_REBALANCE_JITTER", "0.5")
    monkeypatch.setenv("FLASK_SQLA_REBALANCE_HOSTS", f"{files[0]},{files[1]}|{files[2]}")
    monkeypatch.setenv("FLASK_SQLA_REBALANCE_HEALTH_CHECK_INTERVAL", "none")
    source = Flask(__name__)
    source.config.from_prefixed_env()  # JSON-decodes what it can: 600, 0.5; the rest is text
    config = {k: v for k, v in source.config.items() if k.startswith("SQLA_REBALANCE_")}
    assert config["SQLA_REBALANCE_HOSTS"] == f"{files[0]},{files[1]}|{files[2]}"
    app, db, _ = apps({**config, "SQLALCHEMY_DATABASE_URI": f"sqlite:///{files[0]}"})
    with app.app_context():
        config = db.engine.pool.config
    assert (config.recycle, config.recycle_jitter) == (600, 0.5)
    assert config.hosts == [files[0], files[1], [files[2]]]
    assert config.health_check_interval is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"SQLA_REBALANCE_RECYCLE": 60, "SQLA_REBALANCE_JITTER": 1.5},
            r"^SQLA_REBALANCE_JITTER=1\.5 \(default engine\): recycle_jitter must be in \[0, 1\)",
        ),
        ({"SQLA_REBALANCE_JITTER": 0.2}, r"^SQLA_REBALANCE_JITTER=0\.2 .*needs pool_recycle"),
        (
            {"SQLA_REBALANCE_MIN_SIZE": "many"},
            r"^SQLA_REBALANCE_MIN_SIZE must be an integer, got 'many'",
        ),
        (
            {"SQLA_REBALANCE_MIN_SIZE": 9, "SQLALCHEMY_ENGINE_OPTIONS": {"pool_size": 4}},
            r"^SQLA_REBALANCE_MIN_SIZE=9, SQLALCHEMY_ENGINE_OPTIONS\['pool_size'\]=4 .*larger",
        ),
        ({"SQLA_REBALANCE_MAX_IDLE": True}, r"^SQLA_REBALANCE_MAX_IDLE must be a number, got True"),
        (
            {"SQLA_REBALANCE_TARGET_ROLE": "leader"},
            r"^SQLA_REBALANCE_TARGET_ROLE='leader' .*must be one of any, primary",
        ),
        ({"SQLA_REBALANCE_HOSTS": 42}, r"^SQLA_REBALANCE_HOSTS must be a list"),
        (
            {"SQLA_REBALANCE_HOSTS": ["a:5432", ["b:5432", 7]]},
            r"^SQLA_REBALANCE_HOSTS: hosts entries must be",
        ),
        (
            {"SQLA_REBALANCE_DNS_NAMESERVERS": ["dns.example"]},
            r"^SQLA_REBALANCE_DNS_NAMESERVERS: .*not an IP address",
        ),
        (
            {"SQLA_REBALANCE_DNS_MIN_REFRESH": 10, "SQLA_REBALANCE_DNS_MAX_REFRESH": 5},
            r"SQLA_REBALANCE_DNS_MAX_REFRESH=5, SQLA_REBALANCE_DNS_MIN_REFRESH=10",
        ),
        (
            {"SQLA_REBALANCE_BROADCAST": "ftp://bus"},
            r"^SQLA_REBALANCE_BROADCAST: unknown bus scheme 'ftp'",
        ),
        (
            {"SQLA_REBALANCE_SECRET": "s"},
            r"^SQLA_REBALANCE_SECRET is set but SQLA_REBALANCE_BROADCAST is not",
        ),
        (
            {"SQLA_REBALANCE_BROADCAST": "redis://127.0.0.1:1/0", "SQLA_REBALANCE_SECRET": 12345},
            r"^SQLA_REBALANCE_SECRET must be a non-empty string or bytes$",
        ),
        (
            {"SQLA_REBALANCE_MIN_RECYCLE_INTERVAL": -1},
            r"^SQLA_REBALANCE_MIN_RECYCLE_INTERVAL=-1 .*must be >= 0",
        ),
        (
            {"SQLA_REBALANCE_RECYCLE": 0.5},
            r"^SQLA_REBALANCE_RECYCLE=0\.5: must be a whole number of seconds with Flask-SQLA",
        ),
        (
            {"SQLA_REBALANCE_RECYLCE": 60},
            r"^unknown config key SQLA_REBALANCE_RECYLCE \(did you mean SQLA_REBALANCE_RECYCLE\?\)",
        ),
        ({"SQLA_REBALANCE_BINDS": ["analytics"]}, r"^SQLA_REBALANCE_BINDS must be a dict"),
        (
            {
                "SQLA_REBALANCE_BINDS": {"side": {"colour": 1}},
                "SQLALCHEMY_BINDS": {"side": "sqlite://"},
            },
            r"^SQLA_REBALANCE_BINDS\['side'\]: unknown setting 'colour'",
        ),
        (
            {
                "SQLA_REBALANCE_BINDS": {"sied": {"min_size": 1}},
                "SQLALCHEMY_BINDS": {"side": "sqlite://"},
            },
            r"^SQLA_REBALANCE_BINDS has entries for 'sied', which SQLALCHEMY_BINDS does not define",
        ),
        (
            {
                "SQLA_REBALANCE_BINDS": {"side": {"jitter": 2}},
                "SQLALCHEMY_BINDS": {"side": "sqlite:////tmp/x.db"},
                "SQLA_REBALANCE_RECYCLE": 60,
            },
            r"^SQLA_REBALANCE_BINDS\['side'\]\['jitter'\]=2 \(bind 'side'\): recycle_jitter must",
        ),
    ],
)
def test_a_bad_setting_fails_at_init_naming_the_config_key(tmp_path, config, message):
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path}/app.db"
    app.config.update(config)
    with pytest.raises(ConfigurationError, match=message):
        Rebalance(app)
    assert "sqla_rebalance" not in app.extensions


def test_a_bad_host_port_is_caught_once_the_url_is_known(tmp_path, pg_url):
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=pg_url, SQLA_REBALANCE_HOSTS="db-a:5432,db-b:99999")
    with pytest.raises(
        ConfigurationError,
        match=r"^SQLA_REBALANCE_HOSTS \(default engine\): .*'db-b:99999' is out of range",
    ):
        Rebalance(app)


def test_per_database_keys_need_a_default_engine(tmp_path):
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_BINDS={"side": f"sqlite:///{tmp_path}/side.db"},
        SQLA_REBALANCE_HOSTS=["a:5432"],
    )
    with pytest.raises(
        ConfigurationError,
        match=r"SQLA_REBALANCE_HOSTS apply to the default engine, and there is none",
    ):
        Rebalance(app)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"SQLALCHEMY_ENGINE_OPTIONS": {"pool_recycle": 300}, "SQLA_REBALANCE_RECYCLE": 600},
            r"^SQLA_REBALANCE_RECYCLE=600 conflicts with "
            r"SQLALCHEMY_ENGINE_OPTIONS\['pool_recycle'\]=300 \(default engine\); set it in one",
        ),
        (
            {"SQLALCHEMY_ENGINE_OPTIONS": {"poolclass": NullPool}},
            r"^SQLALCHEMY_ENGINE_OPTIONS\['poolclass'\]=NullPool conflicts with Rebalance, "
            r"which sets poolclass=RebalancingQueuePool",
        ),
        (
            {
                "SQLALCHEMY_BINDS": {"side": {"url": "sqlite:////tmp/s.db", "min_size": 1}},
                "SQLA_REBALANCE_BINDS": {"side": {"min_size": 2}},
            },
            r"^SQLA_REBALANCE_BINDS\['side'\]\['min_size'\]=2 conflicts with "
            r"SQLALCHEMY_BINDS\['side'\]\['min_size'\]=1 \(bind 'side'\)",
        ),
        (
            {
                "SQLALCHEMY_BINDS": {"side": {"url": "sqlite:////tmp/s.db", "min_size": 1}},
                "SQLA_REBALANCE_MIN_SIZE": 3,
            },
            r"^SQLA_REBALANCE_MIN_SIZE=3 conflicts with "
            r"SQLALCHEMY_BINDS\['side'\]\['min_size'\]=1 \(bind 'side'\)",
        ),
    ],
)
def test_a_conflicting_engine_option_is_an_error_naming_both(tmp_path, config, message):
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path}/app.db"
    app.config.update(config)
    with pytest.raises(ConfigurationError, match=message):
        Rebalance(app)


def test_equal_or_own_engine_options_are_kept(apps, tmp_path):
    app, db, _ = apps(
        {
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path}/app.db",
            # Equal to the setting (as text, like an .ini file): not a conflict.
            "SQLALCHEMY_ENGINE_OPTIONS": {"pool_recycle": "600"},
            "SQLALCHEMY_BINDS": {"side": {"url": f"sqlite:///{tmp_path}/s.db", "pool_name": "x"}},
            "SQLA_REBALANCE_RECYCLE": 600,
        }
    )
    with app.app_context():
        assert db.engine.pool.config.recycle == 600
        # The bind's own pool_name wins over the default (its bind key).
        assert db.engines["side"].pool.pool_name == "x"


def test_initialising_after_flask_sqlalchemy_is_refused(tmp_path):
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/app.db", SQLA_REBALANCE_RECYCLE=600
    )
    db = SQLAlchemy(app)
    try:
        with pytest.raises(InitOrderError, match=r"before Flask-SQLAlchemy") as caught:
            Rebalance(app)
        assert "Call rebalance.init_app(app) (or Rebalance(app)) first" in str(caught.value)
        assert isinstance(caught.value, RuntimeError)
        assert isinstance(caught.value, RebalanceError)
        with app.app_context():
            assert not isinstance(db.engine.pool, RebalancingQueuePool)
    finally:
        with app.app_context():
            db.engine.dispose()


def test_init_app_twice_is_refused(apps, tmp_path):
    app, _, rebalance = apps(
        {"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path}/app.db"}, with_db=False
    )
    with pytest.raises(RuntimeError, match="already initialised"):
        rebalance.init_app(app)
    with pytest.raises(RuntimeError, match="not initialised"):
        Rebalance().engine_options(Flask(__name__))


def test_commands_need_a_bus_but_status_shows_the_local_pools(apps, tmp_path):
    app, _, _ = apps(
        {"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path}/app.db", "SQLA_REBALANCE_MIN_SIZE": 1}
    )
    for action in ("recycle", "rebalance", "refresh", "drain"):
        result = invoke(app, action)
        assert result.exit_code == 2, (action, result.output)
        assert "no bus configured: set SQLA_REBALANCE_BROADCAST" in result.stderr
    result = invoke(app, "status", "--json")
    assert result.exit_code == 0, result.output
    (proc,) = json.loads(result.stdout)
    assert (proc["process"], proc["bus"]) == (process_id(), None)
    (pool,) = proc["pools"]
    assert (pool["bind"], pool["pool"], pool["managed"], pool["min_size"]) == (
        None,
        "default",
        True,
        1,
    )


# --------------------------------------------------------------------------- PostgreSQL


def test_config_reaches_the_pools_of_every_bind_and_requests_work(apps, pg_cluster, unique):
    main, analytics, audit = pg_cluster.servers[:3]
    app, db, rebalance = apps(
        {
            "SQLALCHEMY_DATABASE_URI": main.url(),
            "SQLALCHEMY_ENGINE_OPTIONS": {"pool_size": 6},
            "SQLALCHEMY_BINDS": {
                "analytics": analytics.url(),
                "audit": {"url": audit.url(), "pool_size": 3},
            },
            "SQLA_REBALANCE_RECYCLE": 600,
            "SQLA_REBALANCE_POOL_NAME": unique,
            "SQLA_REBALANCE_HOSTS": [main.address, pg_cluster.servers[3].address],
            "SQLA_REBALANCE_TARGET_ROLE": "primary",
            "SQLA_REBALANCE_MIN_RECYCLE_INTERVAL": 0,
            "SQLA_REBALANCE_BINDS": {"analytics": {"jitter": 0.5, "min_size": 1}},
        }
    )

    class Item(db.Model):
        __tablename__ = f"{unique}_item"
        id = db.Column(db.Integer, primary_key=True)
        name = db.Column(db.String(40), nullable=False)

    class Event(db.Model):
        __tablename__ = f"{unique}_event"
        __bind_key__ = "analytics"
        id = db.Column(db.Integer, primary_key=True)
        kind = db.Column(db.String(40), nullable=False)

    @app.post("/items")
    def add_item():
        db.session.add(Item(name=request.get_json()["name"]))
        db.session.add(Event(kind="item_added"))
        db.session.commit()
        return {"ok": True}

    @app.get("/items")
    def items():
        return {
            "items": [
                i.name for i in db.session.execute(db.select(Item).order_by(Item.id)).scalars()
            ],
            "events": db.session.execute(db.select(db.func.count(Event.id))).scalar(),
            "analytics_server": db.session.execute(
                text("select host(inet_server_addr())"),
                bind_arguments={"bind": db.engines["analytics"]},
            ).scalar(),
        }

    with app.app_context():
        default, side, audit_pool = (db.engines[k].pool for k in (None, "analytics", "audit"))
        db.create_all()
    try:
        assert all(isinstance(p, RebalancingQueuePool) for p in (default, side, audit_pool))
        # Every setting reaches the default engine...
        c = default.config
        assert (c.pool_name, c.recycle, c.recycle_jitter, c.target_role) == (
            unique,
            600,
            0.2,
            "primary",
        )
        assert (c.pool_size, c.min_recycle_interval) == (6, 0)
        assert c.hosts == [main.address, pg_cluster.servers[3].address]
        # ...binds inherit the general ones, not the per-database ones (hosts, role, name)...
        c = side.config
        assert (c.pool_name, c.recycle, c.recycle_jitter, c.min_size) == ("analytics", 600, 0.5, 1)
        assert (c.hosts, c.target_role, c.min_recycle_interval) == (None, "any", 0)
        # ...and a bind's own engine options stay.
        assert (audit_pool.pool_name, audit_pool.size(), audit_pool.config.recycle) == (
            "audit",
            3,
            600,
        )
        assert rebalance.pool_names(app) == sorted(["analytics", "audit", unique])

        client = app.test_client()
        for name in ("a", "b"):
            assert client.post("/items", json={"name": name}).status_code == 200
        body = client.get("/items").get_json()
        assert body == {"items": ["a", "b"], "events": 2, "analytics_server": analytics.host}
        assert default.stats().connects >= 1 and side.stats().connects >= 1
    finally:
        with app.app_context():
            db.drop_all()


def test_hosts_spread_request_connections_over_the_four_servers(apps, pg_cluster, pg_url):
    n = 8
    app, db, _ = apps(
        {
            "SQLALCHEMY_DATABASE_URI": pg_url,
            "SQLALCHEMY_ENGINE_OPTIONS": {"pool_size": n, "max_overflow": 0},
            "SQLA_REBALANCE_HOSTS": ",".join(pg_cluster.hosts),
        }
    )
    together = threading.Barrier(n)

    @app.get("/server")
    def server():
        where = db.session.execute(
            text("select host(inet_server_addr()) || ':' || current_setting('port')")
        ).scalar()
        # Hold the connection until all n requests have one: n connections at once.
        together.wait(timeout=30)
        return {"server": where}

    answers: list[str] = []
    errors: list[BaseException] = []

    def get():
        try:
            response = app.test_client().get("/server")
            answers.append(response.get_json()["server"])
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=get) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # The servers' own answers: two connections on each of the four.
    assert Counter(answers) == dict.fromkeys(pg_cluster.hosts, n // 4)
    with app.app_context():
        per_host = {k: h.open for k, h in db.engine.pool.stats().hosts.items()}
    assert per_host == dict.fromkeys(pg_cluster.hosts, n // 4)


def test_engine_options_without_flask_sqlalchemy(apps, engines, pg_cluster, unique):
    hosts = pg_cluster.hosts
    app, _, rebalance = apps(
        {
            "SQLA_REBALANCE_RECYCLE": 600,
            "SQLA_REBALANCE_POOL_NAME": unique,
            "SQLA_REBALANCE_HOSTS": hosts[:2],
            "SQLA_REBALANCE_BINDS": {"reports": {"hosts": [hosts[2]], "min_size": 2}},
        },
        with_db=False,
    )
    options = rebalance.engine_options(app)
    assert options == {
        "poolclass": RebalancingQueuePool,
        "pool_recycle": 600,
        "pool_name": unique,
        "hosts": hosts[:2],
    }
    assert rebalance.engine_options(app, is_async=True)["poolclass"] is AsyncRebalancingQueuePool
    engine = create_engine(pg_cluster.servers[0].url(), pool_size=2, **options)
    engines.append(rebalance.register_engine(app, engine))
    reports = create_engine(pg_cluster.servers[2].url(), **rebalance.engine_options(app, "reports"))
    engines.append(rebalance.register_engine(app, reports, "reports"))
    with engine.connect() as conn:
        assert conn.execute(text("select host(inet_server_addr())")).scalar() in {
            h.split(":")[0] for h in hosts[:2]
        }
    c = reports.pool.config
    assert (c.pool_name, c.recycle, c.min_size, c.hosts) == ("reports", 600, 2, [hosts[2]])
    assert rebalance.pool_names(app) == sorted([unique, "reports"])
    wait_for(lambda: reports.pool.stats().idle == 2)

    result = invoke(app, "status", "--json")
    assert result.exit_code == 0, result.output
    (proc,) = json.loads(result.stdout)
    pools = {p["bind"]: p for p in proc["pools"]}
    assert pools[None]["pool"] == unique and pools[None]["connects"] >= 1
    assert pools["reports"]["hosts"][hosts[2]]["open"] == 2


# --------------------------------------------------------------------------- commands on a bus


def bus_app(apps, pg_url, bus, name, **extra):
    config = {
        "SQLALCHEMY_DATABASE_URI": pg_url,
        "SQLA_REBALANCE_POOL_NAME": name,
        "SQLA_REBALANCE_MIN_SIZE": 2,
        "SQLA_REBALANCE_BROADCAST": bus,
        "SQLA_REBALANCE_SECRET": SECRET,
        "SQLA_REBALANCE_MIN_RECYCLE_INTERVAL": 0,
        **extra,
    }
    return apps({k: v for k, v in config.items() if v is not None})


def test_cli_recycle_wait_reaches_the_apps_pool(apps, pg_url, bus, unique):
    app, db, _ = bus_app(apps, pg_url, bus, unique)
    with app.app_context():
        pool = db.engine.pool
    wait_for(lambda: pool.stats().idle == 2 and listening(bus, unique))
    result = invoke(app, "recycle", "--wait", "20")
    assert result.exit_code == 0, result.output
    assert f"recycle pool={unique} on redis://" in result.stdout
    assert f"pool {unique}: applied by 1 process(es)" in result.stdout
    wait_for(lambda: pool.stats().retirements["signal"] == 2)
    stats = pool.stats()
    assert stats.bus.commands_applied == 1
    assert stats.bus.messages_rejected == 0  # signed with the configured secret
    assert stats.checkouts_waited == 0  # replaced in the background


def test_cli_targets_every_pool_of_the_app_or_the_one_named(apps, pg_cluster, bus, unique):
    app, db, _ = bus_app(
        apps,
        pg_cluster.servers[0].url(),
        bus,
        unique,
        SQLALCHEMY_BINDS={"analytics": pg_cluster.servers[1].url()},
        SQLA_REBALANCE_MIN_SIZE=1,
    )
    with app.app_context():
        default, side = db.engines[None].pool, db.engines["analytics"].pool
    wait_for(lambda: default.stats().idle == 1 and side.stats().idle == 1)
    wait_for(lambda: listening(bus, unique) and listening(bus, "analytics"))

    result = invoke(app, "recycle", "--pool", "analytics", "--wait", "20", "--json")
    assert result.exit_code == 0, result.output
    (sent,) = json.loads(result.stdout)
    assert (sent["pool"], sent["applied"], sent["pending"]) == ("analytics", [mine(side)], [])
    wait_for(lambda: side.stats().retirements["signal"] == 1)
    # The listener has processed the command for both pools: the default one was not matched.
    assert default.stats().bus.generation_applied >= sent["generation"]
    assert default.stats().retirements["signal"] == 0

    result = invoke(app, "recycle", "--wait", "20", "--json")
    assert result.exit_code == 0, result.output
    sent = json.loads(result.stdout)
    assert sorted(s["pool"] for s in sent) == sorted([unique, "analytics"])
    assert all(s["applied"] == [mine(side)] for s in sent)
    wait_for(lambda: default.stats().retirements["signal"] == 1)
    wait_for(lambda: side.stats().retirements["signal"] == 2)


def heartbeat_of(bus_url, pool_name):
    """This process's latest published figures for ``pool_name`` (None if none yet)."""
    for proc in fleet_status(bus_url):
        for pool in proc.pools if proc.is_this_process() else ():
            if pool["pool"] == pool_name:
                return pool
    return None


def test_cli_status_json_lists_the_process(apps, pg_url, bus, unique):
    app, _, _ = bus_app(apps, pg_url, bus, unique)
    # Heartbeats are written every few seconds: wait for one taken after the prefill.
    wait_for(lambda: (heartbeat_of(bus, unique) or {}).get("idle") == 2, timeout=20)
    result = invoke(app, "status", "--json")
    assert result.exit_code == 0, result.output
    procs = json.loads(result.stdout)
    (ours,) = [p for p in procs if p["pid"] == os.getpid()]
    assert ours["this_process"] is True and ours["bus"].startswith("redis://")
    (entry,) = [p for p in ours["pools"] if p["pool"] == unique]
    assert (entry["open"], entry["idle"]) == (2, 2)

    text_result = invoke(app, "status")
    assert text_result.exit_code == 0, text_result.output
    assert f"{ours['process']} (this process)" in text_result.stdout
    assert f"pool {unique}: open 2 (idle 2, in use 0)" in text_result.stdout
    # Another app's pool name matches nothing of ours.
    other = invoke(app, "status", "--pool", "no-such-pool")
    assert "no live process with this app's pools" in other.stdout


def test_cli_signs_with_the_env_secret_and_refuses_to_send_unsigned_unasked(
    apps, pg_url, bus, unique, monkeypatch
):
    with pytest.warns(InsecureBroadcastWarning):
        app, db, _ = bus_app(apps, pg_url, bus, unique, SQLA_REBALANCE_SECRET=None)
    with app.app_context():
        pool = db.engine.pool
    wait_for(lambda: pool.stats().idle == 2 and listening(bus, unique))
    refused = invoke(app, "recycle")
    assert refused.exit_code == 2
    assert "--unsigned" in refused.stderr and "SQLA_REBALANCE_SECRET" in refused.stderr
    result = invoke(app, "recycle", "--unsigned", "--wait", "20")
    assert result.exit_code == 0, result.output
    wait_for(lambda: pool.stats().retirements["signal"] == 2)

    # A secret in the environment: the pool reads it, and so do the commands. (Another
    # channel: one process has one heartbeat per channel, and this is another listener.)
    monkeypatch.setenv(SECRET_ENV, "from-the-environment")
    name, bus = f"{unique}_env", f"{bus}_env"
    app, db, _ = bus_app(apps, pg_url, bus, name, SQLA_REBALANCE_SECRET=None)
    with app.app_context():
        pool = db.engine.pool
    wait_for(lambda: pool.stats().idle == 2 and listening(bus, name))
    result = invoke(app, "drain", "--wait", "20")
    assert result.exit_code == 0, result.output
    assert f"pool {name}: applied by 1 process(es)" in result.stdout
    wait_for(lambda: pool.stats().open == 0)
    assert pool.stats().bus.messages_rejected == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["recycle", "--wait", "nan"], "--wait"),
        (["recycle", "--wait", "inf"], "--wait"),
        # click takes a "-1" after an option whose value is optional for another option
        (["recycle", "--wait", "-1"], "No such option '-1'"),
        (["recycle", "--wait", "1e400"], "--wait"),
        (["recycle", "--wait", "86401"], "--wait"),
        (["recycle", "--wait", "soon"], "--wait"),
        (["drain", "--wait", "nan"], "--wait"),
        (["rebalance", "--wait", "-inf"], "No such option"),
        (["recycle", "--spread", "nan"], "--spread"),
        (["recycle", "--spread", "inf"], "--spread"),
        (["recycle", "--spread", "-1"], "--spread"),
        (["recycle", "--wait", "1", "--spread", "nan"], "--spread"),
        (["recycle", "--rate", "nan"], "--rate"),
        (["recycle", "--rate", "0"], "--rate"),
        (["recycle", "--rate", "5", "--spread", "2"], "--rate and --spread exclude each other"),
    ],
)
def test_bad_numbers_are_usage_errors_and_publish_nothing(apps, tmp_path, args, message):
    """``--wait inf`` used to publish, then fail with a traceback in ``wait_for``; ``nan``
    published and looked once. Now any value that is not a finite number of seconds
    from 0 to 86400 is click's usage error (exit 2), before anything is sent."""
    bus = f"sqlite:///{tmp_path}/bus.db"
    app, _, _ = apps(
        {"SQLA_REBALANCE_BROADCAST": bus, "SQLA_REBALANCE_SECRET": SECRET}, with_db=False
    )
    result = invoke(app, *args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # not a traceback
    if message in ("--wait", "--spread", "--rate"):
        assert f"Invalid value for '{message}': {message} must be" in result.stderr
    else:
        assert message in result.stderr
    assert open_bus(bus).generation() == 0  # nothing was published


# --------------------------------------------------------------------------- issue 11


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"SQLA_REBALANCE": {"RECYCLE": 600, "MIN_SIZE": 2, "DATABASES": {}}},
            r"^SQLA_REBALANCE is not read by the Flask extension: set one SQLA_REBALANCE_\* key "
            r"per setting, .*\(here: SQLA_REBALANCE_RECYCLE=600, SQLA_REBALANCE_MIN_SIZE=2, "
            r"SQLA_REBALANCE_BINDS=\{\.\.\.\}\)",
        ),
        ({"SQLA_REBALANCE": 600}, r"^SQLA_REBALANCE is not read by the Flask extension"),
        (
            {"SQLA_REBALANCE": {"secret": "hunter2"}},
            r"\(here: SQLA_REBALANCE_SECRET=<secret>\)",
        ),
        (
            {"sqla_rebalance_recycle": 60},
            r"^unknown config key sqla_rebalance_recycle \(did you mean SQLA_REBALANCE_RECYCLE\? "
            r"config keys are upper case\)",
        ),
        (
            {"SQLA_REBALANCE_Recycle": 60},
            r"did you mean SQLA_REBALANCE_RECYCLE\? config keys are upper case",
        ),
        ({"SQLA_REBALANCERECYCLE": 60}, r"^unknown config key SQLA_REBALANCERECYCLE"),
        ({"SQLA_REBALANCE_RECYCLE": 10**400}, r"^SQLA_REBALANCE_RECYCLE=an integer of about 401"),
        (
            {"SQLA_REBALANCE_MIN_SIZE": "1" + "0" * 5000},
            r"^SQLA_REBALANCE_MIN_SIZE is out of range: an integer of 5001 digits",
        ),
        ({"SQLA_REBALANCE_RECYCLE": -2}, r"^SQLA_REBALANCE_RECYCLE=-2 .*must be a positive"),
        (
            {"SQLA_REBALANCE_HEALTH_CHECK_INTERVAL": 1e11},
            r"^SQLA_REBALANCE_HEALTH_CHECK_INTERVAL=100000000000\.0 .*threading\.TIMEOUT_MAX",
        ),
        (
            {"SQLALCHEMY_ENGINE_OPTIONS": {"pool_timeout": 1e10}},
            r"^SQLALCHEMY_ENGINE_OPTIONS\['pool_timeout'\]=10000000000\.0 .*TIMEOUT_MAX",
        ),
        (
            {"SQLA_REBALANCE_POOL_NAME": "a\nb"},
            r"^SQLA_REBALANCE_POOL_NAME='a\\nb' .*must be printable",
        ),
    ],
)
def test_misplaced_or_out_of_range_settings_fail_at_init(tmp_path, config, message):
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path}/app.db"
    app.config.update(config)
    with pytest.raises(ConfigurationError, match=message) as info:
        Rebalance(app)
    assert "hunter2" not in str(info.value)
    assert "sqla_rebalance" not in app.extensions


def test_infinite_engine_options_do_not_crash_the_check(tmp_path):
    # Flask-SQLAlchemy passes them through int(): create_engine reports those itself.
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/app.db",
        SQLALCHEMY_ENGINE_OPTIONS={"pool_recycle": float("inf"), "pool_size": 10**400},
        SQLA_REBALANCE_RECYCLE=600,
    )
    with pytest.raises(ConfigurationError, match=r"conflicts with SQLALCHEMY_ENGINE_OPTIONS"):
        Rebalance(app)


def test_pool_timeout_none_and_an_irrelevant_max_overflow_are_accepted(apps, tmp_path):
    app, db, _ = apps(
        {
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path}/app.db",
            "SQLALCHEMY_ENGINE_OPTIONS": {"pool_timeout": None, "pool_size": 0, "max_overflow": -7},
            "SQLA_REBALANCE_RECYCLE": 600,
        }
    )
    with app.app_context():
        config = db.engine.pool.config
    assert (config.timeout, config.pool_size, config.max_overflow) == (None, 0, -1)


@pytest.mark.parametrize(
    ("hosts", "message"),
    [
        (["db-a:5432", "DB-A:5432"], r"DB-A:5432 is listed twice \(as db-a:5432: the same host\)"),
        (["db a:5432"], r"'db a:5432' is not a valid host: a host cannot contain spaces"),
        ("db-a:5432,db-b\n:5432", r"is not a valid host: a host cannot contain spaces"),
        (["x" * 64 + ".example"], r"is longer than 63 characters"),
        (["a." * 127 + "b"], r"a DNS name has at most 253 characters"),
    ],
)
def test_bad_host_names_fail_at_init_once_the_url_is_known(pg_url, hosts, message):
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=pg_url, SQLA_REBALANCE_HOSTS=hosts)
    with pytest.raises(ConfigurationError, match=r"^SQLA_REBALANCE_HOSTS \(default engine\): "):
        Rebalance(app)
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=pg_url, SQLA_REBALANCE_HOSTS=hosts)
    with pytest.raises(ConfigurationError, match=message):
        Rebalance(app)
