"""Django database backends that pool connections through ``RebalancingQueuePool``.

``ENGINE``: ``sqla_rebalance.contrib.django.backends.postgresql`` or
``sqla_rebalance.contrib.django.backends.mysql``.
"""
