"""Reading a ``dns_nameservers`` entry: ``"ip"``, ``"ip:port"`` or ``"[v6]:port"``.

Split out of :mod:`sqla_rebalance.dns`: settings validation
(:mod:`sqla_rebalance.plugin`) and the :class:`~sqla_rebalance.dns.Resolver`
both parse nameservers, and the rules fit in a module of their own. Every
name here is also importable from :mod:`sqla_rebalance.dns`.
"""

from __future__ import annotations

import ipaddress

from .errors import ConfigurationError

__all__ = ["DEFAULT_PORT", "parse_nameserver"]

#: Port of a nameserver given without one.
DEFAULT_PORT = 53


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"ip"``, ``"ip:port"``, ``"v6"`` or ``"[v6]:port"`` as ``(address, port)``.

    Only IP addresses are accepted: a nameserver given by name would need a
    nameserver to find it. Raises :class:`ConfigurationError` with the reason.
    """
    if not isinstance(text, str):
        raise ConfigurationError(
            f"a DNS nameserver must be a string such as '127.0.0.1:5353', got {text!r}"
        )
    spec = text.strip()
    host, port_text = spec, None
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0:
            raise ConfigurationError(f"DNS nameserver {text!r}: missing ']' after the address")
        host, rest = spec[1:end], spec[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigurationError(
                    f"DNS nameserver {text!r}: expected ':port' after ']', got {rest!r}"
                )
            port_text = rest[1:]
    elif spec.count(":") == 1:
        host, port_text = spec.split(":")
    # Otherwise no colon (IPv4 without port) or several (a bare IPv6 address).
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigurationError(
            f"DNS nameserver {text!r}: {host!r} is not an IP address "
            "(use 'ip', 'ip:port' or '[ipv6]:port')"
        ) from None
    if spec.startswith("[") and address.version == 4:
        raise ConfigurationError(
            f"DNS nameserver {text!r}: brackets are for IPv6 addresses, write {host}:port"
        )
    port = DEFAULT_PORT
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit()):
            raise ConfigurationError(f"DNS nameserver {text!r}: port {port_text!r} is not a number")
        port = int(port_text)
        if not 0 < port < 65536:
            raise ConfigurationError(f"DNS nameserver {text!r}: port {port} is out of range")
    return str(address), port
