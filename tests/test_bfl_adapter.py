"""The Black Forest Labs adapter, driven against a real loopback fake of the FLUX API."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image
from structlog.testing import capture_logs

from imagegen_service.config import ConfigError, ProviderConfig
from imagegen_service.errors import (
    ContentPolicy,
    ImagegenError,
    InvalidParameter,
    UpstreamError,
    UpstreamModelUnavailable,
)
from imagegen_service.providers.base import InputImage, ProviderRequest
from imagegen_service.providers.bfl import BFL_BASE_URL, BflProvider, from_config, pixel_size_for
from tests.fakes.bfl_upstream import (
    Behaviour,
    FakeBflUpstream,
    dropped,
    failed,
    http_error,
    insufficient_credits,
    moderated,
    never_ready,
    ok,
    rate_limited,
    raw,
    server_error,
    service_unavailable,
    slow,
    validation_error,
)
from tests.fakes.loopback import (
    LoopbackServer,
    error_texts,
    free_port,
    image_bytes,
    provider_request,
)

API_KEY = "bfl-test-key-7f3a"
POLL = 0.01


def make_request(**overrides: Any) -> ProviderRequest:
    defaults: dict[str, Any] = {"upstream_model": "flux-pro-1.1", "quality": "standard"}
    return provider_request(**{**defaults, **overrides})


@pytest.fixture
async def fake() -> AsyncIterator[FakeBflUpstream]:
    async with FakeBflUpstream(api_key=API_KEY) as upstream:
        yield upstream


def adapter(base_url: str, **kwargs: object) -> BflProvider:
    options: dict[str, object] = {"api_key": API_KEY, "poll_interval_seconds": POLL}
    options.update(kwargs)
    return BflProvider("bfl", base_url=base_url, **options)  # type: ignore[arg-type]


@pytest.fixture
async def provider(fake: FakeBflUpstream) -> AsyncIterator[BflProvider]:
    instance = adapter(fake.origin + "/")
    try:
        yield instance
    finally:
        await instance.aclose()


# -- success ------------------------------------------------------------------------------


async def test_two_images_are_two_tasks_each_downloaded_at_their_real_size(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    result = await provider.generate(make_request(n=2))

    assert [(i.mime_type, i.width, i.height) for i in result.images] == [
        ("image/png", 1024, 1024),
        ("image/png", 1024, 1024),
    ]
    assert result.filtered == 0
    assert len(fake.submits) == 2 and len(fake.polls) == 2 and len(fake.downloads) == 2


async def test_the_upstream_sees_the_bfl_submit_shape_and_key(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    await provider.generate(make_request())

    (submit,) = fake.submits
    assert submit.path == "/v1/flux-pro-1.1"
    assert submit.headers["x-key"] == API_KEY
    assert submit.headers["Content-Type"] == "application/json"
    assert submit.body == {
        "prompt": "a lighthouse at dusk",
        "width": 1024,
        "height": 1024,
        "output_format": "png",
    }
    assert all(poll.headers["x-key"] == API_KEY for poll in fake.polls)


async def test_the_signed_sample_is_downloaded_without_the_key(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    await provider.generate(make_request(n=2))

    assert len(fake.downloads) == 2
    assert all("x-key" not in download.headers for download in fake.downloads)


async def test_seeded_requests_send_one_distinct_seed_per_task(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    await provider.generate(make_request(n=3, seed=41))

    assert sorted(submit.body["seed"] for submit in fake.submits) == [41, 42, 43]


async def test_safety_tolerance_is_sent_only_when_configured(fake: FakeBflUpstream) -> None:
    tolerant = adapter(fake.origin, safety_tolerance=5)
    try:
        await tolerant.generate(make_request())
    finally:
        await tolerant.aclose()
    assert fake.submits[0].body["safety_tolerance"] == 5


async def test_jpeg_output_is_asked_for_and_comes_back_as_jpeg(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    result = await provider.generate(make_request(output_format="jpeg", upstream_model="flux-dev"))

    assert fake.submits[0].path == "/v1/flux-dev"
    assert fake.submits[0].body["output_format"] == "jpeg"
    assert result.images[0].mime_type == "image/jpeg"


async def test_pending_polls_continue_until_the_task_is_ready(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    fake.script(ok(pending_polls=3), ok(pending_polls=2, in_progress="Processing"))

    result = await provider.generate(make_request(n=2))

    assert len(result.images) == 2
    assert len(fake.polls) == 3 + 1 + 2 + 1


async def test_a_missing_polling_url_falls_back_to_get_result_by_id(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    fake.script(ok(polling_url=None, pending_polls=1))

    result = await provider.generate(make_request())

    assert len(result.images) == 1
    task_id = next(iter(fake.tasks))
    assert [poll.query for poll in fake.polls] == [{"id": task_id}, {"id": task_id}]


class Collector(LoopbackServer[None]):
    """A host that is not BFL's: records whatever reaches it."""

    def __init__(self) -> None:
        super().__init__(None)

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._any)

    async def _any(self, request: web.Request) -> web.Response:
        await self.record(request)
        return web.json_response({"status": "Ready", "result": {"sample": "x"}})


async def test_a_polling_url_on_a_foreign_host_is_refused_and_never_gets_the_key(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    async with Collector() as collector:
        # "localhost" is not the configured host (127.0.0.1) nor one of BFL's: were it polled,
        # the collector would see the key.
        foreign = f"http://localhost:{collector.origin.rsplit(':', 1)[1]}/v1/get_result?id=x"
        fake.script(ok(polling_url=foreign))

        with pytest.raises(UpstreamError, match="polling URL outside") as raised:
            await provider.generate(make_request())

        assert collector.hits == 0
    assert len(fake.submits) == 1 and fake.polls == []
    # The task was accepted (and will be billed); only its result is unknown.
    assert raised.value.ambiguous is True
    assert API_KEY not in error_texts(raised.value)
    assert "localhost" not in raised.value.message


class Loopback(AbstractResolver):
    """Resolves every name to 127.0.0.1, so api.eu1.bfl.ai reaches the fake."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host="127.0.0.1",
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        return None


class LoopbackBfl(BflProvider):
    """The adapter as it is, with a session whose resolver sends every name to 127.0.0.1."""

    own_session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self.own_session is None or self.own_session.closed:
            self.own_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=Loopback()),
                timeout=aiohttp.ClientTimeout(total=self.timeout_seconds),
            )
        return self.own_session

    async def aclose(self) -> None:
        if self.own_session is not None:
            await self.own_session.close()
        await super().aclose()


async def test_a_regional_polling_url_on_bfls_domain_is_polled_as_returned_with_the_key(
    fake: FakeBflUpstream,
) -> None:
    fake.script(ok(polling_host="api.eu1.bfl.ai", pending_polls=1))
    regional = LoopbackBfl("bfl", base_url=fake.origin, api_key=API_KEY, poll_interval_seconds=POLL)
    try:
        result = await regional.generate(make_request())
    finally:
        await regional.aclose()

    assert len(result.images) == 1
    assert len(fake.polls) == 2
    for poll in fake.polls:
        assert poll.headers["Host"] == f"api.eu1.bfl.ai:{fake.port}"
        assert poll.headers["x-key"] == API_KEY
    # The sample is fetched without the key.
    assert [d.headers.get("x-key") for d in fake.downloads] == [None]


def test_only_bfls_hosts_and_the_configured_host_may_be_polled_with_the_key() -> None:
    provider = BflProvider("bfl", api_key=API_KEY)
    for trusted in (
        "https://api.eu1.bfl.ai/v1/get_result?id=abc",
        "https://api.eu2.bfl.ai/v1/get_result?id=abc",
        "https://api.us.bfl.ai/v1/get_result?id=abc",
        "https://api.bfl.ai/v1/get_result?id=abc",
    ):
        assert provider._polling_url(trusted) == trusted
    assert provider._polling_url(None) is None
    for refused in (
        "http://api.eu4.bfl.ai/v1/get_result?id=abc",  # the key in clear text
        "https://bfl.ai.evil.example/x",
        "https://evilbfl.ai/x",
        "https://api.bfl.ai@evil.example/x",
        "ftp://api.bfl.ai/x",
    ):
        with pytest.raises(UpstreamError):
            provider._polling_url(refused)

    proxied = BflProvider("bfl", base_url="https://bfl-proxy.internal:8443", api_key=API_KEY)
    assert proxied._polling_url("https://bfl-proxy.internal/r?id=1") == (
        "https://bfl-proxy.internal/r?id=1"
    )
    with pytest.raises(UpstreamError):
        proxied._polling_url("https://other.internal/r?id=1")


# -- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "sent"),
    [
        ((1024, 1024), (1024, 1024)),
        ((1792, 1024), (1440, 832)),
        ((1024, 1792), (832, 1440)),
        ((1536, 1024), (1440, 960)),
        ((1024, 1536), (960, 1440)),
        ((512, 512), (512, 512)),
        ((256, 256), (256, 256)),
        ((64, 48), (352, 256)),
    ],
)
def test_width_height_sizes_keep_their_ratio_in_multiples_of_32_within_256_to_1440(
    size: tuple[int, int], sent: tuple[int, int]
) -> None:
    assert pixel_size_for(*size) == sent


async def test_a_1792x1024_request_to_flux_pro_sends_1440x832_and_returns_that_size(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    result = await provider.generate(make_request(width=1792, height=1024))

    assert (fake.submits[0].body["width"], fake.submits[0].body["height"]) == (1440, 832)
    assert (result.images[0].width, result.images[0].height) == (1440, 832)


async def test_ultra_maps_1792x1024_to_16_9_and_returns_the_real_4mp_size(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    result = await provider.generate(
        make_request(upstream_model="flux-pro-1.1-ultra", width=1792, height=1024)
    )

    assert fake.submits[0].body == {
        "prompt": "a lighthouse at dusk",
        "aspect_ratio": "16:9",
        "output_format": "png",
    }
    assert (result.images[0].width, result.images[0].height) == (2752, 1536)


async def test_kontext_takes_an_aspect_ratio_too(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    result = await provider.generate(
        make_request(upstream_model="flux-kontext-pro", width=1024, height=1536)
    )

    assert fake.submits[0].path == "/v1/flux-kontext-pro"
    assert fake.submits[0].body["aspect_ratio"] == "2:3"
    assert "width" not in fake.submits[0].body
    image = result.images[0]
    assert image.width < image.height


@pytest.mark.parametrize("model", ["flux-pro-1.1", "flux-pro-1.1-ultra", "flux-kontext-max"])
async def test_an_impossible_size_is_refused_by_check_before_any_request(
    fake: FakeBflUpstream, provider: BflProvider, model: str
) -> None:
    request = make_request(upstream_model=model, width=4096, height=256)

    with pytest.raises(InvalidParameter) as raised:
        provider.check(request)
    assert raised.value.param == "size"
    with pytest.raises(InvalidParameter):
        await provider.generate(request)
    assert fake.hits == 0


def test_check_accepts_every_catalog_size() -> None:
    provider = BflProvider("bfl", api_key=API_KEY)
    for model in ("flux-pro-1.1", "flux-dev", "flux-pro-1.1-ultra", "flux-kontext-pro"):
        for width, height in [(1024, 1024), (1536, 1024), (1024, 1536), (1792, 1024), (1024, 1792)]:
            provider.check(make_request(upstream_model=model, width=width, height=height))


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["Content Moderated", "Request Moderated"])
async def test_a_moderated_task_inside_a_200_is_a_content_policy_refusal(
    fake: FakeBflUpstream, provider: BflProvider, status: str
) -> None:
    fake.script(moderated(status, pending_polls=1))

    with pytest.raises(ContentPolicy) as raised:
        await provider.generate(make_request())
    assert raised.value.message == "The prompt was refused by the provider's content policy."
    assert fake.downloads == []


async def test_a_400_refusal_on_submit_is_a_content_policy_refusal(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    fake.script("moderation_refusal_400")

    with pytest.raises(ContentPolicy):
        await provider.generate(make_request())


async def test_when_some_tasks_are_refused_the_rest_are_returned_and_counted_filtered(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    fake.script(ok(), moderated("Content Moderated"), "moderation_refusal_400", ok())

    result = await provider.generate(make_request(n=4))

    assert len(result.images) == 2
    assert result.filtered == 2


async def test_when_every_task_is_refused_the_call_is_a_content_policy_refusal(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    fake.script(moderated(), moderated("Request Moderated"), "moderation_refusal_400")

    with pytest.raises(ContentPolicy):
        await provider.generate(make_request(n=3))


# -- upstream failures -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [("Error", "error"), ("Failed", "failed"), ("Task not found", "task_not_found")],
)
async def test_a_failed_task_is_an_upstream_error(
    fake: FakeBflUpstream, provider: BflProvider, status: str, code: str
) -> None:
    fake.script(failed(status))

    with pytest.raises(UpstreamError, match=rf"task 0 failed \({code}\)"):
        await provider.generate(make_request())


async def test_a_429_is_an_upstream_error_carrying_retry_after(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    fake.script(rate_limited(retry_after=3))

    with pytest.raises(UpstreamError, match=r"HTTP 429 \(too_many_active_tasks\)") as raised:
        await provider.generate(make_request())
    assert raised.value.retry_after_seconds == 3.0


@pytest.mark.parametrize(
    "behaviour",
    [
        server_error(),
        service_unavailable(),
        insufficient_credits(),
        http_error(403, "Forbidden"),
    ],
    ids=["500", "503", "402", "403"],
)
async def test_other_error_statuses_on_submit_are_upstream_errors(
    fake: FakeBflUpstream, provider: BflProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError, match=rf"answered HTTP {behaviour.status}") as raised:
        await provider.generate(make_request())
    assert "Insufficient" not in raised.value.message


async def test_a_404_on_the_model_route_means_the_model_is_unavailable(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    with pytest.raises(UpstreamModelUnavailable) as raised:
        await provider.generate(make_request(upstream_model="flux-nonexistent"))
    assert raised.value.upstream_model == "flux-nonexistent"
    assert raised.value.provider == "bfl"
    assert raised.value.ambiguous is False

    fake.script(http_error(404, "Not Found"))
    with pytest.raises(UpstreamModelUnavailable, match=r"HTTP 404"):
        await provider.generate(make_request())


async def test_a_422_becomes_invalid_parameter_with_a_short_scrubbed_message(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    fake.script(validation_error("width", f"Input should be <= 1440 (x-key {API_KEY})"))

    with pytest.raises(InvalidParameter) as raised:
        await provider.generate(make_request())
    assert raised.value.param == "size"
    assert raised.value.message == "width: Input should be <= 1440 (x-key ***)"


async def test_a_long_422_message_is_cut_to_300_characters(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    fake.script(http_error(422, "x" * 1000))

    with pytest.raises(InvalidParameter) as raised:
        await provider.generate(make_request())
    assert len(raised.value.message) == 300
    assert raised.value.param is None


async def test_a_slow_submit_times_out_as_an_upstream_error(fake: FakeBflUpstream) -> None:
    fake.script(slow(2.0))
    impatient = adapter(fake.origin, timeout_seconds=0.3)
    try:
        with pytest.raises(UpstreamError, match=r"did not answer within 0\.3 s"):
            await impatient.generate(make_request())
    finally:
        await impatient.aclose()


async def test_a_task_that_never_becomes_ready_is_bounded_by_the_timeout(
    fake: FakeBflUpstream,
) -> None:
    fake.script(never_ready())
    impatient = adapter(fake.origin, timeout_seconds=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(UpstreamError, match=r"did not answer within 0\.3 s"):
            await impatient.generate(make_request())
    finally:
        await impatient.aclose()
    assert time.monotonic() - started < 1.0
    assert len(fake.polls) >= 3


async def test_when_no_task_delivers_by_the_deadline_the_call_fails_and_stops_polling(
    fake: FakeBflUpstream,
) -> None:
    fake.script(never_ready(), failed("Error"), never_ready())
    impatient = adapter(fake.origin, timeout_seconds=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(UpstreamError, match=r"did not answer within 0\.3 s") as raised:
            await impatient.generate(make_request(n=3))
    finally:
        await impatient.aclose()
    assert time.monotonic() - started < 1.0
    # The first task's error is raised; two accepted tasks never finished, so money may be
    # spent: the router must not repeat the call on this deployment.
    assert raised.value.ambiguous is True
    polls_when_failed = len(fake.polls)
    await fake.pause(0.1)
    assert len(fake.polls) == polls_when_failed
    assert len(fake.submits) == 3


async def test_a_refused_connection_is_an_upstream_error() -> None:
    unreachable = adapter(f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(UpstreamError, match="could not be reached"):
            await unreachable.generate(make_request())
    finally:
        await unreachable.aclose()


@pytest.mark.parametrize(
    "behaviour",
    [
        "garbage",
        "truncated",
        "wrong_content_type",
        "garbage_poll",
        raw(200, orjson.dumps({"polling_url": "http://127.0.0.1:1/x"})),
        raw(200, orjson.dumps(["not", "an", "object"])),
    ],
    ids=["garbage", "truncated", "content-type", "garbage-poll", "no-id", "list"],
)
async def test_unreadable_answers_are_upstream_errors(
    fake: FakeBflUpstream, provider: BflProvider, behaviour: Behaviour | str
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError, match="unreadable answer"):
        await provider.generate(make_request())


@pytest.mark.parametrize("sample", ["expired", "missing"])
async def test_an_expired_or_missing_sample_is_an_upstream_error(
    fake: FakeBflUpstream, provider: BflProvider, sample: str
) -> None:
    fake.script(ok(sample=sample))  # type: ignore[arg-type]

    with pytest.raises(UpstreamError, match=r"downloading image 0 answered HTTP 40[34]"):
        await provider.generate(make_request())


async def test_a_wrong_key_is_an_upstream_error_that_does_not_show_it(
    fake: FakeBflUpstream,
) -> None:
    wrong = adapter(fake.origin, api_key="bfl-wrong-0042")
    try:
        with pytest.raises(UpstreamError, match=r"HTTP 403 \(authentication\)") as raised:
            await wrong.generate(make_request())
    finally:
        await wrong.aclose()
    assert "bfl-wrong-0042" not in error_texts(raised.value)


@pytest.mark.parametrize(
    "behaviour",
    [
        server_error(),
        rate_limited(),
        moderated(),
        "moderation_refusal_400",
        validation_error("prompt", f"bad header x-key: {API_KEY}"),
        http_error(400, f"Key {API_KEY} is not allowed to use this model"),
        http_error(403, f"Key {API_KEY} is disabled"),
        http_error(402, f"Key {API_KEY} has no credits"),
        failed("Error"),
        "garbage",
        "truncated",
        "wrong_content_type",
        ok(sample="expired"),
        raw(200, orjson.dumps({"id": "x", "polling_url": "http://127.0.0.1:1/v1/get_result"})),
    ],
    ids=[
        "500",
        "429",
        "moderated",
        "400-refusal",
        "422-echoing-key",
        "400-echoing-key",
        "403",
        "402",
        "task-error",
        "garbage",
        "truncated",
        "content-type",
        "expired-sample",
        "dead-polling-url",
    ],
)
async def test_no_error_message_contains_the_api_key(
    fake: FakeBflUpstream, behaviour: Behaviour | str
) -> None:
    fake.script(behaviour)
    # Short: polls of a dead polling host are retried until the deadline.
    provider = adapter(fake.origin, timeout_seconds=1.0)
    try:
        with pytest.raises(ImagegenError) as raised:
            await provider.generate(make_request())
    finally:
        await provider.aclose()
    assert API_KEY not in error_texts(raised.value)


async def test_no_error_message_contains_the_api_key_when_unreachable_or_slow(
    fake: FakeBflUpstream,
) -> None:
    fake.script(slow(2.0))
    for base_url in (fake.origin, f"http://127.0.0.1:{free_port()}"):
        instance = adapter(base_url, timeout_seconds=0.3)
        try:
            with pytest.raises(UpstreamError) as raised:
                await instance.generate(make_request())
        finally:
            await instance.aclose()
        assert API_KEY not in error_texts(raised.value)


async def test_the_provider_repr_does_not_show_the_api_key(provider: BflProvider) -> None:
    assert API_KEY not in repr(provider)


# -- the fake is strict enough to catch a wrong field name ----------------------------------


async def test_the_fake_rejects_fields_the_real_schema_does_not_have(
    fake: FakeBflUpstream,
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{fake.origin}/v1/flux-pro-1.1",
            json={"prompt": "x", "size": "1024x1024", "width": 1000},
            headers={"x-key": API_KEY},
        ) as resp,
    ):
        assert resp.status == 422
        problems = (await resp.json())["detail"]
    assert {tuple(p["loc"]) for p in problems} == {("body", "size"), ("body", "width")}


# -- edits (Kontext) ---------------------------------------------------------------------------


def input_image(width: int = 1536, height: int = 1024, fmt: str = "PNG") -> InputImage:
    return InputImage(
        data=image_bytes(width, height, fmt), format=fmt.lower(), width=width, height=height
    )


def edit_request(**overrides: object) -> ProviderRequest:
    fields: dict[str, object] = {
        "upstream_model": "flux-kontext-pro",
        "prompt": "make the sky stormy",
        "images": (input_image(),),
    }
    fields.update(overrides)
    return make_request(**fields)


async def test_an_edit_sends_the_image_as_base64_input_image_and_keeps_its_aspect_ratio(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    source = input_image(1536, 1024)

    result = await provider.edit(
        edit_request(images=(source,), n=2, seed=7, request_id="req-edit-1")
    )

    assert [submit.path for submit in fake.submits] == ["/v1/flux-kontext-pro"] * 2
    bodies = sorted((submit.body for submit in fake.submits), key=lambda body: body["seed"])
    encoded = base64.b64encode(source.data).decode("ascii")
    assert bodies == [
        {
            "prompt": "make the sky stormy",
            "input_image": encoded,
            "output_format": "png",
            "seed": seed,
        }
        for seed in (7, 8)
    ]
    assert base64.b64decode(bodies[0]["input_image"]) == source.data
    assert all(submit.headers["X-Request-ID"] == "req-edit-1" for submit in fake.submits)
    assert all(submit.headers["x-key"] == API_KEY for submit in fake.submits)
    # About 1 MP in the input's 3:2, at its real size rather than the requested 1024x1024.
    assert [(i.mime_type, i.width, i.height) for i in result.images] == [
        ("image/png", 1248, 832),
        ("image/png", 1248, 832),
    ]
    assert len(fake.polls) == 2 and len(fake.downloads) == 2


async def test_further_images_go_to_kontexts_reference_fields(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    images = (input_image(512, 512), input_image(256, 256, "JPEG"), input_image(256, 512))

    await provider.edit(
        edit_request(upstream_model="flux-kontext-max", images=images, output_format="jpeg")
    )

    (submit,) = fake.submits
    assert submit.path == "/v1/flux-kontext-max"
    fields = ("input_image", "input_image_2", "input_image_3")
    assert [base64.b64decode(submit.body[key]) for key in fields] == [i.data for i in images]
    assert "input_image_4" not in submit.body and "aspect_ratio" not in submit.body
    assert submit.body["output_format"] == "jpeg"


async def test_a_masked_edit_is_refused_by_check_before_any_request(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    masked = edit_request(
        mask=InputImage(
            data=image_bytes(1536, 1024), format="png", width=1536, height=1024, has_alpha=True
        )
    )

    with pytest.raises(InvalidParameter) as raised:
        provider.check(masked)
    assert raised.value.param == "mask"
    assert raised.value.message == "this model edits by instruction and takes no mask"
    with pytest.raises(InvalidParameter):
        await provider.edit(masked)
    assert fake.hits == 0


async def test_an_edit_on_a_model_that_cannot_edit_or_with_too_many_images_is_refused(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    with pytest.raises(InvalidParameter) as raised:
        provider.check(edit_request(upstream_model="flux-pro-1.1"))
    assert raised.value.param == "model"
    with pytest.raises(InvalidParameter) as raised:
        provider.check(edit_request(images=(input_image(),) * 5))
    assert raised.value.param == "image"
    # An edit is not refused for a size Kontext could not generate: the image sets the shape.
    provider.check(edit_request(width=4096, height=256))
    assert fake.hits == 0


@pytest.mark.parametrize("behaviour", [moderated("Request Moderated"), "moderation_refusal_400"])
async def test_a_refused_edit_is_a_content_policy_refusal(
    fake: FakeBflUpstream, provider: BflProvider, behaviour: Behaviour | str
) -> None:
    fake.script(behaviour)

    with pytest.raises(ContentPolicy):
        await provider.edit(edit_request())
    assert fake.downloads == []


async def test_an_edit_the_upstream_rejects_is_invalid_parameter_on_the_image(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    fake.script(validation_error("input_image", "Value error, image too large"))

    with pytest.raises(InvalidParameter) as raised:
        await provider.edit(edit_request())
    assert raised.value.param == "image"
    assert raised.value.message == "input_image: Value error, image too large"

    fake.script(http_error(400, "Invalid input image"))
    with pytest.raises(InvalidParameter, match="Invalid input image"):
        await provider.edit(edit_request())


@pytest.mark.parametrize("behaviour", [server_error(), service_unavailable(), failed("Error")])
async def test_an_edit_failing_upstream_is_an_upstream_error(
    fake: FakeBflUpstream, provider: BflProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError) as raised:
        await provider.edit(edit_request())
    assert API_KEY not in error_texts(raised.value)


async def test_the_fake_rejects_an_edit_with_a_wrong_field_or_an_unreadable_image(
    fake: FakeBflUpstream,
) -> None:
    encoded = base64.b64encode(image_bytes(64, 64)).decode("ascii")
    async with aiohttp.ClientSession() as session:
        for body, field in [
            ({"prompt": "x", "image": encoded}, "image"),
            ({"prompt": "x", "input_image": "bm90IGFuIGltYWdl"}, "input_image"),
            ({"prompt": "x", "input_image": encoded, "mask": encoded}, "mask"),
        ]:
            async with session.post(
                f"{fake.origin}/v1/flux-kontext-pro", json=body, headers={"x-key": API_KEY}
            ) as resp:
                assert resp.status == 422
                problems = (await resp.json())["detail"]
            assert [tuple(p["loc"]) for p in problems] == [("body", field)]


# -- masked edits (flux-pro-1.0-fill) ----------------------------------------------------------

HOLE = (64, 32, 192, 96)


def openai_mask(size: tuple[int, int] = (256, 128)) -> InputImage:
    """OpenAI's convention: alpha 0 inside HOLE (edit here), opaque elsewhere."""
    image = Image.new("RGBA", size, (0, 0, 0, 255))
    image.paste((0, 0, 0, 0), HOLE)
    out = io.BytesIO()
    image.save(out, "PNG")
    return InputImage(
        data=out.getvalue(), format="png", width=size[0], height=size[1], has_alpha=True
    )


def fill_request(**overrides: object) -> ProviderRequest:
    fields: dict[str, object] = {
        "upstream_model": "flux-pro-1.0-fill",
        "prompt": "a red balloon",
        "images": (input_image(256, 128),),
        "mask": openai_mask(),
    }
    fields.update(overrides)
    return make_request(**fields)


async def test_a_masked_edit_sends_image_and_a_white_where_to_fill_mask_to_the_fill_model(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    request = fill_request(seed=3, request_id="req-fill")

    result = await provider.edit(request)

    (submit,) = fake.submits
    assert submit.path == "/v1/flux-pro-1.0-fill"
    assert submit.headers["X-Request-ID"] == "req-fill"
    assert set(submit.body) == {"prompt", "image", "mask", "output_format", "seed"}
    assert base64.b64decode(submit.body["image"]) == request.images[0].data
    with Image.open(io.BytesIO(base64.b64decode(submit.body["mask"]))) as sent:
        assert (sent.format, sent.mode, sent.size) == ("PNG", "L", (256, 128))
        assert sent.getpixel((100, 50)) == 255  # inside the hole: fill
        assert sent.getpixel((10, 10)) == 0 and sent.getpixel((250, 120)) == 0
        assert sent.getextrema() == (0, 255)
    (image,) = result.images
    assert (image.width, image.height) == (256, 128)


async def test_a_fill_without_a_mask_uses_the_images_own_transparency(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    transparent = openai_mask()

    await provider.edit(fill_request(images=(transparent,), mask=None))

    (submit,) = fake.submits
    assert "mask" not in submit.body
    assert base64.b64decode(submit.body["image"]) == transparent.data


async def test_the_fill_model_refuses_what_it_cannot_do_before_any_request(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    cases = [
        (fill_request(mask=None), "mask"),
        (fill_request(images=(input_image(256, 128),) * 2), "image"),
        (make_request(upstream_model="flux-pro-1.0-fill"), "model"),
    ]
    for request, param in cases:
        with pytest.raises(InvalidParameter) as raised:
            provider.check(request)
        assert raised.value.param == param
    with pytest.raises(InvalidParameter):
        await provider.generate(make_request(upstream_model="flux-pro-1.0-fill"))
    assert fake.hits == 0


async def test_a_fill_the_upstream_rejects_names_the_mask(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    fake.script(validation_error("mask", "Value error, mask and image sizes differ"))

    with pytest.raises(InvalidParameter) as raised:
        await provider.edit(fill_request())
    assert raised.value.param == "mask"


async def test_a_refused_or_failed_fill_is_content_policy_or_upstream_error(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    fake.script(moderated("Content Moderated"), server_error())

    with pytest.raises(ContentPolicy):
        await provider.edit(fill_request())
    with pytest.raises(UpstreamError, match="HTTP 500"):
        await provider.edit(fill_request())


# -- configuration ----------------------------------------------------------------------------


async def test_from_config_reads_the_options_and_defaults_to_the_public_endpoint() -> None:
    config = ProviderConfig(
        name="flux",
        type="bfl",
        api_key_env="BFL_API_KEY",
        timeout_seconds=42.0,
        max_connections=8,
        options={"safety_tolerance": 4, "poll_interval_seconds": 0.25},
    )

    provider = from_config(config, API_KEY)

    assert isinstance(provider, BflProvider)
    assert provider.name == "flux"
    assert provider.timeout_seconds == 42.0
    assert provider._base_url == BFL_BASE_URL
    assert provider._safety_tolerance == 4
    assert provider._poll_interval == 0.25
    assert API_KEY not in repr(provider)


async def test_from_config_talks_to_a_configured_base_url(fake: FakeBflUpstream) -> None:
    config = ProviderConfig(
        name="bfl", type="bfl", base_url=fake.origin, options={"poll_interval_seconds": POLL}
    )
    provider = from_config(config, API_KEY)
    try:
        result = await provider.generate(make_request())
    finally:
        await provider.aclose()
    assert len(result.images) == 1
    assert "safety_tolerance" not in fake.submits[0].body


@pytest.mark.parametrize(
    "options",
    [
        {"safety_tolerance": 7},
        {"safety_tolerance": "2"},
        {"safety_tolerance": True},
        {"poll_interval_seconds": 0},
        {"poll_interval_seconds": "fast"},
    ],
)
def test_from_config_rejects_bad_options(options: dict[str, object]) -> None:
    config = ProviderConfig(name="bfl", type="bfl", options=options)

    with pytest.raises(ConfigError, match=r"providers\.bfl\."):
        from_config(config, API_KEY)


# -- BFL never pays twice: polls are retried, submissions never ---------------------------------


async def test_a_poll_failing_with_500_then_429_is_retried_and_the_image_delivered_once(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    fake.script(ok(poll_errors=(500, 429), pending_polls=1))

    result = await provider.generate(make_request())

    assert len(result.images) == 1
    assert len(fake.submits) == 1
    # 500, 429, Pending, Ready: the failed polls were simply polled again.
    assert len(fake.polls) == 4
    assert len(fake.downloads) == 1


async def test_a_poll_whose_connection_drops_is_polled_again(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    fake.script(ok(poll_errors=("drop", 503)))

    result = await provider.generate(make_request())

    assert len(result.images) == 1
    assert (len(fake.submits), len(fake.polls)) == (1, 3)


async def test_a_poll_429_honours_its_retry_after(fake: FakeBflUpstream) -> None:
    fake.script(ok(poll_errors=(429,), poll_retry_after="0.3"))
    provider = adapter(fake.origin)
    started = time.monotonic()
    try:
        result = await provider.generate(make_request())
    finally:
        await provider.aclose()

    assert len(result.images) == 1
    assert time.monotonic() - started >= 0.3
    assert len(fake.submits) == 1


async def test_polls_failing_until_the_deadline_end_in_an_ambiguous_error(
    fake: FakeBflUpstream,
) -> None:
    fake.script(ok(poll_errors=(500,) * 1000))
    impatient = adapter(fake.origin, timeout_seconds=0.4)
    try:
        with pytest.raises(UpstreamError, match=r"did not answer within 0\.4 s") as raised:
            await impatient.generate(make_request())
    finally:
        await impatient.aclose()

    assert raised.value.ambiguous is True
    assert len(fake.submits) == 1
    assert len(fake.polls) >= 3


@pytest.mark.parametrize(
    "behaviour",
    [server_error(), service_unavailable(), dropped(), slow(2.0), "truncated", "garbage"],
    ids=["500", "503", "dropped-connection", "timeout", "truncated", "garbage"],
)
async def test_a_submit_whose_outcome_is_unknown_is_ambiguous_and_never_resubmitted(
    fake: FakeBflUpstream, behaviour: Behaviour | str
) -> None:
    # The fake answers every later submit: a resubmission would succeed, and be seen.
    fake.script(behaviour)
    provider = adapter(fake.origin, timeout_seconds=0.5)
    try:
        with pytest.raises(UpstreamError) as raised:
            await provider.generate(make_request())
        await fake.pause(0.2)
    finally:
        await provider.aclose()

    assert raised.value.ambiguous is True
    assert len(fake.submits) == 1
    assert fake.polls == []


async def test_a_dropped_submit_leaves_the_task_running_at_bfl_which_is_why_it_is_ambiguous(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    fake.script(dropped())

    with pytest.raises(UpstreamError, match="dropped the connection") as raised:
        await provider.generate(make_request())

    assert raised.value.ambiguous is True
    assert len(fake.tasks) == 1 and len(fake.active) == 1


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        (rate_limited(), UpstreamError),
        (insufficient_credits(), UpstreamError),
        (http_error(403, "Forbidden"), UpstreamError),
        (validation_error(), InvalidParameter),
        (failed("Error"), UpstreamError),
        (failed("Task not found"), UpstreamError),
    ],
    ids=["429", "402", "403", "422", "task-error", "task-not-found"],
)
async def test_a_submit_bfl_refused_or_a_task_bfl_failed_is_not_ambiguous(
    fake: FakeBflUpstream, provider: BflProvider, behaviour: Behaviour, error: type[Exception]
) -> None:
    fake.script(behaviour)

    with pytest.raises(error) as raised:
        await provider.generate(make_request())

    assert getattr(raised.value, "ambiguous", False) is False
    assert len(fake.submits) == 1


async def test_a_refused_connection_is_not_ambiguous() -> None:
    unreachable = adapter(f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(UpstreamError, match="could not be reached") as raised:
            await unreachable.generate(make_request())
    finally:
        await unreachable.aclose()
    assert raised.value.ambiguous is False


@pytest.mark.parametrize("sample", ["expired", "missing", "half"])
async def test_a_sample_lost_after_the_task_was_done_is_ambiguous(
    fake: FakeBflUpstream, provider: BflProvider, sample: str
) -> None:
    fake.script(ok(sample=sample))  # type: ignore[arg-type]

    with pytest.raises(UpstreamError) as raised:
        await provider.generate(make_request())
    assert raised.value.ambiguous is True
    assert len(fake.submits) == 1
    if sample == "half":
        # Every image byte string goes through inspect(), which refuses a partial image.
        assert "cut short" in raised.value.message


async def test_n3_with_one_moderated_task_returns_two_images_and_one_filtered(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    fake.script(ok(), moderated("Content Moderated", pending_polls=1), ok(pending_polls=2))

    result = await provider.generate(make_request(n=3))

    assert len(result.images) == 2
    assert result.filtered == 1
    assert len(fake.submits) == 3 and len(fake.downloads) == 2


async def test_a_task_that_fails_after_others_delivered_is_reported_not_resubmitted(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    fake.script(ok(), failed("Error"), server_error())

    with capture_logs() as logs:
        result = await provider.generate(make_request(n=3, request_id="req-partial"))
        await fake.pause(0.1)

    assert len(result.images) == 1
    assert result.filtered == 0
    assert len(fake.submits) == 3
    (entry,) = [e for e in logs if e["event"] == "bfl.tasks_failed"]
    assert entry["log_level"] == "warning"
    assert (entry["tasks"], entry["delivered"], entry["failed"]) == (3, 1, 2)
    assert entry["failed_ambiguous"] == 1  # the 500 on submit
    assert entry["request_id"] == "req-partial"
    assert API_KEY not in repr(entry)


async def test_tasks_past_the_deadline_are_dropped_and_the_delivered_ones_returned(
    fake: FakeBflUpstream,
) -> None:
    fake.script(ok(), never_ready())
    impatient = adapter(fake.origin, timeout_seconds=0.4)
    try:
        result = await impatient.generate(make_request(n=2))
    finally:
        await impatient.aclose()

    assert len(result.images) == 1
    assert len(fake.submits) == 2


# -- concurrency: BFL counts active tasks, so the adapter does ------------------------------------


def test_the_adapter_limits_its_own_concurrency_per_task() -> None:
    assert BflProvider.limits_own_concurrency is True
    assert BflProvider("bfl", api_key=API_KEY).max_concurrency == 24


async def test_n4_with_max_concurrency_2_never_has_more_than_2_tasks_active(
    fake: FakeBflUpstream,
) -> None:
    # The fake refuses a third active task with 429, as BFL does past the account's limit.
    fake.active_limit = 2
    fake.default = ok(pending_polls=3)
    gated = adapter(fake.origin, max_concurrency=2)
    try:
        result = await gated.generate(make_request(n=4))
    finally:
        await gated.aclose()

    assert len(result.images) == 4
    assert len(fake.submits) == 4
    assert fake.max_active == 2


async def test_the_task_limit_is_shared_by_concurrent_calls(fake: FakeBflUpstream) -> None:
    fake.active_limit = 3
    fake.default = ok(pending_polls=2)
    gated = adapter(fake.origin, max_concurrency=3)
    try:
        results = await asyncio.gather(
            *(gated.generate(make_request(n=2, seed=i)) for i in range(3))
        )
    finally:
        await gated.aclose()

    assert [len(r.images) for r in results] == [2, 2, 2]
    assert fake.max_active == 3


async def test_from_config_sizes_the_task_limit_from_max_concurrency() -> None:
    config = ProviderConfig(name="bfl", type="bfl", max_concurrency=6)

    assert from_config(config, API_KEY).max_concurrency == 6
    with pytest.raises(ConfigError, match="max_concurrency"):
        from_config(ProviderConfig(name="bfl", type="bfl", max_concurrency=0), API_KEY)


# -- FLUX.2 -------------------------------------------------------------------------------------


async def test_flux2_sends_the_size_as_asked_and_returns_it(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    with capture_logs() as logs:
        result = await provider.generate(
            make_request(upstream_model="flux-2-pro", width=1920, height=1088, seed=5)
        )

    (submit,) = fake.submits
    assert submit.path == "/v1/flux-2-pro"
    assert submit.headers["x-key"] == API_KEY
    assert submit.body == {
        "prompt": "a lighthouse at dusk",
        "width": 1920,
        "height": 1088,
        "output_format": "png",
        "seed": 5,
    }
    assert [(i.mime_type, i.width, i.height) for i in result.images] == [("image/png", 1920, 1088)]
    # What BFL said the task cost is logged (billing stays with the catalog).
    (entry,) = [e for e in logs if e["event"] == "bfl.tasks"]
    assert entry["cost_credits"] is not None and entry["output_mp"] == 1.99


@pytest.mark.parametrize(
    "model", ["flux-2-pro", "flux-2-max", "flux-2-flex", "flux-2-klein-4b", "flux-2-klein-9b"]
)
async def test_every_flux2_model_takes_the_same_payload(
    fake: FakeBflUpstream, provider: BflProvider, model: str
) -> None:
    result = await provider.generate(
        make_request(upstream_model=model, width=2048, height=2048, output_format="jpeg")
    )

    assert fake.submits[0].path == f"/v1/{model}"
    assert [(i.mime_type, i.width, i.height) for i in result.images] == [("image/jpeg", 2048, 2048)]


async def test_the_request_family_names_flux2_for_any_upstream_id(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    request = make_request(upstream_model="flux-2-flex", family="flux-2", width=1024, height=768)

    await provider.generate(request)

    assert (fake.submits[0].body["width"], fake.submits[0].body["height"]) == (1024, 768)
    assert "aspect_ratio" not in fake.submits[0].body


@pytest.mark.parametrize(
    ("width", "height", "rule"),
    [
        (1000, 1000, "multiples of 16"),
        (48, 1024, "between 64 and 4096"),
        (4096, 2048, "pixels"),
        (2064, 2048, "pixels"),
    ],
)
async def test_flux2_refuses_sizes_breaking_its_rule_in_check(
    fake: FakeBflUpstream, provider: BflProvider, width: int, height: int, rule: str
) -> None:
    request = make_request(upstream_model="flux-2-pro", width=width, height=height)

    with pytest.raises(InvalidParameter) as raised:
        provider.check(request)
    assert raised.value.param == "size"
    assert rule in raised.value.message
    assert f"{width}x{height}" in raised.value.message
    with pytest.raises(InvalidParameter):
        await provider.generate(request)
    assert fake.hits == 0


async def test_flux2_refuses_webp_in_check_saying_what_it_makes(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    request = make_request(upstream_model="flux-2-max", output_format="webp")

    with pytest.raises(InvalidParameter) as raised:
        provider.check(request)
    assert raised.value.param == "output_format"
    assert "jpeg or png" in raised.value.message
    with pytest.raises(InvalidParameter):
        await provider.generate(request)
    assert fake.hits == 0


def test_flux2_accepts_sizes_on_its_grid_up_to_the_4mp_ceiling() -> None:
    provider = BflProvider("bfl", api_key=API_KEY)
    for width, height in [
        (1024, 1024),
        (1536, 1024),
        (1024, 1536),
        (1920, 1088),
        (1088, 1920),
        (2048, 2048),
        (64, 64),
        (4096, 1024),
    ]:
        provider.check(make_request(upstream_model="flux-2-pro", width=width, height=height))


async def test_flux2_sends_at_most_safety_tolerance_5(fake: FakeBflUpstream) -> None:
    tolerant = adapter(fake.origin, safety_tolerance=6)
    try:
        await tolerant.generate(make_request(upstream_model="flux-2-pro"))
        await tolerant.generate(make_request(upstream_model="flux-pro-1.1"))
    finally:
        await tolerant.aclose()
    assert [s.body["safety_tolerance"] for s in fake.submits] == [5, 6]


async def test_a_flux2_edit_sends_up_to_eight_input_images_and_the_size(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    images = tuple(input_image(64 + 16 * i, 64) for i in range(8))

    result = await provider.edit(
        edit_request(upstream_model="flux-2-pro", images=images, width=1024, height=1024)
    )

    (submit,) = fake.submits
    assert submit.path == "/v1/flux-2-pro"
    keys = ["input_image", *(f"input_image_{i}" for i in range(2, 9))]
    assert [base64.b64decode(submit.body[key]) for key in keys] == [i.data for i in images]
    assert (submit.body["width"], submit.body["height"]) == (1024, 1024)
    assert (result.images[0].width, result.images[0].height) == (1024, 1024)


async def test_flux2_edits_refuse_a_mask_too_many_images_and_klein_past_four(
    fake: FakeBflUpstream, provider: BflProvider
) -> None:
    cases = [
        (edit_request(upstream_model="flux-2-pro", images=(input_image(),) * 9), "image"),
        (edit_request(upstream_model="flux-2-klein-4b", images=(input_image(),) * 5), "image"),
        (
            edit_request(
                upstream_model="flux-2-pro",
                mask=InputImage(data=image_bytes(64, 64), format="png", width=64, height=64),
            ),
            "mask",
        ),
    ]
    for request, param in cases:
        with pytest.raises(InvalidParameter) as raised:
            provider.check(request)
        assert raised.value.param == param
        with pytest.raises(InvalidParameter):
            await provider.edit(request)
    provider.check(edit_request(upstream_model="flux-2-klein-9b", images=(input_image(),) * 4))
    assert fake.hits == 0


async def test_the_fake_speaks_flux2s_schema(fake: FakeBflUpstream) -> None:
    async with aiohttp.ClientSession() as session:
        for body, field in [
            ({"prompt": "x", "aspect_ratio": "1:1"}, "aspect_ratio"),
            ({"prompt": "x", "width": 1000, "height": 1024}, "width"),
            ({"prompt": "x", "output_format": "webp"}, "output_format"),
            ({"prompt": "x", "safety_tolerance": 6}, "safety_tolerance"),
        ]:
            async with session.post(
                f"{fake.origin}/v1/flux-2-pro", json=body, headers={"x-key": API_KEY}
            ) as resp:
                assert resp.status == 422, body
                problems = (await resp.json())["detail"]
            assert [p["loc"][-1] for p in problems] == [field]
        async with session.post(
            f"{fake.origin}/v1/flux-2-klein-4b",
            json={"prompt": "x", "input_image_5": "https://example.com/a.png"},
            headers={"x-key": API_KEY},
        ) as resp:
            assert resp.status == 422
        async with session.post(
            f"{fake.origin}/v1/flux-2-pro",
            json={"prompt": "x", "width": 1024, "height": 1024},
            headers={"x-key": API_KEY},
        ) as resp:
            answer = await resp.json()
    assert set(answer) == {"id", "polling_url", "cost", "input_mp", "output_mp"}
