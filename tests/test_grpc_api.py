"""The gRPC API spoken directly, as internal services do: streaming, errors, health,
reflection and the Admin service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Awaitable
from typing import TYPE_CHECKING, TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from imagegen_service.gen import admin_pb2, images_pb2, images_pb2_grpc
from tests.conftest import (
    ADMIN_METADATA,
    ADMIN_TOKEN,
    FAKE_DALLE,
    LOCAL_256,
    LOCAL_DEFAULT,
    Stack,
    image_size,
)
from tests.fakes.openai_upstream import FakeOpenAIUpstream, slow

if TYPE_CHECKING:
    from imagegen_service.gen.images_pb2_grpc import ImageGenerationAsyncStub

M = TypeVar("M")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
Metadata = tuple[tuple[str, str], ...]


def _auth(key: str) -> Metadata:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
def images(stack: Stack) -> ImageGenerationAsyncStub:
    return images_pb2_grpc.ImageGenerationStub(stack.channel)


def _error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, "the status carries no google.rpc.Status details"
    assert status.code == exc.code().value[0]
    assert status.message == exc.details()
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    assert len(infos) == 1, status.details
    assert infos[0].domain == "imagegen"
    return infos[0]


async def _collect(call: AsyncIterable[M]) -> list[M]:
    return [message async for message in call]


# -- GenerateImages ----------------------------------------------------------------------


async def test_generate_streams_one_raw_png_per_image_then_a_summary(
    stack: Stack, images: ImageGenerationAsyncStub
) -> None:
    account_id, key, _ = await stack.new_account(100_000)
    call = images.GenerateImages(
        images_pb2.GenerateImagesRequest(
            model="local-sketch",
            prompt="a grpc caller",
            n=3,
            size="512x512",
            response_format="b64_json",
        ),
        metadata=_auth(key),
        timeout=30,
    )
    messages = await _collect(call)
    assert [m.WhichOneof("event") for m in messages] == ["image", "image", "image", "summary"]
    for index, message in enumerate(messages[:3]):
        image = message.image
        assert image.index == index
        # Raw bytes on the wire, never base64.
        assert image.data.startswith(PNG_MAGIC)
        assert image_size(image.data) == (512, 512)
        assert (image.width, image.height) == (512, 512)
        assert image.mime_type == "image/png"
        assert image.url == ""
        assert image.revised_prompt == "a grpc caller"
    summary = messages[-1].summary
    assert summary.images == 3
    assert summary.cost_micros == 3 * LOCAL_DEFAULT
    assert summary.model == "local-sketch"
    assert summary.provider == "local"
    assert summary.size == "512x512"
    assert summary.quality == "standard"
    assert summary.created > 0
    await stack.assert_balance(account_id, 100_000 - 3 * LOCAL_DEFAULT)


async def test_generate_with_url_streams_signed_paths_fetchable_with_get_image(
    stack: Stack, images: ImageGenerationAsyncStub
) -> None:
    _, key, _ = await stack.new_account(100_000)
    messages = await _collect(
        images.GenerateImages(
            images_pb2.GenerateImagesRequest(
                model="local-sketch", prompt="by reference", size="256x256"
            ),
            metadata=_auth(key),
            timeout=30,
        )
    )
    assert [m.WhichOneof("event") for m in messages] == ["image", "summary"]
    image = messages[0].image
    assert image.data == b""
    assert image.url.startswith("/v1/files/images/")
    assert messages[1].summary.cost_micros == LOCAL_256

    token = image.url.removeprefix("/v1/files/images/")
    # GetImage needs no API key: the signed token is the authorization.
    parts = [
        part async for part in images.GetImage(images_pb2.GetImageRequest(token=token), timeout=10)
    ]
    assert parts[0].mime_type == "image/png"
    data = b"".join(part.chunk for part in parts)
    assert len(data) == parts[0].total_size
    assert image_size(data) == (256, 256)


# -- GenerateImagesUnary -----------------------------------------------------------------


async def test_generate_unary_answers_the_images_and_summary_in_one_message(
    stack: Stack, images: ImageGenerationAsyncStub
) -> None:
    account_id, key, _ = await stack.new_account(100_000)
    call = images.GenerateImagesUnary(
        images_pb2.GenerateImagesRequest(
            model="local-sketch",
            prompt="one message",
            n=2,
            size="512x512",
            response_format="b64_json",
        ),
        metadata=_auth(key),
        timeout=30,
    )
    answer = await call
    assert [image.index for image in answer.images] == [0, 1]
    for image in answer.images:
        assert image.data.startswith(PNG_MAGIC)
        assert image_size(image.data) == (512, 512)
        assert image.revised_prompt == "one message"
    assert answer.summary.images == 2
    assert answer.summary.cost_micros == 2 * LOCAL_DEFAULT
    assert answer.summary.model == "local-sketch"
    # The request id and rate-limit headers come as with GenerateImages.
    trailing = dict(await call.trailing_metadata() or ())
    assert str(trailing["x-request-id"]).startswith("req_")
    await stack.assert_balance(account_id, 100_000 - 2 * LOCAL_DEFAULT)
    assert [e.kind for e in await stack.ledger(account_id)] == ["credit", "hold", "capture"]


async def test_generate_unary_refuses_stream_and_charges_nothing(
    stack: Stack, images: ImageGenerationAsyncStub
) -> None:
    account_id, key, _ = await stack.new_account(100_000)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await images.GenerateImagesUnary(
            images_pb2.GenerateImagesRequest(
                model="local-sketch", prompt="streamed?", size="256x256", stream=True
            ),
            metadata=_auth(key),
            timeout=30,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = _error_info(caught.value)
    assert (info.reason, info.metadata["param"]) == ("INVALID_PARAMETER", "stream")
    await stack.assert_untouched(account_id, 100_000)


async def test_an_idempotency_key_is_shared_by_the_unary_and_the_streamed_call(
    stack: Stack, images: ImageGenerationAsyncStub
) -> None:
    account_id, key, _ = await stack.new_account(100_000)
    request = images_pb2.GenerateImagesRequest(
        model="local-sketch", prompt="once only", size="256x256", response_format="b64_json"
    )
    metadata = (*_auth(key), ("idempotency-key", "unary-then-stream"))
    first = await images.GenerateImagesUnary(request, metadata=metadata, timeout=30)
    replayed = await _collect(images.GenerateImages(request, metadata=metadata, timeout=30))
    assert [m.WhichOneof("event") for m in replayed] == ["image", "summary"]
    assert replayed[0].image.data == first.images[0].data
    assert replayed[1].summary == first.summary
    await stack.assert_balance(account_id, 100_000 - LOCAL_256)


async def test_get_image_with_a_bad_token_is_not_found(
    images: ImageGenerationAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _collect(images.GetImage(images_pb2.GetImageRequest(token="nope"), timeout=10))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert _error_info(caught.value).reason == "NOT_FOUND"


async def test_an_invalid_parameter_names_the_param_in_error_info(
    stack: Stack, images: ImageGenerationAsyncStub
) -> None:
    account_id, key, _ = await stack.new_account(100_000)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _collect(
            images.GenerateImages(
                images_pb2.GenerateImagesRequest(
                    model="local-sketch", prompt="bad size", size="999x999"
                ),
                metadata=_auth(key),
                timeout=10,
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = _error_info(caught.value)
    assert info.reason == "INVALID_PARAMETER"
    assert dict(info.metadata) == {"param": "size"}
    await stack.assert_untouched(account_id, 100_000)


@pytest.mark.parametrize(
    ("model", "reason"),
    [("no-such-model", "MODEL_NOT_FOUND"), ("gpt-4o", "MODEL_NOT_SUPPORTED")],
)
async def test_unservable_models_carry_their_reason(
    stack: Stack, images: ImageGenerationAsyncStub, model: str, reason: str
) -> None:
    _, key, _ = await stack.new_account(100_000)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _collect(
            images.GenerateImages(
                images_pb2.GenerateImagesRequest(model=model, prompt="x"),
                metadata=_auth(key),
                timeout=10,
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = _error_info(caught.value)
    assert info.reason == reason
    assert info.metadata["param"] == "model"


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer sk-ig-nobody"),), (("authorization", "Token abc"),)],
    ids=["missing", "unknown", "malformed"],
)
async def test_a_missing_or_bad_key_is_unauthenticated(
    images: ImageGenerationAsyncStub, metadata: Metadata
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _collect(
            images.GenerateImages(
                images_pb2.GenerateImagesRequest(model="local-sketch", prompt="x"),
                metadata=metadata,
                timeout=10,
            )
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _error_info(caught.value).reason == "INVALID_API_KEY"


async def test_a_low_balance_is_failed_precondition(
    stack: Stack, images: ImageGenerationAsyncStub
) -> None:
    account_id, key, _ = await stack.new_account(LOCAL_256 - 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _collect(
            images.GenerateImages(
                images_pb2.GenerateImagesRequest(model="local-sketch", prompt="x", size="256x256"),
                metadata=_auth(key),
                timeout=10,
            )
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _error_info(caught.value).reason == "INSUFFICIENT_BALANCE"
    await stack.assert_untouched(account_id, LOCAL_256 - 1)


async def test_list_models_over_grpc(stack: Stack, images: ImageGenerationAsyncStub) -> None:
    _, key, _ = await stack.new_account(1)
    answer = await images.ListModels(
        images_pb2.ListModelsRequest(), metadata=_auth(key), timeout=10
    )
    by_id = {m.id: m for m in answer.models}
    assert set(by_id) == {
        "local-sketch",
        "fake-dalle",
        "dead-model",
        "retry-dalle",
        "failover-dalle",
    }
    sketch = by_id["local-sketch"]
    assert list(sketch.sizes) == ["256x256", "512x512", "1024x1024", "1536x1024", "1024x1536"]
    assert list(sketch.qualities) == ["standard", "hd"]
    assert sketch.max_images == 10
    assert by_id["fake-dalle"].max_images == 4


# -- health and reflection ---------------------------------------------------------------


@pytest.mark.parametrize("service", ["", "imagegen.v1.ImageGeneration", "imagegen.v1.Admin"])
async def test_health_check_is_serving(stack: Stack, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(stack.channel)
    answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_public_and_admin_services(stack: Stack) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(stack.channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    answers = [answer async for answer in call]
    assert len(answers) == 1
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"imagegen.v1.ImageGeneration", "imagegen.v1.Admin"} <= names
    assert "grpc.health.v1.Health" in names


async def test_reflection_describes_the_generation_request(stack: Stack) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(stack.channel)
    call = stub.ServerReflectionInfo(
        iter(
            [
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="imagegen.v1.GenerateImagesRequest"
                )
            ]
        ),
        timeout=5,
    )
    answers = [answer async for answer in call]
    assert len(answers) == 1
    assert answers[0].WhichOneof("message_response") == "file_descriptor_response"
    assert answers[0].file_descriptor_response.file_descriptor_proto


# -- Admin -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer wrong-token"),),
        (("authorization", f"Token {ADMIN_TOKEN}"),),
        (("authorization", f"Bearer {ADMIN_TOKEN}x"),),
    ],
    ids=["missing", "wrong", "wrong-scheme", "longer"],
)
async def test_admin_without_the_admin_token_is_unauthenticated(
    stack: Stack, metadata: Metadata
) -> None:
    admin = stack.admin
    account_id, _, _ = await stack.new_account(5_000)
    calls: list[Awaitable[object]] = [
        admin.CreateAccount(
            admin_pb2.CreateAccountRequest(name="intruder", initial_balance_micros=10**9),
            metadata=metadata,
            timeout=5,
        ),
        admin.GetAccount(
            admin_pb2.GetAccountRequest(account_id=account_id), metadata=metadata, timeout=5
        ),
        admin.CreditAccount(
            admin_pb2.CreditAccountRequest(account_id=account_id, amount_micros=10**9),
            metadata=metadata,
            timeout=5,
        ),
        admin.CreateKey(
            admin_pb2.CreateKeyRequest(account_id=account_id), metadata=metadata, timeout=5
        ),
        admin.ListLedger(
            admin_pb2.ListLedgerRequest(account_id=account_id), metadata=metadata, timeout=5
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _error_info(caught.value).reason == "INVALID_API_KEY"
    await stack.assert_untouched(account_id, 5_000)


async def test_an_api_key_is_not_an_admin_token(stack: Stack) -> None:
    admin = stack.admin
    account_id, key, _ = await stack.new_account(5_000)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.GetAccount(
            admin_pb2.GetAccountRequest(account_id=account_id), metadata=_auth(key), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_list_ledger_shows_credit_hold_and_capture_after_a_generation(
    stack: Stack, images: ImageGenerationAsyncStub
) -> None:
    account_id, key, _ = await stack.new_account(10_000)
    request_id = "grpc-ledger-check"
    messages = await _collect(
        images.GenerateImages(
            images_pb2.GenerateImagesRequest(
                model="local-sketch",
                prompt="for the books",
                n=2,
                size="256x256",
                response_format="b64_json",
            ),
            metadata=(*_auth(key), ("x-request-id", request_id)),
            timeout=30,
        )
    )
    assert messages[-1].summary.cost_micros == 2 * LOCAL_256
    admin = stack.admin
    answer = await admin.ListLedger(
        admin_pb2.ListLedgerRequest(account_id=account_id),
        metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
        timeout=5,
    )
    # Newest first.
    entries = list(answer.entries)
    assert [e.kind for e in entries] == ["capture", "hold", "credit"]
    capture, hold, credit = entries
    assert (credit.available_delta_micros, credit.held_delta_micros) == (10_000, 0)
    assert (hold.available_delta_micros, hold.held_delta_micros) == (-2_000, 2_000)
    assert (capture.available_delta_micros, capture.held_delta_micros) == (0, -2_000)
    assert hold.hold_id == capture.hold_id != ""
    assert hold.request_id == capture.request_id == request_id
    assert all(e.account_id == account_id for e in entries)
    assert sum(e.available_delta_micros for e in entries) == 8_000
    assert sum(e.held_delta_micros for e in entries) == 0


async def test_list_ledger_rejects_an_out_of_range_limit(stack: Stack) -> None:
    admin = stack.admin
    account_id, _, _ = await stack.new_account(1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.ListLedger(
            admin_pb2.ListLedgerRequest(account_id=account_id, limit=1001),
            metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _error_info(caught.value).metadata["param"] == "limit"


async def test_admin_get_account_of_an_unknown_id_is_not_found(stack: Stack) -> None:
    admin = stack.admin
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.GetAccount(
            admin_pb2.GetAccountRequest(account_id="acct_nobody"),
            metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# -- interrupted calls -------------------------------------------------------------------


async def _wait_until_released(stack: Stack, account_id: str, opening: int) -> None:
    """The service notices a cancelled call asynchronously: poll until the hold is gone."""
    for _ in range(100):
        if (await stack.account(account_id)).held_micros == 0:
            break
        await asyncio.sleep(0.05)
    await stack.assert_not_charged(account_id, opening)


async def test_a_call_cancelled_while_the_upstream_works_is_not_charged(
    stack: Stack, images: ImageGenerationAsyncStub, fake: FakeOpenAIUpstream
) -> None:
    account_id, key, _ = await stack.new_account(100_000)
    fake.script(slow(1.0))
    call = images.GenerateImages(
        images_pb2.GenerateImagesRequest(
            model="fake-dalle", prompt="never mind", n=2, size="256x256", response_format="b64_json"
        ),
        metadata=_auth(key),
        timeout=10,
    )
    # Wait until the hold is placed and the upstream has the request, then hang up.
    for _ in range(250):
        if fake.hits:
            break
        await asyncio.sleep(0.02)
    assert fake.hits == 1
    held = await stack.account(account_id)
    assert held.held_micros == 2 * FAKE_DALLE
    assert call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await _collect(call)
    await _wait_until_released(stack, account_id, 100_000)
    assert [e.kind for e in await stack.ledger(account_id)] == ["credit", "hold", "release"]


async def test_a_deadline_that_passes_while_the_upstream_works_is_not_charged(
    stack: Stack, images: ImageGenerationAsyncStub, fake: FakeOpenAIUpstream
) -> None:
    account_id, key, _ = await stack.new_account(100_000)
    fake.script(slow(1.0))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _collect(
            images.GenerateImages(
                images_pb2.GenerateImagesRequest(
                    model="fake-dalle", prompt="too slow", size="256x256"
                ),
                metadata=_auth(key),
                timeout=0.4,
            )
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _wait_until_released(stack, account_id, 100_000)


# -- Admin validation --------------------------------------------------------------------


async def test_admin_refuses_negative_money_and_unknown_ids(stack: Stack) -> None:
    admin = stack.admin
    account_id, _, _ = await stack.new_account(1_000)
    refused: list[Awaitable[object]] = [
        admin.CreateAccount(
            admin_pb2.CreateAccountRequest(name="neg", initial_balance_micros=-1),
            metadata=ADMIN_METADATA,
        ),
        admin.CreateAccount(admin_pb2.CreateAccountRequest(name="  "), metadata=ADMIN_METADATA),
        admin.CreditAccount(
            admin_pb2.CreditAccountRequest(account_id=account_id, amount_micros=0),
            metadata=ADMIN_METADATA,
        ),
        admin.CreditAccount(
            admin_pb2.CreditAccountRequest(account_id=account_id, amount_micros=-500),
            metadata=ADMIN_METADATA,
        ),
    ]
    for call in refused:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _error_info(caught.value).reason == "INVALID_PARAMETER"
    missing: list[Awaitable[object]] = [
        admin.CreditAccount(
            admin_pb2.CreditAccountRequest(account_id="acct_nobody", amount_micros=5),
            metadata=ADMIN_METADATA,
        ),
        admin.CreateKey(
            admin_pb2.CreateKeyRequest(account_id="acct_nobody"), metadata=ADMIN_METADATA
        ),
        admin.RevokeKey(admin_pb2.RevokeKeyRequest(key_id="key_nobody"), metadata=ADMIN_METADATA),
        admin.ListLedger(
            admin_pb2.ListLedgerRequest(account_id="acct_nobody"), metadata=ADMIN_METADATA
        ),
    ]
    for call in missing:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    await stack.assert_untouched(account_id, 1_000)


async def test_admin_credit_adds_a_ledger_entry_with_its_note(stack: Stack) -> None:
    admin = stack.admin
    account_id, _, _ = await stack.new_account(1_000)
    account = await admin.CreditAccount(
        admin_pb2.CreditAccountRequest(account_id=account_id, amount_micros=2_500, note="promo"),
        metadata=ADMIN_METADATA,
    )
    assert account.available_micros == 3_500
    entries = await stack.ledger(account_id)
    assert [(e.kind, e.available_delta_micros, e.note) for e in entries] == [
        ("credit", 1_000, "opening"),
        ("credit", 2_500, "promo"),
    ]
    await stack.assert_balance(account_id, 3_500)


# -- reflection ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_answers_on_v1_and_v1alpha(stack: Stack, version: str) -> None:
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    # v1 and v1alpha are the same messages under two package names: one set of classes
    # speaks both on the wire.
    call = stack.channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="imagegen.v1.ImageGeneration"
        ),
    ]
    answers = [answer async for answer in call(iter(requests))]
    listed = {s.name for s in answers[0].list_services_response.service}
    assert {
        "imagegen.v1.ImageGeneration",
        "imagegen.v1.Admin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= listed
    # Every listed service resolves to a file: a client that lists and then describes
    # (buf curl --list-methods) must find each.
    assert "grpc.reflection.v1.ServerReflection" not in listed
    files = answers[1].file_descriptor_response.file_descriptor_proto
    names = {descriptor_pb2.FileDescriptorProto.FromString(f).name for f in files}
    assert "imagegen/v1/images.proto" in names
