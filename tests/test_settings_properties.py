"""Property-based tests (hypothesis) of every way settings reach a pool, over the whole
input space: ``create_engine`` arguments (``PoolConfig.build``), the plugin's URL
parameters, the Flask ``SQLA_REBALANCE_*`` config, the Django ``SQLA_REBALANCE`` dict and
``hosts=``.

- **Pool arguments** (``PoolConfig.build``): for any value of any type for any argument
  (huge integers, inf/nan, subnormals, -0.0, bools, text, containers, objects), the
  build either succeeds or raises ``ConfigurationError`` whose message starts with the
  name of an argument that was given -- never ``OverflowError``, ``TypeError`` or
  another exception; whatever it accepts is inside every documented range (and a wait
  of ``pool_timeout`` is one ``threading`` accepts); every value in those ranges is
  accepted unchanged; whatever ``QueuePool`` accepts for its own arguments (``None``
  timeout, any ``max_overflow`` with ``pool_size=0``) is accepted and stored as
  ``QueuePool`` stores it.
- **URL parameters** (``plugin=rebalance``): for any query parameters (the known ones in
  any case or with ``-``, unknown ``rebalance*`` names, any text as the value),
  ``create_engine`` either builds the pool with exactly the parsed values or raises
  ``ConfigurationError`` naming one of the parameters; a parameter that is not exactly
  a known name never passes; on a network dialect, ``rebalance_hosts`` is accepted if
  and only if ``parse_hosts`` accepts it.
- **Flask settings**: for any ``SQLA_REBALANCE*`` keys (known, other case, the bare
  prefix, unknown) with any values, and any ``int()``-able engine options,
  ``Rebalance(app)`` either raises ``ConfigurationError`` naming a key that was set, or
  Flask-SQLAlchemy then creates the engine without any error.
- **Django settings**: for any ``SQLA_REBALANCE`` dict (known keys, other case, unknown
  keys, any values, ``ENGINE_OPTIONS`` with valid, misspelt or invalid arguments, per-alias
  overrides), ``conf.build`` either raises ``ConfigurationError`` naming the setting or
  every pooled alias's ``create_engine`` (as the backends call it) succeeds.
- **hosts=** (``parse_hosts``): any nested structure gives specs or ``ConfigurationError``;
  every accepted name is an IP address or a DNS name (checked by an independent oracle:
  labels of 1-63 letters, digits, ``-``, ``_``, not starting or ending with ``-``, 253
  characters in all, the last label not all digits), every port is in 1..65535, and no
  two entries are the same host ignoring case; every valid name is accepted and
  round-trips; any whitespace, control or other foreign character put inside a valid
  name, a label over 63 or a name over 253 characters, and a case variant of a listed
  name are refused; SQLite paths stay free-form (anything but blank or NUL).
"""

from __future__ import annotations

import ipaddress
import math
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import URL, create_engine
from sqlalchemy.pool import QueuePool

from sqla_rebalance import parameters as table
from sqla_rebalance import pool as pool_module
from sqla_rebalance.config import PoolConfig
from sqla_rebalance.errors import ConfigurationError
from sqla_rebalance.hosts import parse_hosts
from sqla_rebalance.plugin import PARAMETERS, parse_hosts_param
from sqla_rebalance.pool import RebalancingQueuePool
from sqla_rebalance.validation import MAX_COUNT, MAX_POOL_NAME, MAX_SECONDS, TARGET_ROLES

flask = pytest.importorskip("flask")
flask_sqlalchemy = pytest.importorskip("flask_sqlalchemy")
pytest.importorskip("django")

from sqla_rebalance.contrib.django import conf  # noqa: E402
from sqla_rebalance.contrib.flask import SETTINGS, Rebalance  # noqa: E402

#: Engines are made in most examples: no deadline, and fewer examples than the default.
ENGINES = settings(
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
PURE = settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])

_TMP = Path(tempfile.mkdtemp(prefix="sqla-rebalance-properties-"))
SQLITE_URL = f"sqlite:///{_TMP}/app.db"


def _no_prefill() -> Any:
    """No background connect before the engine of an example is disposed."""
    return mock.patch.object(pool_module, "_PREFILL_DELAY", 3600.0)


# --------------------------------------------------------------------------- values

EDGE_NUMBERS = st.sampled_from(
    [
        0,
        -1,
        1,
        -0.0,
        5e-324,
        1e-9,
        0.01,
        0.5,
        1.0,
        3600,
        3600.0000001,
        86400,
        86401,
        MAX_SECONDS,
        MAX_SECONDS * (1 + 1e-12),
        1e10,
        1e308,
        MAX_COUNT,
        MAX_COUNT + 1,
        2**63,
        10**400,
        -(10**400),
        10**4000,  # str() of an int is refused from 4,300 digits on
        math.inf,
        -math.inf,
        math.nan,
    ]
)
#: Any value of any type a setting might be given.
ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    EDGE_NUMBERS,
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["600", "0.5", "-1", "none", "1e400", "nan", "", " ", "any", "primary"]),
    st.binary(max_size=4),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.builds(object),
)
#: Settings text as it comes from a URL, an .ini file or the environment.
TEXT = st.one_of(
    st.integers().map(str),
    st.floats().map(repr),
    EDGE_NUMBERS.map(lambda v: str(v) if not isinstance(v, int) or v.bit_length() < 10000 else "9"),
    st.sampled_from(["none", "None", " 5 ", "1" + "0" * 400, "1" + "0" * 5000, "inf", "-nan"]),
    st.sampled_from(TARGET_ROLES),
    st.text(max_size=15),
)
BUS_SCHEMES = ("redis", "rediss", "unix", "postgres", "sqlite")


def _no_bus(value: object) -> bool:
    """Not a usable bus URL: a valid one would start a listener thread."""
    return not (isinstance(value, str) and value.strip().lower().startswith(BUS_SCHEMES))


# Valid values, mixed with ANYTHING below so that the accepted paths are explored too.
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
LABEL = st.builds(
    lambda first, middle, last: first + middle + last if last else first,
    st.sampled_from(LETTERS + "_"),
    st.text(LETTERS + "-_", max_size=20),
    st.sampled_from(["", *LETTERS, "_"]),
)
DNS_NAME = (
    st.lists(LABEL, min_size=1, max_size=6)
    .map(".".join)
    .filter(lambda n: len(n) <= 253 and not n.split(".")[-1].isdigit())
)
IP = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
PORT = st.one_of(st.none(), st.integers(1, 65535))


def _entry(name: str, port: int | None) -> str:
    if port is None:
        return name
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


HOSTS_LIST = st.lists(
    st.one_of(
        st.tuples(DNS_NAME, PORT).map(lambda t: _entry(*t)),
        st.tuples(IP, PORT).map(lambda t: _entry(*t)),
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda e: e.lower(),
)
PATHS_LIST = st.lists(
    st.text(st.characters(categories=("L", "N")), min_size=1, max_size=8).map(
        lambda n: f"{_TMP}/{n}.db"
    ),
    min_size=1,
    max_size=3,
    unique=True,
)
NAMESERVERS = st.lists(
    st.tuples(st.ip_addresses(v=4).map(str), PORT).map(lambda t: _entry(*t)),
    min_size=1,
    max_size=2,
)
PRINTABLE_NAME = st.text(
    st.characters(categories=("L", "M", "N", "P", "S"), include_characters=" "),
    min_size=1,
    max_size=MAX_POOL_NAME,
).filter(lambda s: s.strip() and s.isprintable())
#: PoolConfig.build parameter -> values inside its documented range (network hosts).
VALID: dict[str, st.SearchStrategy[Any]] = {
    "pool_size": st.integers(0, 20),
    "max_overflow": st.integers(-1, 20),
    "timeout": st.one_of(st.none(), st.floats(0, 1e6)),
    "recycle": st.one_of(st.just(-1), st.floats(1, 1e6), st.integers(1, 10**6)),
    "recycle_jitter": st.floats(0, 0.99),
    "min_size": st.integers(0, 4),
    "max_idle": st.one_of(st.none(), st.floats(0.1, 1e6)),
    "pool_name": PRINTABLE_NAME,
    "hosts": HOSTS_LIST,
    "target_role": st.sampled_from(TARGET_ROLES),
    "dns_nameservers": NAMESERVERS,
    "dns_min_refresh": st.floats(0.01, 60),
    "dns_max_refresh": st.floats(60, 3600),
    "health_check_interval": st.one_of(st.none(), st.floats(0.01, 100)),
    "health_check_timeout": st.floats(0.01, 3600),
    "connect_deadline": st.floats(0.01, 3600),
    "unhealthy_threshold": st.integers(1, 10),
    "rebalance_spread": st.floats(0, 86400),
    "min_recycle_interval": st.floats(0, 1000),
}


def _mostly(usual: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> Any:
    """``usual`` five times out of six (``one_of`` would give each half)."""
    return st.integers(0, 5).flatmap(lambda i: other if i == 5 else usual)


def _valid_or_anything(arg: str, *, paths: bool = False) -> st.SearchStrategy[Any]:
    valid = PATHS_LIST if (paths and arg == "hosts") else VALID.get(arg, ANYTHING)
    return _mostly(valid, ANYTHING)


def _as_text(value: Any) -> str:
    """A value as a URL parameter or a config file gives it."""
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return repr(value) if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- PoolConfig

#: ``PoolConfig.build`` parameter -> the name its messages start with: every setting
#: the table gives a validator (the others are checked where they are used).
BUILD_ARGS = {p.build: p.create_engine_keyword for p in table.PARAMETERS if p.check}


def _assert_sane(cfg: PoolConfig) -> None:
    """Every documented bound of an accepted configuration."""
    assert type(cfg.pool_size) is int and 0 <= cfg.pool_size <= MAX_COUNT
    assert type(cfg.max_overflow) is int and -1 <= cfg.max_overflow <= MAX_COUNT
    if cfg.pool_size == 0:
        assert cfg.max_overflow == -1
    if cfg.timeout is not None:
        assert 0 <= cfg.timeout <= MAX_SECONDS
        lock = threading.Lock()
        assert lock.acquire(timeout=cfg.timeout)  # the stdlib takes this wait
    assert cfg.recycle == -1 or 0 < cfg.recycle <= MAX_SECONDS
    assert 0 <= cfg.recycle_jitter < 1
    if cfg.recycle == -1:
        assert cfg.recycle_jitter == 0
    assert type(cfg.min_size) is int and 0 <= cfg.min_size <= MAX_COUNT
    if cfg.pool_size:
        assert cfg.min_size <= cfg.pool_size
    assert cfg.max_idle is None or 0 < cfg.max_idle <= MAX_SECONDS
    name = cfg.pool_name
    assert isinstance(name, str) and name.strip() and len(name) <= MAX_POOL_NAME
    assert name.isprintable()
    assert cfg.target_role in TARGET_ROLES
    assert 0.01 <= cfg.dns_min_refresh <= cfg.dns_max_refresh <= MAX_SECONDS
    interval = cfg.health_check_interval
    assert interval is None or 0.01 <= interval <= MAX_SECONDS
    assert 0.01 <= cfg.health_check_timeout <= 3600
    assert 0.01 <= cfg.connect_deadline <= 3600
    assert 1 <= cfg.unhealthy_threshold <= MAX_COUNT
    assert 0 <= cfg.rebalance_spread <= 86400
    assert 0 <= cfg.min_recycle_interval <= MAX_SECONDS
    for value in (cfg.recycle, cfg.recycle_jitter, cfg.dns_min_refresh, cfg.rebalance_spread):
        assert math.isfinite(value)


def _draw_settings(
    data: st.DataObject,
    names: st.SearchStrategy[Any],
    value_for: Any,
    most: int,
    odd_names: st.SearchStrategy[Any] | None = None,
) -> dict[Any, Any]:
    """Some setting names (and, one time in four, a misspelt one), each with a value
    that is mostly valid and otherwise anything."""
    chosen = data.draw(st.lists(names, unique=True, max_size=most), "names")
    if odd_names is not None and data.draw(st.integers(0, 3), "misspelt") == 3:
        chosen.append(data.draw(odd_names, "misspelt name"))
    return {name: data.draw(value_for(name), repr(name)) for name in chosen}


@PURE
@given(st.data())
def test_pool_arguments_of_any_type_are_accepted_in_range_or_refused_by_name(data):
    given_args = _draw_settings(data, st.sampled_from(sorted(BUILD_ARGS)), _valid_or_anything, 6)
    try:
        cfg = PoolConfig.build(**given_args)
    except ConfigurationError as err:
        message = str(err)
        named = [BUILD_ARGS[arg] for arg in given_args]
        assert any(message.startswith(name) for name in named), message
        assert len(message) < 600  # a huge value is described, never printed whole
        event("refused")
        return
    event("accepted")
    _assert_sane(cfg)


SANE = {
    "pool_size": st.integers(0, MAX_COUNT),
    "timeout": st.one_of(st.none(), st.floats(0, MAX_SECONDS)),
    "recycle": st.one_of(st.just(-1), st.floats(0, MAX_SECONDS, exclude_min=True)),
    "max_idle": st.one_of(st.none(), st.floats(0, MAX_SECONDS, exclude_min=True)),
    "pool_name": st.text(
        st.characters(categories=("L", "M", "N", "P", "S"), include_characters=" "),
        min_size=1,
        max_size=MAX_POOL_NAME,
    ).filter(lambda s: s.strip() and s.isprintable()),
    "target_role": st.sampled_from(TARGET_ROLES),
    "dns_min_refresh": st.floats(0.01, 60),
    "health_check_interval": st.one_of(st.none(), st.floats(0.01, MAX_SECONDS)),
    "health_check_timeout": st.floats(0.01, 3600),
    "connect_deadline": st.floats(0.01, 3600),
    "unhealthy_threshold": st.integers(1, MAX_COUNT),
    "rebalance_spread": st.floats(0, 86400),
    "min_recycle_interval": st.floats(0, MAX_SECONDS),
}
CONFIG_FIELD = {"pool_name": "pool_name"}


@PURE
@given(st.fixed_dictionaries({}, optional=SANE))
def test_every_value_in_the_documented_ranges_is_accepted_unchanged(values):
    cfg = PoolConfig.build(**values)
    for arg, value in values.items():
        if value is not None or arg in ("timeout", "max_idle", "health_check_interval"):
            assert getattr(cfg, arg) == value, arg
    _assert_sane(cfg)


@ENGINES
@given(
    pool_size=st.integers(0, 30),
    data=st.data(),
    timeout=st.one_of(st.none(), st.floats(0, MAX_SECONDS)),
    recycle=st.one_of(st.just(-1), st.floats(0, MAX_SECONDS, exclude_min=True)),
)
def test_what_queuepool_accepts_for_its_own_arguments_is_accepted(
    pool_size, data, timeout, recycle
):
    """Drop-in: ``None`` timeouts, any ``max_overflow`` when ``pool_size=0`` (QueuePool
    ignores it), and the values QueuePool can use, stored as QueuePool stores them."""
    overflow = data.draw(ANYTHING if pool_size == 0 else st.integers(-1, 50), "max_overflow")
    kw = {"pool_size": pool_size, "max_overflow": overflow, "timeout": timeout, "recycle": recycle}
    stock = QueuePool(lambda: None, **kw)
    ours = RebalancingQueuePool(lambda: None, **kw)
    try:
        assert ours._pool.maxsize == stock._pool.maxsize
        assert ours._max_overflow == stock._max_overflow == ours.config.max_overflow
        assert ours._timeout == stock._timeout and ours.config.timeout == timeout
        assert ours._recycle == stock._recycle
    finally:
        ours.dispose()
        stock.dispose()


# --------------------------------------------------------------------------- plugin

KNOWN_PARAMETERS = {p.name: p for p in PARAMETERS}
#: A usable bus would start a listener: ``rebalance_broadcast`` only with values that fail.
PARAMETER_NAMES = st.sampled_from(sorted(set(KNOWN_PARAMETERS) - {"rebalance_broadcast"}))
ODD_PARAMETER_NAMES = st.one_of(
    st.just("rebalance_broadcast"),
    st.sampled_from(sorted(KNOWN_PARAMETERS)).map(str.upper),
    st.sampled_from(sorted(KNOWN_PARAMETERS)).map(lambda k: k.replace("_", "-", 1)),
    st.sampled_from(sorted(KNOWN_PARAMETERS)).map(lambda k: k[:1].upper() + k[1:]),
    st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).map(lambda s: "rebalance_" + s),
    st.just("rebalance_broadcast_secret"),
)


def _shown(text: str) -> str:
    shown = text if text.isprintable() else repr(text)[1:-1]
    return shown if len(shown) <= 80 else shown[:77]


def _url_value(name: str) -> st.SearchStrategy[str]:
    param = KNOWN_PARAMETERS.get(name)
    if param is None:
        return TEXT
    return _mostly(_valid_or_anything(param.argument, paths=True).map(_as_text), TEXT)


@ENGINES
@given(st.data())
def test_url_parameters_give_the_parsed_settings_or_an_error_naming_one(data):
    params = _draw_settings(data, PARAMETER_NAMES, _url_value, 4, ODD_PARAMETER_NAMES)
    params = {k: v for k, v in params.items() if k != "rebalance_broadcast" or _no_bus(v)}
    assume(params)
    url = URL.create("sqlite", database=f"{_TMP}/app.db", query={"plugin": "rebalance", **params})
    try:
        with _no_prefill():
            engine = create_engine(url)
    except ConfigurationError as err:
        message = str(err)
        assert any(_shown(key) in message for key in params), message
        event("refused")
        return
    event("accepted")
    try:
        assert set(params) <= set(KNOWN_PARAMETERS)  # a typo never passes silently
        cfg = engine.pool.config
        for key, raw in params.items():
            param = KNOWN_PARAMETERS[key]
            expected = param.parse(key, raw)
            actual = getattr(cfg, param.argument)
            if param.argument == "pool_name":
                assert actual == expected
            elif isinstance(expected, (int, float)) and not isinstance(expected, bool):
                assert actual == float(expected) or actual == expected, key
            elif expected is None:
                assert actual is None, key
            else:
                assert actual == expected, key
        assert not any(k in engine.url.query for k in params)  # the driver never sees them
    finally:
        engine.dispose()


HOST_CHARS = st.sampled_from([*"abcDEF019-_.:[]% \t\n\x00é|,", "::1", "[::1]", "10.0.0.1"])
HOSTS_TEXT = st.lists(HOST_CHARS, min_size=1, max_size=12).map("".join)


@ENGINES
@given(st.one_of(HOSTS_TEXT, HOSTS_LIST.map(",".join)))
def test_url_hosts_on_a_network_dialect_are_accepted_exactly_when_parse_hosts_accepts(raw):
    try:
        expected: Any = parse_hosts(parse_hosts_param(raw), 5432)
    except ConfigurationError:
        expected = None
    url = URL.create(
        "postgresql+psycopg",
        username="u",
        host="127.0.0.1",
        port=1,
        database="db",
        query={"plugin": "rebalance", "rebalance_hosts": raw},
    )
    try:
        with _no_prefill():
            engine = create_engine(url)
    except ConfigurationError as err:
        message = str(err)
        assert expected is None
        assert message.startswith("rebalance_hosts"), message
        event("refused")
        return
    event("accepted")
    engine.dispose()
    assert expected is not None


# --------------------------------------------------------------------------- Flask

FLASK_KEYS = [s.key for s in SETTINGS]
#: The secret needs a bus, and a usable bus would start a listener: those fail.
FLASK_NAMES = st.sampled_from(
    [k for k in FLASK_KEYS if k not in ("SQLA_REBALANCE_SECRET", "SQLA_REBALANCE_BROADCAST")]
)
ODD_FLASK_NAMES = st.one_of(
    st.sampled_from(["SQLA_REBALANCE_SECRET", "SQLA_REBALANCE_BROADCAST"]),
    st.sampled_from(FLASK_KEYS).map(str.lower),
    st.sampled_from(["SQLA_REBALANCE", "SQLA_REBALANCE_BINDS", "SQLA_REBALANCE_RECYLCE"]),
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_", min_size=1, max_size=8).map(
        lambda s: "SQLA_REBALANCE_" + s
    ),
)
FLASK_VALUES = st.one_of(
    ANYTHING, TEXT, st.dictionaries(st.sampled_from(["recycle", "RECYCLE"]), st.integers())
)
#: Flask-SQLAlchemy passes these through int() (engine_from_config).
INT_ABLE = st.one_of(
    st.none(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers().map(str),
)
USER_OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "pool_size": _mostly(VALID["pool_size"], INT_ABLE),
        "max_overflow": _mostly(VALID["max_overflow"], INT_ABLE),
        "pool_timeout": _mostly(st.one_of(st.none(), st.integers(0, 10**6)), INT_ABLE),
        "pool_recycle": _mostly(st.one_of(st.just(-1), st.integers(1, 10**6)), INT_ABLE),
        "min_size": _mostly(VALID["min_size"], ANYTHING),
    },
)


_FLASK_BY_KEY = {s.key: s for s in SETTINGS}
_BUILD_NAME = {"pool_recycle": "recycle", "pool_timeout": "timeout"}


def _flask_value(key: str) -> st.SearchStrategy[Any]:
    setting = _FLASK_BY_KEY.get(key)
    if setting is None:
        return FLASK_VALUES
    valid = _valid_or_anything(_BUILD_NAME.get(setting.keyword, setting.keyword), paths=True)
    return _mostly(st.one_of(valid, valid.map(_as_text)), FLASK_VALUES)


@ENGINES
@given(st.data(), USER_OPTIONS)
def test_flask_settings_fail_at_init_naming_the_key_or_the_engine_works(data, options):
    config = _draw_settings(data, FLASK_NAMES, _flask_value, 5, ODD_FLASK_NAMES)
    config = {k: v for k, v in config.items() if _no_bus(v)}
    app = flask.Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=SQLITE_URL, SQLALCHEMY_ENGINE_OPTIONS=options, **config
    )
    try:
        Rebalance(app)
    except ConfigurationError as err:
        message = str(err)
        named = [*config, "SQLALCHEMY_ENGINE_OPTIONS"]
        assert any(key in message for key in named), message
        event("refused")
        return
    event("accepted")
    # Whatever passed init, Flask-SQLAlchemy builds (engine_from_config, int() included).
    db = flask_sqlalchemy.SQLAlchemy()
    db.init_app(app)
    with app.app_context(), _no_prefill():
        engine = db.engine
        try:
            assert isinstance(engine.pool, RebalancingQueuePool)
        finally:
            engine.dispose()


# --------------------------------------------------------------------------- Django

PG = {"ENGINE": conf.POSTGRESQL_ENGINE, "OPTIONS": {}}
MY = {"ENGINE": conf.MYSQL_ENGINE, "OPTIONS": {}}
DATABASES = {"default": PG, "maria": MY, "cache": {"ENGINE": "django.db.backends.sqlite3"}}
DJANGO_KEYS = [*conf.KNOWN_KEYS]
DJANGO_NAMES = st.sampled_from(DJANGO_KEYS)
ODD_DJANGO_NAMES = st.one_of(
    st.sampled_from(DJANGO_KEYS).map(str.lower),
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_", min_size=1, max_size=8),
)
ENGINE_OPTION_NAMES = st.sampled_from(
    [
        "echo",
        "echo_pool",
        "echo_poool",
        "hide_parameters",
        "hide_parameter",
        "isolation_level",
        "pool_reset_on_return",
        "pool_logging_name",
        "execution_options",
        "query_cache_size",
        "label_length",
        "executemany_mode",
        "pool_size",
        "poolclass",
        "colour",
    ]
)
ENGINE_OPTIONS = st.dictionaries(
    ENGINE_OPTION_NAMES,
    st.one_of(
        st.booleans(),
        st.none(),
        st.sampled_from(["AUTOCOMMIT", "rollback", "debug", "x", {}, {"stream_results": True}]),
        st.integers(-1, 600),
    ),
    max_size=3,
)
DJANGO_VALUES = st.one_of(ANYTHING, ENGINE_OPTIONS)


def _settings_dict(top: dict[str, Any], alias_overrides: dict[str, Any]) -> dict[str, Any]:
    raw = {k: v for k, v in top.items() if _no_bus(v)}
    if alias_overrides:
        raw["DATABASES"] = {"maria": {k: v for k, v in alias_overrides.items() if _no_bus(v)}}
    return raw


_DJANGO_VALID: dict[str, st.SearchStrategy[Any]] = {
    "RECYCLE": st.one_of(st.none(), VALID["recycle"]),
    "USE_LIFO": st.booleans(),
    "PRE_PING": st.one_of(st.none(), st.booleans()),
    "SECRET_ENV": st.sampled_from(["MY_BUS_SECRET", "SQLA_REBALANCE_SECRET"]),
    "SECRET": st.text(min_size=1, max_size=8),
    "ENGINE_OPTIONS": ENGINE_OPTIONS,
}


def _django_value(key: str) -> st.SearchStrategy[Any]:
    valid = _DJANGO_VALID.get(key)
    if valid is None and key in conf.POOL_KEYS:
        argument = conf.POOL_KEYS[key]
        valid = VALID.get(_BUILD_NAME.get(argument, argument))
    if valid is None:
        return DJANGO_VALUES
    return _mostly(valid, DJANGO_VALUES)


@ENGINES
@given(st.data(), st.one_of(st.none(), ENGINE_OPTIONS))
def test_django_settings_fail_at_setup_naming_the_key_or_every_pool_can_be_made(data, options):
    top = _draw_settings(data, DJANGO_NAMES, _django_value, 5, ODD_DJANGO_NAMES)
    alias = _draw_settings(data, DJANGO_NAMES, _django_value, 2, ODD_DJANGO_NAMES)
    raw = _settings_dict(top, alias)
    if options is not None:
        raw["ENGINE_OPTIONS"] = options
    try:
        built = conf.build(raw, DATABASES)
    except ConfigurationError as err:
        message = str(err)
        assert message.startswith((conf.SETTING, "DATABASES[")), message
        event("refused")
        return
    event("accepted")
    for name in built.pooled:
        wrapper = conf._engine_class(DATABASES[name]["ENGINE"])
        kw = built.for_alias(name).engine_kwargs(health_checks=False)
        with _no_prefill():
            # As the backends call it (base.PooledDatabaseWrapperMixin._sqla_engine).
            engine = create_engine(
                f"{wrapper.sqla_drivername}://",
                poolclass=RebalancingQueuePool,
                connect_args={},
                **wrapper.sqla_dialect_options,
                **kw,
            )
        engine.dispose()


@ENGINES
@given(ENGINE_OPTIONS, st.sampled_from([conf.POSTGRESQL_ENGINE, conf.MYSQL_ENGINE]))
def test_engine_options_are_refused_at_setup_exactly_when_create_engine_refuses_them(
    options, engine
):
    """No false alarm and no miss: the check at settings setup agrees with what the
    backend's own ``create_engine`` does at the first connection."""
    options = {k: v for k, v in options.items() if k not in ("poolclass", "pool_size")}
    problem = conf._engine_options_error(options, engine)
    wrapper = conf._engine_class(engine)
    try:
        with _no_prefill():
            made = create_engine(
                f"{wrapper.sqla_drivername}://",
                poolclass=RebalancingQueuePool,
                connect_args={},
                **{**wrapper.sqla_dialect_options, **options},
            )
    except Exception:  # whatever create_engine raises, setup must have said so
        assert problem is not None
        event("refused")
        return
    made.dispose()
    assert problem is None, problem
    event("accepted")


# --------------------------------------------------------------------------- hosts

_ORACLE_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _oracle_host(name: str) -> bool:
    """An IP address or a DNS name, written independently of the code under test."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        scope = getattr(address, "scope_id", None)
        return scope is None or re.fullmatch(r"[A-Za-z0-9_.-]+", scope) is not None
    if not name.isascii() or not name.isprintable() or any(c.isspace() for c in name):
        return False
    body = name.removesuffix(".")
    labels = body.split(".")
    return (
        0 < len(body) <= 253
        and all(_ORACLE_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def _same_host(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name.removesuffix(".").lower()


ENTRY = st.one_of(
    st.tuples(DNS_NAME, PORT).map(lambda t: _entry(*t)),
    st.tuples(IP, PORT).map(lambda t: _entry(*t)),
    st.tuples(DNS_NAME, PORT).map(lambda t: _entry(t[0].upper(), t[1])),
    st.text(max_size=20),
    st.lists(HOST_CHARS, max_size=10).map("".join),
    st.text("aA0-_.:[]%", max_size=16),
)


def _nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Lists and pairs of ``inner``: tiers, and shapes that are neither."""
    return st.lists(inner, max_size=4) | st.tuples(inner, inner)


HOSTS_VALUE = st.recursive(
    st.one_of(ENTRY, st.integers(), st.none(), st.binary(max_size=3)), _nested, max_leaves=8
)


@PURE
@given(HOSTS_VALUE, st.sampled_from([None, 5432]))
def test_hosts_of_any_shape_are_parsed_or_refused_and_accepted_names_are_hosts(value, port):
    try:
        specs = parse_hosts(value, port)
    except ConfigurationError as err:
        message = str(err)
        assert message.startswith("hosts"), message
        assert len(message) < 500
        event("refused")
        return
    event("accepted, 2+ hosts" if len(specs) > 1 else "accepted, 1 host")
    seen = set()
    for spec in specs:
        assert _oracle_host(spec.name), spec.name
        assert spec.port is None or 1 <= spec.port <= 65535
        if port is not None:
            assert spec.port is not None
        key = (_same_host(spec.name), spec.port)
        assert key not in seen  # DB and db are one host
        seen.add(key)


@PURE
@given(
    st.one_of(DNS_NAME.map(lambda n: (n, True)), IP.map(lambda a: (a, False))), PORT, st.booleans()
)
def test_every_dns_name_or_address_is_accepted_and_round_trips(host, port, final_dot):
    name, is_name = host
    if final_dot and is_name:
        name += "."  # fully qualified
    [spec] = parse_hosts([_entry(name, port)], 5432)
    assert (spec.name, spec.port) == (name, 5432 if port is None else port)
    assert parse_hosts([str(spec)], 5432) == [spec]


FOREIGN = st.one_of(
    st.sampled_from(
        list(" \t\n\r\x0b\x0c\x00\x1f\x7f\x85\xa0\u2028\u200b\u3000!\"#$&'()*+/;<=>?@\\^`{}~é")
    ),
    st.characters(blacklist_categories=("L", "N"), blacklist_characters="-_.:[]%,"),
)


@PURE
@given(DNS_NAME, FOREIGN, st.data())
def test_a_foreign_character_inside_a_name_is_refused(name, char, data):
    at = data.draw(st.integers(1, len(name)), "position")
    bad = name[:at] + char + name[at:]
    assume(bad.strip(" \t\n\r\x0b\x0c") == bad)  # not merely surrounding whitespace
    with pytest.raises(ConfigurationError, match=r"^hosts"):
        parse_hosts([bad], 5432)


@PURE
@given(DNS_NAME, st.integers(64, 300), st.data())
def test_a_label_over_63_or_a_name_over_253_characters_is_refused(name, length, data):
    labels = name.split(".")
    at = data.draw(st.integers(0, len(labels) - 1), "label")
    labels[at] = ("a" * length)[: length - 1] + "b"
    with pytest.raises(ConfigurationError, match=r"longer than 63 characters|at most 253"):
        parse_hosts([".".join(labels)], 5432)
    long_name = ".".join([name] + ["x" * 50] * 6)[:260].rstrip(".-")
    assume(len(long_name) > 253)
    with pytest.raises(ConfigurationError, match=r"at most 253|not a valid host"):
        parse_hosts([long_name], 5432)


@PURE
@given(DNS_NAME, PORT, st.data())
def test_a_case_variant_of_a_listed_name_is_the_same_host(name, port, data):
    assume(any(c.isalpha() for c in name))
    variant = "".join(data.draw(st.sampled_from([c.lower(), c.upper()])) for c in name)
    tiered = data.draw(st.booleans(), "in a lower tier")
    second: Any = [_entry(variant, port)] if tiered else _entry(variant, port)
    with pytest.raises(ConfigurationError, match="is listed twice"):
        parse_hosts([_entry(name, port), second], 5432)


@PURE
@given(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=5, unique=True))
def test_sqlite_paths_stay_free_form(paths):
    assume(all(p.strip() and "\x00" not in p and "," not in p for p in paths))
    assume(len({p.strip() for p in paths}) == len(paths))
    specs = parse_hosts(paths, None, paths=True)
    assert [s.name for s in specs] == [p.strip() for p in paths]
    assert all(s.is_path and s.port is None for s in specs)


@PURE
@given(
    st.lists(st.lists(st.tuples(DNS_NAME, PORT), min_size=1, max_size=3), min_size=1, max_size=3)
)
def test_the_url_hosts_syntax_round_trips_tiers(tiers):
    raw = "|".join(",".join(_entry(n, p) for n, p in tier) for tier in tiers)
    parsed = parse_hosts_param(raw)
    first, *rest = tiers
    assert parsed == [
        *(_entry(n, p) for n, p in first),
        *([_entry(n, p) for n, p in t] for t in rest),
    ]


def test_the_limits_are_the_stdlibs():
    """The bounds the properties check against are what Python itself accepts."""
    assert MAX_SECONDS == threading.TIMEOUT_MAX
    assert sys.maxsize == MAX_COUNT
    with pytest.raises(OverflowError):
        threading.Lock().acquire(timeout=MAX_SECONDS * 2)
