"""A gateway newer than its service, as during a rollout: the service predates
GenerateImagesUnary, and one-image requests still succeed through GenerateImages."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator

import aiohttp
import grpc
from aiohttp import web
from PIL import Image

from http_gateway.app import create_app
from http_gateway.config import GatewayConfig
from imagegen_service.gen import images_pb2, images_pb2_grpc


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


class OlderService(images_pb2_grpc.ImageGenerationServicer):
    """Only GenerateImages, as before the unary call; every other RPC is UNIMPLEMENTED
    (the generated base class)."""

    def __init__(self) -> None:
        self.streamed = 0
        self.png = _png()

    async def GenerateImages(
        self,
        request: images_pb2.GenerateImagesRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[images_pb2.GenerateImagesResponse]:
        self.streamed += 1
        yield images_pb2.GenerateImagesResponse(
            image=images_pb2.GeneratedImage(
                index=0, data=self.png, mime_type="image/png", width=256, height=256
            )
        )
        yield images_pb2.GenerateImagesResponse(
            summary=images_pb2.GenerationSummary(
                created=1_700_000_000, model=request.model, images=1, cost_micros=1_000
            )
        )


async def test_one_image_is_served_by_a_service_without_the_unary_call() -> None:
    older = OlderService()  # type: ignore[abstract]
    server = grpc.aio.server()
    images_pb2_grpc.add_ImageGenerationServicer_to_server(older, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    runner = web.AppRunner(create_app(GatewayConfig(service_address=f"127.0.0.1:{port}")))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, http_port = runner.addresses[0][:2]
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://{host}:{http_port}/v1/images/generations",
                json={"model": "m", "prompt": "p", "response_format": "b64_json"},
                headers={"Authorization": "Bearer sk-ig-anything"},
            ) as resp,
        ):
            assert resp.status == 200, await resp.text()
            body = await resp.json()
    finally:
        await runner.cleanup()
        await server.stop(None)
    assert base64.b64decode(body["data"][0]["b64_json"]) == older.png
    assert older.streamed == 1
