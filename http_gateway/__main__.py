"""``imagegen-gateway``: runs the HTTP gateway in the foreground.

A start that cannot succeed (a bad setting, a taken port) ends with status 1 and one line on
stderr, in the log format (``logging_setup.exit_with_error``).

SIGTERM or SIGINT: /readyz fails at once, the listener closes, and the requests in flight get
up to ``app.drain_seconds`` (their gRPC deadline and a margin) to finish; then the gRPC
channel closes and the process exits 0. A second signal cancels what is left and stops at
once. The signals are handled here rather than by ``web.run_app``, whose handler raises in
the middle of the drain when a second signal arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
import time

import structlog
from aiohttp import web

from http_gateway.app import STOPPING, create_app, drain_seconds
from http_gateway.config import GatewayConfig, load_gateway_config
from imagegen_service.eventloop import freeze_startup_heap, loop_factory
from imagegen_service.logging_setup import exit_with_error, start_logging
from imagegen_service.startup import listen_error

PROGRAM = "imagegen-gateway"
_PORT_SETTING = "IMAGEGEN_HTTP_PORT (or [gateway] http_port)"

log = structlog.get_logger("imagegen.gateway")

# Connections the kernel may hold before the gateway accepts them (capped by the kernel's
# net.core.somaxconn). aiohttp's 128 drops a burst of new clients' handshakes, each then
# retried a second or more later.
LISTEN_BACKLOG = 4096


async def serve(config: GatewayConfig) -> None:
    """Serves until a signal, then drains (see the module docstring)."""
    app = create_app(config)
    grace = drain_seconds(config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=grace)
    await runner.setup()
    try:
        await web.TCPSite(
            runner, config.http_host, config.http_port, backlog=LISTEN_BACKLOG
        ).start()
    except BaseException:
        await runner.cleanup()
        raise
    freeze_startup_heap()
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    await signalled.wait()
    signalled.clear()
    app[STOPPING].set()
    started = time.monotonic()
    log.info("gateway.stopping", grace_seconds=grace)
    draining = asyncio.create_task(_drain(runner))
    again = asyncio.create_task(signalled.wait())
    await asyncio.wait((draining, again), return_when=asyncio.FIRST_COMPLETED)
    again.cancel()
    if not draining.done():
        # The requests still in flight are cancelled as the event loop closes.
        log.warning("gateway.stopping_now", drained_seconds=round(time.monotonic() - started, 1))
        draining.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await draining
        return
    await draining
    log.info("gateway.stopped", drained_seconds=round(time.monotonic() - started, 1))


# How long the listeners stay closed before the drain starts (see _drain).
ACCEPT_SETTLE_SECONDS = 0.05


async def _drain(runner: web.AppRunner) -> None:
    """Closes the listeners, then lets aiohttp drain.

    aiohttp's own drain closes the listeners and marks every connection closing in the same
    loop iteration. A connection accepted in that instant (a client polling /healthz as the
    signal arrives) was seen to get no answer at all, its request dropped, while the drain
    waited out its whole grace for it: the handler that reads a connection's requests runs
    as a task of its own, and one not yet started when its connection is marked closing
    ignores the request that then arrives and waits for another. Letting the loop run a
    moment between the two starts every such handler first; the drain then serves its
    request or closes it."""
    for site in runner.sites:
        await site.stop()
    await asyncio.sleep(ACCEPT_SETTLE_SECONDS)
    await runner.cleanup()


def main() -> None:
    start_logging(PROGRAM)
    try:
        config = load_gateway_config()
    except ValueError as exc:
        exit_with_error(PROGRAM, str(exc))
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(serve(config))
    except OSError as exc:
        # What binding the port raises; once serving, nothing lets an OSError out.
        if exc.errno in _LISTEN_ERRORS or isinstance(exc, socket.gaierror):
            exit_with_error(
                PROGRAM,
                listen_error(config.http_host, config.http_port, "HTTP", _PORT_SETTING, exc),
            )
        raise


_LISTEN_ERRORS = (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)


if __name__ == "__main__":
    main()
