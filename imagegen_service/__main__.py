"""``imagegen-service``: runs the gRPC service in the foreground."""

from __future__ import annotations

import asyncio
import sys

from imagegen_service.config import ConfigError, load_config
from imagegen_service.eventloop import loop_factory
from imagegen_service.logging_setup import configure_logging
from imagegen_service.server import serve_forever
from imagegen_service.stores.ledger_sql import SchemaOutOfDate


def main() -> None:
    configure_logging()
    try:
        config = load_config()
    except ConfigError as exc:
        sys.exit(f"imagegen-service: {exc}")
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(serve_forever(config))
    except SchemaOutOfDate as exc:
        sys.exit(f"imagegen-service: {exc}")


if __name__ == "__main__":
    main()
