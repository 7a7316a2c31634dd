"""One model using the types whose adapters Django configures per connection
(time zone aware datetimes, JSON, decimals)."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class Item(models.Model):
    name = models.CharField(max_length=50, unique=True)
    qty = models.IntegerField(default=0)
    price = models.DecimalField(max_digits=8, decimal_places=2, default=0)
    data = models.JSONField(default=dict)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        app_label = "djshop"
