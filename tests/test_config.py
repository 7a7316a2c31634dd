"""Arguments: passable through create_engine, validated there, carried over by recreate()."""

from __future__ import annotations

import sys
import threading

import pytest
from sqlalchemy import create_engine, exc, text
from sqlalchemy.pool import QueuePool

from sqla_rebalance import ConfigurationError, RebalancingQueuePool


def make(tmp_path, **kw):
    return create_engine(f"sqlite:///{tmp_path}/t.db", poolclass=RebalancingQueuePool, **kw)


def test_arguments_reach_the_pool_through_create_engine(tmp_path):
    engine = make(
        tmp_path,
        pool_size=7,
        max_overflow=3,
        pool_recycle=600,
        recycle_jitter=0.3,
        min_size=0,
        max_idle=120,
        pool_name="orders",
    )
    cfg = engine.pool.config
    assert (cfg.pool_size, cfg.max_overflow, cfg.recycle, cfg.recycle_jitter) == (7, 3, 600, 0.3)
    assert (cfg.max_idle, cfg.pool_name) == (120, "orders")
    engine.dispose()


def test_defaults_behave_like_queuepool(tmp_path):
    engine = make(tmp_path)
    cfg = engine.pool.config
    assert cfg.recycle == -1 and cfg.recycle_jitter == 0.0
    assert cfg.min_size == 0 and cfg.max_idle is None and cfg.pool_name == "default"


def test_default_jitter_applies_with_pool_recycle(tmp_path):
    assert make(tmp_path, pool_recycle=100).pool.config.recycle_jitter == 0.2


def test_recreate_carries_every_argument_over(tmp_path):
    engine = make(
        tmp_path,
        pool_size=4,
        max_overflow=2,
        pool_recycle=300,
        recycle_jitter=0.1,
        min_size=1,
        max_idle=60,
        pool_name="orders",
        pool_timeout=7,
        pool_use_lifo=True,
    )
    old = engine.pool
    engine.dispose()  # calls pool.recreate()
    new = engine.pool
    assert new is not old and type(new) is RebalancingQueuePool
    assert new.config == old.config
    assert new.timeout() == 7 and new._pool.use_lifo
    with engine.connect() as conn:
        assert conn.execute(text("select 1")).scalar() == 1
    engine.dispose()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"pool_recycle": 100, "recycle_jitter": 1.0}, "recycle_jitter must be in"),
        ({"pool_recycle": 100, "recycle_jitter": -0.1}, "recycle_jitter must be in"),
        ({"recycle_jitter": 0.2}, "recycle_jitter needs pool_recycle"),
        ({"pool_size": -1}, "pool_size must be >= 0"),
        ({"min_size": -1}, "min_size must be >= 0"),
        ({"pool_size": 2, "min_size": 3}, "cannot be larger than pool_size"),
        ({"max_overflow": -2}, "max_overflow must be"),
        ({"max_idle": 0}, "max_idle must be a positive"),
        ({"pool_recycle": 0}, "pool_recycle must be a positive"),
        ({"pool_recycle": 100, "recycle_jitter": "0.2"}, "recycle_jitter must be a number"),
        ({"pool_name": ""}, "pool_name must be a non-empty"),
        ({"pool_timeout": -1}, "pool_timeout must be >= 0"),
    ],
)
def test_bad_configuration_fails_at_create_engine(tmp_path, kw, message):
    with pytest.raises(exc.ArgumentError, match=message) as info:
        make(tmp_path, **kw)
    assert isinstance(info.value, ConfigurationError)


def test_unknown_argument_is_still_rejected_by_sqlalchemy(tmp_path):
    with pytest.raises(TypeError, match="recycle_jiter"):
        make(tmp_path, recycle_jiter=0.2)


# -- issue 11: what QueuePool accepts is accepted; what cannot work is refused here --------


def test_pool_timeout_none_waits_without_a_limit_like_queuepool(pg_url):
    """``pool_timeout=None`` is QueuePool's "wait forever": a checkout of a full pool
    waits until a connection comes back, however long that takes."""
    engine = create_engine(
        pg_url, poolclass=RebalancingQueuePool, pool_size=1, max_overflow=0, pool_timeout=None
    )
    try:
        assert engine.pool.config.timeout is None and engine.pool.timeout() is None
        held = engine.connect()
        got: list[int] = []

        def checkout() -> None:
            with engine.connect() as conn:
                got.append(conn.execute(text("select 1")).scalar_one())

        waiter = threading.Thread(target=checkout)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not got  # still waiting, no TimeoutError
        held.close()
        waiter.join(10)
        assert got == [1]
        engine.dispose()  # recreate() carries None over
        assert engine.pool.config.timeout is None and engine.pool.timeout() is None
    finally:
        engine.dispose()


@pytest.mark.parametrize("max_overflow", [-5, -1, 0, 10, 10**400, None, "ignored"])
def test_max_overflow_is_ignored_with_pool_size_0_as_queuepool_does(tmp_path, max_overflow):
    """``pool_size=0`` is "no limit" in QueuePool, which then never looks at max_overflow."""
    stock = create_engine(
        f"sqlite:///{tmp_path}/q.db", poolclass=QueuePool, pool_size=0, max_overflow=max_overflow
    )
    engine = make(tmp_path, pool_size=0, max_overflow=max_overflow)
    try:
        assert engine.pool.config.max_overflow == stock.pool._max_overflow == -1
        conns = [engine.connect() for _ in range(15)]  # no limit at all
        for conn in conns:
            conn.close()
    finally:
        engine.dispose()
        stock.dispose()


@pytest.mark.parametrize("recycle", [-0.5, -0.999999, -1e-300, -0.0, 0.0])
def test_pool_recycle_between_minus_one_and_zero_is_refused(tmp_path, recycle):
    # QueuePool would take them as "reconnect at every checkout"; -1 is the only "off".
    with pytest.raises(ConfigurationError, match=r"^pool_recycle must be a positive number"):
        make(tmp_path, pool_recycle=recycle)


NUMERIC_ARGUMENTS = {
    # create_engine keyword: the name the message starts with
    "pool_size": "pool_size",
    "max_overflow": "max_overflow",
    "pool_timeout": "pool_timeout",
    "pool_recycle": "pool_recycle",
    "recycle_jitter": "recycle_jitter",
    "min_size": "min_size",
    "max_idle": "max_idle",
    "dns_min_refresh": "dns_min_refresh",
    "dns_max_refresh": "dns_max_refresh",
    "health_check_interval": "health_check_interval",
    "health_check_timeout": "health_check_timeout",
    "connect_deadline": "connect_deadline",
    "unhealthy_threshold": "unhealthy_threshold",
    "rebalance_spread": "rebalance_spread",
    "min_recycle_interval": "min_recycle_interval",
}


@pytest.mark.parametrize(
    "value", [10**400, -(10**400), 10**5000], ids=["1e400", "-1e400", "1e5000"]
)
@pytest.mark.parametrize("argument", sorted(NUMERIC_ARGUMENTS))
def test_an_enormous_number_is_a_configuration_error_not_overflowerror(tmp_path, argument, value):
    kw = {argument: value}
    if argument == "recycle_jitter":
        kw["pool_recycle"] = 60
    with pytest.raises(ConfigurationError) as info:
        make(tmp_path, **kw)
    message = str(info.value)
    assert message.startswith(NUMERIC_ARGUMENTS[argument])
    assert "integer of about" in message  # described, not printed (str() of it would fail)


def test_pool_timeout_beyond_threading_timeout_max_is_refused(tmp_path):
    # QueuePool takes it and fails at the first checkout that has to wait.
    stock = create_engine(
        f"sqlite:///{tmp_path}/q.db",
        poolclass=QueuePool,
        pool_size=1,
        max_overflow=0,
        pool_timeout=1e10,
    )
    held = stock.connect()
    with pytest.raises(OverflowError):
        stock.connect()
    held.close()
    stock.dispose()
    with pytest.raises(ConfigurationError, match=r"^pool_timeout .*threading\.TIMEOUT_MAX"):
        make(tmp_path, pool_timeout=1e10)
    engine = make(tmp_path, pool_timeout=threading.TIMEOUT_MAX)  # the limit itself works
    assert engine.pool.timeout() == threading.TIMEOUT_MAX
    engine.dispose()


@pytest.mark.parametrize(
    ("argument", "largest"),
    [
        ("pool_recycle", threading.TIMEOUT_MAX),
        ("max_idle", threading.TIMEOUT_MAX),
        ("dns_min_refresh", threading.TIMEOUT_MAX),
        ("dns_max_refresh", threading.TIMEOUT_MAX),
        ("health_check_interval", threading.TIMEOUT_MAX),
        ("min_recycle_interval", threading.TIMEOUT_MAX),
        ("health_check_timeout", 3600.0),
        ("connect_deadline", 3600.0),
        ("rebalance_spread", 86400.0),
        ("pool_size", sys.maxsize),
        ("unhealthy_threshold", sys.maxsize),
    ],
)
def test_every_number_has_an_upper_bound(tmp_path, argument, largest):
    kw = {"dns_min_refresh": 1} if argument == "dns_max_refresh" else {}
    engine = make(tmp_path, **kw, **{argument: largest})
    engine.dispose()
    above = largest + 1 if isinstance(largest, int) else largest * 1.5
    with pytest.raises(ConfigurationError, match=rf"^{argument} must be"):
        make(tmp_path, **kw, **{argument: above})


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("health_check_interval", 1e-9),
        ("health_check_timeout", 0.001),
        ("connect_deadline", 5e-324),
        ("dns_min_refresh", 0.0001),
    ],
)
def test_intervals_that_would_make_a_busy_loop_are_refused(tmp_path, argument, value):
    with pytest.raises(ConfigurationError, match=rf"^{argument} must be .*0\.01"):
        make(tmp_path, **{argument: value})


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("orders\nfake log line", "pool_name must be printable"),
        ("tab\there", "pool_name must be printable"),
        ("nul\x00", "pool_name must be printable"),
        ("x" * 201, "pool_name must be at most 200 characters"),
        (7, "pool_name must be a non-empty string"),
    ],
)
def test_pool_names_must_be_addressable_printable_text(tmp_path, name, message):
    with pytest.raises(ConfigurationError, match=message):
        make(tmp_path, pool_name=name)
