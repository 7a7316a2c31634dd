"""Django's MySQL backend, with connections from ``RebalancingQueuePool``.

Django's MySQL backend is written for mysqlclient (``import MySQLdb``). When
mysqlclient is not installed but PyMySQL is, PyMySQL is installed in its
place (``pymysql.install_as_MySQLdb()``, what Django's documentation
suggests for PyMySQL), before Django's backend is imported. The pool then
uses the same driver Django imported (``mysql+mysqldb`` or
``mysql+pymysql``), so the exceptions Django translates
(``IntegrityError``...) are the ones the connections raise.
"""

from __future__ import annotations

import importlib.util
from typing import Any

if importlib.util.find_spec("MySQLdb") is None:  # pragma: no branch - depends on the install
    try:
        import pymysql
    except ImportError:  # pragma: no cover - Django's own error follows
        pass
    else:
        import sys

        pymysql.install_as_MySQLdb()
        # install_as_MySQLdb() aliases the package only. Django then imports
        # MySQLdb.constants (and others): Python would load those files a
        # second time as new modules and rebind pymysql.err & co. to them, so
        # that ``except pymysql.err.MySQLError`` elsewhere in the process no
        # longer catches what PyMySQL raises. Alias every submodule as well.
        for _name, _module in list(sys.modules.items()):
            if _name.startswith("pymysql."):
                sys.modules.setdefault("MySQLdb." + _name[len("pymysql.") :], _module)

from django.db.backends.mysql.base import Database
from django.db.backends.mysql.base import DatabaseWrapper as _DatabaseWrapper
from django.utils.asyncio import async_unsafe

from ..base import PooledDatabaseWrapperMixin
from .creation import DatabaseCreation

__all__ = ["DatabaseWrapper"]

#: PyMySQL installed as MySQLdb keeps its own module name.
_DRIVER = "pymysql" if Database.__name__.startswith("pymysql") else "mysqldb"


class DatabaseWrapper(PooledDatabaseWrapperMixin, _DatabaseWrapper):  # type: ignore[misc]
    creation_class = DatabaseCreation
    sqla_drivername = f"mysql+{_DRIVER}"

    @async_unsafe  # type: ignore[untyped-decorator]
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        if not self.sqla_pooled():
            return super().get_new_connection(conn_params)
        # Django's method calls the module-level Database.connect(); this is
        # the rest of it, for the pooled connection.
        connection = self.sqla_checkout(conn_params)
        if connection.encoders.get(bytes) is bytes:
            connection.encoders.pop(bytes)
        return connection

    def is_usable(self) -> bool:
        # After _close() the pooled connection is back in the pool and this
        # wrapper holds none (PostgreSQL's is_usable() checks that itself).
        if self.connection is None:
            return False
        return bool(super().is_usable())

    def sqla_is_broken(self, connection: Any) -> bool:
        # PyMySQL and mysqlclient: ``open`` is false once closed or lost.
        return not getattr(connection, "open", True)
