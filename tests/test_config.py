"""Arguments: passable through create_engine, validated there, carried over by recreate()."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, exc, text

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
