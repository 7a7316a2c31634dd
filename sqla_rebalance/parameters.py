"""The one table of pool settings: each one's default, check, documentation and names.

A setting has up to five names: the pool's ``__init__`` argument
(``recycle_jitter``), the ``create_engine`` keyword (``pool_recycle`` for the
pool's ``recycle``), the URL parameter of ``plugin=rebalance``
(``rebalance_jitter``), the Flask key (``SQLA_REBALANCE_JITTER``) and the
Django key (``SQLA_REBALANCE["JITTER"]``). Its row in :data:`PARAMETERS` also
holds its default, its validator and its documentation, and everything else
follows the row:

- :meth:`PoolConfig.build <sqla_rebalance.config.PoolConfig.build>` runs the
  validators in table order (a validator sees the values checked before it,
  so ``min_size`` is checked against ``pool_size``) and fills in defaults;
- the pool's docstring (its ``:param:`` lines) is :func:`param_docs`;
- ``recreate()`` carries over each row's ``stored`` attribute;
- the URL plugin, Flask and Django read the names and the :attr:`Parameter.kind`
  (how a value is read from text or a settings file), and let the validator
  speak, naming their own key in the message;
- ``scripts/gen_docs.py`` writes the configuration reference from the rows;
- ``tests/test_parameters.py`` proves that every integration accepts every
  setting.

The pool's ``__init__`` must still spell its arguments out: SQLAlchemy's
``create_engine`` finds pool arguments by reading the signature (its code
object's argument names), and a keyword-only or ``**kw`` argument would be
refused. ``tests/test_parameters.py`` checks that the signature has the
table's arguments and defaults. Adding a setting therefore touches a row
here (and its validator in ``validation.py``), the pool's signature (one line,
checked against the row), and the code that uses the value (its field in
``PoolConfig`` and its reader); then ``scripts/gen_docs.py`` regenerates the
reference, and ``docs/configuration.md`` wants a section on its range and why
its default (docs/development.md, "Adding a setting").

The ``:param:`` lines are added to the pool's docstring when the class is
made, so ``help()``, Sphinx's autodoc and editors that import the code show
them; an editor that only parses the source shows the class's summary and the
signature, with its real defaults. That is the price of one text per setting.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from . import validation
from .validation import Check

__all__ = [
    "PARAMETERS",
    "Kind",
    "Parameter",
    "build_arguments",
    "param_docs",
    "signature_defaults",
    "with_param_docs",
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
    """One pool setting: its default, check and documentation, and its names in
    each integration."""

    #: The argument of the pool's ``__init__`` (what ``pool_args`` is keyed by).
    argument: str
    kind: Kind
    #: The value when the setting is not given: the default in the pool's
    #: signature (SQLAlchemy's own for its arguments).
    default: Any = None
    #: What it is, its unit and its effective default: the ``:param:`` text of
    #: the pool's docstring and of the configuration reference (reST inline
    #: markup). Empty for SQLAlchemy's own arguments (documented by SQLAlchemy).
    doc: str = ""
    #: The validator ``PoolConfig.build`` runs; None: stored as given (the
    #: pool checks it where it is used: ``hosts`` against the dialect, a bus
    #: URL when the bus opens).
    check: Check | None = None
    #: The ``create_engine`` keyword; the argument itself when empty.
    keyword: str = ""
    #: ``plugin=rebalance`` URL parameter suffix (``rebalance_<url>``); "" = none.
    url: str = ""
    #: Flask key suffix (``SQLA_REBALANCE_<FLASK>``, lower case here); "" = none.
    flask: str = ""
    #: Django ``SQLA_REBALANCE`` key; "" = none.
    django: str = ""
    #: ``PoolConfig`` field the checked value goes to (and ``PoolConfig.build``
    #: keyword); "" when ``PoolConfig`` does not hold it.
    build: str = ""
    #: ``PoolConfig`` attribute that ``recreate()`` passes back as the argument
    #: (the value as given, not the effective one); "" when recreate() does not
    #: read it from the config.
    stored: str = ""
    #: A property of one database (where it is, which role, the pool's name):
    #: Flask and Django give the global value to the default engine/alias only.
    per_database: bool = False
    #: None is a value with a meaning. Otherwise None given for a setting of
    #: this package means "not set": its default (what a settings file or a
    #: wrapper that passes every argument gives for one left out).
    none_is_value: bool = False
    #: SQLAlchemy's own ``QueuePool``/``Pool`` argument, passed through unchanged.
    sqlalchemy: bool = False
    #: Spelt out in ``RebalancingQueuePool.__init__`` (False: reaches
    #: ``Pool.__init__`` through ``**kw``, like ``recycle`` and ``pre_ping``).
    in_signature: bool = True

    def __post_init__(self) -> None:
        # The text as one line, however it was wrapped in the source.
        object.__setattr__(self, "doc", " ".join(self.doc.split()))

    @property
    def create_engine_keyword(self) -> str:
        return self.keyword or self.argument

    @property
    def url_name(self) -> str:
        return f"rebalance_{self.url}" if self.url else ""


# --------------------------------------------------------------------------- the table


def _ours(
    argument: str,
    kind: Kind,
    default: Any,
    doc: str,
    check: Check | None,
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
        default,
        doc,
        check,
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
    # Checked here all the same: QueuePool takes any value and fails later.
    Parameter(
        "pool_size",
        "integer",
        5,
        check=validation.check_pool_size,
        django="POOL_SIZE",
        build="pool_size",
        sqlalchemy=True,
    ),
    Parameter(
        "max_overflow",
        "integer",
        10,
        check=validation.check_max_overflow,
        django="MAX_OVERFLOW",
        build="max_overflow",
        sqlalchemy=True,
    ),
    Parameter(
        "timeout",
        "optional_number",
        30.0,
        check=validation.check_timeout,
        keyword="pool_timeout",
        django="POOL_TIMEOUT",
        build="timeout",
        none_is_value=True,
        sqlalchemy=True,
    ),
    Parameter(
        "use_lifo", "boolean", False, keyword="pool_use_lifo", django="USE_LIFO", sqlalchemy=True
    ),
    Parameter(
        "pre_ping",
        "boolean",
        False,
        keyword="pool_pre_ping",
        django="PRE_PING",
        sqlalchemy=True,
        in_signature=False,
    ),
    # pool_recycle is SQLAlchemy's, but it is the lifetime this pool jitters.
    Parameter(
        "recycle",
        "number",
        -1,
        check=validation.check_recycle,
        keyword="pool_recycle",
        url="recycle",
        flask="recycle",
        django="RECYCLE",
        build="recycle",
        sqlalchemy=True,
        in_signature=False,
    ),
    _ours(
        "recycle_jitter",
        "number",
        None,
        """fraction in ``[0, 1)``. Each connection lives a lifetime drawn uniformly in
        ``[pool_recycle * (1 - jitter), pool_recycle]`` seconds. Default 0.2 when
        ``pool_recycle`` is set; giving it without ``pool_recycle`` is an error.""",
        validation.check_recycle_jitter,
        "jitter",
        stored="recycle_jitter_arg",
    ),
    _ours(
        "min_size",
        "integer",
        0,
        """connections to open in the background at start and to keep open (default 0,
        like ``QueuePool``).""",
        validation.check_min_size,
    ),
    _ours(
        "max_idle",
        "optional_number",
        None,
        """seconds; idle connections above ``min_size`` that were not needed for this
        long are closed (default None: never, like ``QueuePool``).""",
        validation.check_max_idle,
        none_is_value=True,
    ),
    _ours(
        "pool_name",
        "text",
        None,
        """name used in stats, logs and cluster-wide commands (default ``"default"``).""",
        validation.check_pool_name,
        per_database=True,
        stored="pool_name_arg",
    ),
    _ours(
        "hosts",
        "hosts",
        None,
        """the hosts to spread connections over, ``"name:port"`` strings; a nested list
        is a lower-priority tier, used only while no host of a better tier is healthy.
        Default: the URL's host(s). Every DNS name stands for all its A/AAAA records.""",
        None,
        per_database=True,
    ),
    _ours(
        "target_role",
        "text",
        "any",
        """``"any"`` (default), ``"primary"``, ``"standby"`` or ``"prefer-standby"``;
        checked on each connect and by health checks.""",
        validation.check_target_role,
        per_database=True,
    ),
    _ours(
        "dns_nameservers",
        "nameservers",
        None,
        """``["ip:port", ...]`` or a dnspython ``Resolver`` (default: the system's
        resolver configuration).""",
        None,
    ),
    _ours(
        "dns_min_refresh",
        "number",
        1.0,
        """seconds; names are re-resolved when their TTL runs out, but not more often
        than this (default 1).""",
        validation.check_dns_min_refresh,
    ),
    _ours(
        "dns_max_refresh",
        "number",
        None,
        """seconds; ... and at least this often (default 60, or ``dns_min_refresh`` if
        that is larger).""",
        validation.check_dns_max_refresh,
    ),
    _ours(
        "health_check_interval",
        "optional_number",
        1.0,
        """seconds between checks of each host (a query on one of its idle connections,
        or a connect probe when it has none idle or it failed). None checks only hosts
        that failed. Default 1.""",
        validation.check_health_check_interval,
        none_is_value=True,
    ),
    _ours(
        "health_check_timeout",
        "number",
        1.0,
        """seconds a health check, role query or connect may go unanswered; each such
        period counts as one failure of the host ("deadline exceeded"), so a host that
        hangs is suspect after one and down after ``unhealthy_threshold`` of them.
        Default 1.""",
        validation.check_health_check_timeout,
    ),
    _ours(
        "connect_deadline",
        "number",
        5.0,
        """the driver's connect timeout for connections the pool opens, when the URL or
        ``connect_args`` set none (libpq would wait forever). Default 5.""",
        validation.check_connect_deadline,
    ),
    _ours(
        "unhealthy_threshold",
        "integer",
        3,
        """consecutive failures that mark a host down (default 3).""",
        validation.check_unhealthy_threshold,
    ),
    _ours(
        "rebalance_spread",
        "number",
        1.0,
        """seconds over which a rebalance moves connections (default 1).""",
        validation.check_rebalance_spread,
    ),
    _ours(
        "broadcast",
        "url",
        None,
        """a bus URL (``redis://...``, ``postgresql://...``, ``sqlite:///path``) or a
        :class:`sqla_rebalance.bus.Bus`: the pool then obeys cluster-wide
        ``recycle``/``rebalance``/``refresh``/``drain`` commands sent there
        (``sqla-rebalance recycle --bus URL``). Default None.""",
        None,
    ),
    # Never in a URL (URLs end up in logs and process listings); recreate()
    # passes on the argument as given, which PoolConfig does not keep.
    Parameter(
        "broadcast_secret",
        "secret",
        None,
        """the HMAC key that commands must be signed with (str or bytes). Default:
        ``$SQLA_REBALANCE_SECRET``; without either the pool warns and accepts unsigned
        commands.""",
        flask="secret",
        django="SECRET",
    ),
    _ours(
        "min_recycle_interval",
        "number",
        10.0,
        """seconds; the pool applies at most one batch of cluster-wide commands per
        interval, coalescing the rest (default 10).""",
        validation.check_min_recycle_interval,
    ),
)


def build_arguments(given: Mapping[str, Any]) -> dict[str, Any]:
    """``PoolConfig.build``'s keywords from pool arguments by name (those spelt
    out in ``__init__`` and those in its ``**kw``): the pool's constructor does
    not list them again. Arguments not given are left to their defaults."""
    return {p.build: given[p.argument] for p in PARAMETERS if p.build and p.argument in given}


def param_docs(width: int = 78) -> str:
    """The ``:param name: text`` lines of every setting of this package, in table
    order, as the pool's docstring carries them."""
    lines: list[str] = []
    for p in PARAMETERS:
        if p.doc:
            lines += textwrap.wrap(
                f":param {p.argument}: {p.doc}",
                width,
                subsequent_indent="  ",
                break_on_hyphens=False,
            )
    return "\n".join(lines)


def with_param_docs(doc: str | None) -> str:
    """A class docstring followed by :func:`param_docs` (what ``help()``, editors
    that run the code and Sphinx's autodoc show)."""
    return inspect.cleandoc(doc or "") + "\n\n" + param_docs() + "\n"


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
