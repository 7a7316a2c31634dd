"""Django's PostgreSQL backend, with connections from ``RebalancingQueuePool``.

Everything but where connections come from and go to is Django's own
backend: cursors, adapters, time zone, roles, isolation levels and
server-side cursors work as documented by Django. See
``sqla_rebalance.contrib.django.backends.base`` for how the pool fits in.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.postgresql import base as _django_base
from django.db.backends.postgresql.base import DatabaseWrapper as _DatabaseWrapper
from django.db.backends.postgresql.psycopg_any import is_psycopg3

from ... import pools
from ..base import PooledDatabaseWrapperMixin
from .creation import DatabaseCreation

__all__ = ["DatabaseWrapper"]


class _PoolConnect:
    """Stands in for the driver module during Django's ``get_new_connection``.

    Django's method does its own set-up around one call,
    ``self.Database.connect(**conn_params)`` (the isolation level from
    ``OPTIONS`` before and after it, psycopg2's JSON loader after it).
    Replacing only that call keeps all of that as Django writes it, in
    whichever Django version is installed, instead of a copy of it here.
    """

    def __init__(self, module: Any, connect: Any) -> None:
        self._module = module
        self.connect = connect

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class DatabaseWrapper(PooledDatabaseWrapperMixin, _DatabaseWrapper):  # type: ignore[misc]
    creation_class = DatabaseCreation
    sqla_drivername = "postgresql+psycopg" if is_psycopg3 else "postgresql+psycopg2"
    # SQLAlchemy would register hstore on the pool's first connection only;
    # Django (django.contrib.postgres) registers the types it needs itself.
    sqla_dialect_options = {"use_native_hstore": False}  # noqa: RUF012

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        if not self.sqla_pooled():
            return super().get_new_connection(conn_params)
        # An instance attribute, only for this call: wrappers are per thread.
        self.Database = _PoolConnect(_django_base.Database, self._checkout)
        try:
            connection = super().get_new_connection(conn_params)
        finally:
            del self.Database
        if self._sqla_fairy is None:
            # Never silently unpooled: this Django did not connect through self.Database.
            connection.close()
            raise ImproperlyConfigured(
                "sqla_rebalance's PostgreSQL backend does not support this Django version: "
                "its get_new_connection() does not call self.Database.connect()"
            )
        return connection

    def _checkout(self, **conn_params: Any) -> Any:
        return self.sqla_checkout(conn_params)

    def sqla_is_broken(self, connection: Any) -> bool:
        # psycopg 3: closed (also when the server went away) or broken;
        # psycopg2: closed is a non-zero int then.
        return bool(getattr(connection, "closed", False) or getattr(connection, "broken", False))

    def close_pool(self) -> None:
        """Django calls this when the time zone settings change (new connections must
        pick them up): let this alias's pool go too."""
        parent = getattr(super(), "close_pool", None)  # Django >= 5.1
        if parent is not None:
            parent()
        pools.dispose(self.alias)
