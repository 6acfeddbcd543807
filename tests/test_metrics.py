"""Metrics through the real stack: real requests through the gateway, then a scrape of the
gateway's ``/metrics`` and of the service's metrics port, read with Prometheus' own parser.

The stack here is the module's own (its service serves metrics on a free port), so counters
move only by what these tests do; each test still compares before and after.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import aiohttp
import grpc
import pytest
from grpc_health.v1.health_pb2 import HealthCheckRequest
from grpc_health.v1.health_pb2_grpc import HealthStub
from prometheus_client.parser import text_string_to_metric_families

from imagegen_service.config import load_config
from imagegen_service.gen import images_pb2, images_pb2_grpc
from imagegen_service.server import start_service
from tests.conftest import UPSTREAM_KEY, bearer
from tests.fakes.loopback import free_port
from tests.fakes.openai_upstream import (
    FakeOpenAIUpstream,
    content_policy_violation,
    server_error,
    slow,
)
from tests.stack import Stack, start_stack

IMAGES = "imagegen.v1.ImageGeneration"
LOCAL_256 = 1_000
FAKE_DALLE = 20_000
FAILOVER_QUOTE = 30_000


def _config_toml(upstream_url: str, dead_port: int) -> str:
    return textwrap.dedent(
        f"""
        [routing]
        backoff_base_seconds = 0.01
        backoff_max_seconds = 0.02
        breaker_failures = 1000

        [providers.local]
        type = "local"

        [providers.upstream]
        type = "openai"
        base_url = "{upstream_url}"
        api_key_env = "IMAGEGEN_TEST_UPSTREAM_KEY"
        timeout_seconds = 2
        max_retries = 1

        [providers.impatient]
        type = "openai"
        base_url = "{upstream_url}"
        api_key_env = "IMAGEGEN_TEST_UPSTREAM_KEY"
        timeout_seconds = 0.2
        max_retries = 0

        [providers.deadend]
        type = "openai"
        base_url = "http://127.0.0.1:{dead_port}/v1"
        api_key_env = "IMAGEGEN_TEST_UPSTREAM_KEY"
        max_retries = 0

        [models.local-sketch]
        provider = "local"
        sizes = ["256x256"]
        max_images = 4

        [models.local-sketch.price_usd]
        default = "0.001"

        [models.fake-dalle]
        provider = "upstream"
        upstream_model = "dall-e-2"
        sizes = ["256x256"]

        [models.fake-dalle.price_usd]
        default = "0.02"

        [models.impatient-dalle]
        provider = "impatient"
        upstream_model = "dall-e-2"
        sizes = ["256x256"]

        [models.impatient-dalle.price_usd]
        default = "0.02"

        # The dead end first (dearer: it sets the quote), then the fake upstream.
        [models.failover-dalle]
        sizes = ["256x256"]

        [models.failover-dalle.price_usd]
        default = "0.02"

        [[models.failover-dalle.deployments]]
        provider = "deadend"
        upstream_model = "dall-e-2"

        [models.failover-dalle.deployments.price_usd]
        default = "0.03"

        [[models.failover-dalle.deployments]]
        provider = "upstream"
        upstream_model = "dall-e-2"
        """
    )


@dataclass
class MeteredStack(Stack):
    fake: FakeOpenAIUpstream = field(kw_only=True)
    # Every secret and per-request value these tests used: none may be a label value.
    unbounded: set[str] = field(default_factory=set, kw_only=True)

    async def scrape_gateway(self, http: aiohttp.ClientSession) -> Scrape:
        async with http.get(self.http_url + "/metrics") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/plain"
            return Scrape(await resp.text())

    async def scrape_service(self, http: aiohttp.ClientSession) -> Scrape:
        url = f"http://127.0.0.1:{self.running.metrics_port}/metrics"
        async with http.get(url) as resp:
            assert resp.status == 200
            return Scrape(await resp.text())

    async def funded_key(self, balance_micros: int = 1_000_000) -> str:
        account_id, secret, key_id = await self.new_account(balance_micros)
        self.unbounded.update({account_id, secret, key_id})
        return secret

    async def generate(
        self,
        http: aiohttp.ClientSession,
        key: str,
        model: str,
        *,
        n: int = 1,
        response_format: str = "url",
    ) -> aiohttp.ClientResponse:
        request_id = f"req-metrics-{len(self.unbounded)}"
        prompt = f"a unique prompt number {len(self.unbounded)}"
        self.unbounded.update({request_id, prompt})
        body = {
            "model": model,
            "prompt": prompt,
            "n": n,
            "size": "256x256",
            "response_format": response_format,
        }
        async with http.post(
            self.http_url + "/v1/images/generations",
            json=body,
            headers={**bearer(key), "x-request-id": request_id},
        ) as resp:
            await resp.read()
            return resp


class Scrape:
    def __init__(self, text: str) -> None:
        self.samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(
            value
            for sample_name, sample_labels, value in self.samples
            if sample_name == name and labels.items() <= sample_labels.items()
        )

    def label_values(self) -> set[str]:
        return {value for _, labels, _ in self.samples for value in labels.values()}


def moved(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


@pytest.fixture(scope="module")
async def metered(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MeteredStack]:
    async with FakeOpenAIUpstream(api_key=UPSTREAM_KEY) as fake:
        root = tmp_path_factory.mktemp("metered")
        async with start_stack(
            _config_toml(fake.base_url, free_port()),
            root,
            environ={
                "IMAGEGEN_TEST_UPSTREAM_KEY": UPSTREAM_KEY,
                "IMAGEGEN_METRICS_PORT": str(free_port()),
            },
            stack_class=MeteredStack,
            fake=fake,
        ) as running:
            yield cast(MeteredStack, running)


@pytest.fixture
def upstream(metered: MeteredStack) -> Iterator[FakeOpenAIUpstream]:
    metered.fake.reset()
    yield metered.fake
    metered.fake.reset()


async def test_a_generation_moves_http_grpc_and_domain_metrics(
    metered: MeteredStack, http: aiohttp.ClientSession
) -> None:
    key = await metered.funded_key()
    gateway_before, service_before = (
        await metered.scrape_gateway(http),
        await metered.scrape_service(http),
    )

    # Two images as bytes: streamed, one message each.
    resp = await metered.generate(http, key, "local-sketch", n=2, response_format="b64_json")
    assert resp.status == 200

    gateway, service = await metered.scrape_gateway(http), await metered.scrape_service(http)
    route = {"route": "/v1/images/generations", "method": "POST"}
    assert moved(gateway_before, gateway, "http_requests_total", **route, status="200") == 1
    assert moved(gateway_before, gateway, "http_request_duration_seconds_count", **route) == 1
    rpc = {"grpc_type": "server_stream", "grpc_service": IMAGES, "grpc_method": "GenerateImages"}
    assert moved(service_before, service, "grpc_server_started_total", **rpc) == 1
    assert moved(service_before, service, "grpc_server_handled_total", **rpc, grpc_code="OK") == 1
    assert moved(service_before, service, "grpc_server_handling_seconds_count", **rpc) == 1
    # Two images and the summary.
    assert moved(service_before, service, "grpc_server_msg_sent_total", **rpc) == 3
    assert (
        moved(
            service_before,
            service,
            "imagegen_images_generated_total",
            model="local-sketch",
            provider="local",
        )
        == 2
    )
    assert moved(service_before, service, "imagegen_generations_total", status="ok") == 1
    assert (
        moved(
            service_before,
            service,
            "imagegen_provider_request_seconds_count",
            provider="local",
        )
        == 1
    )
    assert moved(service_before, service, "imagegen_captured_microdollars_total") == 2 * LOCAL_256
    assert moved(service_before, service, "imagegen_released_microdollars_total") == 0
    assert service.value("imagegen_open_holds") == 0


@pytest.mark.parametrize(
    ("n", "response_format", "method", "grpc_type"),
    [
        (1, "b64_json", "GenerateImagesUnary", "unary"),
        (3, "url", "GenerateImagesUnary", "unary"),
        (2, "b64_json", "GenerateImages", "server_stream"),
    ],
)
async def test_the_gateway_streams_only_answers_of_several_images_as_bytes(
    metered: MeteredStack,
    http: aiohttp.ClientSession,
    n: int,
    response_format: str,
    method: str,
    grpc_type: str,
) -> None:
    key = await metered.funded_key()
    before = await metered.scrape_service(http)

    resp = await metered.generate(http, key, "local-sketch", n=n, response_format=response_format)
    assert resp.status == 200
    assert len((await resp.json())["data"]) == n

    after = await metered.scrape_service(http)
    rpc = {"grpc_service": IMAGES, "grpc_method": method, "grpc_type": grpc_type}
    assert moved(before, after, "grpc_server_handled_total", **rpc, grpc_code="OK") == 1
    assert moved(before, after, "imagegen_captured_microdollars_total") == n * LOCAL_256


async def test_refusals_are_counted_by_grpc_code_and_402s_on_their_own(
    metered: MeteredStack, http: aiohttp.ClientSession
) -> None:
    poor = await metered.funded_key(balance_micros=10)
    service_before, gateway_before = (
        await metered.scrape_service(http),
        await metered.scrape_gateway(http),
    )

    assert (await metered.generate(http, poor, "local-sketch")).status == 402
    assert (await metered.generate(http, "sk-ig-not-a-real-key", "local-sketch")).status == 401

    service, gateway = await metered.scrape_service(http), await metered.scrape_gateway(http)
    # One image: the gateway asks for it in one unary call.
    rpc = {"grpc_service": IMAGES, "grpc_method": "GenerateImagesUnary"}
    assert moved(service_before, service, "imagegen_insufficient_balance_total") == 1
    assert (
        moved(service_before, service, "imagegen_generations_total", status="insufficient_balance")
        == 1
    )
    assert (
        moved(
            service_before,
            service,
            "grpc_server_handled_total",
            **rpc,
            grpc_code="FAILED_PRECONDITION",
        )
        == 1
    )
    assert (
        moved(
            service_before, service, "grpc_server_handled_total", **rpc, grpc_code="UNAUTHENTICATED"
        )
        == 1
    )
    route = {"route": "/v1/images/generations"}
    assert moved(gateway_before, gateway, "http_requests_total", **route, status="402") == 1
    assert moved(gateway_before, gateway, "http_requests_total", **route, status="401") == 1
    # Nothing was charged, nothing is left held.
    assert moved(service_before, service, "imagegen_captured_microdollars_total") == 0
    assert service.value("imagegen_open_holds") == 0


async def test_provider_trouble_counts_errors_by_kind_retries_and_failovers(
    metered: MeteredStack, upstream: FakeOpenAIUpstream, http: aiohttp.ClientSession
) -> None:
    key = await metered.funded_key()
    before = await metered.scrape_service(http)

    upstream.script(server_error())  # then the default answer: the retry succeeds
    assert (await metered.generate(http, key, "fake-dalle")).status == 200
    upstream.script(content_policy_violation())
    assert (await metered.generate(http, key, "fake-dalle")).status == 400
    upstream.script(slow(1.0))
    assert (await metered.generate(http, key, "impatient-dalle")).status == 502
    assert (await metered.generate(http, key, "failover-dalle")).status == 200

    after = await metered.scrape_service(http)
    errors = "imagegen_provider_errors_total"
    assert moved(before, after, errors, provider="upstream", kind="upstream_error") == 1
    assert moved(before, after, errors, provider="upstream", kind="content_policy") == 1
    assert moved(before, after, errors, provider="impatient", kind="timeout") == 1
    assert moved(before, after, errors, provider="deadend", kind="upstream_error") == 1
    assert moved(before, after, "imagegen_provider_retries_total", provider="upstream") == 1
    assert moved(before, after, "imagegen_provider_failovers_total", provider="deadend") == 1
    assert moved(before, after, "imagegen_provider_failovers_total", provider="impatient") == 1
    # Each call is timed, failed or not: two for the retried one, one each for the others,
    # and the failover's second deployment.
    seconds = "imagegen_provider_request_seconds_count"
    assert moved(before, after, seconds, provider="upstream") == 4
    assert moved(before, after, seconds, provider="deadend") == 1
    generations = "imagegen_generations_total"
    assert moved(before, after, generations, status="ok") == 2
    assert moved(before, after, generations, status="content_policy") == 1
    assert moved(before, after, generations, status="upstream_error") == 1
    images = "imagegen_images_generated_total"
    assert moved(before, after, images, model="fake-dalle", provider="upstream") == 1
    assert moved(before, after, images, model="failover-dalle", provider="upstream") == 1
    # Charged: two images at the upstream's price. Released: the two failures' quotes in
    # full, and what the failover's quote (the dead end's dearer price) did not use.
    assert moved(before, after, "imagegen_captured_microdollars_total") == 2 * FAKE_DALLE
    assert moved(before, after, "imagegen_released_microdollars_total") == (
        2 * FAKE_DALLE + (FAILOVER_QUOTE - FAKE_DALLE)
    )
    assert after.value("imagegen_open_holds") == 0


async def test_open_holds_count_generations_in_flight_and_a_cancel_releases_its_hold(
    metered: MeteredStack, upstream: FakeOpenAIUpstream, http: aiohttp.ClientSession
) -> None:
    key = await metered.funded_key()
    before = await metered.scrape_service(http)
    upstream.script(slow(5.0))
    call = images_pb2_grpc.ImageGenerationStub(metered.channel).GenerateImages(
        images_pb2.GenerateImagesRequest(model="fake-dalle", prompt="p", size="256x256"),
        metadata=(("authorization", f"Bearer {key}"),),
    )
    for _ in range(200):
        if upstream.hits:
            break
        await asyncio.sleep(0.01)
    assert (await metered.scrape_service(http)).value("imagegen_open_holds") == 1

    call.cancel()

    for _ in range(200):
        after = await metered.scrape_service(http)
        if moved(before, after, "imagegen_generations_total", status="cancelled"):
            break
        await asyncio.sleep(0.01)
    assert moved(before, after, "imagegen_generations_total", status="cancelled") == 1
    assert after.value("imagegen_open_holds") == 0
    assert moved(before, after, "imagegen_released_microdollars_total") == FAKE_DALLE
    assert moved(before, after, "imagegen_captured_microdollars_total") == 0


async def test_routes_are_labelled_by_their_pattern_never_the_raw_path(
    metered: MeteredStack, http: aiohttp.ClientSession
) -> None:
    key = await metered.funded_key()
    token = "tok-" + "x" * 40
    metered.unbounded.add(token)
    before = await metered.scrape_gateway(http)

    async with http.get(metered.http_url + f"/v1/files/images/{token}") as resp:
        assert resp.status in (400, 404)
    async with http.get(metered.http_url + "/no/such/path/" + token) as resp:
        assert resp.status == 404
    async with http.request("PROPFIND", metered.http_url + "/v1/models") as resp:
        assert resp.status == 405
    async with http.get(metered.http_url + "/v1/models", headers=bearer(key)) as resp:
        assert resp.status == 200

    after = await metered.scrape_gateway(http)
    requests = "http_requests_total"
    assert moved(before, after, requests, route="/v1/files/images/{token}", method="GET") == 1
    assert moved(before, after, requests, route="unmatched", status="404") == 1
    assert moved(before, after, requests, method="other", status="405") == 1
    assert moved(before, after, requests, route="/v1/models", method="GET", status="200") == 1


async def test_unary_rpcs_are_counted_too(
    metered: MeteredStack, http: aiohttp.ClientSession
) -> None:
    key = await metered.funded_key()
    before = await metered.scrape_service(http)
    async with http.get(metered.http_url + "/v1/models", headers=bearer(key)) as resp:
        assert resp.status == 200
    async with http.get(metered.http_url + "/v1/models", headers=bearer("sk-nope")) as resp:
        assert resp.status == 401
    after = await metered.scrape_service(http)
    rpc = {"grpc_type": "unary", "grpc_service": IMAGES, "grpc_method": "ListModels"}
    handled = "grpc_server_handled_total"
    assert moved(before, after, "grpc_server_started_total", **rpc) == 2
    assert moved(before, after, handled, **rpc, grpc_code="OK") == 1
    assert moved(before, after, handled, **rpc, grpc_code="UNAUTHENTICATED") == 1
    assert moved(before, after, "grpc_server_handling_seconds_count", **rpc) == 2


async def test_no_label_value_carries_a_key_an_account_a_request_id_or_a_prompt(
    metered: MeteredStack, http: aiohttp.ClientSession
) -> None:
    # Runs after the tests above in this module; make sure there is something to look at.
    key = await metered.funded_key()
    assert (await metered.generate(http, key, "local-sketch")).status == 200
    values = (await metered.scrape_gateway(http)).label_values() | (
        await metered.scrape_service(http)
    ).label_values()
    assert "local-sketch" in values
    leaks = {(value, secret) for value in values for secret in metered.unbounded if secret in value}
    assert not leaks
    assert not any(value.startswith(("sk-", "req", "acct")) for value in values)


async def test_the_metrics_port_closes_with_the_service(
    metered: MeteredStack, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    config = load_config(
        environ={
            "IMAGEGEN_CONFIG": str(metered.config.config_path),
            "IMAGEGEN_DATA_DIR": str(tmp_path),
            "IMAGEGEN_METRICS_PORT": str(free_port()),
        }
    )
    running = await start_service(config, port=0)
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    async with http.get(url) as resp:
        assert resp.status == 200
    await running.stop(grace=1)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(url):
            pass
    # And the gRPC port with it.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await HealthStub(channel).Check(HealthCheckRequest(), timeout=0.5)
