"""``imagegen-gateway``: runs the HTTP gateway in the foreground.

A start that cannot succeed (a bad setting, a taken port) ends with status 1 and one line on
stderr, in the log format (``logging_setup.exit_with_error``).
"""

from __future__ import annotations

import errno
import socket

from aiohttp import web

from http_gateway.app import create_app
from http_gateway.config import GatewayConfig, load_gateway_config
from imagegen_service.eventloop import freeze_startup_heap, loop_factory
from imagegen_service.logging_setup import exit_with_error, start_logging

PROGRAM = "imagegen-gateway"
_PORT_SETTING = "IMAGEGEN_HTTP_PORT (or [gateway] http_port)"


def main() -> None:
    start_logging(PROGRAM)
    try:
        config = load_gateway_config()
    except ValueError as exc:
        exit_with_error(PROGRAM, str(exc))
    factory = loop_factory()
    app = create_app(config)

    async def freeze(_: web.Application) -> None:
        freeze_startup_heap()

    app.on_startup.append(freeze)
    try:
        web.run_app(
            app,
            loop=factory() if factory else None,
            host=config.http_host,
            port=config.http_port,
            print=None,
            access_log=None,
            shutdown_timeout=30.0,
        )
    except OSError as exc:
        # What binding the port raises; once serving, nothing lets an OSError out.
        if exc.errno in _LISTEN_ERRORS or isinstance(exc, socket.gaierror):
            exit_with_error(PROGRAM, _listen_error(config, exc))
        raise


_LISTEN_ERRORS = (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)


def _listen_error(config: GatewayConfig, exc: OSError) -> str:
    where = f"cannot listen on {config.http_host}:{config.http_port} (HTTP)"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{where}: another process is already listening on port {config.http_port}; "
            f"stop it, or choose another port with {_PORT_SETTING}"
        )
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied; choose a port above 1023 with {_PORT_SETTING}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {config.http_host} is not an address of this machine; correct the host"
    # socket.gaierror: the host does not resolve.
    return f"{where}: {(exc.strerror or str(exc)).lower()}; correct [gateway] http_host"


if __name__ == "__main__":
    main()
