"""The Django app: validates ``SQLA_REBALANCE`` at start-up and adds system checks."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core import checks

__all__ = ["SqlaRebalanceConfig"]


class SqlaRebalanceConfig(AppConfig):  # type: ignore[misc]
    name = "sqla_rebalance.contrib.django"
    # The default label would be "django", the last part of the name.
    label = "sqla_rebalance"
    verbose_name = "sqla-rebalance"

    def ready(self) -> None:
        from . import conf

        # Fail at start-up, naming the key, rather than at the first request
        # that needs the database.
        conf.get_settings()
        checks.register(check_databases, checks.Tags.database)


def check_databases(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``sqla_rebalance.W001``: CONN_MAX_AGE other than 0 on a pooled alias.

    With a pool, Django "closing" a connection returns it to the pool, which
    is what makes it reusable by another thread and lets the pool replace it
    (lifetime, recycle, rebalance, drain) between requests. With
    ``CONN_MAX_AGE`` above 0 each thread keeps one checked out for that long:
    the pool needs ``POOL_SIZE`` >= threads, and a recycle waits for it.
    """
    from django.conf import settings

    from . import conf

    out: list[checks.CheckMessage] = []
    for alias in conf.get_settings().pooled:
        max_age = settings.DATABASES[alias].get("CONN_MAX_AGE", 0)
        if max_age != 0:
            out.append(
                checks.Warning(
                    f"DATABASES[{alias!r}]['CONN_MAX_AGE'] is {max_age!r}: each thread keeps "
                    "a connection checked out of the pool between requests",
                    hint="Set CONN_MAX_AGE to 0: connections are returned to the pool at the "
                    "end of each request and stay open there; RECYCLE sets their lifetime.",
                    id="sqla_rebalance.W001",
                )
            )
    return out
