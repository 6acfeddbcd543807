"""structlog for the whole process: JSON lines in production, readable lines in a terminal.

The standard library's loggers (grpc, aiohttp, asyncio, alembic) go through the same
renderer, so every line of a process has one format.

In JSON, structlog's own lines (the per-request and per-generation lines among them) skip the
standard library: rendered with orjson and written straight to the stream, at a few
microseconds a line instead of ~40.

``IMAGEGEN_LOG_FORMAT``: ``json`` or ``console``; by default JSON unless stderr is a terminal.
``IMAGEGEN_LOG_LEVEL``: a standard level name, default ``INFO``.
What a prompt may leave in the logs is the service's setting (``IMAGEGEN_LOG_PROMPT_CHARS``,
read by ``config.py``): log calls never pass a prompt but its configured prefix.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, TextIO

import orjson
import structlog


def configure_logging(
    json_logs: bool | None = None, level: str | None = None, *, stream: TextIO | None = None
) -> None:
    """Routes structlog and the standard library's logging to ``stream`` (stderr)."""
    output = sys.stderr if stream is None else stream
    if json_logs is None:
        wanted = os.environ.get("IMAGEGEN_LOG_FORMAT", "").lower()
        json_logs = wanted == "json" or (wanted != "console" and not output.isatty())
    level_name = (level or os.environ.get("IMAGEGEN_LOG_LEVEL") or "INFO").upper()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # A console renderer prints tracebacks itself; JSON needs them turned into a string
    # (the library loggers' exc_info arrives here unformatted).
    rendering: list[structlog.types.Processor] = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        if json_logs
        else [structlog.dev.ConsoleRenderer()]
    )
    if json_logs:
        _LineLogger.output = output
        structlog.configure(
            processors=[
                *shared,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(serializer=_json_line),
            ],
            logger_factory=_LineLogger,
            wrapper_class=structlog.make_filtering_bound_logger(
                logging.getLevelNamesMapping()[level_name]
            ),
            cache_logger_on_first_use=True,
        )
    else:
        structlog.configure(
            processors=[
                *shared,
                structlog.processors.format_exc_info,
                structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
            ],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.stdlib.BoundLogger,
            cache_logger_on_first_use=True,
        )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
    )
    handler = logging.StreamHandler(output)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_name)
    # aiohttp's access log duplicates our own per-request line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # At DEBUG it writes every SQL statement with its parameters: noise, and ledger data.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)


def _json_line(event: Any, **_: Any) -> str:
    return orjson.dumps(event, default=str).decode()


class _LineLogger:
    """structlog's logger for JSON: each rendered line goes straight to the process's log
    stream. The stream is looked up per line, so loggers created (and cached) before a
    later ``configure_logging`` follow it."""

    output: TextIO = sys.stderr
    _lock = threading.Lock()

    def __init__(self, name: str = "", *_: Any) -> None:
        # structlog.stdlib.add_logger_name reads it.
        self.name = name

    def msg(self, message: str) -> None:
        with self._lock:
            self.output.write(message + "\n")
            self.output.flush()

    debug = info = warning = warn = error = critical = exception = fatal = msg
