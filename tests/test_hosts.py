"""Host list parsing, least-connections choice, health transitions and the
minimal-move plan: pure logic, no server, a fake clock and a fake resolver."""

from __future__ import annotations

import random

import pytest

from sqla_rebalance.dns import Answer, DnsError
from sqla_rebalance.errors import ConfigurationError
from sqla_rebalance.hosts import DOWN, PRIMARY, STANDBY, SUSPECT, UP, HostSet, parse_hosts

from .helpers import FakeClock, seed_randomness


class FakeResolver:
    """Answers from a dict; a missing name is NXDOMAIN; ``fail`` simulates an outage."""

    def __init__(self, records: dict[str, list[str]], ttl: float = 5.0) -> None:
        self.records = records
        self.ttl = ttl
        self.fail = False
        self.queries = 0

    def resolve(self, name: str) -> Answer:
        self.queries += 1
        if self.fail:
            raise DnsError(name, "timeout", "no nameserver answered")
        if name not in self.records:
            raise DnsError(name, "nxdomain", "no such name")
        return Answer(tuple(sorted(self.records[name])), self.ttl, "dns")


def make(hosts, clock=None, resolver=None, **kw):
    return HostSet(parse_hosts(hosts, 5432), clock=clock, resolver=resolver, **kw)


# -- parsing ----------------------------------------------------------------------


def test_parse_tiers_ports_and_ipv6():
    specs = parse_hosts(["a:1", "b", "[::1]:7", ["dr-a:2", "dr-b"], ["last"]], 5432)
    assert [(s.name, s.port, s.tier) for s in specs] == [
        ("a", 1, 0),
        ("b", 5432, 0),
        ("::1", 7, 0),
        ("dr-a", 2, 1),
        ("dr-b", 5432, 1),
        ("last", 5432, 2),
    ]
    # Only nested lists: the first is tier 0. A comma-separated string is one tier.
    assert [s.tier for s in parse_hosts([["a"], ["b"]], 1)] == [0, 1]
    assert [s.name for s in parse_hosts("a:1, b:2", 1)] == ["a", "b"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "non-empty list"),
        (["a:x"], "not a number"),
        (["a:70000"], "out of range"),
        (["a:1", "a:1"], "listed twice"),
        ([["a"], []], "non-empty lists"),
        ([1], "strings or non-empty lists"),
        (["[::1"], "unbalanced"),
        ([":5432"], "no host name"),
    ],
)
def test_parse_rejects(value, message):
    with pytest.raises(ConfigurationError, match=message):
        parse_hosts(value, 5432)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["a" * 64 + ".example:5432"], r"label 'a{64}' is longer than 63 characters \(64\)"),
        (["a." * 126 + "bc"], r"a DNS name has at most 253 characters, this one 254"),
        (["db a:5432"], r"'db a:5432' is not a valid host: a host cannot contain spaces"),
        (["db\n:5432"], r"a host cannot contain spaces, line breaks or control characters"),
        (["db\x00"], r"a host cannot contain spaces, line breaks or control characters"),
        (["db\u200b.example"], r"a host cannot contain spaces, line breaks or control char"),
        (["db_a!:5432"], r"label 'db_a!' may contain only letters, digits, '-' and '_'"),
        (["-db:5432"], r"cannot start or end with '-'"),
        (["db..example"], r"empty label"),
        (["bücher.example"], r"must be ASCII: .*IDNA form \('xn--bcher-kva\.example'\)"),
        (["10.0.0.256"], r"not an IP address, and a DNS name cannot end with an all-digit label"),
        (["a:1:2"], r"more than one ':' .*\[::1\]:5432"),
        (["[db]:5432"], r"brackets are for IPv6 addresses"),
        (["[10.0.0.1]:5432"], r"brackets are for IPv6 addresses"),
        (["db:"], r"empty port after ':'"),
        (["db:+5432"], r"not a number"),
        (["db:\u0665"], r"not a number"),  # an Arabic-Indic digit: int() would take it
        (["db:0"], r"out of range"),
        (["db:" + "9" * 5000], r"out of range"),
        (["DB:5432", "db:5432"], r"db:5432 is listed twice \(as DB:5432: the same host\)"),
        (["db", "db.:5432"], r"db\.:5432 is listed twice \(as db:5432"),
        (["::1", "[0:0::1]:5432"], r"is listed twice \(as \[::1\]:5432"),
        (["Db-A", ["dB-a"]], r"listed twice"),  # across tiers too
    ],
)
def test_parse_rejects_what_is_no_host_name(value, message):
    with pytest.raises(ConfigurationError, match=message):
        parse_hosts(value, 5432)


@pytest.mark.parametrize(
    ("text", "name", "port"),
    [
        ("my_db:5432", "my_db", 5432),  # Docker Compose service names resolve
        ("_pg._tcp.example", "_pg._tcp.example", 5432),
        ("db.example.com.", "db.example.com.", 5432),
        ("a" * 63 + ".example", "a" * 63 + ".example", 5432),
        ("x." * 126 + "y", "x." * 126 + "y", 5432),  # 253 characters
        ("fe80::1%eth0", "fe80::1%eth0", 5432),
        ("[2001:db8::1]:6432", "2001:db8::1", 6432),
        ("10.0.0.1:65535", "10.0.0.1", 65535),
        ("  db-a:1\n", "db-a", 1),  # surrounding whitespace, as in "a:1, b:2"
    ],
)
def test_parse_accepts_dns_names_and_addresses(text, name, port):
    [spec] = parse_hosts([text], 5432)
    assert (spec.name, spec.port) == (name, port)


def test_sqlite_paths_stay_free_form():
    specs = parse_hosts(["/srv/A b.db", "/srv/a b.db", "relative:name.db"], None, paths=True)
    assert [s.name for s in specs] == ["/srv/A b.db", "/srv/a b.db", "relative:name.db"]
    with pytest.raises(ConfigurationError, match="listed twice"):
        parse_hosts(["/srv/a.db", "/srv/a.db"], None, paths=True)
    with pytest.raises(ConfigurationError, match="NUL"):
        parse_hosts(["/srv/a\x00.db"], None, paths=True)


# -- choice ---------------------------------------------------------------------


def test_choose_least_connections_with_random_ties(monkeypatch):
    hs = make(["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    keys = [h.key for h in hs.hosts()]
    counts = dict.fromkeys(keys, 0)
    seed_randomness(monkeypatch, 7)
    for _ in range(30):
        host = hs.choose(counts)
        counts[host.key] += 1
    assert sorted(counts.values()) == [10, 10, 10]
    # Ties are broken at random, not always the first host.
    picks = {hs.choose(dict.fromkeys(keys, 0)).key for _ in range(50)}
    assert picks == set(keys)


def test_choose_prefers_up_then_suspect_then_down_and_respects_tiers():
    clock = FakeClock()
    hs = make(["10.0.0.1", "10.0.0.2", ["10.0.1.1"]], clock=clock, unhealthy_threshold=2)
    a, b, dr = (h.key for h in hs.hosts())
    assert hs.choose({a: 5, b: 0}).key == b
    hs.failed(b, "refused")
    assert hs.get(b).health == SUSPECT
    assert hs.choose({a: 5, b: 0}).key == a  # suspect avoided while an up host exists
    hs.failed(a, "refused")
    hs.failed(a, "refused")
    assert hs.get(a).health == DOWN
    # Tier 0 has only a suspect host left: an up host of a lower tier wins.
    assert hs.choose({}).key == dr
    hs.failed(dr, "x")
    hs.failed(dr, "x")
    hs.failed(b, "x")
    # Everything down: the host that failed longest ago, best tier first.
    clock.advance(1)
    assert all(h.health == DOWN for h in hs.hosts())
    assert hs.choose({}).key == a
    assert hs.choose({}, exclude=[a, b, dr]) is None


def test_target_role_filters_and_prefer_standby_falls_back():
    hs = make(["10.0.0.1", "10.0.0.2"], target_role="standby")
    p, s = (h.key for h in hs.hosts())
    hs.succeeded(p, PRIMARY)
    hs.succeeded(s, STANDBY)
    assert {hs.choose({}).key for _ in range(20)} == {s}
    assert hs.choose({}, exclude=[s]) is None  # never a primary for "standby"

    hs = make(["10.0.0.1", "10.0.0.2"], target_role="prefer-standby")
    p, s = (h.key for h in hs.hosts())
    hs.succeeded(p, PRIMARY)
    hs.succeeded(s, STANDBY)
    assert hs.choose({s: 100}).key == s
    assert hs.choose({}, exclude=[s]).key == p
    assert [h.key for h in hs.eligible()] == [s]


# -- health -----------------------------------------------------------------------


def test_failures_threshold_and_failback():
    clock = FakeClock()
    hs = make(["10.0.0.1", "10.0.0.2"], clock=clock, unhealthy_threshold=3)
    key = hs.hosts()[0].key
    assert not hs.failed(key, "refused").down
    assert not hs.failed(key, "refused").down
    changes = hs.failed(key, "refused")
    assert changes.down == [key]
    host = hs.get(key)
    assert (host.health, host.failures, host.total_failures) == (DOWN, 3, 3)
    assert host.last_error == "refused"
    assert not hs.failed(key, "again").down  # already down: no second transition
    clock.advance(5)
    assert host in hs.due_checks(clock.now)
    assert hs.succeeded(key, PRIMARY).up == [key]
    assert (host.health, host.failures, host.total_failures) == (UP, 0, 4)
    # A success in between resets the count of consecutive failures.
    hs.failed(key, "x")
    hs.succeeded(key)
    hs.failed(key, "x")
    hs.failed(key, "x")
    assert host.health == SUSPECT


def test_role_change_is_reported():
    hs = make(["10.0.0.1"], target_role="any")
    key = hs.hosts()[0].key
    assert not hs.succeeded(key, PRIMARY).roles  # learnt, not changed
    assert hs.succeeded(key, STANDBY).roles == [key]  # a demoted primary


def test_periodic_checks_only_when_enabled():
    clock = FakeClock()
    hs = make(["10.0.0.1"], clock=clock, health_check_interval=None)
    host = hs.hosts()[0]
    clock.advance(100)
    assert hs.due_checks(clock.now) == []
    hs.failed(host.key, "x")  # a failed host is always checked again
    clock.advance(1)
    assert hs.due_checks(clock.now) == [host]


# -- DNS --------------------------------------------------------------------------


def test_every_record_is_a_host_and_changes_are_reported():
    clock = FakeClock()
    resolver = FakeResolver({"db.test": ["127.0.0.2", "127.0.0.3"]}, ttl=5)
    hs = make(["db.test:5432"], clock=clock, resolver=resolver, dns_min_refresh=1)
    assert [h.key for h in hs.hosts()] == ["db.test:5432"]  # not resolved yet
    changes = hs.refresh_dns()
    assert sorted(changes.added) == ["127.0.0.2:5432", "127.0.0.3:5432"]
    assert changes.removed == ["db.test:5432"]
    assert {h.name for h in hs.hosts()} == {"db.test"}
    # Not due before the TTL.
    resolver.records["db.test"].append("127.0.0.4")
    assert not hs.refresh_dns()
    assert resolver.queries == 1
    clock.advance(5)
    assert hs.refresh_dns().added == ["127.0.0.4:5432"]
    # A host keeps its health state across refreshes.
    hs.failed("127.0.0.2:5432", "x")
    resolver.records["db.test"].remove("127.0.0.3")
    clock.advance(5)
    assert hs.refresh_dns().removed == ["127.0.0.3:5432"]
    assert hs.get("127.0.0.2:5432").failures == 1


@pytest.mark.parametrize("trouble", ["outage", "nxdomain", "empty"])
def test_dns_trouble_keeps_the_last_good_set(trouble):
    clock = FakeClock()
    resolver = FakeResolver({"db.test": ["127.0.0.2", "127.0.0.3"]})
    hs = make(["db.test"], clock=clock, resolver=resolver)
    hs.refresh_dns()
    if trouble == "outage":
        resolver.fail = True
    elif trouble == "nxdomain":
        del resolver.records["db.test"]
    else:
        resolver.records["db.test"] = []
    clock.advance(60)
    assert not hs.refresh_dns()
    assert sorted(h.key for h in hs.hosts()) == ["127.0.0.2:5432", "127.0.0.3:5432"]
    assert hs.dns_failures == 1
    # It backs off, but retries well before the maximum refresh interval.
    assert clock.now < hs.next_dns_refresh() <= clock.now + 60


# -- plan: the fewest moves ---------------------------------------------------------


def minimum_moves(counts, eligible):
    """Brute-force reference: the smallest sum of excess over all even targets."""
    total = sum(counts.values())
    k = len(eligible)
    base, extra = divmod(total, k)
    best = None
    # Choose which eligible hosts get base+1 (every combination).
    from itertools import combinations

    for plus in combinations(eligible, extra):
        moves = sum(
            max(0, n - (base + (1 if key in plus else 0))) if key in eligible else n
            for key, n in counts.items()
        )
        best = moves if best is None else min(best, moves)
    return best


def test_plan_moves_are_minimal_random_cases():
    rng = random.Random(42)
    for _ in range(300):
        n_hosts = rng.randint(1, 6)
        hs = make([f"10.0.0.{i}" for i in range(1, n_hosts + 1)] + [["10.0.9.9"]])
        keys = [h.key for h in hs.hosts()]
        for key in keys[:-1]:
            if rng.random() < 0.25:
                for _ in range(3):
                    hs.failed(key, "x")
        counts = {key: rng.randint(0, 12) for key in keys}
        counts["10.9.9.9:5432"] = rng.randint(0, 3)  # a host no longer listed
        eligible = [h.key for h in hs.eligible()]
        plan = hs.plan(counts)
        moved = sum(n for n, _ in plan.values())
        assert moved == minimum_moves(counts, eligible), (counts, eligible, plan)
        # After the moves and refills, every eligible host is within 1 of the others.
        after = {k: counts.get(k, 0) - plan.get(k, (0, ""))[0] for k in eligible}
        refill = sum(counts.values()) - sum(after.values())
        for _ in range(refill):
            after[min(after, key=after.__getitem__)] += 1
        assert max(after.values()) - min(after.values()) <= 1


def test_plan_reasons():
    hs = make(["10.0.0.1", "10.0.0.2", ["10.0.1.1"]])
    a, b, dr = (h.key for h in hs.hosts())
    for _ in range(3):
        hs.failed(b, "x")
    plan = hs.plan({a: 2, b: 3, dr: 1, "10.7.7.7:5432": 2})
    assert plan == {
        b: (3, "host_down"),
        dr: (1, "rebalance"),  # a lower tier while tier 0 has a healthy host
        "10.7.7.7:5432": (2, "host_removed"),
    }
    # Nowhere to go: keep everything.
    for _ in range(3):
        hs.failed(a, "x")
        hs.failed(dr, "x")
    assert hs.plan({a: 2, b: 3}) == {}


def test_check_all_now_checks_every_host_once_even_without_periodic_checks():
    clock = FakeClock()
    hs = make(["10.0.0.1", "10.0.0.2"], clock=clock, health_check_interval=None)
    for host in hs.hosts():
        hs.succeeded(host.key, "standby")
    assert hs.due_checks(clock.now) == []  # no periodic checks
    hs.check_all_now()
    assert hs.next_check() < clock.now
    due = hs.due_checks(clock.now)
    assert sorted(h.key for h in due) == sorted(h.key for h in hs.hosts())
    for host in due:  # each checked once: back to no schedule
        hs.succeeded(host.key, "primary")
    assert hs.due_checks(clock.now + 3600) == []


@pytest.mark.parametrize(
    ("cparams", "expected"),
    [
        ({"host": "::1", "port": 5433}, [("::1", 5433)]),
        ({"host": "::1"}, [("::1", 5432)]),
        ({"host": "[::1]", "port": "5433"}, [("::1", 5433)]),
        ({"host": "a,::1", "port": "5433,5434"}, [("a", 5433), ("::1", 5434)]),
        ({"host": ["::1", "10.0.0.1"], "port": [5433, 5434]}, [("::1", 5433), ("10.0.0.1", 5434)]),
        ({"host": "db", "port": 6000}, [("db", 6000)]),
    ],
)
def test_url_hosts_with_ipv6_literals_keep_their_port(cparams, expected):
    from sqla_rebalance.targets import Adapter

    adapter = Adapter()
    adapter.default_port = 5432
    specs = adapter.seed((), dict(cparams))
    assert specs is not None
    assert [(spec.name, spec.port) for spec in specs] == expected
