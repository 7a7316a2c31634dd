"""The ``hosts=`` setting: reading and validating its entries into :class:`HostSpec`.

Split out of :mod:`sqla_rebalance.hosts`, which keeps the host set's state
machine: turning ``"a:5432"``, ``"[::1]:5432"``, nested tiers and
comma-separated strings into checked specs (DNS-name and IP-literal rules,
ports, duplicates) happens once, at configuration time, and needs none of it.
Every public name here is also importable from :mod:`sqla_rebalance.hosts`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .errors import ConfigurationError
from .validation import brief_repr

__all__ = ["HostSpec", "parse_hosts"]


@dataclass(frozen=True)
class HostSpec:
    """One entry of the host list, before DNS."""

    #: DNS name, IP literal, or (for SQLite) a database file path.
    name: str
    port: int | None
    tier: int = 0
    #: A database file (SQLite) rather than a network host: never resolved.
    is_path: bool = False

    @property
    def is_literal(self) -> bool:
        return self.is_path or _is_ip(self.name)

    def __str__(self) -> str:
        return _join(self.name, self.port)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _join(name: str, port: int | None) -> str:
    if port is None:
        return name
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


#: One DNS label: letters, digits, ``-`` and ``_`` (service names such as
#: Docker Compose's ``my_db`` resolve), not starting or ending with ``-``.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?")
#: RFC 1035: at most 63 characters per label and 253 per name (the written
#: form, without the final dot).
_MAX_LABEL = 63
_MAX_NAME = 253
#: An IPv6 zone (scope id): an interface name or number (``fe80::1%eth0``).
_ZONE = re.compile(r"[A-Za-z0-9_.-]+")
#: Stripped around an entry (``"a:5432, b:5432"``); nothing else is.
_ASCII_SPACE = " \t\r\n\x0b\x0c"
_NO_SPACE = "a host cannot contain spaces, line breaks or control characters"


def _ip_literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``text`` spells, or None (a zone must be an interface name)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    scope = getattr(address, "scope_id", None)
    if scope is not None and not _ZONE.fullmatch(scope):
        return None
    return address


def _invalid(entry: str, reason: str) -> ConfigurationError:
    return ConfigurationError(f"hosts: {brief_repr(entry)} is not a valid host: {reason}")


def _check_name(name: str, entry: str) -> None:
    """``name`` must be an IP address or a DNS name (RFC 1123, plus ``_``)."""
    if _ip_literal(name) is not None:
        return
    if any(c.isspace() or not c.isprintable() for c in name):
        raise _invalid(entry, _NO_SPACE)
    if not name.isascii():
        try:
            hint = f" ({name.encode('idna').decode('ascii')!r})"
        except UnicodeError:
            hint = ""
        raise _invalid(
            entry,
            f"a host name must be ASCII: write an internationalised name in its IDNA form{hint}",
        )
    body = name[:-1] if name.endswith(".") else name  # a final dot: fully qualified
    if len(body) > _MAX_NAME:
        raise _invalid(
            entry, f"a DNS name has at most {_MAX_NAME} characters, this one {len(body)}"
        )
    labels = body.split(".")
    for label in labels:
        if not label:
            raise _invalid(entry, "empty label (two dots in a row, or a leading dot)")
        if len(label) > _MAX_LABEL:
            raise _invalid(
                entry,
                f"label {brief_repr(label)} is longer than {_MAX_LABEL} characters ({len(label)})",
            )
        if not _LABEL.fullmatch(label):
            raise _invalid(
                entry,
                f"label {brief_repr(label)} may contain only letters, digits, '-' and '_', "
                "and cannot start or end with '-'",
            )
    if labels[-1].isdigit():
        raise _invalid(
            entry, "not an IP address, and a DNS name cannot end with an all-digit label"
        )


def _split(text: str, default_port: int | None) -> tuple[str, int | None]:
    """``name``, ``name:port``, ``[v6]:port`` or a bare IPv6 literal, validated."""
    entry = text.strip(_ASCII_SPACE)
    if not entry:
        raise ConfigurationError("hosts: empty host name")
    if any(c.isspace() or not c.isprintable() for c in entry):
        raise _invalid(entry, _NO_SPACE)
    if entry.startswith("["):
        end = entry.find("]")
        if end < 0:
            raise ConfigurationError(f"hosts: unbalanced '[' in {brief_repr(entry)}")
        name, rest = entry[1:end], entry[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigurationError(f"hosts: expected ':port' after ']' in {brief_repr(entry)}")
        if rest == ":":
            raise ConfigurationError(f"hosts: empty port after ':' in {brief_repr(entry)}")
        port_text = rest[1:]
        if name and not isinstance(_ip_literal(name), ipaddress.IPv6Address):
            raise _invalid(entry, "brackets are for IPv6 addresses, as in [::1]:5432")
    elif entry.count(":") == 1:
        name, port_text = entry.split(":")
        if not port_text:
            raise ConfigurationError(f"hosts: empty port after ':' in {brief_repr(entry)}")
    elif ":" in entry:  # a bare IPv6 literal, without a port
        name, port_text = entry, ""
        if _ip_literal(name) is None:
            raise _invalid(
                entry,
                "more than one ':' and not an IPv6 address (an IPv6 address with a port is "
                "written in brackets, as [::1]:5432)",
            )
    else:
        name, port_text = entry, ""
    if not name:
        raise ConfigurationError(f"hosts: no host name in {brief_repr(entry)}")
    _check_name(name, entry)
    if not port_text:
        return name, default_port
    if not port_text.isascii() or not port_text.isdigit():
        raise ConfigurationError(f"hosts: port of {brief_repr(entry)} is not a number (1 to 65535)")
    digits = port_text.lstrip("0") or "0"
    port = int(digits) if len(digits) <= 5 else 0
    if not 0 < port < 65536:
        raise ConfigurationError(f"hosts: port of {brief_repr(entry)} is out of range (1 to 65535)")
    return name, port


def _same_host(name: str, port: int | None) -> tuple[str, int | None]:
    """What two entries for one host have in common: DNS names ignore case and a
    final dot, addresses their notation (``::1`` is ``0::1``)."""
    address = _ip_literal(name)
    return (str(address) if address is not None else name.rstrip(".").lower(), port)


def parse_hosts(
    value: object, default_port: int | None = None, paths: bool = False
) -> list[HostSpec]:
    """Validate ``hosts=``: strings form the first tier, each nested list a lower tier.

    ``["a:5432", "b:5432", ["dr:5432"]]`` is tier 0 = a, b and tier 1 = dr. A
    comma-separated string is read like a list (handy in settings files).
    Tiers are numbered in order from 0, so ``[["a"], ["b"]]`` works too.
    Every name must be a DNS name (labels of letters, digits, ``-`` and ``_``,
    at most 63 characters each and 253 in all) or an IP address (IPv6 in
    brackets when a port follows), every port in 1..65535, and no host may be
    listed twice (DNS names compared without regard to case).
    With ``paths`` (SQLite) every entry is a database file, taken as is.
    """
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigurationError(
            f"hosts must be a non-empty list of 'name:port' strings, got {brief_repr(value)}"
        )
    top: list[str] = []
    tiers: list[list[str]] = []
    for item in value:
        if isinstance(item, str):
            top.append(item)
        elif isinstance(item, (list, tuple)) and item and all(isinstance(x, str) for x in item):
            tiers.append(list(item))
        else:
            raise ConfigurationError(
                "hosts entries must be 'name:port' strings or non-empty lists of them "
                f"(a lower-priority tier), got {brief_repr(item)}"
            )
    ordered = ([top] if top else []) + tiers
    specs: list[HostSpec] = []
    seen: dict[tuple[str, int | None], str] = {}
    for tier, names in enumerate(ordered):
        for text in names:
            if paths:
                name, port = text.strip(), None
                if not name:
                    raise ConfigurationError("hosts: empty entry")
                if "\x00" in name:
                    raise ConfigurationError(f"hosts: {brief_repr(name)} contains a NUL character")
                key: tuple[str, int | None] = (name, None)
            else:
                name, port = _split(text, default_port)
                key = _same_host(name, port)
            shown = _join(name, port)
            first = seen.get(key)
            if first is not None:
                also = "" if first == shown else f" (as {first}: the same host)"
                raise ConfigurationError(f"hosts: {shown} is listed twice{also}")
            seen[key] = shown
            specs.append(HostSpec(name, port, tier, is_path=paths))
    return specs
