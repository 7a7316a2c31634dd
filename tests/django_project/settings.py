"""``DJANGO_SETTINGS_MODULE=tests.django_project.settings``: see ``config.py``."""

from __future__ import annotations

import os

from .config import build_settings

globals().update(build_settings(os.environ))
