"""structlog for the whole process: JSON lines in production, readable lines in a terminal.

The standard library's loggers (grpc, aiohttp, alembic) go through the same renderer.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(json_logs: bool | None = None, level: str | None = None) -> None:
    if json_logs is None:
        json_logs = os.environ.get("IMAGEGEN_LOG_FORMAT", "") == "json" or not sys.stderr.isatty()
    level_name = (level or os.environ.get("IMAGEGEN_LOG_LEVEL") or "INFO").upper()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer()
    )
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
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_name)
    # aiohttp's access log duplicates our own per-request line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
