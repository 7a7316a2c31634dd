"""What the Flask extension decides for each engine (:class:`EnginePlan`),
checked against the engine options the app sets itself, and the per-app state
it keeps in ``app.extensions["sqla_rebalance"]``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flask import Flask
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url

from ...bus import Bus
from ...config import PoolConfig
from ...errors import ConfigurationError
from ...hosts import parse_hosts
from ...parameters import PARAMETERS
from ...pool import AsyncRebalancingQueuePool, RebalancingQueuePool
from ...validation import DEFAULT_POOL_NAME, brief_repr
from .settings import BY_BIND_NAME, Unset, Value

__all__ = ["EXTENSION_KEY", "FSA_KEY", "AppState", "EnginePlan", "app_state", "plan_engine"]

log = logging.getLogger("sqla_rebalance.flask")

#: Where the extension keeps its per-app state (``app.extensions[...]``).
EXTENSION_KEY = "sqla_rebalance"
#: Flask-SQLAlchemy's own (``app.extensions["sqlalchemy"]``).
FSA_KEY = "sqlalchemy"

#: Flask-SQLAlchemy creates its engines with ``engine_from_config``, which
#: passes these through ``int()`` (``Dialect.engine_config_types``).
_INT_COERCED = ("pool_recycle", "pool_timeout", "pool_size", "max_overflow")
#: Flask-SQLAlchemy gives MySQL engines ``pool_recycle=7200`` unless set.
_FSA_MYSQL_RECYCLE = 7200
#: ``create_engine`` keyword -> ``PoolConfig.build`` keyword, for the settings it checks.
_BUILD_NAMES = {p.create_engine_keyword: p.build for p in PARAMETERS if p.build}


@dataclass
class EnginePlan:
    """What the extension decided for one engine (``bind`` None: the default one)."""

    bind: str | None
    pool_name: str
    #: ``create_engine`` keyword -> value, as added to the engine options.
    values: dict[str, Value] = field(default_factory=dict)
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

    The pool's checks stay in one place (the parameter table's validators, run
    by ``PoolConfig.build``); its message names
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


def plan_engine(
    state: AppState,
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
            if isinstance(override, Value):
                values[keyword] = override
            else:
                values.pop(keyword, None)
        if "pool_name" not in values:
            values["pool_name"] = Value(
                BY_BIND_NAME["pool_name"], bind, f"pool_name={bind!r} (the bind key)", implied=True
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

    # Validate as the pool will, with the user's options (the rest: the table's defaults).
    merged: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for keyword, raw in user.items():
        arg = _BUILD_NAMES.get(keyword) if isinstance(keyword, str) else None
        if arg is None:
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
        arg = _BUILD_NAMES.get(keyword)
        if arg is not None:
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
class AppState:
    """Per-app state, in ``app.extensions["sqla_rebalance"]``."""

    globals: dict[str, Value]
    binds: dict[str, dict[str, Value | Unset]]
    #: Every engine configured so far: those written into the
    #: Flask-SQLAlchemy config, then any asked for by ``engine_options()``.
    plans: dict[str | None, EnginePlan] = field(default_factory=dict)
    #: Engines made by the application itself, for ``flask rebalance status``.
    engines: dict[str | None, list[Engine]] = field(default_factory=dict)

    def plan(self, bind: str | None) -> EnginePlan:
        plan = self.plans.get(bind)
        if plan is None:
            plan = self.plans[bind] = plan_engine(self, bind)
        return plan

    def managed_plans(self) -> list[EnginePlan]:
        plans = [p for p in self.plans.values() if p.managed]
        # Nothing configured (yet): the engine engine_options(app) would give.
        return plans or ([self.plan(None)] if not self.plans else [])

    def pool_names(self) -> list[str]:
        return sorted({p.pool_name for p in self.managed_plans()})


def app_state(app: Flask) -> AppState:
    """The extension's state of ``app`` (``RuntimeError`` if it is not initialised there)."""
    state = app.extensions.get(EXTENSION_KEY)
    if not isinstance(state, AppState):
        raise RuntimeError(
            "Rebalance is not initialised on this app: call Rebalance(app) or "
            "rebalance.init_app(app) first"
        )
    return state
