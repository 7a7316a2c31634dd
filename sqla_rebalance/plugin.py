"""The SQLAlchemy plugin ``rebalance``: turn on ``RebalancingQueuePool`` from the URL.

``create_engine("postgresql+psycopg://…?plugin=rebalance&rebalance_recycle=600")``
(or ``plugins=["rebalance"]``) selects the pool class and reads its settings
from ``rebalance_*`` query parameters, so that an application configured by a
URL alone (an environment variable, a settings file) can use the pool without
code changes. The parameters are removed from the URL before the dialect sees
it, because a DBAPI rejects (psycopg) or silently ignores options it does not
know.

How SQLAlchemy calls a plugin (``sqlalchemy/engine/create.py``): the plugin is
built with the URL and the ``create_engine`` keyword dictionary; then
``update_url()``; then ``handle_dialect_kwargs()`` before the pool class is
read from that dictionary (the only hook that knows the dialect class, hence
``is_async``, early enough to choose the class); then ``handle_pool_kwargs()``
with the pool arguments taken from explicit keywords, just before the pool is
made. Explicit keywords therefore show up in ``pool_args``, which is where a
clash with a URL parameter is detected.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import URL, CreateEnginePlugin
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.pool import Pool

from . import parameters as table
from . import targets
from .config import PoolConfig
from .dns import parse_nameserver
from .errors import ConfigurationError
from .hosts import parse_hosts
from .parameters import signature_defaults
from .pool import SECRET_ENV, AsyncRebalancingQueuePool, RebalancingQueuePool
from .validation import brief_repr

__all__ = ["PARAMETERS", "SECRET_ENV", "RebalancePlugin", "UrlParameter", "parse_hosts_param"]

PREFIX = "rebalance_"
# SECRET_ENV: where the pool reads the bus secret from when
# ``broadcast_secret`` is not given. A secret never belongs in the URL:
# SQLAlchemy masks the URL's password when it prints a URL, but not its
# query parameters.
_NONE = "none"
_SECRET_PARAMETER = "rebalance_broadcast_secret"


def _brief(text: str) -> str:
    """URL text for a message: escaped when not printable, cut when long."""
    shown = text if text.isprintable() else repr(text)[1:-1]
    return shown if len(shown) <= 80 else shown[:77] + "..."


def is_ours(key: str) -> bool:
    """Whether a query parameter is meant for this plugin, however it is spelt.

    ``REBALANCE_RECYCLE`` or ``rebalance-recycle`` is a typo to report, not a
    driver option to pass on (psycopg would reject it, other drivers ignore it).
    """
    return key.lower().replace("-", "_").startswith(PREFIX)


def _finite(url_name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{url_name} must be a number, got {brief_repr(raw)}") from None
    if math.isnan(value) or math.isinf(value):
        raise ConfigurationError(f"{url_name} must be a finite number, got {brief_repr(raw)}")
    return value


def _optional_finite(url_name: str, raw: str) -> float | None:
    return None if raw.strip().lower() == _NONE else _finite(url_name, raw)


def _integer(url_name: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        text = raw.strip().lstrip("+-")
        if text.isascii() and text.isdigit():  # more than 4,300 digits
            raise ConfigurationError(
                f"{url_name} is out of range: an integer of {len(text)} digits"
            ) from None
        raise ConfigurationError(f"{url_name} must be an integer, got {brief_repr(raw)}") from None


def _text(url_name: str, raw: str) -> str:
    if not raw.strip():
        raise ConfigurationError(f"{url_name} must not be empty")
    return raw.strip()


def _items(url_name: str, raw: str) -> list[str]:
    parts = [part.strip() for part in raw.split(",")]
    if not raw.strip() or not all(parts):
        raise ConfigurationError(
            f"{url_name} must be a comma-separated list without empty entries, "
            f"got {brief_repr(raw)}"
        )
    return parts


def _nameservers(url_name: str, raw: str) -> list[str]:
    items = _items(url_name, raw)
    for item in items:
        try:
            parse_nameserver(item)
        except ConfigurationError as err:
            raise ConfigurationError(f"{url_name}: {err}") from None
    return items


def parse_hosts_param(raw: str, url_name: str = "rebalance_hosts") -> list[Any]:
    """``"a:5432,b:5432|dr:5432"`` -> ``["a:5432", "b:5432", ["dr:5432"]]``.

    ``|`` separates tiers (best first) and ``,`` the hosts of a tier, which is
    the ``hosts=`` shape: first-tier hosts as plain strings, each lower tier a
    nested list. Ports are checked by the pool, which knows the dialect's
    default port (and that SQLite "hosts" are file paths).
    """
    tiers = [_items(url_name, tier) for tier in raw.split("|")]
    return [*tiers[0], *tiers[1:]]


def _broadcast(url_name: str, raw: str) -> str:
    value = _text(url_name, raw)
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError as err:
        raise ConfigurationError(f"{url_name} is not a valid URL: {err}") from None
    if not parts.scheme or not (parts.netloc or parts.path):
        raise ConfigurationError(
            f"{url_name} must be a URL such as redis://host:6379/0 (percent-encoded inside "
            f"the engine URL), got {brief_repr(raw)}"
        )
    if password:
        raise ConfigurationError(
            f"{url_name} must not contain a password (query parameters are not masked like "
            "the URL's own password when a URL is logged); pass broadcast=... to "
            "create_engine() instead"
        )
    return value


@dataclass(frozen=True)
class UrlParameter:
    """One ``rebalance_*`` URL parameter and the pool argument it sets."""

    name: str
    #: The pool ``__init__`` parameter (what ``pool_args`` is keyed by).
    argument: str
    parse: Callable[[str, str], object]
    #: The ``create_engine`` keyword for ``argument`` (differs for ``pool_recycle``).
    keyword: str = ""

    @property
    def create_engine_keyword(self) -> str:
        return self.keyword or self.argument


#: How each kind of setting (``parameters.Kind``) is read from URL text.
_PARSERS: dict[str, Callable[[str, str], object]] = {
    "number": _finite,
    "optional_number": _optional_finite,
    "integer": _integer,
    "text": _text,
    "hosts": lambda n, raw: parse_hosts_param(raw, n),
    "nameservers": _nameservers,
    "url": _broadcast,
}

#: Every setting of the table that has a URL name (``parameters.PARAMETERS``).
PARAMETERS: tuple[UrlParameter, ...] = tuple(
    UrlParameter(p.url_name, p.argument, _PARSERS[p.kind], p.keyword)
    for p in table.PARAMETERS
    if p.url
)
_BY_NAME: dict[str, UrlParameter] = {p.name: p for p in PARAMETERS}


def accepted_arguments(poolclass: type[Pool]) -> frozenset[str]:
    """Keyword names ``poolclass(creator, **kw)`` accepts, following ``**kw`` up the MRO.

    This is how SQLAlchemy itself finds pool arguments, and it lets the plugin
    offer a setting only when the installed pool supports it (the bus
    arguments arrive in a later version).
    """
    names: set[str] = set()
    for klass in poolclass.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]  # drop self
        names.update(
            p.name
            for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        )
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return frozenset(names)


def _unknown(key: str) -> str:
    """The message for a ``rebalance_*`` parameter that is not one of ours."""
    known = [p.name for p in PARAMETERS]
    normal = key.lower().replace("-", "_")
    if normal in _BY_NAME:
        hint = f" (did you mean {normal}? parameter names are lower case, with '_')"
    else:
        close = difflib.get_close_matches(normal, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown URL parameter {_brief(key)} for plugin=rebalance{hint}; known: " + ", ".join(
        known
    )


class RebalancePlugin(CreateEnginePlugin):
    """``plugin=rebalance``: use ``(Async)RebalancingQueuePool`` with URL settings.

    Every problem (unknown ``rebalance_*`` key, a value of the wrong type or
    range, a clash with an explicit ``create_engine`` keyword, an unsuitable
    ``poolclass=``) raises :class:`~sqla_rebalance.ConfigurationError`, a
    :class:`sqlalchemy.exc.ArgumentError`, inside ``create_engine``.
    """

    def __init__(self, url: URL, kwargs: dict[str, Any]) -> None:
        super().__init__(url, kwargs)
        # The very dictionary create_engine goes on to read poolclass from.
        self._kwargs = kwargs
        self._names = [key for key in url.query if is_ours(key)]
        #: pool argument -> (URL parameter, raw text, parsed value)
        self.settings: dict[str, tuple[UrlParameter, str, object]] = {}
        for key in self._names:
            if key.lower().replace("-", "_") == _SECRET_PARAMETER:
                raise ConfigurationError(
                    f"{_brief(key)} is not accepted in the URL (URLs end up in "
                    f"logs and process listings): set the environment variable {SECRET_ENV} "
                    "instead, which the pool reads"
                )
            param = _BY_NAME.get(key)
            if param is None:
                raise ConfigurationError(_unknown(key))
            raw = self._single(url.query, key)
            self.settings[param.argument] = (param, raw, param.parse(key, raw))

    @staticmethod
    def _single(query: Mapping[str, str | tuple[str, ...]], key: str) -> str:
        value = query[key]
        if isinstance(value, tuple):
            raise ConfigurationError(f"URL parameter {key} is given more than once")
        return value

    def update_url(self, url: URL) -> URL:
        """Drop our parameters so the DBAPI never sees them."""
        return url.difference_update_query(self._names)

    def handle_dialect_kwargs(
        self, dialect_cls: type[Dialect], dialect_args: dict[str, Any]
    ) -> None:
        """Choose the pool class, now that the dialect (sync or asyncio) is known."""
        kwargs = self._kwargs
        pool = kwargs.get("pool")
        if pool is not None:
            if not isinstance(pool, RebalancingQueuePool):
                raise ConfigurationError(
                    f"plugin=rebalance needs a RebalancingQueuePool, but pool= is a "
                    f"{type(pool).__name__}; drop pool= or the plugin"
                )
            if self.settings:
                raise ConfigurationError(
                    "rebalance_* URL parameters cannot apply to a ready-made pool= "
                    f"(got {', '.join(p.name for p, _, _ in self.settings.values())})"
                )
            return
        given = kwargs.get("poolclass")
        if given is None:
            is_async = bool(getattr(dialect_cls, "is_async", False))
            kwargs["poolclass"] = AsyncRebalancingQueuePool if is_async else RebalancingQueuePool
        elif not (isinstance(given, type) and issubclass(given, RebalancingQueuePool)):
            raise ConfigurationError(
                "plugin=rebalance needs poolclass to be RebalancingQueuePool or a subclass, "
                f"got {given!r}; drop poolclass= or the plugin"
            )

    def handle_pool_kwargs(self, pool_cls: type[Pool], pool_args: dict[str, Any]) -> None:
        """Add the URL settings to the pool arguments, refusing clashes and unknowns."""
        if not issubclass(pool_cls, RebalancingQueuePool):  # another plugin changed it
            raise ConfigurationError(
                f"plugin=rebalance needs a RebalancingQueuePool, got {pool_cls.__name__}"
            )
        accepted = accepted_arguments(pool_cls)
        for argument, (param, raw, value) in self.settings.items():
            if argument not in accepted:
                raise ConfigurationError(
                    f"{param.name} is not supported by {pool_cls.__name__} in this version "
                    f"(it has no {argument}= argument)"
                )
            # The same plugin named twice (URL and plugins=) adds equal values.
            if argument in pool_args and pool_args[argument] != value:
                raise ConfigurationError(
                    f"{param.name}={_brief(raw)} in the URL conflicts with "
                    f"{param.create_engine_keyword}={pool_args[argument]!r} given to "
                    "create_engine(); set it in one place"
                )
        self._explain_invalid(pool_cls, pool_args)
        pool_args.update({argument: value for argument, (_, _, value) in self.settings.items()})

    def _explain_invalid(self, pool_cls: type[Pool], pool_args: dict[str, Any]) -> None:
        """Validate as the pool will, so that an error names the URL parameter.

        The pool's own message names its argument (``recycle_jitter must be in
        [0, 1) …``), which a user who wrote ``rebalance_jitter=1.5`` would have
        to translate; the checks themselves stay in one place (the validators of
        the parameter table, run by ``PoolConfig.build``).
        """
        merged = {**signature_defaults(pool_cls), **pool_args}
        merged.update({argument: value for argument, (_, _, value) in self.settings.items()})
        try:
            PoolConfig.build(**table.build_arguments(merged))
        except ConfigurationError as err:
            message = str(err)
            # Messages start with the argument they are about; others may be
            # mentioned as the cause ("min_size (9) cannot be larger than pool_size").
            mentioned = [
                (param, raw)
                for param, raw, _ in self.settings.values()
                if re.search(rf"\b{re.escape(param.create_engine_keyword)}\b", message)
            ]
            subject = [
                (p, raw) for p, raw in mentioned if message.startswith(p.create_engine_keyword)
            ]
            culprits = [f"{param.name}={_brief(raw)}" for param, raw in subject or mentioned]
            if culprits:
                raise ConfigurationError(
                    f"{', '.join(culprits)} (URL, plugin=rebalance): {message}"
                ) from err
            # Not about a URL parameter: the pool raises it with its own words.
        self._explain_hosts(pool_args.get("dialect"))

    def _explain_hosts(self, dialect: object) -> None:
        """Parse ``rebalance_hosts`` as the pool will, naming the parameter on error.

        Only the dialect tells whether entries are network hosts (DNS names or
        addresses, with ports) or SQLite files.
        """
        found = self.settings.get("hosts")
        if found is None or not isinstance(dialect, Dialect):
            return
        param, raw, value = found
        adapter = targets.adapter_for(dialect)
        try:
            parse_hosts(value, adapter.default_port, adapter.paths)
        except ConfigurationError as err:
            raise ConfigurationError(
                f"{param.name}={_brief(raw)} (URL, plugin=rebalance): {err}"
            ) from None
