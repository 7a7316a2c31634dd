"""Django integration: ``SQLA_REBALANCE`` settings, pooled database backends and
``manage.py sqla_rebalance``.

Add ``"sqla_rebalance.contrib.django"`` to ``INSTALLED_APPS`` (settings are
validated at start-up, and the management command becomes available) and
use ``sqla_rebalance.contrib.django.backends.postgresql`` or ``.mysql`` as a
database's ``ENGINE``. See docs/django.md.

This module imports nothing from Django, so that listing the app in
``INSTALLED_APPS`` costs nothing before Django is set up.
"""

from __future__ import annotations

from .pools import all_pools, get_pool
from .pools import dispose as dispose_pools

__all__ = ["all_pools", "dispose_pools", "get_pool"]
