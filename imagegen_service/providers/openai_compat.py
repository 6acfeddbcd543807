"""Adapters for OpenAI's Images API (``POST /images/generations``, ``/images/edits``) and its
Azure OpenAI variants.

``OpenAICompatibleProvider`` works with OpenAI itself and with the many servers that copy its
wire format. Answers may carry images as ``b64_json`` or as a ``url`` to download; both are
accepted because several compatible servers ignore ``response_format``.

The request is shaped by the model's family (``families.py``): ``ProviderRequest.family``, the
catalog's, else the family the upstream model id belongs to. The rules below come from the
official SDK, openai-python 3.51.0 (``types/image_model.py``, ``types/image_generate_params.py``,
``types/image_edit_params.py``):

* The GPT image families, all live at OpenAI: ``gpt-image`` (gpt-image-1.5, gpt-image-1-mini,
  chatgpt-image-latest, gpt-image-2.6-*: sizes 1024x1024, 1536x1024, 1024x1536),
  ``gpt-image-2`` (gpt-image-2 and its dated snapshot) and ``gpt-image-2.5``
  (gpt-image-2.5-sunburst / -flare and their snapshots), which take any ``WIDTHxHEIGHT``
  within the family's size rule. They never get ``response_format`` (they always answer
  base64) nor ``style``; ``quality`` is low|medium|high|auto (2.5 adds xhigh|max), so the
  legacy ``standard`` becomes ``medium`` and ``hd`` becomes ``high``; ``output_format`` is
  sent when not png, ``background``, ``output_compression`` and ``moderation`` when given; the
  caller's ``user`` goes out as ``safety_identifier`` (the SDK marks ``user`` deprecated: a
  non-empty ``safety_identifier`` takes precedence over it). Up to 10 images per call, billed
  in tokens read from ``usage``. They stream: ``stream`` + ``partial_images`` answer
  server-sent events (``image_generation.partial_image``, ``image_generation.completed``,
  ``error``), read as they come. Edits take ``image`` (one) or ``image[]`` (several) and
  ``mask`` as multipart.
* Ids that no family claims take the legacy path: ``response_format=b64_json``, ``quality``,
  ``style`` and ``user`` as given, any size. This serves OpenAI-compatible servers. OpenAI
  retired ``dall-e-2`` and ``dall-e-3`` on 2026-05-12 and shut ``gpt-image-1`` down on
  2026-10-23 (the SDK's ``types/image_model.py``); the dall-e rules are kept only for
  compatible servers that still take those ids: dall-e-2 (sizes 256x256, 512x512, 1024x1024;
  no ``quality`` nor ``style``; edits and variations of one square PNG) and dall-e-3 (sizes
  1024x1024, 1792x1024, 1024x1792; one image per call, so n > 1 is served by n concurrent
  calls under the one deadline, merged; a call refused on content policy counts as filtered).
  Variations (``POST /images/variations``) are retired at OpenAI too (the SDK's
  ``resources/images.py``) and kept for such servers.

An upstream that answers that the model does not exist, was deprecated or shut down (HTTP 404
``model_not_found``, or a 400 ``invalid_request_error`` whose message says so; Azure's 404
``DeploymentNotFound``) raises ``UpstreamModelUnavailable``: repeating the call on this
deployment cannot help. ``list_models`` reads ``GET {base_url}/models``.

``AzureOpenAIProvider`` is the same adapter with Azure's addressing, in one of two APIs
(option ``api``): ``deployments`` (the default) posts to
``{resource}/openai/deployments/{deployment}/images/...?api-version=...`` and names no model
in the body; ``v1`` posts to ``{resource}/openai/v1/images/...`` with no api-version and the
deployment name as the body's ``model``. Either authenticates with the resource key in an
``api-key`` header or with a Microsoft Entra ID access token read from ``token_file`` and
sent as ``Authorization: Bearer`` (the SDK's ``lib/azure.py``: the two are exclusive).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import os
import re
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlencode

import aiohttp
import orjson

from imagegen_service.config import ProviderConfig
from imagegen_service.errors import ContentPolicy, InvalidParameter, UpstreamError
from imagegen_service.families import FAMILIES, Family, family_of
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
    "AZURE_APIS",
    "AzureOpenAIProvider",
    "OpenAICompatibleProvider",
    "azure_from_config",
    "from_config",
    "gpt_image_family",
    "legacy_model",
]

_CONTENT_POLICY_MESSAGE = "The prompt was refused by the provider's content policy."
# dall-e answered `content_policy_violation`; gpt-image answers `moderation_blocked`; Azure
# adds its content filter's `contentFilter` / `content_filter` and names
# `ResponsibleAIPolicyViolation` in its inner error. The type `image_generation_user_error`
# is NOT a refusal by itself: OpenAI gives it to every error the caller can correct (a bad
# mask, an image format it cannot read), which are the caller's 400 `invalid_value`.
_CONTENT_POLICY_CODES = frozenset(
    {"content_policy_violation", "moderation_blocked", "contentFilter", "content_filter"}
)
_CONTENT_POLICY_INNER_CODES = frozenset({"ResponsibleAIPolicyViolation"})
_MAX_UPSTREAM_MESSAGE = 300

# An upstream's word that the model is gone: OpenAI's 404 `model_not_found` (also used for
# deprecated models), Azure's 404 `DeploymentNotFound` for a deployment that does not exist.
_MODEL_GONE_CODES = frozenset({"model_not_found", "DeploymentNotFound"})
_MODEL_GONE_WORDS = (
    r"(?:does not exist|(?:has been|was|is) (?:deprecated|retired|shut ?down|decommissioned)"
    r"|is no longer (?:available|supported|accessible))"
)

# The legacy models, for compatible servers that still take their ids.
DALL_E_2 = "dall-e-2"
DALL_E_3 = "dall-e-3"
_LEGACY_SIZES: Mapping[str, tuple[str, ...]] = {
    DALL_E_2: ("256x256", "512x512", "1024x1024"),
    DALL_E_3: ("1024x1024", "1792x1024", "1024x1792"),
}
_LEGACY_IMAGES_PER_CALL: Mapping[str, int] = {DALL_E_2: 10, DALL_E_3: 1}
# types/image_generate_params.py: "n: Must be between 1 and 10."
_GPT_IMAGES_PER_CALL = 10
# Our catalog may speak dall-e's quality names; types/image_generate_params.py lists
# "standard" and "hd" as deprecated values "only supported by retired DALL·E models".
_GPT_IMAGE_QUALITY: Mapping[str, str] = {"standard": "medium", "hd": "high"}


def gpt_image_family(family: str, *model_ids: str) -> Family | None:
    """The GPT image family whose rules shape the payload: the one ``family`` names (the
    catalog's), else the one the first of ``model_ids`` that belongs to a family belongs to.
    None when that family is not OpenAI's (the legacy path)."""
    found = FAMILIES.get(family) if family else None
    if found is None:
        for model in model_ids:
            found = family_of(model) if model else None
            if found is not None:
                break
    return found if found is not None and "openai" in found.provider_types else None


def legacy_model(*model_ids: str) -> str | None:
    """``dall-e-2`` or ``dall-e-3`` for the first of ``model_ids`` that is one, else None."""
    for model in model_ids:
        lowered = model.strip().lower()
        for legacy in (DALL_E_2, DALL_E_3):
            if lowered.startswith(legacy):
                return legacy
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class _Rules:
    """What shapes one request: a GPT image family, else perhaps a legacy dall-e model."""

    family: Family | None = None
    legacy: str | None = None

    @property
    def per_call(self) -> int | None:
        if self.family is not None:
            return _GPT_IMAGES_PER_CALL
        return _LEGACY_IMAGES_PER_CALL.get(self.legacy or "")

    @property
    def streams(self) -> bool:
        return self.family is not None


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
    # The field that carries the caller's end-user id on the GPT image families
    # (types/image_generate_params.py: `user` is deprecated, `safety_identifier` wins).
    _user_field = "safety_identifier"

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
        """Refuses sizes (and qualities) an OpenAI model can never take; other upstreams take
        the catalog's as they are."""
        rules = self._rules(request)
        family = rules.family
        if family is not None:
            problem = _size_problem(family, request.width, request.height)
            if problem is not None:
                raise InvalidParameter(
                    f"The size {request.size} is not supported by {family.name}: {problem}.",
                    param="size",
                )
            quality = _GPT_IMAGE_QUALITY.get(request.quality, request.quality)
            if quality and quality not in family.qualities:
                raise InvalidParameter(
                    f"The quality {request.quality!r} is not supported by {family.name}; "
                    f"supported qualities are {', '.join(family.qualities)}.",
                    param="quality",
                )
        elif rules.legacy is not None:
            supported = _LEGACY_SIZES[rules.legacy]
            if request.size not in supported:
                raise InvalidParameter(
                    f"The size {request.size} is not supported by {rules.legacy}; "
                    f"supported sizes are {', '.join(supported)}.",
                    param="size",
                )

    async def generate(self, request: ProviderRequest) -> ProviderResult:
        rules = self._rules(request)
        batches = _batches(request.n, rules.per_call or request.n)

        async def call(session: aiohttp.ClientSession) -> ProviderResult:
            if len(batches) == 1:
                return await self._generate_once(session, request, rules)
            return await self._fan_out(session, request, rules, batches)

        return await self.within_deadline(call)

    async def edit(self, request: ProviderRequest) -> ProviderResult:
        rules = self._rules(request)

        async def call(session: aiohttp.ClientSession) -> ProviderResult:
            return await self._submit(
                session, self._url(request, "edits"), request, form=self._edit_form(request, rules)
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
        rules = self._rules(request)
        if not rules.streams:
            # Only the GPT image families stream: the others answer once, with every image.
            result = await self.generate(request)
            for image in result.images:
                yield image
            yield result.usage
            return
        payload = self._payload(request, rules)
        payload.update(stream=True, partial_images=request.partial_images)
        async with contextlib.aclosing(
            self._stream(self._url(request), request, body=orjson.dumps(payload))
        ) as events:
            async for event in events:
                yield event

    async def edit_stream(self, request: ProviderRequest) -> AsyncGenerator[StreamEvent]:
        rules = self._rules(request)
        if not rules.streams:
            result = await self.edit(request)
            for image in result.images:
                yield image
            yield result.usage
            return
        form = self._edit_form(request, rules)
        form.add_field("stream", "true")
        form.add_field("partial_images", str(request.partial_images))
        async with contextlib.aclosing(
            self._stream(self._url(request, "edits"), request, form=form)
        ) as events:
            async for event in events:
                yield event

    async def list_models(self) -> frozenset[str] | None:
        """The model ids ``GET {base_url}/models`` lists (OpenAI's list shape, the SDK's
        ``resources/models.py``), less those whose ``shutdown_date`` has passed."""
        return await self._list_models(f"{self._base_url}/models")

    # -- what differs between OpenAI and Azure ------------------------------------------------

    def _rules(self, request: ProviderRequest) -> _Rules:
        family = gpt_image_family(request.family, request.upstream_model)
        if family is not None:
            return _Rules(family=family)
        return _Rules(legacy=legacy_model(request.upstream_model))

    def _url(self, request: ProviderRequest, operation: str = "generations") -> str:
        """``operation``: ``generations``, ``edits`` or ``variations``."""
        return f"{self._base_url}/images/{operation}"

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def _body_model(self, request: ProviderRequest) -> str | None:
        """The body's ``model`` (None: not sent, as on Azure's deployment routes)."""
        return request.upstream_model

    def _is_upstream_fault(self, code: str, message: str) -> bool:
        """A 400 caused by our own configuration rather than by the caller's request."""
        return False

    def _secrets(self) -> list[str]:
        """What must never appear in an error: the key (and Azure's token)."""
        return [self._api_key] if self._api_key else []

    # -- one call ----------------------------------------------------------------------------

    async def _generate_once(
        self, session: aiohttp.ClientSession, request: ProviderRequest, rules: _Rules
    ) -> ProviderResult:
        async with session.post(
            self._url(request),
            data=orjson.dumps(self._payload(request, rules)),
            headers=self._headers(request),
        ) as resp:
            if not 200 <= resp.status < 300:
                body = await read_capped(resp, MAX_ERROR_BODY_BYTES, truncate=True)
                self._raise_for_status(resp.status, resp.headers, body, request)
            answer = await self.read_json(resp)
        return await self._read_result(session, answer, request.n)

    async def _fan_out(
        self,
        session: aiohttp.ClientSession,
        request: ProviderRequest,
        rules: _Rules,
        batches: Sequence[int],
    ) -> ProviderResult:
        async def one(n: int) -> ProviderResult | None:
            try:
                return await self._generate_once(session, dataclasses.replace(request, n=n), rules)
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

    def _payload(self, request: ProviderRequest, rules: _Rules) -> dict[str, Any]:
        payload: dict[str, Any] = {}
        model = self._body_model(request)
        if model is not None:
            payload["model"] = model
        payload.update(prompt=request.prompt, n=request.n, size=request.size)
        if rules.family is not None:
            # GPT image models always answer base64 and reject `response_format` and `style`
            # (types/image_generate_params.py: "Unsupported for GPT image models").
            payload.update(self._gpt_image_fields(request))
            return payload
        payload["response_format"] = "b64_json"
        # Optional fields are left out rather than sent empty: several compatible servers
        # reject values they do not know, and dall-e-2 rejects quality and style at all.
        if rules.legacy != DALL_E_2:
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
        if request.user:
            fields[self._user_field] = request.user
        return fields

    def _edit_form(self, request: ProviderRequest, rules: _Rules) -> aiohttp.FormData:
        form = aiohttp.FormData()
        model = self._body_model(request)
        if model is not None:
            form.add_field("model", model)
        form.add_field("prompt", request.prompt)
        form.add_field("n", str(request.n))
        form.add_field("size", request.size)
        # One image is `image`; several are the array form, `image[]` (the SDK's multipart
        # encoding of a list, resources/images.py with _utils.extract_files' "brackets").
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
        if rules.family is not None:
            for key, value in self._gpt_image_fields(request).items():
                form.add_field(key, str(value))
        else:
            form.add_field("response_format", "b64_json")
            if request.user:
                form.add_field("user", request.user)
        return form

    def _variation_form(self, request: ProviderRequest) -> aiohttp.FormData:
        form = aiohttp.FormData()
        model = self._body_model(request)
        if model is not None:
            form.add_field("model", model)
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
                self._raise_for_status(resp.status, resp.headers, body, request)
            answer = await self.read_json(resp)
        return await self._read_result(session, answer, request.n)

    async def _list_models(self, url: str) -> frozenset[str]:
        headers = {"Accept": "application/json", **self._auth_headers()}

        async def call(session: aiohttp.ClientSession) -> frozenset[str]:
            async with session.get(url, headers=headers) as resp:
                if not 200 <= resp.status < 300:
                    body = await read_capped(resp, MAX_ERROR_BODY_BYTES, truncate=True)
                    error = _error_object(body)
                    code = short_identifier(error.get("code")) or short_identifier(
                        error.get("type")
                    )
                    raise self.status_error(resp.status, resp.headers, self._scrub(code))
                answer = await self.read_json(resp)
            return self._model_ids(answer)

        return await self.within_deadline(call)

    def _model_ids(self, answer: Mapping[str, Any]) -> frozenset[str]:
        items = answer.get("data")
        if not isinstance(items, list):
            raise self.unreadable("the model list has no data")
        now = time.time()
        ids: set[str] = set()
        for item in items:
            if not isinstance(item, dict):
                raise self.unreadable("a model list item is not an object")
            model_id = item.get("id")
            if isinstance(model_id, str) and model_id and not _past(_retirement(item), now):
                ids.add(model_id)
        return frozenset(ids)

    async def _stream(
        self,
        url: str,
        request: ProviderRequest,
        *,
        body: bytes | None = None,
        form: aiohttp.FormData | None = None,
    ) -> AsyncGenerator[StreamEvent]:
        """A GPT image call answered with server-sent events: partial renders and images as
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
                    self._raise_for_status(resp.status, resp.headers, error_body, request)
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
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes | None,
        request: ProviderRequest,
    ) -> NoReturn:
        error = _error_object(body)
        code = short_identifier(error.get("code"))
        kind = short_identifier(error.get("type"))
        raw_message = error.get("message")
        message = raw_message if isinstance(raw_message, str) else ""

        if status in (400, 403, 422) and _is_content_policy(error):
            raise ContentPolicy(_CONTENT_POLICY_MESSAGE)
        if _model_gone(status, code, kind, message, error.get("param"), request.upstream_model):
            raise self.model_unavailable(request.upstream_model, status)
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
        for secret in self._secrets():
            text = text.replace(secret, "***")
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
# gpt-image deployments are served only by preview API versions on the deployment routes.
AZURE_GPT_IMAGE_API_VERSION = "2025-04-01-preview"
# The two Azure APIs: `deployments` (dated api-version, deployment in the path) and `v1`.
AZURE_APIS = ("deployments", "v1")


class _TokenFile:
    """A Microsoft Entra ID access token kept in a file that something else refreshes (a
    sidecar, a mounted secret): read again whenever the file changes."""

    def __init__(self, provider: str, path: str) -> None:
        self._provider = provider
        self._path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""

    @property
    def current(self) -> str:
        """The last token read, or "" (for scrubbing error texts)."""
        return self._token

    def token(self) -> str:
        try:
            # stat follows symlinks, so a Kubernetes volume's atomic swap is seen too.
            info = os.stat(self._path)
            stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
            if stamp != self._stamp:
                self._token = self._path.read_text(encoding="utf-8").strip()
                self._stamp = stamp
        except (OSError, UnicodeDecodeError) as exc:
            # Neither the path nor the cause's text reaches the caller; the cause is chained
            # for our logs.
            raise UpstreamError(
                f"upstream {self._provider!r}: the Entra ID token file cannot be read "
                f"({type(exc).__name__})"
            ) from exc
        if not self._token:
            raise UpstreamError(f"upstream {self._provider!r}: the Entra ID token file is empty")
        return self._token


class AzureOpenAIProvider(OpenAICompatibleProvider):
    """Azure OpenAI, over one of its two APIs (``api``):

    * ``deployments``: ``POST {resource}/openai/deployments/{deployment}/images/generations
      ?api-version=...``, no ``model`` in the body (the deployment decides). Without
      ``api_version`` a GPT image deployment gets the preview version that serves it, any
      other the GA version.
    * ``v1``: ``POST {resource}/openai/v1/images/generations`` with no api-version and the
      deployment name as the body's ``model``; ``list_models`` reads
      ``GET {resource}/openai/v1/models``.

    The deployment is ``deployment`` when configured, else the request's upstream model id, so
    one provider can serve several deployments named after their models. The model rules
    follow the request's family when the catalog names one, else ``deployment_model`` (the
    model the deployment runs) when configured, else the upstream model id, else the
    deployment name.

    Authentication: the resource key in an ``api-key`` header, or (``token_file``) a Microsoft
    Entra ID access token as ``Authorization: Bearer``, never both (as the SDK's
    ``lib/azure.py``, whose AzureOpenAI sends exactly these two headers)."""

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
        api: str = "deployments",
        token_file: str = "",
        timeout_seconds: float = 120.0,
        max_connections: int = 64,
    ) -> None:
        endpoint = base_url.strip().rstrip("/")
        # The portal shows the resource endpoint; a copied ".../openai" or ".../openai/v1"
        # would double the path.
        endpoint = endpoint.removesuffix("/openai/v1").removesuffix("/openai")
        if not endpoint:
            raise ValueError(
                f"providers.{name}: base_url is required for type 'azure-openai' "
                "(the resource endpoint, e.g. https://myresource.openai.azure.com)"
            )
        api = api.strip() or "deployments"
        if api not in AZURE_APIS:
            raise ValueError(
                f"providers.{name}.api must be one of {', '.join(AZURE_APIS)}, not {api!r}"
            )
        if api == "v1" and api_version.strip():
            raise ValueError(f"providers.{name}: api_version does not apply to api = 'v1'")
        if api_key and token_file.strip():
            raise ValueError(
                f"providers.{name}: an API key and token_file are mutually exclusive; "
                "configure one of them"
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
        self._v1 = api == "v1"
        self._token_file = _TokenFile(name, token_file.strip()) if token_file.strip() else None
        # The dated API versions document `user`; `safety_identifier` is sent where the
        # request names the model as OpenAI's API does (v1).
        self._user_field = "safety_identifier" if self._v1 else "user"

    async def list_models(self) -> frozenset[str] | None:
        """The v1 API's ``GET {resource}/openai/v1/models`` ids (the resource's models, less
        those whose ``deprecation.inference`` date has passed); None on the deployment routes,
        which list no deployments on the data plane."""
        if not self._v1:
            return None
        return await self._list_models(f"{self._base_url}/openai/v1/models")

    def _deployment_for(self, request: ProviderRequest) -> str:
        return self._deployment or request.upstream_model

    def _rules(self, request: ProviderRequest) -> _Rules:
        models = [self._deployment_model] if self._deployment_model else []
        models += [request.upstream_model, self._deployment_for(request)]
        family = gpt_image_family(request.family, *models)
        if family is not None:
            return _Rules(family=family)
        return _Rules(legacy=legacy_model(*models))

    def _url(self, request: ProviderRequest, operation: str = "generations") -> str:
        if self._v1:
            return f"{self._base_url}/openai/v1/images/{operation}"
        version = self._api_version or (
            AZURE_GPT_IMAGE_API_VERSION
            if self._rules(request).family is not None
            else AZURE_API_VERSION
        )
        deployment = quote(self._deployment_for(request), safe="")
        return f"{self._base_url}/openai/deployments/{deployment}/images/{operation}?" + urlencode(
            {"api-version": version}
        )

    def _auth_headers(self) -> dict[str, str]:
        if self._token_file is not None:
            return {"Authorization": f"Bearer {self._token_file.token()}"}
        return {"api-key": self._api_key} if self._api_key else {}

    def _body_model(self, request: ProviderRequest) -> str | None:
        # v1: the body names the deployment. The deployment routes name it in the path, and a
        # deployment name is not a model id.
        return self._deployment_for(request) if self._v1 else None

    def _is_upstream_fault(self, code: str, message: str) -> bool:
        # A wrong api_version is our configuration, not the caller's request.
        return code == "BadRequest" and "api version" in message.lower()

    def _secrets(self) -> list[str]:
        secrets = super()._secrets()
        if self._token_file is not None and self._token_file.current:
            secrets.append(self._token_file.current)
        return secrets

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


def _size_problem(family: Family, width: int, height: int) -> str | None:
    """Why the family cannot make ``width x height``; None if it can."""
    if f"{width}x{height}" in family.sizes:
        return None
    if family.size_rule is not None:
        return family.size_rule.problem(width, height)
    return f"supported sizes are {', '.join(family.sizes)}"


def _model_gone(
    status: int, code: str, kind: str, message: str, param: Any, upstream_model: str
) -> bool:
    """Whether an error answer says the model does not exist or was retired: a
    ``model_not_found`` / ``DeploymentNotFound`` code, or a 400/404 invalid request whose
    message says the model (by that word, the ``model`` param or its id) is gone."""
    if status not in (400, 404):
        return False
    if code in _MODEL_GONE_CODES:
        return True
    if kind not in ("", "invalid_request_error") or not message:
        return False
    if param == "model":
        return re.search(_MODEL_GONE_WORDS, message, re.IGNORECASE) is not None
    # The words must be said of the model, not of some parameter.
    subjects = [r"\bmodel\b"] + ([re.escape(upstream_model)] if upstream_model else [])
    pattern = rf"(?:{'|'.join(subjects)})[^\n]{{0,80}}?{_MODEL_GONE_WORDS}"
    return re.search(pattern, message, re.IGNORECASE) is not None


def _retirement(item: Mapping[str, Any]) -> Any:
    """When a listed model stops serving: OpenAI's ``shutdown_date`` (the SDK's
    ``types/model.py``) or Azure's ``deprecation.inference`` (a Unix time)."""
    deprecation = item.get("deprecation")
    if isinstance(deprecation, dict) and deprecation.get("inference") is not None:
        return deprecation.get("inference")
    return item.get("shutdown_date")


def _past(when: Any, now: float) -> bool:
    """Whether ``when`` (an ISO date or time, or Unix seconds) is before ``now``; False when
    absent or unreadable."""
    if isinstance(when, bool):
        return False
    if isinstance(when, int | float):
        return float(when) <= now
    if not isinstance(when, str) or not when.strip():
        return False
    text = when.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError:
        return False
    return moment.timestamp() <= now


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
    """Options (see the class): ``api`` (``deployments``, the default, or ``v1``),
    ``deployment``, ``deployment_model``, ``api_version`` (deployments only) and
    ``token_file`` (a Microsoft Entra ID access token, instead of an API key)."""

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
        api=option("api"),
        token_file=option("token_file"),
        timeout_seconds=config.timeout_seconds,
        max_connections=config.max_connections,
    )
