"""The catalog as data and families as code: a model of a known family needs only its entry
and prices, each price basis charges what the upstream bills, and the built-in catalog names
only models that the providers' own SDKs list as live."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import openai.types.image_model as openai_image_model
import pytest

from imagegen_service import errors
from imagegen_service.catalog import CatalogError, load_catalog
from imagegen_service.config import DEFAULT_CONFIG_PATH, load_config

TYPES = {"openai": "openai", "gemini": "gemini", "bfl": "bfl", "stability": "stability"}


def _catalog(models: dict[str, Any]) -> Any:
    return load_catalog(models, providers=TYPES, provider_types=TYPES)


def _validate(catalog: Any, model: str, **fields: Any) -> Any:
    base: dict[str, Any] = {
        "model": model,
        "prompt": "a lighthouse",
        "n": 1,
        "size": "",
        "quality": "",
        "style": "",
        "response_format": "",
    }
    return catalog.validate(**{**base, **fields})


def test_a_dated_id_of_a_known_family_needs_only_its_entry_and_prices() -> None:
    catalog = _catalog(
        {
            "gpt-image-2.5-flare-2026-09-08": {
                "provider": "openai",
                "token_price_usd": {"input": "5", "input_image": "8", "output": "30"},
                "megapixel_price_usd": {"first": "0.3", "additional": "0.3"},
            }
        }
    )
    model = catalog.models["gpt-image-2.5-flare-2026-09-08"]
    assert model.family == "gpt-image-2.5"
    assert {"xhigh", "max"} <= set(model.qualities)
    assert "background" in model.parameters
    assert model.operations == ("generate", "edit")
    # The family's size rule: any multiple of 16 within 3:1 and its pixel bounds.
    request = _validate(catalog, model.id, size="1536x864", quality="xhigh")
    assert (request.width, request.height) == (1536, 864)


@pytest.mark.parametrize(
    ("size", "why"),
    [
        ("1000x1000", "multiples of 16"),
        ("3840x1024", "aspect ratio"),
        ("512x512", "pixels"),
        ("4096x2304", "between 16 and 3840"),
    ],
)
def test_a_size_that_breaks_the_family_rule_is_refused_naming_the_rule(size: str, why: str) -> None:
    catalog = load_config().catalog
    with pytest.raises(errors.InvalidParameter) as caught:
        _validate(catalog, "gpt-image-2", size=size)
    assert caught.value.param == "size"
    assert why in caught.value.message


def test_a_family_name_the_code_does_not_know_is_refused_at_startup() -> None:
    with pytest.raises(CatalogError, match="unknown 'gpt-image-9'"):
        _catalog(
            {"m": {"provider": "openai", "family": "gpt-image-9", "price_usd": {"default": "1"}}}
        )


def test_a_family_served_by_another_provider_type_is_refused_at_startup() -> None:
    with pytest.raises(CatalogError, match="not 'bfl'"):
        _catalog({"m": {"provider": "bfl", "family": "gpt-image-2", "price_usd": {"default": "1"}}})


def test_flux_2_is_priced_by_started_megapixels_of_output_and_input() -> None:
    catalog = load_config().catalog
    model = catalog.models["flux-2-pro"]
    # 1920x1080 is 2,073,600 pixels: 1.98 of BFL's 1024x1024 megapixels, so two started ones:
    # 0.03 for the first + 0.015 for the second.
    assert model.unit_price("1920x1080", "standard") == 30_000 + 15_000
    # 1024x1024 is exactly one.
    assert model.unit_price("1024x1024", "standard") == 30_000
    # An edit adds its input's started megapixels at 0.015 each: 1536x1024 in is 1.5 → 2.
    assert (
        model.unit_price("1024x1024", "standard", operation="edit", input_pixels=1536 * 1024)
        == 30_000 + 2 * 15_000
    )


def test_token_prices_charge_text_and_image_input_apart_and_round_up() -> None:
    prices = load_config().catalog.models["gpt-image-2"].token_prices
    assert prices is not None
    # 1,200 input tokens of which 1,000 image, 4,160 output:
    # 200 * 5 + 1,000 * 8 + 4,160 * 30 = 133,800 USD per 1M tokens → 133,800 micro-dollars.
    assert prices.cost(1_200, 4_160, input_image_tokens=1_000) == 133_800
    # A fraction of a micro-dollar is charged as one.
    assert prices.cost(1, 0) == 5
    assert prices.cost(0, 0) == 0


def test_stability_prices_an_edit_at_the_inpaint_services_price() -> None:
    model = load_config().catalog.models["stable-image-core"]
    assert model.unit_price("1024x1024", "standard") == 30_000
    assert model.unit_price("1024x1024", "standard", operation="edit") == 50_000


def test_an_operation_table_must_name_an_operation() -> None:
    with pytest.raises(CatalogError, match="names an operation"):
        _catalog(
            {
                "m": {
                    "provider": "stability",
                    "sizes": ["1024x1024"],
                    "price_usd": {"default": "0.03", "upscale": {"default": "0.1"}},
                }
            }
        )


# -- the built-in catalog is live ----------------------------------------------------------


def _default_models() -> dict[str, Any]:
    with DEFAULT_CONFIG_PATH.open("rb") as f:
        models: dict[str, Any] = tomllib.load(f)["models"]
    return models


def _upstream_ids(provider: str) -> set[str]:
    return {
        str(m.get("upstream_model", model_id))
        for model_id, m in _default_models().items()
        if m.get("provider") == provider
    }


def test_every_openai_model_of_the_built_in_catalog_is_live_in_the_official_sdk() -> None:
    source = Path(openai_image_model.__file__).read_text()
    listed = set(re.findall(r'"([^"]+)"', source.split('"""', 1)[0]))
    retired: set[str] = set()
    for line in source.split("Deprecated values", 1)[1].splitlines():
        if line.lstrip().startswith("-"):
            retired.update(re.findall(r'"([^"]+)"', line.split(":", 1)[0]))
    assert {"dall-e-2", "dall-e-3", "gpt-image-1"} <= retired
    ours = _upstream_ids("openai")
    assert ours, "the built-in catalog has OpenAI models"
    assert ours <= listed - retired


def test_every_google_model_of_the_built_in_catalog_is_live_in_the_official_sdk() -> None:
    import google.genai

    listing = Path(google.genai.__file__).parent / "_gaos" / "types" / "interactions" / "model.py"
    live = set(re.findall(r'"([a-z0-9.-]+)"', listing.read_text()))
    ours = _upstream_ids("gemini")
    assert ours == {"gemini-3.1-flash-image", "gemini-3-pro-image"}
    assert ours <= live
    # No Imagen id and no retired Gemini image id is sent upstream any more.
    assert not any(i.startswith("imagen-") or i == "gemini-2.5-flash-image" for i in ours)


def test_the_seeds_imagen_3_is_an_alias_served_by_googles_current_image_model() -> None:
    catalog = load_config().catalog
    model = catalog.models["imagen-3"]
    assert [d.upstream_model for d in model.deployments] == ["gemini-3.1-flash-image"]
    request = _validate(catalog, "imagen-3", size="1024x1024")
    assert request.size == "1024x1024"
