"""Test databases: no pooled session may stay on a database being cloned or dropped."""

from __future__ import annotations

from django.db.backends.postgresql.creation import DatabaseCreation as _DatabaseCreation

from ..base import PooledCreationMixin

__all__ = ["DatabaseCreation"]


class DatabaseCreation(PooledCreationMixin, _DatabaseCreation):  # type: ignore[misc]
    pass
