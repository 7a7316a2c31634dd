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

The package: :mod:`.settings` (the ``SQLA_REBALANCE_*`` keys and their
checks), :mod:`.plans` (each engine's options, checked against the app's own),
:mod:`.extension` (:class:`Rebalance`) and :mod:`.commands` (``flask
rebalance``, a front end of :mod:`sqla_rebalance.commands`).

See ``docs/flask.md`` for the guide.
"""

from __future__ import annotations

from .commands import cli
from .extension import InitOrderError, Rebalance
from .plans import EXTENSION_KEY, EnginePlan
from .settings import BINDS_KEY, CONFIG_PREFIX, SETTINGS, Setting

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
