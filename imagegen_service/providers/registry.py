"""Builds the configured provider instances and drops models nobody can serve."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import cast

import structlog

from imagegen_service.catalog import Catalog
from imagegen_service.config import PROVIDER_TYPES, ProviderConfig
from imagegen_service.providers.base import Provider

log = structlog.get_logger("imagegen.providers")

# Provider type -> "module:function"; each function is ``(config, credential) -> Provider``.
# Imported on use, so a deployment loads only the adapters it configures.
FACTORIES: Mapping[str, str] = {
    "local": "imagegen_service.providers.local:from_config",
    "openai": "imagegen_service.providers.openai_compat:from_config",
    "azure-openai": "imagegen_service.providers.openai_compat:azure_from_config",
    "google-imagen": "imagegen_service.providers.google_imagen:from_config",
    "vertex-imagen": "imagegen_service.providers.google_imagen:vertex_from_config",
    "gemini": "imagegen_service.providers.gemini_image:from_config",
    "vertex-gemini": "imagegen_service.providers.gemini_image:vertex_from_config",
    "stability": "imagegen_service.providers.stability:from_config",
    "bfl": "imagegen_service.providers.bfl:from_config",
}
assert set(FACTORIES) == set(PROVIDER_TYPES), "every configurable type needs a factory"

Factory = Callable[[ProviderConfig, str | None], Provider]


def build_provider(config: ProviderConfig, environ: Mapping[str, str]) -> Provider:
    module_name, _, function = FACTORIES[config.type].partition(":")
    factory = cast(Factory, getattr(importlib.import_module(module_name), function))
    return factory(config, config.credential(environ))


def build_providers(
    configs: Mapping[str, ProviderConfig], catalog: Catalog, environ: Mapping[str, str]
) -> dict[str, Provider]:
    """Providers with credentials. Deployments on the others leave the catalog, and a model
    with no deployment left leaves it too, with a warning that says which key is missing."""
    ready = {name for name, c in configs.items() if c.has_credentials(environ)}
    for name in sorted(set(configs) - ready):
        config = configs[name]
        affected = sorted(
            m.id for m in catalog.models.values() if any(d.provider == name for d in m.deployments)
        )
        if affected:
            log.warning(
                "provider.disabled",
                provider=name,
                missing_env=config.api_key_env,
                missing_file=config.api_key_file,
                models=affected,
            )
    for model_id, model in list(catalog.models.items()):
        kept = tuple(d for d in model.deployments if d.provider in ready)
        if kept == model.deployments:
            continue
        if kept:
            catalog.models[model_id] = replace(model, deployments=kept)
            continue
        catalog.models.pop(model_id)
        catalog.unavailable[model_id] = (
            f"The model '{model_id}' is not available on this server: no provider serving it "
            "has a credential configured."
        )
    used = {d.provider for m in catalog.models.values() for d in m.deployments}
    return {name: build_provider(configs[name], environ) for name in sorted(used)}
