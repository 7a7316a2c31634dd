"""What the PostgreSQL and MySQL backends share: checkout from, and return to, the pool.

How a Django connection maps onto the pool:

- ``get_new_connection`` checks a connection out of the alias's pool
  (``engine.raw_connection()``) and hands Django the **driver's own
  connection** (``psycopg.Connection``, ``pymysql.Connection``). SQLAlchemy's
  proxy forwards attribute reads but not writes (``conn.autocommit = True``
  would land on the proxy), and psycopg's server-side cursors want the real
  connection object. The proxy stays on the wrapper until Django closes the
  connection; it must, or the garbage collector would check it in behind
  Django's back.
- ``_close`` (what Django's ``close()`` calls) returns it to the pool instead
  of closing it, and lets go of it (``self.connection = None``, as Django's
  own psycopg pool does): it may be another thread's from then on, so a
  second ``close()`` or ``_close()`` must not touch it, and neither may any
  other use of the wrapper, which checks a connection out again. SQLAlchemy
  rolls back on return (reset-on-return), so the next user gets a clean
  session. Three cases close it for real instead:
  Django closing inside an ``atomic()`` block (Django keeps referring to the
  connection until the block exits and expects the server to roll back,
  so it must not reach another thread), a connection the driver reports
  broken, and a connection whose pool was replaced meanwhile (settings
  changed: a test database, ``override_settings``). Closing such a
  connection again is a no-op too.
- The pool is built from a URL naming only the dialect and driver, with
  Django's connection parameters as ``connect_args``: connects go through the
  dialect, which is what lets ``HOSTS`` point each one at a host (a custom
  ``creator`` could not be steered), and the driver gets exactly what
  Django's own backend would have passed (psycopg's adapters context and
  cursor factory, MySQLdb's converters and client flags, ``OPTIONS``).

Django runs its per-connection setup (``set_autocommit``,
``init_connection_state``: time zone, role, isolation level) on every
checkout, as for a new connection; the settings it applies are the same
for every connection of a pool, so this only costs a statement when
something actually differs (time zone, role) or, on MySQL, the
isolation-level ``SET``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from django.db import OperationalError
from django.db.backends.base.base import NO_DB_ALIAS
from sqlalchemy import create_engine
from sqlalchemy import exc as sa_exc

from ....errors import ConfigurationError, NoHostAvailableError
from ....pool import RebalancingQueuePool
from .. import conf, pools

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = ["PooledCreationMixin", "PooledDatabaseWrapperMixin"]

log = logging.getLogger("sqla_rebalance.django")

# Django has no type information: at type-checking time the mixins derive
# from Any, so that the Django attributes they use (alias, settings_dict,
# connection, super()._close()) type-check.
if TYPE_CHECKING:
    _WrapperBase = Any
    _CreationBase = Any
else:
    _WrapperBase = object
    _CreationBase = object


class PooledDatabaseWrapperMixin(_WrapperBase):  # type: ignore[misc]
    """Mixed into Django's ``DatabaseWrapper`` (first in the bases)."""

    #: The SQLAlchemy dialect+driver, e.g. ``postgresql+psycopg``.
    sqla_drivername: ClassVar[str]
    #: Extra create_engine arguments for this dialect.
    sqla_dialect_options: ClassVar[dict[str, Any]] = {}

    #: Django's driver connection (an annotation only: Django sets the attribute).
    connection: Any
    _sqla_fairy: Any = None
    _sqla_pool: Any = None
    #: The driver connection this wrapper discarded (closed for real) and still
    #: refers to, until Django lets go of it: closing it again is a no-op.
    _sqla_released: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.sqla_pooled():
            # Before anything can connect: with the app installed its ready() has
            # validated the settings already (cached); without it, this is the
            # earliest point, and Django's own pool must not open first.
            self.sqla_check_settings()

    def sqla_check_settings(self) -> None:
        """Raise :class:`~sqla_rebalance.ConfigurationError` for settings this backend
        cannot work with: ``OPTIONS["pool"]`` (Django's own psycopg pool) in this
        wrapper's settings, or an invalid ``SQLA_REBALANCE``."""
        options = self.settings_dict.get("OPTIONS")
        if isinstance(options, Mapping) and options.get("pool"):
            raise ConfigurationError(
                f"DATABASES[{self.alias!r}]['OPTIONS']['pool']: that is Django's own psycopg "
                "pool; the sqla_rebalance backend pools connections itself, remove it"
            )
        conf.get_settings()

    @property
    def pool(self) -> None:
        """Django's own connection pool (Django >= 5.1, ``OPTIONS["pool"]``): never, this
        backend is the pool. (Django's methods ask for it to decide how to connect
        and close.)"""
        return None

    # -- checkout ---------------------------------------------------------
    def sqla_pooled(self) -> bool:
        """Whether this wrapper's connections come from a pool.

        Not for Django's ``__no_db__`` wrapper: it connects to the
        ``postgres`` database to create and drop test databases, once.
        """
        return bool(self.alias != NO_DB_ALIAS)

    @property
    def sqla_pool(self) -> RebalancingQueuePool | None:
        """The pool of this alias in this process (None until the first connection)."""
        return pools.get_pool(self.alias)

    def sqla_checkout(self, conn_params: dict[str, Any]) -> Any:
        """Check a connection out of the alias's pool; return the driver connection."""
        self._sqla_release_leftover()
        self.sqla_check_settings()  # OPTIONS may have changed since (tests do that)
        config = conf.for_alias(self.alias)
        health_checks = bool(self.settings_dict.get("CONN_HEALTH_CHECKS"))
        signature = (dict(conn_params), config, health_checks)
        engine = pools.engine_for(
            self.alias, signature, lambda: self._sqla_engine(conn_params, config, health_checks)
        )
        pool = engine.pool
        try:
            fairy = engine.raw_connection()
        except (sa_exc.TimeoutError, NoHostAvailableError) as err:
            # Not a driver error, so Django would not wrap it: make it the
            # OperationalError that Django code expects from a failed connect.
            raise OperationalError(f"database {self.alias}: {err}") from err
        self._sqla_fairy = fairy
        self._sqla_pool = pool
        self._sqla_released = None
        return fairy.driver_connection

    def _sqla_engine(
        self, conn_params: dict[str, Any], config: conf.AliasConfig, health_checks: bool
    ) -> Engine:
        log.info("database %s: creating pool %s", self.alias, config.pool_name)
        return create_engine(
            f"{self.sqla_drivername}://",
            poolclass=RebalancingQueuePool,
            connect_args=dict(conn_params),
            **self.sqla_dialect_options,
            **config.engine_kwargs(health_checks),
        )

    def _sqla_release_leftover(self) -> None:
        # Django replaced self.connection without closing it (it never
        # does today): return the old checkout rather than leak it.
        fairy, self._sqla_fairy, self._sqla_pool = self._sqla_fairy, None, None
        if fairy is not None:
            fairy.close()

    # -- return -----------------------------------------------------------
    def sqla_is_broken(self, connection: Any) -> bool:
        """Whether the driver reports ``connection`` closed or broken (per backend)."""
        return False

    def _close(self) -> None:
        fairy = self._sqla_fairy
        if fairy is None:
            if self.connection is not None and self.connection is self._sqla_released:
                # Already given back (``_close()`` then ``close()``): closing it
                # again would close a connection the pool may have handed to
                # someone else, or one that is closed already.
                return
            super()._close()
            return
        pool = self._sqla_pool
        connection = self.connection
        self._sqla_fairy = self._sqla_pool = None
        self._sqla_released = connection
        with self.wrap_database_errors:
            if (
                self.in_atomic_block
                or self.sqla_is_broken(connection)
                or not pools.is_current(self.alias, pool)
            ):
                # Closes the DBAPI connection; its pool slot reconnects when needed.
                # Django keeps referring to it until the atomic block exits.
                fairy.invalidate()
            else:
                # The wrapper lets go of it at once, as Django's own pool does: from
                # here on it may be another thread's, and the next use of this
                # wrapper checks a connection out again.
                self.connection = None
                self._sqla_released = None
                fairy.close()  # back to the pool, rolled back by SQLAlchemy


class PooledCreationMixin(_CreationBase):  # type: ignore[misc]
    """Mixed into Django's ``DatabaseCreation``: no pooled connection may stay open
    on a database that is about to be used as a template or dropped."""

    def _sqla_dispose(self) -> None:
        pools.dispose(self.connection.alias)

    def _create_test_db(self, verbosity: int, autoclobber: bool, keepdb: bool = False) -> Any:
        # The pool of the real database is not needed while tests run.
        self._sqla_dispose()
        return super()._create_test_db(verbosity, autoclobber, keepdb)

    def _clone_test_db(self, suffix: str, verbosity: int, keepdb: bool = False) -> Any:
        # CREATE DATABASE ... TEMPLATE fails while the template has sessions.
        self._sqla_dispose()
        return super()._clone_test_db(suffix, verbosity, keepdb)

    def _destroy_test_db(self, test_database_name: str, verbosity: int) -> Any:
        # DROP DATABASE fails while it has sessions.
        self._sqla_dispose()
        return super()._destroy_test_db(test_database_name, verbosity)
