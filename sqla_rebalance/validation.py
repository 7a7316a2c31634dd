"""Every check of a pool setting: the shared ones (numbers, counts, durations and
their bounds) and one validator per setting.

A setting's row in :data:`sqla_rebalance.parameters.PARAMETERS` names its
validator here (``check_<setting>``); ``PoolConfig.build`` runs them in table
order, each seeing the settings checked before it (``min_size`` against
``pool_size``). Every message starts with the ``create_engine`` name of the
setting at fault, prints the value short (:func:`brief_repr`) and gives the
whole range, upper bound included: a bound here is what keeps a value that
passes from failing later (a ``pool_timeout`` beyond ``threading.TIMEOUT_MAX``
would pass ``QueuePool`` and raise ``OverflowError`` at the first checkout that
waits). ``docs/configuration.md`` quotes the messages.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ConfigurationError

__all__ = [
    "DEFAULT_DNS_MAX_REFRESH",
    "DEFAULT_JITTER",
    "DEFAULT_POOL_NAME",
    "MAX_COUNT",
    "MAX_DEADLINE",
    "MAX_POOL_NAME",
    "MAX_REBALANCE_SPREAD",
    "MAX_SECONDS",
    "MIN_INTERVAL",
    "TARGET_ROLES",
    "Check",
    "brief_repr",
    "count",
    "integer",
    "number",
    "seconds",
]

#: The longest wait Python's threading accepts (``Lock.acquire``,
#: ``Condition.wait``, hence ``queue.Queue.get``): about 292 years on Linux and
#: macOS, 49.7 days on Windows. ``pool_timeout`` is such a wait at checkout,
#: and no duration setting may go beyond it: a larger value would pass here
#: and fail later (an ``OverflowError`` at the first checkout that waits).
MAX_SECONDS = threading.TIMEOUT_MAX
#: The largest connection count or threshold (``sys.maxsize``, what ``len()``
#: and ``queue.Queue`` sizes are bounded by).
MAX_COUNT = sys.maxsize
#: Intervals and timeouts below this would make the background work a busy
#: loop (a health check or a DNS query per host every few microseconds).
MIN_INTERVAL = 0.01
#: The bound of ``health_check_timeout`` and ``connect_deadline`` (an hour).
MAX_DEADLINE = 3600.0
#: ``rebalance_spread`` at most a day, as the spread of a cluster-wide recycle.
MAX_REBALANCE_SPREAD = 86400.0
#: The longest pool name a cluster-wide command can address (``--pool``).
MAX_POOL_NAME = 200
#: A setting's validator (``parameters.Parameter.check``): the value as given
#: (the row's default when not given) and the values of the settings checked
#: before it (by ``build`` name), to the value the pool uses; raises
#: :class:`~sqla_rebalance.ConfigurationError`, whose message starts with the
#: setting's ``create_engine`` name.
Check = Callable[[Any, Mapping[str, Any]], Any]

#: ``recycle_jitter`` when ``pool_recycle`` is set and the jitter is not:
#: connections opened together expire spread over the last 20 % of ``pool_recycle``.
DEFAULT_JITTER = 0.2
#: The pool's name when none is given (Django's default is the alias instead).
DEFAULT_POOL_NAME = "default"
#: ``dns_max_refresh`` when not given (or ``dns_min_refresh`` if that is larger).
DEFAULT_DNS_MAX_REFRESH = 60.0
#: ``target_role`` values (libpq's ``target_session_attrs`` names).
TARGET_ROLES = ("any", "primary", "standby", "prefer-standby")


def brief_repr(value: object) -> str:
    """``repr(value)`` for a message: short, and never failing.

    A huge integer is described rather than printed (``str()`` of one with
    more than 4,300 digits raises ``ValueError``), a long repr is cut.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        digits = int(value.bit_length() * math.log10(2)) + 1
        return f"{'a negative' if value < 0 else 'an'} integer of about {digits} digits"
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real problem
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= 80 else text[:77] + "..."


def number(name: str, value: object) -> float:
    """A finite ``float``; an integer too large for one gives ``±inf`` (out of every range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be a number, got {brief_repr(value)}")
    try:
        result = float(value)
    except OverflowError:  # an int beyond 1.8e308: the range checks refuse it
        return math.inf if value > 0 else -math.inf
    if math.isnan(result) or math.isinf(result):
        raise ConfigurationError(f"{name} must be a finite number, got {brief_repr(value)}")
    return result


def integer(name: str, value: object) -> int:
    """An ``int`` (``bool`` is not one here, though Python says it is)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an integer, got {brief_repr(value)}")
    return int(value)


def count(name: str, value: object, least: int) -> int:
    """An integer in ``[least, sys.maxsize]``."""
    result = integer(name, value)
    if not least <= result <= MAX_COUNT:
        raise ConfigurationError(
            f"{name} must be >= {least} and <= {MAX_COUNT} (sys.maxsize), got {brief_repr(value)}"
        )
    return result


def seconds(
    name: str, value: object, least: float, most: float = MAX_SECONDS, *, above: bool = False
) -> float:
    """A number of seconds in ``[least, most]`` (``(least, most]`` with ``above``)."""
    result = number(name, value)
    if (result <= least if above else result < least) or result > most:
        low = f"> {least:g}" if above else f">= {least:g}"
        high = f"{most:.0f}" + (" (threading.TIMEOUT_MAX)" if most == MAX_SECONDS else "")
        raise ConfigurationError(
            f"{name} must be {low} and <= {high} seconds, got {brief_repr(value)}"
        )
    return result


# --------------------------------------------------------------------------- validators
# In the order of sqla_rebalance.parameters.PARAMETERS, one for each row that
# PoolConfig checks (hosts=, dns_nameservers= and broadcast= are checked where
# they are used): the value (None replaced by the row's default unless None has
# a meaning) and the settings checked before it, to the value the pool uses.
# Each message starts with the create_engine name and gives the whole range:
# docs/configuration.md quotes them, tests/test_parameters.py pins them.


def check_pool_size(value: Any, _: Mapping[str, Any]) -> int:
    return count("pool_size", value, 0)


def check_max_overflow(value: Any, checked: Mapping[str, Any]) -> int:
    if checked["pool_size"] == 0:
        # QueuePool: no limit at all, and max_overflow is not looked at (it
        # stores -1); refusing a value it ignores would not be drop-in.
        return -1
    result = integer("max_overflow", value)
    if not -1 <= result <= MAX_COUNT:
        raise ConfigurationError(
            f"max_overflow must be >= 0, or -1 for no limit (and <= {MAX_COUNT}, "
            f"sys.maxsize), got {brief_repr(result)}"
        )
    return result


def check_timeout(value: Any, _: Mapping[str, Any]) -> float | None:
    if value is None:  # wait without a limit, as QueuePool
        return None
    result = number("pool_timeout", value)
    if not 0 <= result <= MAX_SECONDS:
        raise ConfigurationError(
            f"pool_timeout must be >= 0 seconds and <= {MAX_SECONDS:.0f} "
            "(threading.TIMEOUT_MAX, the longest wait Python accepts), or None to wait "
            f"without a limit, got {brief_repr(value)}"
        )
    return result


def check_recycle(value: Any, _: Mapping[str, Any]) -> float:
    result = number("pool_recycle", value)
    if result != -1 and not 0 < result <= MAX_SECONDS:
        # -0.5 is no "disabled" value: QueuePool would reconnect at every checkout.
        raise ConfigurationError(
            f"pool_recycle must be a positive number of seconds (<= {MAX_SECONDS:.0f}, "
            f"threading.TIMEOUT_MAX), or -1 to disable, got {brief_repr(value)}"
        )
    return result


def check_recycle_jitter(value: Any, checked: Mapping[str, Any]) -> float:
    recycle = checked["recycle"]
    if value is None:
        return DEFAULT_JITTER if recycle > 0 else 0.0
    jitter = number("recycle_jitter", value)
    if not 0.0 <= jitter < 1.0:
        raise ConfigurationError(
            "recycle_jitter must be in [0, 1) (a fraction of pool_recycle), "
            f"got {brief_repr(value)}"
        )
    if recycle <= 0:
        raise ConfigurationError(
            "recycle_jitter needs pool_recycle: set pool_recycle (the maximum "
            "lifetime in seconds) or leave recycle_jitter out"
        )
    return jitter


def check_min_size(value: Any, checked: Mapping[str, Any]) -> int:
    result = count("min_size", value, 0)
    pool_size = checked["pool_size"]
    if pool_size and result > pool_size:
        raise ConfigurationError(
            f"min_size ({result}) cannot be larger than pool_size ({pool_size})"
        )
    return result


def check_max_idle(value: Any, _: Mapping[str, Any]) -> float | None:
    if value is None:
        return None
    result = number("max_idle", value)
    if not 0 < result <= MAX_SECONDS:
        raise ConfigurationError(
            f"max_idle must be a positive number of seconds (<= {MAX_SECONDS:.0f}, "
            f"threading.TIMEOUT_MAX) or None, got {brief_repr(value)}"
        )
    return result


def check_pool_name(value: Any, _: Mapping[str, Any]) -> str:
    if value is None:
        return DEFAULT_POOL_NAME
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"pool_name must be a non-empty string, got {brief_repr(value)}")
    if len(value) > MAX_POOL_NAME:
        raise ConfigurationError(
            f"pool_name must be at most {MAX_POOL_NAME} characters (the longest name "
            f"a cluster-wide command can address), got {len(value)}"
        )
    if not value.isprintable():
        raise ConfigurationError(
            "pool_name must be printable text, without line breaks, tabs or other "
            f"control characters (it is written to logs and matched by cluster-wide "
            f"commands), got {brief_repr(value)}"
        )
    return value


def check_target_role(value: Any, _: Mapping[str, Any]) -> str:
    if not isinstance(value, str) or value not in TARGET_ROLES:
        raise ConfigurationError(
            f"target_role must be one of {', '.join(TARGET_ROLES)}, got {brief_repr(value)}"
        )
    return value


def check_dns_min_refresh(value: Any, _: Mapping[str, Any]) -> float:
    return seconds("dns_min_refresh", value, MIN_INTERVAL)


def check_dns_max_refresh(value: Any, checked: Mapping[str, Any]) -> float:
    least = checked["dns_min_refresh"]
    given = max(DEFAULT_DNS_MAX_REFRESH, least) if value is None else value
    result = seconds("dns_max_refresh", given, MIN_INTERVAL)
    if result < least:
        raise ConfigurationError(
            f"dns_max_refresh ({result:g}) must be >= dns_min_refresh ({least:g})"
        )
    return result


def check_health_check_interval(value: Any, _: Mapping[str, Any]) -> float | None:
    if value is None:  # check only the hosts that failed
        return None
    result = number("health_check_interval", value)
    if not MIN_INTERVAL <= result <= MAX_SECONDS:
        raise ConfigurationError(
            f"health_check_interval must be a positive number of seconds (>= "
            f"{MIN_INTERVAL:g} and <= {MAX_SECONDS:.0f}, threading.TIMEOUT_MAX), or "
            f"None to check only hosts that failed, got {brief_repr(value)}"
        )
    return result


def _seconds_in(name: str, least: float, most: float = MAX_SECONDS) -> Check:
    """The validator of a duration in ``[least, most]`` named ``name``."""

    def check(value: Any, _: Mapping[str, Any]) -> float:
        return seconds(name, value, least, most)

    return check


check_health_check_timeout = _seconds_in("health_check_timeout", MIN_INTERVAL, MAX_DEADLINE)
check_connect_deadline = _seconds_in("connect_deadline", MIN_INTERVAL, MAX_DEADLINE)


def check_unhealthy_threshold(value: Any, _: Mapping[str, Any]) -> int:
    return count("unhealthy_threshold", value, 1)


check_rebalance_spread = _seconds_in("rebalance_spread", 0.0, MAX_REBALANCE_SPREAD)
check_min_recycle_interval = _seconds_in("min_recycle_interval", 0.0)
