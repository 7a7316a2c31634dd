"""Why a connect failed, in one word: ``deadline exceeded``, ``refused`` or ``error``.

Split out of :mod:`sqla_rebalance.hosts`: drivers word and wrap connect errors
in many ways, and reading them (the chain of causes, the messages of
libmysqlclient, asyncio, psycopg...) is a concern of its own, apart from the
host set that records the result. Also importable from
:mod:`sqla_rebalance.hosts`.
"""

from __future__ import annotations

import errno
import re

from .errors import DeadlineExceeded

__all__ = ["failure_reason"]


def failure_reason(error: BaseException | str) -> str:
    """``deadline exceeded`` (a host that hangs), ``refused`` (nothing listens) or ``error``.

    Drivers word a refusal differently and some wrap it: the chain of causes
    is read too (aiomysql keeps the ``ConnectionRefusedError`` in ``__cause__``,
    SQLAlchemy's ``DBAPIError`` in ``orig``). asyncmy and asyncio say
    ``[Errno 111] Connect call failed``; mysqlclient (libmariadb) reports a
    refused non-blocking connect as ``Can't connect to server ... (115)``.
    """
    for err in _causes(error):
        if isinstance(err, DeadlineExceeded):
            return "deadline exceeded"
        if isinstance(err, ConnectionRefusedError) or (
            isinstance(err, OSError) and err.errno == errno.ECONNREFUSED
        ):
            return "refused"
    text = " | ".join(str(err).lower() for err in _causes(error))
    if "refused" in text or f"[errno {errno.ECONNREFUSED}]" in text or _MYSQL_REFUSED.search(text):
        return "refused"
    if any(isinstance(err, TimeoutError) for err in _causes(error)) or (
        "timeout expired" in text or "timed out" in text
    ):
        return "deadline exceeded"  # the driver's own connect timeout
    return "error"


#: libmysqlclient/libmariadb: "Can't connect to (MySQL) server on 'h' (111)" or (115).
_MYSQL_REFUSED = re.compile(r"can't connect to .*\((111|115)\)")


def _causes(error: BaseException | str) -> list[BaseException | str]:
    """``error``, its ``orig`` (SQLAlchemy) and its causes, each once, at most eight."""
    found: list[BaseException | str] = []
    todo: list[object] = [error]
    while todo and len(found) < 8:
        err = todo.pop(0)
        if not isinstance(err, (BaseException, str)) or any(err is f for f in found):
            continue
        found.append(err)
        if isinstance(err, BaseException):
            todo += [getattr(err, "orig", None), err.__cause__, err.__context__]
    return found


def _one_line(error: BaseException | str) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]
