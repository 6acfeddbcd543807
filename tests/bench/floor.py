"""The floor: a bare aiohttp server that answers ``POST /v1/images/generations`` with fixed bytes.

It serves, verbatim, one response body that the real stack produced for the case being
measured, and does nothing else: no gRPC, no ledger, no JSON, no base64, no logging. Driven
with the same wrk settings as the stack, it shows what this machine, this Python and aiohttp
can do at best for that response size, so the stack's figures can be read as ratios to it.

Like the gateway it runs aiohttp on the default asyncio loop (the gateway does not use
uvloop), with the access log off.

    python -m tests.bench.floor --port 8099 --body response.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aiohttp import web

REQUEST_ID = "req_floor"


def create_app(body: bytes) -> web.Application:
    async def generations(request: web.Request) -> web.Response:
        # Read the (small) request body as the gateway does, then answer the captured bytes.
        await request.read()
        return web.Response(
            body=body, content_type="application/json", headers={"x-request-id": REQUEST_ID}
        )

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(body=b'{"status": "ok"}', content_type="application/json")

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.floor", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body", type=Path, required=True, help="file with the response body")
    args = parser.parse_args()
    web.run_app(
        create_app(args.body.read_bytes()),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
