"""Property-based tests (hypothesis) of ``Resolver.resolve`` over whatever DNS sends back.

Whatever the records, TTLs and response codes of the A and AAAA queries (none, duplicates,
IPv4-mapped IPv6 forms, TTLs from negative to far beyond 2**32, REFUSED/SERVFAIL/NXDOMAIN on one
type or both, timeouts, malformed answers, resolver bugs), ``resolve`` returns a sane
:class:`Answer` or raises :class:`DnsError`, nothing else; and which of the two follows one
model (one type failing never discards the other's records; a failed type keeps its last
addresses; nothing to go on is an error). Checked at two levels:

- in process, through a dnspython resolver answering from ``dns.resolver.Answer`` objects built
  from real DNS messages (the FakeResolver of tests/test_dns.py), which reaches the values the
  wire cannot carry (negative TTLs, exceptions of any type, malformed answer objects), over
  single lookups and over sequences of lookups on one resolver;
- over the wire, against a real UDP nameserver on 127.0.0.1 (``ScriptedDnsServer``) sending the
  generated responses: rcodes, TTLs up to 2**32 - 1, CNAME chains, records of the wrong type or
  owner, truncated, garbage and missing replies.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqla_rebalance.dns import Answer, DnsError, Resolver

from .test_dns import FakeResolver, ScriptedDnsServer, lifetime_timeout, no_nameservers, nxdomain

NAME = "db.example."
MAX_TTL = 2**31 - 1
TYPES = ("A", "AAAA")
KINDS = {"nxdomain", "empty", "timeout", "error"}


# --------------------------------------------------------------------------- strategies


@st.composite
def v6_forms(draw: st.DrawFn) -> str:
    choice = draw(st.sampled_from(["any", "mapped", "loopback", "unspecified"]))
    if choice == "mapped":  # ::ffff:a.b.c.d, an IPv4 address in IPv6 form
        return f"::ffff:{draw(st.ip_addresses(v=4))}"
    if choice == "loopback":
        return "::1"
    if choice == "unspecified":
        return "::"
    return str(draw(st.ip_addresses(v=6)))


@st.composite
def addresses(draw: st.DrawFn, rdtype: str) -> list[str]:
    """Addresses of one record type, duplicates included (any address: no traffic goes there)."""
    if rdtype == "A":
        one = st.one_of(
            st.ip_addresses(v=4).map(str),
            st.sampled_from(["127.0.0.1", "0.0.0.0", "255.255.255.255", "10.0.0.1"]),
        )
    else:
        one = v6_forms()
    values = draw(st.lists(one, min_size=1, max_size=6))
    return values + draw(st.lists(st.sampled_from(values), max_size=3))  # duplicates


#: TTLs as dnspython objects may carry them (the wire cannot be negative or above 2**32 - 1).
ttls = st.one_of(
    st.integers(0, 600),
    st.integers(-(2**40), 2**40),
    st.sampled_from([0, 1, MAX_TTL, MAX_TTL + 1, 2**32 - 1, -1]),
)


@dataclass(frozen=True)
class Records:
    addresses: list[str]
    ttl: int
    cname_ttl: int | None = None


@dataclass(frozen=True)
class NoData:
    raise_no_answer: bool = False  # a resolver object that raises NoAnswer


@dataclass(frozen=True)
class NxDomain:
    pass


@dataclass(frozen=True)
class Failure:
    """The query failed: ``make()`` is what dnspython (or a broken resolver) raises."""

    label: str
    make: Callable[[], BaseException] = field(compare=False, repr=False)


@dataclass(frozen=True)
class Malformed:
    """An answer object that is not one (a resolver object's bug): the query failed."""

    what: str


Outcome = Records | NoData | NxDomain | Failure | Malformed


def failures() -> st.SearchStrategy[Failure]:
    rcodes = st.sampled_from(["REFUSED", "SERVFAIL", "NOTIMP", "FORMERR", "BADVERS"])
    bugs = st.sampled_from([ValueError, OverflowError, UnicodeError, KeyError, TypeError])
    return st.one_of(
        rcodes.map(lambda r: Failure(r, lambda: no_nameservers(r))),
        st.sampled_from(
            [
                Failure("timeout", lifetime_timeout),
                Failure("unreachable", lambda: no_nameservers(ConnectionRefusedError(111, "no"))),
                Failure("no servers", no_nameservers),
                Failure("YXDOMAIN", dns.resolver.YXDOMAIN),
                Failure("NoRootSOA", dns.resolver.NoRootSOA),
                Failure("LabelTooLong", dns.name.LabelTooLong),
                Failure("FormError", lambda: dns.exception.FormError("bad")),
            ]
        ),
        bugs.map(lambda e: Failure(e.__name__, lambda: e("bug"))),
    )


@st.composite
def outcomes(draw: st.DrawFn, rdtype: str) -> Outcome:
    kind = draw(st.sampled_from(["records", "records", "nodata", "nxdomain", "fail", "malformed"]))
    if kind == "records":
        cname = draw(st.one_of(st.none(), ttls))
        return Records(draw(addresses(rdtype)), draw(ttls), cname)
    if kind == "nodata":
        return NoData(draw(st.booleans()))
    if kind == "nxdomain":
        return NxDomain()
    if kind == "fail":
        return draw(failures())
    return Malformed(draw(st.sampled_from(["no rrset attribute", "bad address", "no ttl"])))


def _response(rdtype: str, *rrsets: tuple[str, int, str, list[str]]) -> dns.resolver.Answer:
    """A dnspython Answer from a response holding ``(owner, ttl, type, values)`` rrsets."""
    response = dns.message.make_response(dns.message.make_query(NAME, rdtype))
    for owner, ttl, rrtype, values in rrsets:
        rrset = dns.rrset.from_text(owner, 0, "IN", rrtype, *values)
        # find_rrset(create=True) keeps the message's index in step with the section.
        section = response.find_rrset(
            response.answer, rrset.name, rrset.rdclass, rrset.rdtype, create=True
        )
        section.update(rrset)
        section.ttl = ttl  # any integer: dnspython does not check an assigned TTL
    return dns.resolver.Answer(
        dns.name.from_text(NAME), dns.rdatatype.from_text(rdtype), dns.rdataclass.IN, response
    )


def to_dnspython(outcome: Outcome, rdtype: str) -> Any:
    """What the fake dnspython resolver returns or raises for ``outcome`` (a new object)."""
    if isinstance(outcome, Records):
        if outcome.cname_ttl is None:
            return _response(rdtype, (NAME, outcome.ttl, rdtype, outcome.addresses))
        return _response(
            rdtype,
            (NAME, outcome.cname_ttl, "CNAME", ["pg.example."]),
            ("pg.example.", outcome.ttl, rdtype, outcome.addresses),
        )
    if isinstance(outcome, NoData):
        answer = _response(rdtype)
        if outcome.raise_no_answer:
            return dns.resolver.NoAnswer(response=answer.response)
        return answer
    if isinstance(outcome, NxDomain):
        return nxdomain(NAME)
    if isinstance(outcome, Failure):
        return outcome.make()
    if outcome.what == "no rrset attribute":
        return SimpleNamespace()
    if outcome.what == "bad address":
        return SimpleNamespace(rrset=[SimpleNamespace(address="not an address")])
    return SimpleNamespace(rrset=[SimpleNamespace(address="10.0.0.1")])  # no chaining_result


# --------------------------------------------------------------------------- the model


def normalise(address: str) -> str:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


@dataclass
class Model:
    """What ``resolve`` must do, given the outcome of each query (``None``: not asked)."""

    known: dict[str, set[str]] = field(default_factory=dict)

    def step(self, a: Outcome, aaaa: Outcome | None) -> tuple[str, Any]:
        """``("answer", (addresses, failed))`` or ``("error", kinds it may have)``."""
        if isinstance(a, NxDomain):
            self.known.clear()
            return "error", {"nxdomain"}
        assert aaaa is not None
        got = {"A": a, "AAAA": aaaa}
        has_a = isinstance(a, Records)
        failed = [
            t
            for t in TYPES
            if isinstance(got[t], (Failure, Malformed))
            or (t == "AAAA" and isinstance(got[t], NxDomain) and has_a)
        ]
        if isinstance(aaaa, NxDomain) and not has_a:
            self.known.clear()
            return "error", {"nxdomain"}
        fresh = {
            t: {normalise(x) for x in o.addresses} if isinstance(o, Records) else set()
            for t, o in got.items()
            if t not in failed
        }
        if not any(fresh.values()):
            if failed:
                return "error", {"timeout", "error"}
            self.known.clear()
            return "error", {"empty"}
        result = set().union(*fresh.values())
        for t in failed:
            result |= self.known.get(t, set())
        self.known.update(fresh)
        return "answer", (result, tuple(failed))


def check_sane(answer: Any) -> None:
    assert type(answer) is Answer
    assert answer.source == "dns"
    assert isinstance(answer.addresses, tuple) and answer.addresses
    parsed = [ipaddress.ip_address(a) for a in answer.addresses]
    assert [str(ip) for ip in parsed] == list(answer.addresses)  # normalised text
    assert len(set(parsed)) == len(parsed)  # no duplicates
    assert not any(isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped for ip in parsed)
    assert parsed == sorted(parsed, key=lambda ip: (ip.version, ip.packed))  # IPv4 first
    assert isinstance(answer.ttl, float)
    assert 0 <= answer.ttl <= MAX_TTL
    assert set(answer.failed) <= set(TYPES)
    assert hash(answer) == hash(Answer(answer.addresses, answer.ttl, "dns", answer.failed))


def expected_ttl(*outcomes: Outcome) -> float | None:
    """The TTL when every TTL involved is in range (else only the range is checked)."""
    values = []
    for outcome in outcomes:
        if isinstance(outcome, Records):
            values.append(outcome.ttl)
            if outcome.cname_ttl is not None:
                values.append(outcome.cname_ttl)
    if not values or not all(0 <= v <= MAX_TTL for v in values):
        return None
    return float(min(values))


def resolve(resolver: Resolver) -> tuple[str, Any]:
    error: DnsError | None = None
    try:
        answer = resolver.resolve(NAME)
    except DnsError as err:  # anything else fails the test
        error = err
    if error is not None:
        assert (error.name, error.kind in KINDS, bool(str(error))) == (NAME, True, True)
        return "error", error.kind
    check_sane(answer)
    return "answer", answer


# --------------------------------------------------------------------------- in process


@settings(max_examples=400, deadline=None)
@given(a=outcomes("A"), aaaa=outcomes("AAAA"), cached=st.none() | st.floats(allow_nan=True))
def test_any_answer_is_a_sane_answer_or_a_dns_error(
    a: Outcome, aaaa: Outcome, cached: float | None
) -> None:
    fake = FakeResolver({"A": to_dnspython(a, "A"), "AAAA": to_dnspython(aaaa, "AAAA")})
    if cached is not None:
        # A resolver object with a cache: the TTL is what the cached answer has left.
        fake.cache = dns.resolver.Cache()
        for outcome in fake.outcomes.values():
            if isinstance(outcome, dns.resolver.Answer):
                outcome.expiration = time.time() + cached
    status, got = resolve(Resolver(fake))
    want_status, want = Model().step(a, None if isinstance(a, NxDomain) else aaaa)
    assert status == want_status, (got, want)
    if status == "error":
        assert got in want
        return
    addresses, failed = want
    assert set(got.addresses) == addresses
    assert got.failed == failed
    ttl = expected_ttl(*(o for t, o in (("A", a), ("AAAA", aaaa)) if t not in failed))
    if ttl is not None and cached is None:
        assert got.ttl == ttl


def simple_outcomes(rdtype: str) -> st.SearchStrategy[Outcome]:
    pool = ["10.0.0.1", "10.0.0.2"] if rdtype == "A" else ["::1", "2001:db8::1"]
    return st.one_of(
        st.lists(st.sampled_from(pool), min_size=1).map(lambda xs: Records(xs, 30)),
        st.just(NoData()),
        st.just(NxDomain()),
        st.just(Failure("REFUSED", lambda: no_nameservers("REFUSED"))),
        st.just(Failure("SERVFAIL", lambda: no_nameservers("SERVFAIL"))),
        st.just(Failure("timeout", lifetime_timeout)),
    )


@settings(max_examples=300, deadline=None)
@given(
    rounds=st.lists(
        st.tuples(simple_outcomes("A"), simple_outcomes("AAAA")), min_size=1, max_size=8
    )
)
def test_a_failed_type_keeps_its_last_addresses_over_any_sequence(
    rounds: list[tuple[Outcome, Outcome]],
) -> None:
    fake = FakeResolver({})
    resolver = Resolver(fake)  # one resolver: what it kept from earlier rounds counts
    model = Model()
    for a, aaaa in rounds:
        fake.outcomes = {"A": to_dnspython(a, "A"), "AAAA": to_dnspython(aaaa, "AAAA")}
        status, got = resolve(resolver)
        want_status, want = model.step(a, None if isinstance(a, NxDomain) else aaaa)
        assert status == want_status, (got, want)
        if status == "answer":
            assert (set(got.addresses), got.failed) == want
        else:
            assert got in want


# --------------------------------------------------------------------------- over the wire


@dataclass(frozen=True)
class WireReply:
    """How the scripted nameserver answers one record type."""

    rcode: str = "NOERROR"
    addresses: tuple[str, ...] = ()
    ttl: int = 60
    cname_ttl: int | None = None
    noise: str | None = None  # records of another type or owner, which are no answer
    mode: str = "reply"  # or "drop", "garbage", "truncated"


wire_ttls = st.one_of(st.integers(0, 600), st.sampled_from([0, MAX_TTL, MAX_TTL + 1, 2**32 - 1]))


@st.composite
def wire_replies(draw: st.DrawFn, rdtype: str) -> WireReply:
    # Dropped and garbage replies cost the whole time limit: rare enough for a quick test.
    mode = draw(st.sampled_from(["reply"] * 20 + ["garbage", "truncated", "drop"]))
    rcode = draw(
        st.sampled_from(
            ["NOERROR"] * 6 + ["NXDOMAIN", "SERVFAIL", "REFUSED", "NOTIMP", "FORMERR", "YXDOMAIN"]
        )
    )
    records: tuple[str, ...] = ()
    if rcode == "NOERROR" and draw(st.booleans()):
        records = tuple(draw(addresses(rdtype)))
    return WireReply(
        rcode=rcode,
        addresses=records,
        ttl=draw(wire_ttls),
        cname_ttl=draw(st.one_of(st.none(), wire_ttls)),
        noise=draw(st.sampled_from([None, "other type", "other owner"])),
        mode=mode,
    )


class Script:
    """The replies the scripted nameserver sends, per record type (set by each example)."""

    def __init__(self) -> None:
        self.replies: dict[str, WireReply] = {}

    def __call__(self, query: dns.message.Message) -> dns.message.Message | bytes | None:
        question = query.question[0]
        spec = self.replies[dns.rdatatype.to_text(question.rdtype)]
        if spec.mode == "drop":
            return None
        if spec.mode == "garbage":
            return query.id.to_bytes(2, "big") + b"\x81\x80garbage"
        reply = dns.message.make_response(query)
        reply.set_rcode(dns.rcode.from_text(spec.rcode))
        if spec.mode == "truncated":
            reply.flags |= dns.flags.TC  # dnspython retries over TCP, which nobody serves
            return reply
        rdtype = dns.rdatatype.to_text(question.rdtype)
        owner = question.name.to_text()
        if spec.cname_ttl is not None and spec.addresses:
            reply.answer.append(
                dns.rrset.from_text(owner, spec.cname_ttl, "IN", "CNAME", "pg.example.")
            )
            owner = "pg.example."
        if spec.addresses:
            reply.answer.append(dns.rrset.from_text(owner, spec.ttl, "IN", rdtype, *spec.addresses))
        if spec.noise == "other type":
            other = "AAAA" if rdtype == "A" else "A"
            reply.answer.append(
                dns.rrset.from_text(owner, 5, "IN", other, "::2" if other == "AAAA" else "10.9.9.9")
            )
        elif spec.noise == "other owner":
            reply.answer.append(
                dns.rrset.from_text(
                    "elsewhere.example.", 5, "IN", rdtype, "::3" if rdtype == "AAAA" else "10.8.8.8"
                )
            )
        return reply


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[ScriptedDnsServer, Script]]:
    script = Script()
    with ScriptedDnsServer(script) as server:
        yield server, script
    assert not server.errors


def wire_outcome(spec: WireReply) -> Outcome:
    """The in-process outcome a wire reply stands for."""
    if spec.mode == "reply" and spec.rcode == "NOERROR":
        if not spec.addresses:
            return NoData()
        # dnspython reads a TTL with the top bit set as 0 (RFC 2181 section 8).
        ttls = [spec.ttl] if spec.cname_ttl is None else [spec.ttl, spec.cname_ttl]
        return Records(list(spec.addresses), min(t if t <= MAX_TTL else 0 for t in ttls))
    if spec.mode == "reply" and spec.rcode == "NXDOMAIN":
        return NxDomain()
    return Failure(spec.mode if spec.mode != "reply" else spec.rcode, Exception)


TIMEOUT = 0.3


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(a=wire_replies("A"), aaaa=wire_replies("AAAA"))
def test_any_reply_over_the_wire_is_a_sane_answer_or_a_dns_error(
    scripted: tuple[ScriptedDnsServer, Script], a: WireReply, aaaa: WireReply
) -> None:
    server, script = scripted
    script.replies = {"A": a, "AAAA": aaaa}
    resolver = Resolver([server.nameserver], timeout=TIMEOUT)
    start = time.monotonic()
    status, got = resolve(resolver)
    assert time.monotonic() - start < TIMEOUT + 0.5
    oa, oaaaa = wire_outcome(a), wire_outcome(aaaa)
    if a.mode in ("drop", "garbage"):
        # dnspython ignores a reply it cannot parse: both wait for the whole time limit,
        # and the AAAA query finds no time left.
        oaaaa = Failure("time was up", Exception)
    want_status, want = Model().step(oa, None if isinstance(oa, NxDomain) else oaaaa)
    assert status == want_status, (got, want)
    if status == "error":
        assert got in want
        return
    addresses, failed = want
    assert set(got.addresses) == addresses
    assert got.failed == failed
    assert got.ttl == min(float(o.ttl) for o in (oa, oaaaa) if isinstance(o, Records))
