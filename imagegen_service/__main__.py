"""``imagegen-service``: runs the gRPC service in the foreground.

A start that cannot succeed (a bad setting, a taken port, an unreachable database, a schema
to migrate) ends with status 1 and one line on stderr that says what to do, in the log
format (``logging_setup.exit_with_error``).
"""

from __future__ import annotations

import asyncio

from imagegen_service.config import StartupError, load_config
from imagegen_service.eventloop import loop_factory
from imagegen_service.logging_setup import exit_with_error, start_logging
from imagegen_service.server import serve_forever
from imagegen_service.stores.ledger_sql import SchemaOutOfDate

PROGRAM = "imagegen-service"


def main() -> None:
    start_logging(PROGRAM)
    try:
        config = load_config()
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(serve_forever(config))
    except (StartupError, SchemaOutOfDate) as exc:
        exit_with_error(PROGRAM, str(exc))


if __name__ == "__main__":
    main()
