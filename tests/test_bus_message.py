"""Commands on the wire: encoding, signatures, and every reason to reject one (pure logic)."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import pickle

import pytest

from sqla_rebalance import ConfigurationError
from sqla_rebalance.bus import open_bus
from sqla_rebalance.bus.base import next_generation, redact, split_channel
from sqla_rebalance.bus.message import (
    MAX_BYTES,
    REJECTION_KINDS,
    Command,
    Rejected,
    decode,
    encode,
    new_command,
)

SECRET = b"correct horse battery staple"
NOW = 1_800_000_000.0
CHANNEL = "sqla_rebalance"


def signed(channel: str = CHANNEL, **changes: object) -> bytes:
    cmd = dataclasses.replace(new_command("recycle", pool="orders", spread=5), gen=42)
    cmd = dataclasses.replace(cmd, **{"issued_at": NOW, **changes})
    return encode(cmd, SECRET, channel=channel)


def resign(obj: dict[str, object], secret: bytes = SECRET, channel: str = CHANNEL) -> bytes:
    """Sign ``obj`` as the wire format says (docs/commands.md), independently of encode()."""
    obj = {k: v for k, v in obj.items() if k != "mac"}
    canonical = json.dumps({**obj, "channel": channel}, sort_keys=True, separators=(",", ":"))
    obj["mac"] = hmac.new(secret, canonical.encode(), hashlib.sha256).hexdigest()
    return json.dumps(obj).encode()


def kind_of(
    raw: bytes | str,
    secret: bytes | None = SECRET,
    max_age: float | None = 60,
    channel: str = CHANNEL,
) -> str:
    with pytest.raises(Rejected) as info:
        decode(raw, secret, channel=channel, max_age=max_age, now=NOW)
    assert info.value.kind in REJECTION_KINDS
    return info.value.kind


def test_round_trip_keeps_every_field():
    raw = signed(host="db-a:5432")
    cmd = decode(raw, SECRET, channel=CHANNEL, max_age=60, now=NOW)
    assert (cmd.action, cmd.gen, cmd.pool, cmd.host, cmd.spread) == (
        "recycle",
        42,
        "orders",
        "db-a:5432",
        5.0,
    )
    assert len(raw) < 400  # far below the 1 KB limit and NOTIFY's 8000 bytes


def test_key_order_and_whitespace_do_not_matter():
    obj = json.loads(signed())
    shuffled = json.dumps(dict(reversed(list(obj.items()))), indent=3).encode()
    assert decode(shuffled, SECRET, channel=CHANNEL, max_age=60, now=NOW).gen == 42


def test_unsigned_message_rejected_when_a_secret_is_set():
    obj = json.loads(signed())
    del obj["mac"]
    assert kind_of(json.dumps(obj)) == "unsigned"


def test_wrong_secret_and_tampered_fields_are_bad_signatures():
    assert kind_of(signed(), secret=b"another secret") == "bad_signature"
    obj = json.loads(signed())
    obj["pool"] = "*"  # widen the scope without re-signing
    assert kind_of(json.dumps(obj)) == "bad_signature"
    obj["mac"] = 12345
    assert kind_of(json.dumps(obj)) == "bad_signature"


def test_the_mac_binds_the_channel():
    """A command captured on ?channel=staging and replayed on another channel (the
    default one, same secret) is refused: the channel is part of what is signed."""
    staging = signed(channel="staging")
    assert decode(staging, SECRET, channel="staging", max_age=60, now=NOW).gen == 42
    assert kind_of(staging, channel=CHANNEL) == "bad_signature"
    assert kind_of(signed(), channel="staging") == "bad_signature"
    # The channel is signed, never sent: a message that carries one is refused.
    obj = json.loads(staging)
    obj["channel"] = CHANNEL
    assert kind_of(json.dumps(obj), channel=CHANNEL) == "malformed"


def test_the_mac_binds_the_wire_version():
    obj = json.loads(signed())
    assert obj["v"] == 2
    obj["v"] = 1  # downgraded without re-signing
    assert kind_of(json.dumps(obj)) == "version"
    obj["v"] = 2.0  # equal to 2 in Python, but not the integer 2
    assert kind_of(json.dumps(obj)) == "version"
    assert kind_of(resign(obj)) == "version"


def test_v1_messages_are_refused_as_version():
    """Wire v1 (MAC over the fields only, no channel): refused whatever its MAC says."""
    obj = {k: v for k, v in json.loads(signed()).items() if k != "mac"}
    obj["v"] = 1
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    obj["mac"] = hmac.new(SECRET, canonical, hashlib.sha256).hexdigest()
    assert kind_of(json.dumps(obj)) == "version"
    assert kind_of(json.dumps(obj), secret=None) == "version"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("issued_at", 10**400),
        ("issued_at", -(10**400)),
        ("spread", 10**400),
        ("issued_at", float("inf")),
        ("issued_at", float("nan")),
        ("spread", float("-inf")),
    ],
)
def test_numbers_beyond_float_range_are_malformed_not_overflow(field, value):
    obj = json.loads(signed())
    obj[field] = value
    assert kind_of(resign(obj)) == "malformed"
    assert kind_of(resign(obj), max_age=None) == "malformed"
    # And the same without a secret (nothing verified first).
    unsigned = {k: v for k, v in obj.items() if k != "mac"}
    assert kind_of(json.dumps(unsigned), secret=None) == "malformed"


@pytest.mark.parametrize("gen", [2**63 - 1, 2**63, 10**30, int(NOW * 1000) + 3 * 86_400_000])
def test_a_generation_far_ahead_of_the_clock_is_malformed(gen):
    obj = json.loads(signed())
    obj["gen"] = gen
    assert kind_of(resign(obj)) == "malformed"
    obj["gen"] = int(NOW * 1000) + 86_400_000  # one day ahead: still a generation
    assert decode(resign(obj), SECRET, channel=CHANNEL, max_age=None, now=NOW).gen == obj["gen"]


def test_without_a_secret_unsigned_messages_are_accepted():
    raw = encode(dataclasses.replace(new_command("rebalance"), gen=7), None, channel=CHANNEL)
    assert "mac" not in json.loads(raw)
    assert decode(raw, None, channel=CHANNEL, max_age=None).action == "rebalance"


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"not json at all", "malformed"),
        (b"[1, 2, 3]", "malformed"),
        (b"\xff\xfe", "malformed"),
        (b'{"v": 3, "gen": 1}', "version"),
        (b'{"gen": 1}', "version"),
        (b"x" * (MAX_BYTES + 1), "oversized"),
        (b"[" * 100_000, "oversized"),
    ],
)
def test_garbage_is_rejected_by_kind(raw, kind):
    assert kind_of(raw) == kind


def test_oversized_even_when_validly_signed():
    obj = json.loads(signed())
    obj["nonce"] = "n" * 2000
    assert kind_of(resign(obj)) == "oversized"


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [
        ("action", "drop_database", "unknown_action"),
        ("action", 3, "malformed"),
        ("gen", 0, "malformed"),
        ("gen", True, "malformed"),
        ("gen", "42", "malformed"),
        ("pool", "", "malformed"),
        ("spread", -1, "malformed"),
        ("spread", 1e9, "malformed"),
        ("spread", "5", "malformed"),
        ("issued_at", None, "malformed"),
        ("nonce", "n" * 65, "malformed"),
        ("extra", 1, "malformed"),
    ],
)
def test_signed_but_invalid_fields_are_rejected(field, value, kind):
    obj = json.loads(signed())
    obj[field] = value
    assert kind_of(resign(obj)) == kind


def test_drain_takes_no_host():
    obj = json.loads(signed())
    obj["action"] = "drain"
    obj["host"] = "db-a:5432"
    assert kind_of(resign(obj)) == "malformed"
    with pytest.raises(ValueError, match="drain applies to whole pools"):
        new_command("drain", host="db-a")


@pytest.mark.parametrize("action", ["rebalance", "refresh"])
def test_only_recycle_takes_a_host(action):
    obj = json.loads(signed())
    obj["action"] = action
    obj["host"] = "db-a:5432"
    assert kind_of(resign(obj)) == "malformed"
    with pytest.raises(ValueError, match="only recycle takes a host"):
        new_command(action, host="db-a")


def test_stale_and_future_messages_are_rejected_live_only():
    old = signed(issued_at=NOW - 61)
    assert kind_of(old, max_age=60) == "stale"
    assert kind_of(signed(issued_at=NOW + 61), max_age=60) == "stale"
    # A catch-up read of the log checks age elsewhere (max_age None).
    assert decode(old, SECRET, channel=CHANNEL, max_age=None, now=NOW).gen == 42


def test_new_command_validates_its_arguments():
    with pytest.raises(ValueError, match="action must be one of"):
        new_command("reboot")
    with pytest.raises(ValueError, match="spread"):
        new_command("recycle", spread=-1)
    with pytest.raises(ValueError, match="pool"):
        new_command("recycle", pool="")
    a, b = new_command("recycle"), new_command("recycle")
    assert a.nonce != b.nonce


def test_pool_globs():
    cmd = Command(action="recycle", pool="orders-*")
    assert cmd.matches("orders-eu")
    assert not cmd.matches("billing")
    assert Command(action="recycle").matches("anything")


def test_rejected_pickles():
    err = pickle.loads(pickle.dumps(Rejected("stale", "old")))
    assert (err.kind, err.detail) == ("stale", "old")


def test_generations_only_grow_even_after_the_store_forgets():
    assert next_generation(0, now=NOW) == int(NOW * 1000)
    assert next_generation(int(NOW * 1000) + 50, now=NOW) == int(NOW * 1000) + 51
    # A Redis without persistence restarted: the counter is gone, time is not.
    assert next_generation(0, now=NOW + 1) > next_generation(int(NOW * 1000), now=NOW)


def test_bus_urls():
    assert split_channel("redis://h:6379/0?channel=fleet_a") == ("redis://h:6379/0", "fleet_a")
    assert split_channel("sqlite:////tmp/bus.db") == ("sqlite:////tmp/bus.db", "sqla_rebalance")
    assert split_channel("postgresql://h/db?sslmode=require&channel=x") == (
        "postgresql://h/db?sslmode=require",
        "x",
    )
    assert redact("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("postgresql://app:pw@h/db") == "postgresql://app:***@h/db"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://h:6379/0?password=hunter22", "redis://h:6379/0?password=***"),
        ("redis://u@h/0?db=1&Password=hunter22&x=1", "redis://u@h/0?db=1&Password=***&x=1"),
        ("postgresql://u:p%40ss@h/db?sslpassword=k3y", "postgresql://u:***@h/db?sslpassword=***"),
        ("redis://user:pa@ss:wd@h:1/0", "redis://user:***@h:1/0"),
        ("host=h user=u password=hunter22 dbname=d", "host=h user=u password=*** dbname=d"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("sqlite:////tmp/bus.db", "sqlite:////tmp/bus.db"),
    ],
)
def test_passwords_are_masked_in_urls_and_messages(url, shown):
    assert redact(url) == shown
    assert redact(url, url) == shown
    bus = open_bus(url) if "://" in url and not url.startswith("host") else None
    if bus is not None:
        assert "hunter22" not in bus.display_url and "hunter22" not in repr(bus)
        assert bus.display_url == shown
    # A driver's message quoting the password (raw or percent-decoded) is masked too.
    if "hunter22" in url:
        assert "hunter22" not in redact("auth failed for hunter22 at " + url, url)
    assert "p@ss" not in redact("FATAL: password p@ss rejected", "postgresql://u:p%40ss@h/db")
    assert open_bus("sqlite:////tmp/x.db?channel=c1").channel == "c1"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("amqp://h/", "unknown bus scheme"),
        ("nonsense", "must be a bus URL"),
        ("sqlite://", "needs a file"),
        ("sqlite:///:memory:", "needs a file"),
        ("redis://h/0?channel=bad-name", "channel must be"),
        ("redis://h/0?channel=", "channel must be"),
    ],
)
def test_bad_bus_urls_fail_clearly(url, message):
    with pytest.raises(ConfigurationError, match=message):
        open_bus(url)
