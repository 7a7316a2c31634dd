"""Bus test scenarios shared by the transports (Redis, PostgreSQL): real servers, real tools."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import create_engine

from sqla_rebalance import RebalancingQueuePool, signals
from sqla_rebalance.bus import send_command
from sqla_rebalance.bus.message import encode, new_command

from .helpers import wait_for as poll


def raw_messages(pool: str, secret: bytes) -> dict[str, bytes]:
    """One message of every kind a listener must refuse (``secret``: the pool's own)."""
    now = time.time()

    def cmd(**kw):
        base = dataclasses.replace(new_command("recycle", pool=pool), **kw)
        # A generation as a publisher would give it: its issue time in ms, and above every
        # generation applied so far (the commands of the test were sent just before).
        return dataclasses.replace(base, gen=int(base.issued_at * 1000) + 1000)

    good = json.loads(encode(cmd(), secret))
    unsigned = {k: v for k, v in good.items() if k != "mac"}
    tampered = {**good, "spread": 99.0}
    return {
        "malformed": b"this is not json",
        "oversized": json.dumps({**good, "nonce": "x" * 2000}).encode(),
        "version": json.dumps({**good, "v": 99}).encode(),
        "unsigned": json.dumps(unsigned).encode(),
        "bad_signature": json.dumps(tampered).encode(),
        "stale": encode(cmd(issued_at=now - 3600), secret),
        "unknown_action": encode(cmd(action="shutdown"), secret),
    }


def check_bad_messages_are_rejected(
    bus: str,
    secret: str,
    tmp_path: Path,
    publish_raw: Callable[[bytes], None],
    logged_first: Callable[[], bytes],
) -> None:
    """Every kind of bad message, published raw with the server's own tool: each is
    rejected and counted once, and none recycles anything.

    ``publish_raw`` sends bytes on the bus's wake-up channel (redis-cli, psql);
    ``logged_first`` returns the first command in the durable log, re-published as a
    replay.
    """
    engine = create_engine(
        f"sqlite:///{tmp_path}/app.db",
        poolclass=RebalancingQueuePool,
        min_size=2,
        broadcast=bus,
        broadcast_secret=secret,
        min_recycle_interval=0,
    )
    pool = engine.pool
    recycles: list[str] = []

    def on_recycle(sender, **kw):
        recycles.append(kw["reason"])

    signals.recycle_requested.connect(on_recycle, pool)
    try:
        poll(lambda: pool.listener is not None and pool.listener.connected)
        poll(lambda: pool.stats().idle == 2)
        first = send_command(bus, "recycle", secret=secret)
        poll(lambda: pool.stats().bus.generation_applied == first.generation)
        messages = raw_messages("*", secret.encode())
        # A replay: the exact bytes of the command already applied, published again.
        messages["replayed"] = logged_first()
        for payload in messages.values():
            publish_raw(payload)
        poll(lambda: pool.stats().bus.messages_rejected == len(messages))
        last = send_command(bus, "rebalance", secret=secret)
        poll(lambda: pool.stats().bus.generation_applied == last.generation)
        stats = pool.stats()
        assert stats.bus.rejected == dict.fromkeys(messages, 1)
        assert stats.bus.messages_accepted == 2
        assert recycles == ["signal"]  # the first command only
        assert stats.retirements["signal"] == 2
    finally:
        signals.recycle_requested.disconnect(on_recycle)
        engine.dispose()
