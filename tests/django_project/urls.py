"""Views that report which server session served them, for the request-cycle tests."""

from __future__ import annotations

from django.db import connections
from django.http import HttpRequest, JsonResponse
from django.urls import path

from .shop.models import Item

_SESSION_SQL = {"postgresql": "SELECT pg_backend_pid()", "mysql": "SELECT CONNECTION_ID()"}


def session(request: HttpRequest, alias: str) -> JsonResponse:
    """The server session (backend pid / connection id) of this request, and an ORM count."""
    conn = connections[alias]
    with conn.cursor() as cursor:
        cursor.execute(_SESSION_SQL[conn.vendor])
        (sid,) = cursor.fetchone()
    count = Item.objects.using(alias).count()
    return JsonResponse({"session": sid, "items": count})


urlpatterns = [path("session/<str:alias>/", session)]
