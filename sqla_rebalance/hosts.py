"""The host set of one pool: where connections may go, and where each new one goes.

Pure bookkeeping, no I/O except DNS (through :class:`~sqla_rebalance.dns.Resolver`):

- **Sources.** ``hosts=`` specs (nested lists are lower-priority tiers), or the
  URL's host(s) learnt at the first connect. Every name is resolved; each
  A/AAAA record is a host of its own, keyed ``address:port``.
- **DNS.** A name is re-resolved when its TTL runs out (clamped to
  ``[dns_min_refresh, dns_max_refresh]``). A failed, empty or NXDOMAIN answer
  keeps the last good set: DNS trouble never empties a pool.
- **Health.** A failed connect makes a host *suspect*; ``unhealthy_threshold``
  consecutive failures make it *down*. A success makes it *up* again.
- **Selection.** A new connection goes to an *up* host of the best tier that
  has one, matching ``target_role``, with the fewest connections of this
  pool (ties broken at random); then to *suspect* hosts; *down* hosts only
  when nothing else is left (they may have come back).
- **Plan.** :meth:`HostSet.plan` gives the even share of each eligible host and
  how many connections each host has beyond it: the fewest moves that even
  the pool out.

Thread safety: a connecting thread (choose, failure/success) and the
maintenance worker (DNS, health) both use a host set; one ``RLock`` guards it.
It is never taken on the checkout path, only when connecting.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import clock, randomness
from .dns import Answer, DnsError, Resolver, refresh_delay
from .failure_reasons import _one_line, failure_reason
from .host_changes import Changes
from .host_specs import HostSpec, _join, parse_hosts
from .stats import HOST_DOWN, HOST_REMOVED, REBALANCE
from .validation import TARGET_ROLES

__all__ = [
    "DOWN",
    "PRIMARY",
    "STANDBY",
    "SUSPECT",
    "TARGET_ROLES",
    "UNKNOWN",
    "UP",
    "Changes",
    "Host",
    "HostSet",
    "HostSpec",
    "failure_reason",
    "parse_hosts",
]

log = logging.getLogger("sqla_rebalance.hosts")

UP = "up"
SUSPECT = "suspect"
DOWN = "down"

UNKNOWN = "unknown"
PRIMARY = "primary"
STANDBY = "standby"


#: Seconds between probes of a suspect host: confirm a failure (or clear it) fast.
SUSPECT_PROBE_INTERVAL = 0.2
#: A host of the wrong role is probed this many health intervals apart.
ROLE_PROBE_FACTOR = 5


#: ``Host.next_check`` of a host to check at the next pass whatever the schedule.
_CHECK_NOW = -1.0


class Host:
    """One address of the cluster, as this pool sees it."""

    __slots__ = (
        "address",
        "down_since",
        "failure_reason",
        "failures",
        "health",
        "key",
        "last_error",
        "last_failure",
        "name",
        "next_check",
        "port",
        "role",
        "tier",
        "total_failures",
    )

    def __init__(
        self, name: str, address: str | None, port: int | None, tier: int, now: float
    ) -> None:
        #: ``address:port`` (or the name when it could not be resolved).
        self.key = _join(address or name, port)
        self.name = name
        self.address = address
        self.port = port
        self.tier = tier
        self.health = UP
        self.role = UNKNOWN
        #: Consecutive failures; ``total_failures`` never resets.
        self.failures = 0
        self.total_failures = 0
        self.last_error: str | None = None
        #: Why the host is suspect or down: "deadline exceeded" (it hangs),
        #: "refused" (nothing listens) or "error"; None while it is up.
        self.failure_reason: str | None = None
        self.last_failure = 0.0
        self.down_since: float | None = None
        self.next_check = now

    @property
    def healthy(self) -> bool:
        return self.health != DOWN

    def __repr__(self) -> str:
        return f"<Host {self.key} tier={self.tier} {self.health} {self.role}>"


@dataclass
class _Name:
    """A DNS name of the host list and its last good answer."""

    spec: HostSpec
    addresses: tuple[str, ...] = ()
    resolved: bool = False
    next_refresh: float = 0.0
    failures: int = 0
    last_error: str | None = None


class HostSet:
    """Hosts, tiers, health and the least-connections choice of one pool."""

    def __init__(
        self,
        specs: Sequence[HostSpec] | None,
        *,
        target_role: str = "any",
        resolver: Resolver | None = None,
        dns_min_refresh: float = 1.0,
        dns_max_refresh: float = 60.0,
        unhealthy_threshold: int = 3,
        health_check_interval: float | None = 2.0,
        clock: Callable[[], float] | None = None,
        logger: Any = None,
    ) -> None:
        #: Where host events are logged: the pool's own logger (SQLAlchemy's
        #: ``sqlalchemy.pool`` hierarchy, ``echo_pool``), this module's by default.
        self.log = logger if logger is not None else log
        self._lock = threading.RLock()
        self.target_role = target_role
        self._resolver = resolver
        self.dns_min_refresh = dns_min_refresh
        self.dns_max_refresh = dns_max_refresh
        self.unhealthy_threshold = unhealthy_threshold
        self.health_check_interval = health_check_interval
        self._clock = clock
        self._names: list[_Name] = []
        self._hosts: dict[str, Host] = {}
        #: Counters for stats.
        self.dns_failures = 0
        self.dns_refreshes = 0
        self.seeded = False
        if specs:
            self.seed(specs)

    def _now(self) -> float:
        return self._clock() if self._clock is not None else clock.now()

    @property
    def resolver(self) -> Resolver:
        if self._resolver is None:
            self._resolver = Resolver()
        return self._resolver

    # -- sources -------------------------------------------------------------
    def seed(self, specs: Iterable[HostSpec]) -> None:
        """Set the host list (from ``hosts=`` or, at the first connect, the URL)."""
        with self._lock:
            if self.seeded:
                return
            self._names = [_Name(spec) for spec in specs]
            self.seeded = True
            self._rebuild(self._now())

    def replace(self, specs: Iterable[HostSpec]) -> Changes:
        """Use a new host list (``pool.set_hosts``); known hosts keep their state."""
        with self._lock:
            old = {str(n.spec): n for n in self._names}
            names = []
            for spec in specs:
                entry = old.get(str(spec))
                if entry is not None and entry.spec == spec:
                    names.append(entry)
                else:
                    names.append(_Name(spec))
            self._names = names
            self.seeded = True
            return self._rebuild(self._now())

    def refresh_dns(self, force: bool = False) -> Changes:
        """Re-resolve the names whose TTL ran out (all with ``force``)."""
        with self._lock:
            names = list(self._names)
        now = self._now()
        changed = False
        for entry in names:
            if entry.spec.is_literal or (not force and entry.next_refresh > now):
                continue
            try:
                answer: Answer = self.resolver.resolve(entry.spec.name)
                if not answer.addresses:  # never empty the pool on an empty answer
                    raise DnsError(entry.spec.name, "empty", "no A or AAAA records")
            except DnsError as err:
                self._dns_failed(entry, err, now)
                continue
            except Exception as err:  # a resolver bug must not stop the worker
                self.log.exception("resolving %s failed", entry.spec.name)
                self._dns_failed(entry, err, now)
                continue
            with self._lock:
                self.dns_refreshes += 1
                entry.failures = 0
                entry.last_error = None
                entry.next_refresh = now + refresh_delay(
                    answer.ttl, self.dns_min_refresh, self.dns_max_refresh
                )
                if not entry.resolved or entry.addresses != answer.addresses:
                    entry.addresses = answer.addresses
                    entry.resolved = True
                    changed = True
        if not changed:
            return Changes()
        with self._lock:
            return self._rebuild(now)

    def expire_dns(self) -> None:
        """Make every name due now: the next refresh (by the worker) re-resolves them all."""
        now = self._now()
        with self._lock:
            for entry in self._names:
                entry.next_refresh = min(entry.next_refresh, now)

    def _dns_failed(self, entry: _Name, err: Exception, now: float) -> None:
        with self._lock:
            self.dns_failures += 1
            entry.failures += 1
            entry.last_error = str(err)
            # Retry sooner than a TTL, but back off while the failure lasts.
            delay = min(self.dns_max_refresh, self.dns_min_refresh * 2 ** min(entry.failures, 6))
            entry.next_refresh = now + delay
        if entry.failures == 1 or entry.failures % 10 == 0:
            self.log.warning(
                "DNS lookup of %s failed (%s, %d in a row); keeping %s",
                entry.spec.name,
                err,
                entry.failures,
                ", ".join(entry.addresses) if entry.resolved else "the name as is",
            )

    def _rebuild(self, now: float) -> Changes:
        """Derive the hosts from the names' current answers, keeping known hosts' state."""
        wanted: dict[str, tuple[str, str | None, int | None, int]] = {}
        for entry in self._names:
            spec = entry.spec
            if spec.is_literal:
                addresses: Sequence[str | None] = [None if spec.is_path else spec.name]
            elif entry.resolved:
                addresses = entry.addresses
            else:
                # Never resolved: let the driver resolve the name itself.
                addresses = [None]
            for address in addresses:
                key = _join(address or spec.name, spec.port)
                if key not in wanted:  # the same address under two names: first tier wins
                    wanted[key] = (spec.name, address, spec.port, spec.tier)
        changes = Changes()
        hosts: dict[str, Host] = {}
        for key, (name, address, port, tier) in wanted.items():
            host = self._hosts.get(key)
            if host is None:
                host = Host(name, address, port, tier, now)
                changes.added.append(key)
            host.tier = tier
            hosts[key] = host
        changes.removed = [key for key in self._hosts if key not in hosts]
        self._hosts = hosts
        if changes.added or changes.removed:
            self.log.info(
                "hosts changed: %s (added %s, removed %s)",
                ", ".join(hosts) or "none",
                ", ".join(changes.added) or "none",
                ", ".join(changes.removed) or "none",
            )
        return changes

    def next_dns_refresh(self) -> float:
        with self._lock:
            due = [n.next_refresh for n in self._names if not n.spec.is_literal]
        return min(due, default=math.inf)

    # -- queries ---------------------------------------------------------------
    def hosts(self) -> list[Host]:
        with self._lock:
            return list(self._hosts.values())

    def get(self, key: str) -> Host | None:
        return self._hosts.get(key)

    def __len__(self) -> int:
        return len(self._hosts)

    def _role_ok(self, host: Host, want: str) -> bool:
        return want == "any" or host.role in (want, UNKNOWN)

    def _passes(self) -> tuple[str, ...]:
        if self.target_role == "prefer-standby":
            return (STANDBY, "any")
        return (self.target_role,)

    def eligible(self) -> list[Host]:
        """Hosts that should hold this pool's connections now: the healthy
        hosts of the best tier that has one, matching ``target_role``."""
        with self._lock:
            for want in self._passes():
                for tier in sorted({h.tier for h in self._hosts.values()}):
                    found = [
                        h
                        for h in self._hosts.values()
                        if h.tier == tier and h.healthy and self._role_ok(h, want)
                    ]
                    if found:
                        return found
            return []

    def choose(self, counts: Mapping[str, int], exclude: Iterable[str] = ()) -> Host | None:
        """The host for the next connection, or None when every host was tried."""
        excluded = set(exclude)
        with self._lock:
            hosts = [h for h in self._hosts.values() if h.key not in excluded]
            for want in self._passes():
                fitting = [h for h in hosts if self._role_ok(h, want)]
                for health in (UP, SUSPECT):
                    found = [h for h in fitting if h.health == health]
                    if found:
                        best_tier = min(h.tier for h in found)
                        return _least_loaded([h for h in found if h.tier == best_tier], counts)
            # Last resort: a down host (the one that failed longest ago) may be back.
            want = "any" if self.target_role == "prefer-standby" else self.target_role
            down = [h for h in hosts if h.health == DOWN and self._role_ok(h, want)]
            if down:
                return min(down, key=lambda h: (h.tier, h.last_failure))
            return None

    def plan(self, counts: Mapping[str, int]) -> dict[str, tuple[int, str]]:
        """How many connections to move off each host, and why.

        ``counts`` are the pool's connections per host key (those already
        leaving excluded). Every eligible host gets an even share of the total;
        the ``total % k`` hosts that get one more are those holding the most,
        so that the moves, ``sum(max(0, count - share))``, are the fewest
        possible. Hosts that are not eligible (down, removed from DNS, a lower
        tier, the wrong role) give up all their connections.
        """
        with self._lock:
            eligible = self.eligible()
            if not eligible:
                return {}  # nowhere better to go: keep what works
            total = sum(counts.values())
            base, extra = divmod(total, len(eligible))
            ranked = sorted(eligible, key=lambda h: (-counts.get(h.key, 0), h.key))
            share = {h.key: base + (1 if i < extra else 0) for i, h in enumerate(ranked)}
            moves: dict[str, tuple[int, str]] = {}
            for key, count in counts.items():
                if count <= 0:
                    continue
                if key in share:
                    if count > share[key]:
                        moves[key] = (count - share[key], REBALANCE)
                    continue
                host = self._hosts.get(key)
                if host is None:
                    moves[key] = (count, HOST_REMOVED)
                elif host.health == DOWN:
                    moves[key] = (count, HOST_DOWN)
                else:
                    moves[key] = (count, REBALANCE)
            return moves

    # -- health ------------------------------------------------------------------
    def failed(self, key: str, error: BaseException | str) -> Changes:
        """A connect (or probe) to ``key`` failed."""
        now = self._now()
        changes = Changes()
        with self._lock:
            host = self._hosts.get(key)
            if host is None:
                return changes
            host.failures += 1
            host.total_failures += 1
            host.last_failure = now
            host.last_error = _one_line(error)
            host.failure_reason = failure_reason(error)
            if host.failures >= self.unhealthy_threshold:
                if host.health != DOWN:
                    host.health = DOWN
                    host.down_since = now
                    changes.down.append(key)
                host.next_check = now + (self.health_check_interval or 2.0)
            else:
                if host.health == UP:
                    changes.suspect.append(key)
                host.health = SUSPECT
                host.next_check = now + SUSPECT_PROBE_INTERVAL
        if changes.down:
            self.log.warning(
                "host %s is down after %d failures (%s): %s",
                key,
                host.failures,
                host.failure_reason,
                host.last_error,
            )
        return changes

    def succeeded(self, key: str, role: str | None = None) -> Changes:
        """A connect (or probe) to ``key`` worked; ``role`` if it was checked."""
        changes = Changes()
        with self._lock:
            host = self._hosts.get(key)
            if host is None:
                return changes
            if role is not None and role != host.role:
                if host.role != UNKNOWN:
                    self.log.warning("host %s changed role: %s -> %s", key, host.role, role)
                if host.role != UNKNOWN or self.target_role != "any":
                    changes.roles.append(key)
                host.role = role
            host.failures = 0
            if host.health == DOWN:
                changes.up.append(key)
                self.log.warning(
                    "host %s is up again after %.1fs down",
                    key,
                    self._now() - (host.down_since or 0),
                )
            host.health = UP
            host.down_since = None
            host.failure_reason = None
            interval = self.health_check_interval or math.inf
            if not self.role_fits(host):
                # Not used by this pool: probed (a connect) only now and then,
                # to notice a promotion or demotion.
                interval *= ROLE_PROBE_FACTOR
            host.next_check = self._now() + interval
        return changes

    def may_be_standby(self, exclude: Iterable[str]) -> bool:
        """Is a healthy standby, or a host of unknown role, left outside ``exclude``?"""
        excluded = set(exclude)
        with self._lock:
            return any(
                h.healthy and h.role in (STANDBY, UNKNOWN) and h.key not in excluded
                for h in self._hosts.values()
            )

    def role_fits(self, host: Host) -> bool:
        """Could this pool use ``host`` as far as its role goes?"""
        if self.target_role in ("any", "prefer-standby"):
            return True
        return host.role in (self.target_role, UNKNOWN)

    def suspect(self, key: str) -> None:
        """A connection to ``key`` broke: check the host now (not a failure
        yet: one killed backend says little about the server)."""
        with self._lock:
            host = self._hosts.get(key)
            if host is not None and host.health == UP:
                host.health = SUSPECT
                host.next_check = self._now()

    def due_checks(self, now: float) -> list[Host]:
        """Hosts whose health check is due: suspect and down ones always (to
        confirm or to fail back), up ones when periodic checks are on."""
        with self._lock:
            return [
                h
                for h in self._hosts.values()
                if h.next_check <= now
                and (h.health != UP or self.health_check_interval or h.next_check < 0)
            ]

    def check_all_now(self) -> None:
        """Check every host at the next pass, even with periodic checks off
        (``refresh``: a promotion the pool cannot see otherwise). A check
        resets each host's schedule as usual."""
        with self._lock:
            for h in self._hosts.values():
                h.next_check = _CHECK_NOW

    def checking(self, host: Host, until: float) -> None:
        """A check of ``host`` is in flight: not due again before ``until``
        (its result reschedules it; a missed deadline counts as a failure)."""
        with self._lock:
            host.next_check = max(host.next_check, until)

    def checked(self, host: Host, now: float) -> None:
        """Push the next check of an up host one interval ahead."""
        with self._lock:
            if host.health == UP:
                host.next_check = now + (self.health_check_interval or math.inf)

    def next_check(self) -> float:
        with self._lock:
            return min(
                (
                    h.next_check
                    for h in self._hosts.values()
                    if h.health != UP or self.health_check_interval or h.next_check < 0
                ),
                default=math.inf,
            )

    def describe(self) -> str:
        with self._lock:
            return ", ".join(f"{h.key}={h.health}/{h.role}" for h in self._hosts.values())

    def after_fork(self) -> None:
        """In a forked child: the lock may have been held by a parent thread."""
        self._lock = threading.RLock()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "dns_failures": self.dns_failures,
                "dns_refreshes": self.dns_refreshes,
                "names": {
                    str(n.spec): list(n.addresses) for n in self._names if not n.spec.is_literal
                },
            }


def _least_loaded(hosts: Sequence[Host], counts: Mapping[str, int]) -> Host:
    fewest = min(counts.get(h.key, 0) for h in hosts)
    return randomness.rng.choice([h for h in hosts if counts.get(h.key, 0) == fewest])
