"""``SQLA_REBALANCE`` validation and how it becomes create_engine arguments (no Django set-up,
no server: ``conf.build`` takes the setting and ``DATABASES`` as plain dicts)."""

from __future__ import annotations

import pytest

pytest.importorskip("django")

from sqla_rebalance.contrib.django import conf
from sqla_rebalance.errors import ConfigurationError

PG = {"ENGINE": conf.POSTGRESQL_ENGINE, "OPTIONS": {}}
MY = {"ENGINE": conf.MYSQL_ENGINE, "OPTIONS": {}}
DATABASES = {
    "default": PG,
    "replica": PG,
    "maria": MY,
    "cache": {"ENGINE": "django.db.backends.sqlite3"},
}
BUS = "sqlite:///tmp/sqla-rebalance-django-settings-bus.db"  # never opened by build()


def kwargs(raw, alias="default", health_checks=False):
    return conf.build(raw, DATABASES).for_alias(alias).engine_kwargs(health_checks)


def test_defaults_without_the_setting():
    settings = conf.build(None, DATABASES)
    assert settings.pooled == ("default", "replica", "maria")  # not "cache"
    kw = settings.for_alias("replica").engine_kwargs(False)
    # A lifetime by default (jittered by the pool's own default), named after the alias.
    assert kw == {"pool_recycle": 1800.0, "pool_name": "replica", "pool_pre_ping": False}


def test_keys_become_pool_arguments_and_aliases_override_the_top_level():
    raw = {
        "RECYCLE": 900,
        "JITTER": 0.1,
        "MIN_SIZE": 2,
        "POOL_SIZE": 8,
        "HOSTS": ["db-a:5432", "db-b:5432", ["dr:5432"]],
        "ENGINE_OPTIONS": {"echo_pool": True},
        "DATABASES": {"replica": {"MIN_SIZE": 4, "POOL_NAME": "reads", "TARGET_ROLE": "standby"}},
    }
    top = kwargs(raw)
    assert top["pool_recycle"] == 900
    assert top["recycle_jitter"] == 0.1
    assert (top["min_size"], top["pool_size"]) == (2, 8)
    assert top["hosts"] == ["db-a:5432", "db-b:5432", ["dr:5432"]]
    assert top["echo_pool"] is True
    assert top["pool_name"] == "default"
    replica = kwargs(raw, "replica")
    assert (replica["min_size"], replica["pool_size"]) == (4, 8)  # merged, not replaced
    assert (replica["pool_name"], replica["target_role"]) == ("reads", "standby")


def test_hosts_role_and_name_at_the_top_level_are_the_default_databases_only():
    raw = {
        "HOSTS": ["db-a:5432", "db-b:5432"],
        "TARGET_ROLE": "primary",
        "POOL_NAME": "orders",
        "MIN_SIZE": 2,
        "DATABASES": {"maria": {"HOSTS": ["my-a:3306", "my-b:3306"]}},
    }
    default = kwargs(raw)
    assert (default["hosts"], default["target_role"], default["pool_name"]) == (
        ["db-a:5432", "db-b:5432"],
        "primary",
        "orders",
    )
    replica = kwargs(raw, "replica")  # another database: its own hosts, role and name
    assert "hosts" not in replica
    assert "target_role" not in replica
    assert replica["pool_name"] == "replica"
    assert replica["min_size"] == 2  # the rest is inherited
    assert kwargs(raw, "maria")["hosts"] == ["my-a:3306", "my-b:3306"]
    # An alias made at run time (connection.copy(alias=...)) follows the same rule.
    other = conf.build(raw, DATABASES).for_alias("made-later").engine_kwargs(False)
    assert ("hosts" not in other, other["pool_name"]) == (True, "made-later")


def test_recycle_none_means_no_lifetime():
    assert kwargs({"RECYCLE": None})["pool_recycle"] == -1


def test_conn_health_checks_becomes_pre_ping_unless_pre_ping_is_set():
    assert kwargs({}, health_checks=True)["pool_pre_ping"] is True
    assert kwargs({}, health_checks=False)["pool_pre_ping"] is False
    assert kwargs({"PRE_PING": False}, health_checks=True)["pool_pre_ping"] is False
    assert kwargs({"PRE_PING": True}, health_checks=False)["pool_pre_ping"] is True


def test_the_secret_comes_from_the_environment_when_the_pool_is_made(monkeypatch):
    monkeypatch.delenv("SQLA_REBALANCE_SECRET", raising=False)
    monkeypatch.delenv("MY_BUS_SECRET", raising=False)
    settings = conf.build({"BROADCAST": BUS}, DATABASES)
    assert settings.for_alias("default").engine_kwargs(False)["broadcast_secret"] is None
    monkeypatch.setenv("SQLA_REBALANCE_SECRET", "from-env")
    # Read at each pool creation, not frozen in the settings.
    assert settings.for_alias("default").engine_kwargs(False)["broadcast_secret"] == "from-env"
    named = conf.build({"BROADCAST": BUS, "SECRET_ENV": "MY_BUS_SECRET"}, DATABASES)
    assert named.for_alias("maria").engine_kwargs(False)["broadcast_secret"] is None
    monkeypatch.setenv("MY_BUS_SECRET", "s3")
    assert named.for_alias("maria").engine_kwargs(False)["broadcast_secret"] == "s3"
    explicit = conf.build({"BROADCAST": BUS, "SECRET": "given"}, DATABASES)
    assert explicit.for_alias("default").engine_kwargs(False)["broadcast_secret"] == "given"
    # The settings never carry it otherwise.
    assert "SECRET" not in named.for_alias("maria").values
    assert "broadcast_secret" not in kwargs({})  # no bus, no secret


@pytest.mark.parametrize(
    ("raw", "databases", "message"),
    [
        ([], DATABASES, "SQLA_REBALANCE must be a dict"),
        (
            {"RECYCEL": 5},
            DATABASES,
            "SQLA_REBALANCE: unknown key 'RECYCEL' (did you mean 'RECYCLE'?)",
        ),
        ({"JITTER": 2}, DATABASES, "SQLA_REBALANCE['JITTER']: recycle_jitter must be in [0, 1)"),
        (
            {"RECYCLE": None, "JITTER": 0.2},
            DATABASES,
            "SQLA_REBALANCE['JITTER']: recycle_jitter needs pool_recycle",
        ),
        ({"RECYCLE": 0}, DATABASES, "SQLA_REBALANCE['RECYCLE']: pool_recycle must be a positive"),
        (
            {"POOL_SIZE": "5"},
            DATABASES,
            "SQLA_REBALANCE['POOL_SIZE']: pool_size must be an integer",
        ),
        ({"POOL_TIMEOUT": -1}, DATABASES, "SQLA_REBALANCE['POOL_TIMEOUT']: pool_timeout must be"),
        ({"TARGET_ROLE": "leader"}, DATABASES, "SQLA_REBALANCE['TARGET_ROLE']: target_role must"),
        (
            {"POOL_NAME": ""},
            DATABASES,
            "SQLA_REBALANCE['POOL_NAME']: pool_name must be a non-empty",
        ),
        ({"HOSTS": []}, DATABASES, "SQLA_REBALANCE['HOSTS']: hosts must be a non-empty list"),
        (
            {"HOSTS": ["a:1", "a:1"]},
            DATABASES,
            "SQLA_REBALANCE['HOSTS']: hosts: a:1 is listed twice",
        ),
        (
            {"BROADCAST": "amqp://q"},
            DATABASES,
            "SQLA_REBALANCE['BROADCAST']: broadcast: unknown bus",
        ),
        (
            {"SECRET_ENV": "NOT-A-VAR"},
            DATABASES,
            "SQLA_REBALANCE['SECRET_ENV']: must be an environment",
        ),
        ({"SECRET": "s"}, DATABASES, "SQLA_REBALANCE['SECRET']: is set but no BROADCAST is"),
        ({"USE_LIFO": "yes"}, DATABASES, "SQLA_REBALANCE['USE_LIFO']: must be True or False"),
        ({"ENGINE_OPTIONS": {"poolclass": 1}}, DATABASES, "'poolclass' is set by the backend"),
        ({"ENGINE_OPTIONS": {"pool_size": 3}}, DATABASES, "use 'POOL_SIZE' instead of 'pool_size'"),
        (
            {"MIN_SIZE": 3, "DATABASES": {"replica": {"POOL_SIZE": 2}}},
            DATABASES,
            "SQLA_REBALANCE['MIN_SIZE']: min_size (3) cannot be larger than pool_size (2)",
        ),
        (
            {"DATABASES": {"replica": {"MIN_SIZE": 9}}},
            DATABASES,
            "SQLA_REBALANCE['DATABASES']['replica']['MIN_SIZE']: min_size (9) cannot be larger",
        ),
        (
            {"DATABASES": {"replica": {"MIN_SZE": 1}}},
            DATABASES,
            "SQLA_REBALANCE['DATABASES']['replica']: unknown key 'MIN_SZE'",
        ),
        (
            {"DATABASES": {"nope": {}}},
            DATABASES,
            "SQLA_REBALANCE['DATABASES']['nope']: no such alias in settings.DATABASES",
        ),
        (
            {"DATABASES": {"cache": {"MIN_SIZE": 1}}},
            DATABASES,
            "DATABASES['cache']['ENGINE'] is not a sqla_rebalance backend",
        ),
        (
            {},
            {"default": {"ENGINE": conf.POSTGRESQL_ENGINE, "OPTIONS": {"pool": True}}},
            "DATABASES['default']['OPTIONS']['pool']: that is Django's own psycopg pool",
        ),
    ],
)
def test_errors_name_the_setting_key(raw, databases, message):
    with pytest.raises(ConfigurationError) as err:
        conf.build(raw, databases)
    assert message in str(err.value)


def test_configurations_compare_by_value():
    # The pool registry replaces a pool when its configuration changes, and only then.
    raw = {"MIN_SIZE": 1, "HOSTS": ["a:1", "b:1"]}
    assert conf.build(raw, DATABASES).for_alias("default") == conf.build(
        dict(raw), DATABASES
    ).for_alias("default")
    assert conf.build(raw, DATABASES).for_alias("default") != conf.build(
        {**raw, "MIN_SIZE": 2}, DATABASES
    ).for_alias("default")


# -- issue 11 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"ENGINE_OPTIONS": {"echo_poool": True}},
            "SQLA_REBALANCE['ENGINE_OPTIONS']: unknown create_engine() argument 'echo_poool' "
            "(did you mean 'echo_pool'?) for postgresql+psycopg",
        ),
        (
            {"DATABASES": {"maria": {"ENGINE_OPTIONS": {"hide_parameter": True}}}},
            "SQLA_REBALANCE['DATABASES']['maria']['ENGINE_OPTIONS']: unknown create_engine() "
            "argument 'hide_parameter' (did you mean 'hide_parameters'?) for mysql+",
        ),
        (
            {"ENGINE_OPTIONS": {"pool_reset_on_return": "sometimes"}},
            "SQLA_REBALANCE['ENGINE_OPTIONS']: create_engine() refuses it: ArgumentError: "
            "Invalid value for 'reset_on_return'",
        ),
        (
            {"ENGINE_OPTIONS": {"execution_options": 5}},
            "SQLA_REBALANCE['ENGINE_OPTIONS']: create_engine() refuses it",
        ),
        (
            {"DNS_NAMESERVERS": ["ns.example"]},
            "SQLA_REBALANCE['DNS_NAMESERVERS']: DNS nameserver 'ns.example'",
        ),
        ({"recycle": 600}, "SQLA_REBALANCE: unknown key 'recycle' (did you mean 'RECYCLE'?"),
        ({1: 2}, "SQLA_REBALANCE: unknown key 1"),
        ({"RECYCLE": -0.5}, "SQLA_REBALANCE['RECYCLE']: pool_recycle must be a positive"),
        ({"RECYCLE": 10**400}, "SQLA_REBALANCE['RECYCLE']: pool_recycle must be a positive"),
        ({"POOL_TIMEOUT": 1e10}, "SQLA_REBALANCE['POOL_TIMEOUT']: pool_timeout must be >= 0"),
        ({"MAX_IDLE": -(10**400)}, "SQLA_REBALANCE['MAX_IDLE']: max_idle must be a positive"),
        ({"HOSTS": ["db-a:5432", "DB-A:5432"]}, "SQLA_REBALANCE['HOSTS']: hosts: DB-A:5432 is"),
        ({"HOSTS": ["db a"]}, "SQLA_REBALANCE['HOSTS']: hosts: 'db a' is not a valid host"),
        ({"POOL_NAME": "a\tb"}, "SQLA_REBALANCE['POOL_NAME']: pool_name must be printable"),
    ],
)
def test_every_setting_is_checked_at_setup_not_at_the_first_connection(raw, message):
    with pytest.raises(ConfigurationError) as err:
        conf.build(raw, DATABASES)
    assert message in str(err.value)


def test_valid_engine_options_pass_and_reach_create_engine():
    raw = {
        "ENGINE_OPTIONS": {
            "echo_pool": True,
            "pool_reset_on_return": None,
            "isolation_level": "AUTOCOMMIT",
            "hide_parameters": True,
            "execution_options": {"stream_results": False},
        }
    }
    kw = kwargs(raw)
    assert kw["isolation_level"] == "AUTOCOMMIT" and kw["echo_pool"] is True


def test_pool_timeout_none_and_an_irrelevant_max_overflow_are_accepted():
    kw = kwargs({"POOL_TIMEOUT": None, "POOL_SIZE": 0, "MAX_OVERFLOW": -3})
    assert (kw["pool_timeout"], kw["pool_size"], kw["max_overflow"]) == (None, 0, -3)


def test_flask_style_settings_are_an_error_not_ignored():
    with pytest.raises(ConfigurationError) as err:
        conf.build({}, DATABASES, ["DEBUG", "SQLA_REBALANCE_RECYCLE", "SQLA_REBALANCE"])
    assert str(err.value).startswith(
        "SQLA_REBALANCE_RECYCLE: not read by the Django integration; put the settings in the "
        "SQLA_REBALANCE dict instead (SQLA_REBALANCE_RECYCLE -> SQLA_REBALANCE['RECYCLE'])"
    )
    conf.build({}, DATABASES, ["DEBUG", "SQLA_REBALANCE"])  # the setting itself is fine
