"""Settings for Django's own test suite (``tests/runtests.py --settings=django_settings``).

Used by ``scripts/compat_django.py``, which puts ``compat/`` on ``PYTHONPATH`` and sets:

``COMPAT_DJANGO_BACKEND``
    ``ours`` (``sqla_rebalance.contrib.django.backends.<db>``) or ``stock``
    (``django.db.backends.<db>``): the only thing that differs between the two runs.
``COMPAT_DJANGO_DB``
    ``postgresql`` or ``mysql``.
``COMPAT_DJANGO_HOST`` / ``COMPAT_DJANGO_PORT``
    the server (a loopback address, started by the script).
``COMPAT_DJANGO_MYSQL_DRIVER``
    ``pymysql`` (default: installed as ``MySQLdb`` before Django loads its backend) or
    ``mysqldb`` (mysqlclient).
``COMPAT_DJANGO_REPORT``
    where ``CompatRunner`` writes the outcome of every test as JSON.

Like Django's ``tests/test_sqlite.py``, two aliases, ``default`` and ``other``, on one
server (user and database ``app``, as in ``tests/django_project``); the test databases
are ``test_default`` and ``test_other``. ``SQLA_REBALANCE`` is not set: the pool runs
with its documented defaults, as a user who only changed ``ENGINE`` would get them.
"""

from __future__ import annotations

import os

_BACKEND = os.environ.get("COMPAT_DJANGO_BACKEND", "ours")
_DB = os.environ.get("COMPAT_DJANGO_DB", "postgresql")
if _BACKEND not in ("ours", "stock") or _DB not in ("postgresql", "mysql"):
    raise RuntimeError(f"COMPAT_DJANGO_BACKEND={_BACKEND!r} COMPAT_DJANGO_DB={_DB!r}")

ENGINE = (
    f"sqla_rebalance.contrib.django.backends.{_DB}"
    if _BACKEND == "ours"
    else f"django.db.backends.{_DB}"
)


def _alias(test_name: str) -> dict[str, object]:
    return {
        "ENGINE": ENGINE,
        "NAME": "app",
        "USER": "app",
        "PASSWORD": "app",
        "HOST": os.environ.get("COMPAT_DJANGO_HOST", "127.0.0.2"),
        "PORT": os.environ.get("COMPAT_DJANGO_PORT", "5432" if _DB == "postgresql" else "3306"),
        "TEST": {"NAME": test_name},
    }


DATABASES = {"default": _alias("test_default"), "other": _alias("test_other")}

SECRET_KEY = "django_tests_secret_key"

PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.MD5PasswordHasher",
]

DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

USE_TZ = False

TEST_RUNNER = "django_compat_runner.CompatRunner"

if _DB == "mysql" and os.environ.get("COMPAT_DJANGO_MYSQL_DRIVER", "pymysql") == "pymysql":
    # Both runs use PyMySQL in place of mysqlclient, the way Django documents it (our
    # backend does the same by itself when mysqlclient is missing), so that the driver is
    # the same in both, whether or not mysqlclient is installed.
    import sys

    import pymysql

    pymysql.install_as_MySQLdb()
    # As sqla_rebalance/contrib/django/backends/mysql/base.py does: alias the submodules
    # too, or Django's "import MySQLdb.converters" loads PyMySQL's files a second time (and
    # mixes in mysqlclient's, when it is installed).
    for _name, _module in list(sys.modules.items()):
        if _name.startswith("pymysql."):
            sys.modules["MySQLdb." + _name[len("pymysql.") :]] = _module
