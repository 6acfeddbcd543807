"""The model catalog: which public models exist, what each accepts, and what it costs.

Loaded from the ``[models.*]`` tables of the configuration file. Validation of a request
against a model's capabilities happens here, before any money moves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from imagegen_service import errors, inputs
from imagegen_service.families import FAMILIES, Family, SizeRule, family_of
from imagegen_service.money import parse_usd
from imagegen_service.providers.base import OPERATIONS, InputImage, Operation

_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")
RESPONSE_FORMATS = ("url", "b64_json")
# The gpt-image parameters a model may declare in ``parameters``; a request that sets one
# its model does not declare is refused. ``partial_images`` also admits ``stream``.
PARAMETERS = ("background", "output_format", "output_compression", "moderation", "partial_images")
BACKGROUNDS = ("transparent", "opaque", "auto")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
MODERATIONS = ("low", "auto")
MAX_PARTIAL_IMAGES = 3
INPUT_FORMATS = ("png", "jpeg", "webp")
_OPERATION_NAMES = {"generate": "generation", "edit": "edits", "variation": "variations"}


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
    """Prices for upstreams that bill tokens, in micro-dollars per million tokens. Text and
    image input tokens are priced apart, as OpenAI bills gpt-image."""

    input_per_million: int
    output_per_million: int
    # Image input tokens (edits); None: priced as text input.
    input_image_per_million: int | None = None

    def cost(self, input_tokens: int, output_tokens: int, input_image_tokens: int = 0) -> int:
        """``input_tokens`` counts every input token; ``input_image_tokens`` says how many of
        them were image tokens, where the upstream reports the split."""
        image_tokens = min(max(input_image_tokens, 0), input_tokens)
        image_rate = (
            self.input_per_million
            if self.input_image_per_million is None
            else self.input_image_per_million
        )
        total = (
            (input_tokens - image_tokens) * self.input_per_million
            + image_tokens * image_rate
            + output_tokens * self.output_per_million
        )
        # Round up: a fraction of a micro-dollar is still charged as one.
        return -(-total // 1_000_000)


# One megapixel as Black Forest Labs bills FLUX.2: 1024 x 1024 pixels (its answers report
# 1920x1080 as "output_mp": 1.98).
MEGAPIXEL = 1024 * 1024


@dataclass(frozen=True, slots=True)
class MegapixelPrices:
    """FLUX.2's price basis: the first started megapixel of the output at ``first``, every
    further started megapixel at ``additional``, and the input images' started megapixels
    (edits) at ``input``. Micro-dollars."""

    first: int
    additional: int
    input: int = 0

    def cost(self, pixels: int, input_pixels: int = 0) -> int:
        started = max(1, -(-pixels // MEGAPIXEL))
        input_started = -(-input_pixels // MEGAPIXEL) if input_pixels > 0 else 0
        return self.first + self.additional * (started - 1) + self.input * input_started


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
    # Micro-dollars per image, keyed "SIZE/QUALITY", "SIZE", "*/QUALITY" or "default";
    # ``operation_prices`` holds the same kind of table per operation (Stability prices an
    # edit apart from a generation), consulted first.
    prices: Mapping[str, int]
    owned_by: str = "imagegen"
    created: int = 0
    # When set, a deployment that reports token usage is charged by tokens, never more
    # than the per-image price that was held.
    token_prices: TokenPrices | None = None
    operation_prices: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    # When set, the per-image price is by megapixel (FLUX.2); keyed like the rate cards:
    # "" (the base), "QUALITY", "OPERATION" or "OPERATION/QUALITY".
    megapixel_prices: Mapping[str, MegapixelPrices] | None = None
    # The family whose rules this model follows (families.py); "" for none.
    family: str = ""
    # Sizes beyond ``sizes`` that the model accepts (gpt-image-2, FLUX.2).
    size_rule: SizeRule | None = None
    # The gpt-image parameters this model takes (a subset of PARAMETERS).
    parameters: frozenset[str] = frozenset()
    operations: tuple[Operation, ...] = ("generate",)
    # Edits and variations: accepted input formats, bytes per file, images per edit.
    input_formats: tuple[str, ...] = INPUT_FORMATS
    max_input_image_bytes: int = 50 * 1024 * 1024
    max_input_images: int = 16

    @property
    def provider(self) -> str:
        return self.deployments[0].provider

    @property
    def echoes_settings(self) -> bool:
        """Whether answers echo background, output_format, quality and size (gpt-image)."""
        return bool(self.parameters & {"background", "output_format"})

    @property
    def default_response_format(self) -> str:
        """gpt-image models answer base64 unless asked otherwise, as OpenAI's do (they have
        no URLs at all); the others answer URLs, as dall-e does."""
        return "b64_json" if self.echoes_settings else "url"

    @property
    def price_basis(self) -> str:
        """How the upstream bills: "megapixel", "token" or "image"."""
        if self.token_prices is not None:
            return "token"
        return "megapixel" if self.megapixel_prices is not None else "image"

    def unit_price(
        self,
        size: str,
        quality: str,
        deployment: Deployment | None = None,
        *,
        operation: Operation = "generate",
        input_pixels: int = 0,
    ) -> int:
        """The most one image of this size and quality costs: its per-image price, or its
        megapixel price (input images of an edit included). Token-priced models hold this
        and capture the tokens reported, never more."""
        if self.megapixel_prices is not None and (deployment is None or deployment.prices is None):
            card = self.megapixel_prices
            for key in (f"{operation}/{quality}", operation, quality, ""):
                if key in card:
                    width, height = parse_size(size)
                    return card[key].cost(width * height, input_pixels)
        prices = self.prices
        if deployment is not None and deployment.prices is not None:
            prices = deployment.prices
        tables = [self.operation_prices[operation]] if operation in self.operation_prices else []
        for table in (*tables, prices):
            for key in (f"{size}/{quality}", size, f"*/{quality}", "default"):
                if key in table:
                    return table[key]
        raise CatalogError(f"model {self.id!r} has no price for {size}/{quality}")

    def accepts_size(self, width: int, height: int) -> bool:
        if f"{width}x{height}" in self.sizes:
            return True
        return self.size_rule is not None and self.size_rule.problem(width, height) is None


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
    operation: Operation = "generate"
    background: str = "auto"
    output_format: str = "png"
    output_compression: int | None = None
    moderation: str | None = None
    stream: bool = False
    partial_images: int = 0
    images: tuple[InputImage, ...] = ()
    mask: InputImage | None = None

    @property
    def echo_background(self) -> str:
        """The background an answer reports: what the images have, never "auto"."""
        return "transparent" if self.background == "transparent" else "opaque"

    @property
    def echo_quality(self) -> str:
        """The quality an answer reports; "auto" is priced and made as "high"."""
        return "high" if self.quality == "auto" else self.quality


@dataclass(frozen=True, slots=True)
class Options:
    """The optional parameters beyond OpenAI's original five; empty / None: not given."""

    background: str = ""
    output_format: str = ""
    output_compression: int | None = None
    moderation: str = ""
    stream: bool = False
    partial_images: int | None = None
    images: tuple[bytes, ...] = ()
    mask: bytes | None = None


@dataclass(slots=True)
class Catalog:
    models: dict[str, ImageModel] = field(default_factory=dict)
    # Ids the operator knows that cannot make images (chat, embedding, ...).
    non_image_models: frozenset[str] = frozenset()
    # Ids their providers retired, each with the model to use instead.
    retired_models: Mapping[str, str] = field(default_factory=dict)
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
        if model_id in self.retired_models:
            instead = self.retired_models[model_id]
            hint = f" Use '{instead}' instead." if instead in self.models else ""
            raise errors.ModelNotFound(
                f"The model '{model_id}' was retired by its provider.{hint}", param="model"
            )
        if model_id in self.non_image_models:
            raise errors.ModelNotSupported(
                f"The model '{errors.excerpt(model_id)}' cannot generate images.", param="model"
            )
        raise errors.ModelNotFound(
            f"The model '{errors.excerpt(model_id)}' does not exist.", param="model"
        )

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
        operation: Operation = "generate",
        options: Options | None = None,
    ) -> ValidatedRequest:
        """Checks every parameter against the model; raises InvalidParameter naming the field."""
        m = self.resolve(model)
        opts = options or Options()
        if operation not in m.operations:
            raise errors.ModelNotSupported(
                f"The model '{m.id}' does not support image {_OPERATION_NAMES[operation]}.",
                param="model",
            )
        if operation == "variation":
            # Variations take no prompt (OpenAI ignores none: there is no such field).
            prompt = ""
        elif not prompt or not prompt.strip():
            raise errors.InvalidParameter("The prompt must not be empty.", param="prompt")
        if len(prompt) > m.max_prompt_chars:
            raise errors.InvalidParameter(
                f"The prompt is {len(prompt)} characters long; model '{m.id}' accepts at most "
                f"{m.max_prompt_chars}.",
                param="prompt",
            )
        count = 1 if n is None else n
        size_given = bool(size)
        if not 1 <= count <= m.max_images:
            raise errors.InvalidParameter(
                f"n must be between 1 and {m.max_images} for model '{m.id}'; got {count}.",
                param="n",
            )
        size = size or m.default_size
        _check_size(m, size)
        quality = quality or m.default_quality
        if quality not in m.qualities:
            raise errors.InvalidParameter(
                f"Invalid quality '{errors.excerpt(quality)}' for model '{m.id}'. Supported: "
                f"{', '.join(m.qualities)}.",
                param="quality",
            )
        if style and style not in m.styles:
            supported = ", ".join(m.styles) if m.styles else "none"
            raise errors.InvalidParameter(
                f"Invalid style '{errors.excerpt(style)}' for model '{m.id}'. "
                f"Supported: {supported}.",
                param="style",
            )
        response_format = response_format or (
            "b64_json" if opts.stream else m.default_response_format
        )
        if response_format not in RESPONSE_FORMATS:
            raise errors.InvalidParameter(
                f"Invalid response_format '{errors.excerpt(response_format)}'. "
                "Supported: url, b64_json.",
                param="response_format",
            )
        if seed is not None and not 0 <= seed < 2**32:
            raise errors.InvalidParameter("seed must be between 0 and 4294967295.", param="seed")
        gpt = _gpt_image_options(m, opts, response_format)
        images, mask = _input_images(m, operation, opts)
        if not size_given and images and f"{images[0].width}x{images[0].height}" in m.sizes:
            size = f"{images[0].width}x{images[0].height}"
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
            operation=operation,
            images=images,
            mask=mask,
            **gpt,
        )


def _gpt_image_options(m: ImageModel, opts: Options, response_format: str) -> dict[str, Any]:
    """The gpt-image parameters, each refused by a model that does not declare it."""
    given: dict[str, object] = {
        "background": opts.background or None,
        "output_format": opts.output_format or None,
        "output_compression": opts.output_compression,
        "moderation": opts.moderation or None,
        "partial_images": opts.partial_images,
    }
    for name, value in given.items():
        if value is not None and name not in m.parameters:
            raise errors.InvalidParameter(
                f"The model '{m.id}' does not support the '{name}' parameter.", param=name
            )
    if opts.stream and "partial_images" not in m.parameters:
        raise errors.InvalidParameter(
            f"The model '{m.id}' does not support streaming.", param="stream"
        )
    background = opts.background or "auto"
    _one_of(background, BACKGROUNDS, "background")
    output_format = opts.output_format or "png"
    _one_of(output_format, OUTPUT_FORMATS, "output_format")
    _one_of(opts.moderation or "auto", MODERATIONS, "moderation")
    if opts.output_compression is not None:
        if not 0 <= opts.output_compression <= 100:
            raise errors.InvalidParameter(
                "output_compression must be between 0 and 100.", param="output_compression"
            )
        if output_format == "png":
            raise errors.InvalidParameter(
                "output_compression applies only to the jpeg and webp output formats.",
                param="output_compression",
            )
    if background == "transparent" and output_format == "jpeg":
        raise errors.InvalidParameter(
            "A transparent background needs output_format png or webp.", param="background"
        )
    partial_images = 0 if opts.partial_images is None else opts.partial_images
    if not 0 <= partial_images <= MAX_PARTIAL_IMAGES:
        raise errors.InvalidParameter(
            f"partial_images must be between 0 and {MAX_PARTIAL_IMAGES}.", param="partial_images"
        )
    if opts.stream and response_format == "url":
        raise errors.InvalidParameter(
            "A streamed answer carries the images as base64: response_format must be "
            "b64_json or left out.",
            param="response_format",
        )
    return {
        "background": background,
        "output_format": output_format,
        "output_compression": opts.output_compression,
        "moderation": opts.moderation or None,
        "stream": opts.stream,
        "partial_images": partial_images if opts.stream else 0,
    }


def _one_of(value: str, allowed: tuple[str, ...], param: str) -> None:
    if value not in allowed:
        raise errors.InvalidParameter(
            f"Invalid {param} '{errors.excerpt(value)}'. Supported: {', '.join(allowed)}.",
            param=param,
        )


def _input_images(
    m: ImageModel, operation: Operation, opts: Options
) -> tuple[tuple[InputImage, ...], InputImage | None]:
    """Edits: 1 … max_input_images images and an optional mask; variations: one image."""
    if operation == "generate":
        return (), None
    limit = 1 if operation == "variation" else m.max_input_images
    if not opts.images:
        raise errors.InvalidParameter("You must provide an image.", param="image")
    if len(opts.images) > limit:
        raise errors.InvalidParameter(
            f"The model '{m.id}' takes at most {limit} input image(s); got {len(opts.images)}.",
            param="image",
        )
    images = []
    for data in opts.images:
        if len(data) > m.max_input_image_bytes:
            raise errors.InvalidParameter(
                f"Each image must be at most {m.max_input_image_bytes} bytes for model "
                f"'{m.id}'; got {len(data)}.",
                param="image",
            )
        image = inputs.inspect(data, param="image")
        if image.format not in m.input_formats:
            raise errors.InvalidParameter(
                f"The model '{m.id}' accepts {', '.join(m.input_formats)} images; got "
                f"{image.format}.",
                param="image",
            )
        images.append(image)
    if opts.mask is None:
        return tuple(images), None
    if operation != "edit":
        raise errors.InvalidParameter("Only edits take a mask.", param="mask")
    if len(opts.mask) > m.max_input_image_bytes:
        raise errors.InvalidParameter(
            f"The mask must be at most {m.max_input_image_bytes} bytes.", param="mask"
        )
    mask = inputs.inspect(opts.mask, param="mask", what="mask")
    if mask.format != "png" or not mask.has_alpha:
        raise errors.InvalidParameter("The mask must be a PNG with an alpha channel.", param="mask")
    first = images[0]
    if (mask.width, mask.height) != (first.width, first.height):
        raise errors.InvalidParameter(
            f"The mask is {mask.width}x{mask.height} but the image is "
            f"{first.width}x{first.height}; they must be the same size.",
            param="mask",
        )
    return tuple(images), mask


def _check_size(m: ImageModel, size: str) -> None:
    match = _SIZE.match(size)
    if match and m.accepts_size(int(match.group(1)), int(match.group(2))):
        return
    supported = ", ".join(m.sizes)
    if m.size_rule is None:
        raise errors.InvalidParameter(
            f"Invalid size '{errors.excerpt(size)}' for model '{m.id}'. Supported sizes: "
            f"{supported}.",
            param="size",
        )
    why = m.size_rule.problem(int(match.group(1)), int(match.group(2))) if match else None
    raise errors.InvalidParameter(
        f"Invalid size '{errors.excerpt(size)}' for model '{m.id}'"
        + (f": {why}" if why else "")
        + f". It takes {m.size_rule.describe()} (for example {supported}).",
        param="size",
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
    models: Mapping[str, Any],
    non_image_models: Iterable[str] = (),
    providers: Iterable[str] = (),
    retired_models: Mapping[str, str] | None = None,
    provider_types: Mapping[str, str] | None = None,
) -> Catalog:
    """Builds the catalog from parsed TOML, checking every model refers to a known provider.
    A model of a known family (named by ``family``, or by its upstream id's prefix) takes
    the family's rules for every key its table leaves out."""
    known_providers = set(providers)
    retired = dict(retired_models or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in retired.items()):
        raise CatalogError("catalog.retired_models must map model ids to model ids")
    catalog = Catalog(non_image_models=frozenset(non_image_models), retired_models=retired)
    for model_id, table in models.items():
        where = f"models.{model_id}"
        if not isinstance(table, dict):
            raise CatalogError(f"{where} must be a table")
        deployments = _deployments(table, model_id, where, known_providers)
        family = _family(table, deployments, where, provider_types or {})
        raw: dict[str, Any] = {**family.defaults(), **table} if family else table
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
        megapixel_prices = _megapixel_prices(
            raw.get("megapixel_price_usd"), f"{where}.megapixel_price_usd"
        )
        prices: dict[str, int] = {}
        operation_prices: dict[str, dict[str, int]] = {}
        if megapixel_prices is None or "price_usd" in raw:
            prices, operation_prices = _price_card(raw.get("price_usd"), f"{where}.price_usd")
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
            prices=prices,
            operation_prices=operation_prices,
            megapixel_prices=megapixel_prices,
            family=family.name if family else "",
            size_rule=family.size_rule if family else None,
            owned_by=str(raw.get("owned_by", "imagegen")),
            created=int(raw.get("created", 0)),
            token_prices=_token_prices(raw.get("token_price_usd"), f"{where}.token_price_usd"),
            parameters=frozenset(
                _subset(raw.get("parameters", []), PARAMETERS, f"{where}.parameters")
            ),
            operations=_operations(raw.get("operations", ["generate"]), f"{where}.operations"),
            input_formats=_subset(
                raw.get("input_formats", list(INPUT_FORMATS)),
                INPUT_FORMATS,
                f"{where}.input_formats",
            ),
            max_input_image_bytes=_int(
                raw.get("max_input_image_bytes"), f"{where}.max_input_image_bytes", 50 * 1024 * 1024
            ),
            max_input_images=_int(raw.get("max_input_images"), f"{where}.max_input_images", 16),
        )
        for operation in model.operations:
            for size in sizes:
                for quality in qualities:
                    for deployment in deployments:
                        model.unit_price(size, quality, deployment, operation=operation)
        catalog.models[model_id] = model
    return catalog


def _family(
    raw: dict[str, Any],
    deployments: tuple[Deployment, ...],
    where: str,
    provider_types: Mapping[str, str],
) -> Family | None:
    """The family named by ``family`` (``""`` for none), else the one the first
    deployment's upstream id belongs to, if its provider speaks that family."""
    provider_type = provider_types.get(deployments[0].provider)
    if "family" in raw:
        name = raw["family"]
        if name == "":
            return None
        family = FAMILIES.get(name) if isinstance(name, str) else None
        if family is None:
            raise CatalogError(
                f"{where}.family: unknown {name!r}; known: {', '.join(sorted(FAMILIES))}"
            )
        if provider_type is not None and provider_type not in family.provider_types:
            raise CatalogError(
                f"{where}.family: {family.name} is served by provider types "
                f"{', '.join(sorted(family.provider_types))}, not {provider_type!r}"
            )
        return family
    family = family_of(deployments[0].upstream_model)
    if family is None or provider_type not in family.provider_types:
        return None
    return family


def _subset(raw: Any, allowed: tuple[str, ...], where: str) -> tuple[str, ...]:
    values = _str_list(raw, where)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise CatalogError(f"{where}: unknown {', '.join(unknown)}; known: {', '.join(allowed)}")
    return values


def _operations(raw: Any, where: str) -> tuple[Operation, ...]:
    values = _subset(raw, OPERATIONS, where)
    if not values:
        raise CatalogError(f"{where} must name at least one operation")
    return tuple(op for op in OPERATIONS if op in values)


def _price_card(raw: Any, where: str) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """``price_usd``: per-image prices, with optional per-operation tables inside
    (``edit = { default = "0.04" }``)."""
    if not isinstance(raw, dict) or not raw:
        raise CatalogError(f"{where} must be a table of decimal strings")
    flat = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    per_operation = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            if key not in OPERATIONS:
                raise CatalogError(
                    f"{where}.{key}: a table inside price_usd names an operation "
                    f"({', '.join(OPERATIONS)})"
                )
            per_operation[key] = _prices(value, f"{where}.{key}")
    return (_prices(flat, where) if flat else {}), per_operation


def _megapixel_prices(raw: Any, where: str) -> dict[str, MegapixelPrices] | None:
    """``megapixel_price_usd = { first, additional, input }``, with optional tables inside
    per quality, per operation, or per operation then quality."""
    if raw is None:
        return None
    card: dict[str, MegapixelPrices] = {}

    def read(table: Any, at: str, key: str, inherited: dict[str, Any]) -> None:
        if not isinstance(table, dict):
            raise CatalogError(f"{at} must be a table")
        fields = {**inherited, **{k: v for k, v in table.items() if not isinstance(v, dict)}}
        unknown = set(fields) - {"first", "additional", "input"}
        if unknown:
            raise CatalogError(f"{at}: unknown {', '.join(sorted(unknown))}")
        if "first" not in fields or "additional" not in fields:
            raise CatalogError(f"{at} needs 'first' and 'additional' (USD per megapixel)")
        try:
            card[key] = MegapixelPrices(
                parse_usd(fields["first"]),
                parse_usd(fields["additional"]),
                parse_usd(fields.get("input", "0")),
            )
        except ValueError as exc:
            raise CatalogError(f"{at}: {exc}") from None
        for name, inner in table.items():
            if isinstance(inner, dict):
                read(inner, f"{at}.{name}", f"{key}/{name}" if key else name, fields)

    read(raw, where, "", {})
    return card


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
    if (
        not isinstance(raw, dict)
        or not {"input", "output"} <= set(raw)
        or not set(raw) <= {"input", "input_image", "output"}
    ):
        raise CatalogError(
            f"{where} must have 'input' and 'output', and may have 'input_image' "
            "(USD per 1M tokens)"
        )
    try:
        image = raw.get("input_image")
        return TokenPrices(
            parse_usd(raw["input"]),
            parse_usd(raw["output"]),
            None if image is None else parse_usd(image),
        )
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
