#!/usr/bin/env python3
"""What a fleet of N processes costs the Redis bus, and what ``status`` and ``--wait`` cost.

One real Redis (``sqla_rebalance.devservers``). One real process of this package
(an engine with ``broadcast=``) writes its real heartbeat; its payload is copied
to ``N - 1`` synthetic members (the same keys, index and TTL a listener writes),
so every figure is measured on the real server with the real data shapes:

- **heartbeat load**: server CPU and commands per second for the fleet's
  steady heartbeats (one round trip per process every 5 s), written at that
  rate for a window;
- **status**: one full read of the fleet (``fleet_status``): latency and bytes;
- **--wait look**: one look of ``wait_for`` with 99 % of the fleet having
  acknowledged the command, from the acknowledgements (``SDIFF`` + ``MGET`` of
  the rest) versus the full read it did before;
- **acknowledgement burst**: the window the listeners spread their
  acknowledgements over after a command (``fleet / 2,000`` s, at most 5 s), and
  the peak write rate that gives.

With ``--real N`` (default 200; 0 skips it) it first runs **N real member
processes**, each an engine (SQLite, ``pool_size=min_size=2``) with
``broadcast=`` on the Redis bus, and measures: Redis connections held per
process, server commands per second while idle, ``status`` latency and bytes,
then one ``recycle`` (``send_command``) followed by ``wait_for``: time until
every process applied it, the looks it made and the heartbeats each read, and
the command rate the acknowledgements cause on the server (sampled from
``INFO`` every 50 ms).

Usage::

    .venv/bin/python benchmarks/fleet_scale.py [--real 200] [--fleet 1000 10000] [--check]

``--check`` exits 1 if a look from the acknowledgements reads more than the
pending processes' heartbeats, or is not smaller than the full read; with real
members, if a process holds more than one Redis connection, or the wait does
not end complete. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from typing import Any

import redis

SECRET = "fleet-scale-secret"


def real_payload(url: str, tmp: str) -> tuple[str, bytes]:
    """The heartbeat of a real engine on the bus (channel, payload)."""
    from sqlalchemy import create_engine, text

    from sqla_rebalance import RebalancingQueuePool

    bus = f"{url}?channel=fleet"
    engine = create_engine(
        f"sqlite:///{tmp}/app.db",
        poolclass=RebalancingQueuePool,
        pool_size=10,
        broadcast=bus,
        broadcast_secret=SECRET,
        pool_name="orders",
    )
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 30
    while not client.scard("fleet:hb"):
        if time.monotonic() > deadline:
            raise SystemExit("no heartbeat in 30 s")
        time.sleep(0.05)
    (name,) = (m if isinstance(m, bytes) else m.encode() for m in client.smembers("fleet:hb"))
    payload = client.get(b"fleet:hb:" + name)
    assert isinstance(payload, bytes)
    engine.dispose()
    client.delete("fleet:hb", b"fleet:hb:" + name)
    client.close()
    return "fleet", payload


def server_cpu(client: redis.Redis) -> float:
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def commands(client: redis.Redis) -> int:
    info: dict[str, Any] = client.info("stats")
    return int(info["total_commands_processed"])


def heartbeat_round(client: redis.Redis, channel: str, names: list[str], payload: bytes) -> None:
    """What each listener sends every 5 s: SET (TTL 15 s) + SADD + SCARD, one round trip."""
    for i in range(0, len(names), 500):
        pipe = client.pipeline(transaction=False)
        for name in names[i : i + 500]:
            pipe.set(f"{channel}:hb:{name}", payload, px=15000)
            pipe.sadd(f"{channel}:hb", name)
            pipe.scard(f"{channel}:hb")
        pipe.execute()


def measure(url: str, channel: str, payload: bytes, fleet: int) -> dict[str, float]:
    from sqla_rebalance.bus import fleet_status, open_bus
    from sqla_rebalance.bus.listener import ACK_RATE, ACK_WINDOW_MAX
    from sqla_rebalance.bus.redis_bus import ack_keys

    client = redis.Redis.from_url(url)
    client.flushdb()
    names = [f"{100000 + i}.1" for i in range(fleet)]
    # Steady heartbeats: the fleet's rate (fleet / 5 per second) for 5 s.
    cpu0, cmd0, t0 = server_cpu(client), commands(client), time.monotonic()
    heartbeat_round(client, channel, names, payload)
    elapsed = time.monotonic() - t0
    cpu1, cmd1 = server_cpu(client), commands(client)
    # One round per 5 s: the server's cost per second at that rate.
    hb_cpu_per_s = (cpu1 - cpu0) / 5.0
    hb_cmds_per_s = (cmd1 - cmd0) / 5.0
    bus = open_bus(f"{url}?channel={channel}")
    # status: one full read.
    times = []
    for _ in range(5):
        t = time.perf_counter()
        procs = fleet_status(bus)
        times.append(time.perf_counter() - t)
    assert len(procs) == fleet, (len(procs), fleet)
    status_bytes = fleet * len(payload)
    # --wait: 99 % acknowledged a command.
    gen = 1
    ack, hit = ack_keys(channel, gen, "orders")
    pending = max(1, fleet // 100)
    for i in range(0, fleet - pending, 1000):
        chunk = names[i : min(i + 1000, fleet - pending)]
        client.sadd(ack, *chunk)
        client.sadd(hit, *chunk)
    look_times, looked = [], 0
    for _ in range(5):
        t = time.perf_counter()
        view = bus.acknowledgements(gen, "orders")
        look_times.append(time.perf_counter() - t)
        assert view is not None
        looked = len(view.heartbeats)
        acked = view.applied
    full_times = []
    for _ in range(5):
        t = time.perf_counter()
        bus.heartbeats()
        full_times.append(time.perf_counter() - t)
    bus.close()
    client.close()
    window = min(ACK_WINDOW_MAX, fleet / ACK_RATE)
    return {
        "fleet": fleet,
        "payload": len(payload),
        "hb_write_s": elapsed,
        "hb_cpu_ms_per_s": hb_cpu_per_s * 1000,
        "hb_cmds_per_s": hb_cmds_per_s,
        "status_ms": statistics.median(times) * 1000,
        "status_bytes": status_bytes,
        "look_full_ms": statistics.median(full_times) * 1000,
        "look_full_bytes": status_bytes,
        "look_acks_ms": statistics.median(look_times) * 1000,
        "look_acks_bytes": looked * len(payload) + pending * 12,
        "looked": looked,
        "pending": pending,
        "acked": acked,
        "ack_window_s": window,
        "ack_peak_per_s": fleet / window if window else float(fleet),
    }


MEMBER = "--member"


def member(bus: str, db: str) -> None:
    """One member process: an engine on the bus, idle until stdin closes."""
    from sqlalchemy import create_engine, text

    from sqla_rebalance import RebalancingQueuePool

    engine = create_engine(
        db,
        poolclass=RebalancingQueuePool,
        pool_size=2,
        min_size=2,
        max_overflow=0,
        broadcast=bus,
        broadcast_secret=SECRET,
        pool_name="orders",
        min_recycle_interval=0,
        connect_args={"check_same_thread": False},
    )
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    print("ready", flush=True)
    sys.stdin.read()
    engine.dispose()


def real_fleet(url: str, tmp: str, n: int, failures: list[str]) -> None:
    import subprocess
    import threading

    from sqla_rebalance.bus import fleet_status, open_bus, send_command, wait_for
    from sqla_rebalance.bus.redis_bus import RedisBus

    channel = "fleet_real"
    bus = f"{url}?channel={channel}"
    client = redis.Redis.from_url(url)
    clients0 = int(client.info("clients")["connected_clients"])
    members: list[subprocess.Popen[str]] = []
    t0 = time.monotonic()
    try:
        for i in range(n):
            members.append(
                subprocess.Popen(
                    [sys.executable, __file__, MEMBER, bus, f"sqlite:///{tmp}/m{i}.db"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
            if i % 8 == 7:  # a few at a time: imports take the CPU
                for m in members[-8:]:
                    assert m.stdout is not None
                    if m.stdout.readline().strip() != "ready":
                        raise SystemExit("a member did not start")
        for m in members[len(members) - len(members) % 8 :]:
            assert m.stdout is not None
            m.stdout.readline()
        deadline = time.monotonic() + 120
        while client.scard(f"{channel}:hb") < n:
            if time.monotonic() > deadline:
                raise SystemExit("not every member heartbeats")
            time.sleep(0.2)
        print(f"\n{n} real member processes started in {time.monotonic() - t0:.0f} s")
        time.sleep(6)  # past the fast heartbeats of the start
        held = int(client.info("clients")["connected_clients"]) - clients0 - 1
        cmd0, cpu0, w0 = commands(client), server_cpu(client), time.monotonic()
        time.sleep(10)
        cmd1, cpu1, w1 = commands(client), server_cpu(client), time.monotonic()
        idle_cmds = (cmd1 - cmd0 - 3) / (w1 - w0)  # less our own INFO calls
        idle_cpu = (cpu1 - cpu0) / (w1 - w0) * 1000
        t = time.perf_counter()
        procs = fleet_status(bus)
        status_ms = (time.perf_counter() - t) * 1000
        hb_bytes = sum(len(v) for v in open_bus(bus).heartbeats())
        print(f"Redis connections held: {held} ({held / n:.2f} per process)")
        print(
            f"idle: {idle_cmds:.0f} commands/s ({idle_cmds / n:.2f} per process), "
            f"Redis CPU {idle_cpu:.1f} ms/s"
        )
        print(f"status: {len(procs)} processes, {status_ms:.0f} ms, {hb_bytes / 1024:.0f} KB")
        if held > n:
            failures.append(f"real: {held} Redis connections for {n} processes")
        # One command, and the wait for it: looks, and what each read.
        looks: list[int] = []
        original = RedisBus.acknowledgements

        def spy(self: RedisBus, generation: int, pattern: str) -> Any:
            view = original(self, generation, pattern)
            looks.append(-1 if view is None else len(view.heartbeats))
            return view

        RedisBus.acknowledgements = spy  # type: ignore[method-assign]
        rates: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample() -> None:
            sampler = redis.Redis.from_url(url)
            while not stop.is_set():
                rates.append((time.monotonic(), commands(sampler)))
                stop.wait(0.05)
            sampler.close()

        sampler = threading.Thread(target=sample)
        sampler.start()
        time.sleep(1.0)
        sent_at = time.monotonic()
        sent = send_command(bus, "recycle", pool="orders", secret=SECRET)
        result = wait_for(bus, sent.generation, pool="orders", timeout=60)
        waited = time.monotonic() - sent_at
        time.sleep(3.0)
        stop.set()
        sampler.join()
        RedisBus.acknowledgements = original  # type: ignore[method-assign]
        base = [
            (b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(rates) if b[0] < sent_at
        ]
        after = [
            (b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(rates) if a[0] >= sent_at
        ]
        print(
            f"recycle --wait: complete={result.complete}, {len(result.applied)} applied "
            f"in {waited:.2f} s; {len(looks)} looks, heartbeats read per look: "
            f"first {looks[0] if looks else '-'}, max {max(looks, default=0)}, "
            f"last {looks[-1] if looks else '-'} (a full read: {n})"
        )
        print(
            f"server commands/s in 50 ms samples: before {statistics.median(base):.0f} "
            f"(median), after the command peak {max(after, default=0):.0f}"
        )
        if not result.complete or len(result.applied) != n:
            failures.append(f"real: wait ended with {len(result.applied)}/{n} applied")
    finally:
        for m in members:
            if m.stdin is not None:
                m.stdin.close()
        for m in members:
            try:
                m.wait(timeout=30)
            except subprocess.TimeoutExpired:
                m.kill()
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fleet", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--real", type=int, default=200, help="real member processes (0: none)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a promise breaks")
    args = parser.parse_args()
    import tempfile

    from sqla_rebalance.devservers import RedisServer

    failures: list[str] = []
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        if args.real:
            real_fleet(server.url(), tmp, args.real, failures)
        channel, payload = real_payload(server.url(), tmp)
        print(f"real heartbeat payload: {len(payload)} bytes (one pool)")
        head = (
            "fleet",
            "hb cmds/s",
            "hb CPU ms/s",
            "status ms",
            "status KB",
            "full look ms",
            "acks look ms",
            "acks look KB",
            "ack window s",
            "ack peak/s",
        )
        print(" ".join(f"{h:>12}" for h in head))
        for fleet in args.fleet:
            r = measure(server.url(), channel, payload, fleet)
            print(
                f"{r['fleet']:>12} {r['hb_cmds_per_s']:>12.0f} {r['hb_cpu_ms_per_s']:>12.1f} "
                f"{r['status_ms']:>12.1f} {r['status_bytes'] / 1024:>12.0f} "
                f"{r['look_full_ms']:>12.1f} {r['look_acks_ms']:>12.2f} "
                f"{r['look_acks_bytes'] / 1024:>12.1f} {r['ack_window_s']:>12.2f} "
                f"{r['ack_peak_per_s']:>12.0f}"
            )
            if r["looked"] > r["pending"]:
                failures.append(f"{fleet}: a look read {r['looked']} > {r['pending']} pending")
            if r["acked"] != fleet - r["pending"]:
                failures.append(f"{fleet}: counted {r['acked']} acknowledgements")
            if r["look_acks_bytes"] >= r["look_full_bytes"]:
                failures.append(f"{fleet}: a look from acknowledgements is not smaller")
    for failure in failures:
        print("FAILED:", failure)
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == MEMBER:
        member(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
