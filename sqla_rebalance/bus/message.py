"""Cluster-wide commands on the wire: small, versioned, signed JSON (wire version 2).

A command is one JSON object of at most :data:`MAX_BYTES` bytes (far below
PostgreSQL's 8000-byte ``NOTIFY`` payload limit)::

    {"v": 2, "gen": 1764662400123, "action": "recycle", "pool": "orders",
     "host": null, "spread": 30.0, "issued_at": 1764662400.123,
     "nonce": "9f2c...", "mac": "<hex HMAC-SHA256>"}

The MAC is HMAC-SHA256 over the *canonical* form of every other field **plus
the bus channel** it is sent on (``"channel": "<name>"``, which is not sent:
each side knows its own): ``json.dumps(fields | {"channel": channel},
sort_keys=True, separators=(",", ":"))``. The wire version ``v`` is one of
the signed fields, so a message signed for one channel or one version is
refused on another (``bad_signature``, ``version``). Verification recomputes
the MAC from the parsed object, so key order and whitespace on the wire do
not matter, and compares with :func:`hmac.compare_digest` (constant time).

Version 1 (the first releases, whose MAC did not cover the channel) is
refused as ``version``: a captured v1 command could be replayed on any channel.

``gen`` is the command's generation, given by the bus when it is published
(see ``base.next_generation``): it only grows, so a receiver that has applied
generation N can reject anything at or below N as a replay. ``issued_at``
bounds how long a captured message stays usable; ``nonce`` makes two commands
with the same content and second distinct.

Decoding never raises anything but :class:`Rejected`, whose ``kind`` is one of
:data:`REJECTION_KINDS`, whatever the input: a receiver counts it and moves on.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from .base import read_ceiling

__all__ = [
    "ACTIONS",
    "MAX_BYTES",
    "REJECTION_KINDS",
    "VERSION",
    "Command",
    "Rejected",
    "decode",
    "encode",
    "new_command",
]

#: Wire version: 2 signs the channel and the version with the other fields.
VERSION = 2
#: ``recycle``: replace connections gracefully (over ``spread`` seconds);
#: ``rebalance``: move only the excess connections between hosts;
#: ``refresh``: re-resolve DNS names, re-check failed hosts now, rebalance;
#: ``drain``: close every connection (idle now, in use at checkin) and open
#: none until the application needs one again.
ACTIONS = ("recycle", "rebalance", "refresh", "drain")
MAX_BYTES = 1024
#: Longest ``spread`` a command may ask for (one day).
MAX_SPREAD = 86400.0

# Why a message was refused (the keys of ``BusStats.rejected``).
OVERSIZED = "oversized"
MALFORMED = "malformed"
VERSION_MISMATCH = "version"
UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad_signature"
UNKNOWN_ACTION = "unknown_action"
STALE = "stale"
REPLAYED = "replayed"
REJECTION_KINDS: tuple[str, ...] = (
    OVERSIZED,
    MALFORMED,
    VERSION_MISMATCH,
    UNSIGNED,
    BAD_SIGNATURE,
    UNKNOWN_ACTION,
    STALE,
    REPLAYED,
)

_FIELDS = frozenset({"v", "gen", "action", "pool", "host", "spread", "issued_at", "nonce", "mac"})


class Rejected(Exception):
    """A message that must not be applied; ``kind`` says why."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.kind, self.detail))


@dataclass(frozen=True)
class Command:
    """One cluster-wide command, as published and as received."""

    action: str
    gen: int = 0
    #: Pool name or glob (``fnmatch`` rules, case-sensitive): ``*`` is every pool.
    pool: str = "*"
    #: Limit to the connections of one host (``address:port``, ``name:port``
    #: or a bare name/address, as in ``pool.stats()``); None is every host.
    host: str | None = None
    spread: float = 0.0
    issued_at: float = 0.0
    nonce: str = ""

    def matches(self, pool_name: str) -> bool:
        return fnmatch.fnmatchcase(pool_name, self.pool)

    def fields(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "gen": self.gen,
            "action": self.action,
            "pool": self.pool,
            "host": self.host,
            "spread": self.spread,
            "issued_at": self.issued_at,
            "nonce": self.nonce,
        }

    def describe(self) -> str:
        parts = [self.action, f"pool={self.pool}"]
        if self.host:
            parts.append(f"host={self.host}")
        if self.spread:
            parts.append(f"spread={self.spread:g}s")
        return " ".join(parts)


def new_command(
    action: str, pool: str = "*", host: str | None = None, spread: float = 0.0
) -> Command:
    """A command ready to publish (the bus fills in ``gen``); validates its arguments."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
    if not isinstance(pool, str) or not pool or len(pool) > 200:
        raise ValueError("pool must be a pool name or glob of 1 to 200 characters")
    if host is not None and (not isinstance(host, str) or not host or len(host) > 255):
        raise ValueError("host must be a host name, address or address:port")
    if action == "drain" and host is not None:
        raise ValueError(
            "drain applies to whole pools; to take one host out, remove it from DNS or "
            "hosts= and send refresh (or recycle --host to reconnect to it)"
        )
    if host is not None and action != "recycle":
        raise ValueError(f"only recycle takes a host; {action} applies to the whole pool")
    spread = float(spread)
    if not (0.0 <= spread <= MAX_SPREAD):
        raise ValueError(f"spread must be between 0 and {MAX_SPREAD:g} seconds")
    return Command(
        action=action,
        pool=pool,
        host=host,
        spread=spread,
        issued_at=time.time(),
        nonce=os.urandom(8).hex(),
    )


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _mac(secret: bytes, fields: dict[str, Any], channel: str) -> str:
    signed = {**fields, "channel": channel}
    return hmac.digest(secret, _canonical(signed), hashlib.sha256).hex()  # the C one-shot


def encode(command: Command, secret: bytes | None, *, channel: str) -> bytes:
    """The wire form of ``command`` for ``channel``, signed when ``secret`` is given."""
    fields = command.fields()
    if secret:
        fields["mac"] = _mac(secret, fields, channel)
    data = _canonical(fields)
    if len(data) > MAX_BYTES:
        raise ValueError(f"command is {len(data)} bytes, more than {MAX_BYTES}")
    return data


def _number(obj: dict[str, Any], key: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejected(MALFORMED, f"{key} must be a finite number")
    try:
        number = float(value)  # an int beyond float range (10**400) overflows
    except OverflowError:
        raise Rejected(MALFORMED, f"{key} must be a finite number") from None
    if not math.isfinite(number):
        raise Rejected(MALFORMED, f"{key} must be a finite number")
    return number


def decode(
    raw: bytes | str,
    secret: bytes | None,
    *,
    channel: str,
    max_age: float | None,
    now: float | None = None,
) -> Command:
    """Parse and verify one message received on ``channel``; raise :class:`Rejected`
    if it must not be applied (and nothing else, whatever ``raw`` holds).

    With ``secret`` None (a bus configured without ``broadcast_secret``) the
    MAC is not checked: anybody who can publish on the bus is trusted.
    ``max_age`` rejects a message whose ``issued_at`` is further than that
    from ``now`` in either direction (None: no age check, for catch-up reads
    of the durable log, whose age is bounded by the listener instead). A
    ``gen`` more than two days ahead of ``now`` (in ms) is malformed: no
    publisher of this package allocates one.
    """
    try:
        return _decode(raw, secret, channel, max_age, now)
    except Rejected:
        raise
    except Exception as err:  # a bug here must not look like a lost connection
        raise Rejected(MALFORMED, f"unreadable ({type(err).__name__})") from None


def _decode(
    raw: bytes | str,
    secret: bytes | None,
    channel: str,
    max_age: float | None,
    now: float | None,
) -> Command:
    # Cheap checks first: a flood of junk costs a length test, not a parse.
    if len(raw) > MAX_BYTES:
        raise Rejected(OVERSIZED, f"{len(raw)} bytes (limit {MAX_BYTES})")
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
        if len(raw) > MAX_BYTES:
            raise Rejected(OVERSIZED, f"{len(raw)} bytes (limit {MAX_BYTES})")
    if raw.lstrip(b" \t\r\n")[:1] != b"{":  # not even the start of an object: no parse
        raise Rejected(MALFORMED, "not a JSON object")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        raise Rejected(MALFORMED, "not JSON") from None
    if not isinstance(obj, dict):
        raise Rejected(MALFORMED, "not a JSON object")
    version = obj.get("v")
    if type(version) is not int or version != VERSION:  # not True, not 2.0
        shown = repr(version)[:20] if isinstance(version, (int, float, str)) else "?"
        raise Rejected(VERSION_MISMATCH, f"version {shown} (this is {VERSION})")
    mac = obj.pop("mac", None)
    if secret:
        if mac is None:
            raise Rejected(UNSIGNED, "no mac")
        if "channel" in obj:  # signed implicitly: never on the wire
            raise Rejected(MALFORMED, "unknown fields ['channel']")
        try:
            expected = _mac(secret, obj, channel)
        except (ValueError, RecursionError):
            raise Rejected(MALFORMED, "not a canonical JSON object") from None
        if not isinstance(mac, str) or not hmac.compare_digest(
            mac.encode("ascii", "replace"), expected.encode("ascii")
        ):
            raise Rejected(BAD_SIGNATURE, "mac does not match")
    unknown = set(obj) - _FIELDS
    if unknown:
        raise Rejected(MALFORMED, f"unknown fields {sorted(unknown)[:5]}"[:200])
    clock = time.time() if now is None else now
    gen = obj.get("gen")
    if isinstance(gen, bool) or not isinstance(gen, int) or gen <= 0:
        raise Rejected(MALFORMED, "gen must be a positive integer")
    if gen > read_ceiling(clock):
        raise Rejected(MALFORMED, "gen is more than two days ahead of the clock")
    action = obj.get("action")
    if not isinstance(action, str):
        raise Rejected(MALFORMED, "action must be a string")
    if action not in ACTIONS:
        raise Rejected(UNKNOWN_ACTION, f"action {action[:40]!r}")
    pool = obj.get("pool")
    if not isinstance(pool, str) or not pool:
        raise Rejected(MALFORMED, "pool must be a non-empty string")
    host = obj.get("host")
    if host is not None and (not isinstance(host, str) or not host):
        raise Rejected(MALFORMED, "host must be a string or null")
    if action != "recycle" and host is not None:
        raise Rejected(MALFORMED, f"{action} takes no host")
    spread = _number(obj, "spread")
    if not 0.0 <= spread <= MAX_SPREAD:
        raise Rejected(MALFORMED, f"spread {spread:g} out of range")
    issued_at = _number(obj, "issued_at")
    nonce = obj.get("nonce")
    if not isinstance(nonce, str) or len(nonce) > 64:
        raise Rejected(MALFORMED, "nonce must be a string of at most 64 characters")
    if max_age is not None:
        age = clock - issued_at
        if abs(age) > max_age:
            when = f"{age:.0f}s ago" if age > 0 else f"{-age:.0f}s in the future"
            raise Rejected(STALE, f"issued {when} (window {max_age:g}s)")
    return Command(
        action=action,
        gen=gen,
        pool=pool,
        host=host,
        spread=spread,
        issued_at=issued_at,
        nonce=nonce,
    )
