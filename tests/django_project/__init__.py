"""A tiny Django project for the tests of ``sqla_rebalance.contrib.django``.

Its settings are built from ``DJTEST_*`` environment variables (see
``config.py``), so the same project runs in the pytest process
(``settings.configure(**build_settings(env))``) and in subprocesses
(``DJANGO_SETTINGS_MODULE=tests.django_project.settings``: ``python -m django
test``, ``python -m django sqla_rebalance ...``).
"""
