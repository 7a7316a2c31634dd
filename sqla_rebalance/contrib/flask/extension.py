"""The Flask extension itself: :class:`Rebalance` (``init_app``,
``engine_options``, ``register_engine``) and the merging of the pool options
into Flask-SQLAlchemy's ``SQLALCHEMY_ENGINE_OPTIONS`` and ``SQLALCHEMY_BINDS``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask
from sqlalchemy.engine import URL, Engine

from ...errors import ConfigurationError, RebalanceError
from .commands import cli
from .plans import (
    EXTENSION_KEY,
    FSA_KEY,
    AppState,
    EnginePlan,
    app_state,
    plan_engine,
)
from .settings import BINDS_KEY, check_secret_has_bus, read_config

__all__ = ["InitOrderError", "Rebalance"]

log = logging.getLogger("sqla_rebalance.flask")


class InitOrderError(RuntimeError, RebalanceError):
    """``Rebalance.init_app`` ran after Flask-SQLAlchemy had created the engines."""


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
        if FSA_KEY in app.extensions:
            raise InitOrderError(
                "Rebalance must be initialised before Flask-SQLAlchemy: db.init_app(app) has "
                "already created this app's engines (app.extensions['sqlalchemy'] exists), so "
                "pool settings written now would never reach them. Call rebalance.init_app(app) "
                "(or Rebalance(app)) first, then db.init_app(app)."
            )
        globals_, binds = read_config(app.config)
        check_secret_has_bus(globals_, binds)
        state = AppState(globals_, binds)
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
    def _state(app: Flask) -> AppState:
        return app_state(app)

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


def _configure_flask_sqlalchemy(app: Flask, state: AppState) -> None:
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
        plan = plan_engine(
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
        plan = plan_engine(state, key, user=user, user_label=label, url=url, through_fsa=True)
        state.plans[key] = plan
        merged[key] = {**user, "url": url, **plan.options()} if plan.managed else value
    config["SQLALCHEMY_BINDS"] = merged
