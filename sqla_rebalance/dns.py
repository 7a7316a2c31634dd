"""Name resolution for the host set: every A and AAAA record of a name is a host.

Why not just ``socket.getaddrinfo``: it does not say how long an answer stays
valid, so a pool could not follow a cluster whose DNS records change (a
failover, a scaled-out replica set) any sooner than a fixed poll. dnspython
(the optional ``dns`` extra) gives the records *and* their TTL, and lets tests
and users point at a specific nameserver (``127.0.0.1:5353``).

Rules, in the order :meth:`Resolver.resolve` applies them:

1. **IP literals** (``10.0.0.5``, ``::1``, ``[::1]``) are returned as they are,
   with ``source="literal"`` and ``ttl=inf``: no query, nothing to refresh.
2. **localhost** (and any ``*.localhost`` name, RFC 6761 section 6.3) is
   always the single address ``127.0.0.1``, ``source="literal"``,
   ``ttl=inf``, without any lookup. The system usually maps ``localhost`` to
   both ``127.0.0.1`` and ``::1``; taking both would silently turn one local
   server into two "hosts" (and the IPv6 one often has nobody listening).
   The IPv4 loopback exists on every host, including those with IPv6
   disabled. Write ``::1`` to use the IPv6 loopback.
3. **Explicit nameservers** (strings): A and AAAA are queried there; the name
   is absolute (no search list), nothing is cached by dnspython.
4. **A dnspython ``Resolver`` object** is used as configured (its search
   setting, its cache); it is never modified. With a cache, the TTL reported
   is the time the cached answer has left.
5. **System configuration** (``nameservers=None``) with dnspython: the
   nameservers, search list and ``ndots`` of ``/etc/resolv.conf``, so a short
   name (``postgres`` in a Kubernetes namespace) resolves as it does for the
   database driver. When DNS says the name does not exist (NXDOMAIN, or no
   address records) the system's own resolver (``getaddrinfo``: ``/etc/hosts``
   and other NSS sources) is asked before giving up, with
   ``source="system"`` and ``ttl=SYSTEM_TTL``.
6. **Without dnspython** (and ``nameservers=None``): ``getaddrinfo`` only,
   ``source="system"``, ``ttl=SYSTEM_TTL``.

One record type failing does not discard the other: a resolver that answers
A but refuses AAAA (or the reverse) still gives the A records, together with
the AAAA addresses of the last answer that had them (see ``Resolver.resolve``).

A query never takes longer than the resolver's ``timeout`` in total (both
record types together); ``getaddrinfo``, which cannot be interrupted, runs in
a short-lived daemon thread that is abandoned when the time is up. (A
dnspython ``Resolver`` object passed in keeps its own retry pacing, which can
overrun ``timeout`` by one of dnspython's back-off sleeps.)
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .dns_answers import (
    LOCALHOST_ADDRESS,
    SYSTEM_TTL,
    Answer,
    DnsError,
    DnsErrorKind,
    _address,
    _is_localhost,
    _literal,
    _sane_ttl,
    _sorted_addresses,
    _summary,
    refresh_delay,
)
from .dns_nameservers import DEFAULT_PORT, parse_nameserver
from .errors import ConfigurationError

if TYPE_CHECKING:
    import dns.resolver

__all__ = [
    "DEFAULT_PORT",
    "LOCALHOST_ADDRESS",
    "SYSTEM_TTL",
    "Answer",
    "DnsError",
    "DnsErrorKind",
    "Resolver",
    "parse_nameserver",
    "refresh_delay",
]

log = logging.getLogger("sqla_rebalance.dns")


def _dnspython() -> ModuleType | None:
    """``dns.resolver`` (with the modules used here loaded), or None without the extra."""
    try:
        import dns.exception
        import dns.nameserver
        import dns.rdatatype
        import dns.resolver
    except ImportError:
        return None
    return dns.resolver


#: Names whose last addresses per record type a resolver keeps (see ``Resolver.resolve``).
_KNOWN_NAMES = 1024


class Resolver:
    """Resolves names to all their A and AAAA addresses, within a time limit.

    ``nameservers``: ``"ip"``, ``"ip:port"`` or ``"[v6]:port"`` strings
    (queried in order), a ready ``dns.resolver.Resolver``, or None for the
    system configuration (see the module docstring for what each means).
    Invalid values raise :class:`ConfigurationError` here, not at the first
    query. ``timeout`` bounds one :meth:`resolve` call, all queries included.

    Thread-safe: the dnspython resolver is configured here and never changed
    afterwards; each query keeps its state in its own dnspython resolution
    object. (A resolver object passed in must not be reconfigured while in use.)
    The only state kept between calls is, per name, the last addresses of each
    record type (for :meth:`resolve`'s one-type-failed rule), under a lock.
    """

    __slots__ = (
        "_description",
        "_dns",
        "_failing",
        "_known",
        "_lock",
        "_resolver",
        "_search",
        "_system_fallback",
        "_timeout",
    )

    _resolver: dns.resolver.Resolver | None

    def __init__(
        self,
        nameservers: Sequence[str] | dns.resolver.Resolver | None = None,
        timeout: float = 2.0,
    ) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise ConfigurationError(f"DNS timeout must be a number of seconds, got {timeout!r}")
        if not 0 < timeout < math.inf:
            raise ConfigurationError(f"DNS timeout must be a positive number, got {timeout!r}")
        self._timeout = float(timeout)
        self._dns = _dnspython()
        self._resolver = None
        self._search: bool | None = False
        self._system_fallback = False
        # Per name, the last addresses of each record type (see resolve()), most
        # recently resolved last; and which (name, type) queries are failing now.
        self._lock = threading.Lock()
        self._known: dict[str, dict[str, tuple[str, ...]]] = {}
        self._failing: set[tuple[str, str]] = set()
        if nameservers is None:
            self._configure_system()
        elif isinstance(nameservers, str):
            raise ConfigurationError(
                f"dns_nameservers must be a list of strings, such as [{nameservers!r}], "
                "not a single string"
            )
        elif isinstance(nameservers, Sequence):
            self._configure_nameservers(nameservers)
        else:
            if self._dns is None or not isinstance(nameservers, self._dns.Resolver):
                raise ConfigurationError(
                    "dns_nameservers must be a list of 'ip[:port]' strings, a "
                    f"dns.resolver.Resolver or None, got {nameservers!r}"
                )
            self._resolver = nameservers
            self._search = None  # the object's own use_search_by_default
            self._description = f"{type(nameservers).__name__} object"

    def _configure_nameservers(self, nameservers: Sequence[str]) -> None:
        servers = [parse_nameserver(s) for s in nameservers]
        if not servers:
            raise ConfigurationError(
                "dns_nameservers is empty: give at least one 'ip[:port]', or None to use "
                "the system configuration"
            )
        if self._dns is None:
            raise ConfigurationError(
                "dns_nameservers needs dnspython: install the 'dns' extra "
                "(pip install 'sqla-rebalance[dns]')"
            )
        import dns.name
        import dns.nameserver

        resolver = self._dns.Resolver(configure=False)
        resolver.domain = dns.name.root
        resolver.search = []
        self._setup(resolver, [dns.nameserver.Do53Nameserver(a, p) for a, p in servers])
        self._description = ", ".join(f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a, p in servers)

    def _configure_system(self) -> None:
        self._description = "system"
        if self._dns is None:
            return  # getaddrinfo only
        try:
            resolver = self._dns.Resolver()
        except Exception as exc:
            # No /etc/resolv.conf, or one without nameservers (some containers):
            # the system resolver may still work through other NSS sources.
            log.debug("no usable DNS configuration (%s); using getaddrinfo", exc)
            return
        self._description = "system: " + ", ".join(str(s) for s in resolver.nameservers)
        self._setup(resolver, list(resolver.nameservers))
        self._search = True  # as getaddrinfo would, with the system's search list and ndots
        self._system_fallback = True

    def _setup(self, resolver: dns.resolver.Resolver, servers: list[Any]) -> None:
        resolver.cache = None  # TTLs are handled by the caller
        resolver.lifetime = self._timeout
        # Per-attempt timeout: each nameserver gets at least two tries within the
        # budget, so a dead first server or one lost datagram does not use it all.
        attempt = min(resolver.timeout, self._timeout / (2 * len(servers)))
        resolver.timeout = attempt
        # dnspython sleeps (0.1 s, doubling up to 2 s) between rounds over the
        # nameserver list without looking at the lifetime, which would overrun
        # ``timeout``. Listing the servers enough times over that the lifetime runs
        # out within the first round means retries never wait for that sleep.
        rounds = math.ceil(self._timeout / (attempt * len(servers))) + 1
        resolver.nameservers = servers * rounds
        self._resolver = resolver

    @property
    def timeout(self) -> float:
        """Upper bound, in seconds, of one :meth:`resolve` call."""
        return self._timeout

    def __repr__(self) -> str:
        return f"<Resolver {self._description} timeout={self._timeout:g}s>"

    def resolve(self, name: str) -> Answer:
        """All A and AAAA addresses of ``name``; raises :class:`DnsError` if there are none.

        Both record types are asked for; one of them having no records is
        normal. If the query for one type fails (REFUSED, SERVFAIL, a
        timeout: some container and corporate resolvers refuse AAAA) while
        the other answers with records, those records are the answer, plus
        the addresses the failed type had in this resolver's last answer for
        the name (so a passing SERVFAIL does not take hosts away); the
        answer's ``failed`` names the type. Only when no record came back at
        all does a failure fail the call, leaving the caller its previous
        answer. A type that answers again (with records or without) replaces
        what was kept for it; NXDOMAIN or an empty answer forgets the name.

        Raises :class:`DnsError` and nothing else (whatever the nameserver
        sends back); the answer's TTL is within ``[0, 2**31 - 1]``.
        """
        if not isinstance(name, str) or not name.strip():
            raise DnsError(str(name), "error", f"cannot resolve {name!r}: not a host name")
        literal = _literal(name)
        if literal is not None:
            return Answer((str(literal),), math.inf, "literal")
        if _is_localhost(name):
            return Answer((LOCALHOST_ADDRESS,), math.inf, "literal")
        deadline = time.monotonic() + self._timeout
        if self._resolver is None:
            return self._resolve_system(name, deadline)
        try:
            return self._resolve_dns(self._resolver, name, deadline)
        except DnsError as exc:
            if not (self._system_fallback and exc.kind in ("nxdomain", "empty")):
                raise
            try:
                answer = self._resolve_system(name, deadline)
            except DnsError as sys_exc:
                log.debug("getaddrinfo(%r) after %s failed too: %s", name, exc.kind, sys_exc)
                raise exc from None
            log.debug("%r is not in DNS (%s) but getaddrinfo knows it", name, exc.kind)
            return answer

    def _resolve_dns(self, resolver: dns.resolver.Resolver, name: str, deadline: float) -> Answer:
        import dns.rdatatype

        found: dict[str, tuple[tuple[str, ...], float]] = {}  # type -> (addresses, ttl)
        failures: dict[str, DnsError] = {}
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            type_name = dns.rdatatype.to_text(rdtype)
            try:
                found[type_name] = self._query(resolver, name, rdtype, deadline)
            except DnsError as exc:
                if exc.kind == "nxdomain" and not any(a for a, _ in found.values()):
                    # The name does not exist (for A: no need to ask for AAAA).
                    self._forget(name)
                    raise
                # NXDOMAIN for AAAA after A records (a broken resolver, or the name
                # removed in between) says nothing the next refresh would not.
                failures[type_name] = exc
        fresh = [a for addresses, _ in found.values() for a in addresses]
        if not fresh:
            if failures:
                # Nothing answered with records: nothing to go on, the caller keeps
                # its previous answer.
                raise next(iter(failures.values()))
            self._forget(name)
            raise DnsError(name, "empty", f"DNS name {name!r} has no A or AAAA records")
        ttl = min(ttl for addresses, ttl in found.values() if addresses)
        kept = self._remember(name, {t: a for t, (a, _) in found.items()}, failures)
        return Answer(_sorted_addresses([*fresh, *kept]), ttl, "dns", tuple(failures))

    def _query(
        self, resolver: dns.resolver.Resolver, name: str, rdtype: Any, deadline: float
    ) -> tuple[tuple[str, ...], float]:
        """The addresses of one record type and their TTL (``inf`` without records).

        Raises :class:`DnsError` (and nothing else) when the query fails.
        """
        import dns.exception
        import dns.resolver

        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DnsError(name, "timeout", self._timeout_message(name, "time was up"))
        try:
            answer = resolver.resolve(
                name,
                rdtype,
                search=self._search,
                lifetime=remaining,
                raise_on_no_answer=False,
            )
        except dns.resolver.NXDOMAIN:
            raise DnsError(name, "nxdomain", f"DNS name {name!r} does not exist") from None
        except dns.resolver.NoAnswer:
            return (), math.inf  # NODATA (a resolver object that raises on no answer)
        except dns.exception.Timeout as exc:
            detail = _summary(exc.kwargs.get("errors")) or "the DNS operation timed out"
            raise DnsError(name, "timeout", self._timeout_message(name, detail)) from None
        except dns.resolver.NoNameservers as exc:
            errors = exc.kwargs.get("errors") or []
            # Every server timed out or could not be reached: nobody answered.
            unreachable = all(
                isinstance(e[3], (OSError, EOFError, dns.exception.Timeout)) for e in errors
            )
            if errors and unreachable:
                raise DnsError(
                    name, "timeout", self._timeout_message(name, _summary(errors))
                ) from None
            raise DnsError(
                name, "error", f"resolving {name!r} failed: {_summary(errors) or exc}"
            ) from None
        except Exception as exc:
            raise DnsError(
                name, "error", f"resolving {name!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            rrset = answer.rrset
            if rrset is None:
                return (), math.inf
            addresses = tuple(_address(rdata.address) for rdata in rrset)
            ttl = _sane_ttl(answer.chaining_result.minimum_ttl)  # CNAMEs included
            if resolver.cache is not None:
                # Possibly a cached answer: what it has left, not its original TTL.
                ttl = min(ttl, _sane_ttl(answer.expiration - time.time()))
        except Exception as exc:
            # A malformed answer (from a resolver object, or an address that is none).
            raise DnsError(
                name, "error", f"resolving {name!r} gave a malformed answer: {exc!r}"
            ) from exc
        return addresses, ttl

    def _remember(
        self,
        name: str,
        answered: dict[str, tuple[str, ...]],
        failures: dict[str, DnsError],
    ) -> tuple[str, ...]:
        """Record what each record type answered; return the last addresses of those that failed.

        A record type whose query failed keeps the addresses it had in this
        resolver's last answer for ``name`` (none if it never had any): a
        transient SERVFAIL on AAAA must not take the IPv6 hosts away, and a
        resolver that always refuses AAAA must not cost the IPv4 ones.
        """
        with self._lock:
            known = self._known.pop(name, None) or {}
            kept = tuple(a for t in failures for a in known.get(t, ()))
            newly_failing = [t for t in failures if (name, t) not in self._failing]
            recovered = [t for t in answered if (name, t) in self._failing]
            for t in failures:
                self._failing.add((name, t))
            for t in recovered:
                self._failing.discard((name, t))
            known.update(answered)
            self._known[name] = known  # now the most recent entry
            while len(self._known) > _KNOWN_NAMES:
                oldest = next(iter(self._known))
                del self._known[oldest]
                self._failing -= {(oldest, "A"), (oldest, "AAAA")}
        for t in newly_failing:
            log.warning(
                "DNS %s query for %r failed (%s); using the %s records%s until it answers",
                t,
                name,
                failures[t],
                "/".join(answered),
                f" and the last {t} addresses ({', '.join(kept)})" if kept else "",
            )
        for t in recovered:
            log.info("DNS %s query for %r answers again", t, name)
        if failures and not newly_failing:
            log.debug("DNS %s query for %r failed again", "/".join(failures), name)
        return kept

    def _forget(self, name: str) -> None:
        """The name does not exist or has no records: its last addresses are no longer kept."""
        with self._lock:
            self._known.pop(name, None)
            self._failing -= {(name, "A"), (name, "AAAA")}

    def _timeout_message(self, name: str, detail: str) -> str:
        return (
            f"no nameserver ({self._description}) answered for {name!r} within "
            f"{self._timeout:g} s: {detail}"
        )

    def _resolve_system(self, name: str, deadline: float) -> Answer:
        try:
            infos = _getaddrinfo(name, deadline - time.monotonic())
        except TimeoutError:
            raise DnsError(
                name, "timeout", f"the system resolver did not answer for {name!r} in time"
            ) from None
        except socket.gaierror as exc:
            kind: DnsErrorKind = (
                "error" if exc.errno is None else _GAI_KINDS.get(exc.errno, "error")
            )
            raise DnsError(name, kind, f"resolving {name!r} failed: {exc.strerror}") from None
        except (OSError, UnicodeError) as exc:
            raise DnsError(name, "error", f"resolving {name!r} failed: {exc}") from None
        addresses = [
            str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)
        ]
        if not addresses:
            raise DnsError(name, "empty", f"{name!r} has no IPv4 or IPv6 address")
        return Answer(_sorted_addresses(addresses), SYSTEM_TTL, "system")


_GAI_KINDS: dict[int, DnsErrorKind] = {
    socket.EAI_NONAME: "nxdomain",
    socket.EAI_AGAIN: "timeout",
}
for _code in ("EAI_NODATA", "EAI_ADDRFAMILY"):  # glibc only
    if hasattr(socket, _code):
        _GAI_KINDS[getattr(socket, _code)] = "empty"


_AddrInfo = tuple[Any, Any, int, str, tuple[Any, ...]]


def _getaddrinfo(name: str, timeout: float) -> list[_AddrInfo]:
    """``socket.getaddrinfo`` that gives up (TimeoutError) after ``timeout`` seconds.

    getaddrinfo cannot be interrupted, so it runs in a daemon thread that is
    left to finish on its own if it is late: the caller (a request thread on
    first use) must not wait for the system resolver's own, much longer,
    retries.
    """
    if timeout <= 0:
        raise TimeoutError
    result: list[list[_AddrInfo]] = []
    failure: list[Exception] = []
    done = threading.Event()

    def run() -> None:
        try:
            result.append(socket.getaddrinfo(name, None, type=socket.SOCK_STREAM))
        except Exception as exc:  # handed to the caller
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="sqla-rebalance-getaddrinfo", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError
    if failure:
        raise failure[0]
    return result[0]
