"""Adapters for OpenAI's Images API (``POST /images/generations``) and its Azure OpenAI variant.

``OpenAICompatibleProvider`` works with OpenAI itself and with the many servers that copy its
wire format. Answers may carry images as ``b64_json`` or as a ``url`` to download; both are
accepted because several compatible servers ignore ``response_format``.

OpenAI's own models each reject parameters the others take, so the request is shaped by the
model family, recognised from the upstream model id (other ids are sent as they are):

* ``dall-e-2``: sizes 256x256, 512x512, 1024x1024; up to 10 images per call; no ``quality`` and
  no ``style`` (the API answers "Unknown parameter").
* ``dall-e-3``: sizes 1024x1024, 1792x1024, 1024x1792; exactly one image per call, so n > 1 is
  served by n concurrent calls under the one deadline, merged (a call refused on content policy
  counts as filtered; the others still deliver).
* ``gpt-image-*``: sizes 1024x1024, 1536x1024, 1024x1536; up to 10 per call; never
  ``response_format`` (rejected; it always answers base64) nor ``style``; ``quality`` is
  low|medium|high|auto, so ``standard`` becomes ``medium`` and ``hd`` becomes ``high``;
  ``output_format`` is sent when not png, ``background``, ``output_compression`` and
  ``moderation`` when given. It bills tokens, read from ``usage``. Only gpt-image streams:
  ``stream`` + ``partial_images`` answer server-sent events (``image_generation.partial_image``,
  ``image_generation.completed``, ``error``), read as they come.

Edits (``POST /images/edits``, multipart: ``image`` or ``image[]``, ``mask``) serve dall-e-2 and
gpt-image; variations (``POST /images/variations``, multipart ``image``) serve dall-e-2.

``AzureOpenAIProvider`` is the same adapter with Azure's addressing: the resource endpoint,
a deployment in the path, ``api-version`` in the query and the key in an ``api-key`` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any, NoReturn
from urllib.parse import quote, urlencode

import aiohttp
import orjson

from imagegen_service.config import ProviderConfig
from imagegen_service.errors import ContentPolicy, InvalidParameter, UpstreamError
from imagegen_service.providers.base import (
    PartialImage,
    ProviderImage,
    ProviderRequest,
    ProviderResult,
    StreamEvent,
    TokenUsage,
)
from imagegen_service.providers.http import (
    MAX_ANSWER_BYTES,
    MAX_ERROR_BODY_BYTES,
    MAX_RETRY_AFTER_SECONDS,
    HttpUpstream,
    json_object,
    read_capped,
    short_identifier,
)

__all__ = [
    "AzureOpenAIProvider",
    "OpenAICompatibleProvider",
    "azure_from_config",
    "from_config",
    "model_family",
]

_CONTENT_POLICY_MESSAGE = "The prompt was refused by the provider's content policy."
# dall-e answers `content_policy_violation`; gpt-image answers `moderation_blocked` with the
# type `image_generation_user_error`; Azure adds its content filter's `contentFilter` /
# `content_filter` and names `ResponsibleAIPolicyViolation` in its inner error.
_CONTENT_POLICY_CODES = frozenset(
    {"content_policy_violation", "moderation_blocked", "contentFilter", "content_filter"}
)
_CONTENT_POLICY_TYPES = frozenset({"image_generation_user_error"})
_CONTENT_POLICY_INNER_CODES = frozenset({"ResponsibleAIPolicyViolation"})
_MAX_UPSTREAM_MESSAGE = 300

DALL_E_2 = "dall-e-2"
DALL_E_3 = "dall-e-3"
GPT_IMAGE = "gpt-image"

# What each family can make at all; anything else is refused before money moves.
_SIZES: Mapping[str, tuple[str, ...]] = {
    DALL_E_2: ("256x256", "512x512", "1024x1024"),
    DALL_E_3: ("1024x1024", "1792x1024", "1024x1792"),
    GPT_IMAGE: ("1024x1024", "1536x1024", "1024x1536"),
}
_IMAGES_PER_CALL: Mapping[str, int] = {DALL_E_2: 10, DALL_E_3: 1, GPT_IMAGE: 10}
# Our catalog speaks dall-e's quality names; gpt-image takes low|medium|high|auto.
_GPT_IMAGE_QUALITY: Mapping[str, str] = {"standard": "medium", "hd": "high"}


def model_family(model: str) -> str | None:
    """``dall-e-2``, ``dall-e-3`` or ``gpt-image`` for OpenAI's own model ids, else None."""
    lowered = model.strip().lower()
    for family in (DALL_E_2, DALL_E_3, GPT_IMAGE):
        if lowered.startswith(family):
            return family
    return None


class OpenAICompatibleProvider(HttpUpstream):
    """One upstream reached over HTTP with OpenAI's Images API wire format.

    Where a model takes fewer images per call than asked (dall-e-3 takes one), the images are
    requested by concurrent calls under the same deadline and merged."""

    # gpt-image output formats worth asking for (png is its default); Azure makes no WEBP, so
    # there a webp request is answered with the PNG the image really is.
    _output_formats: frozenset[str] = frozenset({"jpeg", "webp"})
    # OpenAI either answers an image per item or refuses the whole call; Azure's content filter
    # withholds single items and leaves them without image data.
    _imageless_item_is_filtered = False

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str | None,
        timeout_seconds: float = 120.0,
        max_connections: int = 64,
    ) -> None:
        super().__init__(name, timeout_seconds=timeout_seconds, max_connections=max_connections)
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key or None

    def check(self, request: ProviderRequest) -> None:
        """Refuses sizes an OpenAI model can never make; other upstreams take the catalog's
        sizes as they are."""
        family = self._family(request)
        if family is None:
            return
        supported = _SIZES[family]
        if request.size not in supported:
            raise InvalidParameter(
                f"The size {request.size} is not supported by {family}; "
                f"supported sizes are {', '.join(supported)}.",
                param="size",
            )

    async def generate(self, request: ProviderRequest) -> ProviderResult:
        family = self._family(request)
        per_call = _IMAGES_PER_CALL.get(family or "", request.n)
        batches = _batches(request.n, per_call)

        async def call(session: aiohttp.ClientSession) -> ProviderResult:
            if len(batches) == 1:
                return await self._generate_once(session, request, family)
            return await self._fan_out(session, request, family, batches)

        return await self.within_deadline(call)

    async def edit(self, request: ProviderRequest) -> ProviderResult:
        family = self._family(request)

        async def call(session: aiohttp.ClientSession) -> ProviderResult:
            return await self._submit(
                session, self._url(request, "edits"), request, form=self._edit_form(request, family)
            )

        return await self.within_deadline(call)

    async def vary(self, request: ProviderRequest) -> ProviderResult:
        async def call(session: aiohttp.ClientSession) -> ProviderResult:
            return await self._submit(
                session,
                self._url(request, "variations"),
                request,
                form=self._variation_form(request),
            )

        return await self.within_deadline(call)

    async def generate_stream(self, request: ProviderRequest) -> AsyncGenerator[StreamEvent]:
        family = self._family(request)
        if family != GPT_IMAGE:
            # Only gpt-image streams: the others answer once, with every image.
            result = await self.generate(request)
            for image in result.images:
                yield image
            yield result.usage
            return
        payload = self._payload(request, family)
        payload.update(stream=True, partial_images=request.partial_images)
        async with contextlib.aclosing(
            self._stream(self._url(request), request, body=orjson.dumps(payload))
        ) as events:
            async for event in events:
                yield event

    async def edit_stream(self, request: ProviderRequest) -> AsyncGenerator[StreamEvent]:
        family = self._family(request)
        if family != GPT_IMAGE:
            result = await self.edit(request)
            for image in result.images:
                yield image
            yield result.usage
            return
        form = self._edit_form(request, family)
        form.add_field("stream", "true")
        form.add_field("partial_images", str(request.partial_images))
        async with contextlib.aclosing(
            self._stream(self._url(request, "edits"), request, form=form)
        ) as events:
            async for event in events:
                yield event

    # -- what differs between OpenAI and Azure ------------------------------------------------

    def _family(self, request: ProviderRequest) -> str | None:
        return model_family(request.upstream_model)

    def _url(self, request: ProviderRequest, operation: str = "generations") -> str:
        """``operation``: ``generations``, ``edits`` or ``variations``."""
        return f"{self._base_url}/images/{operation}"

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def _names_model(self) -> bool:
        """Whether the body names the model (Azure's URL names the deployment instead)."""
        return True

    def _is_upstream_fault(self, code: str, message: str) -> bool:
        """A 400 caused by our own configuration rather than by the caller's request."""
        return False

    # -- one call ----------------------------------------------------------------------------

    async def _generate_once(
        self, session: aiohttp.ClientSession, request: ProviderRequest, family: str | None
    ) -> ProviderResult:
        async with session.post(
            self._url(request),
            data=orjson.dumps(self._payload(request, family)),
            headers=self._headers(request),
        ) as resp:
            if not 200 <= resp.status < 300:
                body = await read_capped(resp, MAX_ERROR_BODY_BYTES, truncate=True)
                self._raise_for_status(resp.status, resp.headers, body)
            answer = await self.read_json(resp)
        return await self._read_result(session, answer, request.n)

    async def _fan_out(
        self,
        session: aiohttp.ClientSession,
        request: ProviderRequest,
        family: str | None,
        batches: Sequence[int],
    ) -> ProviderResult:
        async def one(n: int) -> ProviderResult | None:
            try:
                return await self._generate_once(session, dataclasses.replace(request, n=n), family)
            except ContentPolicy:
                # One refused call withholds its images; the others may still deliver.
                return None

        tasks = [asyncio.ensure_future(one(n)) for n in batches]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in tasks:
                error = task.exception() if task.done() else None
                if error is not None:
                    # Any other failure fails the whole request, at once: the caller retries or
                    # fails over rather than waiting for calls whose result it would discard.
                    raise error
            results = [task.result() for task in tasks]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        images: list[ProviderImage] = []
        filtered = input_tokens = output_tokens = 0
        for n, result in zip(batches, results, strict=True):
            if result is None:
                filtered += n
                continue
            images += result.images
            filtered += result.filtered
            input_tokens += result.usage.input_tokens
            output_tokens += result.usage.output_tokens
        if not images:
            raise ContentPolicy(_CONTENT_POLICY_MESSAGE)
        return ProviderResult(
            images=images,
            usage=TokenUsage(input_tokens=input_tokens, output_tokens=output_tokens),
            filtered=filtered,
        )

    def _payload(self, request: ProviderRequest, family: str | None) -> dict[str, Any]:
        payload: dict[str, Any] = {}
        if self._names_model():
            payload["model"] = request.upstream_model
        payload.update(prompt=request.prompt, n=request.n, size=request.size)
        if family == GPT_IMAGE:
            # gpt-image always answers base64 and rejects `response_format` outright.
            payload.update(self._gpt_image_fields(request))
        else:
            payload["response_format"] = "b64_json"
            # Optional fields are left out rather than sent empty: several compatible servers
            # reject values they do not know, and dall-e-2 rejects quality and style at all.
            if family != DALL_E_2:
                if request.quality:
                    payload["quality"] = request.quality
                if request.style is not None:
                    payload["style"] = request.style
        if request.user:
            payload["user"] = request.user
        return payload

    def _gpt_image_fields(self, request: ProviderRequest) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if request.quality:
            fields["quality"] = _GPT_IMAGE_QUALITY.get(request.quality, request.quality)
        if request.output_format in self._output_formats:
            fields["output_format"] = request.output_format
        if request.background != "auto":
            fields["background"] = request.background
        if request.output_compression is not None:
            fields["output_compression"] = request.output_compression
        if request.moderation is not None:
            fields["moderation"] = request.moderation
        return fields

    def _edit_form(self, request: ProviderRequest, family: str | None) -> aiohttp.FormData:
        form = aiohttp.FormData()
        if self._names_model():
            form.add_field("model", request.upstream_model)
        form.add_field("prompt", request.prompt)
        form.add_field("n", str(request.n))
        form.add_field("size", request.size)
        # One image is `image`; several are OpenAI's array form, `image[]`.
        name = "image" if len(request.images) == 1 else "image[]"
        for i, image in enumerate(request.images):
            form.add_field(
                name,
                io.BytesIO(image.data),
                filename=f"image{i}.{image.format}",
                content_type=image.mime_type,
            )
        if request.mask is not None:
            form.add_field(
                "mask", io.BytesIO(request.mask.data), filename="mask.png", content_type="image/png"
            )
        if family == GPT_IMAGE:
            for key, value in self._gpt_image_fields(request).items():
                form.add_field(key, str(value))
        else:
            form.add_field("response_format", "b64_json")
        if request.user:
            form.add_field("user", request.user)
        return form

    def _variation_form(self, request: ProviderRequest) -> aiohttp.FormData:
        form = aiohttp.FormData()
        if self._names_model():
            form.add_field("model", request.upstream_model)
        image = request.images[0]
        form.add_field(
            "image",
            io.BytesIO(image.data),
            filename=f"image.{image.format}",
            content_type=image.mime_type,
        )
        form.add_field("n", str(request.n))
        form.add_field("size", request.size)
        form.add_field("response_format", "b64_json")
        if request.user:
            form.add_field("user", request.user)
        return form

    async def _submit(
        self,
        session: aiohttp.ClientSession,
        url: str,
        request: ProviderRequest,
        *,
        form: aiohttp.FormData,
    ) -> ProviderResult:
        """One multipart call (edits, variations) answered with an ImagesResponse."""
        async with session.post(url, data=form, headers=self._headers(request, json=False)) as resp:
            if not 200 <= resp.status < 300:
                body = await read_capped(resp, MAX_ERROR_BODY_BYTES, truncate=True)
                self._raise_for_status(resp.status, resp.headers, body)
            answer = await self.read_json(resp)
        return await self._read_result(session, answer, request.n)

    async def _stream(
        self,
        url: str,
        request: ProviderRequest,
        *,
        body: bytes | None = None,
        form: aiohttp.FormData | None = None,
    ) -> AsyncGenerator[StreamEvent]:
        """A gpt-image call answered with server-sent events: partial renders and images as
        they come. A failure before the first event may be retried by the caller; after it,
        the stream ends with UpstreamError (or ContentPolicy) and the images already yielded
        stand."""
        headers = self._headers(request, json=form is None)
        headers["Accept"] = "text/event-stream"
        completed = 0
        try:
            async with self.session().post(
                url, data=body if form is None else form, headers=headers
            ) as resp:
                if not 200 <= resp.status < 300:
                    error_body = await read_capped(resp, MAX_ERROR_BODY_BYTES, truncate=True)
                    self._raise_for_status(resp.status, resp.headers, error_body)
                if resp.content_type == "application/json":
                    # A compatible server that does not stream answers all at once.
                    answer = await self.read_json(resp)
                    result = await self._read_result(self.session(), answer, request.n)
                    for image in result.images:
                        yield image
                    yield result.usage
                    return
                if resp.content_type != "text/event-stream":
                    raise self.unreadable(f"content type {resp.content_type!r} for a stream")
                async for event in _server_sent_events(resp, self.unreadable):
                    kind = event.get("type")
                    if kind == "error" or isinstance(event.get("error"), dict):
                        self._raise_stream_error(event)
                    if not isinstance(kind, str):
                        raise self.unreadable("a stream event has no type")
                    if completed >= request.n:
                        continue
                    if kind.endswith(".partial_image"):
                        index = event.get("partial_image_index")
                        image = self.inspect(
                            self.decode_base64(event.get("b64_json"), completed), completed
                        )
                        yield PartialImage(
                            completed,
                            index if isinstance(index, int) else 0,
                            image.data,
                            image.mime_type,
                            image.width,
                            image.height,
                        )
                    elif kind.endswith(".completed"):
                        image = self.inspect(
                            self.decode_base64(event.get("b64_json"), completed), completed
                        )
                        yield dataclasses.replace(image, usage=_usage(event.get("usage")))
                        completed += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(
                f"upstream {self.name!r} broke off the stream ({type(exc).__name__})"
            ) from exc
        if completed < request.n:
            raise UpstreamError(
                f"upstream {self.name!r} ended the stream after {completed} of {request.n} images"
            )

    def _raise_stream_error(self, event: Mapping[str, Any]) -> NoReturn:
        error = event.get("error")
        error = error if isinstance(error, dict) else dict(event)
        if _is_content_policy(error):
            raise ContentPolicy(_CONTENT_POLICY_MESSAGE)
        code = short_identifier(error.get("code")) or short_identifier(error.get("type"))
        detail = f" ({code})" if code else ""
        raise UpstreamError(f"upstream {self.name!r} failed during the stream{detail}")

    def _headers(self, request: ProviderRequest, *, json: bool = True) -> dict[str, str]:
        # A multipart body sets its own Content-Type, with the boundary.
        headers = {"Content-Type": "application/json"} if json else {}
        headers["Accept"] = "application/json"
        headers.update(self._auth_headers())
        if request.request_id:
            headers["X-Request-ID"] = request.request_id
        return headers

    def _raise_for_status(
        self, status: int, headers: Mapping[str, str], body: bytes | None
    ) -> NoReturn:
        error = _error_object(body)
        code = short_identifier(error.get("code"))
        kind = short_identifier(error.get("type"))
        raw_message = error.get("message")
        message = raw_message if isinstance(raw_message, str) else ""

        if status in (400, 403, 422) and _is_content_policy(error):
            raise ContentPolicy(_CONTENT_POLICY_MESSAGE)
        if status in (400, 422) and not self._is_upstream_fault(code, message):
            param = error.get("param")
            text = self._scrub(message.strip())[:_MAX_UPSTREAM_MESSAGE]
            raise InvalidParameter(
                text or f"upstream {self.name!r} rejected the request (HTTP {status})",
                param=param if isinstance(param, str) and param else None,
            )
        # The upstream's message is deliberately dropped here: for 401 OpenAI echoes a masked
        # form of our key, and the caller cannot act on an upstream's internal trouble anyway.
        raise self.status_error(status, headers, self._scrub(code or kind))

    def _scrub(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    async def _read_result(
        self, session: aiohttp.ClientSession, answer: dict[str, Any], n: int
    ) -> ProviderResult:
        items = answer.get("data")
        if not isinstance(items, list) or not items:
            # Azure has answered a refusal as a body with `error` and no `data`.
            error = answer.get("error")
            if isinstance(error, dict) and _is_content_policy(error):
                raise ContentPolicy(_CONTENT_POLICY_MESSAGE)
            raise self.unreadable("no images")
        images: list[ProviderImage] = []
        filtered = 0
        # Never hand back more than was asked for: callers bill and lay out per requested image.
        for index, item in enumerate(items[:n]):
            if not isinstance(item, dict):
                raise self.unreadable(f"item {index} is not an object")
            if _item_filtered(item) or (self._imageless_item_is_filtered and not _has_image(item)):
                filtered += 1
                continue
            data = await self._item_bytes(session, item, index)
            revised = item.get("revised_prompt")
            images.append(self.inspect(data, index, revised if isinstance(revised, str) else ""))
        if not images:
            raise ContentPolicy(_CONTENT_POLICY_MESSAGE)
        return ProviderResult(images=images, usage=_usage(answer.get("usage")), filtered=filtered)

    async def _item_bytes(
        self, session: aiohttp.ClientSession, item: dict[str, Any], index: int
    ) -> bytes:
        url = item.get("url")
        if not item.get("b64_json") and isinstance(url, str) and url:
            return await self.download(session, url, index)
        return self.decode_base64(item.get("b64_json"), index)


AZURE_API_VERSION = "2024-10-21"
# gpt-image deployments are served only by preview API versions so far.
AZURE_GPT_IMAGE_API_VERSION = "2025-04-01-preview"


class AzureOpenAIProvider(OpenAICompatibleProvider):
    """Azure OpenAI: ``POST {resource}/openai/deployments/{deployment}/images/generations
    ?api-version=...`` with an ``api-key`` header.

    The deployment is ``deployment`` when configured, else the request's upstream model id, so
    one provider can serve several deployments named after their models. The model rules
    follow ``deployment_model`` (the model the deployment runs) when configured, else the
    upstream model id, else the deployment name. Without ``api_version`` a gpt-image deployment
    gets the preview version that serves it, any other the GA version."""

    _output_formats = frozenset({"jpeg"})
    _imageless_item_is_filtered = True

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str | None,
        deployment: str = "",
        deployment_model: str = "",
        api_version: str = "",
        timeout_seconds: float = 120.0,
        max_connections: int = 64,
    ) -> None:
        endpoint = base_url.strip().rstrip("/")
        # The portal shows the resource endpoint; a copied ".../openai" would double the path.
        endpoint = endpoint.removesuffix("/openai")
        if not endpoint:
            raise ValueError(
                f"providers.{name}: base_url is required for type 'azure-openai' "
                "(the resource endpoint, e.g. https://myresource.openai.azure.com)"
            )
        super().__init__(
            name,
            base_url=endpoint,
            api_key=api_key,
            timeout_seconds=timeout_seconds,
            max_connections=max_connections,
        )
        self._deployment = deployment.strip()
        self._deployment_model = deployment_model.strip()
        self._api_version = api_version.strip()

    def _deployment_for(self, request: ProviderRequest) -> str:
        return self._deployment or request.upstream_model

    def _family(self, request: ProviderRequest) -> str | None:
        if self._deployment_model:
            return model_family(self._deployment_model)
        return model_family(request.upstream_model) or model_family(self._deployment_for(request))

    def _url(self, request: ProviderRequest, operation: str = "generations") -> str:
        version = self._api_version or (
            AZURE_GPT_IMAGE_API_VERSION if self._family(request) == GPT_IMAGE else AZURE_API_VERSION
        )
        deployment = quote(self._deployment_for(request), safe="")
        return f"{self._base_url}/openai/deployments/{deployment}/images/{operation}?" + urlencode(
            {"api-version": version}
        )

    def _auth_headers(self) -> dict[str, str]:
        return {"api-key": self._api_key} if self._api_key else {}

    def _names_model(self) -> bool:
        # The deployment decides the model, and a deployment name is not a model id.
        return False

    def _is_upstream_fault(self, code: str, message: str) -> bool:
        # A wrong api_version is our configuration, not the caller's request.
        return code == "BadRequest" and "api version" in message.lower()

    def status_error(
        self, status: int, headers: Mapping[str, str], code: str = ""
    ) -> UpstreamError:
        error = super().status_error(status, headers, code)
        # Azure's millisecond hint is finer than Retry-After's whole seconds.
        raw = headers.get("retry-after-ms")
        if raw:
            try:
                seconds = float(raw) / 1000
            except ValueError:
                return error
            if seconds == seconds:  # not NaN
                error.retry_after_seconds = min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
        return error


def _batches(n: int, per_call: int) -> list[int]:
    """``n`` split into calls of at most ``per_call`` images."""
    per_call = max(per_call, 1)
    full, rest = divmod(n, per_call)
    return [per_call] * full + ([rest] if rest else [])


def _error_object(body: bytes | None) -> dict[str, Any]:
    """The ``error`` object of an OpenAI-style error body, or ``{}``."""
    parsed = json_object(body)
    error = parsed.get("error")
    if isinstance(error, dict):
        return error
    # Some compatible servers answer {"error": "text"} or FastAPI's {"detail": "text"}.
    for key in ("error", "detail", "message"):
        if isinstance(parsed.get(key), str):
            return {"message": parsed[key]}
    return {}


def _is_content_policy(error: Mapping[str, Any]) -> bool:
    """Whether an OpenAI- or Azure-style ``error`` object is a content-policy refusal."""
    inner = error.get("inner_error") or error.get("innererror")
    inner_code = short_identifier(inner.get("code")) if isinstance(inner, dict) else ""
    message = error.get("message")
    return (
        short_identifier(error.get("code")) in _CONTENT_POLICY_CODES
        or short_identifier(error.get("type")) in _CONTENT_POLICY_TYPES
        or inner_code in _CONTENT_POLICY_INNER_CODES
        or (isinstance(message, str) and "safety system" in message.lower())
    )


def _item_filtered(item: Mapping[str, Any]) -> bool:
    """Whether Azure's content filter withheld this item (any category ``filtered: true``)."""
    results = item.get("content_filter_results")
    if isinstance(results, dict) and any(
        isinstance(verdict, dict) and verdict.get("filtered") is True
        for verdict in results.values()
    ):
        return True
    error = item.get("error")
    return isinstance(error, dict) and short_identifier(error.get("code")) in (
        _CONTENT_POLICY_CODES
    )


def _has_image(item: Mapping[str, Any]) -> bool:
    return bool(item.get("b64_json")) or bool(item.get("url"))


async def _server_sent_events(
    resp: aiohttp.ClientResponse, unreadable: Callable[[str], UpstreamError]
) -> AsyncGenerator[dict[str, Any]]:
    """The JSON ``data`` of each server-sent event. Lines are found chunk by chunk, never by
    readline: one event carries a whole base64 image, far past aiohttp's line limit."""
    pending: list[bytes] = []
    pending_size = 0
    data: list[bytes] = []
    async for chunk in resp.content.iter_any():
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                pending.append(chunk[start:])
                pending_size += len(chunk) - start
                if pending_size > MAX_ANSWER_BYTES:
                    raise unreadable("a stream event is too large")
                break
            line = (b"".join(pending) + chunk[start:end]).rstrip(b"\r")
            pending, pending_size, start = [], 0, end + 1
            if line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
            elif not line and data:
                event = _event_json(b"\n".join(data), unreadable)
                data = []
                if event is None:
                    return
                yield event
    if data:
        event = _event_json(b"\n".join(data), unreadable)
        if event is not None:
            yield event


def _event_json(raw: bytes, unreadable: Callable[[str], UpstreamError]) -> dict[str, Any] | None:
    """One event's data as an object; None for the ``[DONE]`` that some servers send last."""
    if raw.strip() == b"[DONE]":
        return None
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise unreadable("a stream event is not JSON") from None
    if not isinstance(event, dict):
        raise unreadable("a stream event is not an object")
    return event


def _usage(raw: Any) -> TokenUsage:
    if not isinstance(raw, dict):
        return TokenUsage()

    def count(*keys: str) -> int:
        # gpt-image reports input/output tokens; other servers reuse the chat names.
        for key in keys:
            value = raw.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return 0

    details = raw.get("input_tokens_details")
    split = details if isinstance(details, dict) else {}

    def detail(key: str) -> int:
        value = split.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return TokenUsage(
        input_tokens=count("input_tokens", "prompt_tokens"),
        output_tokens=count("output_tokens", "completion_tokens"),
        input_text_tokens=detail("text_tokens"),
        input_image_tokens=detail("image_tokens"),
    )


OPENAI_BASE_URL = "https://api.openai.com/v1"


def from_config(config: ProviderConfig, credential: str | None) -> OpenAICompatibleProvider:
    return OpenAICompatibleProvider(
        config.name,
        base_url=config.base_url or OPENAI_BASE_URL,
        api_key=credential,
        timeout_seconds=config.timeout_seconds,
        max_connections=config.max_connections,
    )


def azure_from_config(config: ProviderConfig, credential: str | None) -> AzureOpenAIProvider:
    """Options: ``deployment``, ``deployment_model``, ``api_version`` (see the class)."""

    def option(key: str) -> str:
        value = config.options.get(key, "")
        if not isinstance(value, str):
            raise ValueError(f"providers.{config.name}.{key} must be a string")
        return value

    return AzureOpenAIProvider(
        config.name,
        base_url=config.base_url,
        api_key=credential,
        deployment=option("deployment"),
        deployment_model=option("deployment_model"),
        api_version=option("api_version"),
        timeout_seconds=config.timeout_seconds,
        max_connections=config.max_connections,
    )
