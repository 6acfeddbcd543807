"""Model families: the rules a provider's models share, written once.

A family fixes what its models accept (sizes or a size rule, qualities, the gpt-image
parameters, operations, input images) and how they are priced. The catalog is data: a
``[models.ID]`` table names its family (or its upstream id names it by prefix) and inherits
these rules, so a new dated id of a known family works by configuration alone. The
adapters read ``ProviderRequest.family`` to shape the upstream payload.

Sources, per family (the official SDKs' parameter docs; see docs/providers.md):

* ``gpt-image``, ``gpt-image-2``, ``gpt-image-2.5``: openai-python 3.51.0,
  ``types/image_generate_params.py`` and ``types/image_edit_params.py``.
* ``gemini-3.1-flash-image``, ``gemini-3-pro-image``: google-genai 3.3.0, ``types.ImageConfig``
  and Google's model pages for the image sizes and aspect ratios.
* ``flux-2``: Black Forest Labs' FLUX.2 API reference (width/height multiples of 16, up to
  4 megapixels, up to 8 input images).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

PriceBasis = Literal["image", "token", "megapixel"]


@dataclass(frozen=True, slots=True)
class SizeRule:
    """Any ``WIDTHxHEIGHT`` within these bounds, beside the family's listed sizes."""

    multiple_of: int = 1
    min_edge: int = 1
    max_edge: int = 1 << 16
    min_pixels: int = 1
    max_pixels: int = 1 << 32
    # Long edge over short edge, at most.
    max_ratio: float = float("inf")

    def problem(self, width: int, height: int) -> str | None:
        """Why ``width x height`` breaks the rule, in words for the caller; None if it fits."""
        if width % self.multiple_of or height % self.multiple_of:
            return f"width and height must both be multiples of {self.multiple_of}"
        if min(width, height) < self.min_edge or max(width, height) > self.max_edge:
            return f"each edge must be between {self.min_edge} and {self.max_edge} pixels"
        pixels = width * height
        if not self.min_pixels <= pixels <= self.max_pixels:
            return f"the image must have between {self.min_pixels:,} and {self.max_pixels:,} pixels"
        if max(width, height) / min(width, height) > self.max_ratio:
            return f"the aspect ratio must be at most {self.max_ratio:g}:1"
        return None

    def describe(self) -> str:
        parts = [f"any WIDTHxHEIGHT in multiples of {self.multiple_of}"]
        if self.max_ratio != float("inf"):
            parts.append(f"aspect ratio at most {self.max_ratio:g}:1")
        parts.append(f"edges {self.min_edge}-{self.max_edge}")
        parts.append(f"{self.min_pixels:,}-{self.max_pixels:,} pixels")
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    # Provider types whose adapters speak this family's payload.
    provider_types: frozenset[str]
    # Upstream model ids that belong to the family start with one of these (the longest
    # matching prefix over all families wins).
    prefixes: tuple[str, ...]
    sizes: tuple[str, ...]
    qualities: tuple[str, ...]
    default_quality: str
    price_basis: PriceBasis
    size_rule: SizeRule | None = None
    default_size: str = ""
    parameters: frozenset[str] = frozenset()
    operations: tuple[str, ...] = ("generate",)
    max_images: int = 1
    max_prompt_chars: int = 4000
    input_formats: tuple[str, ...] = ("png", "jpeg", "webp")
    max_input_images: int = 1
    max_input_image_bytes: int = 50 * 1024 * 1024

    def defaults(self) -> dict[str, object]:
        """The catalog keys this family fills in when a model table leaves them out."""
        return {
            "sizes": list(self.sizes),
            "default_size": self.default_size or self.sizes[0],
            "qualities": list(self.qualities),
            "default_quality": self.default_quality,
            "parameters": sorted(self.parameters),
            "operations": list(self.operations),
            "max_images": self.max_images,
            "max_prompt_chars": self.max_prompt_chars,
            "input_formats": list(self.input_formats),
            "max_input_images": self.max_input_images,
            "max_input_image_bytes": self.max_input_image_bytes,
        }


_OPENAI = frozenset({"openai", "azure-openai"})
_GEMINI = frozenset({"gemini", "vertex-gemini"})
_GPT_IMAGE_PARAMETERS = frozenset(
    {"background", "output_format", "output_compression", "moderation", "partial_images"}
)
_GPT_IMAGE_SIZES = ("1024x1024", "1536x1024", "1024x1536")
_GPT_IMAGE_QUALITIES = ("auto", "low", "medium", "high")
# gpt-image-2 and 2.5: edges in multiples of 16, ratio within 3:1, at most 3840x2160 pixels
# with no edge over 3840; OpenAI's image guide gives the lower bound of 655,360 pixels.
_GPT_IMAGE_2_RULE = SizeRule(
    multiple_of=16,
    min_edge=16,
    max_edge=3840,
    min_pixels=655_360,
    max_pixels=3840 * 2160,
    max_ratio=3.0,
)
_GPT_IMAGE_2_SIZES = (
    *_GPT_IMAGE_SIZES,
    "1536x864",
    "864x1536",
    "2048x2048",
    "2560x1440",
    "1440x2560",
    "3840x2160",
    "2160x3840",
)

# Gemini's image models take an aspect ratio and an image size tier (512 / 1K / 2K / 4K),
# not pixels; these are the OpenAI-style sizes the catalog offers for them.
_GEMINI_SIZES = (
    "1024x1024",
    "1536x1024",
    "1024x1536",
    "1792x1024",
    "1024x1792",
    "2048x2048",
    "4096x4096",
)

# The GPT image models' common rules; gpt-image-2 and 2.5 differ in sizes and qualities.
_GPT_IMAGE = Family(
    name="gpt-image",
    provider_types=_OPENAI,
    # gpt-image-2.6: the SDK names no size rule or extra qualities for it yet.
    prefixes=("gpt-image", "chatgpt-image", "gpt-image-2.6"),
    sizes=_GPT_IMAGE_SIZES,
    qualities=_GPT_IMAGE_QUALITIES,
    default_quality="auto",
    price_basis="token",
    parameters=_GPT_IMAGE_PARAMETERS,
    operations=("generate", "edit"),
    max_images=10,
    max_prompt_chars=32000,
    max_input_images=16,
)
_GPT_IMAGE_2 = replace(
    _GPT_IMAGE,
    name="gpt-image-2",
    prefixes=("gpt-image-2",),
    sizes=_GPT_IMAGE_2_SIZES,
    size_rule=_GPT_IMAGE_2_RULE,
)
# Both Gemini image models: 14 reference images of up to 7 MiB, one image per call.
_GEMINI_3_PRO_IMAGE = Family(
    name="gemini-3-pro-image",
    provider_types=_GEMINI,
    prefixes=("gemini-3-pro-image",),
    sizes=_GEMINI_SIZES,
    qualities=("standard",),
    default_quality="standard",
    price_basis="image",
    operations=("generate", "edit"),
    max_images=4,
    max_prompt_chars=32000,
    max_input_images=14,
    max_input_image_bytes=7 * 1024 * 1024,
)

FAMILIES: Mapping[str, Family] = {
    f.name: f
    for f in (
        _GPT_IMAGE,
        _GPT_IMAGE_2,
        replace(
            _GPT_IMAGE_2,
            name="gpt-image-2.5",
            prefixes=("gpt-image-2.5",),
            qualities=(*_GPT_IMAGE_QUALITIES, "xhigh", "max"),
        ),
        _GEMINI_3_PRO_IMAGE,
        replace(
            _GEMINI_3_PRO_IMAGE,
            name="gemini-3.1-flash-image",
            prefixes=("gemini-3.1-flash-image",),
            sizes=("512x512", *_GEMINI_SIZES),
            default_size="1024x1024",
        ),
        Family(
            name="flux-2",
            provider_types=frozenset({"bfl"}),
            prefixes=("flux-2",),
            sizes=("1024x1024", "1536x1024", "1024x1536", "1920x1088", "1088x1920", "2048x2048"),
            size_rule=SizeRule(
                multiple_of=16, min_edge=64, max_edge=4096, max_pixels=4 * 1024 * 1024
            ),
            qualities=("standard",),
            default_quality="standard",
            price_basis="megapixel",
            operations=("generate", "edit"),
            max_images=4,
            max_prompt_chars=32000,
            max_input_images=8,
            input_formats=("png", "jpeg", "webp"),
            max_input_image_bytes=20 * 1024 * 1024,
        ),
    )
}


def family_of(upstream_model: str) -> Family | None:
    """The family an upstream model id belongs to, by its longest known prefix."""
    model = upstream_model.strip().lower()
    best: Family | None = None
    best_length = 0
    for family in FAMILIES.values():
        for prefix in family.prefixes:
            if model.startswith(prefix) and len(prefix) > best_length:
                best, best_length = family, len(prefix)
    return best
