"""Upstream providers with failover, end to end: for every provider type, the real gateway and
gRPC service in front of that provider's loopback fake(s), driven by the official openai SDK
or raw HTTP, with the money checked through the Admin gRPC API.

Each provider type is a ``Scenario``: how to build its fake, its ``[providers.*]`` table, and
how to script ok / 500 / 429 with a retry hint / garbage / slow / refusals on that fake. One
stack serves the whole module; for every type it has

* ``via-T`` on ``T-retry`` (fake A, one retry): successes, 429-then-retry, sizes;
* ``via-T-once`` on ``T-once`` (fake A, 0.5 s timeout, no retry): timeouts, garbage;
* ``via-T-failover`` on ``T-first`` (fake A, one retry, dearer) then ``T-second`` (fake B,
  cheaper): failover, all failing, refusals;
* ``via-T-nokey`` on ``T-nokey`` (no credential): absent from the catalog.

The circuit breaker gets stacks of its own, since its settings are global to a service.
"""

from __future__ import annotations

import asyncio
import base64
import io
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from PIL import Image

from tests.conftest import assert_openai_error, bearer, image_size
from tests.fakes import bfl_upstream as bfl
from tests.fakes import gemini_upstream as gemini
from tests.fakes import google_imagen_upstream as imagen
from tests.fakes import openai_upstream as oai
from tests.fakes import stability_upstream as stability
from tests.fakes.loopback import LoopbackServer, RecordedRequest
from tests.stack import Stack, start_stack

GENERATIONS = "/v1/images/generations"
OPENING = 1_000_000
# Per-image prices of the catalog below, in micro-dollars.
PRICE = 40_000
FIRST_PRICE = 50_000
SECOND_PRICE = 30_000
PROMPT = "a lighthouse on a cliff at dusk"
# A size whose aspect ratio (8:1) no provider comes close to.
UNSERVABLE = "2048x256"
# The 0.5 s provider timeout of the ``-once`` models, and how long "slow" fakes wait.
TIMEOUT = 0.5
SLOW = 2.0

Fake = LoopbackServer[Any]


# -- one scenario per provider type ---------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    type: str
    upstream_model: str
    key: str
    make_fake: Callable[[], Fake]
    base_url: Callable[[Any], str]
    ok: Callable[[], Any]
    server_error: Callable[[], Any]
    # A 429 that asks for a retry within a second, in the provider's own way.
    rate_limited: Callable[[], Any]
    garbage: Callable[[], Any]
    slow: Callable[[], Any]
    # Label -> a refusal; "non2xx" and, where the provider has one, "in200".
    refusals: dict[str, Callable[[], Any]]
    # A size to map, what the upstream is sent for it, and the pixels it answers.
    wide_size: str
    wide_sent: str
    wide_pixels: tuple[int, int]
    # Extra keys of the provider's TOML table.
    options: str = ""
    # One upstream call per image (n images = n calls), rather than one call for all.
    call_per_image: bool = False
    # A 5xx answer to a submission may already be billed (BFL bills on submit): never
    # repeated on the same deployment.
    server_error_is_ambiguous: bool = False
    # A well-formed answer whose image is cut short, in the provider's own shape.
    cut_image: Callable[[], Any] = lambda: None
    # Whether such an answer may already be billed (the image was made): not repeated.
    cut_image_is_ambiguous: bool = False
    # Generation calls only (BFL's polls and downloads are not calls).
    generation_requests: Callable[[Any], list[RecordedRequest]] = lambda fake: fake.requests
    sent_size: Callable[[RecordedRequest], str] = lambda seen: seen.body["size"]

    @property
    def env(self) -> str:
        return "IMAGEGEN_TEST_" + self.type.upper().replace("-", "_") + "_KEY"

    @property
    def model(self) -> str:
        return f"via-{self.type}"

    def calls(self, fake: Fake) -> int:
        return len(self.generation_requests(fake))

    def calls_for(self, n: int) -> int:
        return n if self.call_per_image else 1


AZURE_DEPLOYMENT = "dalle3-prod"


def _cut_png() -> bytes:
    """A whole PNG's first half: a valid header, the pixels cut short, no IEND."""
    buffer = io.BytesIO()
    Image.effect_noise((1024, 1024), 40).convert("RGB").save(buffer, "PNG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _openai_answer(image: bytes) -> bytes:
    return orjson.dumps({"created": 1_795_520_000, "data": [{"b64_json": _b64(image)}]})


def _imagen_answer(image: bytes) -> bytes:
    return orjson.dumps(
        {"predictions": [{"bytesBase64Encoded": _b64(image), "mimeType": "image/png"}]}
    )


def _gemini_answer(image: bytes) -> bytes:
    part = {"inlineData": {"mimeType": "image/png", "data": _b64(image)}}
    candidate = {"content": {"role": "model", "parts": [part]}, "finishReason": "STOP"}
    return orjson.dumps({"candidates": [candidate]})


SCENARIOS = [
    Scenario(
        type="openai",
        upstream_model="gpt-image-1",
        key="sk-openai-upstream-0123456789",
        make_fake=lambda: oai.FakeOpenAIUpstream(api_key="sk-openai-upstream-0123456789"),
        base_url=lambda fake: fake.base_url,
        ok=oai.ok,
        server_error=oai.server_error,
        rate_limited=lambda: oai.rate_limited(retry_after=1),
        garbage=oai.garbage,
        slow=lambda: oai.slow(SLOW),
        refusals={"non2xx": oai.moderation_blocked},
        cut_image=lambda: oai.raw(200, _openai_answer(_cut_png())),
        # gpt-image has no 16:9: its landscape size passes through as it is.
        wide_size="1536x1024",
        wide_sent="1536x1024",
        wide_pixels=(1536, 1024),
    ),
    Scenario(
        type="azure-openai",
        upstream_model=AZURE_DEPLOYMENT,
        key="azure-upstream-key-0123456789",
        make_fake=lambda: oai.FakeOpenAIUpstream(
            api_key="azure-upstream-key-0123456789",
            azure_deployments={AZURE_DEPLOYMENT: "dall-e-3"},
        ),
        base_url=lambda fake: fake.base_url,
        ok=oai.ok,
        server_error=oai.server_error,
        rate_limited=lambda: oai.azure_rate_limited(retry_after_ms=1000),
        garbage=oai.garbage,
        slow=lambda: oai.slow(SLOW),
        refusals={
            "non2xx": oai.azure_content_policy_violation,
            "in200": oai.refusal_in_200,
        },
        cut_image=lambda: oai.raw(200, _openai_answer(_cut_png())),
        wide_size="1792x1024",
        wide_sent="1792x1024",
        wide_pixels=(1792, 1024),
        options='deployment_model = "dall-e-3"',
        # dall-e-3 makes one image per call.
        call_per_image=True,
    ),
    Scenario(
        type="google-imagen",
        upstream_model="imagen-3.0-generate-002",
        key="AIza-imagen-upstream-0123456789",
        make_fake=lambda: imagen.FakeGoogleImagen.gemini("AIza-imagen-upstream-0123456789"),
        base_url=lambda fake: fake.base_url,
        ok=imagen.ok,
        server_error=imagen.server_error,
        # Google says when to retry in a RetryInfo detail rather than a Retry-After header.
        rate_limited=lambda: imagen.rate_limited(retry_delay="1s"),
        garbage=imagen.garbage,
        slow=lambda: imagen.slow(SLOW),
        refusals={"non2xx": imagen.prompt_blocked, "in200": imagen.all_filtered},
        cut_image=lambda: imagen.raw(200, _imagen_answer(_cut_png())),
        wide_size="1792x1024",
        wide_sent="16:9",
        wide_pixels=(1408, 768),
        sent_size=lambda seen: seen.body["parameters"]["aspectRatio"],
    ),
    Scenario(
        type="vertex-imagen",
        upstream_model="imagen-3.0-generate-002",
        key="ya29.vertex-upstream-0123456789",
        make_fake=lambda: imagen.FakeGoogleImagen.vertex_ai("ya29.vertex-upstream-0123456789"),
        base_url=lambda fake: fake.base_url,
        ok=imagen.ok,
        server_error=imagen.unavailable,
        rate_limited=lambda: imagen.rate_limited(retry_delay=None, retry_after=1),
        garbage=imagen.wrong_content_type,
        slow=lambda: imagen.slow(SLOW),
        refusals={"non2xx": imagen.response_blocked, "in200": imagen.all_filtered},
        cut_image=lambda: imagen.raw(200, _imagen_answer(_cut_png())),
        wide_size="1792x1024",
        wide_sent="16:9",
        wide_pixels=(1408, 768),
        options='project = "test-project"\nlocation = "us-central1"',
        sent_size=lambda seen: seen.body["parameters"]["aspectRatio"],
    ),
    Scenario(
        type="gemini",
        upstream_model="gemini-2.5-flash-image",
        key="AIza-gemini-upstream-0123456789",
        make_fake=lambda: gemini.FakeGeminiUpstream(api_key="AIza-gemini-upstream-0123456789"),
        base_url=lambda fake: fake.base_url,
        ok=gemini.ok,
        server_error=gemini.server_error,
        rate_limited=lambda: gemini.rate_limited(retry_delay="1s"),
        garbage=gemini.garbage,
        slow=lambda: gemini.slow(SLOW),
        refusals={
            "non2xx": gemini.refused_with_400,
            "in200": gemini.prompt_blocked,
            "in200-finish": gemini.finish_refusal,
        },
        cut_image=lambda: gemini.raw(200, _gemini_answer(_cut_png())),
        wide_size="1792x1024",
        wide_sent="16:9",
        wide_pixels=(1344, 768),
        call_per_image=True,
        sent_size=lambda seen: seen.body["generationConfig"]["imageConfig"]["aspectRatio"],
    ),
    Scenario(
        type="stability",
        upstream_model="stable-image-core",
        key="sk-stability-upstream-0123456789",
        make_fake=lambda: stability.FakeStabilityUpstream(
            api_key="sk-stability-upstream-0123456789"
        ),
        base_url=lambda fake: fake.base_url,
        ok=stability.ok,
        server_error=stability.server_error,
        rate_limited=lambda: stability.rate_limited(retry_after=1),
        garbage=stability.garbage,
        slow=lambda: stability.slow(SLOW),
        refusals={"non2xx": stability.content_moderation, "in200": stability.content_filtered},
        cut_image=stability.half_image,
        # Stability bills the generation it made, whole or not.
        cut_image_is_ambiguous=True,
        wide_size="1792x1024",
        wide_sent="16:9",
        wide_pixels=(1344, 768),
        call_per_image=True,
        sent_size=lambda seen: seen.body["aspect_ratio"],
    ),
    Scenario(
        type="bfl",
        upstream_model="flux-pro-1.1",
        key="bfl-upstream-key-0123456789",
        make_fake=lambda: bfl.FakeBflUpstream(api_key="bfl-upstream-key-0123456789"),
        base_url=lambda fake: fake.origin,
        ok=bfl.ok,
        server_error=bfl.server_error,
        rate_limited=lambda: bfl.rate_limited(retry_after=1),
        garbage=bfl.garbage,
        slow=lambda: bfl.slow(SLOW),
        refusals={
            "non2xx": bfl.moderation_refusal_400,
            "in200": lambda: bfl.moderated("Request Moderated"),
        },
        # A width/height model: the size keeps its ratio within 1440 px, in steps of 32.
        wide_size="1792x1024",
        wide_sent="1440x832",
        wide_pixels=(1440, 832),
        options="poll_interval_seconds = 0.01",
        call_per_image=True,
        server_error_is_ambiguous=True,
        cut_image=lambda: bfl.ok(sample="half"),
        # The task was submitted and billed; its sample came back cut short.
        cut_image_is_ambiguous=True,
        generation_requests=lambda fake: fake.submits,
        sent_size=lambda seen: f"{seen.body['width']}x{seen.body['height']}",
    ),
]
BY_TYPE = {s.type: s for s in SCENARIOS}
REFUSALS = [(s.type, label) for s in SCENARIOS for label in s.refusals]


def _provider(
    name: str, s: Scenario, url: str, *, timeout: float, retries: int, key_env: str = ""
) -> str:
    return f"""
[providers.{name}]
type = "{s.type}"
base_url = "{url}"
api_key_env = "{key_env or s.env}"
timeout_seconds = {timeout}
max_retries = {retries}
{s.options}
"""


def _model(model_id: str, provider: str, s: Scenario, sizes: Sequence[str]) -> str:
    return f"""
[models.{model_id}]
provider = "{provider}"
upstream_model = "{s.upstream_model}"
sizes = {list(sizes)!r}
max_images = 4

[models.{model_id}.price_usd]
default = "0.04"
"""


def _failover_model(model_id: str, first: str, second: str, upstream_model: str) -> str:
    return f"""
[models.{model_id}]
sizes = ["1024x1024"]
max_images = 4

[models.{model_id}.price_usd]
default = "0.04"

[[models.{model_id}.deployments]]
provider = "{first}"
upstream_model = "{upstream_model}"

[models.{model_id}.deployments.price_usd]
default = "0.05"

[[models.{model_id}.deployments]]
provider = "{second}"
upstream_model = "{upstream_model}"

[models.{model_id}.deployments.price_usd]
default = "0.03"
"""


def _config(fakes: dict[str, tuple[Fake, Fake]]) -> str:
    parts = [
        """
[routing]
backoff_base_seconds = 0.01
backoff_max_seconds = 0.05
# No test here may open a circuit for the next: the breaker has stacks of its own.
breaker_failures = 1000
"""
    ]
    for s in SCENARIOS:
        a, b = (s.base_url(fake) for fake in fakes[s.type])
        t = s.type
        parts += [
            _provider(f"{t}-retry", s, a, timeout=5, retries=1),
            _provider(f"{t}-once", s, a, timeout=TIMEOUT, retries=0),
            _provider(f"{t}-first", s, a, timeout=5, retries=1),
            _provider(f"{t}-second", s, b, timeout=5, retries=0),
            _provider(f"{t}-nokey", s, a, timeout=5, retries=0, key_env="IMAGEGEN_TEST_ABSENT_KEY"),
            _model(s.model, f"{t}-retry", s, ["1024x1024", s.wide_size, UNSERVABLE]),
            _model(f"{s.model}-once", f"{t}-once", s, ["1024x1024"]),
            _failover_model(f"{s.model}-failover", f"{t}-first", f"{t}-second", s.upstream_model),
            _model(f"{s.model}-nokey", f"{t}-nokey", s, ["1024x1024"]),
            # An operator who accepts paying twice over paying nothing: ambiguous retried.
            _provider(f"{t}-repeat", s, a, timeout=TIMEOUT, retries=1) + "retry_ambiguous = true\n",
            _model(f"{s.model}-repeat", f"{t}-repeat", s, ["1024x1024"]),
        ]
    return "".join(parts)


# -- the module's stack ---------------------------------------------------------------------


@dataclass
class World:
    stack: Stack
    # Provider type -> (fake A, fake B).
    fakes: dict[str, tuple[Fake, Fake]] = field(default_factory=dict)

    def reset(self) -> None:
        for pair in self.fakes.values():
            for fake in pair:
                fake.reset()


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    async with AsyncExitStack() as exits:
        fakes: dict[str, tuple[Fake, Fake]] = {}
        for s in SCENARIOS:
            pair = (s.make_fake(), s.make_fake())
            for fake in pair:
                await exits.enter_async_context(fake)
            fakes[s.type] = pair
        stack = await exits.enter_async_context(
            start_stack(
                _config(fakes),
                tmp_path_factory.mktemp("routing"),
                environ={s.env: s.key for s in SCENARIOS},
            )
        )
        yield World(stack, fakes)


@pytest.fixture
def env(world: World) -> World:
    """The module's stack with every fake's script and record emptied."""
    world.reset()
    return world


@dataclass
class Case:
    """One test's view: its scenario, its stack, fake A and fake B, a fresh account."""

    s: Scenario
    stack: Stack
    a: Fake
    b: Fake
    account_id: str
    key: str
    http: aiohttp.ClientSession

    async def post(self, **body: Any) -> aiohttp.ClientResponse:
        return await self.http.post(
            self.stack.http_url + GENERATIONS,
            json={"prompt": PROMPT, "response_format": "b64_json", **body},
            headers=bearer(self.key),
        )


@pytest.fixture(params=[s.type for s in SCENARIOS])
async def case(request: pytest.FixtureRequest, env: World, http: aiohttp.ClientSession) -> Case:
    s = BY_TYPE[request.param]
    account_id, key, _ = await env.stack.new_account(OPENING)
    a, b = env.fakes[s.type]
    return Case(s, env.stack, a, b, account_id, key, http)


async def _ledger(stack: Stack, account_id: str) -> list[tuple[str, int, int]]:
    return [
        (e.kind, e.available_delta_micros, e.held_delta_micros)
        for e in await stack.ledger(account_id)
    ]


async def _assert_ledger_sums_to_balance(stack: Stack, account_id: str) -> None:
    """As the Admin API shows them: the entries add up to the balance."""
    account = await stack.account(account_id)
    entries = await _ledger(stack, account_id)
    assert sum(e[1] for e in entries) == account.available_micros
    assert sum(e[2] for e in entries) == account.held_micros


async def _assert_upstream_error(case: Case, resp: aiohttp.ClientResponse) -> None:
    error = await assert_openai_error(resp, 502, "upstream_error", should_retry=True)
    # Neither the upstream's credential nor the caller's key leaks into the message.
    assert case.s.key not in error["message"]
    assert case.key not in error["message"]


# -- 1. success, n=2, in both response formats ----------------------------------------------


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
async def test_two_images_come_back_at_the_providers_real_size_and_cost_twice_the_price(
    case: Case, response_format: str
) -> None:
    async with case.stack.openai_client(case.key) as client:
        answer = await client.images.generate(
            model=case.s.model,
            prompt=PROMPT,
            n=2,
            size=case.s.wide_size,  # type: ignore[arg-type]
            response_format=response_format,  # type: ignore[arg-type]
        )
    assert answer.data is not None
    assert len(answer.data) == 2
    for item in answer.data:
        if response_format == "b64_json":
            assert item.url is None
            assert item.b64_json is not None
            data = base64.b64decode(item.b64_json)
        else:
            assert item.b64_json is None
            assert item.url is not None
            assert item.url.startswith(case.stack.http_url + "/v1/files/images/")
            # The link downloads through the gateway, with no API key.
            async with case.http.get(item.url) as resp:
                assert resp.status == 200
                assert resp.content_type == "image/png"
                data = await resp.read()
        assert image_size(data) == case.s.wide_pixels
    assert case.s.calls(case.a) == case.s.calls_for(2)
    assert case.s.calls(case.b) == 0
    await case.stack.assert_balance(case.account_id, OPENING - 2 * PRICE)
    assert await _ledger(case.stack, case.account_id) == [
        ("credit", OPENING, 0),
        ("hold", -2 * PRICE, 2 * PRICE),
        ("capture", 0, -2 * PRICE),
    ]


# -- 2. 429 with a short retry hint, then success on the retry --------------------------------


async def test_a_429_is_waited_out_and_retried_and_charged_once(case: Case) -> None:
    case.a.script(case.s.rate_limited(), case.s.ok())
    started = time.monotonic()
    async with await case.post(model=case.s.model, n=1) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    elapsed = time.monotonic() - started
    assert len(body["data"]) == 1
    assert case.s.calls(case.a) == 2
    # The backoff alone is 10 ms: the wait is the upstream's one second.
    assert elapsed >= 0.9
    await case.stack.assert_balance(case.account_id, OPENING - PRICE)
    kinds = [e[0] for e in await _ledger(case.stack, case.account_id)]
    assert kinds == ["credit", "hold", "capture"]


# -- 3. 5xx on the first deployment, success on the second ------------------------------------


async def test_a_failing_first_deployment_fails_over_to_the_second_at_its_price(
    case: Case,
) -> None:
    n = 2
    # Every call the first deployment can make (one try and one retry) fails.
    case.a.script(*(case.s.server_error() for _ in range(2 * case.s.calls_for(n))))
    async with await case.post(model=f"{case.s.model}-failover", n=n) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert [image_size(base64.b64decode(item["b64_json"])) for item in body["data"]] == [
        (1024, 1024)
    ] * n
    if case.s.call_per_image:
        # The first failed call of a try cancels its sibling, which may not have been sent.
        assert 2 <= case.s.calls(case.a) <= 2 * n
    else:
        assert case.s.calls(case.a) == 2
    assert case.s.calls(case.b) == case.s.calls_for(n)
    # The hold covered the dearest deployment; the charge is the serving one's price.
    await case.stack.assert_balance(case.account_id, OPENING - n * SECOND_PRICE)
    assert await _ledger(case.stack, case.account_id) == [
        ("credit", OPENING, 0),
        ("hold", -n * FIRST_PRICE, n * FIRST_PRICE),
        ("capture", 0, -n * SECOND_PRICE),
        ("release", n * (FIRST_PRICE - SECOND_PRICE), -n * (FIRST_PRICE - SECOND_PRICE)),
    ]


# -- 4. timeout -----------------------------------------------------------------------------


async def test_a_slow_upstream_times_out_as_502_and_nothing_stays_held(case: Case) -> None:
    case.a.script(case.s.slow())
    started = time.monotonic()
    async with await case.post(model=f"{case.s.model}-once") as resp:
        await _assert_upstream_error(case, resp)
    elapsed = time.monotonic() - started
    # The provider's 0.5 s timeout, not the fake's answer after 2 s.
    assert TIMEOUT * 0.8 <= elapsed < SLOW * 0.9
    assert case.s.calls(case.a) == 1
    await case.stack.assert_not_charged(case.account_id, OPENING)


# -- 5. garbage -----------------------------------------------------------------------------


async def test_an_unreadable_answer_is_502_and_charges_nothing(case: Case) -> None:
    case.a.script(case.s.garbage())
    async with await case.post(model=f"{case.s.model}-once") as resp:
        await _assert_upstream_error(case, resp)
    assert case.s.calls(case.a) == 1
    await case.stack.assert_not_charged(case.account_id, OPENING)


# -- 6. every deployment fails ---------------------------------------------------------------


async def test_when_every_deployment_fails_the_caller_gets_502_and_pays_nothing(
    case: Case,
) -> None:
    case.a.script(case.s.server_error(), case.s.server_error())
    case.b.script(case.s.server_error())
    async with await case.post(model=f"{case.s.model}-failover") as resp:
        await _assert_upstream_error(case, resp)
    # The first deployment was tried and retried (unless its failure may have been billed),
    # then the second once.
    first = 1 if case.s.server_error_is_ambiguous else 2
    assert (case.s.calls(case.a), case.s.calls(case.b)) == (first, 1)
    await case.stack.assert_not_charged(case.account_id, OPENING)
    await _assert_ledger_sums_to_balance(case.stack, case.account_id)


# -- 7. refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider_type", "refusal"), REFUSALS, ids=[f"{t}-{r}" for t, r in REFUSALS]
)
async def test_a_refusal_is_400_content_policy_and_neither_retried_nor_failed_over(
    env: World, http: aiohttp.ClientSession, provider_type: str, refusal: str
) -> None:
    s = BY_TYPE[provider_type]
    account_id, key, _ = await env.stack.new_account(OPENING)
    a, b = env.fakes[provider_type]
    a.script(s.refusals[refusal](), s.ok())
    async with http.post(
        env.stack.http_url + GENERATIONS,
        json={"model": f"{s.model}-failover", "prompt": PROMPT, "response_format": "b64_json"},
        headers=bearer(key),
    ) as resp:
        await assert_openai_error(
            resp,
            400,
            "content_policy_violation",
            error_type="invalid_request_error",
            should_retry=False,
        )
    # The first deployment has a retry to spare and a second deployment stands by: neither
    # is used for a refusal.
    assert s.calls(a) == 1
    assert s.calls(b) == 0
    await env.stack.assert_not_charged(account_id, OPENING)


# -- 8. sizes ---------------------------------------------------------------------------------


async def test_a_size_is_mapped_to_what_the_provider_makes_and_answered_at_its_real_size(
    case: Case,
) -> None:
    async with await case.post(model=case.s.model, size=case.s.wide_size) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    sent = case.s.generation_requests(case.a)
    assert [case.s.sent_size(seen) for seen in sent] == [case.s.wide_sent]
    assert image_size(base64.b64decode(body["data"][0]["b64_json"])) == case.s.wide_pixels
    await case.stack.assert_balance(case.account_id, OPENING - PRICE)


async def test_a_size_the_provider_cannot_serve_is_400_before_any_call_or_hold(
    case: Case,
) -> None:
    async with await case.post(model=case.s.model, size=UNSERVABLE) as resp:
        error = await assert_openai_error(
            resp, 400, "invalid_value", param="size", should_retry=False
        )
    assert UNSERVABLE in error["message"]
    assert case.s.calls(case.a) == 0
    await case.stack.assert_untouched(case.account_id, OPENING)


# -- models without a credential ----------------------------------------------------------------


async def test_a_model_whose_provider_has_no_credential_is_not_listed_nor_served(
    env: World, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await env.stack.new_account(OPENING)
    async with http.get(env.stack.http_url + "/v1/models", headers=bearer(key)) as resp:
        assert resp.status == 200
        listed = {m["id"] for m in (await resp.json())["data"]}
    for s in SCENARIOS:
        assert {s.model, f"{s.model}-once", f"{s.model}-failover"} <= listed
        assert f"{s.model}-nokey" not in listed
    async with http.post(
        env.stack.http_url + GENERATIONS,
        json={"model": "via-stability-nokey", "prompt": PROMPT},
        headers=bearer(key),
    ) as resp:
        await assert_openai_error(resp, 400, "model_not_found", param="model")
    assert all(fake.hits == 0 for pair in env.fakes.values() for fake in pair)
    await env.stack.assert_untouched(account_id, OPENING)


# -- the circuit breaker (once, on the OpenAI type) -----------------------------------------------

BREAKER_KEY = "sk-breaker-upstream-0123456789"


def _breaker_config(primary: str, backup: str, cooldown: float) -> str:
    return textwrap.dedent(
        f"""
        [routing]
        backoff_base_seconds = 0.01
        backoff_max_seconds = 0.05
        breaker_failures = 2
        breaker_cooldown_seconds = {cooldown}

        [providers.primary]
        type = "openai"
        base_url = "{primary}"
        api_key_env = "IMAGEGEN_TEST_BREAKER_KEY"
        max_retries = 0

        [providers.backup]
        type = "openai"
        base_url = "{backup}"
        api_key_env = "IMAGEGEN_TEST_BREAKER_KEY"
        max_retries = 0
        """
    ) + _failover_model("guarded", "primary", "backup", "gpt-image-1")


@asynccontextmanager
async def _breaker_stack(
    tmp_path_factory: pytest.TempPathFactory, cooldown: float
) -> AsyncIterator[tuple[Stack, oai.FakeOpenAIUpstream, oai.FakeOpenAIUpstream]]:
    async with (
        oai.FakeOpenAIUpstream(api_key=BREAKER_KEY) as primary,
        oai.FakeOpenAIUpstream(api_key=BREAKER_KEY) as backup,
        start_stack(
            _breaker_config(primary.base_url, backup.base_url, cooldown),
            tmp_path_factory.mktemp("breaker"),
            environ={"IMAGEGEN_TEST_BREAKER_KEY": BREAKER_KEY},
        ) as stack,
    ):
        yield stack, primary, backup


async def _generate(stack: Stack, http: aiohttp.ClientSession, key: str) -> int:
    async with http.post(
        stack.http_url + GENERATIONS,
        json={"model": "guarded", "prompt": PROMPT, "response_format": "b64_json"},
        headers=bearer(key),
    ) as resp:
        await resp.read()
        return resp.status


async def test_an_open_circuit_skips_the_failing_deployment_until_its_long_cooldown_ends(
    tmp_path_factory: pytest.TempPathFactory, http: aiohttp.ClientSession
) -> None:
    async with _breaker_stack(tmp_path_factory, cooldown=3600) as (stack, primary, backup):
        account_id, key, _ = await stack.new_account(OPENING)
        primary.script(*(oai.server_error() for _ in range(10)))
        # Two failures in a row open the primary's circuit; both requests still succeed.
        assert [await _generate(stack, http, key) for _ in range(2)] == [200, 200]
        assert (primary.hits, backup.hits) == (2, 2)
        # While it is open the primary is not even tried.
        assert [await _generate(stack, http, key) for _ in range(3)] == [200, 200, 200]
        assert (primary.hits, backup.hits) == (2, 5)
        await stack.assert_balance(account_id, OPENING - 5 * SECOND_PRICE)
        # With the backup failing too and the primary skipped, the caller gets 502, unpaid.
        backup.script(oai.server_error())
        async with http.post(
            stack.http_url + GENERATIONS,
            json={"model": "guarded", "prompt": PROMPT, "response_format": "b64_json"},
            headers=bearer(key),
        ) as resp:
            await assert_openai_error(resp, 502, "upstream_error")
        assert (primary.hits, backup.hits) == (2, 6)
        await stack.assert_balance(account_id, OPENING - 5 * SECOND_PRICE)


async def test_after_the_cooldown_the_first_deployment_is_tried_again(
    tmp_path_factory: pytest.TempPathFactory, http: aiohttp.ClientSession
) -> None:
    cooldown = 1.0
    async with _breaker_stack(tmp_path_factory, cooldown=cooldown) as (stack, primary, backup):
        account_id, key, _ = await stack.new_account(OPENING)
        primary.script(oai.server_error(), oai.server_error())
        assert [await _generate(stack, http, key) for _ in range(2)] == [200, 200]
        opened = time.monotonic()
        assert await _generate(stack, http, key) == 200
        assert time.monotonic() - opened < cooldown, "the check ran too late to mean anything"
        assert (primary.hits, backup.hits) == (2, 3)
        # On-call sees the open circuit: one deployment, gauge 1.
        [(deployment, value)] = _open_circuits(stack).items()
        assert value == 1
        await _sleep_until(opened + cooldown + 0.1)
        # Cooled down: the primary gets a trial call, answers, and serves at its own price.
        assert [await _generate(stack, http, key) for _ in range(2)] == [200, 200]
        assert (primary.hits, backup.hits) == (4, 3)
        assert _open_circuits(stack) == {deployment: 0}
        await stack.assert_balance(account_id, OPENING - 3 * SECOND_PRICE - 2 * FIRST_PRICE)


def _open_circuits(stack: Stack) -> dict[tuple[str, str], float]:
    """imagegen_circuit_breaker_open, by (provider, upstream model)."""
    registry = stack.running.pipeline.metrics.registry
    return {
        (sample.labels["provider"], sample.labels["upstream_model"]): sample.value
        for family in registry.collect()
        if family.name == "imagegen_circuit_breaker_open"
        for sample in family.samples
    }


async def _sleep_until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


# -- the request id travels with the request ---------------------------------------------------


async def test_the_callers_request_id_reaches_the_upstream(case: Case) -> None:
    request_id = f"trace-{case.s.type}-{case.account_id}"
    resp = await case.http.post(
        case.stack.http_url + GENERATIONS,
        json={"prompt": PROMPT, "model": case.s.model, "size": case.s.wide_size},
        headers={**bearer(case.key), "X-Request-ID": request_id},
    )
    assert resp.status == 200, await resp.text()
    assert resp.headers["x-request-id"] == request_id
    sent = [r.headers.get("X-Request-ID") for r in case.a.requests]
    assert request_id in sent, sent


# -- an image cut short is a failure, never a delivery -----------------------------------------


async def test_an_image_cut_short_fails_over_to_a_whole_one_charged_at_its_price(
    case: Case,
) -> None:
    # Every call the first deployment may make (a try and, unless billed, a retry) is cut.
    case.a.script(case.s.cut_image(), case.s.cut_image())
    async with await case.post(model=f"{case.s.model}-failover", n=1) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    data = base64.b64decode(body["data"][0]["b64_json"])
    assert image_size(data) == (1024, 1024)
    Image.open(io.BytesIO(data)).load()  # decodes whole
    assert case.s.calls(case.a) == (1 if case.s.cut_image_is_ambiguous else 2)
    assert case.s.calls(case.b) == 1
    await case.stack.assert_balance(case.account_id, OPENING - SECOND_PRICE)
    assert await _ledger(case.stack, case.account_id) == [
        ("credit", OPENING, 0),
        ("hold", -FIRST_PRICE, FIRST_PRICE),
        ("capture", 0, -SECOND_PRICE),
        ("release", FIRST_PRICE - SECOND_PRICE, -(FIRST_PRICE - SECOND_PRICE)),
    ]


async def test_an_image_cut_short_with_no_other_deployment_is_502_and_charges_nothing(
    case: Case,
) -> None:
    case.a.script(case.s.cut_image())
    async with await case.post(model=f"{case.s.model}-once") as resp:
        await _assert_upstream_error(case, resp)
    assert case.s.calls(case.a) == 1
    await case.stack.assert_not_charged(case.account_id, OPENING)
    await _assert_ledger_sums_to_balance(case.stack, case.account_id)


# -- errors named for what they are ------------------------------------------------------------

GEMINI_REFUSALS = [
    "SAFETY",
    "IMAGE_SAFETY",
    "PROHIBITED_CONTENT",
    "IMAGE_PROHIBITED_CONTENT",
    "BLOCKLIST",
    "SPII",
    "RECITATION",
    "IMAGE_RECITATION",
]
GEMINI_FAILURES = ["MAX_TOKENS", "OTHER", "MALFORMED_RESPONSE", "IMAGE_OTHER", "NO_IMAGE"]


@pytest.mark.parametrize("reason", GEMINI_REFUSALS)
async def test_a_gemini_safety_ending_is_400_content_policy_and_not_failed_over(
    env: World, http: aiohttp.ClientSession, reason: str
) -> None:
    account_id, key, _ = await env.stack.new_account(OPENING)
    a, b = env.fakes["gemini"]
    a.script(gemini.finished(reason))
    case = Case(BY_TYPE["gemini"], env.stack, a, b, account_id, key, http)
    async with await case.post(model="via-gemini-failover") as resp:
        await assert_openai_error(resp, 400, "content_policy_violation", should_retry=False)
    assert (a.hits, b.hits) == (1, 0)
    await env.stack.assert_not_charged(account_id, OPENING)


@pytest.mark.parametrize("reason", [*GEMINI_FAILURES, "STOP-with-text"])
async def test_a_gemini_ending_without_an_image_is_an_upstream_failure_that_fails_over(
    env: World, http: aiohttp.ClientSession, reason: str
) -> None:
    account_id, key, _ = await env.stack.new_account(OPENING)
    a, b = env.fakes["gemini"]
    failure = (
        gemini.text_instead_of_image() if reason == "STOP-with-text" else gemini.finished(reason)
    )
    a.script(failure, failure)
    case = Case(BY_TYPE["gemini"], env.stack, a, b, account_id, key, http)
    async with await case.post(model="via-gemini-failover") as resp:
        assert resp.status == 200, await resp.text()
    # Tried, retried, then the second deployment served it at its price.
    assert (a.hits, b.hits) == (2, 1)
    await env.stack.assert_balance(account_id, OPENING - SECOND_PRICE)


async def test_an_openai_user_error_is_400_invalid_value_with_its_message_not_a_refusal(
    env: World, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await env.stack.new_account(OPENING)
    a, b = env.fakes["openai"]
    message = "Invalid image: the file could not be read as PNG, JPEG or WEBP."
    a.script(
        oai.http_error(
            400, message=message, type="image_generation_user_error", code="invalid_image"
        )
    )
    case = Case(BY_TYPE["openai"], env.stack, a, b, account_id, key, http)
    async with await case.post(model="via-openai-failover") as resp:
        error = await assert_openai_error(resp, 400, "invalid_value", should_retry=False)
    assert error["message"] == message
    assert (a.hits, b.hits) == (1, 0)
    await env.stack.assert_not_charged(account_id, OPENING)


# -- outcomes that are unknown: counted, and repeated only where the operator says so --------


def _ambiguous(stack: Stack, provider: str, action: str) -> float:
    registry = stack.running.pipeline.metrics.registry
    value = registry.get_sample_value(
        "imagegen_upstream_ambiguous_total", {"provider": provider, "action": action}
    )
    return value or 0.0


async def test_a_timeout_after_sending_is_not_repeated_and_is_counted_as_ambiguous(
    env: World, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await env.stack.new_account(OPENING)
    a, b = env.fakes["openai"]
    case = Case(BY_TYPE["openai"], env.stack, a, b, account_id, key, http)
    before = _ambiguous(env.stack, "openai-once", "failed_over")
    a.script(oai.slow(SLOW))
    async with await case.post(model="via-openai-once") as resp:
        await _assert_upstream_error(case, resp)
    assert a.hits == 1
    assert _ambiguous(env.stack, "openai-once", "failed_over") == before + 1
    await env.stack.assert_not_charged(account_id, OPENING)


async def test_with_retry_ambiguous_a_timeout_is_repeated_and_counted_as_retried(
    env: World, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await env.stack.new_account(OPENING)
    a, b = env.fakes["openai"]
    case = Case(BY_TYPE["openai"], env.stack, a, b, account_id, key, http)
    before = _ambiguous(env.stack, "openai-repeat", "retried")
    a.script(oai.slow(SLOW), oai.ok())
    async with await case.post(model="via-openai-repeat") as resp:
        assert resp.status == 200, await resp.text()
    assert a.hits == 2
    assert _ambiguous(env.stack, "openai-repeat", "retried") == before + 1
    await env.stack.assert_balance(account_id, OPENING - PRICE)


# -- BFL through the stack: one submission per image, whatever the polls do ------------------


async def test_a_bfl_poll_failing_with_500_then_429_still_delivers_one_image_submitted_once(
    env: World, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await env.stack.new_account(OPENING)
    a, b = env.fakes["bfl"]
    a.script(bfl.ok(poll_errors=(500, 429)))
    case = Case(BY_TYPE["bfl"], env.stack, a, b, account_id, key, http)
    async with await case.post(model="via-bfl") as resp:
        assert resp.status == 200, await resp.text()
        assert len((await resp.json())["data"]) == 1
    assert len(a.submits) == 1
    await env.stack.assert_balance(account_id, OPENING - PRICE)


async def test_a_bfl_request_of_3_with_one_task_moderated_delivers_and_charges_2(
    env: World, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await env.stack.new_account(OPENING)
    a, b = env.fakes["bfl"]
    a.script(bfl.ok(), bfl.moderated(), bfl.ok())
    case = Case(BY_TYPE["bfl"], env.stack, a, b, account_id, key, http)
    async with await case.post(model="via-bfl", n=3) as resp:
        assert resp.status == 200, await resp.text()
        assert len((await resp.json())["data"]) == 2
    assert len(a.submits) == 3
    await env.stack.assert_balance(account_id, OPENING - 2 * PRICE)
    assert await _ledger(env.stack, account_id) == [
        ("credit", OPENING, 0),
        ("hold", -3 * PRICE, 3 * PRICE),
        ("capture", 0, -2 * PRICE),
        ("release", PRICE, -PRICE),
    ]
