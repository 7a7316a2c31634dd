"""Name resolution (``sqla_rebalance.dns``).

Unit tests need no server: dnspython resolvers are replaced by subclasses whose
``resolve`` returns real ``dns.resolver.Answer`` objects built from DNS messages
(so the TTL arithmetic is dnspython's own) or raises dnspython's exceptions.
Integration tests query a real dnsmasq (the ``dns_server`` fixture).
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest
from sqlalchemy import exc as sa_exc

from sqla_rebalance import dns as rdns
from sqla_rebalance.dns import (
    SYSTEM_TTL,
    Answer,
    DnsError,
    Resolver,
    parse_nameserver,
    refresh_delay,
)
from sqla_rebalance.errors import ConfigurationError, RebalanceError

from .servers import find_free_port

# --------------------------------------------------------------------------- helpers


def make_answer(
    name: str,
    rdtype: str,
    addresses: list[str],
    ttl: int = 60,
    cname: tuple[str, int] | None = None,
) -> dns.resolver.Answer:
    """A dnspython Answer as the resolver would build it from a response message.

    With ``cname=(target, ttl)``, ``name`` is a CNAME to ``target`` which holds the records.
    """
    qname = dns.name.from_text(name)
    query = dns.message.make_query(qname, rdtype)
    response = dns.message.make_response(query)

    def add(owner: str, ttl: int, rdtype: str, *values: str) -> None:
        # find_rrset(create=True) keeps the message's index in step with the section.
        rrset = dns.rrset.from_text(owner, ttl, "IN", rdtype, *values)
        section = response.find_rrset(
            response.answer, rrset.name, rrset.rdclass, rrset.rdtype, create=True
        )
        section.update(rrset)
        section.update_ttl(ttl)

    owner = name
    if cname is not None:
        target, cname_ttl = cname
        add(name, cname_ttl, "CNAME", target)
        owner = target
    if addresses:
        add(owner, ttl, rdtype, *addresses)
    return dns.resolver.Answer(qname, dns.rdatatype.from_text(rdtype), dns.rdataclass.IN, response)


Outcome = dns.resolver.Answer | BaseException | Callable[[], dns.resolver.Answer]


class FakeResolver(dns.resolver.Resolver):
    """A dnspython resolver answering from a table: ``{"A": outcome, "AAAA": outcome}``.

    An outcome is an Answer, an exception to raise, or a callable returning an Answer.
    Every call is recorded with its keyword arguments.
    """

    def __init__(self, outcomes: dict[str, Outcome]) -> None:
        super().__init__(configure=False)
        self.outcomes = outcomes
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def resolve(self, qname: Any, rdtype: Any = "A", *args: Any, **kwargs: Any) -> Any:
        rdtype_text = dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rdtype))
        self.calls.append((str(qname), rdtype_text, kwargs))
        outcome = self.outcomes[rdtype_text]
        if isinstance(outcome, BaseException):
            raise outcome
        if callable(outcome):
            return outcome()
        return outcome


def nodata(name: str, rdtype: str) -> dns.resolver.Answer:
    return make_answer(name, rdtype, [])


def nxdomain(name: str) -> dns.resolver.NXDOMAIN:
    return dns.resolver.NXDOMAIN(qnames=[dns.name.from_text(name)], responses={})


def no_nameservers(*errors: object) -> dns.resolver.NoNameservers:
    request = dns.message.make_query("db.example.", "A")
    return dns.resolver.NoNameservers(
        request=request, errors=[("Do53:10.0.0.53@53", False, 53, e, None) for e in errors]
    )


def lifetime_timeout() -> dns.resolver.LifetimeTimeout:
    return dns.resolver.LifetimeTimeout(
        timeout=2.0, errors=[("Do53:10.0.0.53@53", False, 53, dns.exception.Timeout(), None)]
    )


class FakeClock:
    """Stands in for the ``time`` module inside ``sqla_rebalance.dns``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()


def kind_of(resolver: Resolver, name: str) -> str:
    with pytest.raises(DnsError) as info:
        resolver.resolve(name)
    assert info.value.name == name
    return info.value.kind


# --------------------------------------------------------------------------- scripted nameserver

#: What a :class:`ScriptedDnsServer` handler returns: a response, raw bytes, or None (no reply).
Reply = dns.message.Message | bytes | None


class ScriptedDnsServer:
    """A real UDP nameserver on ``127.0.0.1`` (dnspython, in a thread of this process) that
    answers each query with ``handler(query)``: a response message, raw bytes sent as they
    are, or None to send nothing. Queries received are recorded in ``queries`` as
    ``(name, type)``; an exception in the handler is kept in ``errors`` (and no reply sent).

    dnsmasq cannot refuse one record type and serve the other; resolvers in some containers
    and companies do (REFUSED or SERVFAIL for AAAA). :func:`forwarding` makes this server such a
    resolver in front of the suite's dnsmasq.
    """

    def __init__(self, handler: Callable[[dns.message.Message], Reply]) -> None:
        self.handler = handler
        self.queries: list[tuple[str, str]] = []
        self.errors: list[BaseException] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # Free for TCP too: a truncated reply makes dnspython retry over TCP, to be refused.
            self._sock.bind(("127.0.0.1", find_free_port(["127.0.0.1"], udp=True)))
        except BaseException:
            self._sock.close()
            raise
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="scripted-dns", daemon=True)
        self._thread.start()

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self._sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
                question = query.question[0]
                self.queries.append(
                    (question.name.to_text(), dns.rdatatype.to_text(question.rdtype))
                )
                reply = self.handler(query)
                if reply is not None:
                    self._sock.sendto(reply if isinstance(reply, bytes) else reply.to_wire(), peer)
            except Exception as exc:  # reported by the test through ``errors``
                self.errors.append(exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def __enter__(self) -> ScriptedDnsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rcode_reply(query: dns.message.Message, rcode: int) -> dns.message.Message:
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    return reply


def forwarding(upstream: str, fail: dict[str, int]) -> Callable[[dns.message.Message], Reply]:
    """A handler that forwards every query to ``upstream`` (``"ip:port"``) and passes its
    reply back, except queries for the record types in ``fail`` (``{"AAAA": REFUSED}``,
    read at each query, so a test may change it): answered at once with that rcode."""
    address, port = parse_nameserver(upstream)

    def handle(query: dns.message.Message) -> Reply:
        rdtype = dns.rdatatype.to_text(query.question[0].rdtype)
        if rdtype in fail:
            return rcode_reply(query, fail[rdtype])
        return dns.query.udp(query, address, port=port, timeout=2.0)

    return handle


class DnsFront(ScriptedDnsServer):
    """A resolver in front of dnsmasq that fails the record types in ``fail``."""

    def __init__(self, upstream: str) -> None:
        self.fail: dict[str, int] = {}
        super().__init__(forwarding(upstream, self.fail))


@pytest.fixture
def dns_front(dns_server: Any) -> Iterator[DnsFront]:
    """A :class:`DnsFront` of ``dns_server``; ``dns_front.fail["AAAA"] = dns.rcode.REFUSED``."""
    with DnsFront(dns_server.nameserver) as front:
        yield front
    assert not front.errors


# --------------------------------------------------------------------------- literals


@pytest.mark.parametrize(
    ("name", "address"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("2001:DB8:0:0::0001", "2001:db8::1"),
        ("[2001:db8::7]", "2001:db8::7"),
    ],
)
def test_ip_literals_are_returned_without_a_query(name: str, address: str) -> None:
    fake = FakeResolver({})  # any query would raise KeyError
    answer = Resolver(fake).resolve(name)
    assert answer == Answer((address,), math.inf, "literal")
    assert fake.calls == []


@pytest.mark.parametrize("name", ["localhost", "LOCALHOST", "localhost.", "app.localhost"])
def test_localhost_is_only_the_ipv4_loopback_and_never_queried(name: str) -> None:
    fake = FakeResolver({})
    assert Resolver(fake).resolve(name) == Answer(("127.0.0.1",), math.inf, "literal")
    assert fake.calls == []


def test_localhost_rule_holds_for_the_system_resolver_too(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> object:
        raise AssertionError("getaddrinfo must not be called for localhost")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    hide_dnspython(monkeypatch)
    assert Resolver().resolve("localhost").addresses == ("127.0.0.1",)


def test_not_a_name() -> None:
    resolver = Resolver(FakeResolver({}))
    assert kind_of(resolver, "") == "error"
    assert kind_of(resolver, "  ") == "error"


# --------------------------------------------------------------------------- parse_nameserver


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        (" 10.0.0.2:53 ", ("10.0.0.2", 53)),
        ("::1", ("::1", 53)),
        ("[::1]", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[2001:DB8::0:1]:65535", ("2001:db8::1", 65535)),
        ("fe80::1", ("fe80::1", 53)),
    ],
)
def test_parse_nameserver(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "not an IP address"),
        ("ns1.example.com", "not an IP address"),
        ("ns1.example.com:53", "not an IP address"),
        ("1.2.3.4.5", "not an IP address"),
        ("256.0.0.1", "not an IP address"),
        ("127.0.0.1:", "is not a number"),
        ("127.0.0.1:dns", "is not a number"),
        ("127.0.0.1:-1", "is not a number"),
        ("127.0.0.1:+53", "is not a number"),
        ("127.0.0.1:0", "out of range"),
        ("127.0.0.1:65536", "out of range"),
        ("[::1", "missing ']'"),
        ("[::1]53", "expected ':port'"),
        ("[::1]:", "is not a number"),
        ("[127.0.0.1]:53", "brackets are for IPv6"),
        ("[nameserver]:53", "not an IP address"),
    ],
)
def test_parse_nameserver_rejects(text: str, reason: str) -> None:
    with pytest.raises(ConfigurationError, match=reason) as info:
        parse_nameserver(text)
    assert repr(text) in str(info.value)  # the message names the offending value


@pytest.mark.parametrize("value", [None, 53, b"127.0.0.1", ("127.0.0.1", 53)])
def test_parse_nameserver_rejects_non_strings(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="must be a string"):
        parse_nameserver(value)


# --------------------------------------------------------------------------- construction


def test_configuration_errors_are_sqlalchemy_argument_errors() -> None:
    with pytest.raises(sa_exc.ArgumentError):
        Resolver(["nameserver.example"])


@pytest.mark.parametrize(
    ("nameservers", "reason"),
    [
        ("127.0.0.1:5353", "not a single string"),
        ([], "is empty"),
        (["127.0.0.1", "ns.example"], "'ns.example' is not an IP address"),
        ([53], "must be a string"),
        (object(), "dns.resolver.Resolver or None"),
        ({"127.0.0.1": 53}, "dns.resolver.Resolver or None"),
    ],
)
def test_invalid_nameservers_fail_at_construction(nameservers: Any, reason: str) -> None:
    with pytest.raises(ConfigurationError, match=reason):
        Resolver(nameservers)


@pytest.mark.parametrize("timeout", [0, -1, math.nan, math.inf, "2", None, True])
def test_invalid_timeout(timeout: Any) -> None:
    with pytest.raises(ConfigurationError, match="timeout"):
        Resolver(["127.0.0.1"], timeout=timeout)


def test_explicit_nameservers_configure_dnspython_without_cache_or_search() -> None:
    resolver = Resolver(["127.0.0.1:5353", "[::1]"], timeout=3.0)
    inner = resolver._resolver
    assert inner is not None
    assert inner.cache is None
    assert inner.lifetime == 3.0
    assert inner.search == [] and inner.domain == dns.name.root
    servers = {(ns.address, ns.port) for ns in inner.nameservers}
    assert servers == {("127.0.0.1", 5353), ("::1", 53)}
    # Each server is tried at least twice within the budget.
    assert inner.timeout <= 3.0 / 4
    assert repr(resolver) == "<Resolver 127.0.0.1:5353, [::1]:53 timeout=3s>"
    assert resolver.timeout == 3.0


def test_a_resolver_object_is_used_as_is() -> None:
    fake = FakeResolver(
        {"A": make_answer("db.example.", "A", ["10.0.0.1"]), "AAAA": nodata("db.example.", "AAAA")}
    )
    fake.lifetime, fake.timeout = 9.0, 4.0
    fake.use_search_by_default = True
    resolver = Resolver(fake, timeout=1.5)
    resolver.resolve("db.example")
    # Not modified; the limit is passed per call; its own search setting applies.
    assert (fake.lifetime, fake.timeout, fake.cache) == (9.0, 4.0, None)
    assert [kw["search"] for _, _, kw in fake.calls] == [None, None]
    assert all(0 < kw["lifetime"] <= 1.5 for _, _, kw in fake.calls)


def hide_dnspython(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import dns.resolver`` fail, as without the ``dns`` extra."""
    monkeypatch.setitem(sys.modules, "dns.resolver", None)


def test_without_dnspython_explicit_nameservers_ask_for_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hide_dnspython(monkeypatch)
    with pytest.raises(ConfigurationError, match=r"sqla-rebalance\[dns\]"):
        Resolver(["127.0.0.1:5353"])
    # Bad values are still reported as such, before the missing extra.
    with pytest.raises(ConfigurationError, match="not an IP address"):
        Resolver(["ns.example"])


def test_without_dnspython_the_system_resolver_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_getaddrinfo(monkeypatch, {"db.example": ["10.0.0.2", "10.0.0.1", "10.0.0.2"]})
    hide_dnspython(monkeypatch)
    resolver = Resolver()
    assert repr(resolver) == "<Resolver system timeout=2s>"
    assert resolver.resolve("db.example") == Answer(("10.0.0.1", "10.0.0.2"), SYSTEM_TTL, "system")
    assert calls == ["db.example"]


# --------------------------------------------------------------------------- answers


def test_addresses_are_sorted_numerically_and_deduplicated_ipv4_first() -> None:
    name = "db.example."
    fake = FakeResolver(
        {
            "A": make_answer(name, "A", ["10.0.0.10", "10.0.0.9", "10.0.0.10", "9.9.9.9"]),
            "AAAA": make_answer(name, "AAAA", ["2001:db8::10", "2001:db8::9", "::1"]),
        }
    )
    answer = Resolver(fake).resolve("db.example")
    assert answer.addresses == (
        "9.9.9.9",
        "10.0.0.9",
        "10.0.0.10",
        "::1",
        "2001:db8::9",
        "2001:db8::10",
    )
    assert answer.source == "dns"
    assert [(q, t) for q, t, _ in fake.calls] == [("db.example", "A"), ("db.example", "AAAA")]
    for _, _, kwargs in fake.calls:
        assert kwargs["search"] is None  # a resolver object keeps its own setting
        assert kwargs["raise_on_no_answer"] is False
        assert 0 < kwargs["lifetime"] <= 2.0


def test_ttl_is_the_smallest_of_the_rrsets() -> None:
    name = "db.example."
    fake = FakeResolver(
        {
            "A": make_answer(name, "A", ["10.0.0.1"], ttl=300),
            "AAAA": make_answer(name, "AAAA", ["2001:db8::1"], ttl=20),
        }
    )
    assert Resolver(fake).resolve(name).ttl == 20


def test_ttl_includes_the_cname_chain() -> None:
    name = "db.example."
    fake = FakeResolver(
        {
            "A": make_answer(name, "A", ["10.0.0.1"], ttl=300, cname=("pg.example.", 7)),
            "AAAA": nodata(name, "AAAA"),
        }
    )
    assert Resolver(fake).resolve(name) == Answer(("10.0.0.1",), 7.0, "dns")


def test_a_family_without_records_does_not_count_for_the_ttl() -> None:
    name = "db.example."
    fake = FakeResolver({"A": nodata(name, "A"), "AAAA": make_answer(name, "AAAA", ["::2"], 45)})
    assert Resolver(fake).resolve(name) == Answer(("::2",), 45.0, "dns")


def test_noanswer_raised_by_a_resolver_object_is_nodata() -> None:
    name = "db.example."
    no_answer = dns.resolver.NoAnswer(response=nodata(name, "AAAA").response)
    fake = FakeResolver({"A": make_answer(name, "A", ["10.0.0.1"]), "AAAA": no_answer})
    assert Resolver(fake).resolve(name).addresses == ("10.0.0.1",)


def test_cached_answers_report_the_time_they_have_left() -> None:
    name = "db.example."
    cached = make_answer(name, "A", ["10.0.0.1"], ttl=300)
    cached.expiration = time.time() + 12  # put in the cache 288 s ago
    fake = FakeResolver({"A": cached, "AAAA": nodata(name, "AAAA")})
    fake.cache = dns.resolver.Cache()
    ttl = Resolver(fake).resolve(name).ttl
    assert 0 < ttl <= 12


def test_an_expired_cached_answer_has_ttl_zero() -> None:
    name = "db.example."
    cached = make_answer(name, "A", ["10.0.0.1"], ttl=300)
    cached.expiration = time.time() - 5
    fake = FakeResolver({"A": cached, "AAAA": nodata(name, "AAAA")})
    fake.cache = dns.resolver.LRUCache()
    assert Resolver(fake).resolve(name).ttl == 0


def test_answer_is_a_frozen_value() -> None:
    answer = Answer(("10.0.0.1",), 5.0, "dns")
    with pytest.raises(dataclasses.FrozenInstanceError):
        answer.ttl = 6.0  # type: ignore[misc]
    assert not hasattr(answer, "__dict__")
    assert answer == Answer(("10.0.0.1",), 5.0, "dns")
    assert hash(answer) == hash(Answer(("10.0.0.1",), 5.0, "dns"))


# --------------------------------------------------------------------------- errors


def test_nxdomain_stops_without_asking_for_aaaa() -> None:
    fake = FakeResolver({"A": nxdomain("gone.example."), "AAAA": AssertionError("asked")})
    assert kind_of(Resolver(fake), "gone.example") == "nxdomain"
    assert len(fake.calls) == 1


def test_nxdomain_on_aaaa_only() -> None:
    name = "db.example."
    fake = FakeResolver({"A": nodata(name, "A"), "AAAA": nxdomain(name)})
    assert kind_of(Resolver(fake), name) == "nxdomain"


def test_no_a_and_no_aaaa_is_empty() -> None:
    name = "db.example."
    fake = FakeResolver({"A": nodata(name, "A"), "AAAA": nodata(name, "AAAA")})
    with pytest.raises(DnsError, match="no A or AAAA records") as info:
        Resolver(fake).resolve(name)
    assert info.value.kind == "empty"


def test_lifetime_timeout_is_timeout() -> None:
    fake = FakeResolver({"A": lifetime_timeout(), "AAAA": AssertionError("asked")})
    with pytest.raises(DnsError, match="no nameserver") as info:
        Resolver(fake).resolve("db.example")
    assert info.value.kind == "timeout"


def refused(*, rcode: str = "REFUSED") -> dns.resolver.NoNameservers:
    """What dnspython raises when every nameserver answered ``rcode``."""
    return no_nameservers(rcode)


ONE_TYPE_FAILURES: dict[str, Callable[[], BaseException]] = {
    "REFUSED": refused,
    "SERVFAIL": lambda: refused(rcode="SERVFAIL"),
    "NOTIMP": lambda: refused(rcode="NOTIMP"),
    "timeout": lifetime_timeout,
    "unreachable": lambda: no_nameservers(ConnectionRefusedError(111, "refused")),
    "bug": lambda: ValueError("boom"),
}


@pytest.mark.parametrize("failure", list(ONE_TYPE_FAILURES))
@pytest.mark.parametrize(
    ("failing", "answering", "address"), [("AAAA", "A", "10.0.0.1"), ("A", "AAAA", "2001:db8::1")]
)
def test_one_record_type_failing_does_not_discard_the_other(
    failure: str, failing: str, answering: str, address: str
) -> None:
    # Resolvers in some containers and companies answer A but refuse AAAA (or the reverse).
    name = "db.example."
    fake = FakeResolver(
        {
            answering: make_answer(name, answering, [address], ttl=40),
            failing: ONE_TYPE_FAILURES[failure](),
        }
    )
    answer = Resolver(fake).resolve(name)
    assert answer == Answer((address,), 40.0, "dns", (failing,))
    assert len(fake.calls) == 2


def test_a_failing_type_keeps_its_last_addresses_until_it_answers_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = "db.example."
    both = {
        "A": make_answer(name, "A", ["10.0.0.1"], ttl=30),
        "AAAA": make_answer(name, "AAAA", ["2001:db8::1"], ttl=30),
    }
    fake = FakeResolver(dict(both))
    resolver = Resolver(fake)
    assert resolver.resolve(name).addresses == ("10.0.0.1", "2001:db8::1")
    # A passing SERVFAIL on AAAA: the IPv6 host is not taken away, the A records are fresh.
    fake.outcomes["AAAA"] = refused(rcode="SERVFAIL")
    fake.outcomes["A"] = make_answer(name, "A", ["10.0.0.2"], ttl=20)
    with caplog.at_level("DEBUG", logger="sqla_rebalance.dns"):
        first = resolver.resolve(name)
        second = resolver.resolve(name)
    assert first == second == Answer(("10.0.0.2", "2001:db8::1"), 20.0, "dns", ("AAAA",))
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1  # once per failing spell, not per refresh
    assert "AAAA query for 'db.example.' failed" in warnings[0].getMessage()
    assert "2001:db8::1" in warnings[0].getMessage()
    # AAAA answers again, without records now: the kept address goes.
    fake.outcomes["AAAA"] = nodata(name, "AAAA")
    assert resolver.resolve(name) == Answer(("10.0.0.2",), 20.0, "dns")
    fake.outcomes["AAAA"] = refused()
    assert resolver.resolve(name) == Answer(("10.0.0.2",), 20.0, "dns", ("AAAA",))
    # Another resolver (or another name) has nothing kept.
    fake.outcomes.update(both)
    assert resolver.resolve(name).addresses == ("10.0.0.1", "2001:db8::1")
    fake.outcomes["AAAA"] = refused()
    assert Resolver(fake).resolve(name).addresses == ("10.0.0.1",)


def test_nxdomain_and_empty_answers_forget_the_kept_addresses() -> None:
    name = "db.example."
    for gone in (nxdomain(name), nodata(name, "A")):
        fake = FakeResolver(
            {
                "A": make_answer(name, "A", ["10.0.0.1"]),
                "AAAA": make_answer(name, "AAAA", ["2001:db8::1"]),
            }
        )
        resolver = Resolver(fake)
        resolver.resolve(name)
        fake.outcomes = {"A": gone, "AAAA": nodata(name, "AAAA")}
        with pytest.raises(DnsError):
            resolver.resolve(name)
        # Back with A only while AAAA is refused: the old AAAA address is not revived.
        fake.outcomes = {"A": make_answer(name, "A", ["10.0.0.1"]), "AAAA": refused()}
        assert resolver.resolve(name).addresses == ("10.0.0.1",)


def test_a_failure_without_any_record_is_the_failure() -> None:
    # Nothing to go on: an error, so that the caller keeps its previous answer.
    name = "db.example."
    fake = FakeResolver({"A": nodata(name, "A"), "AAAA": refused()})
    assert kind_of(Resolver(fake), name) == "error"
    fake = FakeResolver({"A": refused(), "AAAA": nodata(name, "AAAA")})
    assert kind_of(Resolver(fake), name) == "error"
    fake = FakeResolver({"A": refused(), "AAAA": lifetime_timeout()})
    assert kind_of(Resolver(fake), name) == "error"  # the first failure


def test_kept_addresses_are_no_answer_on_their_own() -> None:
    name = "db.example."
    fake = FakeResolver(
        {"A": make_answer(name, "A", ["10.0.0.1"]), "AAAA": make_answer(name, "AAAA", ["::2"])}
    )
    resolver = Resolver(fake)
    resolver.resolve(name)
    fake.outcomes = {"A": refused(), "AAAA": refused()}
    assert kind_of(resolver, name) == "error"
    # ...and the failure did not erase them.
    fake.outcomes = {"A": make_answer(name, "A", ["10.0.0.1"]), "AAAA": refused()}
    assert resolver.resolve(name).addresses == ("10.0.0.1", "::2")


def test_nxdomain_for_aaaa_after_a_records_is_a_failed_type() -> None:
    # The name exists (it has A records): a resolver answering NXDOMAIN for AAAA is broken.
    name = "db.example."
    fake = FakeResolver({"A": make_answer(name, "A", ["10.0.0.1"]), "AAAA": nxdomain(name)})
    assert Resolver(fake).resolve(name) == Answer(("10.0.0.1",), 60.0, "dns", ("AAAA",))


def test_a_aaaa_that_runs_out_of_time_after_the_a_query_keeps_the_a_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(rdns, "time", clock)
    name = "db.example."

    def slow_a() -> dns.resolver.Answer:
        clock.now += 2.0  # the whole budget
        return make_answer(name, "A", ["10.0.0.1"])

    fake = FakeResolver({"A": slow_a, "AAAA": AssertionError("asked")})
    answer = Resolver(fake, timeout=2.0).resolve(name)
    assert answer == Answer(("10.0.0.1",), 60.0, "dns", ("AAAA",))
    assert len(fake.calls) == 1


def test_ipv4_mapped_aaaa_records_are_the_ipv4_address() -> None:
    name = "db.example."
    fake = FakeResolver(
        {
            "A": make_answer(name, "A", ["10.0.0.1"]),
            "AAAA": make_answer(name, "AAAA", ["::ffff:10.0.0.1", "::ffff:10.0.0.2"]),
        }
    )
    assert Resolver(fake).resolve(name).addresses == ("10.0.0.1", "10.0.0.2")


@pytest.mark.parametrize(("ttl", "expected"), [(-5, 0.0), (2**31 - 1, 2**31 - 1), (2**31, 0.0)])
def test_ttls_out_of_range_are_zero(ttl: int, expected: float) -> None:
    # RFC 2181 section 8: a TTL with the top bit set means 0. Negative ones only come from
    # a resolver object, never from the wire.
    name = "db.example."
    answer = make_answer(name, "A", ["10.0.0.1"])
    answer.rrset.ttl = ttl  # type: ignore[union-attr]
    answer.chaining_result.minimum_ttl = ttl
    fake = FakeResolver({"A": answer, "AAAA": nodata(name, "AAAA")})
    assert Resolver(fake).resolve(name).ttl == expected


def test_a_malformed_answer_object_is_kind_error() -> None:
    name = "db.example."
    broken = make_answer(name, "A", ["10.0.0.1"])
    broken.chaining_result = None  # type: ignore[assignment]
    fake = FakeResolver({"A": broken, "AAAA": nodata(name, "AAAA")})
    assert kind_of(Resolver(fake), name) == "error"


@pytest.mark.parametrize(
    ("errors", "kind"),
    [
        ((dns.exception.Timeout(), ConnectionRefusedError(111, "refused")), "timeout"),
        ((OSError(101, "Network is unreachable"),), "timeout"),
        (("SERVFAIL",), "error"),
        ((dns.exception.Timeout(), "REFUSED"), "error"),
        ((), "error"),
    ],
)
def test_no_nameservers(errors: tuple[object, ...], kind: str) -> None:
    fake = FakeResolver({"A": no_nameservers(*errors), "AAAA": AssertionError("asked")})
    assert kind_of(Resolver(fake), "db.example") == kind


def test_unexpected_exceptions_are_kind_error_with_the_cause() -> None:
    bug = ValueError("boom")
    fake = FakeResolver({"A": bug, "AAAA": nodata("db.example.", "AAAA")})
    with pytest.raises(DnsError, match="ValueError: boom") as info:
        Resolver(fake).resolve("db.example")
    assert info.value.kind == "error"
    assert info.value.__cause__ is bug


def test_malformed_name_is_kind_error() -> None:
    resolver = Resolver(["127.0.0.1:9"])  # never contacted: the name is refused first
    assert kind_of(resolver, "a" * 64 + ".example") == "error"
    assert kind_of(resolver, "a..example") == "error"


def test_dns_error_is_a_rebalance_error_and_pickles() -> None:
    err = DnsError("db.example", "nxdomain", "DNS name 'db.example' does not exist")
    assert isinstance(err, RebalanceError)
    copy = pickle.loads(pickle.dumps(err))
    assert (type(copy), copy.name, copy.kind, str(copy)) == (
        DnsError,
        "db.example",
        "nxdomain",
        str(err),
    )


def test_both_queries_share_one_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(rdns, "time", clock)
    name = "db.example."

    def slow_a() -> dns.resolver.Answer:
        clock.now += 1.5  # the A query took 1.5 s of the 2 s
        return make_answer(name, "A", ["10.0.0.1"])

    fake = FakeResolver({"A": slow_a, "AAAA": nodata(name, "AAAA")})
    Resolver(fake, timeout=2.0).resolve(name)
    assert [kw["lifetime"] for _, _, kw in fake.calls] == [2.0, 0.5]

    def a_times_out() -> dns.resolver.Answer:
        clock.now += 2.0
        raise lifetime_timeout()

    # The A query used the whole budget: AAAA is not asked (see also
    # test_a_aaaa_that_runs_out_of_time_after_the_a_query_keeps_the_a_records).
    fake = FakeResolver({"A": a_times_out, "AAAA": AssertionError("asked")})
    assert kind_of(Resolver(fake, timeout=2.0), name) == "timeout"
    assert len(fake.calls) == 1


# --------------------------------------------------------------------------- system resolver


def fake_getaddrinfo(
    monkeypatch: pytest.MonkeyPatch, table: dict[str, list[str] | BaseException]
) -> list[str]:
    """Replace ``socket.getaddrinfo`` with a table lookup; returns the list of names asked."""
    calls: list[str] = []

    def getaddrinfo(host: str, port: object, *args: object, **kwargs: object) -> list[Any]:
        calls.append(host)
        entry = table.get(host, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
        if isinstance(entry, BaseException):
            raise entry
        return [
            (
                socket.AF_INET6 if ":" in a else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (a, 0, 0, 0) if ":" in a else (a, 0),
            )
            for a in entry
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "nxdomain"),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), "timeout"),
        (socket.gaierror(socket.EAI_FAIL, "Non-recoverable failure"), "error"),
        (UnicodeError("label empty or too long"), "error"),
    ],
)
def test_getaddrinfo_errors(monkeypatch: pytest.MonkeyPatch, error: Exception, kind: str) -> None:
    fake_getaddrinfo(monkeypatch, {"db.example": error})
    hide_dnspython(monkeypatch)
    assert kind_of(Resolver(), "db.example") == kind


@pytest.mark.skipif(not hasattr(socket, "EAI_NODATA"), reason="glibc error code")
def test_getaddrinfo_nodata_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_getaddrinfo(monkeypatch, {"db.example": socket.gaierror(socket.EAI_NODATA, "No data")})
    hide_dnspython(monkeypatch)
    assert kind_of(Resolver(), "db.example") == "empty"


def test_getaddrinfo_mixed_families(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_getaddrinfo(monkeypatch, {"db.example": ["::1", "10.0.0.1", "::1"]})
    hide_dnspython(monkeypatch)
    assert Resolver().resolve("db.example").addresses == ("10.0.0.1", "::1")


def test_a_hanging_getaddrinfo_is_abandoned_at_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    entered = threading.Event()

    def hang(*args: object, **kwargs: object) -> list[Any]:
        entered.set()
        release.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "released")

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    hide_dnspython(monkeypatch)
    resolver = Resolver(timeout=0.3)
    start = time.monotonic()
    try:
        assert kind_of(resolver, "db.example") == "timeout"
        elapsed = time.monotonic() - start
    finally:
        release.set()
    assert entered.is_set()
    assert 0.3 <= elapsed < 0.6


def use_system_resolver(
    monkeypatch: pytest.MonkeyPatch, factory: Callable[[], dns.resolver.Resolver]
) -> None:
    """Let ``Resolver()`` get its system-configured dnspython resolver from ``factory``.

    Patched in ``sqla_rebalance.dns`` only: dnspython itself (and the ``dns_server``
    fixture, which uses it) is left alone.
    """
    monkeypatch.setattr(rdns, "_dnspython", lambda: SimpleNamespace(Resolver=factory))


@pytest.fixture
def system_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeResolver]:
    """``Resolver()`` in system mode, with dnspython's configured resolver replaced by a fake.

    Fill ``holder["fake"]`` before constructing the Resolver.
    """
    holder: dict[str, FakeResolver] = {}

    def configured() -> FakeResolver:
        fake = holder["fake"]
        fake.nameservers = ["10.0.0.53"]
        return fake

    use_system_resolver(monkeypatch, configured)
    return holder


def test_system_mode_uses_the_search_list(system_dns: dict[str, FakeResolver]) -> None:
    name = "db.example."
    system_dns["fake"] = FakeResolver(
        {"A": make_answer(name, "A", ["10.0.0.1"], ttl=9), "AAAA": nodata(name, "AAAA")}
    )
    resolver = Resolver()
    assert repr(resolver) == "<Resolver system: 10.0.0.53 timeout=2s>"
    assert resolver.resolve("db") == Answer(("10.0.0.1",), 9.0, "dns")
    assert [kw["search"] for _, _, kw in system_dns["fake"].calls] == [True, True]


def test_system_mode_falls_back_to_getaddrinfo_for_names_not_in_dns(
    monkeypatch: pytest.MonkeyPatch, system_dns: dict[str, FakeResolver]
) -> None:
    # /etc/hosts entries (docker extra_hosts, Kubernetes hostAliases) are not in DNS.
    system_dns["fake"] = FakeResolver({"A": nxdomain("db.example."), "AAAA": nxdomain("x.")})
    fake_getaddrinfo(monkeypatch, {"db.example": ["10.9.9.9"]})
    assert Resolver().resolve("db.example") == Answer(("10.9.9.9",), SYSTEM_TTL, "system")


def test_system_mode_reports_the_dns_error_when_getaddrinfo_fails_too(
    monkeypatch: pytest.MonkeyPatch, system_dns: dict[str, FakeResolver]
) -> None:
    name = "db.example."
    system_dns["fake"] = FakeResolver({"A": nodata(name, "A"), "AAAA": nodata(name, "AAAA")})
    calls = fake_getaddrinfo(
        monkeypatch, {"db.example": socket.gaierror(socket.EAI_FAIL, "Non-recoverable")}
    )
    assert kind_of(Resolver(), "db.example") == "empty"
    assert calls == ["db.example"]


def test_system_mode_does_not_fall_back_after_a_timeout(
    monkeypatch: pytest.MonkeyPatch, system_dns: dict[str, FakeResolver]
) -> None:
    system_dns["fake"] = FakeResolver({"A": lifetime_timeout(), "AAAA": lifetime_timeout()})
    calls = fake_getaddrinfo(monkeypatch, {"db.example": ["10.9.9.9"]})
    assert kind_of(Resolver(), "db.example") == "timeout"
    assert calls == []


def test_system_mode_without_a_resolv_conf_uses_getaddrinfo(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unconfigured() -> dns.resolver.Resolver:
        raise dns.resolver.NoResolverConfiguration("no nameservers")

    use_system_resolver(monkeypatch, unconfigured)
    fake_getaddrinfo(monkeypatch, {"db.example": ["10.0.0.7"]})
    answer = Resolver().resolve("db.example")
    assert answer == Answer(("10.0.0.7",), SYSTEM_TTL, "system")


# --------------------------------------------------------------------------- refresh_delay


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [
        (0.0, 1.0),
        (-3.0, 1.0),
        (0.5, 1.0),
        (1.0, 1.0),
        (30.0, 30.0),
        (60.0, 60.0),
        (86400.0, 60.0),
        (math.inf, 60.0),
    ],
)
def test_refresh_delay_clamps_the_ttl(ttl: float, expected: float) -> None:
    assert refresh_delay(ttl, 1.0, 60.0) == expected


def test_refresh_delay_with_equal_bounds() -> None:
    assert refresh_delay(5.0, 10.0, 10.0) == 10.0
    assert refresh_delay(0.0, 0.0, 10.0) == 0.0


@pytest.mark.parametrize(
    ("ttl", "low", "high"),
    [
        (5.0, 10.0, 1.0),
        (5.0, -1.0, 10.0),
        (5.0, 1.0, math.inf),
        (5.0, math.nan, 10.0),
        (math.nan, 1.0, 10.0),
    ],
)
def test_refresh_delay_rejects(ttl: float, low: float, high: float) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message is not the point
        refresh_delay(ttl, low, high)


# --------------------------------------------------------------------------- real dnsmasq


def nameserver_port(dns_server: Any) -> int:
    return parse_nameserver(dns_server.nameserver)[1]


def test_several_a_records(dns_server: Any, dns_name: str) -> None:
    dns_server.set(dns_name, ["127.0.0.23", "127.0.0.21", "127.0.0.22"])
    answer = Resolver([dns_server.nameserver]).resolve(dns_name)
    assert answer == Answer(("127.0.0.21", "127.0.0.22", "127.0.0.23"), 1.0, "dns")


def test_a_and_aaaa_records(dns_server: Any, dns_name: str) -> None:
    dns_server.set(dns_name, ["::1", "127.0.0.21"])
    answer = Resolver([dns_server.nameserver]).resolve(dns_name)
    assert answer.addresses == ("127.0.0.21", "::1")
    assert answer.source == "dns"


def test_a_changed_record_set_is_seen_at_once(dns_server: Any, dns_name: str) -> None:
    resolver = Resolver([dns_server.nameserver])
    dns_server.set(dns_name, ["127.0.0.21", "127.0.0.22"])
    assert resolver.resolve(dns_name).addresses == ("127.0.0.21", "127.0.0.22")
    # No cache of ours or dnspython's in between: the next query sees the new set.
    dns_server.set(dns_name, ["127.0.0.22", "127.0.0.23", "127.0.0.24"])
    assert resolver.resolve(dns_name).addresses == ("127.0.0.22", "127.0.0.23", "127.0.0.24")
    dns_server.remove(dns_name)
    assert kind_of(resolver, dns_name) == "nxdomain"


def test_unknown_name_is_nxdomain(dns_server: Any, dns_name: str) -> None:
    with pytest.raises(DnsError, match="does not exist") as info:
        Resolver([dns_server.nameserver]).resolve(dns_name)
    assert (info.value.kind, info.value.name) == ("nxdomain", dns_name)


def test_names_are_absolute_with_explicit_nameservers(dns_server: Any, dns_name: str) -> None:
    dns_server.set(dns_name, ["127.0.0.21"])
    short = dns_name.removesuffix(".test")
    # "db-N." is outside dnsmasq's zone: REFUSED or NXDOMAIN depending on its set-up,
    # but never the record of "db-N.test".
    with pytest.raises(DnsError):
        Resolver([dns_server.nameserver]).resolve(short)
    assert Resolver([dns_server.nameserver]).resolve(dns_name + ".").addresses == ("127.0.0.21",)


def test_system_mode_search_list_against_dnsmasq(
    dns_server: Any, dns_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # resolv.conf cannot name a port: configure dnspython from a file, then set its port.
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.1\nsearch test\noptions ndots:1\n")
    real = dns.resolver.Resolver
    port = nameserver_port(dns_server)

    def configured() -> dns.resolver.Resolver:
        resolver = real(filename=str(conf))
        resolver.port = port
        return resolver

    use_system_resolver(monkeypatch, configured)
    dns_server.set(dns_name, ["127.0.0.21", "127.0.0.22"])
    short = dns_name.removesuffix(".test")
    answer = Resolver().resolve(short)
    assert answer == Answer(("127.0.0.21", "127.0.0.22"), 1.0, "dns")


def test_a_resolver_object_against_dnsmasq(dns_server: Any, dns_name: str) -> None:
    address, port = parse_nameserver(dns_server.nameserver)
    custom = dns.resolver.Resolver(configure=False)
    custom.nameservers = [address]
    custom.port = port
    dns_server.set(dns_name, ["127.0.0.25"])
    assert Resolver(custom).resolve(dns_name) == Answer(("127.0.0.25",), 1.0, "dns")


def test_concurrent_resolution(dns_server: Any, dns_name: str) -> None:
    dns_server.set(dns_name, ["127.0.0.21", "127.0.0.22", "::1"])
    resolver = Resolver([dns_server.nameserver])
    expected = ("127.0.0.21", "127.0.0.22", "::1")
    barrier = threading.Barrier(8)

    def work(_: int) -> list[tuple[str, ...]]:
        barrier.wait()
        return [resolver.resolve(dns_name).addresses for _ in range(25)]

    with ThreadPoolExecutor(8) as pool:
        results = [a for batch in pool.map(work, range(8)) for a in batch]
    assert results == [expected] * 200


def test_stopped_server_is_a_timeout_within_the_limit(dns_server: Any, dns_name: str) -> None:
    dns_server.set(dns_name, ["127.0.0.21"])
    timeout = 0.5
    resolver = Resolver([dns_server.nameserver], timeout=timeout)
    dns_server.stop()
    try:
        start = time.monotonic()
        with pytest.raises(DnsError) as info:
            resolver.resolve(dns_name)
        elapsed = time.monotonic() - start
    finally:
        dns_server.start()
    assert info.value.kind == "timeout"
    assert "no nameserver" in str(info.value)
    assert elapsed < 2 * timeout
    # The same resolver works again once the server is back.
    assert resolver.resolve(dns_name).addresses == ("127.0.0.21",)


def test_a_dead_first_nameserver_leaves_time_for_the_second(dns_server: Any, dns_name: str) -> None:
    dead = f"127.0.0.1:{find_free_port(['127.0.0.1'])}"  # nothing listens there
    dns_server.set(dns_name, ["127.0.0.21"])
    resolver = Resolver([dead, dns_server.nameserver], timeout=1.0)
    assert resolver.resolve(dns_name).addresses == ("127.0.0.21",)


# --------------------------------------------------------------------------- one type refused


@pytest.mark.parametrize(
    "rcode", [dns.rcode.REFUSED, dns.rcode.SERVFAIL], ids=["REFUSED", "SERVFAIL"]
)
def test_a_resolver_refusing_aaaa_still_gives_the_a_records(
    dns_front: DnsFront, dns_server: Any, dns_name: str, rcode: int
) -> None:
    # The records come from the real dnsmasq, through a resolver that refuses AAAA.
    dns_server.set(dns_name, ["127.0.0.23", "127.0.0.21", "127.0.0.22"])
    dns_front.fail["AAAA"] = rcode
    answer = Resolver([dns_front.nameserver]).resolve(dns_name)
    assert answer == Answer(("127.0.0.21", "127.0.0.22", "127.0.0.23"), 1.0, "dns", ("AAAA",))
    asked = {t for n, t in dns_front.queries if n == dns_name + "."}
    assert asked == {"A", "AAAA"}


def test_a_resolver_refusing_a_still_gives_the_aaaa_records(
    dns_front: DnsFront, dns_server: Any, dns_name: str
) -> None:
    dns_server.set(dns_name, ["::1", "127.0.0.21"])
    dns_front.fail["A"] = dns.rcode.REFUSED
    answer = Resolver([dns_front.nameserver]).resolve(dns_name)
    assert answer == Answer(("::1",), 1.0, "dns", ("A",))


def test_a_resolver_refusing_both_types_is_an_error(
    dns_front: DnsFront, dns_server: Any, dns_name: str
) -> None:
    dns_server.set(dns_name, ["127.0.0.21"])
    dns_front.fail.update(A=dns.rcode.REFUSED, AAAA=dns.rcode.SERVFAIL)
    with pytest.raises(DnsError, match="REFUSED") as info:
        Resolver([dns_front.nameserver]).resolve(dns_name)
    assert info.value.kind == "error"


def test_a_passing_aaaa_failure_keeps_the_ipv6_address_and_follows_the_a_records(
    dns_front: DnsFront, dns_server: Any, dns_name: str
) -> None:
    resolver = Resolver([dns_front.nameserver])
    dns_server.set(dns_name, ["127.0.0.21", "::1"])
    assert resolver.resolve(dns_name).addresses == ("127.0.0.21", "::1")
    dns_front.fail["AAAA"] = dns.rcode.SERVFAIL
    dns_server.set(dns_name, ["127.0.0.22", "::1"])
    assert resolver.resolve(dns_name) == Answer(("127.0.0.22", "::1"), 1.0, "dns", ("AAAA",))
    # AAAA answers again, and the record is gone: so is the address.
    del dns_front.fail["AAAA"]
    dns_server.set(dns_name, ["127.0.0.22"])
    assert resolver.resolve(dns_name) == Answer(("127.0.0.22",), 1.0, "dns")


def test_a_resolver_dropping_aaaa_gives_the_a_records_within_the_timeout(
    dns_server: Any, dns_name: str
) -> None:
    # RFC 4074 section 4.1: some resolvers never answer AAAA queries at all.
    upstream = forwarding(dns_server.nameserver, {})

    def drop_aaaa(query: dns.message.Message) -> Reply:
        return None if query.question[0].rdtype == dns.rdatatype.AAAA else upstream(query)

    dns_server.set(dns_name, ["127.0.0.21"])
    with ScriptedDnsServer(drop_aaaa) as server:
        start = time.monotonic()
        answer = Resolver([server.nameserver], timeout=0.5).resolve(dns_name)
        elapsed = time.monotonic() - start
    assert answer == Answer(("127.0.0.21",), 1.0, "dns", ("AAAA",))
    assert elapsed < 1.0
