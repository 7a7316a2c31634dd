"""Run by Django's test runner (``python -m django test tests.django_project.shop``), in a
subprocess of tests/test_django_runner.py: the pooled backends on Django's test databases."""

from __future__ import annotations

from decimal import Decimal
from typing import ClassVar

import pytest
from django.conf import settings
from django.db import IntegrityError, connections, transaction
from django.test import TestCase, TransactionTestCase

from sqla_rebalance import RebalancingQueuePool
from sqla_rebalance.contrib.django import get_pool

from .models import Item

ALIASES = sorted(
    alias
    for alias, db in settings.DATABASES.items()
    if str(db.get("ENGINE", "")).startswith("sqla_rebalance.")
)
_CURRENT_DB = {"postgresql": "SELECT current_database()", "mysql": "SELECT DATABASE()"}
_SESSION = {"postgresql": "SELECT pg_backend_pid()", "mysql": "SELECT CONNECTION_ID()"}


def scalar(alias: str, sql: str) -> object:
    with connections[alias].cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()[0]


class PooledTestDatabaseTests(TestCase):
    databases: ClassVar[set[str]] = set(ALIASES)

    def test_connections_come_from_the_pool_and_reach_the_test_database(self) -> None:
        for alias in ALIASES:
            with self.subTest(alias=alias):
                conn = connections[alias]
                name = conn.settings_dict["NAME"]
                assert name.startswith("test_app"), name  # test_app, or a clone
                assert scalar(alias, _CURRENT_DB[conn.vendor]) == name
                pool = get_pool(alias)
                assert isinstance(pool, RebalancingQueuePool)
                assert pool.stats().in_use == 1  # this test's transaction

    def test_orm_and_savepoints(self) -> None:
        for alias in ALIASES:
            with self.subTest(alias=alias):
                items = Item.objects.using(alias)
                items.create(name="kept", qty=1, price=Decimal("2.50"), data={"a": [1]})
                with pytest.raises(IntegrityError), transaction.atomic(using=alias):
                    items.create(name="kept")
                assert items.filter(name="kept").update(qty=2) == 1
                item = items.get(name="kept")
                assert (item.qty, item.price, item.data) == (2, Decimal("2.50"), {"a": [1]})
                assert item.created.tzinfo is not None


class ReturnToPoolTests(TransactionTestCase):
    databases: ClassVar[set[str]] = set(ALIASES)

    def test_close_returns_the_session_to_the_pool(self) -> None:
        for alias in ALIASES:
            with self.subTest(alias=alias):
                conn = connections[alias]
                first = scalar(alias, _SESSION[conn.vendor])
                conn.close()
                stats = get_pool(alias).stats()
                assert stats.in_use == 0
                assert stats.idle >= 1
                assert scalar(alias, _SESSION[conn.vendor]) == first  # the same session

    def test_committed_rows_are_visible_to_the_next_checkout(self) -> None:
        for alias in ALIASES:
            with self.subTest(alias=alias):
                Item.objects.using(alias).create(name=f"committed-{alias}")
                connections[alias].close()
                assert Item.objects.using(alias).filter(name=f"committed-{alias}").exists()
