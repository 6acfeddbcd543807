"""A second real client: the official ``openai`` npm package on Node.js drives generate,
stream and edit through the real stack, and must see OpenAI's error shapes.

The package is pinned in ``tests/node/package.json`` and ``package-lock.json``; the module
fixture installs it with ``npm ci`` when ``tests/node/node_modules`` is missing or was
installed from other manifests. Each test runs a small script from ``tests/node`` with
``node``, passing the gateway's base URL, the API key and the request parameters in
environment variables; the script prints JSON and the assertions (image sizes, pixels,
money) are made here.

Without ``node``/``npm`` the tests skip on a laptop and fail in CI (``CI=true``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image, ImageChops, ImageStat

from tests.conftest import LOCAL_DEFAULT, Stack, image_size
from tests.fakes.openai_upstream import FakeOpenAIUpstream, stream_error
from tests.images_stack import FAKE_GPT_IMAGE, LOCAL_IMAGE, ImagesStack
from tests.services import IN_CI
from tests.stack import Stack as BaseStack

NODE_DIR = Path(__file__).parent / "node"
MODULES = NODE_DIR / "node_modules"
# Written into node_modules after a successful `npm ci`: the digest of the manifests it was
# installed from (`npm ci` empties node_modules first, so a failed install leaves none).
STAMP = MODULES / ".imagegen-installed"
NPM_CI_TIMEOUT = 110
SCRIPT_TIMEOUT = 30
OPENING = 1_000_000
# The edited square of the masked edit: alpha 0 inside, opaque outside.
HOLE = (64, 64, 192, 192)
_PARTIAL_FIELDS = {
    "type",
    "b64_json",
    "created_at",
    "size",
    "quality",
    "background",
    "output_format",
    "partial_image_index",
}
_COMPLETED_FIELDS = (_PARTIAL_FIELDS - {"partial_image_index"}) | {"usage"}
_ERROR_FIELDS = {"message", "type", "param", "code"}


@dataclass(frozen=True)
class NodeSDK:
    node: str
    openai_version: str


def _manifest_digest() -> str:
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        digest.update((NODE_DIR / name).read_bytes())
    return digest.hexdigest()


class _InstallFailed(Exception):
    pass


def _install(npm: str) -> None:
    """Runs `npm ci` in tests/node unless node_modules was installed from these manifests."""
    wanted = _manifest_digest()
    if STAMP.is_file() and STAMP.read_text() == wanted:
        return
    try:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise _InstallFailed(f"`npm ci` in {NODE_DIR} took over {exc.timeout} s") from None
    if done.returncode != 0:
        raise _InstallFailed(
            f"`npm ci` in {NODE_DIR} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    STAMP.write_text(wanted)


# `npm ci` is tried once per session: after a failure every test here fails with its output.
_install_failure: list[str] = []


@pytest.fixture(scope="module")
def node_sdk() -> NodeSDK:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        message = (
            "Node.js and npm are needed for the openai npm package tests: install Node.js 20+ "
            "(the test runs `npm ci` in tests/node itself)"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    if not _install_failure:
        try:
            _install(npm)
        except _InstallFailed as exc:
            _install_failure.append(str(exc))
    if _install_failure:
        pytest.fail(_install_failure[0])
    pinned = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]["openai"]
    installed = json.loads((MODULES / "openai" / "package.json").read_text())["version"]
    assert installed == pinned, f"node_modules has openai {installed}, package.json pins {pinned}"
    return NodeSDK(node=node, openai_version=installed)


async def run_node(
    sdk: NodeSDK,
    script: str,
    stack: BaseStack,
    key: str,
    params: dict[str, Any] | None = None,
    **env: str,
) -> Any:
    """Runs ``tests/node/<script>`` against ``stack`` with ``key``; returns its JSON output."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    environ.update(
        IMAGEGEN_BASE_URL=stack.http_url + "/v1",
        IMAGEGEN_API_KEY=key,
        IMAGEGEN_PARAMS=json.dumps(params or {}),
        IMAGEGEN_TIMEOUT_MS="15000",
        **env,
    )
    process = await asyncio.create_subprocess_exec(
        sdk.node,
        str(NODE_DIR / script),
        cwd=NODE_DIR,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), SCRIPT_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.communicate()
        raise AssertionError(f"node {script} ran over {SCRIPT_TIMEOUT} s") from None
    assert process.returncode == 0, f"node {script} failed:\n{stderr.decode(errors='replace')}"
    return json.loads(stdout)


def _open(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def _png(image: Image.Image, path: Path) -> Path:
    image.save(path, "PNG")
    return path


def _picture(size: tuple[int, int] = (256, 256)) -> Image.Image:
    """A diagonal gradient: every pixel distinct enough to compare."""
    gray = Image.linear_gradient("L").resize(size)
    return Image.merge("RGB", (gray, gray.rotate(90), Image.new("L", size, 90)))


def _mask(size: tuple[int, int] = (256, 256)) -> Image.Image:
    image = Image.new("RGBA", size, (0, 0, 0, 255))
    image.paste((0, 0, 0, 0), HOLE)
    return image


async def _ledger_kinds(stack: BaseStack, account_id: str) -> list[str]:
    return [e.kind for e in await stack.ledger(account_id)]


# -- generate ----------------------------------------------------------------------------


async def test_generate_two_b64_images_charged_twice(stack: Stack, node_sdk: NodeSDK) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    out = await run_node(
        node_sdk,
        "generate.mjs",
        stack,
        key,
        {
            "model": "local-sketch",
            "prompt": "a lighthouse at dusk",
            "n": 2,
            "size": "512x512",
            "response_format": "b64_json",
        },
    )
    answer = out["answer"]
    assert out["contentType"].startswith("application/json")
    assert out["requestID"]
    assert answer["created"] > 0
    assert len(answer["data"]) == 2
    for item in answer["data"]:
        assert set(item) == {"b64_json", "revised_prompt"}
        assert image_size(base64.b64decode(item["b64_json"])) == (512, 512)
    await stack.assert_balance(account_id, OPENING - 2 * LOCAL_DEFAULT)
    assert await _ledger_kinds(stack, account_id) == ["credit", "hold", "capture"]


async def test_generate_url_images_download(
    stack: Stack, node_sdk: NodeSDK, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    out = await run_node(
        node_sdk,
        "generate.mjs",
        stack,
        key,
        {"model": "local-sketch", "prompt": "a red barn", "n": 2, "size": "512x512"},
    )
    data = out["answer"]["data"]
    assert len(data) == 2
    for item in data:
        assert "b64_json" not in item
        async with http.get(item["url"]) as resp:
            assert resp.status == 200
            assert resp.content_type == "image/png"
            assert image_size(await resp.read()) == (512, 512)
    await stack.assert_balance(account_id, OPENING - 2 * LOCAL_DEFAULT)


# -- stream ------------------------------------------------------------------------------


async def test_stream_yields_partials_then_the_completed_image(
    images_stack: ImagesStack, node_sdk: NodeSDK
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    out = await run_node(
        node_sdk,
        "stream.mjs",
        images_stack,
        key,
        {
            "model": "local-image",
            "prompt": "a paper boat on a pond",
            "size": "512x512",
            "partial_images": 2,
        },
    )
    assert out["error"] is None
    events = out["events"]
    assert [e["type"] for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    partials, completed = events[:2], events[2]
    assert [p["partial_image_index"] for p in partials] == [0, 1]
    assert all(set(p) == _PARTIAL_FIELDS for p in partials)
    assert set(completed) == _COMPLETED_FIELDS
    assert set(completed["usage"]) == {
        "input_tokens",
        "input_tokens_details",
        "output_tokens",
        "total_tokens",
    }
    for event in events:
        assert (event["size"], event["quality"], event["background"]) == (
            "512x512",
            "high",
            "opaque",
        )
        assert event["output_format"] == "png"
        assert event["created_at"] > 0
        image = _open(event["b64_json"])
        assert (image.format, image.size) == ("PNG", (512, 512))
    assert len({e["b64_json"] for e in events}) == 3
    await images_stack.assert_balance(account_id, OPENING - LOCAL_IMAGE)
    assert await _ledger_kinds(images_stack, account_id) == ["credit", "hold", "capture"]


async def test_an_error_event_midway_throws_after_the_delivered_events(
    images_stack: ImagesStack, images_fake: FakeOpenAIUpstream, node_sdk: NodeSDK
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    # Image 0's partial and completed events, then the upstream sends an error event.
    images_fake.script(stream_error(after_events=2))
    out = await run_node(
        node_sdk,
        "stream.mjs",
        images_stack,
        key,
        {
            "model": "fake-gpt-image",
            "prompt": "a glass fox",
            "size": "1024x1024",
            "n": 2,
            "partial_images": 1,
        },
    )
    assert [e["type"] for e in out["events"]] == [
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert image_size(base64.b64decode(out["events"][1]["b64_json"])) == (1024, 1024)
    error = out["error"]
    assert error is not None
    assert error["isAPIError"], error
    assert (error["code"], error["type"]) == ("upstream_error", "api_error"), error
    assert set(error["error"]) == _ERROR_FIELDS, error
    # The delivered image is charged, the other one's share of the hold goes back.
    await images_stack.assert_balance(account_id, OPENING - FAKE_GPT_IMAGE)
    assert await _ledger_kinds(images_stack, account_id) == [
        "credit",
        "hold",
        "capture",
        "release",
    ]


# -- edit --------------------------------------------------------------------------------


async def test_edit_paints_only_the_masked_region(
    images_stack: ImagesStack, node_sdk: NodeSDK, tmp_path: Path
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    original = _picture()
    out = await run_node(
        node_sdk,
        "edit.mjs",
        images_stack,
        key,
        {"model": "local-image", "prompt": "a red balloon", "response_format": "b64_json"},
        IMAGEGEN_IMAGE=str(_png(original, tmp_path / "in.png")),
        IMAGEGEN_MASK=str(_png(_mask(), tmp_path / "mask.png")),
    )
    answer = out["answer"]
    assert len(answer["data"]) == 1
    assert answer["size"] == "256x256"
    edited = _open(answer["data"][0]["b64_json"])
    assert (edited.format, edited.size) == ("PNG", (256, 256))
    diff = ImageChops.difference(edited.convert("RGB"), original)
    outside = diff.copy()
    outside.paste((0, 0, 0), HOLE)
    assert outside.getbbox() is None, "pixels outside the mask's hole changed"
    assert max(ImageStat.Stat(diff.crop(HOLE)).mean) > 20
    await images_stack.assert_balance(account_id, OPENING - LOCAL_IMAGE)


# -- errors ------------------------------------------------------------------------------


def _assert_openai_error(
    result: dict[str, Any],
    status: int,
    sdk_class: str,
    code: str,
    error_type: str,
    param: str | None = None,
) -> None:
    assert result["threw"], result
    assert (result["class"], result["status"]) == (sdk_class, status), result
    assert result["isAPIError"], result
    assert (result["code"], result["type"], result["param"]) == (code, error_type, param), result
    assert set(result["error"]) == _ERROR_FIELDS, result
    assert result["message"]
    assert result["requestID"]
    assert result["shouldRetry"] == "false"


async def test_errors_reach_the_sdk_in_openai_shape(stack: Stack, node_sdk: NodeSDK) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    poor_id, poor_key, _ = await stack.new_account(LOCAL_DEFAULT - 1)
    sketch = {"model": "local-sketch", "prompt": "a boat", "size": "512x512"}
    cases = [
        {"name": "bad_key", "apiKey": "sk-ig-not-a-real-key", "params": sketch},
        {"name": "bad_n", "params": {**sketch, "n": 11}},
        {"name": "bad_size", "params": {**sketch, "size": "13x13"}},
        {"name": "poor", "apiKey": poor_key, "params": sketch},
    ]
    results = await run_node(node_sdk, "errors.mjs", stack, key, IMAGEGEN_CASES=json.dumps(cases))
    bad_key = results["bad_key"]
    _assert_openai_error(
        bad_key, 401, "AuthenticationError", "invalid_api_key", "invalid_request_error"
    )
    assert bad_key["isAuthenticationError"]
    for name, param in (("bad_n", "n"), ("bad_size", "size")):
        _assert_openai_error(
            results[name], 400, "BadRequestError", "invalid_value", "invalid_request_error", param
        )
        assert results[name]["isBadRequestError"]
    _assert_openai_error(
        results["poor"], 402, "APIError", "insufficient_balance", "insufficient_quota"
    )
    await stack.assert_untouched(account_id, OPENING)
    await stack.assert_untouched(poor_id, LOCAL_DEFAULT - 1)


async def test_stream_and_edit_refusals_reach_the_sdk_in_openai_shape(
    images_stack: ImagesStack, node_sdk: NodeSDK, tmp_path: Path
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    poor_id, poor_key, _ = await images_stack.new_account(LOCAL_IMAGE - 1)
    image = _png(_picture(), tmp_path / "in.png")
    cases = [
        {
            "name": "stream_poor",
            "apiKey": poor_key,
            "params": {"model": "local-image", "prompt": "a boat", "stream": True},
        },
        {
            "name": "stream_url",
            "params": {
                "model": "local-image",
                "prompt": "a boat",
                "stream": True,
                "response_format": "url",
            },
        },
        {
            "name": "edit_mask_size",
            "op": "edit",
            "params": {"model": "local-image", "prompt": "a kite"},
            "image": str(image),
            "mask": str(_png(_mask((128, 128)), tmp_path / "small-mask.png")),
        },
        {
            "name": "edit_unsupported_model",
            "op": "edit",
            "params": {"model": "local-sketch", "prompt": "a kite"},
            "image": str(image),
        },
    ]
    results = await run_node(
        node_sdk, "errors.mjs", images_stack, key, IMAGEGEN_CASES=json.dumps(cases)
    )
    _assert_openai_error(
        results["stream_poor"], 402, "APIError", "insufficient_balance", "insufficient_quota"
    )
    invalid = ("BadRequestError", "invalid_value", "invalid_request_error")
    _assert_openai_error(results["stream_url"], 400, *invalid, "response_format")
    _assert_openai_error(results["edit_mask_size"], 400, *invalid, "mask")
    _assert_openai_error(
        results["edit_unsupported_model"],
        400,
        "BadRequestError",
        "model_not_supported",
        "invalid_request_error",
        "model",
    )
    await images_stack.assert_untouched(account_id, OPENING)
    await images_stack.assert_untouched(poor_id, LOCAL_IMAGE - 1)
