"""The parameter table (``sqla_rebalance.parameters``) against the pool and every integration.

Each setting is given alone, with a value that is not its default, through
``create_engine`` keywords, ``recreate()``, the URL plugin and the Django
settings: it must reach the pool's ``config`` unchanged. A setting added to
the pool but not to the table (or the other way round) fails here.
"""

from __future__ import annotations

import enum
import inspect
import math
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine

from sqla_rebalance import AsyncRebalancingQueuePool, ConfigurationError, RebalancingQueuePool
from sqla_rebalance.config import PoolConfig
from sqla_rebalance.parameters import (
    PARAMETERS,
    Parameter,
    build_arguments,
    signature_defaults,
)
from sqla_rebalance.validation import MAX_COUNT, MAX_SECONDS

#: A value that is not the default, for each kind of setting, and the same as URL text.
SAMPLES: dict[str, tuple[Any, str]] = {
    "pool_size": (7, "7"),
    "max_overflow": (3, "3"),
    "timeout": (12.5, "12.5"),
    "use_lifo": (True, "true"),
    "pre_ping": (True, "true"),
    "recycle": (600.0, "600"),
    "recycle_jitter": (0.3, "0.3"),
    "min_size": (2, "2"),
    "max_idle": (120.0, "120"),
    "pool_name": ("orders", "orders"),
    "hosts": (None, ""),  # file paths, made per test (SQLite "hosts")
    "target_role": ("primary", "primary"),
    "dns_nameservers": (["127.0.0.1:5353"], "127.0.0.1:5353"),
    "dns_min_refresh": (2.5, "2.5"),
    "dns_max_refresh": (30.0, "30"),
    "health_check_interval": (None, "none"),
    "health_check_timeout": (0.5, "0.5"),
    "connect_deadline": (2.0, "2"),
    "unhealthy_threshold": (5, "5"),
    "rebalance_spread": (4.0, "4"),
    "broadcast": (None, ""),  # a SQLite bus file, made per test
    "broadcast_secret": ("s3cret", ""),
    "min_recycle_interval": (1.5, "1.5"),
}


#: Settings that mean something only with another one.
NEEDS: dict[str, dict[str, Any]] = {"recycle_jitter": {"pool_recycle": 600}}


@pytest.fixture(autouse=True)
def _secret(monkeypatch):
    monkeypatch.setenv("SQLA_REBALANCE_SECRET", "test-secret")  # no warning for the bus


@pytest.fixture
def sample(tmp_path):
    def sample(param: Parameter) -> tuple[Any, str]:
        if param.argument == "hosts":
            files = [str(tmp_path / "a.db"), str(tmp_path / "b.db")]
            return files, ",".join(files)
        if param.argument == "broadcast":
            url = f"sqlite:///{tmp_path}/bus.db"
            return url, url
        return SAMPLES[param.argument]

    return sample


def _config_value(engine: Any, param: Parameter) -> Any:
    value = getattr(engine.pool.config, param.build)
    return list(value) if isinstance(value, tuple) else value


def test_the_table_and_the_pool_signature_agree():
    """Same arguments, same defaults: SQLAlchemy reads the signature, everything else the table."""
    signature = inspect.signature(RebalancingQueuePool.__init__).parameters
    spelt = [
        name
        for name, p in signature.items()
        if name not in ("self", "creator") and p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    assert sorted(spelt) == sorted(p.argument for p in PARAMETERS if p.in_signature)
    defaults = signature_defaults(RebalancingQueuePool)  # Pool's own for recycle, pre_ping
    differ = {p.argument: (p.default, defaults[p.argument]) for p in PARAMETERS}
    assert {k: v for k, v in differ.items() if v[0] != v[1] or type(v[0]) is not type(v[1])} == {}
    assert set(SAMPLES) == {p.argument for p in PARAMETERS}


def test_the_pool_docstring_is_the_tables():
    documented = inspect.getdoc(RebalancingQueuePool) or ""
    flat = " ".join(documented.split())
    for p in PARAMETERS:
        if p.sqlalchemy:
            assert not p.doc and f":param {p.argument}:" not in documented, p.argument
        else:
            assert f":param {p.argument}: {p.doc}" in flat, p.argument
    assert inspect.getdoc(AsyncRebalancingQueuePool)  # its own, short


def test_the_table_and_pool_config_agree():
    fields = set(PoolConfig.__dataclass_fields__)
    assert {p.build for p in PARAMETERS if p.build} <= fields
    assert {p.stored for p in PARAMETERS if p.stored} <= fields
    checked = [p.argument for p in PARAMETERS if p.build and p.check is None]
    assert checked == ["hosts", "dns_nameservers", "broadcast"]  # checked where used
    with pytest.raises(TypeError, match="recycel"):
        PoolConfig.build(recycel=600)


def test_every_default_is_valid_and_left_out_means_default():
    """PoolConfig.build with nothing given is the pool's default configuration; so is
    each of this package's settings given as None (what a settings file or a wrapper
    passing every argument gives), unless None means something there."""
    default = PoolConfig.build()
    assert default == PoolConfig.build(**build_arguments(signature_defaults(RebalancingQueuePool)))
    assert (default.pool_size, default.max_overflow, default.timeout) == (5, 10, 30.0)
    assert (default.recycle, default.recycle_jitter, default.pool_name) == (-1, 0.0, "default")
    assert (default.target_role, default.dns_max_refresh, default.unhealthy_threshold) == (
        "any",
        60.0,
        3,
    )
    for p in PARAMETERS:
        if not p.build or p.sqlalchemy:
            continue
        given_none = PoolConfig.build(**{p.build: None})
        if p.none_is_value:
            assert getattr(given_none, p.build) is None, p.argument
        else:
            assert given_none == default, p.argument


def test_validators_see_the_settings_checked_before_them():
    """Table order is check order: a relation is checked by the later setting."""
    with pytest.raises(
        ConfigurationError, match=r"^min_size \(6\) cannot be larger than pool_size"
    ):
        PoolConfig.build(pool_size=5, min_size=6)
    with pytest.raises(ConfigurationError, match=r"^dns_max_refresh \(2\) must be >= dns_min"):
        PoolConfig.build(dns_min_refresh=3, dns_max_refresh=2)
    assert PoolConfig.build(dns_min_refresh=90).dns_max_refresh == 90  # default follows
    assert PoolConfig.build(pool_size=0, max_overflow=-7).max_overflow == -1  # QueuePool's
    assert PoolConfig.build(recycle=100).recycle_jitter == 0.2
    with pytest.raises(ConfigurationError, match=r"^recycle_jitter needs pool_recycle"):
        PoolConfig.build(recycle_jitter=0.1)


def test_the_pool_hands_every_checked_argument_to_pool_config(monkeypatch, tmp_path):
    """The pool's constructor passes its arguments to PoolConfig.build from the table,
    not from a list of its own: every ``build`` name arrives, with the value given."""
    seen: dict[str, Any] = {}
    real = PoolConfig.build.__func__  # type: ignore[attr-defined]

    def spy(cls: type[PoolConfig], **kw: Any) -> PoolConfig:
        seen.update(kw)
        return real(cls, **kw)

    monkeypatch.setattr(PoolConfig, "build", classmethod(spy))
    engine = create_engine(
        f"sqlite:///{tmp_path}/t.db",
        poolclass=RebalancingQueuePool,
        pool_size=7,
        pool_recycle=600,
        recycle_jitter=0.3,
        min_recycle_interval=1.5,
    )
    engine.dispose()
    assert set(seen) == {p.build for p in PARAMETERS if p.build}
    assert (seen["pool_size"], seen["recycle"], seen["recycle_jitter"]) == (7, 600, 0.3)
    assert seen["min_recycle_interval"] == 1.5


@pytest.mark.parametrize("param", [p for p in PARAMETERS if p.build], ids=lambda p: p.argument)
def test_each_setting_reaches_the_pool_and_survives_recreate(param, sample, tmp_path):
    value, _ = sample(param)
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        **{param.create_engine_keyword: value},
        **NEEDS.get(param.argument, {}),
    )
    try:
        assert _config_value(engine, param) == value
        before = engine.pool.config
        engine.dispose()  # recreate()
        assert engine.pool.config == before
    finally:
        engine.dispose()


@pytest.mark.parametrize("param", [p for p in PARAMETERS if p.url], ids=lambda p: p.url_name)
def test_each_url_parameter_reaches_the_pool(param, sample, tmp_path):
    value, text = sample(param)
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db?plugin=rebalance&{param.url_name}={quote(text, safe='')}",
        **NEEDS.get(param.argument, {}),
    )
    try:
        assert isinstance(engine.pool, RebalancingQueuePool)
        assert _config_value(engine, param) == value
    finally:
        engine.dispose()


@pytest.mark.parametrize("param", [p for p in PARAMETERS if p.django], ids=lambda p: p.django)
def test_each_django_key_becomes_its_create_engine_argument(param, sample):
    pytest.importorskip("django")
    from sqla_rebalance.contrib.django import conf

    value, _ = sample(param)
    if param.argument == "hosts":  # PostgreSQL hosts, not SQLite files
        value = ["db-a.test:5432", ["dr.test:5432"]]
    databases = {"default": {"ENGINE": conf.POSTGRESQL_ENGINE, "OPTIONS": {}}}
    raw = {param.django: value}
    if param.argument == "broadcast_secret":
        raw["BROADCAST"] = "sqlite:///tmp/unused-bus.db"
    kw = conf.build(raw, databases).for_alias("default").engine_kwargs(False)
    assert kw[param.create_engine_keyword] == value


@pytest.mark.parametrize("param", [p for p in PARAMETERS if p.flask], ids=lambda p: p.flask)
def test_each_flask_key_becomes_its_create_engine_argument_and_reaches_the_pool(
    param, sample, tmp_path
):
    pytest.importorskip("flask")
    from flask import Flask

    from sqla_rebalance.contrib.flask import Rebalance

    value, _ = sample(param)
    app = Flask(__name__)
    app.config[f"SQLA_REBALANCE_{param.flask.upper()}"] = value
    if param.argument == "recycle_jitter":
        app.config["SQLA_REBALANCE_RECYCLE"] = 600
    if param.argument == "broadcast_secret":
        app.config["SQLA_REBALANCE_BROADCAST"] = f"sqlite:///{tmp_path}/bus.db"
    options = Rebalance(app).engine_options(app)
    assert options[param.create_engine_keyword] == value
    engine = create_engine(f"sqlite:///{tmp_path}/app.db", **options)
    try:
        if param.build:
            assert _config_value(engine, param) == value
    finally:
        engine.dispose()


#: One case per message of the validators, with the exact text users see (and
#: docs/configuration.md quotes): a refactor of the checks must not change a word.
T = f"{MAX_SECONDS:.0f}"
MESSAGES: list[tuple[dict[str, Any], str]] = [
    ({"pool_size": "5"}, "pool_size must be an integer, got '5'"),
    ({"pool_size": -1}, f"pool_size must be >= 0 and <= {MAX_COUNT} (sys.maxsize), got -1"),
    ({"max_overflow": 1.5}, "max_overflow must be an integer, got 1.5"),
    (
        {"max_overflow": -2},
        f"max_overflow must be >= 0, or -1 for no limit (and <= {MAX_COUNT}, sys.maxsize), got -2",
    ),
    ({"timeout": True}, "pool_timeout must be a number, got True"),
    (
        {"timeout": -1},
        f"pool_timeout must be >= 0 seconds and <= {T} (threading.TIMEOUT_MAX, the longest "
        "wait Python accepts), or None to wait without a limit, got -1",
    ),
    ({"recycle": math.nan}, "pool_recycle must be a finite number, got nan"),
    (
        {"recycle": -0.5},
        f"pool_recycle must be a positive number of seconds (<= {T}, threading.TIMEOUT_MAX), "
        "or -1 to disable, got -0.5",
    ),
    (
        {"recycle": 60, "recycle_jitter": 1},
        "recycle_jitter must be in [0, 1) (a fraction of pool_recycle), got 1",
    ),
    (
        {"recycle_jitter": 0.1},
        "recycle_jitter needs pool_recycle: set pool_recycle (the maximum lifetime in seconds) "
        "or leave recycle_jitter out",
    ),
    ({"pool_size": 2, "min_size": 3}, "min_size (3) cannot be larger than pool_size (2)"),
    (
        {"max_idle": 0},
        f"max_idle must be a positive number of seconds (<= {T}, threading.TIMEOUT_MAX) or None, "
        "got 0",
    ),
    ({"pool_name": " "}, "pool_name must be a non-empty string, got ' '"),
    (
        {"pool_name": "x" * 201},
        "pool_name must be at most 200 characters (the longest name a cluster-wide command "
        "can address), got 201",
    ),
    (
        {"pool_name": "a\tb"},
        "pool_name must be printable text, without line breaks, tabs or other control "
        "characters (it is written to logs and matched by cluster-wide commands), got 'a\\tb'",
    ),
    (
        {"target_role": "master"},
        "target_role must be one of any, primary, standby, prefer-standby, got 'master'",
    ),
    (
        {"dns_min_refresh": 0},
        f"dns_min_refresh must be >= 0.01 and <= {T} (threading.TIMEOUT_MAX) seconds, got 0",
    ),
    (
        {"dns_min_refresh": 5, "dns_max_refresh": 2},
        "dns_max_refresh (2) must be >= dns_min_refresh (5)",
    ),
    (
        {"health_check_interval": 0.001},
        f"health_check_interval must be a positive number of seconds (>= 0.01 and <= {T}, "
        "threading.TIMEOUT_MAX), or None to check only hosts that failed, got 0.001",
    ),
    (
        {"health_check_timeout": 7200},
        "health_check_timeout must be >= 0.01 and <= 3600 seconds, got 7200",
    ),
    ({"connect_deadline": "5"}, "connect_deadline must be a number, got '5'"),
    (
        {"unhealthy_threshold": 0},
        f"unhealthy_threshold must be >= 1 and <= {MAX_COUNT} (sys.maxsize), got 0",
    ),
    ({"rebalance_spread": 86401}, "rebalance_spread must be >= 0 and <= 86400 seconds, got 86401"),
    (
        {"min_recycle_interval": 10**400},
        f"min_recycle_interval must be >= 0 and <= {T} (threading.TIMEOUT_MAX) seconds, "
        "got an integer of about 401 digits",
    ),
]


@pytest.mark.parametrize(("given", "message"), MESSAGES, ids=lambda v: str(v)[:40])
def test_each_validator_message_word_for_word(given, message):
    with pytest.raises(ConfigurationError) as caught:
        PoolConfig.build(**given)
    assert str(caught.value) == message


def test_every_validator_has_a_message_case():
    covered = {name for given, _ in MESSAGES for name in given}
    assert {p.build for p in PARAMETERS if p.check} <= covered


def test_an_int_subclass_is_printed_as_the_int_it_stands_for():
    class Level(enum.IntEnum):
        LOW = -2

    with pytest.raises(ConfigurationError, match=r"got -2$"):
        PoolConfig.build(max_overflow=Level.LOW)


def test_none_for_one_of_our_settings_is_its_default_through_create_engine(tmp_path):
    """What a settings file gives for a key it leaves empty: the default, even for
    ``min_size`` (refused before the table, the one setting of ours that was)."""
    none = {p.argument: None for p in PARAMETERS if not p.sqlalchemy and p.in_signature}
    engine = create_engine(f"sqlite:///{tmp_path}/t.db", poolclass=RebalancingQueuePool, **none)
    try:
        config = engine.pool.config
        assert (config.min_size, config.max_idle, config.health_check_interval) == (0, None, None)
        assert (config.target_role, config.unhealthy_threshold) == ("any", 3)
    finally:
        engine.dispose()
    with pytest.raises(ConfigurationError, match=r"^pool_size must be an integer, got None"):
        create_engine(f"sqlite:///{tmp_path}/t.db", poolclass=RebalancingQueuePool, pool_size=None)
