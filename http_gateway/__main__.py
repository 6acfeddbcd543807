"""``imagegen-gateway``: runs the HTTP gateway in the foreground."""

from __future__ import annotations

import sys

from aiohttp import web

from http_gateway.app import create_app
from http_gateway.config import load_gateway_config
from imagegen_service.eventloop import freeze_startup_heap, loop_factory
from imagegen_service.logging_setup import configure_logging


def main() -> None:
    configure_logging()
    try:
        config = load_gateway_config()
    except ValueError as exc:
        sys.exit(f"imagegen-gateway: {exc}")
    factory = loop_factory()
    app = create_app(config)

    async def freeze(_: web.Application) -> None:
        freeze_startup_heap()

    app.on_startup.append(freeze)
    web.run_app(
        app,
        loop=factory() if factory else None,
        host=config.http_host,
        port=config.http_port,
        print=None,
        access_log=None,
        shutdown_timeout=30.0,
    )


if __name__ == "__main__":
    main()
