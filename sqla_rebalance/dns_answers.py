"""What a DNS lookup gives back, and the checks that keep it sane.

Split out of :mod:`sqla_rebalance.dns` so that the values a resolution
produces (:class:`Answer`, :class:`DnsError`, the TTL arithmetic of
:func:`refresh_delay`) and the normalising of whatever a nameserver or
``getaddrinfo`` sends back (addresses, TTLs, error summaries) live apart from
the :class:`~sqla_rebalance.dns.Resolver` that asks. Every name here is also
importable from :mod:`sqla_rebalance.dns`, its public home.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import RebalanceError

__all__ = [
    "LOCALHOST_ADDRESS",
    "SYSTEM_TTL",
    "Answer",
    "DnsError",
    "DnsErrorKind",
    "refresh_delay",
]

#: TTL reported for answers from ``getaddrinfo``, which does not return one.
#: Short enough that a changed record is followed within half a minute, long
#: enough that a process asks the system resolver only twice a minute per
#: name. ``refresh_delay`` still clamps it into the pool's refresh bounds.
SYSTEM_TTL = 30.0

#: The one address every ``localhost`` name stands for (see :mod:`sqla_rebalance.dns`).
LOCALHOST_ADDRESS = "127.0.0.1"

DnsErrorKind = Literal["nxdomain", "empty", "timeout", "error"]

_Source = Literal["dns", "system", "literal"]
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Answer:
    """The addresses of one name and how long they may be used before asking again."""

    #: Text addresses, de-duplicated, IPv4 first then IPv6, each in numeric order
    #: (so two answers with the same records compare equal).
    addresses: tuple[str, ...]
    #: Seconds the answer may be kept: the smallest TTL of the records used
    #: (CNAMEs included); ``inf`` for literals and ``localhost``, which never
    #: change; ``SYSTEM_TTL`` when ``getaddrinfo`` answered.
    ttl: float
    #: ``"dns"`` (dnspython), ``"system"`` (``getaddrinfo``) or ``"literal"``.
    source: _Source
    #: Record types (``"A"``, ``"AAAA"``) whose query failed while the other one
    #: answered with records. A failed type contributes the addresses it had in
    #: the resolver's last answer for the name (none if it never had any);
    #: ``ttl`` is that of the records that did come back.
    failed: tuple[str, ...] = ()


class DnsError(RebalanceError):
    """A name could not be resolved.

    ``kind`` tells the caller what it may conclude:

    - ``"nxdomain"``: the name does not exist;
    - ``"empty"``: it exists but has neither A nor AAAA records;
    - ``"timeout"``: no nameserver answered in time (timed out or unreachable);
    - ``"error"``: anything else (SERVFAIL, REFUSED, a malformed name, ...).

    Only the first two are statements about the name; after the others the
    previous answer is as good as it was.
    """

    def __init__(self, name: str, kind: DnsErrorKind, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.kind: DnsErrorKind = kind

    def __reduce__(self) -> tuple[Any, ...]:
        # The default pickling calls cls(*args) with only the message.
        return (type(self), (self.name, self.kind, str(self)))


def refresh_delay(ttl: float, min_refresh: float, max_refresh: float) -> float:
    """Seconds until a name should be resolved again: its TTL clamped to the bounds.

    ``min_refresh`` protects the nameserver from a TTL of 0 or 1 multiplied by
    every process of a fleet; ``max_refresh`` bounds how long a record change
    can go unnoticed behind a long TTL. An infinite TTL (a literal or
    ``localhost``, which never change) gives ``max_refresh``; callers may
    skip refreshing those altogether.
    """
    if not (0 <= min_refresh <= max_refresh < math.inf):
        raise ValueError(
            f"need 0 <= min_refresh <= max_refresh < inf, got {min_refresh}, {max_refresh}"
        )
    if math.isnan(ttl):
        raise ValueError("ttl is NaN")
    return min(max_refresh, max(min_refresh, ttl))


def _literal(name: str) -> _IPAddress | None:
    text = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_localhost(name: str) -> bool:
    name = name.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


def _address(text: str) -> str:
    """One address of an answer, normalised; an IPv4-mapped IPv6 address is the IPv4 one
    (``::ffff:10.0.0.5`` and ``10.0.0.5`` are one server, not two hosts)."""
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


#: Longest TTL taken as given (RFC 2181 section 8: 2**31 - 1; larger values mean 0).
_MAX_TTL = 2**31 - 1


def _sane_ttl(value: Any) -> float:
    """A TTL as a number of seconds in ``[0, 2**31 - 1]``: negative, NaN or too large is 0."""
    ttl = float(value)
    return ttl if 0 <= ttl <= _MAX_TTL else 0.0


def _sorted_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    """Normalised, de-duplicated, IPv4 before IPv6, numeric order within a family."""
    parsed = {ipaddress.ip_address(_address(a)) for a in addresses}
    ordered = sorted(parsed, key=lambda ip: (ip.version, ip.packed, str(ip)))
    return tuple(str(ip) for ip in ordered)


def _summary(errors: Sequence[tuple[Any, ...]] | None) -> str:
    """dnspython's per-attempt errors, each distinct one once (retries repeat them)."""
    seen = dict.fromkeys(f"{e[0]} answered {e[3]}" for e in errors or ())
    return "; ".join(seen)
