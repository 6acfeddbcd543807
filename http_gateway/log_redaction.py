"""Keeps what callers send out of the log lines of the libraries the gateway runs.

aiohttp logs a request it cannot parse with the parser's exception, and that exception
quotes the offending bytes: a header line with ``Authorization: Bearer sk-…`` in it, a body
with its prompt (``Data after `Connection: close```, a broken chunk), a request line with
its query string. The gateway's own lines never carry those; these filters make aiohttp's
(and asyncio's) lines keep their event, level, exception type and traceback, and drop the
bytes. aiohttp's access log is dropped whole: the gateway writes its own ``http.request``
line, and the access line would carry the request line, ``Referer`` and ``User-Agent``.
aiohttp's warnings about malformed form parts, which Python prints with the part's header,
are ignored.
"""

from __future__ import annotations

import logging
import re
import warnings

from aiohttp.http_exceptions import HttpProcessingError

from http_gateway.uploads import MALFORMED_PART_WARNINGS

# The loggers aiohttp writes to (aiohttp/log.py), and asyncio's, whose "exception was never
# retrieved" lines can carry an aiohttp exception too.
REDACTED_LOGGERS = (
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.internal",
    "aiohttp.websocket",
    "aiohttp.client",
    "asyncio",
)
ACCESS_LOGGER = "aiohttp.access"
WITHHELD = "[request bytes withheld]"
# What of a library's message is kept: its leading words, up to the first quote, colon or
# anything else that starts quoting the request (b'…', '…', "…", ": …"). llhttp's reasons
# are fixed texts that may hold a colon or an apostrophe ("Data after `Connection: close`",
# "Transfer-Encoding can't be present with Content-Length").
_LEADING_WORDS = re.compile(r"[A-Za-z0-9 _`.,()/-]*")
_LLHTTP_REASON = re.compile(r"[A-Za-z0-9 _`.,()/:'-]*")


class _Withheld(Exception):
    """Stands in for a library's exception in a log line: same name, same traceback, a
    message without the request's bytes, no chained exceptions."""


_STAND_INS: dict[type[BaseException], type[_Withheld]] = {}


def _stand_in_class(cls: type[BaseException]) -> type[_Withheld]:
    stand_in = _STAND_INS.get(cls)
    if stand_in is None:
        stand_in = type(cls.__name__, (_Withheld,), {})
        # Rendered tracebacks name it as the original: aiohttp.http_exceptions.BadHttpMessage.
        stand_in.__module__ = cls.__module__
        stand_in.__qualname__ = cls.__qualname__
        _STAND_INS[cls] = stand_in
    return stand_in


def summary(exc: BaseException) -> str:
    """What may be logged of ``exc``: its leading words and, for aiohttp's HTTP errors, the
    status code. ``Invalid header value char``, ``Data after `Connection: close```."""
    if isinstance(exc, HttpProcessingError):
        text, prefix = exc.message, f"{exc.code}, message: "
    else:
        text, prefix = str(exc), ""
    # llhttp's messages are "<reason>:\n\n  <the bytes>"; aiohttp's own, "<reason>: <bytes>".
    if ":\n" in text:
        words = _LLHTTP_REASON.match(text.split(":\n", 1)[0])
    else:
        words = _LEADING_WORDS.match(text.split(": ", 1)[0])
    kept = (words.group(0) if words else "").strip()[:100]
    return f"{prefix}{kept} {WITHHELD}" if kept else f"{prefix}{WITHHELD}"


def redacted(exc: BaseException) -> BaseException:
    if isinstance(exc, _Withheld):
        return exc
    stand_in = _stand_in_class(type(exc))(summary(exc))
    stand_in.__suppress_context__ = True
    return stand_in


class RedactRequestBytes(logging.Filter):
    """Replaces the exception of a record (and any exception among its arguments) with a
    stand-in that keeps its type and traceback but not its message's quoted bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            _, exc, tb = record.exc_info
            stand_in = redacted(exc).with_traceback(tb if tb is not None else exc.__traceback__)
            record.exc_info = (type(stand_in), stand_in, stand_in.__traceback__)
            # A handler may have formatted it already; that text has the bytes.
            record.exc_text = None
        if isinstance(record.args, tuple) and any(
            isinstance(a, BaseException) for a in record.args
        ):
            record.args = tuple(
                summary(a) if isinstance(a, BaseException) else a for a in record.args
            )
        return True


class DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


_REDACT = RedactRequestBytes()
_DROP = DropAll()


def install() -> None:
    """Adds the filters to the loggers (once, however many apps a process creates). A
    logger's filters stay when logging is reconfigured, unlike its handlers. aiohttp's
    warnings about a malformed form part quote the part's header; they go to stderr past
    any logger, so they are ignored (the caller gets its 400)."""
    for category in MALFORMED_PART_WARNINGS:
        warnings.filterwarnings("ignore", category=category)
    for name in REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if _REDACT not in logger.filters:
            logger.addFilter(_REDACT)
    access = logging.getLogger(ACCESS_LOGGER)
    if _DROP not in access.filters:
        access.addFilter(_DROP)
