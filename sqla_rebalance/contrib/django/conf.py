"""The ``SQLA_REBALANCE`` setting: defaults, validation and per-alias merging.

::

    SQLA_REBALANCE = {
        "RECYCLE": 1800,                 # pool_recycle (s); None: no lifetime
        "JITTER": 0.2,                   # recycle_jitter
        "MIN_SIZE": 2,
        "BROADCAST": "redis://redis.internal:6379/0",
        "SECRET_ENV": "SQLA_REBALANCE_SECRET",   # where the bus secret is read from
        "DATABASES": {"replica": {"HOSTS": ["db-b:5432", "db-c:5432"], "MIN_SIZE": 4}},
    }

Top-level keys apply to every database alias that uses one of the backends
of this package, except HOSTS, TARGET_ROLE and POOL_NAME, which describe one
database and apply to the ``default`` alias only; ``DATABASES`` overrides
them per alias. Everything is validated at once (when the app loads, or when
Django creates the backend's connection wrapper if the app is not installed),
with the same checks ``create_engine`` would make, so a typo fails at
start-up rather than at the first request that needs a database. Errors are
:class:`~sqla_rebalance.ConfigurationError` naming the setting key
(``SQLA_REBALANCE['DATABASES']['replica']['MIN_SIZE']: ...``).

The bus secret is read from the environment variable ``SECRET_ENV`` when the
pool is created, not from the settings: settings files end up in
repositories and in error reports. ``SECRET`` exists for the rare
deployment that has it in a secrets manager loaded into settings; it must
be given explicitly.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed
from sqlalchemy import create_engine, util
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import QueuePool

from ...bus import open_bus
from ...config import PoolConfig
from ...dns import Resolver
from ...errors import ConfigurationError
from ...hosts import parse_hosts
from ...parameters import PARAMETERS
from ...pool import RebalancingQueuePool
from ...validation import brief_repr

__all__ = [
    "DEFAULTS",
    "MYSQL_ENGINE",
    "PER_DATABASE_KEYS",
    "POOL_KEYS",
    "POSTGRESQL_ENGINE",
    "SETTING",
    "AliasConfig",
    "Settings",
    "build",
    "for_alias",
    "get_settings",
    "reset",
]

#: The name of the Django setting.
SETTING = "SQLA_REBALANCE"
#: ``ENGINE`` values of this package's database backends.
POSTGRESQL_ENGINE = "sqla_rebalance.contrib.django.backends.postgresql"
MYSQL_ENGINE = "sqla_rebalance.contrib.django.backends.mysql"
_ENGINE_PORTS = {POSTGRESQL_ENGINE: 5432, MYSQL_ENGINE: 3306}

#: Settings key -> ``create_engine`` argument (``parameters.PARAMETERS``;
#: SECRET is read apart, see AliasConfig.secret). Keys left out are not
#: passed, so the pool's own defaults apply (see docs/configuration.md).
POOL_KEYS: dict[str, str] = {
    p.django: p.create_engine_keyword
    for p in PARAMETERS
    if p.django and p.argument != "broadcast_secret"
}
#: Properties of one database (where it is, which role, the pool's name for
#: commands): at the top level they apply to the ``default`` alias only, as
#: the Flask integration's do to the default engine. Every other alias sets
#: its own under ``DATABASES``; inheriting them would point a second database
#: at the first one's hosts, or give every pool the same name.
PER_DATABASE_KEYS = tuple(p.django for p in PARAMETERS if p.django and p.per_database)
#: Keys that are not pool arguments.
OTHER_KEYS = ("SECRET_ENV", "SECRET", "ENGINE_OPTIONS")
KNOWN_KEYS = (*POOL_KEYS, *OTHER_KEYS)

#: Defaults that differ from leaving the argument out. RECYCLE: the point of
#: this pool is connections that do not live for ever (a server's memory
#: grows with a session's age, and only new connections reach a replica
#: added behind a load balancer); 30 minutes is HikariCP's maxLifetime and
#: below common proxy and firewall idle cut-offs. POOL_NAME defaults to the
#: alias (see AliasConfig.pool_name).
DEFAULTS: dict[str, Any] = {
    "RECYCLE": 1800.0,
    "SECRET_ENV": "SQLA_REBALANCE_SECRET",
}

# Names used in PoolConfig's messages -> settings key, to name the key.
_ARG_TO_KEY = {arg: key for key, arg in POOL_KEYS.items()}
_ARG_TO_KEY.update({"timeout": "POOL_TIMEOUT", "broadcast_secret": "SECRET"})
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: create_engine arguments that the backends set themselves.
_RESERVED_ENGINE_OPTIONS = frozenset({"poolclass", "pool", "creator", "connect_args", "url"})


def _path(*parts: str) -> str:
    return SETTING + "".join(f"[{p!r}]" for p in parts)


@dataclass(frozen=True)
class AliasConfig:
    """The merged, validated settings of one database alias.

    Compared by value: the pool registry replaces an alias's pool when the
    configuration it was built from changes (``override_settings`` in tests).
    """

    alias: str
    #: Settings keys given (top level merged with the alias's overrides),
    #: plus DEFAULTS. Only these are passed on to create_engine.
    values: Mapping[str, Any] = field(default_factory=dict)

    @property
    def pool_name(self) -> str:
        """Scope of cluster-wide commands: POOL_NAME, else the alias."""
        name = self.values.get("POOL_NAME")
        return str(name) if name else self.alias

    @property
    def broadcast(self) -> Any:
        return self.values.get("BROADCAST")

    @property
    def secret_env(self) -> str:
        return str(self.values.get("SECRET_ENV") or DEFAULTS["SECRET_ENV"])

    def secret(self, env_var: str | None = None) -> str | bytes | None:
        """The bus secret: SECRET if given, else ``$SECRET_ENV`` (read now)."""
        explicit = self.values.get("SECRET")
        if explicit is not None and env_var is None:
            return explicit  # type: ignore[no-any-return]
        return os.environ.get(env_var or self.secret_env) or None

    def engine_kwargs(self, health_checks: bool) -> dict[str, Any]:
        """Arguments for ``create_engine`` (besides the URL, poolclass and connect_args).

        ``health_checks`` is the alias's ``CONN_HEALTH_CHECKS``: with a pool,
        Django's own check never sees a reused connection (every checkout
        is a "new" connection to Django), so it becomes the pool's
        pre-ping unless PRE_PING says otherwise.
        """
        kw: dict[str, Any] = dict(self.values.get("ENGINE_OPTIONS") or {})
        for key, arg in POOL_KEYS.items():
            if key in self.values:
                kw[arg] = self.values[key]
        if kw.get("pool_recycle") is None:
            kw["pool_recycle"] = -1
        if kw.get("hosts") is not None and not isinstance(kw["hosts"], str):
            kw["hosts"] = [list(h) if isinstance(h, (list, tuple)) else h for h in kw["hosts"]]
        kw["pool_name"] = self.pool_name
        if kw.get("pool_pre_ping") is None:
            kw["pool_pre_ping"] = bool(health_checks)
        if self.broadcast is not None:
            kw["broadcast_secret"] = self.secret()
        return kw


@dataclass(frozen=True)
class Settings:
    """``SQLA_REBALANCE``, validated: the top level and every alias."""

    top: AliasConfig
    aliases: Mapping[str, AliasConfig]
    #: Aliases whose ENGINE is one of this package's backends.
    pooled: tuple[str, ...] = ()

    def for_alias(self, alias: str) -> AliasConfig:
        """An alias's configuration (an unknown alias, made by ``connection.copy(alias=...)``,
        gets the top-level settings)."""
        config = self.aliases.get(alias)
        if config is None:
            return AliasConfig(alias, _inherited(self.top.values, alias))
        return config


def _inherited(top: Mapping[str, Any], alias: str) -> dict[str, Any]:
    """The top-level values that apply to ``alias`` (see PER_DATABASE_KEYS)."""
    if alias == "default":
        return dict(top)
    return {key: value for key, value in top.items() if key not in PER_DATABASE_KEYS}


def _check_key(key: object, path: str) -> None:
    if key in KNOWN_KEYS:
        return
    hint = ""
    if isinstance(key, str):
        if key.upper() in (*KNOWN_KEYS, "DATABASES"):
            hint = f" (did you mean {key.upper()!r}? keys are upper case)"
        else:
            close = difflib.get_close_matches(key.upper(), [*KNOWN_KEYS, "DATABASES"], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigurationError(f"{path}: unknown key {brief_repr(key)}{hint}")


class _DryRunPool(RebalancingQueuePool):
    """A pool class for checking ``ENGINE_OPTIONS`` with ``create_engine`` itself.

    ``create_engine`` finds pool arguments in the signatures up the class
    hierarchy, so this class takes exactly what ``RebalancingQueuePool``
    takes. It checks SQLAlchemy's own pool arguments (``QueuePool`` does) and
    starts nothing: no host set, no bus, no worker. This package's arguments
    are checked by ``PoolConfig`` with the other settings.
    """

    def __init__(self, creator: Any, **kw: Any) -> None:
        QueuePool.__init__(self, creator, **{k: v for k, v in kw.items() if k in _QUEUEPOOL_ARGS})


_QUEUEPOOL_ARGS = frozenset(util.get_cls_kwargs(QueuePool))
#: create_engine keywords it reads itself, beside the dialect's, the pool's
#: and the Engine's (only for "did you mean" hints).
_CREATE_ENGINE_OWN = ("enable_from_linting", "module", "plugins", "future")


def _engine_class(engine: str) -> Any:
    """The backend's ``DatabaseWrapper`` (None when its driver cannot be imported)."""
    try:
        return importlib.import_module(f"{engine}.base").DatabaseWrapper
    except Exception:  # no driver: the backend reports that itself, at its first connection
        return None


def _engine_options_error(options: Mapping[str, Any], engine: str) -> str | None:
    """What ``create_engine`` would say about ``options`` for this backend, or None.

    Runs ``create_engine``'s own argument handling (dialect, DBAPI, pool and
    Engine arguments, plugins) with the backend's URL, now rather than at the
    alias's first connection. Nothing connects.
    """
    wrapper = _engine_class(engine)
    drivername = getattr(wrapper, "sqla_drivername", None)
    if not isinstance(drivername, str):
        return None
    url = f"{drivername}://"
    try:
        dialect_cls = make_url(url).get_dialect()
        dialect_cls.import_dbapi()
    except Exception:  # the driver is missing: reported by the backend at its first connect
        return None
    dialect_options = dict(getattr(wrapper, "sqla_dialect_options", None) or {})
    try:
        engine_ = create_engine(
            url, poolclass=_DryRunPool, _initialize=False, **{**dialect_options, **options}
        )
    except TypeError as err:
        message = str(err)
        if not message.startswith("Invalid argument(s)"):
            return f"create_engine() refuses it: {message}"
        listed = message.split(" sent to ", 1)[0]
        unknown = re.findall(r"'([^']*)'", listed)
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, _known_engine_arguments(dialect_cls), n=1)
            hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
        plural = "s" if len(unknown) > 1 else ""
        return (
            f"unknown create_engine() argument{plural} {', '.join(hints) or message} for "
            f"{drivername} (create_engine would refuse {'them' if plural else 'it'} at the "
            "first connection)"
        )
    except Exception as err:
        return f"create_engine() refuses it: {type(err).__name__}: {err}"
    del engine_  # built and dropped: it has no connection, and its pool holds nothing
    return None


def _known_engine_arguments(dialect_cls: Any) -> list[str]:
    translate = {
        "logging_name": "pool_logging_name",
        "echo": "echo_pool",
        "timeout": "pool_timeout",
        "recycle": "pool_recycle",
        "reset_on_return": "pool_reset_on_return",
        "pre_ping": "pool_pre_ping",
        "use_lifo": "pool_use_lifo",
    }
    names = set(util.get_cls_kwargs(dialect_cls))
    names |= {translate.get(k, k) for k in util.get_cls_kwargs(RebalancingQueuePool)}
    names |= set(util.get_cls_kwargs(Engine))
    names |= set(_CREATE_ENGINE_OWN)
    names -= {"self", "creator", "dbapi", "dialect", "_dispatch", *_RESERVED_ENGINE_OPTIONS}
    return sorted(names)


def _validate_values(
    values: Mapping[str, Any],
    origin: Mapping[str, str],
    alias: str,
    port: int | None,
    engine: str | None = None,
) -> None:
    """Everything create_engine would check, without connecting to anything.

    ``engine``: the alias's ``ENGINE`` (one of this package's backends), for
    checking ``ENGINE_OPTIONS`` with ``create_engine`` itself; None for the
    top level on its own.
    """

    def fail(key: str, message: str) -> ConfigurationError:
        return ConfigurationError(f"{origin.get(key, _path(key))}: {message}")

    for key in ("USE_LIFO", "PRE_PING"):
        value = values.get(key)
        if value is not None and not isinstance(value, bool):
            raise fail(key, f"must be True or False, got {brief_repr(value)}")
    secret_env = values.get("SECRET_ENV", DEFAULTS["SECRET_ENV"])
    if not isinstance(secret_env, str) or not _ENV_NAME.match(secret_env):
        raise fail(
            "SECRET_ENV", f"must be an environment variable name, got {brief_repr(secret_env)}"
        )
    if "SECRET" in values and (
        not isinstance(values["SECRET"], (str, bytes)) or not values["SECRET"]
    ):
        raise fail("SECRET", "must be a non-empty string or bytes")
    options = values.get("ENGINE_OPTIONS")
    if options is not None:
        if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
            raise fail(
                "ENGINE_OPTIONS",
                f"must be a dict of create_engine arguments, got {brief_repr(options)}",
            )
        for name in options:
            if name in _RESERVED_ENGINE_OPTIONS:
                raise fail("ENGINE_OPTIONS", f"{name!r} is set by the backend")
            if name in _ARG_TO_KEY and _ARG_TO_KEY[name] in POOL_KEYS:
                raise fail("ENGINE_OPTIONS", f"use {_ARG_TO_KEY[name]!r} instead of {name!r}")
        if options and engine is not None:
            problem = _engine_options_error(options, engine)
            if problem is not None:
                raise fail("ENGINE_OPTIONS", problem)
    if values.get("HOSTS") is not None:
        try:
            parse_hosts(values["HOSTS"], port)
        except ConfigurationError as err:
            raise fail("HOSTS", str(err)) from None
    nameservers = values.get("DNS_NAMESERVERS")
    if nameservers is not None:
        if isinstance(nameservers, str):  # as the pool reads it: "ip:port,ip:port"
            nameservers = [n for n in nameservers.split(",") if n.strip()]
        try:
            Resolver(nameservers)  # what the pool does in create_engine; queries nothing
        except ConfigurationError as err:
            raise fail("DNS_NAMESERVERS", str(err)) from None
    if values.get("BROADCAST") is not None:
        try:
            open_bus(values["BROADCAST"])  # checks the URL; connects to nothing
        except ConfigurationError as err:
            raise fail("BROADCAST", str(err)) from None
    # The keys given, by PoolConfig.build name; the rest take the pool's defaults.
    checked = {p.build: values[p.django] for p in PARAMETERS if p.build and p.django in values}
    if checked.get("recycle", -1) is None:
        checked["recycle"] = -1  # RECYCLE: None turns the Django default off
    checked.setdefault("pool_name", alias)
    try:
        PoolConfig.build(**checked)
    except ConfigurationError as err:
        # PoolConfig's messages start with the argument's name.
        message = str(err)
        match = re.match(r"[a-z_]+", message)
        key = _ARG_TO_KEY.get(match.group(0), "") if match else ""
        raise fail(key, message) if key else ConfigurationError(f"{SETTING}: {message}") from None


def _check_other_settings(names: Iterable[str]) -> None:
    """``SQLA_REBALANCE_RECYCLE = 600`` (the Flask integration's form) is never read here."""
    stray = sorted(n for n in names if n.startswith(SETTING + "_"))
    if stray:
        keys = ", ".join(f"{n} -> {_path(n[len(SETTING) + 1 :])}" for n in stray)
        raise ConfigurationError(
            f"{', '.join(stray)}: not read by the Django integration; put the settings in "
            f"the {SETTING} dict instead ({keys}). {SETTING}_* settings are the Flask "
            "integration's form"
        )


def build(
    raw: object,
    databases: Mapping[str, Mapping[str, Any]],
    other_settings: Iterable[str] = (),
) -> Settings:
    """Validate ``raw`` (the SQLA_REBALANCE value) against ``databases`` (settings.DATABASES).

    ``other_settings``: the names of the other Django settings, so that a
    misplaced ``SQLA_REBALANCE_*`` setting is an error rather than ignored.
    """
    _check_other_settings(other_settings)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"{SETTING} must be a dict, got {type(raw).__name__}")
    top: dict[str, Any] = dict(DEFAULTS)
    origin: dict[str, str] = {}
    for key, value in raw.items():
        if key == "DATABASES":
            continue
        _check_key(key, SETTING)
        top[key] = value
        origin[key] = _path(key)
    overrides = raw.get("DATABASES") or {}
    if not isinstance(overrides, Mapping):
        raise ConfigurationError(f"{_path('DATABASES')} must be a dict of alias -> settings")
    pooled = tuple(
        alias
        for alias, db in databases.items()
        if isinstance(db, Mapping) and db.get("ENGINE") in _ENGINE_PORTS
    )
    aliases: dict[str, AliasConfig] = {}
    for alias, extra in overrides.items():
        where = _path("DATABASES", alias)
        if alias not in databases:
            raise ConfigurationError(f"{where}: no such alias in settings.DATABASES")
        if alias not in pooled:
            raise ConfigurationError(
                f"{where}: DATABASES[{alias!r}]['ENGINE'] is not a sqla_rebalance backend "
                f"({POSTGRESQL_ENGINE} or {MYSQL_ENGINE}), so these settings would have no effect"
            )
        if not isinstance(extra, Mapping):
            raise ConfigurationError(f"{where} must be a dict, got {type(extra).__name__}")
        for key in extra:
            if key == "DATABASES":
                raise ConfigurationError(f"{where}: DATABASES cannot be nested")
            _check_key(key, where)
    broadcast_anywhere = top.get("BROADCAST") is not None
    for alias in pooled:
        db = databases[alias]
        extra = overrides.get(alias) or {}
        values = _inherited(top, alias)
        values.update(extra)
        alias_origin = dict(origin)
        alias_origin.update({key: _path("DATABASES", alias, key) for key in extra})
        if isinstance(db.get("OPTIONS"), Mapping) and db["OPTIONS"].get("pool"):
            raise ConfigurationError(
                f"DATABASES[{alias!r}]['OPTIONS']['pool']: that is Django's own psycopg pool; "
                "the sqla_rebalance backend pools connections itself, remove it"
            )
        engine = str(db.get("ENGINE"))
        _validate_values(values, alias_origin, alias, _ENGINE_PORTS[engine], engine)
        broadcast_anywhere |= values.get("BROADCAST") is not None
        aliases[alias] = AliasConfig(alias, values)
    # The top level on its own (for aliases made at run time, and so that a
    # bad value fails even before any alias uses the backends).
    _validate_values(top, origin, "default", None)
    if "SECRET" in top and not broadcast_anywhere:
        raise ConfigurationError(f"{_path('SECRET')}: is set but no BROADCAST is")
    return Settings(top=AliasConfig("default", top), aliases=aliases, pooled=pooled)


_cache: Settings | None = None
_cache_lock = threading.Lock()


def get_settings() -> Settings:
    """The validated settings of this process (cached; see :func:`reset`)."""
    global _cache
    cached = _cache
    if cached is not None:
        return cached
    with _cache_lock:
        if _cache is None:
            _cache = build(
                getattr(django_settings, SETTING, None),
                getattr(django_settings, "DATABASES", {}),
                dir(django_settings),
            )
        return _cache


def for_alias(alias: str) -> AliasConfig:
    return get_settings().for_alias(alias)


def reset() -> None:
    """Forget the cached settings (they are read again, and validated, at next use)."""
    global _cache
    with _cache_lock:
        _cache = None


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    # override_settings() in tests: re-read the settings, and let the pools
    # built from the old ones go (the registry compares the configuration).
    if setting in (SETTING, "DATABASES"):
        reset()
        if setting == "DATABASES":
            from .pools import dispose

            dispose()


# Connected here rather than in AppConfig.ready(): the backends work without
# the app in INSTALLED_APPS, and must follow setting changes then too.
setting_changed.connect(_on_setting_changed, dispatch_uid="sqla_rebalance.contrib.django.conf")
