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

A process that cannot start says why in one line on stderr (``exit_with_error``): a JSON
object like every other line when the logs are JSON, ``program: message`` otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, NoReturn, TextIO

import orjson
import structlog

LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class LogSettingError(ValueError):
    """IMAGEGEN_LOG_FORMAT or IMAGEGEN_LOG_LEVEL has a value no logger knows."""


class _WithoutTraceback(logging.Filter):
    """Keeps a library's record but not its traceback: one line, with the exception's type."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()} ({type(record.exc_info[1]).__name__})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def configure_logging(
    json_logs: bool | None = None,
    level: str | None = None,
    *,
    stream: TextIO | None = None,
    json_unless_terminal: bool = True,
) -> None:
    """Routes structlog and the standard library's logging to ``stream`` (stderr).

    Without ``json_logs``, ``IMAGEGEN_LOG_FORMAT`` decides; unset, JSON unless the stream is
    a terminal (or, with ``json_unless_terminal=False``, plain). A setting that names no
    format or level still leaves logging configured (the default format, INFO) and then
    raises LogSettingError, so that the caller can report it in that format."""
    output = sys.stderr if stream is None else stream
    problems: list[str] = []
    if json_logs is None:
        wanted = os.environ.get("IMAGEGEN_LOG_FORMAT", "").strip().lower()
        if wanted and wanted not in LOG_FORMATS:
            problems.append(
                f"IMAGEGEN_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}; got {wanted!r}"
            )
            wanted = ""
        json_logs = wanted == "json" or (
            not wanted and json_unless_terminal and not output.isatty()
        )
    raw_level = level or os.environ.get("IMAGEGEN_LOG_LEVEL") or "INFO"
    level_name = raw_level.strip().upper()
    # WARN and FATAL, the standard library's aliases, are taken too.
    if level_name not in LOG_LEVELS and level_name not in ("WARN", "FATAL"):
        source = "level" if level else "IMAGEGEN_LOG_LEVEL"
        problems.append(f"{source} must be one of {', '.join(LOG_LEVELS)}; got {raw_level!r}")
        level_name = "INFO"
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
    # asyncpg's pool logs a traceback each time it fails to reconnect while the database is
    # down; the service's own database.unavailable line already says so once.
    pool_log = logging.getLogger("asyncpg.pool")
    if not any(isinstance(f, _WithoutTraceback) for f in pool_log.filters):
        pool_log.addFilter(_WithoutTraceback())
    if problems:
        raise LogSettingError("; ".join(problems))


def start_logging(program: str, *, json_unless_terminal: bool = True) -> None:
    """``configure_logging`` from the environment for a process's ``main``: a setting it
    cannot use ends the process at once, in one line that names the variable."""
    try:
        configure_logging(json_unless_terminal=json_unless_terminal)
    except LogSettingError as exc:
        exit_with_error(program, str(exc))


def exit_with_error(program: str, message: str, status: int = 1) -> NoReturn:
    """Ends the process with ``status`` after one line on stderr: a ``startup.failed`` JSON
    object (``error`` holds the message) when the logs are JSON, else ``program: message``.
    The message is one line: it says what failed, why, and what to do about it."""
    message = " ".join(message.split())
    if structlog.get_config()["logger_factory"] is _LineLogger:
        structlog.get_logger(program).error("startup.failed", error=message)
        raise SystemExit(status)
    print(f"{program}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


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
