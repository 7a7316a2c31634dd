"""Property-based tests (hypothesis) of everything the bus reads from outside: messages,
durable-log entries, heartbeats and the CLI's numbers, over the whole input space.

- **Codec** (``message.decode``): for arbitrary bytes, text, JSON values (huge integers,
  floats with inf/nan, nesting) and command-shaped objects whose every field is an
  arbitrary JSON value -- signed with the right secret (so that field validation is
  reached), unsigned, or signed for another channel -- ``decode`` raises nothing but
  ``Rejected`` with a known kind; whatever it accepts is within every documented bound;
  every valid command round-trips, on its own channel only.
- **Log entries** (``Listener._catch_up`` and the transports' readers): the listener's
  state after reading a log (generation applied, cursor, history, each pool's settled
  generation, the heartbeat that ``--wait`` reads, the commands applied) is the same
  with or without any amount of unverified junk mixed in at any position (huge, negative,
  +inf, duplicate); the position readers (``log_generation``) and ``next_generation``
  stay in range for any stored value; a real SQLite log holding rows of any type never
  breaks a read or a publish.
- **Heartbeats** (``parse_heartbeat``, ``read_fleet``, ``wait_for``, the report lines):
  junk of any shape is skipped and counted, never raised; what is accepted can be
  printed and waited on.
- **Redis replies** (``read_acknowledgements``, ``heartbeat_written``): any set members,
  heartbeat values, counts and error replies; a WRONGTYPE key means "no acknowledgements",
  only a failed heartbeat write costs the heartbeat, a count is kept only when sane.
- **CLI numbers**: ``--wait``/``--spread`` given any text are either a finite number in
  range or a usage error (exit 2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import math
import sqlite3
import tempfile
import types
import weakref
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sqla_rebalance.bus import (
    Bus,
    ProcessStatus,
    WaitResult,
    open_bus,
    parse_heartbeat,
    read_fleet,
    send_command,
    wait_for,
)
from sqla_rebalance.bus import listener as listener_mod
from sqla_rebalance.bus.base import (
    MAX_GENERATION,
    log_generation,
    next_generation,
    publish_ceiling,
    read_ceiling,
)
from sqla_rebalance.bus.message import (
    ACTIONS,
    MAX_BYTES,
    MAX_SPREAD,
    REJECTION_KINDS,
    Command,
    Rejected,
    decode,
    encode,
)
from sqla_rebalance.bus.report import process_lines, sent_record, wait_lines
from sqla_rebalance.bus.sqlite_bus import SQLiteBus

from .helpers import FakeClock

SECRET = b"property secret"
CHANNEL = "sqla_rebalance"
NOW = 1_800_000_000.0
NOW_MS = int(NOW * 1000)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ------------------------------------------------------------------------

#: Integers of every size, with the edges that broke things spelled out.
integers = st.one_of(
    st.integers(),
    st.sampled_from(
        [0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, 10**400, -(10**400)]
    ),
)
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.inf, -math.inf, math.nan, 1e15, 1e308, -0.0, 5e-324]),
)
scalars = st.one_of(st.none(), st.booleans(), integers, floats, st.text(max_size=40))
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=10), children, max_size=4),
    ),
    max_leaves=12,
)
FIELDS = ("v", "gen", "action", "pool", "host", "spread", "issued_at", "nonce")


@st.composite
def valid_commands(draw: st.DrawFn) -> Command:
    action = draw(st.sampled_from(ACTIONS))
    host = draw(st.none() | st.text(min_size=1, max_size=30)) if action == "recycle" else None
    return Command(
        action=action,
        gen=draw(st.integers(1, NOW_MS + 86_400_000)),
        pool=draw(st.text(min_size=1, max_size=30)),
        host=host,
        spread=draw(st.floats(0.0, MAX_SPREAD)),
        issued_at=draw(st.floats(NOW - 100, NOW + 100)),
        nonce=draw(st.text(max_size=64)),
    )


def sign(obj: dict[str, Any], secret: bytes = SECRET, channel: str = CHANNEL) -> bytes:
    """The wire format of docs/commands.md, written independently of ``encode``."""
    body = {k: v for k, v in obj.items() if k != "mac"}
    canonical = json.dumps({**body, "channel": channel}, sort_keys=True, separators=(",", ":"))
    mac = hmac.new(secret, canonical.encode(), hashlib.sha256).hexdigest()
    return json.dumps({**body, "mac": mac}).encode()


@st.composite
def command_shaped(draw: st.DrawFn) -> dict[str, Any]:
    """A valid command's fields with some replaced by arbitrary JSON (or removed, or extra)."""
    obj = dict(Command(**dataclasses.asdict(draw(valid_commands()))).fields())
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        if draw(st.booleans()):
            obj[key] = draw(json_values)
        else:
            obj.pop(key)
    if draw(st.integers(0, 9)) == 0:
        obj[draw(st.text(max_size=8))] = draw(json_values)
    return obj


def decode_or_kind(raw: bytes | str, secret: bytes | None = SECRET, **kw: Any) -> Any:
    """``decode``'s result, or the kind of its rejection; anything else fails the test."""
    kw.setdefault("channel", CHANNEL)
    kw.setdefault("max_age", None)
    kw.setdefault("now", NOW)
    try:
        return decode(raw, secret, **kw)
    except Rejected as rejected:
        kind = rejected.kind
    assert kind in REJECTION_KINDS
    return kind


def check_accepted(command: Command) -> None:
    """Every bound a receiver relies on holds for an accepted command."""
    assert isinstance(command.gen, int) and 0 < command.gen <= read_ceiling(NOW)
    assert command.gen <= MAX_GENERATION
    assert command.action in ACTIONS
    assert isinstance(command.pool, str) and command.pool
    assert command.host is None or (isinstance(command.host, str) and command.action == "recycle")
    assert math.isfinite(command.spread) and 0.0 <= command.spread <= MAX_SPREAD
    assert math.isfinite(command.issued_at)
    assert isinstance(command.nonce, str) and len(command.nonce) <= 64


# -- the codec ---------------------------------------------------------------------------


@SETTINGS
@given(raw=st.binary(max_size=2 * MAX_BYTES), secret=st.sampled_from([SECRET, None]))
def test_decode_of_any_bytes_only_rejects(raw, secret):
    result = decode_or_kind(raw, secret)
    if isinstance(result, Command):
        check_accepted(result)


@SETTINGS
@given(raw=st.text(max_size=2 * MAX_BYTES), secret=st.sampled_from([SECRET, None]))
def test_decode_of_any_text_only_rejects(raw, secret):
    result = decode_or_kind(raw, secret)
    if isinstance(result, Command):
        check_accepted(result)


@SETTINGS
@given(value=json_values, secret=st.sampled_from([SECRET, None]), max_age=st.none() | floats)
def test_decode_of_any_json_value_only_rejects(value, secret, max_age):
    raw = json.dumps(value).encode()
    assume(len(raw) <= MAX_BYTES)
    result = decode_or_kind(raw, secret, max_age=None if max_age is None else abs(max_age))
    assert not isinstance(result, Command)  # nothing of that shape is a command


@SETTINGS
@given(obj=command_shaped(), now=st.sampled_from([NOW, 0.0, 1e300]), max_age=st.none() | floats)
def test_decode_of_any_command_shaped_object_only_rejects(obj, now, max_age):
    """Signed with the right secret, so the field checks are reached whatever they hold:
    huge integers (issued_at = 10**400 raised OverflowError), inf/nan, wrong types."""
    if max_age is not None and math.isnan(max_age):
        max_age = None
    for raw, secret in ((sign(obj), SECRET), (json.dumps(obj).encode(), None)):
        result = decode_or_kind(raw, secret, now=now, max_age=max_age)
        if isinstance(result, Command):
            assert result.gen <= read_ceiling(now)
            assert math.isfinite(result.spread) and math.isfinite(result.issued_at)
            assert result.action in ACTIONS


@SETTINGS
@given(command=valid_commands(), channel=st.from_regex(r"[a-z_][a-z0-9_]{0,20}", fullmatch=True))
def test_every_command_round_trips_on_its_own_channel_only(command, channel):
    raw = encode(command, SECRET, channel=channel)
    assert len(raw) <= MAX_BYTES or pytest.fail("encode let an oversized command through")
    assert decode(raw, SECRET, channel=channel, max_age=None, now=NOW) == command
    assert decode_or_kind(sign(json.loads(raw), channel=channel), channel=channel) == command
    other = channel + "x"
    assert decode_or_kind(raw, channel=other) == "bad_signature"
    assert decode_or_kind(raw, secret=b"another secret", channel=channel) == "bad_signature"


@SETTINGS
@given(command=valid_commands(), key=st.sampled_from(FIELDS), value=json_values)
def test_a_changed_field_never_passes_as_signed(command, key, value):
    obj = json.loads(encode(command, SECRET, channel=CHANNEL))
    assume(obj.get(key) != value or type(obj.get(key)) is not type(value))
    obj[key] = value
    assert not isinstance(decode_or_kind(json.dumps(obj)), Command)


# -- durable-log entries -------------------------------------------------------------------


class FakePool:
    def __init__(self, name: str) -> None:
        self.pool_name = name
        self.config = types.SimpleNamespace(min_recycle_interval=0.0)
        self.applied: list[tuple[str, int]] = []

    def _apply_command(self, command: Command, cutoff: float) -> None:
        self.applied.append((command.action, command.gen))

    def stats(self) -> Any:
        return types.SimpleNamespace(
            connects=0, retirements={}, open=0, idle=0, in_use=0, pool_size=0,
            checkouts_waited=0, hosts={},
        )  # fmt: skip


class FakeLog:
    """A durable log as the transports return it: ``(position, raw)`` above a position."""

    def __init__(self, entries: list[tuple[int, bytes]]) -> None:
        self.entries = sorted(entries, key=lambda e: e[0])

    def since(self, gen: int, limit: int = 1000) -> list[tuple[int, bytes]]:
        return [(g, raw) for g, raw in self.entries if g > gen][:limit]


@st.composite
def verified_entries(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    """Genuine commands, as a publisher logs them: growing generations, recent issue times
    (some from before the listener started: history)."""
    gens = sorted(draw(st.lists(st.integers(NOW_MS - 7_200_000, NOW_MS), max_size=8, unique=True)))
    out = []
    for gen in gens:
        cmd = Command(
            action=draw(st.sampled_from(ACTIONS[1:])),
            gen=gen,
            pool=draw(st.sampled_from(["orders", "billing", "*"])),
            issued_at=gen / 1000 + draw(st.floats(-2, 2)),
        )
        out.append((gen, encode(cmd, SECRET, channel=CHANNEL)))
    return out


junk_positions = st.one_of(
    st.integers(NOW_MS - 7_200_000, NOW_MS + 2 * 86_400_000),
    st.sampled_from([1, 2**63 - 1, 10**15, 10**30, NOW_MS + 3_600_000]),
)


@st.composite
def junk_entries(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    """What a writer without the secret can put in the log, at any position."""
    out = []
    for _ in range(draw(st.integers(0, 8))):
        position = draw(junk_positions)
        kind = draw(st.integers(0, 5))
        if kind == 0:
            raw = draw(st.binary(max_size=200))
        elif kind == 1:
            raw = json.dumps(draw(json_values)).encode()
        elif kind == 2:  # a well-formed command, wrong secret, any generation
            obj = {**json.loads(encode(draw(valid_commands()), SECRET, channel=CHANNEL))}
            obj["gen"] = draw(st.integers(1, 2**63))
            raw = sign(obj, secret=b"wrong")
        elif kind == 3:  # signed for another channel
            raw = encode(draw(valid_commands()), SECRET, channel="elsewhere")
        elif kind == 4:  # unsigned
            raw = json.dumps(dict(draw(valid_commands()).fields())).encode()
        else:  # command-shaped junk, unsigned
            raw = json.dumps(draw(command_shaped())).encode()
        out.append((position, raw))
    return out


def read_log(entries: list[tuple[int, bytes]], tmp: Path) -> dict[str, Any]:
    """A listener (started at NOW - 1 h, fake clock at NOW) reading ``entries``."""
    clock = FakeClock()
    clock.advance(NOW - 3600 - clock.now)
    real_time = listener_mod.time
    listener_mod.time = types.SimpleNamespace(  # type: ignore[assignment]
        time=clock, monotonic=clock, sleep=lambda s: None
    )
    try:
        listener = listener_mod.Listener(
            SQLiteBus(f"sqlite:///{tmp}/bus.db", CHANNEL), SECRET, ("k", "")
        )
        pools = [FakePool("orders"), FakePool("billing")]
        for pool in pools:
            listener._members[id(pool)] = listener_mod._Member(weakref.ref(pool))
        clock.advance(3600)
        log = FakeLog(entries)
        listener._catch_up(log)
        listener._catch_up(log)  # a reconnect: read again
        heartbeat = parse_heartbeat(json.dumps(listener.status()).encode(), clock.now)
        return {
            "applied": listener.applied,
            "cursor": listener._log_cursor,
            "history": listener._history,
            "settled": [m.settled for m in listener._members.values()],
            "commands": [p.applied for p in pools],
            "accepted": listener.accepted,
            "heartbeat_generation": heartbeat.generation,
            "pool_generations": [p["generation"] for p in heartbeat.pools],
            "wait_answers": {
                gen: heartbeat.has_applied(gen, "*")
                for gen in (1, NOW_MS - 3_600_000, NOW_MS, NOW_MS + 1, 2**63 - 1)
            },
        }
    finally:
        listener_mod.time = real_time  # type: ignore[assignment]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(good=verified_entries(), junk=junk_entries())
def test_unverified_log_entries_move_nothing(good, junk):
    """The state after reading a log with junk mixed in equals the state after reading
    the genuine entries alone: generation, cursor, history, each pool's settled
    generation, the heartbeat that --wait reads (and its answers), the commands applied."""
    taken = {g for g, _ in good}
    junk = [(p, raw) for p, raw in junk if p not in taken]  # one entry per position
    with tempfile.TemporaryDirectory() as tmp:
        clean = read_log(good, Path(tmp))
        mixed = read_log(good + junk, Path(tmp))
    assert mixed == clean
    top = max((g for g, _ in good), default=0)
    assert max(clean["applied"], clean["cursor"], clean["history"], *clean["settled"]) <= top


@SETTINGS
@given(value=st.one_of(integers, floats, st.none(), st.text(max_size=5), st.binary(max_size=5)))
def test_log_positions_are_in_range_or_none(value):
    floor, ceiling = NOW_MS - 10, read_ceiling(NOW)
    gen = log_generation(value, floor, ceiling)
    assert gen is None or (isinstance(gen, int) and floor < gen <= ceiling)


@SETTINGS
@given(last=integers, now=st.floats(0, 4e9))
def test_the_next_generation_is_never_poisoned(last, now):
    gen = next_generation(last, now=now)
    assert int(now * 1000) <= gen <= max(publish_ceiling(now) + 1, int(now * 1000))
    assert gen <= MAX_GENERATION
    if 0 <= last < publish_ceiling(now):
        assert gen > last


sqlite_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=10),
    st.binary(max_size=10),
    st.none(),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(sqlite_values, sqlite_values), max_size=6))
def test_a_real_sqlite_log_of_any_rows_never_breaks_reads_or_publishes(rows):
    with tempfile.TemporaryDirectory() as tmp:
        bus = open_bus(f"sqlite:///{tmp}/bus.db")
        assert isinstance(bus, SQLiteBus)
        conn = bus.connect()
        try:
            for gen, message in rows:
                # NULLs and duplicates: the table refuses them itself.
                with contextlib.suppress(sqlite3.IntegrityError):
                    conn.execute(
                        "INSERT INTO sqla_rebalance_commands (channel, gen, message)"
                        " VALUES (?, ?, ?)",
                        (CHANNEL, gen, message),
                    )
        finally:
            conn.close()
        sub = bus.subscribe()
        try:
            for position, raw in sub.since(0):
                assert isinstance(position, int) and 0 < position <= read_ceiling()
                assert isinstance(raw, bytes)
            assert 0 <= sub.generation() <= publish_ceiling()
            sent = send_command(bus, "rebalance", secret=SECRET)
            assert sent.generation <= publish_ceiling()
            assert sub.get(0.5) is not None or sent.generation <= sub._seen
        finally:
            sub.close()


# -- heartbeats ----------------------------------------------------------------------------

pool_entries = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"pool": st.sampled_from(["orders", "billing"])},
        optional={
            "generation": st.one_of(integers, floats, st.text(max_size=3)),
            "open": json_values,
            "idle": st.integers(0, 10),
            "in_use": json_values,
            "commands_pending": json_values,
            "churn_per_min": json_values,
            "retirements": json_values,
            "hosts": st.one_of(
                json_values, st.dictionaries(st.text(max_size=5), json_values, max_size=3)
            ),
        },
    ),
)
heartbeat_objects = st.fixed_dictionaries(
    {},
    optional={
        "process": st.one_of(st.text(max_size=20), json_values),
        "hostname": json_values,
        "pid": st.one_of(integers, json_values),
        "generation": st.one_of(integers, floats, json_values),
        "ts": st.one_of(floats, json_values),
        "pools": st.one_of(json_values, st.lists(pool_entries, max_size=3)),
    },
)


def use_heartbeat(proc: ProcessStatus) -> None:
    """Everything status and --wait do with a heartbeat."""
    proc.has_pool("*")
    proc.has_pool("orders")
    for gen in (0, 1, 2**63 - 1):
        proc.has_applied(gen, "*")
        proc.has_applied(gen, "orders")
    process_lines(proc)
    result = WaitResult(1, [proc], [proc], [proc], invalid=1)
    wait_lines(result, "orders")
    json.dumps(proc.raw)


@SETTINGS
@given(raw=st.one_of(st.binary(max_size=300), heartbeat_objects.map(json.dumps)))
def test_any_heartbeat_is_parsed_or_refused_with_value_error(raw):
    try:
        proc = parse_heartbeat(raw, NOW)
    except ValueError:
        return
    assert isinstance(proc.generation, int) and 0 <= proc.generation <= MAX_GENERATION
    assert math.isfinite(proc.age) and proc.age >= 0
    use_heartbeat(proc)


class FakeBus(Bus):
    """A bus that answers heartbeats with whatever it is given."""

    def __init__(self, heartbeats: list[bytes]) -> None:
        super().__init__("fake://", CHANNEL)
        self._heartbeats = heartbeats

    def publish(self, build: Any) -> tuple[int, int | None]:
        raise NotImplementedError

    def generation(self) -> int:
        return 0

    def heartbeats(self) -> list[bytes]:
        return self._heartbeats

    def subscribe(self) -> Any:
        raise NotImplementedError


@SETTINGS
@given(
    junk=st.lists(st.one_of(st.binary(max_size=100), heartbeat_objects.map(json.dumps)), max_size=5)
)
def test_fleet_status_and_wait_never_crash_on_junk(junk):
    real = json.dumps(
        {"process": "real:1:a.1", "pid": 1, "generation": 5, "ts": NOW, "pools": [
            {"pool": "orders", "generation": 5, "open": 1, "idle": 1, "in_use": 0,
             "hosts": {"h:1": {"open": 1, "idle": 1, "in_use": 0, "health": "up",
                               "role": None}}}]}
    ).encode()  # fmt: skip
    raws = [j.encode() if isinstance(j, str) else j for j in junk]
    bus = FakeBus([real, *raws])
    fleet = read_fleet(bus)
    assert "real:1:a.1" in [p.process for p in fleet.processes]
    assert len(fleet.processes) + fleet.invalid == len(raws) + 1
    result = wait_for(bus, 5, pool="orders", timeout=0)
    assert result.invalid == fleet.invalid
    for proc in fleet.processes:
        use_heartbeat(proc)
    wait_lines(result, "orders")
    sent = types.SimpleNamespace(generation=5, command=Command("recycle"), receivers=None)
    json.dumps(sent_record(sent, result))  # type: ignore[arg-type]


# -- the Redis transport's replies --------------------------------------------------------

#: What a key may hold when anybody who can write the bus wrote it: any bytes.
redis_members = st.binary(max_size=12)


class FakeRedis:
    """The replies ``read_acknowledgements`` asks for, drawn by hypothesis."""

    def __init__(self, missing: Any, applied: Any, values: dict[bytes, bytes | None]) -> None:
        self._missing, self._applied, self._values = missing, applied, values
        self.removed: list[bytes] = []

    def sdiff(self, index: str, ack: str) -> Any:
        if isinstance(self._missing, Exception):
            raise self._missing
        return self._missing

    def scard(self, key: str) -> Any:
        if isinstance(self._applied, Exception):
            raise self._applied
        return self._applied

    def mget(self, keys: list[bytes]) -> list[bytes | None]:
        return [self._values.get(k.split(b":hb:", 1)[1]) for k in keys]

    def srem(self, index: str, *members: bytes) -> int:
        self.removed.extend(members)
        return len(members)


@SETTINGS
@given(
    members=st.lists(redis_members, max_size=8, unique=True),
    container=st.sampled_from([list, set, tuple]),
    beats=st.data(),
    applied=st.one_of(integers, st.booleans(), st.none(), st.binary(max_size=6), floats),
    error=st.sampled_from([None, "sdiff", "scard"]),
)
def test_redis_acknowledgement_reads_accept_any_reply(members, container, beats, applied, error):
    """``read_acknowledgements`` over any set members, heartbeat values and counts: a
    WRONGTYPE reply means "no acknowledgements" (None); otherwise the count is in range,
    exactly the members whose heartbeat expired are reported gone and removed from the
    index, and every heartbeat found is returned as bytes for ``parse_heartbeat``."""
    import redis

    from sqla_rebalance.bus.redis_bus import _MAX_COUNT, read_acknowledgements

    values = {m: beats.draw(st.none() | st.binary(max_size=20)) for m in members}
    wrongtype = redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind")
    client = FakeRedis(
        wrongtype if error == "sdiff" else container(members),
        wrongtype if error == "scard" else applied,
        values,
    )
    acks = read_acknowledgements(client, "idx", "sqla_rebalance:hb:", ("a", "h"))
    if error is not None:
        assert acks is None and client.removed == []
        return
    assert acks is not None
    sane = isinstance(applied, int) and not isinstance(applied, bool) and 0 <= applied <= _MAX_COUNT
    assert acks.applied == (applied if sane else 0)
    gone = sorted(m for m in members if values[m] is None)
    assert sorted(client.removed) == gone
    assert sorted(acks.gone) == sorted(m.decode("utf-8", "replace") for m in gone)
    assert sorted(acks.heartbeats) == sorted(v for v in values.values() if v is not None)


class RecordingSubscription:
    """The ``Subscription`` methods ``heartbeat_written`` calls, recorded."""

    def __init__(self) -> None:
        from sqla_rebalance.bus.base import Subscription

        self.fleet_size: int | None = None
        self.heartbeats_off = self.acks_off = False
        self._note = Subscription.note_fleet_size

    def heartbeats_refused(self, bus: Any, err: Exception) -> None:
        self.heartbeats_off = True

    def acks_refused(self, bus: Any, err: Exception) -> None:
        self.acks_off = True

    def note_fleet_size(self, value: object) -> None:
        self._note(self, value)  # type: ignore[arg-type]


def _redis_errors() -> st.SearchStrategy[Exception]:
    import redis

    return st.sampled_from(
        [
            redis.exceptions.NoPermissionError("NOPERM no permissions to run the 'set' command"),
            redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"),
            redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'"),
        ]
    )


@SETTINGS
@given(
    written=st.lists(st.one_of(st.just(True), st.integers(0, 1), _redis_errors()), min_size=2,
                     max_size=2),
    acks=st.lists(st.one_of(st.integers(0, 1), _redis_errors()), max_size=4),
    scard=st.none() | st.one_of(integers, st.booleans(), st.binary(max_size=6), _redis_errors()),
)  # fmt: skip
def test_redis_heartbeat_replies_only_ever_cost_what_failed(written, acks, scard):
    """``heartbeat_written`` over any replies: only a refused heartbeat write stops
    heartbeats, and only another failure of the heartbeat's own writes raises (the
    connection is in doubt); a refused acknowledgement stops acknowledgements, any other
    failed one is lost alone; the fleet size is kept only when it is a sane count."""
    import redis

    from sqla_rebalance.bus.base import MAX_FLEET_HINT
    from sqla_rebalance.bus.redis_bus import heartbeat_written

    replies: list[Any] = [*written, *acks] + ([] if scard is None else [scard])
    sub = RecordingSubscription()
    first_error = next((r for r in written if isinstance(r, Exception)), None)
    if first_error is not None and not isinstance(first_error, redis.exceptions.NoPermissionError):
        with pytest.raises(type(first_error)) as raised:
            heartbeat_written(sub, None, replies, len(acks))  # type: ignore[arg-type]
        assert raised.value is first_error
        return
    heartbeat_written(sub, None, replies, len(acks))  # type: ignore[arg-type]
    if isinstance(first_error, redis.exceptions.NoPermissionError):
        assert sub.heartbeats_off and not sub.acks_off and sub.fleet_size is None
        return
    assert first_error is None and not sub.heartbeats_off
    assert sub.acks_off == any(isinstance(r, redis.exceptions.NoPermissionError) for r in acks)
    sane = isinstance(scard, int) and not isinstance(scard, bool) and 0 <= scard <= MAX_FLEET_HINT
    assert sub.fleet_size == (scard if sane else None)


# -- the CLI's numbers ---------------------------------------------------------------------


@SETTINGS
@given(
    text=st.one_of(
        floats.map(repr),
        integers.map(str),
        st.text(max_size=12),
        st.sampled_from(["nan", "-nan", "inf", "-inf", "1e400", "-0", "0x10", " 5 ", "1_000"]),
    ),
    option=st.sampled_from(["--wait", "--spread"]),
)
def test_cli_numbers_are_finite_and_in_range_or_a_usage_error(text, option):
    from sqla_rebalance.cli import _parser

    parser = _parser()
    try:
        args = parser.parse_args(["recycle", option, text])
    except SystemExit as exit_:
        code = exit_.code
    else:
        code = None
    if code is not None:
        assert code == 2
        return
    value = args.wait if option == "--wait" else args.spread
    assert math.isfinite(value) and 0 <= value <= 86400
