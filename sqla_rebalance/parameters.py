"""The one table of pool settings, and every name each one goes by.

A setting has up to five names: the pool's ``__init__`` argument
(``recycle_jitter``), the ``create_engine`` keyword (``pool_recycle`` for the
pool's ``recycle``), the URL parameter of ``plugin=rebalance``
(``rebalance_jitter``), the Flask key (``SQLA_REBALANCE_JITTER``) and the
Django key (``SQLA_REBALANCE["JITTER"]``). Each integration used to keep its
own list; they now all read :data:`PARAMETERS`, and so do ``recreate()`` (what
it carries over), the generated configuration reference and the tests that
prove every integration accepts every setting.

The checks themselves stay in one place, :meth:`PoolConfig.build
<sqla_rebalance.config.PoolConfig.build>`: an integration only turns its
input (URL text, a settings value) into a Python value of the right
:attr:`Parameter.kind` and lets the pool's validation speak, naming the
integration's key in the message.

The pool's ``__init__`` must still spell its arguments out: SQLAlchemy's
``create_engine`` finds pool arguments by reading the signature, and a
keyword-only or ``**kw`` argument would be refused. ``tests/test_parameters.py``
checks that the signature, its ``:param:`` lines and this table agree.

Adding a setting therefore touches: a row here; the pool's signature and its
``:param:`` line (read by SQLAlchemy and by users' editors; checked against
the row); and the code that uses it (its check and field in ``PoolConfig``).
The pool hands its arguments to ``PoolConfig.build`` through
:func:`build_arguments`; the plugin, Flask, Django, ``recreate()`` and the
generated names table follow the row.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "PARAMETERS",
    "Kind",
    "Parameter",
    "build_arguments",
    "by_argument",
    "signature_defaults",
]

#: How a value is read from text (URL) or checked for type (settings):
#: ``number`` finite float; ``optional_number`` the same or None; ``integer``;
#: ``boolean``; ``text`` a non-empty string; ``hosts`` the ``hosts=`` shape;
#: ``nameservers`` ``"ip[:port]"`` strings; ``url`` a bus URL (or Bus object);
#: ``secret`` str or bytes.
Kind = Literal[
    "number",
    "optional_number",
    "integer",
    "boolean",
    "text",
    "hosts",
    "nameservers",
    "url",
    "secret",
]


@dataclass(frozen=True)
class Parameter:
    """One pool setting and its names in each integration."""

    #: The argument of the pool's ``__init__`` (what ``pool_args`` is keyed by).
    argument: str
    kind: Kind
    #: The ``create_engine`` keyword; the argument itself when empty.
    keyword: str = ""
    #: ``plugin=rebalance`` URL parameter suffix (``rebalance_<url>``); "" = none.
    url: str = ""
    #: Flask key suffix (``SQLA_REBALANCE_<FLASK>``, lower case here); "" = none.
    flask: str = ""
    #: Django ``SQLA_REBALANCE`` key; "" = none.
    django: str = ""
    #: ``PoolConfig.build`` parameter; "" when PoolConfig does not check it.
    build: str = ""
    #: ``PoolConfig`` attribute that ``recreate()`` passes back as the argument
    #: (the value as given, not the effective one); "" when recreate() does not
    #: read it from the config.
    stored: str = ""
    #: A property of one database (where it is, which role, the pool's name):
    #: Flask and Django give the global value to the default engine/alias only.
    per_database: bool = False
    #: None is a value with a meaning (rather than "not set").
    none_is_value: bool = False
    #: SQLAlchemy's own ``QueuePool``/``Pool`` argument, passed through unchanged.
    sqlalchemy: bool = False
    #: Spelt out in ``RebalancingQueuePool.__init__`` (False: reaches
    #: ``Pool.__init__`` through ``**kw``, like ``recycle`` and ``pre_ping``).
    in_signature: bool = True

    @property
    def create_engine_keyword(self) -> str:
        return self.keyword or self.argument

    @property
    def url_name(self) -> str:
        return f"rebalance_{self.url}" if self.url else ""


def _ours(
    argument: str,
    kind: Kind,
    url: str = "",
    *,
    stored: str = "",
    per_database: bool = False,
    none_is_value: bool = False,
) -> Parameter:
    """A setting of this package: one name (``url``, the argument by default) for
    the URL parameter and the Flask key, upper case for Django."""
    url = url or argument
    return Parameter(
        argument,
        kind,
        url=url,
        flask=url,
        django=url.upper(),
        build=argument,
        stored=stored or argument,
        per_database=per_database,
        none_is_value=none_is_value,
    )


PARAMETERS: tuple[Parameter, ...] = (
    # SQLAlchemy's own, in Django's settings only (Flask-SQLAlchemy has
    # SQLALCHEMY_ENGINE_OPTIONS, URLs have no pool arguments of SQLAlchemy's).
    Parameter("pool_size", "integer", django="POOL_SIZE", build="pool_size", sqlalchemy=True),
    Parameter(
        "max_overflow", "integer", django="MAX_OVERFLOW", build="max_overflow", sqlalchemy=True
    ),
    Parameter(
        "timeout",
        "optional_number",
        keyword="pool_timeout",
        django="POOL_TIMEOUT",
        build="timeout",
        none_is_value=True,
        sqlalchemy=True,
    ),
    Parameter("use_lifo", "boolean", keyword="pool_use_lifo", django="USE_LIFO", sqlalchemy=True),
    Parameter(
        "pre_ping",
        "boolean",
        keyword="pool_pre_ping",
        django="PRE_PING",
        sqlalchemy=True,
        in_signature=False,
    ),
    # pool_recycle is SQLAlchemy's, but it is the lifetime this pool jitters.
    Parameter(
        "recycle",
        "number",
        keyword="pool_recycle",
        url="recycle",
        flask="recycle",
        django="RECYCLE",
        build="recycle",
        sqlalchemy=True,
        in_signature=False,
    ),
    _ours("recycle_jitter", "number", "jitter", stored="recycle_jitter_arg"),
    _ours("min_size", "integer"),
    _ours("max_idle", "optional_number", none_is_value=True),
    _ours("pool_name", "text", per_database=True, stored="pool_name_arg"),
    _ours("hosts", "hosts", per_database=True),
    _ours("target_role", "text", per_database=True),
    _ours("dns_nameservers", "nameservers"),
    _ours("dns_min_refresh", "number"),
    _ours("dns_max_refresh", "number"),
    _ours("health_check_interval", "optional_number", none_is_value=True),
    _ours("health_check_timeout", "number"),
    _ours("connect_deadline", "number"),
    _ours("unhealthy_threshold", "integer"),
    _ours("rebalance_spread", "number"),
    _ours("broadcast", "url"),
    # Never in a URL (URLs end up in logs and process listings); recreate()
    # passes on the argument as given, which PoolConfig does not keep.
    Parameter("broadcast_secret", "secret", flask="secret", django="SECRET"),
    _ours("min_recycle_interval", "number"),
)

_BY_ARGUMENT = {p.argument: p for p in PARAMETERS}


def by_argument(argument: str) -> Parameter:
    """The parameter for a pool ``__init__`` argument (KeyError if unknown)."""
    return _BY_ARGUMENT[argument]


def build_arguments(given: dict[str, Any]) -> dict[str, Any]:
    """``PoolConfig.build``'s keywords from the pool's arguments by name (those
    spelt out in ``__init__`` and those in its ``**kw``): the pool's constructor
    does not list them again."""
    return {p.build: given[p.argument] for p in PARAMETERS if p.build}


def signature_defaults(poolclass: type) -> dict[str, Any]:
    """Default values of a pool class's ``__init__`` arguments, up the class
    hierarchy (the nearest class wins), as ``create_engine`` would leave them."""
    out: dict[str, Any] = {}
    for klass in poolclass.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in list(inspect.signature(init).parameters.values())[1:]:
            if p.default is not inspect.Parameter.empty:
                out.setdefault(p.name, p.default)
    return out
