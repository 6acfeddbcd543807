"""The gRPC plug: request messages in, pipeline calls, response messages out.

Every handler runs its work through ``_handle``, which turns a domain error into its status
(``grpc_errors``) and anything else into INTERNAL with the details kept in the log. Every
status goes out with the call's request id (``method_metrics.request_id_of``) in its
trailing metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import NoReturn, TypeVar

import grpc
import structlog

from imagegen_service import errors, keys
from imagegen_service.catalog import Options
from imagegen_service.gen import admin_pb2, admin_pb2_grpc, images_pb2, images_pb2_grpc
from imagegen_service.grpc_errors import internal_status, to_status
from imagegen_service.idempotency import IdempotencyKeys, fingerprint
from imagegen_service.method_metrics import REQUEST_ID_KEY, request_id_of, with_request_id
from imagegen_service.pipeline import (
    DeliveredImage,
    DeliveredPartial,
    GenerationParams,
    ImagePipeline,
    Summary,
)
from imagegen_service.providers.base import TokenUsage
from imagegen_service.stores.ledger_sql import (
    MAX_PAGE_SIZE,
    Account,
    ApiKey,
    LedgerStore,
    is_database_unreachable,
)

log = structlog.get_logger("imagegen.servicer")

IMAGE_CHUNK_BYTES = 1024 * 1024
T = TypeVar("T")


def metadata_value(context: grpc.aio.ServicerContext, name: str) -> str | None:  # type: ignore[type-arg]
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode()
    return None


def _status_of(
    exc: Exception,
    context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    method: str,
) -> grpc.Status:
    if isinstance(exc, errors.ImagegenError):
        log.info("rpc.refused", method=method, request_id=request_id_of(context), reason=exc.reason)
        return to_status(exc)
    if is_database_unreachable(exc):
        # Until the health checks notice (and then every call is refused up front), a call
        # that meets a database gone away is retryable, not a bug: one line, no traceback.
        log.warning(
            "rpc.database_unavailable",
            method=method,
            request_id=request_id_of(context),
            error=type(exc).__name__,
        )
        return to_status(
            errors.ServiceUnavailable("The image service cannot reach its database. Try again.")
        )
    # ``exc`` may not be the exception being handled (refusal_for can answer another one).
    log.error("rpc.failed", method=method, request_id=request_id_of(context), exc_info=exc)
    return internal_status()


async def _handle(
    context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    method: str,
    work: Callable[[], Awaitable[T]],
) -> T:
    """Runs one unary RPC's work; a domain error becomes its status, anything else INTERNAL."""
    try:
        return await work()
    except Exception as exc:
        status = _status_of(exc, context, method)
    await _abort(context, status)


async def _abort(
    context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    status: grpc.Status,
) -> NoReturn:
    """Ends the call with ``status``, the call's request id among its trailing metadata."""
    await context.abort(
        status.code, status.details, with_request_id(context, status.trailing_metadata)
    )
    raise AssertionError("abort() always raises")


def _charged(exc: Exception) -> bool:
    """Whether a failed stream charged the images it delivered (its status says so)."""
    return isinstance(exc, errors.ImagegenError) and "images_charged" in exc.details


class ImageGenerationServicer(images_pb2_grpc.ImageGenerationServicer):
    def __init__(self, pipeline: ImagePipeline, idempotency: IdempotencyKeys | None = None) -> None:
        self.pipeline = pipeline
        self.idempotency = idempotency

    async def GenerateImages(
        self,
        request: images_pb2.GenerateImagesRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[images_pb2.GenerateImagesResponse]:
        # Fingerprinted as before edits existed, so stored idempotency records stay valid.
        def canonical() -> bytes:
            return request.SerializeToString(deterministic=True)

        async with contextlib.aclosing(
            self._serve(context, "GenerateImages", canonical, lambda: _generation_params(request))
        ) as messages:
            async for message in messages:
                yield message

    async def GenerateImagesUnary(
        self,
        request: images_pb2.GenerateImagesRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> images_pb2.GenerateImagesUnaryResponse:
        """GenerateImages in one answer: the same pipeline and idempotency records (a
        retry may come through either RPC), the stream's messages gathered."""

        def canonical() -> bytes:
            return request.SerializeToString(deterministic=True)

        def params() -> GenerationParams:
            if request.stream:
                raise errors.InvalidParameter(
                    "stream is answered by GenerateImages, not GenerateImagesUnary",
                    param="stream",
                )
            return _generation_params(request)

        answer = images_pb2.GenerateImagesUnaryResponse()
        async with contextlib.aclosing(
            self._serve(context, "GenerateImagesUnary", canonical, params)
        ) as messages:
            async for message in messages:
                if message.HasField("image"):
                    answer.images.append(message.image)
                elif message.HasField("summary"):
                    answer.summary.CopyFrom(message.summary)
        return answer

    async def EditImages(
        self,
        request: images_pb2.EditImagesRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[images_pb2.GenerateImagesResponse]:
        def canonical() -> bytes:
            return b"EditImages\0" + request.SerializeToString(deterministic=True)

        async with contextlib.aclosing(
            self._serve(context, "EditImages", canonical, lambda: _edit_params(request))
        ) as messages:
            async for message in messages:
                yield message

    async def CreateImageVariations(
        self,
        request: images_pb2.CreateImageVariationsRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[images_pb2.GenerateImagesResponse]:
        def canonical() -> bytes:
            return b"CreateImageVariations\0" + request.SerializeToString(deterministic=True)

        async with contextlib.aclosing(
            self._serve(
                context, "CreateImageVariations", canonical, lambda: _variation_params(request)
            )
        ) as messages:
            async for message in messages:
                yield message

    async def _serve(
        self,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
        method: str,
        # The request's canonical bytes for Idempotency-Key, made only when a key is given:
        # an edit can be a hundred megabytes.
        canonical_request: Callable[[], bytes],
        params_of: Callable[[], GenerationParams],
    ) -> AsyncGenerator[images_pb2.GenerateImagesResponse]:
        """One image-making RPC: authenticate, honour Idempotency-Key, run the pipeline."""
        request_id = request_id_of(context)
        idempotency_key = metadata_value(context, "idempotency-key")
        authorization = metadata_value(context, "authorization")
        key: ApiKey | None = None
        try:
            # From the cache: the hold checks revocation again, as do a replay and any
            # failure below (refusal_for).
            key = await self.pipeline.authenticate(authorization, cached=True)
            params = params_of()
            if idempotency_key is None or self.idempotency is None:
                async for message in self._generate(key, params, request_id, context):
                    yield message
                return
            claim = await self.idempotency.claim(
                key.account_id, idempotency_key, fingerprint(canonical_request())
            )
            if claim.state == "done":
                await self.pipeline.authenticate(authorization)
                log.info("generation.replayed", request_id=request_id, account_id=key.account_id)
                for frame in await self.idempotency.replay(claim):
                    yield images_pb2.GenerateImagesResponse.FromString(frame)
                return
            frames: list[bytes] = []
            try:
                async for message in self._generate(key, params, request_id, context):
                    frames.append(message.SerializeToString())
                    yield message
            except BaseException:
                await asyncio.shield(self.idempotency.release(key.account_id, idempotency_key))
                raise
            await asyncio.shield(self._remember(key.account_id, idempotency_key, frames))
            return
        except Exception as exc:
            failure = exc
            if key is not None and not _charged(exc):
                # A revoked key is answered as an unknown one, whatever else was wrong.
                failure = await self.pipeline.refusal_for(authorization, exc)
            status = _status_of(failure, context, method)
        await _abort(context, status)

    async def _generate(
        self,
        key: ApiKey,
        params: GenerationParams,
        request_id: str,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[images_pb2.GenerateImagesResponse]:
        # Metrics and the one log line of this generation, whatever its outcome.
        with self.pipeline.metrics.generation(
            request_id=request_id, account_id=key.account_id, params=params
        ) as record:
            prepared = await self.pipeline.prepare(key, params, request_id=request_id)
            initial: tuple[tuple[str, str], ...] = ()
            if prepared.rate_limit is not None:
                headers = tuple(prepared.rate_limit.headers().items())
                # With the status, at no extra cost; a stream's caller needs them before
                # its first event, so a stream also sends them ahead of it (their own
                # message), once the hold has found the key active.
                context.set_trailing_metadata((*headers, (REQUEST_ID_KEY, request_id)))
                if params.options.stream:
                    initial = headers
            # Each yield returns only once gRPC has taken the message, so the pipeline
            # charges after the last image has left, and closing releases the hold.
            async with contextlib.aclosing(self.pipeline.run(prepared)) as events:
                async for event in events:
                    if initial:
                        await context.send_initial_metadata(initial)
                        initial = ()
                    if isinstance(event, Summary):
                        record.charged(event)
                    yield _to_message(event)

    async def _remember(self, account_id: str, key: str, frames: list[bytes]) -> None:
        """Stores a finished answer for replays. The caller already has it and was charged,
        so a storage failure only costs the replay; the key is freed."""
        assert self.idempotency is not None
        try:
            await self.idempotency.finish(account_id, key, frames)
        except Exception:
            log.exception("idempotency.store_failed", account_id=account_id)
            await self.idempotency.release(account_id, key)

    async def ListModels(
        self,
        request: images_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> images_pb2.ListModelsResponse:
        async def work() -> images_pb2.ListModelsResponse:
            await self.pipeline.authenticate(metadata_value(context, "authorization"))
            return images_pb2.ListModelsResponse(
                models=[
                    images_pb2.Model(
                        id=m.id,
                        created=m.created,
                        owned_by=m.owned_by,
                        sizes=m.sizes,
                        qualities=m.qualities,
                        max_images=m.max_images,
                    )
                    for m in self.pipeline.models()
                ]
            )

        return await _handle(context, "ListModels", work)

    async def CheckAccess(
        self,
        request: images_pb2.CheckAccessRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> images_pb2.CheckAccessResponse:
        async def work() -> images_pb2.CheckAccessResponse:
            # Not from the cache: a revoked key is refused at once, before its upload.
            key = await self.pipeline.authenticate(metadata_value(context, "authorization"))
            account = await self.pipeline.ledger.get_account(key.account_id)
            return images_pb2.CheckAccessResponse(has_balance=account.available_micros > 0)

        return await _handle(context, "CheckAccess", work)

    async def GetImage(
        self,
        request: images_pb2.GetImageRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[images_pb2.GetImageResponse]:
        try:
            image = await self.pipeline.images.get(request.token)
        except Exception as exc:
            status = _status_of(exc, context, "GetImage")
            await _abort(context, status)
        view = memoryview(image.data)
        yield images_pb2.GetImageResponse(
            mime_type=image.mime_type,
            total_size=len(image.data),
            chunk=bytes(view[:IMAGE_CHUNK_BYTES]),
        )
        for start in range(IMAGE_CHUNK_BYTES, len(view), IMAGE_CHUNK_BYTES):
            yield images_pb2.GetImageResponse(chunk=bytes(view[start : start + IMAGE_CHUNK_BYTES]))


def _generation_params(request: images_pb2.GenerateImagesRequest) -> GenerationParams:
    return GenerationParams(
        model=request.model,
        prompt=request.prompt,
        n=request.n if request.HasField("n") else None,
        size=request.size,
        quality=request.quality,
        style=request.style,
        response_format=request.response_format,
        user=request.user,
        seed=request.seed if request.HasField("seed") else None,
        options=Options(
            background=request.background,
            output_format=request.output_format,
            output_compression=(
                request.output_compression if request.HasField("output_compression") else None
            ),
            moderation=request.moderation,
            stream=request.stream,
            partial_images=request.partial_images if request.HasField("partial_images") else None,
        ),
    )


def _edit_params(request: images_pb2.EditImagesRequest) -> GenerationParams:
    return GenerationParams(
        model=request.model,
        prompt=request.prompt,
        n=request.n if request.HasField("n") else None,
        size=request.size,
        quality=request.quality,
        response_format=request.response_format,
        user=request.user,
        seed=request.seed if request.HasField("seed") else None,
        operation="edit",
        options=Options(
            background=request.background,
            output_format=request.output_format,
            output_compression=(
                request.output_compression if request.HasField("output_compression") else None
            ),
            stream=request.stream,
            partial_images=request.partial_images if request.HasField("partial_images") else None,
            images=tuple(request.images),
            mask=request.mask if request.HasField("mask") else None,
        ),
    )


def _variation_params(request: images_pb2.CreateImageVariationsRequest) -> GenerationParams:
    return GenerationParams(
        model=request.model,
        prompt="",
        n=request.n if request.HasField("n") else None,
        size=request.size,
        response_format=request.response_format,
        user=request.user,
        seed=request.seed if request.HasField("seed") else None,
        operation="variation",
        options=Options(images=(request.image,) if request.image else ()),
    )


def _usage(usage: TokenUsage) -> images_pb2.Usage:
    return images_pb2.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        total_tokens=usage.total_tokens,
        input_text_tokens=usage.input_text_tokens,
        input_image_tokens=usage.input_image_tokens,
    )


def _fill_picture(
    target: images_pb2.GeneratedImage | images_pb2.PartialImage,
    event: DeliveredImage | DeliveredPartial,
) -> None:
    """The fields a finished image and a partial render share, set in place."""
    target.SetInParent()
    target.index = event.index
    target.data = event.data
    target.mime_type = event.mime_type
    target.width = event.width
    target.height = event.height
    target.quality = event.quality
    target.background = event.background
    target.output_format = event.output_format


def _to_message(
    event: DeliveredImage | DeliveredPartial | Summary,
) -> images_pb2.GenerateImagesResponse:
    # Filled in place: passing a built sub-message to the constructor copies it whole,
    # image bytes included (~2 ms per MB here), once more than setting the field does.
    message = images_pb2.GenerateImagesResponse()
    if isinstance(event, DeliveredImage):
        image = message.image
        _fill_picture(image, event)
        image.url = event.url
        image.revised_prompt = event.revised_prompt
        if event.output_format:
            image.usage.CopyFrom(_usage(event.usage))
        return message
    if isinstance(event, DeliveredPartial):
        partial = message.partial
        _fill_picture(partial, event)
        partial.partial_image_index = event.partial_image_index
        return message
    message.summary.CopyFrom(
        images_pb2.GenerationSummary(
            created=event.created,
            model=event.model,
            provider=event.provider,
            images=event.images,
            cost_micros=event.cost_micros,
            size=event.size,
            quality=event.quality,
            usage=_usage(event.usage),
            background=event.background,
            output_format=event.output_format,
        )
    )
    return message


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """Operator calls. Closed unless IMAGEGEN_ADMIN_TOKEN is set; then that token is needed."""

    def __init__(self, ledger: LedgerStore, admin_token: str | None) -> None:
        self.ledger = ledger
        self.admin_token = admin_token

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        if not self.admin_token:
            raise errors.PermissionDenied(
                "The admin API is disabled: set IMAGEGEN_ADMIN_TOKEN on the service."
            )
        token = keys.bearer_token(metadata_value(context, "authorization")) or ""
        if not secrets.compare_digest(token.encode(), self.admin_token.encode()):
            raise errors.InvalidApiKey("Invalid admin token.")

    async def CreateAccount(
        self,
        request: admin_pb2.CreateAccountRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> admin_pb2.Account:
        async def work() -> admin_pb2.Account:
            self._authorize(context)
            if not request.name.strip():
                raise errors.InvalidParameter("An account needs a name.", param="name")
            return _account(
                await self.ledger.create_account(request.name, request.initial_balance_micros)
            )

        return await _handle(context, "CreateAccount", work)

    async def GetAccount(
        self,
        request: admin_pb2.GetAccountRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> admin_pb2.Account:
        async def work() -> admin_pb2.Account:
            self._authorize(context)
            return _account(await self.ledger.get_account(request.account_id))

        return await _handle(context, "GetAccount", work)

    async def CreditAccount(
        self,
        request: admin_pb2.CreditAccountRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> admin_pb2.Account:
        async def work() -> admin_pb2.Account:
            self._authorize(context)
            account = await self.ledger.credit(
                request.account_id, request.amount_micros, request.note, request.credit_id
            )
            return _account(account)

        return await _handle(context, "CreditAccount", work)

    async def CreateKey(
        self,
        request: admin_pb2.CreateKeyRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> admin_pb2.CreatedKey:
        async def work() -> admin_pb2.CreatedKey:
            self._authorize(context)
            secret = keys.new_secret()
            key = await self.ledger.create_key(request.account_id, keys.hash_secret(secret))
            return admin_pb2.CreatedKey(key=_key(key), secret=secret)

        return await _handle(context, "CreateKey", work)

    async def RevokeKey(
        self,
        request: admin_pb2.RevokeKeyRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> admin_pb2.ApiKey:
        async def work() -> admin_pb2.ApiKey:
            self._authorize(context)
            return _key(await self.ledger.revoke_key(request.key_id))

        return await _handle(context, "RevokeKey", work)

    async def ListLedger(
        self,
        request: admin_pb2.ListLedgerRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> admin_pb2.ListLedgerResponse:
        async def work() -> admin_pb2.ListLedgerResponse:
            self._authorize(context)
            if not request.page_size and not 0 <= request.limit <= MAX_PAGE_SIZE:
                raise errors.InvalidParameter(
                    f"limit must be between 1 and {MAX_PAGE_SIZE}.", param="limit"
                )
            page = await self.ledger.ledger_page(
                request.account_id, request.page_size or request.limit, request.page_token
            )
            return admin_pb2.ListLedgerResponse(
                entries=[
                    admin_pb2.LedgerEntry(
                        id=e.id,
                        account_id=e.account_id,
                        kind=e.kind,
                        available_delta_micros=e.available_delta_micros,
                        held_delta_micros=e.held_delta_micros,
                        hold_id=e.hold_id or "",
                        request_id=e.request_id,
                        created=e.created,
                        note=e.note,
                        credit_id=e.credit_id,
                    )
                    for e in page.items
                ],
                next_page_token=page.next_token,
            )

        return await _handle(context, "ListLedger", work)

    async def ListAccounts(
        self,
        request: admin_pb2.ListAccountsRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> admin_pb2.ListAccountsResponse:
        async def work() -> admin_pb2.ListAccountsResponse:
            self._authorize(context)
            page = await self.ledger.list_accounts(request.page_size, request.page_token)
            return admin_pb2.ListAccountsResponse(
                accounts=[_account(a) for a in page.items], next_page_token=page.next_token
            )

        return await _handle(context, "ListAccounts", work)

    async def ListKeys(
        self,
        request: admin_pb2.ListKeysRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> admin_pb2.ListKeysResponse:
        async def work() -> admin_pb2.ListKeysResponse:
            self._authorize(context)
            page = await self.ledger.list_keys(
                request.account_id, request.page_size, request.page_token
            )
            return admin_pb2.ListKeysResponse(
                keys=[_key(k) for k in page.items], next_page_token=page.next_token
            )

        return await _handle(context, "ListKeys", work)

    async def SetKeyLimits(
        self,
        request: admin_pb2.SetKeyLimitsRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> admin_pb2.ApiKey:
        async def work() -> admin_pb2.ApiKey:
            self._authorize(context)
            limits: dict[str, int | None] = {}
            for name in ("requests_per_minute", "images_per_minute"):
                value = getattr(request, name) if request.HasField(name) else None
                if value is not None and value < 0:
                    raise errors.InvalidParameter(
                        f"{name} must be 0 (unlimited) or more.", param=name
                    )
                limits[name] = value
            key = await self.ledger.set_key_limits(
                request.key_id, limits["requests_per_minute"], limits["images_per_minute"]
            )
            return _key(key)

        return await _handle(context, "SetKeyLimits", work)


def _account(account: Account) -> admin_pb2.Account:
    return admin_pb2.Account(
        id=account.id,
        name=account.name,
        available_micros=account.available_micros,
        held_micros=account.held_micros,
        created=account.created,
    )


def _key(key: ApiKey) -> admin_pb2.ApiKey:
    return admin_pb2.ApiKey(
        id=key.id,
        account_id=key.account_id,
        created=key.created,
        revoked=key.revoked or 0,
        requests_per_minute=key.requests_per_minute,
        images_per_minute=key.images_per_minute,
    )
