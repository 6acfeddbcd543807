"""Builds the configured provider instances and drops models nobody can serve."""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from imagegen_service.catalog import Catalog
from imagegen_service.config import ProviderConfig
from imagegen_service.providers.base import Provider
from imagegen_service.providers.local import LocalRenderer
from imagegen_service.providers.openai_compat import OpenAICompatibleProvider

log = structlog.get_logger("imagegen.providers")


def build_provider(config: ProviderConfig, environ: Mapping[str, str]) -> Provider:
    if config.type == "local":
        return LocalRenderer(config.name, precomputed=config.precomputed)
    return OpenAICompatibleProvider(
        config.name,
        base_url=config.base_url,
        api_key=config.api_key(environ),
        timeout_seconds=config.timeout_seconds,
        max_connections=config.max_connections,
    )


def build_providers(
    configs: Mapping[str, ProviderConfig], catalog: Catalog, environ: Mapping[str, str]
) -> dict[str, Provider]:
    """Providers with credentials; models of the others leave the catalog, with a warning."""
    ready = {name: c for name, c in configs.items() if c.has_credentials(environ)}
    for name, config in configs.items():
        if name in ready:
            continue
        dropped = sorted(m.id for m in catalog.models.values() if m.provider == name)
        for model_id in dropped:
            catalog.models.pop(model_id)
            catalog.unavailable[model_id] = (
                f"The model '{model_id}' is not available on this server: its provider "
                f"'{name}' has no credential configured."
            )
        if dropped:
            log.warning(
                "provider.disabled",
                provider=name,
                missing_env=config.api_key_env,
                models=dropped,
            )
    used = {m.provider for m in catalog.models.values()}
    return {name: build_provider(ready[name], environ) for name in sorted(used)}
