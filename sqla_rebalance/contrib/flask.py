"""Flask integration: ``Rebalance(app)`` configures ``RebalancingQueuePool`` from
``SQLA_REBALANCE_*`` settings and adds the ``flask rebalance`` commands.

With Flask-SQLAlchemy, the extension writes ``poolclass`` and the pool
arguments into ``SQLALCHEMY_ENGINE_OPTIONS`` and into every entry of
``SQLALCHEMY_BINDS``, because those dictionaries are the only way in:
Flask-SQLAlchemy reads them, and creates every engine, inside
``db.init_app(app)``. Hence the one ordering rule: ``Rebalance(app)`` first,
``db.init_app(app)`` second. ``init_app`` refuses to run once
``app.extensions["sqlalchemy"]`` exists, since the engines are already built
by then and a setting written afterwards would be silently ignored.

Without Flask-SQLAlchemy, :meth:`Rebalance.engine_options` returns the
keyword arguments for your own ``create_engine``.

Everything is checked in ``init_app``: an unknown ``SQLA_REBALANCE_*`` key, a
value of the wrong type or range, or a clash with one of your own engine
options raises :class:`~sqla_rebalance.ConfigurationError` naming the config
key, rather than failing later (or not at all) inside ``create_engine``.

See ``docs/flask.md`` for the guide.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import AppGroup
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url

from ..bus import Bus, BusUnavailableError, ProcessStatus, fleet_status, open_bus, send_command
from ..bus import wait_for as bus_wait_for
from ..bus.base import redact
from ..bus.listener import process_id
from ..bus.message import ACTIONS, MAX_SPREAD
from ..bus.report import ACTION_HELP, process_lines, sent_line, sent_record, wait_lines
from ..config import DEFAULT_POOL_NAME, PoolConfig, brief_repr
from ..dns import Resolver, parse_nameserver
from ..errors import ConfigurationError, RebalanceError
from ..hosts import parse_hosts
from ..plugin import _defaults, parse_hosts_param
from ..pool import SECRET_ENV, AsyncRebalancingQueuePool, RebalancingQueuePool

__all__ = [
    "BINDS_KEY",
    "CONFIG_PREFIX",
    "EXTENSION_KEY",
    "SETTINGS",
    "EnginePlan",
    "InitOrderError",
    "Rebalance",
    "Setting",
    "cli",
]

log = logging.getLogger("sqla_rebalance.flask")

CONFIG_PREFIX = "SQLA_REBALANCE_"
#: Keys starting with this (in any case) are ours: a key that is not one of
#: the known ones is a typo, never something to ignore.
_OURS = CONFIG_PREFIX.rstrip("_")
#: Per-bind overrides: ``{"analytics": {"hosts": [...], "min_size": 2}}``.
BINDS_KEY = "SQLA_REBALANCE_BINDS"
#: Where the extension keeps its per-app state (``app.extensions[...]``).
EXTENSION_KEY = "sqla_rebalance"
_FSA_KEY = "sqlalchemy"

#: Flask-SQLAlchemy creates its engines with ``engine_from_config``, which
#: passes these through ``int()`` (``Dialect.engine_config_types``).
_INT_COERCED = ("pool_recycle", "pool_timeout", "pool_size", "max_overflow")
#: Flask-SQLAlchemy gives MySQL engines ``pool_recycle=7200`` unless set.
_FSA_MYSQL_RECYCLE = 7200


class InitOrderError(RuntimeError, RebalanceError):
    """``Rebalance.init_app`` ran after Flask-SQLAlchemy had created the engines."""


# --------------------------------------------------------------------------- values


class _Unset:
    """An override of ``None``: drop the inherited value, use the pool's default."""

    def __repr__(self) -> str:
        return "None"


_UNSET = _Unset()


def _number(label: str, value: Any) -> float | int:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigurationError(f"{label} must be a number, got {brief_repr(value)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{label} must be a number, got {brief_repr(value)}")
    # An int is finite however large (math.isfinite would raise OverflowError
    # past 1.8e308); the pool's range checks refuse what is too large.
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigurationError(f"{label} must be a finite number, got {brief_repr(value)}")
    return value


def _optional_number(label: str, value: Any) -> float | int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    return _number(label, value)


def _integer(label: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            text = value.strip().lstrip("+-")
            if text.isascii() and text.isdigit():  # more than 4,300 digits
                raise ConfigurationError(
                    f"{label} is out of range: an integer of {len(text)} digits"
                ) from None
            raise ConfigurationError(
                f"{label} must be an integer, got {brief_repr(value)}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{label} must be an integer, got {brief_repr(value)}")
    return value


def _text(label: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{label} must be a non-empty string, got {brief_repr(value)}")
    return value.strip()


def _hosts(label: str, value: Any) -> list[Any]:
    if isinstance(value, str):
        return parse_hosts_param(value, label)
    if isinstance(value, (list, tuple)):
        # Shape only; ports are checked once the engine's URL is known.
        try:
            parse_hosts(value, None, paths=True)
        except ConfigurationError as err:
            raise ConfigurationError(f"{label}: {err}") from None
        return [list(item) if isinstance(item, (list, tuple)) else item for item in value]
    raise ConfigurationError(
        f"{label} must be a list of 'name:port' strings (a nested list is a lower tier) or "
        f"a string such as 'a:5432,b:5432|dr:5432', got {brief_repr(value)}"
    )


def _nameservers(label: str, value: Any) -> Any:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigurationError(f"{label} must not be empty (leave it out for the system's)")
        for item in value:
            try:
                parse_nameserver(item)
            except ConfigurationError as err:
                raise ConfigurationError(f"{label}: {err}") from None
        return list(value)
    try:  # a ready dnspython Resolver
        Resolver(value)
    except ConfigurationError as err:
        raise ConfigurationError(f"{label}: {err}") from None
    return value


def _broadcast(label: str, value: Any) -> str | Bus:
    if isinstance(value, str):
        value = value.strip()
    try:
        open_bus(value)  # checks the scheme and the driver; connects to nothing
    except ConfigurationError as err:
        message = str(err).removeprefix("broadcast: ")
        raise ConfigurationError(f"{label}: {message}") from None
    result: str | Bus = value
    return result


def _secret(label: str, value: Any) -> str | bytes:
    if not isinstance(value, (str, bytes)) or not value:
        # The value itself is never repeated: it may be a real secret of the wrong type.
        raise ConfigurationError(f"{label} must be a non-empty string or bytes")
    return value


@dataclass(frozen=True)
class Setting:
    """One ``SQLA_REBALANCE_*`` key and the ``create_engine`` keyword it sets."""

    #: The key's suffix, lower case: ``SQLA_REBALANCE_<NAME>``, and its name
    #: inside ``SQLA_REBALANCE_BINDS`` entries.
    name: str
    #: The ``create_engine`` keyword (``pool_recycle``, ``recycle_jitter``...).
    keyword: str
    parse: Callable[[str, Any], Any] = field(repr=False)
    #: False: a property of one database (its hosts, their role, the pool's
    #: name), so only the default engine gets the global value; each bind
    #: sets its own in ``SQLA_REBALANCE_BINDS``.
    inherited: bool = True
    #: ``None`` is a value the pool gives a meaning to (rather than "unset").
    none_is_value: bool = False

    @property
    def key(self) -> str:
        return CONFIG_PREFIX + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("recycle", "pool_recycle", _number),
    Setting("jitter", "recycle_jitter", _number),
    Setting("min_size", "min_size", _integer),
    Setting("max_idle", "max_idle", _optional_number, none_is_value=True),
    Setting("pool_name", "pool_name", _text, inherited=False),
    Setting("hosts", "hosts", _hosts, inherited=False),
    Setting("target_role", "target_role", _text, inherited=False),
    Setting("dns_nameservers", "dns_nameservers", _nameservers),
    Setting("dns_min_refresh", "dns_min_refresh", _number),
    Setting("dns_max_refresh", "dns_max_refresh", _number),
    Setting("health_check_interval", "health_check_interval", _optional_number, none_is_value=True),
    Setting("health_check_timeout", "health_check_timeout", _number),
    Setting("connect_deadline", "connect_deadline", _number),
    Setting("unhealthy_threshold", "unhealthy_threshold", _integer),
    Setting("rebalance_spread", "rebalance_spread", _number),
    Setting("broadcast", "broadcast", _broadcast),
    Setting("secret", "broadcast_secret", _secret),
    Setting("min_recycle_interval", "min_recycle_interval", _number),
)
_BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
#: Names accepted inside ``SQLA_REBALANCE_BINDS`` entries: the key suffix
#: (``jitter``) or the ``create_engine`` keyword (``recycle_jitter``).
_BY_BIND_NAME: dict[str, Setting] = {
    **{s.keyword: s for s in SETTINGS},
    **{s.name: s for s in SETTINGS},
}
_KNOWN_KEYS = (*_BY_KEY, BINDS_KEY)

#: ``create_engine`` keyword -> ``PoolConfig.build`` parameter, where they differ.
_BUILD_NAMES = {"pool_recycle": "recycle", "pool_timeout": "timeout"}
_BUILD_PARAMS = frozenset(inspect.signature(PoolConfig.build).parameters)


@dataclass(frozen=True)
class _Value:
    setting: Setting
    value: Any
    #: Where it came from, for messages: ``SQLA_REBALANCE_MIN_SIZE``.
    label: str
    #: Chosen by the extension (a bind's pool name), not configured: an
    #: engine option of the user's own wins over it without complaint.
    implied: bool = False

    def describe(self) -> str:
        if self.implied:
            return self.label
        if self.setting.keyword == "broadcast_secret":
            return self.label  # never print a secret
        shown = redact(self.value) if isinstance(self.value, str) else self.value
        return f"{self.label}={brief_repr(shown)}"


def _parse(setting: Setting, label: str, raw: Any) -> Any:
    """The parsed value, or ``_UNSET`` for a ``None`` that means "not set"."""
    if raw is None and not setting.none_is_value:
        return _UNSET
    return setting.parse(label, raw)


def _prefix_alone(value: Any) -> ConfigurationError:
    """``SQLA_REBALANCE = {...}`` (the Django form): say which keys to use instead."""
    hints = []
    if isinstance(value, Mapping):
        for name, raw in value.items():
            setting = _BY_BIND_NAME.get(name.lower()) if isinstance(name, str) else None
            if setting is not None:
                shown = "<secret>" if setting.keyword == "broadcast_secret" else brief_repr(raw)
                hints.append(f"{setting.key}={shown}")
            elif isinstance(name, str) and name.upper() in ("DATABASES", "BINDS"):
                hints.append(f"{BINDS_KEY}={{...}}")
    instead = f" (here: {', '.join(hints)})" if hints else ""
    return ConfigurationError(
        f"{_OURS} is not read by the Flask extension: set one {CONFIG_PREFIX}* key per "
        f"setting, such as {CONFIG_PREFIX}RECYCLE=1800{instead}, and per-bind settings in "
        f"{BINDS_KEY}; a dict under {_OURS} is the Django integration's form"
    )


def _read_config(
    config: Mapping[str, Any],
) -> tuple[dict[str, _Value], dict[str, dict[str, _Value | _Unset]]]:
    ours = [k for k in config if isinstance(k, str) and k.upper().startswith(_OURS)]
    if any(k.upper() == _OURS for k in ours):
        raise _prefix_alone(next(config[k] for k in ours if k.upper() == _OURS))
    unknown = sorted(k for k in ours if k not in _KNOWN_KEYS)
    if unknown:
        hints = []
        for key in unknown:
            if key.upper() in _KNOWN_KEYS:
                hints.append(f"{key} (did you mean {key.upper()}? config keys are upper case)")
                continue
            close = difflib.get_close_matches(key.upper(), _KNOWN_KEYS, n=1)
            hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
        raise ConfigurationError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
            f"known: {', '.join(_KNOWN_KEYS)}"
        )
    globals_: dict[str, _Value] = {}
    for key, setting in _BY_KEY.items():
        if key in config:
            value = _parse(setting, key, config[key])
            if value is not _UNSET:
                globals_[setting.keyword] = _Value(setting, value, key)
    binds: dict[str, dict[str, _Value | _Unset]] = {}
    raw_binds = config.get(BINDS_KEY)
    if raw_binds is None:
        return globals_, binds
    if not isinstance(raw_binds, Mapping):
        raise ConfigurationError(
            f"{BINDS_KEY} must be a dict of bind key -> dict of settings, "
            f"got {brief_repr(raw_binds)}"
        )
    for bind, entries in raw_binds.items():
        where = f"{BINDS_KEY}[{bind!r}]"
        if not isinstance(bind, str) or not bind:
            raise ConfigurationError(
                f"{where}: bind keys are non-empty strings (the default engine is set by the "
                f"{CONFIG_PREFIX}* keys themselves)"
            )
        if not isinstance(entries, Mapping):
            raise ConfigurationError(
                f"{where} must be a dict of settings, got {brief_repr(entries)}"
            )
        parsed: dict[str, _Value | _Unset] = {}
        for name, raw in entries.items():
            found = _BY_BIND_NAME.get(name) if isinstance(name, str) else None
            if found is None:
                known = ", ".join(s.name for s in SETTINGS)
                raise ConfigurationError(
                    f"{where}: unknown setting {brief_repr(name)}; known: {known}"
                )
            setting = found
            if setting.keyword in parsed:
                raise ConfigurationError(
                    f"{where} sets {setting.name} twice (as {setting.name!r} and "
                    f"{setting.keyword!r})"
                )
            label = f"{where}[{name!r}]"
            value = _parse(setting, label, raw)
            parsed[setting.keyword] = value if value is _UNSET else _Value(setting, value, label)
        binds[bind] = parsed
    return globals_, binds


def _check_secret_has_bus(
    globals_: Mapping[str, _Value], binds: Mapping[str, Mapping[str, _Value | _Unset]]
) -> None:
    """A secret with no bus anywhere is a mistake (a misspelt or forgotten
    ``SQLA_REBALANCE_BROADCAST``), not something to drop quietly."""
    if "broadcast_secret" not in globals_ or "broadcast" in globals_:
        return
    if any(isinstance(b.get("broadcast"), _Value) for b in binds.values()):
        return
    raise ConfigurationError(
        "SQLA_REBALANCE_SECRET is set but SQLA_REBALANCE_BROADCAST is not: the secret signs "
        "cluster-wide commands, which need a bus"
    )


# --------------------------------------------------------------------------- plans


@dataclass
class EnginePlan:
    """What the extension decided for one engine (``bind`` None: the default one)."""

    bind: str | None
    pool_name: str
    #: ``create_engine`` keyword -> value, as added to the engine options.
    values: dict[str, _Value] = field(default_factory=dict)
    #: False when the engine keeps its own pool (an in-memory SQLite database).
    managed: bool = True
    reason: str | None = None
    #: The bus the pool will listen on and the secret it will check (from
    #: our settings or the user's own engine options); None: not configured
    #: (the pool then reads ``$SQLA_REBALANCE_SECRET`` itself).
    bus: str | Bus | None = None
    bus_secret: str | bytes | None = None

    def options(self, is_async: bool = False) -> dict[str, Any]:
        """``poolclass`` and the pool arguments, a fresh dict."""
        poolclass = AsyncRebalancingQueuePool if is_async else RebalancingQueuePool
        return {"poolclass": poolclass, **{kw: v.value for kw, v in self.values.items()}}

    @property
    def where(self) -> str:
        return "default engine" if self.bind is None else f"bind {self.bind!r}"


def _url_of(value: Any) -> URL | None:
    if value is None:
        return None
    try:
        return make_url(value)
    except (sa_exc.ArgumentError, TypeError, ValueError):
        return None  # Flask-SQLAlchemy / create_engine report a bad URL in their words


def _memory_sqlite(url: URL) -> bool:
    """Would every connection of a pool be its own, empty database?"""
    if url.get_backend_name() != "sqlite":
        return False
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        return True
    return url.query.get("mode") == "memory"


def _same(a: Any, b: Any) -> bool:
    if a == b:
        return True
    try:  # "600" from an .ini file and 600: engine_from_config converts the former
        return float(a) == float(b)
    except (TypeError, ValueError, OverflowError):
        return False


def _explain(err: ConfigurationError, labels: Mapping[str, str], where: str) -> ConfigurationError:
    """Re-word a pool message to name the config keys it is about.

    The pool's checks stay in one place (``PoolConfig``); its message names
    the argument (``recycle_jitter must be in [0, 1)``), which a user who
    wrote ``SQLA_REBALANCE_JITTER`` should not have to translate.
    """
    message = str(err)
    mentioned = [
        (keyword, label)
        for keyword, label in labels.items()
        if re.search(rf"\b{re.escape(keyword)}\b", message)
    ]
    subject = [label for keyword, label in mentioned if message.startswith(keyword)]
    # Other settings count when the message quotes their value, "min_size (9)
    # cannot be larger than pool_size (5)"; not when it only names them, "(a
    # fraction of pool_recycle)".
    quoted = [
        label
        for keyword, label in mentioned
        if label not in subject and re.search(rf"\b{re.escape(keyword)} \(", message)
    ]
    culprits = subject + quoted
    prefix = ", ".join(culprits)
    return ConfigurationError(f"{prefix} ({where}): {message}" if prefix else f"{where}: {message}")


def _plan(
    state: _AppState,
    bind: str | None,
    *,
    user: Mapping[str, Any] | None = None,
    user_label: str = "",
    url: Any = None,
    through_fsa: bool = False,
) -> EnginePlan:
    """Decide the options of one engine and check them against the user's own.

    ``user`` are the engine options already configured for it
    (``SQLALCHEMY_ENGINE_OPTIONS`` or the bind's dict); ``url`` its URL
    when known. ``through_fsa``: the engine will be made by
    Flask-SQLAlchemy (``engine_from_config``, which converts some values
    with ``int()``).
    """
    where = "default engine" if bind is None else f"bind {bind!r}"
    if bind is None:
        values = dict(state.globals)
    else:
        values = {kw: v for kw, v in state.globals.items() if v.setting.inherited}
        for keyword, override in state.binds.get(bind, {}).items():
            if isinstance(override, _Value):
                values[keyword] = override
            else:
                values.pop(keyword, None)
        if "pool_name" not in values:
            values["pool_name"] = _Value(
                _BY_BIND_NAME["pool_name"], bind, f"pool_name={bind!r} (the bind key)", implied=True
            )
    user = user or {}
    bus = values["broadcast"].value if "broadcast" in values else user.get("broadcast")
    secret = values.get("broadcast_secret")
    if bus is None and secret is not None:
        if secret.label != "SQLA_REBALANCE_SECRET":
            raise ConfigurationError(
                f"{secret.label} is set but this engine has no bus (broadcast) ({where})"
            )
        # A global secret is meant for the engines that have a bus; the pool
        # refuses a secret without one.
        del values["broadcast_secret"]
    sa_url = _url_of(url)
    if sa_url is not None and _memory_sqlite(sa_url):
        reason = (
            "SQLite in-memory database: with a pool of several connections each one would be "
            "a separate, empty database, so it keeps its own pool"
            + (" (Flask-SQLAlchemy's StaticPool)" if through_fsa else "")
        )
        log.info("%s: not managed by sqla-rebalance: %s", where, reason)
        return EnginePlan(bind, DEFAULT_POOL_NAME, managed=False, reason=reason)

    given = user.get("poolclass")
    if given is not None and not (
        isinstance(given, type) and issubclass(given, RebalancingQueuePool)
    ):
        name = getattr(given, "__name__", repr(given))
        raise ConfigurationError(
            f"{user_label}['poolclass']={name} conflicts with Rebalance, which sets "
            "poolclass=RebalancingQueuePool; remove it (or use a subclass of "
            f"RebalancingQueuePool) ({where})"
        )
    if user.get("pool") is not None:
        raise ConfigurationError(
            f"{user_label}['pool'] (a ready-made pool) conflicts with Rebalance, which sets "
            f"poolclass=RebalancingQueuePool; remove it ({where})"
        )
    for keyword, ours in list(values.items()):
        if keyword not in user:
            continue
        if ours.implied:
            del values[keyword]  # the user's own choice wins over a default of ours
        elif not _same(user[keyword], ours.value):
            theirs = "<secret>" if keyword == "broadcast_secret" else repr(user[keyword])
            raise ConfigurationError(
                f"{ours.describe()} conflicts with {user_label}[{keyword!r}]={theirs} "
                f"({where}); set it in one place"
            )

    recycle = values.get("pool_recycle")
    if (
        through_fsa
        and recycle is not None
        and isinstance(recycle.value, float)  # an int is whole however large
        and not recycle.value.is_integer()
    ):
        raise ConfigurationError(
            f"{recycle.describe()}: must be a whole number of seconds with Flask-SQLAlchemy, "
            f"whose engine_from_config() passes pool_recycle through int() ({where})"
        )

    # Validate as the pool will, with the user's options and the defaults.
    merged: dict[str, Any] = {
        k: v for k, v in _defaults(RebalancingQueuePool).items() if k in _BUILD_PARAMS
    }
    labels: dict[str, str] = {}
    for keyword, raw in user.items():
        arg = _BUILD_NAMES.get(keyword, keyword)
        if arg not in _BUILD_PARAMS or not isinstance(keyword, str):
            continue
        value = raw
        if through_fsa and keyword in _INT_COERCED and raw is not None:
            try:
                value = int(raw)
            except (TypeError, ValueError, OverflowError):
                continue  # create_engine reports it
        merged[arg] = value
        labels[keyword] = f"{user_label}[{keyword!r}]={brief_repr(raw)}"
    for keyword, ours in values.items():
        arg = _BUILD_NAMES.get(keyword, keyword)
        if arg in _BUILD_PARAMS:
            merged[arg] = ours.value
            labels[keyword] = ours.describe()
    if (
        through_fsa
        and sa_url is not None
        and sa_url.drivername.startswith("mysql")  # as Flask-SQLAlchemy tests it
        and "pool_recycle" not in user
        and "pool_recycle" not in values
    ):
        merged["recycle"] = _FSA_MYSQL_RECYCLE
    try:
        config = PoolConfig.build(**merged)
    except ConfigurationError as err:
        raise _explain(err, labels, where) from None

    hosts = values.get("hosts")
    if hosts is not None and sa_url is not None:
        try:  # ports and duplicates, now that we know whether "hosts" are SQLite files
            parse_hosts(hosts.value, None, paths=sa_url.get_backend_name() == "sqlite")
        except ConfigurationError as err:
            raise ConfigurationError(f"{hosts.label} ({where}): {err}") from None
    if secret is not None and "broadcast_secret" in values:
        bus_secret: Any = secret.value
    else:
        bus_secret = user.get("broadcast_secret")
    return EnginePlan(bind, config.pool_name, values, bus=bus, bus_secret=bus_secret)


@dataclass
class _AppState:
    """Per-app state, in ``app.extensions["sqla_rebalance"]``."""

    globals: dict[str, _Value]
    binds: dict[str, dict[str, _Value | _Unset]]
    #: Every engine configured so far: those written into the
    #: Flask-SQLAlchemy config, then any asked for by ``engine_options()``.
    plans: dict[str | None, EnginePlan] = field(default_factory=dict)
    #: Engines made by the application itself, for ``flask rebalance status``.
    engines: dict[str | None, list[Engine]] = field(default_factory=dict)

    def plan(self, bind: str | None) -> EnginePlan:
        plan = self.plans.get(bind)
        if plan is None:
            plan = self.plans[bind] = _plan(self, bind)
        return plan

    def managed_plans(self) -> list[EnginePlan]:
        plans = [p for p in self.plans.values() if p.managed]
        # Nothing configured (yet): the engine engine_options(app) would give.
        return plans or ([self.plan(None)] if not self.plans else [])

    def pool_names(self) -> list[str]:
        return sorted({p.pool_name for p in self.managed_plans()})


# --------------------------------------------------------------------------- extension


class Rebalance:
    """The Flask extension: ``Rebalance(app)`` or ``rebalance.init_app(app)``.

    Call it **before** ``db.init_app(app)`` (Flask-SQLAlchemy creates the
    engines there); it raises :class:`InitOrderError` otherwise. It reads
    the app's config once, in :meth:`init_app`, so set the ``SQLALCHEMY_*``
    and ``SQLA_REBALANCE_*`` keys first. One instance can serve several apps
    (application factories); all state is kept per app.
    """

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Validate the settings, merge them into the Flask-SQLAlchemy config
        (if any) and register the ``flask rebalance`` command group."""
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "Rebalance is already initialised on this app; init_app() once per app"
            )
        if _FSA_KEY in app.extensions:
            raise InitOrderError(
                "Rebalance must be initialised before Flask-SQLAlchemy: db.init_app(app) has "
                "already created this app's engines (app.extensions['sqlalchemy'] exists), so "
                "pool settings written now would never reach them. Call rebalance.init_app(app) "
                "(or Rebalance(app)) first, then db.init_app(app)."
            )
        globals_, binds = _read_config(app.config)
        _check_secret_has_bus(globals_, binds)
        state = _AppState(globals_, binds)
        _configure_flask_sqlalchemy(app, state)
        app.extensions[EXTENSION_KEY] = state
        app.cli.add_command(cli)
        for plan in state.plans.values():
            if plan.managed:
                log.info(
                    "%s: RebalancingQueuePool %s (%s)",
                    plan.where,
                    plan.pool_name,
                    ", ".join(v.describe() for v in plan.values.values()) or "defaults",
                )

    @staticmethod
    def _state(app: Flask) -> _AppState:
        state = app.extensions.get(EXTENSION_KEY)
        if not isinstance(state, _AppState):
            raise RuntimeError(
                "Rebalance is not initialised on this app: call Rebalance(app) or "
                "rebalance.init_app(app) first"
            )
        return state

    def engine_options(
        self, app: Flask, bind: str | None = None, *, is_async: bool = False
    ) -> dict[str, Any]:
        """Keyword arguments for your own ``create_engine(url, **options)``.

        ``poolclass`` (``AsyncRebalancingQueuePool`` with ``is_async``, for
        ``create_async_engine``) and the configured pool arguments. For a
        ``bind``, the inherited settings plus its ``SQLA_REBALANCE_BINDS``
        entry, and ``pool_name=bind`` unless one is configured. Options such
        as ``pool_size`` are yours to add; the pool checks the combination.
        """
        plan = self._state(app).plan(bind)
        if not plan.managed:
            raise ConfigurationError(
                f"{plan.where} is not managed by sqla-rebalance: {plan.reason}"
            )
        return plan.options(is_async)

    def register_engine(self, app: Flask, engine: Engine, bind: str | None = None) -> Engine:
        """Make an engine you created yourself visible to ``flask rebalance status``
        (engines of Flask-SQLAlchemy are found without this). Returns ``engine``."""
        self._state(app).engines.setdefault(bind, []).append(engine)
        return engine

    def pool_names(self, app: Flask) -> list[str]:
        """The pool names this app configures: the default targets of the commands."""
        return self._state(app).pool_names()

    def plans(self, app: Flask) -> dict[str | None, EnginePlan]:
        """What was decided for each engine so far (for inspection and tests)."""
        return dict(self._state(app).plans)


def _configure_flask_sqlalchemy(app: Flask, state: _AppState) -> None:
    """Merge the pool options into ``SQLALCHEMY_ENGINE_OPTIONS`` and ``SQLALCHEMY_BINDS``.

    The dictionaries are replaced by merged copies, never changed in place:
    a config dict is often a module-level constant shared by several apps
    (tests), which must not see each other's options.
    """
    config = app.config
    options = config.get("SQLALCHEMY_ENGINE_OPTIONS") or {}
    binds = config.get("SQLALCHEMY_BINDS") or {}
    if not isinstance(options, Mapping):
        raise ConfigurationError(f"SQLALCHEMY_ENGINE_OPTIONS must be a dict, got {options!r}")
    if not isinstance(binds, Mapping):
        raise ConfigurationError(f"SQLALCHEMY_BINDS must be a dict, got {binds!r}")
    uri = config.get("SQLALCHEMY_DATABASE_URI") or options.get("url")
    if binds:
        unknown = sorted(set(state.binds) - {k for k in binds if isinstance(k, str)})
        if unknown:
            raise ConfigurationError(
                f"{BINDS_KEY} has entries for {', '.join(map(repr, unknown))}, which "
                f"SQLALCHEMY_BINDS does not define (binds: {', '.join(map(repr, binds))})"
            )
        if uri is None and None not in binds:
            per_engine = [v.label for v in state.globals.values() if not v.setting.inherited]
            if per_engine:
                raise ConfigurationError(
                    f"{', '.join(per_engine)} apply to the default engine, and there is none "
                    "(no SQLALCHEMY_DATABASE_URI); set them per bind in "
                    f"{BINDS_KEY} = {{'<bind>': {{...}}}}"
                )
    if uri is not None:
        plan = _plan(
            state,
            None,
            user=options,
            user_label="SQLALCHEMY_ENGINE_OPTIONS",
            url=uri,
            through_fsa=True,
        )
        state.plans[None] = plan
        if plan.managed:
            config["SQLALCHEMY_ENGINE_OPTIONS"] = {**options, **plan.options()}
    if not binds:
        return
    merged: dict[Any, Any] = {}
    for key, value in binds.items():
        if key is None and uri is not None:
            # Flask-SQLAlchemy lays SQLALCHEMY_ENGINE_OPTIONS over it: done above.
            merged[key] = value
            continue
        label = f"SQLALCHEMY_BINDS[{key!r}]"
        if isinstance(value, (str, URL)):
            user: Mapping[str, Any] = {}
            url: Any = value
        elif isinstance(value, Mapping):
            user, url = value, value.get("url")
        else:
            raise ConfigurationError(f"{label} must be a URL or a dict of engine options")
        plan = _plan(state, key, user=user, user_label=label, url=url, through_fsa=True)
        state.plans[key] = plan
        merged[key] = {**user, "url": url, **plan.options()} if plan.managed else value
    config["SQLALCHEMY_BINDS"] = merged


# --------------------------------------------------------------------------- commands


class _Fail(click.ClickException):
    """A usage or configuration problem: exit status 2, as ``sqla-rebalance``."""

    exit_code = 2


class _BusFail(_Fail):
    """The bus cannot be reached: exit status 3, as ``sqla-rebalance``."""

    exit_code = 3


def _current_state() -> _AppState:
    return Rebalance._state(current_app)


@dataclass(frozen=True)
class _Target:
    """One bus this app's pools listen on, with the secret they check and their names."""

    bus: str | Bus
    secret: str | bytes | None
    pools: tuple[str, ...]

    @property
    def display(self) -> str:
        return redact(self.bus) if isinstance(self.bus, str) else self.bus.display_url


def _targets(state: _AppState) -> list[_Target]:
    grouped: dict[tuple[str, str | bytes | None], tuple[str | Bus, set[str]]] = {}
    for plan in state.managed_plans():
        bus = plan.bus
        if bus is None:
            continue
        key = (bus if isinstance(bus, str) else bus.key, plan.bus_secret)
        grouped.setdefault(key, (bus, set()))[1].add(plan.pool_name)
    return [
        _Target(bus, secret, tuple(sorted(names))) for (_, secret), (bus, names) in grouped.items()
    ]


_NO_BUS = (
    "no bus configured: set SQLA_REBALANCE_BROADCAST (redis://..., postgresql://... or "
    "sqlite:///path) in the app config. Commands reach the app's processes through that bus; "
    "this CLI process serves no requests, so acting on its own pools would change nothing."
)


def _send(
    action: str,
    pool: tuple[str, ...],
    wait: float | None,
    unsigned: bool,
    as_json: bool,
    host: str | None = None,
    spread: float = 0.0,
) -> None:
    targets = _targets(_current_state())
    if not targets:
        raise _Fail(_NO_BUS)
    # Resolve every secret before publishing anything: no half-sent batch.
    plan: list[tuple[_Target, str | bytes | None]] = []
    for target in targets:
        secret = None if unsigned else (target.secret or os.environ.get(SECRET_ENV) or None)
        if secret is None and not unsigned:
            raise _Fail(
                f"no secret to sign with for {target.display}: set SQLA_REBALANCE_SECRET in "
                f"the app config or ${SECRET_ENV} (the pools' broadcast_secret), or pass "
                "--unsigned for pools configured without one"
            )
        plan.append((target, secret))
    sent_list: list[tuple[_Target, str, Any]] = []
    out: list[dict[str, Any]] = []
    for target, secret in plan:
        for name in pool or target.pools:
            try:
                sent = send_command(
                    target.bus, action, pool=name, host=host, spread=spread, secret=secret
                )
            except (ValueError, ConfigurationError) as err:
                raise _Fail(str(err)) from None
            except BusUnavailableError as err:
                raise _BusFail(f"cannot publish on {target.display}: {err}") from None
            sent_list.append((target, name, sent))
            out.append(sent_record(sent, bus=target.display))
            if not as_json:
                click.echo(sent_line(sent, where=target.display))
    status = 0
    if wait is not None:
        deadline = time.monotonic() + wait
        for (target, name, sent), record in zip(sent_list, out, strict=True):
            try:
                result = bus_wait_for(
                    target.bus,
                    sent.generation,
                    pool=name,
                    timeout=max(0.0, deadline - time.monotonic()),
                )
            except BusUnavailableError as err:
                raise _BusFail(f"cannot read status from {target.display}: {err}") from None
            record.update(sent_record(sent, result, bus=target.display))
            if not result.complete:
                status = 1
            if not as_json:
                for line in wait_lines(result, name):
                    click.echo(f"pool {name}: {line}")
    if as_json:
        click.echo(json.dumps(out, indent=2))
    if status:
        raise click.exceptions.Exit(status)


def _action_command(action: str) -> click.Command:
    def run(**kwargs: Any) -> None:
        _send(action, **kwargs)

    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option(
            "--pool",
            multiple=True,
            metavar="NAME",
            help="pool name or glob; repeat for several (default: every pool this app "
            "configures; '*' is every pool on the bus)",
        )
    ]
    if action == "recycle":
        options.append(
            click.option("--host", default=None, help="only the connections to this host")
        )
        options.append(
            click.option(
                "--spread",
                type=click.FloatRange(0.0, MAX_SPREAD),
                default=0.0,
                show_default=True,
                help="seconds over which each process spreads its reconnects",
            )
        )
    options += [
        click.option(
            "--wait",
            type=click.FloatRange(min=0.0),
            is_flag=False,
            flag_value=30.0,
            default=None,
            metavar="[SECONDS]",
            help="wait until every live process with a matching pool has applied it "
            "(30 s when given without a value); exit status 1 if some have not",
        ),
        click.option(
            "--unsigned",
            is_flag=True,
            help="send without a signature (only pools configured without a secret accept it)",
        ),
        click.option("--json", "as_json", is_flag=True, help="print JSON instead of text"),
    ]
    func: Callable[..., Any] = run
    for option in reversed(options):
        func = option(func)
    summary = ACTION_HELP[action]
    help_text = (
        f"{summary[:1].upper()}{summary[1:]}, in every process of this app (over the bus "
        "configured by SQLA_REBALANCE_BROADCAST, signed with SQLA_REBALANCE_SECRET)."
    )
    # AppGroup.command (not click.command + add_command): it runs the
    # callback inside the app context, where the app's settings are.
    command: click.Command = cli.command(action, help=help_text)(func)
    return command


cli = AppGroup(
    "rebalance",
    help="Cluster-wide commands for this app's RebalancingQueuePool pools (sqla-rebalance).",
)
for _action in ACTIONS:
    _action_command(_action)


def _local_engines(state: _AppState) -> list[tuple[str | None, Engine]]:
    found: list[tuple[str | None, Engine]] = []
    fsa = current_app.extensions.get(_FSA_KEY)
    if fsa is not None:
        engines: Mapping[str | None, Engine] = getattr(fsa, "engines", {})
        found.extend(engines.items())
    for bind, registered in state.engines.items():
        found.extend((bind, engine) for engine in registered)
    seen: set[int] = set()
    unique = []
    for bind, engine in found:
        if id(engine) not in seen:
            seen.add(id(engine))
            unique.append((bind, engine))
    return unique


def _local_status(state: _AppState, as_json: bool, bus_configured: bool) -> None:
    pools: list[dict[str, Any]] = []
    for bind, engine in _local_engines(state):
        pool = engine.pool
        plan = state.plans.get(bind)
        if isinstance(pool, RebalancingQueuePool):
            entry: dict[str, Any] = {"bind": bind, "pool": pool.pool_name, "managed": True}
            entry.update(pool.stats().as_dict())
        else:
            entry = {
                "bind": bind,
                "pool": None,
                "managed": False,
                "poolclass": type(pool).__name__,
                "reason": plan.reason if plan is not None and plan.reason else None,
            }
        pools.append(entry)
    if as_json:
        process = {
            "process": process_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "bus": None,
            "this_process": True,
            "pools": pools,
        }
        click.echo(json.dumps([process], indent=2, default=str))
        return
    if bus_configured:
        click.echo(f"this process ({process_id()}), its own pools only:")
    else:
        click.echo(
            f"no bus configured (SQLA_REBALANCE_BROADCAST): this process ({process_id()}) "
            "only, whose pools serve no requests; configure a bus to see the app's processes"
        )
    if not pools:
        click.echo("  no engine found (register your own with rebalance.register_engine())")
    for entry in pools:
        bind = "default" if entry["bind"] is None else entry["bind"]
        if not entry["managed"]:
            why = f": {entry['reason']}" if entry["reason"] else ""
            click.echo(f"  bind {bind}: not managed ({entry['poolclass']}){why}")
            continue
        recycle = entry["recycle"]
        lifetime = (
            f"recycle {recycle:g}s jitter {entry['recycle_jitter']:g}"
            if recycle > 0
            else "no recycle"
        )
        retired = {k: v for k, v in entry["retirements"].items() if v}
        click.echo(
            f"  bind {bind}: pool {entry['pool']}: open {entry['open']} (idle {entry['idle']}, "
            f"in use {entry['in_use']}), pool_size {entry['pool_size']}, min_size "
            f"{entry['min_size']}, {lifetime}; connects {entry['connects']} (waited "
            f"{entry['checkouts_waited']}), retirements {retired or 'none'}"
        )
        for key, h in sorted(entry["hosts"].items()):
            click.echo(
                f"    {key:<24} open {h['open']} idle {h['idle']} in use {h['in_use']}  "
                f"{h['health']} {h['role']}"
            )


def _print_process(proc: ProcessStatus, bus: str) -> None:
    click.echo("\n".join(process_lines(proc, where=bus)))


def _fleet_status(targets: Iterable[_Target], patterns: tuple[str, ...], as_json: bool) -> None:
    found: list[tuple[_Target, ProcessStatus]] = []
    for target in targets:
        wanted = patterns or target.pools
        try:
            procs = fleet_status(target.bus)
        except (ValueError, ConfigurationError) as err:
            raise _Fail(str(err)) from None
        except BusUnavailableError as err:
            raise _BusFail(f"cannot read status from {target.display}: {err}") from None
        found.extend((target, p) for p in procs if any(p.has_pool(w) for w in wanted))
    if as_json:
        data = [{**p.raw, "bus": t.display, "this_process": p.is_this_process()} for t, p in found]
        click.echo(json.dumps(data, indent=2))
        return
    if not found:
        click.echo("no live process with this app's pools on the bus")
    for target, proc in found:
        _print_process(proc, target.display)


@cli.command("status")
@click.option(
    "--pool",
    multiple=True,
    metavar="NAME",
    help="only processes with a pool matching this name or glob; repeat for several "
    "(default: this app's pools)",
)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
@click.option(
    "--local",
    is_flag=True,
    help="show this process's own pools (pool.stats()) even when a bus is configured",
)
def status(pool: tuple[str, ...], as_json: bool, local: bool) -> None:
    """Every live process of this app on the bus: pools, hosts, connections, the
    command generation applied. Without a bus (or with --local): this process's
    own pools."""
    state = _current_state()
    targets = _targets(state)
    if local or not targets:
        _local_status(state, as_json, bus_configured=bool(targets))
        return
    _fleet_status(targets, pool, as_json)
