"""A loopback image upstream for the benchmarks: OpenAI's Images API, answering at once
(or after ``--delay`` seconds) with one fixed PNG.

``POST /v1/images/generations`` reads the JSON body and answers OpenAI's ``ImagesResponse``
shape: ``created`` and ``n`` items of ``{"b64_json": ...}`` (``n`` from the request), plus a
gpt-image ``usage`` object when the requested model is gpt-image-like (``gpt-image*``,
``chatgpt-image*``). The PNG is the 256x256 picture the ``local`` provider draws when
``precomputed = true`` (``imagegen_service.providers.local``), the bytes the floor serves in
cases 1 and 2; it is drawn once at start, and each answer's JSON is built once per ``n``.

The benchmark's ``openai`` provider points its ``base_url`` here, so the stack makes the
HTTP call production makes, to a server that costs (almost) nothing. Like the floor it runs
aiohttp on the default asyncio loop with the access log off. ``GET /healthz`` answers once
it listens; ``GET /stats`` counts the answers sent and the images in them, so the harness
can check that nothing was charged that the upstream did not generate.

    python -m tests.bench.upstream --port 8098 [--delay 2.0]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time

from aiohttp import web

from imagegen_service.providers.local import _PRECOMPUTED_PROMPT, render_image

SIZE = 256
GPT_IMAGE_PREFIXES = ("gpt-image", "chatgpt-image")


def bench_png() -> bytes:
    """The local provider's precomputed 256x256 PNG (the floor's image in cases 1 and 2)."""
    return render_image(_PRECOMPUTED_PROMPT, SIZE, SIZE, 0, "png")


def create_app(png: bytes, delay: float) -> web.Application:
    b64 = base64.b64encode(png).decode()
    # One encoded answer per (n, gpt-image-like): the upstream should cost nothing per call.
    answers: dict[tuple[int, bool], bytes] = {}
    stats = {"answers": 0, "images": 0}

    def answer(n: int, gpt_image: bool) -> bytes:
        key = (n, gpt_image)
        body = answers.get(key)
        if body is None:
            shaped: dict[str, object] = {
                "created": int(time.time()),
                "data": [{"b64_json": b64} for _ in range(n)],
            }
            if gpt_image:
                # The shape of gpt-image's usage (types/images_response.py): a 256x256 image
                # is not a real gpt-image size, so these counts are only plausible ones.
                shaped["usage"] = {
                    "input_tokens": 12,
                    "input_tokens_details": {"image_tokens": 0, "text_tokens": 12},
                    "output_tokens": 272 * n,
                    "total_tokens": 12 + 272 * n,
                }
            body = answers.setdefault(key, json.dumps(shaped).encode())
        return body

    async def generations(request: web.Request) -> web.Response:
        try:
            payload = json.loads(await request.read())
            n = int(payload.get("n") or 1)
            model = str(payload.get("model") or "")
        except (ValueError, TypeError, AttributeError):
            return web.json_response(
                {"error": {"message": "bad request", "type": "invalid_request_error"}},
                status=400,
            )
        if delay > 0:
            await asyncio.sleep(delay)
        n = max(1, n)
        response = web.Response(
            body=answer(n, model.lower().startswith(GPT_IMAGE_PREFIXES)),
            content_type="application/json",
        )
        # Counted as generated once the answer is handed over: aiohttp does not cancel a
        # handler whose client has left, so a caller that gave up is counted too.
        stats["answers"] += 1
        stats["images"] += n
        return response

    async def stats_view(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(body=b'{"status": "ok"}', content_type="application/json")

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/stats", stats_view)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--backlog", type=int, default=4096, help="listen backlog")
    args = parser.parse_args()
    web.run_app(
        create_app(bench_png(), args.delay),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        backlog=args.backlog,
    )


if __name__ == "__main__":
    main()
