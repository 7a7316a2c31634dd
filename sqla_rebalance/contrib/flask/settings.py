"""The ``SQLA_REBALANCE_*`` config keys of the Flask extension: what each one
sets, how its value is parsed and checked, and the reading of an app's config
(global keys and ``SQLA_REBALANCE_BINDS``) into values that name their key.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ...bus import Bus, open_bus
from ...bus.base import redact
from ...dns import Resolver, parse_nameserver
from ...errors import ConfigurationError
from ...hosts import parse_hosts
from ...parameters import PARAMETERS
from ...plugin import parse_hosts_param
from ...validation import brief_repr

__all__ = [
    "BINDS_KEY",
    "BY_BIND_NAME",
    "CONFIG_PREFIX",
    "SETTINGS",
    "UNSET",
    "Setting",
    "Unset",
    "Value",
    "check_secret_has_bus",
    "read_config",
]

CONFIG_PREFIX = "SQLA_REBALANCE_"
#: Keys starting with this (in any case) are ours: a key that is not one of
#: the known ones is a typo, never something to ignore.
_OURS = CONFIG_PREFIX.rstrip("_")
#: Per-bind overrides: ``{"analytics": {"hosts": [...], "min_size": 2}}``.
BINDS_KEY = "SQLA_REBALANCE_BINDS"


# --------------------------------------------------------------------------- values


class Unset:
    """An override of ``None``: drop the inherited value, use the pool's default."""

    def __repr__(self) -> str:
        return "None"


UNSET = Unset()


def _number(label: str, value: Any) -> float | int:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigurationError(f"{label} must be a number, got {brief_repr(value)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{label} must be a number, got {brief_repr(value)}")
    # An int is finite however large (math.isfinite would raise OverflowError
    # past 1.8e308); the pool's range checks refuse what is too large.
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigurationError(f"{label} must be a finite number, got {brief_repr(value)}")
    return value


def _optional_number(label: str, value: Any) -> float | int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    return _number(label, value)


def _integer(label: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            text = value.strip().lstrip("+-")
            if text.isascii() and text.isdigit():  # more than 4,300 digits
                raise ConfigurationError(
                    f"{label} is out of range: an integer of {len(text)} digits"
                ) from None
            raise ConfigurationError(
                f"{label} must be an integer, got {brief_repr(value)}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{label} must be an integer, got {brief_repr(value)}")
    return value


def _text(label: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{label} must be a non-empty string, got {brief_repr(value)}")
    return value.strip()


def _hosts(label: str, value: Any) -> list[Any]:
    if isinstance(value, str):
        return parse_hosts_param(value, label)
    if isinstance(value, (list, tuple)):
        # Shape only; ports are checked once the engine's URL is known.
        try:
            parse_hosts(value, None, paths=True)
        except ConfigurationError as err:
            raise ConfigurationError(f"{label}: {err}") from None
        return [list(item) if isinstance(item, (list, tuple)) else item for item in value]
    raise ConfigurationError(
        f"{label} must be a list of 'name:port' strings (a nested list is a lower tier) or "
        f"a string such as 'a:5432,b:5432|dr:5432', got {brief_repr(value)}"
    )


def _nameservers(label: str, value: Any) -> Any:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigurationError(f"{label} must not be empty (leave it out for the system's)")
        for item in value:
            try:
                parse_nameserver(item)
            except ConfigurationError as err:
                raise ConfigurationError(f"{label}: {err}") from None
        return list(value)
    try:  # a ready dnspython Resolver
        Resolver(value)
    except ConfigurationError as err:
        raise ConfigurationError(f"{label}: {err}") from None
    return value


def _broadcast(label: str, value: Any) -> str | Bus:
    if isinstance(value, str):
        value = value.strip()
    try:
        open_bus(value)  # checks the scheme and the driver; connects to nothing
    except ConfigurationError as err:
        message = str(err).removeprefix("broadcast: ")
        raise ConfigurationError(f"{label}: {message}") from None
    result: str | Bus = value
    return result


def _secret(label: str, value: Any) -> str | bytes:
    if not isinstance(value, (str, bytes)) or not value:
        # The value itself is never repeated: it may be a real secret of the wrong type.
        raise ConfigurationError(f"{label} must be a non-empty string or bytes")
    return value


@dataclass(frozen=True)
class Setting:
    """One ``SQLA_REBALANCE_*`` key and the ``create_engine`` keyword it sets."""

    #: The key's suffix, lower case: ``SQLA_REBALANCE_<NAME>``, and its name
    #: inside ``SQLA_REBALANCE_BINDS`` entries.
    name: str
    #: The ``create_engine`` keyword (``pool_recycle``, ``recycle_jitter``...).
    keyword: str
    parse: Callable[[str, Any], Any] = field(repr=False)
    #: False: a property of one database (its hosts, their role, the pool's
    #: name), so only the default engine gets the global value; each bind
    #: sets its own in ``SQLA_REBALANCE_BINDS``.
    inherited: bool = True
    #: ``None`` is a value the pool gives a meaning to (rather than "unset").
    none_is_value: bool = False

    @property
    def key(self) -> str:
        return CONFIG_PREFIX + self.name.upper()


#: How each kind of setting (``parameters.Kind``) is read from the app config.
_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "number": _number,
    "optional_number": _optional_number,
    "integer": _integer,
    "text": _text,
    "hosts": _hosts,
    "nameservers": _nameservers,
    "url": _broadcast,
    "secret": _secret,
}

#: Every setting of the table with a Flask name (``sqla_rebalance.parameters``).
SETTINGS: tuple[Setting, ...] = tuple(
    Setting(
        p.flask,
        p.create_engine_keyword,
        _PARSERS[p.kind],
        inherited=not p.per_database,
        none_is_value=p.none_is_value,
    )
    for p in PARAMETERS
    if p.flask
)
_BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
#: Names accepted inside ``SQLA_REBALANCE_BINDS`` entries: the key suffix
#: (``jitter``) or the ``create_engine`` keyword (``recycle_jitter``).
BY_BIND_NAME: dict[str, Setting] = {
    **{s.keyword: s for s in SETTINGS},
    **{s.name: s for s in SETTINGS},
}
_KNOWN_KEYS = (*_BY_KEY, BINDS_KEY)


@dataclass(frozen=True)
class Value:
    """A parsed setting, with the config key (or bind entry) it came from."""

    setting: Setting
    value: Any
    #: Where it came from, for messages: ``SQLA_REBALANCE_MIN_SIZE``.
    label: str
    #: Chosen by the extension (a bind's pool name), not configured: an
    #: engine option of the user's own wins over it without complaint.
    implied: bool = False

    def describe(self) -> str:
        if self.implied:
            return self.label
        if self.setting.keyword == "broadcast_secret":
            return self.label  # never print a secret
        shown = redact(self.value) if isinstance(self.value, str) else self.value
        return f"{self.label}={brief_repr(shown)}"


def _parse(setting: Setting, label: str, raw: Any) -> Any:
    """The parsed value, or ``UNSET`` for a ``None`` that means "not set"."""
    if raw is None and not setting.none_is_value:
        return UNSET
    return setting.parse(label, raw)


def _prefix_alone(value: Any) -> ConfigurationError:
    """``SQLA_REBALANCE = {...}`` (the Django form): say which keys to use instead."""
    hints = []
    if isinstance(value, Mapping):
        for name, raw in value.items():
            setting = BY_BIND_NAME.get(name.lower()) if isinstance(name, str) else None
            if setting is not None:
                shown = "<secret>" if setting.keyword == "broadcast_secret" else brief_repr(raw)
                hints.append(f"{setting.key}={shown}")
            elif isinstance(name, str) and name.upper() in ("DATABASES", "BINDS"):
                hints.append(f"{BINDS_KEY}={{...}}")
    instead = f" (here: {', '.join(hints)})" if hints else ""
    return ConfigurationError(
        f"{_OURS} is not read by the Flask extension: set one {CONFIG_PREFIX}* key per "
        f"setting, such as {CONFIG_PREFIX}RECYCLE=1800{instead}, and per-bind settings in "
        f"{BINDS_KEY}; a dict under {_OURS} is the Django integration's form"
    )


def read_config(
    config: Mapping[str, Any],
) -> tuple[dict[str, Value], dict[str, dict[str, Value | Unset]]]:
    ours = [k for k in config if isinstance(k, str) and k.upper().startswith(_OURS)]
    if any(k.upper() == _OURS for k in ours):
        raise _prefix_alone(next(config[k] for k in ours if k.upper() == _OURS))
    unknown = sorted(k for k in ours if k not in _KNOWN_KEYS)
    if unknown:
        hints = []
        for key in unknown:
            if key.upper() in _KNOWN_KEYS:
                hints.append(f"{key} (did you mean {key.upper()}? config keys are upper case)")
                continue
            close = difflib.get_close_matches(key.upper(), _KNOWN_KEYS, n=1)
            hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
        raise ConfigurationError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
            f"known: {', '.join(_KNOWN_KEYS)}"
        )
    globals_: dict[str, Value] = {}
    for key, setting in _BY_KEY.items():
        if key in config:
            value = _parse(setting, key, config[key])
            if value is not UNSET:
                globals_[setting.keyword] = Value(setting, value, key)
    binds: dict[str, dict[str, Value | Unset]] = {}
    raw_binds = config.get(BINDS_KEY)
    if raw_binds is None:
        return globals_, binds
    if not isinstance(raw_binds, Mapping):
        raise ConfigurationError(
            f"{BINDS_KEY} must be a dict of bind key -> dict of settings, "
            f"got {brief_repr(raw_binds)}"
        )
    for bind, entries in raw_binds.items():
        where = f"{BINDS_KEY}[{bind!r}]"
        if not isinstance(bind, str) or not bind:
            raise ConfigurationError(
                f"{where}: bind keys are non-empty strings (the default engine is set by the "
                f"{CONFIG_PREFIX}* keys themselves)"
            )
        if not isinstance(entries, Mapping):
            raise ConfigurationError(
                f"{where} must be a dict of settings, got {brief_repr(entries)}"
            )
        parsed: dict[str, Value | Unset] = {}
        for name, raw in entries.items():
            found = BY_BIND_NAME.get(name) if isinstance(name, str) else None
            if found is None:
                known = ", ".join(s.name for s in SETTINGS)
                raise ConfigurationError(
                    f"{where}: unknown setting {brief_repr(name)}; known: {known}"
                )
            setting = found
            if setting.keyword in parsed:
                raise ConfigurationError(
                    f"{where} sets {setting.name} twice (as {setting.name!r} and "
                    f"{setting.keyword!r})"
                )
            label = f"{where}[{name!r}]"
            value = _parse(setting, label, raw)
            parsed[setting.keyword] = value if value is UNSET else Value(setting, value, label)
        binds[bind] = parsed
    return globals_, binds


def check_secret_has_bus(
    globals_: Mapping[str, Value], binds: Mapping[str, Mapping[str, Value | Unset]]
) -> None:
    """A secret with no bus anywhere is a mistake (a misspelt or forgotten
    ``SQLA_REBALANCE_BROADCAST``), not something to drop quietly."""
    if "broadcast_secret" not in globals_ or "broadcast" in globals_:
        return
    if any(isinstance(b.get("broadcast"), Value) for b in binds.values()):
        return
    raise ConfigurationError(
        "SQLA_REBALANCE_SECRET is set but SQLA_REBALANCE_BROADCAST is not: the secret signs "
        "cluster-wide commands, which need a bus"
    )
