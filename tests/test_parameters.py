"""The parameter table (``sqla_rebalance.parameters``) against the pool and every integration.

Each setting is given alone, with a value that is not its default, through
``create_engine`` keywords, ``recreate()``, the URL plugin and the Django
settings: it must reach the pool's ``config`` unchanged. A setting added to
the pool but not to the table (or the other way round) fails here.
"""

from __future__ import annotations

import inspect
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
