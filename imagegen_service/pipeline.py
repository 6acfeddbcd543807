"""One generation, end to end: authenticate, resolve, validate, quote, hold, call the
provider, store, capture what was delivered, release the rest.

The pipeline is the domain core; the gRPC servicer is a thin plug around it. Its rule
about money: a hold is settled exactly once. Images are captured only after the caller
has taken every one of them; any failure or cancellation before that releases the hold.
A streamed request is the one exception: the images the caller has already taken when it
fails are charged, and only the rest is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from imagegen_service import errors, inputs
from imagegen_service.catalog import Catalog, Deployment, ImageModel, Options, ValidatedRequest
from imagegen_service.keys import KeyCache, bearer_token, hash_secret
from imagegen_service.providers.base import (
    Operation,
    PartialImage,
    Provider,
    ProviderImage,
    ProviderRequest,
    TokenUsage,
)
from imagegen_service.ratelimit import Decision, RateLimiter
from imagegen_service.routing import Router
from imagegen_service.stores.base import ImageStore
from imagegen_service.stores.ledger_sql import ApiKey, LedgerStore

log = structlog.get_logger("imagegen.pipeline")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class GenerationParams:
    model: str
    prompt: str
    n: int | None = None
    size: str = ""
    quality: str = ""
    style: str = ""
    response_format: str = ""
    user: str = ""
    seed: int | None = None
    operation: Operation = "generate"
    # The gpt-image parameters, streaming, and the input images of edits and variations.
    options: Options = field(default_factory=Options)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request that passed every check and may now hold money."""

    key: ApiKey
    request: ValidatedRequest
    provider_request: ProviderRequest
    deployments: list[Deployment]
    request_id: str
    rate_limit: Decision | None
    quote_micros: int
    # Pixels the serving provider may decode for the inputs (inputs.decode_pixels).
    decode_pixels: int = 0


@dataclass(frozen=True, slots=True)
class DeliveredImage:
    index: int
    mime_type: str
    width: int
    height: int
    revised_prompt: str
    # Exactly one of these is set, by response_format.
    data: bytes = b""
    url: str = ""
    # Streamed requests: this image's token usage and the settings it was made with.
    usage: TokenUsage = field(default_factory=TokenUsage)
    quality: str = ""
    background: str = ""
    output_format: str = ""


@dataclass(frozen=True, slots=True)
class DeliveredPartial:
    """A progressive render of image ``index`` (streamed requests only; never charged)."""

    index: int
    partial_image_index: int
    data: bytes
    mime_type: str
    width: int
    height: int
    quality: str
    background: str
    output_format: str


@dataclass(frozen=True, slots=True)
class Summary:
    created: int
    model: str
    provider: str
    images: int
    cost_micros: int
    size: str
    quality: str
    usage: TokenUsage = field(default_factory=TokenUsage)
    # Set for models that take the gpt-image parameters: their answers echo these.
    background: str = ""
    output_format: str = ""


Event = DeliveredImage | DeliveredPartial | Summary


class ImagePipeline:
    def __init__(
        self,
        *,
        catalog: Catalog,
        ledger: LedgerStore,
        images: ImageStore,
        providers: Mapping[str, Provider],
        hold_ttl_seconds: int,
        router: Router | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self.catalog = catalog
        self.ledger = ledger
        self.images = images
        self.providers = providers
        self.router = router or Router(providers)
        # One set of instruments per service: the router reports provider calls into it.
        self.metrics = self.router.metrics
        self.rate_limiter = rate_limiter
        self.key_cache: KeyCache[ApiKey] = KeyCache()
        self.hold_ttl_seconds = hold_ttl_seconds
        # One per service process: what its requests may be decoding at once.
        self.decode_budget = inputs.DecodeBudget()

    def models(self) -> list[ImageModel]:
        return sorted(self.catalog.models.values(), key=lambda m: m.id)

    async def authenticate(self, authorization: str | None, *, cached: bool = False) -> ApiKey:
        """The active key behind ``authorization``. ``cached`` answers from a short cache:
        only for requests that go on to place a hold, which checks revocation again, and
        whose refusals before the hold go through ``refusal_for``."""
        token = bearer_token(authorization)
        if token is None:
            raise errors.InvalidApiKey(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            )
        key_hash = hash_secret(token)
        now = time.monotonic()
        key = self.key_cache.get(key_hash, now) if cached else None
        if key is None:
            key = await self.ledger.find_active_key(key_hash)
            if key is None:
                # Revoked (or never known): the cache must not answer for it any more.
                self.key_cache.discard(key_hash)
                raise errors.InvalidApiKey("Incorrect API key provided.")
            self.key_cache.put(key_hash, key, now)
        return key

    async def refusal_for(self, authorization: str | None, refusal: Exception) -> Exception:
        """What to answer when a request authenticated from the cache fails without having
        charged anything (invalid parameters, rate limits, Idempotency-Key conflicts, a
        failed provider): the failure while the key is active, else InvalidApiKey. A revoked
        key is answered exactly as an unknown one from the moment the revocation is written,
        by any process, on every replica.

        One indexed read, on failures only: a request that succeeds was checked by its hold,
        whose statement places it only for an active key. So was one refused for its
        balance, by the same statement: no read. A lookup that fails for another reason (the
        database out of connections under load) leaves the refusal as it was: it is true, and
        the caller would otherwise get an internal error for a request that failed cleanly."""
        if isinstance(refusal, errors.InvalidApiKey | errors.InsufficientBalance):
            return refusal
        try:
            await self.authenticate(authorization)
        except errors.ImagegenError as exc:
            return exc
        except Exception as exc:
            log.warning(
                "auth.recheck_failed", error=type(exc).__name__, refusal=type(refusal).__name__
            )
        return refusal

    async def prepare(self, key: ApiKey, params: GenerationParams, *, request_id: str) -> Prepared:
        """Everything that can refuse a request before money moves: validation against the
        model, the providers' own limits, and the key's rate limits."""
        request = self.catalog.validate(
            model=params.model,
            prompt=params.prompt,
            n=params.n,
            size=params.size,
            quality=params.quality,
            style=params.style,
            response_format=params.response_format,
            seed=params.seed,
            user=params.user,
            operation=params.operation,
            options=params.options,
        )
        provider_request = _provider_request(request, request_id)
        deployments = self.router.check(request.model, provider_request, request.operation)
        decode_pixels = inputs.decode_pixels(
            [self.providers[d.provider] for d in deployments],
            request.images,
            request.mask,
            n=request.n,
            stream=request.stream,
        )
        inputs.check_request_pixels(decode_pixels)
        # Hold the most that any deployment able to serve this request could charge.
        unit = max(_unit_price(request, d) for d in deployments)
        decision = None
        if self.rate_limiter is not None:
            decision = await self.rate_limiter.admit(key, request.n)
        return Prepared(
            key,
            request,
            provider_request,
            deployments,
            request_id,
            decision,
            unit * request.n,
            decode_pixels,
        )

    async def generate(
        self, key: ApiKey, params: GenerationParams, *, request_id: str
    ) -> AsyncGenerator[Event]:
        """``prepare`` then ``run``."""
        prepared = await self.prepare(key, params, request_id=request_id)
        async with contextlib.aclosing(self.run(prepared)) as events:
            async for event in events:
                yield event

    def run(self, prepared: Prepared) -> AsyncGenerator[Event]:
        """Yields one DeliveredImage per image, then the Summary once the charge is made.

        The caller must consume the stream to the Summary for the images to be charged;
        closing it earlier releases the hold. A streamed request also yields DeliveredPartial
        renders and each image as soon as it is made, and is charged per image the caller
        took: a failure or cancellation midway captures the images already taken and
        releases the rest (docs/architecture.md, "Streaming and money").

        A request with input images to decode first reserves them in the process's decode
        budget, before the hold: RateLimited when the process is decoding all it can hold.
        """
        if prepared.decode_pixels:
            return self._run_decoding(prepared)
        return self._run(prepared)

    async def _run_decoding(self, prepared: Prepared) -> AsyncGenerator[Event]:
        with self.decode_budget.reserve(prepared.decode_pixels):
            async with contextlib.aclosing(self._run(prepared)) as events:
                async for event in events:
                    yield event

    async def _run(self, prepared: Prepared) -> AsyncGenerator[Event]:
        key, request, request_id = prepared.key, prepared.request, prepared.request_id
        provider_request, deployments = prepared.provider_request, prepared.deployments
        hold = await self.ledger.place_hold(
            key.account_id,
            prepared.quote_micros,
            request_id=request_id,
            ttl_seconds=self.hold_ttl_seconds,
            key_id=key.id,
        )
        self.metrics.hold_placed()
        settled = False
        # Streamed images the caller has taken (the yield returned), and who made them.
        taken: list[DeliveredImage] = []
        serving: Deployment | None = None
        try:
            if request.stream:
                reported: TokenUsage | None = None
                with self.ledger.at_upstream():
                    async with contextlib.aclosing(
                        self.router.stream(deployments, provider_request, request.operation)
                    ) as events:
                        async for served, event in events:
                            serving = served
                            if isinstance(event, TokenUsage):
                                reported = event
                            elif isinstance(event, PartialImage):
                                if event.index < request.n:
                                    yield _partial(event, request)
                            elif len(taken) < request.n:
                                image = _streamed(len(taken), event, request)
                                yield image
                                taken.append(image)
                if serving is None or not taken:
                    raise errors.UpstreamError("The provider returned no images.")
                deployment, provider, count = serving, serving.provider, len(taken)
                usage = reported if reported and reported.total_tokens else _sum(taken)
            else:
                with self.ledger.at_upstream():
                    routed = await self.router.generate(
                        deployments, provider_request, request.operation
                    )
                result = routed.result
                images = result.images[: request.n]
                if not images:
                    raise errors.UpstreamError(f"Provider '{routed.provider}' returned no images.")
                delivered = [await self._deliver(i, img, request) for i, img in enumerate(images)]
                for image in delivered:
                    yield image
                deployment, provider, usage = routed.deployment, routed.provider, result.usage
                count = len(delivered)
            cost = _cost(request, deployment, usage, count)
            settled = True
            self.metrics.hold_settled(hold.amount_micros, captured_micros=cost)
            if not await _shielded(self.ledger.settle_hold(hold, cost, request_id=request_id)):
                # The hold outlived hold_ttl_seconds and housekeeping released it: these
                # images went out uncharged. hold_ttl_seconds must exceed the slowest request.
                log.error(
                    "hold.expired_before_capture",
                    request_id=request_id,
                    account_id=key.account_id,
                    uncharged_micros=cost,
                    hold_ttl_seconds=self.hold_ttl_seconds,
                )
            echo = request.model.echoes_settings
            # The servicer's GenerationRecord writes the generation's log line.
            yield Summary(
                created=int(time.time()),
                model=request.model.id,
                provider=provider,
                images=count,
                cost_micros=cost,
                size=request.size,
                quality=request.echo_quality if echo else request.quality,
                usage=usage,
                background=request.echo_background if echo else "",
                output_format=request.output_format if echo else "",
            )
        except BaseException as exc:
            if not settled:
                settled = True
                # Only a stream can have delivered images before failing: those were taken
                # and are charged; the rest of the hold goes back.
                captured = 0
                if taken and serving is not None:
                    captured = _cost(request, serving, _sum(taken), len(taken))
                self.metrics.hold_settled(hold.amount_micros, captured_micros=captured)
                await _shielded(self.ledger.settle_hold(hold, captured, request_id=request_id))
                if captured:
                    log.info(
                        "generation.partially_delivered",
                        request_id=request_id,
                        account_id=key.account_id,
                        images=len(taken),
                        cost_micros=captured,
                    )
                    if isinstance(exc, errors.ImagegenError):
                        exc.details.update(
                            images_charged=str(len(taken)), cost_micros=str(captured)
                        )
            raise

    async def _deliver(
        self, index: int, image: ProviderImage, request: ValidatedRequest
    ) -> DeliveredImage:
        if request.response_format == "url":
            url = await self.images.put(image.data, image.mime_type)
            return DeliveredImage(
                index, image.mime_type, image.width, image.height, image.revised_prompt, url=url
            )
        return DeliveredImage(
            index, image.mime_type, image.width, image.height, image.revised_prompt, data=image.data
        )


def _cost(
    request: ValidatedRequest, deployment: Deployment, usage: TokenUsage, delivered: int
) -> int:
    """Per image at the serving deployment's price (by megapixel where the model is so
    priced); by tokens where the model has token prices and the upstream reported usage,
    but never more than the per-image price that was held."""
    cost = _unit_price(request, deployment) * delivered
    prices = request.model.token_prices
    if prices is not None and usage.total_tokens > 0:
        by_tokens = prices.cost(usage.input_tokens, usage.output_tokens, usage.input_image_tokens)
        cost = min(cost, by_tokens)
    return cost


def _unit_price(request: ValidatedRequest, deployment: Deployment) -> int:
    return request.model.unit_price(
        request.size,
        request.quality,
        deployment,
        operation=request.operation,
        input_pixels=sum(image.width * image.height for image in request.images),
    )


def _partial(event: PartialImage, request: ValidatedRequest) -> DeliveredPartial:
    return DeliveredPartial(
        index=event.index,
        partial_image_index=event.partial_image_index,
        data=event.data,
        mime_type=event.mime_type,
        width=event.width,
        height=event.height,
        quality=request.echo_quality,
        background=request.echo_background,
        output_format=request.output_format,
    )


def _streamed(index: int, image: ProviderImage, request: ValidatedRequest) -> DeliveredImage:
    """A streamed image: always raw bytes (streams carry base64), with its settings."""
    return DeliveredImage(
        index,
        image.mime_type,
        image.width,
        image.height,
        image.revised_prompt,
        data=image.data,
        usage=image.usage or TokenUsage(),
        quality=request.echo_quality,
        background=request.echo_background,
        output_format=request.output_format,
    )


def _sum(images: list[DeliveredImage]) -> TokenUsage:
    return TokenUsage(
        input_tokens=sum(i.usage.input_tokens for i in images),
        output_tokens=sum(i.usage.output_tokens for i in images),
        input_text_tokens=sum(i.usage.input_text_tokens for i in images),
        input_image_tokens=sum(i.usage.input_image_tokens for i in images),
    )


def _provider_request(request: ValidatedRequest, request_id: str) -> ProviderRequest:
    return ProviderRequest(
        upstream_model=request.model.deployments[0].upstream_model,
        prompt=request.prompt,
        n=request.n,
        width=request.width,
        height=request.height,
        quality=request.quality,
        style=request.style,
        seed=request.seed,
        user=request.user or None,
        request_id=request_id,
        output_format=request.output_format,
        background=request.background,
        output_compression=request.output_compression,
        moderation=request.moderation,
        partial_images=request.partial_images,
        images=request.images,
        mask=request.mask,
        family=request.model.family,
    )


async def _shielded(settlement: asyncio.Future[T]) -> T:
    """Waits for a ledger write that is under way; a cancelled request stops waiting but
    the write still completes."""
    return await asyncio.shield(settlement)
