"""Settings of the test project, from a mapping of ``DJTEST_*`` variables.

``DJTEST_PG`` / ``DJTEST_MARIADB``
    ``host:port`` of one PostgreSQL / MariaDB server: aliases ``default`` / ``maria``
    (database ``app``, user ``app``, password ``app``).
``DJTEST_PG_HOSTS`` / ``DJTEST_MARIADB_HOSTS``
    comma-separated ``host:port`` lists: aliases ``pg_spread`` / ``maria_spread``,
    whose pools spread over those servers (``HOSTS``).
``DJTEST_BUS``
    a bus URL (``SQLA_REBALANCE['BROADCAST']``); the secret is read from
    ``$DJTEST_SECRET`` (``SECRET_ENV``).
``DJTEST_CONN_MAX_AGE``
    ``CONN_MAX_AGE`` of every alias (default 0).
``DJTEST_REBALANCE_JSON``
    a JSON object merged into ``SQLA_REBALANCE`` (its ``DATABASES`` into the per-alias part).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

PG_ENGINE = "sqla_rebalance.contrib.django.backends.postgresql"
MYSQL_ENGINE = "sqla_rebalance.contrib.django.backends.mysql"
#: Lets tests find this project's sessions in pg_stat_activity.
APPLICATION_NAME = "sqla-rebalance-django-tests"


def _database(engine: str, address: str, max_age: int, **extra: Any) -> dict[str, Any]:
    host, port = address.rsplit(":", 1)
    return {
        "ENGINE": engine,
        "NAME": "app",
        "USER": "app",
        "PASSWORD": "app",
        "HOST": host,
        "PORT": port,
        "CONN_MAX_AGE": max_age,
        **extra,
    }


def build_settings(env: Mapping[str, str]) -> dict[str, Any]:
    max_age = int(env.get("DJTEST_CONN_MAX_AGE", "0"))
    pg_options = {"OPTIONS": {"application_name": APPLICATION_NAME}}
    databases: dict[str, Any] = {}
    per_alias: dict[str, Any] = {}
    if env.get("DJTEST_PG"):
        databases["default"] = _database(PG_ENGINE, env["DJTEST_PG"], max_age, **pg_options)
    if env.get("DJTEST_PG_HOSTS"):
        hosts = env["DJTEST_PG_HOSTS"].split(",")
        databases["pg_spread"] = _database(
            PG_ENGINE,
            hosts[0],
            max_age,
            OPTIONS={"application_name": APPLICATION_NAME + "-spread"},
        )
        per_alias["pg_spread"] = {"HOSTS": hosts, "POOL_SIZE": 8, "MAX_OVERFLOW": 0}
    if env.get("DJTEST_MARIADB"):
        databases["maria"] = _database(MYSQL_ENGINE, env["DJTEST_MARIADB"], max_age)
    if env.get("DJTEST_MARIADB_HOSTS"):
        hosts = env["DJTEST_MARIADB_HOSTS"].split(",")
        databases["maria_spread"] = _database(MYSQL_ENGINE, hosts[0], max_age)
        per_alias["maria_spread"] = {"HOSTS": hosts, "POOL_SIZE": 4, "MAX_OVERFLOW": 0}
    if "default" not in databases:
        # Django needs a "default" alias; a dummy one when only MariaDB is tested.
        databases["default"] = {}
    rebalance: dict[str, Any] = {
        "POOL_SIZE": 4,
        "MAX_OVERFLOW": 2,
        "RECYCLE": 600,
        "JITTER": 0.2,
        "HEALTH_CHECK_INTERVAL": 0.5,
        "REBALANCE_SPREAD": 0.1,
        "MIN_RECYCLE_INTERVAL": 0,
        "SECRET_ENV": "DJTEST_SECRET",
        "DATABASES": per_alias,
    }
    if env.get("DJTEST_BUS"):
        rebalance["BROADCAST"] = env["DJTEST_BUS"]
    extra = json.loads(env.get("DJTEST_REBALANCE_JSON", "{}"))
    per_alias.update(extra.pop("DATABASES", {}))
    rebalance.update(extra)
    return {
        "SECRET_KEY": "sqla-rebalance-tests",
        "DEBUG": False,
        "ALLOWED_HOSTS": ["testserver", "localhost"],
        "ROOT_URLCONF": "tests.django_project.urls",
        "MIDDLEWARE": [],
        "INSTALLED_APPS": [
            "sqla_rebalance.contrib.django",
            "tests.django_project.shop",
        ],
        "DATABASES": databases,
        "DEFAULT_AUTO_FIELD": "django.db.models.BigAutoField",
        "USE_TZ": True,
        "TIME_ZONE": "UTC",
        "SQLA_REBALANCE": rebalance,
        "LOGGING_CONFIG": None,
    }
