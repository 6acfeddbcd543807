"""The model catalog: which public models exist, what each accepts, and what it costs.

Loaded from the ``[models.*]`` tables of the configuration file. Validation of a request
against a model's capabilities happens here, before any money moves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from imagegen_service import errors
from imagegen_service.money import parse_usd

_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")
RESPONSE_FORMATS = ("url", "b64_json")


class CatalogError(ValueError):
    """The configuration's catalog is inconsistent; raised at startup, never per request."""


@dataclass(frozen=True, slots=True)
class Deployment:
    """One place a public model can be served: a configured provider and its model id."""

    provider: str
    upstream_model: str
    # Per-image prices of this deployment when they differ from the model's.
    prices: Mapping[str, int] | None = None


@dataclass(frozen=True, slots=True)
class TokenPrices:
    """Prices for upstreams that bill tokens, in micro-dollars per million tokens."""

    input_per_million: int
    output_per_million: int

    def cost(self, input_tokens: int, output_tokens: int) -> int:
        total = input_tokens * self.input_per_million + output_tokens * self.output_per_million
        # Round up: a fraction of a micro-dollar is still charged as one.
        return -(-total // 1_000_000)


@dataclass(frozen=True, slots=True)
class ImageModel:
    id: str
    # Tried in order: the first is the primary, the others are failovers.
    deployments: tuple[Deployment, ...]
    sizes: tuple[str, ...]
    default_size: str
    qualities: tuple[str, ...]
    default_quality: str
    styles: tuple[str, ...]
    max_images: int
    max_prompt_chars: int
    # Micro-dollars per image, keyed "SIZE/QUALITY", "SIZE", "*/QUALITY" or "default".
    prices: Mapping[str, int]
    owned_by: str = "imagegen"
    created: int = 0
    # When set, a deployment that reports token usage is charged by tokens, never more
    # than the per-image price that was held.
    token_prices: TokenPrices | None = None

    @property
    def provider(self) -> str:
        return self.deployments[0].provider

    def unit_price(self, size: str, quality: str, deployment: Deployment | None = None) -> int:
        prices = self.prices
        if deployment is not None and deployment.prices is not None:
            prices = deployment.prices
        for key in (f"{size}/{quality}", size, f"*/{quality}", "default"):
            if key in prices:
                return prices[key]
        raise CatalogError(f"model {self.id!r} has no price for {size}/{quality}")


@dataclass(frozen=True, slots=True)
class ValidatedRequest:
    model: ImageModel
    prompt: str
    n: int
    size: str
    width: int
    height: int
    quality: str
    style: str | None
    response_format: str
    seed: int | None = None
    user: str = ""


@dataclass(slots=True)
class Catalog:
    models: dict[str, ImageModel] = field(default_factory=dict)
    # Ids the operator knows that cannot make images (chat, embedding, ...).
    non_image_models: frozenset[str] = frozenset()
    # Configured models left out at startup (their provider has no credential): id -> why.
    unavailable: dict[str, str] = field(default_factory=dict)

    def resolve(self, model_id: str) -> ImageModel:
        if not model_id:
            raise errors.InvalidParameter("You must provide a model.", param="model")
        model = self.models.get(model_id)
        if model is not None:
            return model
        if model_id in self.unavailable:
            raise errors.ModelNotFound(self.unavailable[model_id], param="model")
        if model_id in self.non_image_models:
            raise errors.ModelNotSupported(
                f"The model '{model_id}' cannot generate images.", param="model"
            )
        raise errors.ModelNotFound(f"The model '{model_id}' does not exist.", param="model")

    def validate(
        self,
        *,
        model: str,
        prompt: str,
        n: int | None,
        size: str,
        quality: str,
        style: str,
        response_format: str,
        seed: int | None = None,
        user: str = "",
    ) -> ValidatedRequest:
        """Checks every parameter against the model; raises InvalidParameter naming the field."""
        m = self.resolve(model)
        if not prompt or not prompt.strip():
            raise errors.InvalidParameter("The prompt must not be empty.", param="prompt")
        if len(prompt) > m.max_prompt_chars:
            raise errors.InvalidParameter(
                f"The prompt is {len(prompt)} characters long; model '{m.id}' accepts at most "
                f"{m.max_prompt_chars}.",
                param="prompt",
            )
        count = 1 if n is None else n
        if not 1 <= count <= m.max_images:
            raise errors.InvalidParameter(
                f"n must be between 1 and {m.max_images} for model '{m.id}'; got {count}.",
                param="n",
            )
        size = size or m.default_size
        if size not in m.sizes:
            raise errors.InvalidParameter(
                f"Invalid size '{size}' for model '{m.id}'. Supported sizes: {', '.join(m.sizes)}.",
                param="size",
            )
        quality = quality or m.default_quality
        if quality not in m.qualities:
            raise errors.InvalidParameter(
                f"Invalid quality '{quality}' for model '{m.id}'. Supported: "
                f"{', '.join(m.qualities)}.",
                param="quality",
            )
        if style and style not in m.styles:
            supported = ", ".join(m.styles) if m.styles else "none"
            raise errors.InvalidParameter(
                f"Invalid style '{style}' for model '{m.id}'. Supported: {supported}.",
                param="style",
            )
        response_format = response_format or "url"
        if response_format not in RESPONSE_FORMATS:
            raise errors.InvalidParameter(
                f"Invalid response_format '{response_format}'. Supported: url, b64_json.",
                param="response_format",
            )
        if seed is not None and not 0 <= seed < 2**32:
            raise errors.InvalidParameter("seed must be between 0 and 4294967295.", param="seed")
        width, height = parse_size(size)
        return ValidatedRequest(
            model=m,
            prompt=prompt,
            n=count,
            size=size,
            width=width,
            height=height,
            quality=quality,
            style=style or None,
            response_format=response_format,
            seed=seed,
            user=user,
        )


def parse_size(size: str) -> tuple[int, int]:
    match = _SIZE.match(size)
    if not match:
        raise CatalogError(f"size {size!r} is not WIDTHxHEIGHT")
    return int(match.group(1)), int(match.group(2))


def _str_list(raw: Any, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise CatalogError(f"{where} must be a list of strings")
    return tuple(raw)


def _int(raw: Any, where: str, default: int) -> int:
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise CatalogError(f"{where} must be a positive integer")
    return raw


def load_catalog(
    models: Mapping[str, Any], non_image_models: Iterable[str] = (), providers: Iterable[str] = ()
) -> Catalog:
    """Builds the catalog from parsed TOML, checking every model refers to a known provider."""
    known_providers = set(providers)
    catalog = Catalog(non_image_models=frozenset(non_image_models))
    for model_id, raw in models.items():
        where = f"models.{model_id}"
        if not isinstance(raw, dict):
            raise CatalogError(f"{where} must be a table")
        deployments = _deployments(raw, model_id, where, known_providers)
        sizes = _str_list(raw.get("sizes"), f"{where}.sizes")
        for size in sizes:
            parse_size(size)
        qualities = _str_list(raw.get("qualities", ["standard"]), f"{where}.qualities")
        default_size = raw.get("default_size", sizes[0] if sizes else "")
        default_quality = raw.get("default_quality", qualities[0] if qualities else "")
        if default_size not in sizes:
            raise CatalogError(f"{where}.default_size must be one of its sizes")
        if default_quality not in qualities:
            raise CatalogError(f"{where}.default_quality must be one of its qualities")
        model = ImageModel(
            id=model_id,
            deployments=deployments,
            sizes=sizes,
            default_size=default_size,
            qualities=qualities,
            default_quality=default_quality,
            styles=_str_list(raw.get("styles", []), f"{where}.styles"),
            max_images=_int(raw.get("max_images"), f"{where}.max_images", 1),
            max_prompt_chars=_int(raw.get("max_prompt_chars"), f"{where}.max_prompt_chars", 4000),
            prices=_prices(raw.get("price_usd"), f"{where}.price_usd"),
            owned_by=str(raw.get("owned_by", "imagegen")),
            created=int(raw.get("created", 0)),
            token_prices=_token_prices(raw.get("token_price_usd"), f"{where}.token_price_usd"),
        )
        for size in sizes:
            for quality in qualities:
                for deployment in deployments:
                    model.unit_price(size, quality, deployment)
        catalog.models[model_id] = model
    return catalog


def _prices(raw: Any, where: str) -> dict[str, int]:
    if not isinstance(raw, dict) or not raw:
        raise CatalogError(f"{where} must be a table of decimal strings")
    try:
        return {str(k): parse_usd(v) for k, v in raw.items()}
    except ValueError as exc:
        raise CatalogError(f"{where}: {exc}") from None


def _token_prices(raw: Any, where: str) -> TokenPrices | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"input", "output"}:
        raise CatalogError(f"{where} must have exactly 'input' and 'output' (USD per 1M tokens)")
    try:
        return TokenPrices(parse_usd(raw["input"]), parse_usd(raw["output"]))
    except ValueError as exc:
        raise CatalogError(f"{where}: {exc}") from None


def _deployments(
    raw: dict[str, Any], model_id: str, where: str, known_providers: set[str]
) -> tuple[Deployment, ...]:
    """``provider`` + ``upstream_model`` for one deployment, or a ``deployments`` list."""
    if "deployments" in raw:
        if "provider" in raw:
            raise CatalogError(f"{where}: give either provider or deployments, not both")
        entries = raw["deployments"]
        if not isinstance(entries, list) or not entries:
            raise CatalogError(f"{where}.deployments must be a non-empty list of tables")
    else:
        entries = [{"provider": raw.get("provider"), "upstream_model": raw.get("upstream_model")}]
    result = []
    for i, entry in enumerate(entries):
        at = f"{where}.deployments[{i}]" if "deployments" in raw else where
        if not isinstance(entry, dict):
            raise CatalogError(f"{at} must be a table")
        provider = entry.get("provider")
        if not isinstance(provider, str) or provider not in known_providers:
            raise CatalogError(f"{at}.provider must name a [providers.*] table; got {provider!r}")
        upstream = entry.get("upstream_model") or model_id
        prices = entry.get("price_usd")
        result.append(
            Deployment(
                provider=provider,
                upstream_model=str(upstream),
                prices=None if prices is None else _prices(prices, f"{at}.price_usd"),
            )
        )
    return tuple(result)
