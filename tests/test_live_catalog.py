"""The built-in catalog, end to end: the real service and gateway run on the shipped
``default_config.toml``, its providers pointed at loopback fakes that speak each provider's
wire format, and every upstream model in it answers a request through its real adapter with an
image of the size the provider really returns, charged by the provider's own price basis.

Also here: gpt-image-2's size rule as a caller meets it, a token-priced edit and a FLUX.2
request with the arithmetic spelled out, the seed's ``imagen-3`` request, a model the upstream
retired (fail over, or one clean 502), and ``imagegen-admin providers check``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image
from prometheus_client import generate_latest

from imagegen_service.config import DEFAULT_CONFIG_PATH
from tests.conftest import assert_openai_error, bearer, image_size
from tests.fakes import bfl_upstream as bfl
from tests.fakes import gemini_upstream as gemini
from tests.fakes import openai_upstream as oai
from tests.fakes import stability_upstream as stability
from tests.stack import Stack, start_stack

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
OPENING = 10_000_000
KEYS = {
    "OPENAI_API_KEY": "sk-live-catalog-openai-0123456789",
    "GEMINI_API_KEY": "AIza-live-catalog-gemini-0123456789",
    "STABILITY_API_KEY": "sk-live-catalog-stability-0123456789",
    "BFL_API_KEY": "bfl-live-catalog-0123456789",
}
ADMIN = Path(sys.executable).with_name("imagegen-admin")

# What each provider bills, in micro-dollars, written out here rather than read back from the
# catalog: a price that drifts in the catalog must fail this test.
TOKEN_PRICES = {  # per 1M tokens: text input, image input, output
    "gpt-image-2": (5_000_000, 8_000_000, 30_000_000),
    "gpt-image-2-2026-04-21": (5_000_000, 8_000_000, 30_000_000),
    "gpt-image-1.5": (5_000_000, 8_000_000, 32_000_000),
    "chatgpt-image-latest": (5_000_000, 8_000_000, 32_000_000),
    "gpt-image-1-mini": (2_000_000, 2_500_000, 8_000_000),
}
PER_IMAGE = {  # at the default size (1024x1024)
    "gemini-3.1-flash-image": 67_000,
    "gemini-3-pro-image": 134_000,
    "imagen-3": 67_000,
    "imagen-4": 67_000,
    "stable-image-ultra": 80_000,
    "stable-image-core": 30_000,
    "sd3.5-large": 65_000,
    "flux-pro-1.1": 40_000,
    "flux-pro-1.1-ultra": 60_000,
    "flux-kontext-pro": 40_000,
    # FLUX.2 at 1024x1024: exactly one megapixel, so the first-megapixel price alone.
    "flux-2-pro": 30_000,
    "flux-2-max": 70_000,
    "flux-2-flex": 60_000,
    "flux-2-klein-4b": 14_000,
}
# The real pixel size each upstream answers a 1024x1024 request with.
REAL_SIZE = {"stable-image-ultra": (2048, 2048), "flux-pro-1.1-ultra": (2048, 2048)}


def _default_toml() -> str:
    return DEFAULT_CONFIG_PATH.read_text()


def _with_base_urls(toml: str, urls: dict[str, str]) -> str:
    """The shipped configuration with each provider's endpoint moved to its fake."""
    for name, url in urls.items():
        header = f"[providers.{name}]\n"
        assert header in toml, name
        toml = toml.replace(header, f'{header}base_url = "{url}"\n', 1)
    # Retries wait milliseconds here; nothing else changes.
    return toml.replace("backoff_base_seconds = 0.5", "backoff_base_seconds = 0.01", 1)


RETIRED_MODELS = """
[providers.openai-old]
type = "openai"
base_url = "{old}"
api_key_env = "OPENAI_API_KEY"
max_retries = 2

[models.retired-then-live]
owned_by = "openai"

[models.retired-then-live.token_price_usd]
input = "5.00"
output = "32.00"

[models.retired-then-live.price_usd]
"*/low" = "0.016"
"*/medium" = "0.06"
"*/high" = "0.24"
"*/auto" = "0.24"

[[models.retired-then-live.deployments]]
provider = "openai-old"
upstream_model = "gpt-image-1"

[[models.retired-then-live.deployments]]
provider = "openai"
upstream_model = "gpt-image-1.5"

[models.retired-only]
provider = "openai-old"
upstream_model = "gpt-image-1"
owned_by = "openai"

[models.retired-only.price_usd]
default = "0.24"
"""


@dataclass
class World:
    stack: Stack
    openai: oai.FakeOpenAIUpstream
    openai_old: oai.FakeOpenAIUpstream
    gemini: gemini.FakeGeminiUpstream
    stability: stability.FakeStabilityUpstream
    bfl: bfl.FakeBflUpstream
    config_path: Path

    def reset(self) -> None:
        for fake in (self.openai, self.openai_old, self.gemini, self.stability, self.bfl):
            fake.reset()


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    async with AsyncExitStack() as exits:
        fakes = World(
            stack=None,  # type: ignore[arg-type]
            openai=oai.FakeOpenAIUpstream(api_key=KEYS["OPENAI_API_KEY"]),
            openai_old=oai.FakeOpenAIUpstream(
                api_key=KEYS["OPENAI_API_KEY"], retired_models=oai.OPENAI_RETIRED_MODELS
            ),
            gemini=gemini.FakeGeminiUpstream(api_key=KEYS["GEMINI_API_KEY"]),
            stability=stability.FakeStabilityUpstream(api_key=KEYS["STABILITY_API_KEY"]),
            bfl=bfl.FakeBflUpstream(api_key=KEYS["BFL_API_KEY"]),
            config_path=Path(),
        )
        for fake in (fakes.openai, fakes.openai_old, fakes.gemini, fakes.stability, fakes.bfl):
            await exits.enter_async_context(fake)
        toml = _with_base_urls(
            _default_toml(),
            {
                "openai": fakes.openai.base_url,
                "gemini": fakes.gemini.base_url,
                "stability": fakes.stability.base_url,
                "bfl": fakes.bfl.origin,
            },
        ) + RETIRED_MODELS.format(old=fakes.openai_old.base_url)
        # BFL is polled every 10 ms here rather than every half second.
        toml = toml.replace("[providers.bfl]\n", "[providers.bfl]\npoll_interval_seconds = 0.01\n")
        root = tmp_path_factory.mktemp("live-catalog")
        fakes.stack = await exits.enter_async_context(start_stack(toml, root, environ=KEYS))
        fakes.config_path = root / "imagegen.toml"
        yield fakes


@pytest.fixture
def env(world: World) -> World:
    world.reset()
    return world


async def _account(stack: Stack) -> tuple[str, str]:
    account_id, key, _ = await stack.new_account(OPENING)
    return account_id, key


async def _charged(stack: Stack, account_id: str) -> int:
    account = await stack.account(account_id)
    assert account.held_micros == 0
    return OPENING - account.available_micros


def _token_cost(model: str, usage: dict[str, Any]) -> int:
    text_rate, image_rate, output_rate = TOKEN_PRICES[model]
    details = usage.get("input_tokens_details") or {}
    image_in = int(details.get("image_tokens", 0))
    text_in = int(usage["input_tokens"]) - image_in
    output = int(usage["output_tokens"])
    total = text_in * text_rate + image_in * image_rate + output * output_rate
    return -(-total // 1_000_000)


def _shipped_models() -> list[str]:
    import tomllib

    models = tomllib.loads(_default_toml())["models"]
    return [m for m, t in models.items() if t.get("provider") != "local"]


# -- every model of the built-in catalog ---------------------------------------------------


async def test_with_every_credential_set_models_lists_the_whole_built_in_catalog(
    env: World, http: aiohttp.ClientSession
) -> None:
    _, key = await _account(env.stack)
    async with http.get(env.stack.http_url + "/v1/models", headers=bearer(key)) as resp:
        assert resp.status == 200
        listed = {m["id"] for m in (await resp.json())["data"]}
    assert set(_shipped_models()) <= listed


@pytest.mark.parametrize("model", _shipped_models())
async def test_every_built_in_model_makes_an_image_through_its_adapter_charged_by_its_basis(
    env: World, http: aiohttp.ClientSession, model: str
) -> None:
    account_id, key = await _account(env.stack)
    body = {"model": model, "prompt": "a lighthouse at dusk", "n": 1, "size": "1024x1024"}
    body["response_format"] = "b64_json"
    async with http.post(env.stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    [item] = answer["data"]
    assert image_size(base64.b64decode(item["b64_json"])) == REAL_SIZE.get(model, (1024, 1024))
    charged = await _charged(env.stack, account_id)
    if model in TOKEN_PRICES:
        # Billed by the tokens the upstream reported, never more than the hold.
        usage = answer["usage"]
        assert usage["output_tokens"] > 0
        assert charged == _token_cost(model, usage)
    else:
        assert charged == PER_IMAGE[model]


# -- gpt-image-2's size rule, as a caller meets it ------------------------------------------


async def test_gpt_image_2_makes_a_free_size_that_keeps_its_rule(
    env: World, http: aiohttp.ClientSession
) -> None:
    account_id, key = await _account(env.stack)
    body = {"model": "gpt-image-2", "prompt": "a wide harbour", "size": "1536x864"}
    async with http.post(env.stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    assert answer["size"] == "1536x864"
    assert image_size(base64.b64decode(answer["data"][0]["b64_json"])) == (1536, 864)
    [sent] = env.openai.requests
    assert sent.body["size"] == "1536x864"
    assert await _charged(env.stack, account_id) == _token_cost("gpt-image-2", answer["usage"])


@pytest.mark.parametrize("size", ["1000x1000", "3840x1024", "512x512", "4096x2304"])
async def test_gpt_image_2_refuses_a_size_that_breaks_its_rule_before_money_moves(
    env: World, http: aiohttp.ClientSession, size: str
) -> None:
    account_id, key = await _account(env.stack)
    body = {"model": "gpt-image-2", "prompt": "a wide harbour", "size": size}
    async with http.post(env.stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        error = await assert_openai_error(resp, 400, "invalid_value", param="size")
    assert "multiples of 16" in error["message"]
    assert env.openai.hits == 0
    await env.stack.assert_untouched(account_id, OPENING)


# -- the arithmetic of two price bases, through the stack ------------------------------------


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 160)).save(buffer, "PNG")
    return buffer.getvalue()


async def test_a_token_priced_edit_charges_text_and_image_input_apart(
    env: World, http: aiohttp.ClientSession
) -> None:
    account_id, key = await _account(env.stack)
    form = aiohttp.FormData()
    form.add_field("model", "gpt-image-2")
    form.add_field("prompt", "paint the sky orange")
    form.add_field("size", "1024x1024")
    form.add_field("quality", "medium")
    form.add_field("image", _png(1024, 1024), filename="in.png", content_type="image/png")
    async with http.post(env.stack.http_url + EDITS, data=form, headers=bearer(key)) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    usage = answer["usage"]
    text_in = usage["input_tokens_details"]["text_tokens"]
    image_in = usage["input_tokens_details"]["image_tokens"]
    output = usage["output_tokens"]
    assert image_in > 0 and text_in > 0 and output > 0
    assert usage["input_tokens"] == text_in + image_in
    # gpt-image-2: $5 per 1M text tokens, $8 per 1M image tokens, $30 per 1M output tokens;
    # micro-dollars = (text * 5 + image * 8 + output * 30), rounded up to a whole one.
    expected = -(-(text_in * 5_000_000 + image_in * 8_000_000 + output * 30_000_000) // 10**6)
    assert await _charged(env.stack, account_id) == expected
    # Had the image tokens been priced as text, the charge would differ.
    as_text = -(-((text_in + image_in) * 5_000_000 + output * 30_000_000) // 10**6)
    assert expected != as_text


async def test_a_flux_2_image_is_charged_by_started_megapixels(
    env: World, http: aiohttp.ClientSession
) -> None:
    account_id, key = await _account(env.stack)
    body = {"model": "flux-2-pro", "prompt": "a red bicycle", "size": "1920x1088", "n": 2}
    body["response_format"] = "b64_json"
    async with http.post(env.stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    for item in answer["data"]:
        assert image_size(base64.b64decode(item["b64_json"])) == (1920, 1088)
    # 1920 x 1088 = 2,088,960 pixels = 1.99 of BFL's 1,048,576-pixel megapixels: two started.
    # Per image: $0.03 for the first + $0.015 for the second = 45,000 micro-dollars; two images.
    assert await _charged(env.stack, account_id) == 2 * (30_000 + 15_000)
    assert len(env.bfl.submits) == 2


# -- the seed's request ----------------------------------------------------------------------


async def test_the_seeds_imagen_3_request_gets_an_image_from_googles_current_model(
    env: World, http: aiohttp.ClientSession
) -> None:
    account_id, key = await _account(env.stack)
    body = {"model": "imagen-3", "prompt": "a lighthouse at dusk", "n": 1, "size": "1024x1024"}
    async with http.post(env.stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    assert answer["data"][0]["url"].startswith(env.stack.http_url)
    [sent] = env.gemini.requests
    assert "gemini-3.1-flash-image" in sent.path
    assert await _charged(env.stack, account_id) == 67_000


# -- a model the upstream retired -------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "instead"),
    [
        ("dall-e-3", "gpt-image-1.5"),
        ("gpt-image-1", "gpt-image-1.5"),
        ("dall-e-2", "gpt-image-1-mini"),
    ],
)
async def test_a_retired_id_is_400_model_not_found_naming_the_model_to_use(
    env: World, http: aiohttp.ClientSession, model: str, instead: str
) -> None:
    account_id, key = await _account(env.stack)
    body = {"model": model, "prompt": "a lighthouse"}
    async with http.post(env.stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        error = await assert_openai_error(resp, 400, "model_not_found", param="model")
    assert error["message"] == (
        f"The model '{model}' was retired by its provider. Use '{instead}' instead."
    )
    assert env.openai.hits == 0
    await env.stack.assert_untouched(account_id, OPENING)


async def test_a_retired_model_fails_over_at_once_to_the_next_deployment(
    env: World, http: aiohttp.ClientSession
) -> None:
    account_id, key = await _account(env.stack)
    body = {"model": "retired-then-live", "prompt": "a lighthouse", "quality": "low"}
    async with http.post(env.stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    # Called once, not retried (max_retries = 2 would allow three calls).
    assert env.openai_old.hits == 1
    assert env.openai.hits == 1
    expected = -(
        -(
            answer["usage"]["input_tokens"] * 5_000_000
            + answer["usage"]["output_tokens"] * 32_000_000
        )
        // 10**6
    )
    assert await _charged(env.stack, account_id) == expected


async def test_a_retired_model_with_no_other_deployment_is_one_clean_502_naming_it(
    env: World, http: aiohttp.ClientSession
) -> None:
    account_id, key = await _account(env.stack)
    body = {"model": "retired-only", "prompt": "a lighthouse"}
    async with http.post(env.stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        error = await assert_openai_error(resp, 502, "upstream_error")
    assert "unavailable upstream" in error["message"]
    assert "gpt-image-1" in error["message"]
    assert env.openai_old.hits == 1
    await env.stack.assert_not_charged(account_id, OPENING)
    scrape = generate_latest(env.stack.running.pipeline.metrics.registry).decode()
    assert re.search(
        r'imagegen_upstream_model_unavailable_total\{provider="openai-old",'
        r'upstream_model="gpt-image-1"\} [1-9]',
        scrape,
    ), scrape


# -- imagegen-admin providers check ------------------------------------------------------------


@dataclass
class Checked:
    returncode: int
    stdout: str
    stderr: str


async def _check(config_path: Path, data_dir: Path) -> Checked:
    # A child process, while this loop keeps serving the fakes it asks.
    process = await asyncio.create_subprocess_exec(
        str(ADMIN),
        "--json",
        "providers",
        "check",
        env={
            **os.environ,
            **KEYS,
            "IMAGEGEN_CONFIG": str(config_path),
            "IMAGEGEN_DATA_DIR": str(data_dir),
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Checked(process.returncode, stdout.decode(), stderr.decode())


async def test_providers_check_names_the_retired_model_and_exits_1(
    env: World, tmp_path: Path
) -> None:
    result = await _check(env.config_path, tmp_path)
    assert result.returncode == 1, result.stderr
    rows = {(r["model"], r["provider"]): r for r in json.loads(result.stdout)["models"]}
    assert rows[("retired-only", "openai-old")]["status"] == "missing"
    assert rows[("retired-then-live", "openai-old")]["status"] == "missing"
    assert rows[("retired-then-live", "openai")]["status"] == "offered"
    for model in _shipped_models():
        provider = "gemini" if model.startswith(("gemini", "imagen")) else None
        row = next(r for (m, _), r in rows.items() if m == model)
        if model in TOKEN_PRICES or provider == "gemini":
            assert row["status"] == "offered", row
        else:
            # BFL and Stability publish no model list.
            assert row["status"] == "unlisted", row
    # Keys never reach the output.
    for secret in KEYS.values():
        assert secret not in result.stdout + result.stderr


async def test_providers_check_exits_0_when_every_listed_model_is_offered(
    env: World, tmp_path: Path
) -> None:
    config = env.config_path.read_text()
    config = config[: config.index("[providers.openai-old]")]
    path = tmp_path / "live.toml"
    path.write_text(config)
    result = await _check(path, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    statuses = {r["status"] for r in json.loads(result.stdout)["models"]}
    assert statuses <= {"offered", "unlisted", "built_in"}
