"""Integrations with web frameworks: ``contrib.flask`` and ``contrib.django``."""
