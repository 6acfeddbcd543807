"""Which configured models the upstreams still offer: ``imagegen-admin providers check``.

Providers retire models every few months. This asks every configured provider that has a
credential, and whose upstream lists its models, for that list, and says for each catalog
deployment whether its upstream model is on it. A cron job or CI step runs it and reads
the exit status.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from imagegen_service import errors
from imagegen_service.config import ServiceConfig
from imagegen_service.providers.base import ModelListing, Provider
from imagegen_service.providers.registry import build_provider

# offered: on the upstream's list; missing: not on it (retired, renamed, or never there);
# unlisted: the upstream offers no list; no_credential: the provider is not configured;
# failed: the list could not be had; built_in: the local renderer.
Status = Literal["offered", "missing", "unlisted", "no_credential", "failed", "built_in"]


@dataclass(frozen=True, slots=True)
class Row:
    model: str
    provider: str
    upstream_model: str
    status: Status
    detail: str = ""


@dataclass(frozen=True, slots=True)
class _Listing:
    models: frozenset[str] | None = None
    error: str = ""


async def check_catalog(config: ServiceConfig) -> list[Row]:
    """One row per catalog deployment, in catalog order."""
    environ = config.environ
    wanted = {d.provider for m in config.catalog.models.values() for d in m.deployments}
    providers: dict[str, Provider] = {}
    try:
        for name in sorted(wanted):
            provider_config = config.providers[name]
            if provider_config.type != "local" and provider_config.has_credentials(environ):
                providers[name] = build_provider(provider_config, environ)
        names = list(providers)
        listings = await asyncio.gather(*(_listing(providers[n]) for n in names))
        by_provider: Mapping[str, _Listing] = dict(zip(names, listings, strict=True))
    finally:
        await asyncio.gather(*(p.aclose() for p in providers.values()), return_exceptions=True)
    rows = []
    for model in config.catalog.models.values():
        for d in model.deployments:
            rows.append(_row(model.id, d.provider, d.upstream_model, config, by_provider))
    return rows


def _row(
    model: str,
    provider: str,
    upstream_model: str,
    config: ServiceConfig,
    listings: Mapping[str, _Listing],
) -> Row:
    def row(status: Status, detail: str = "") -> Row:
        return Row(model, provider, upstream_model, status, detail)

    if config.providers[provider].type == "local":
        return row("built_in")
    listing = listings.get(provider)
    if listing is None:
        missing = config.providers[provider].api_key_env or config.providers[provider].api_key_file
        return row("no_credential", f"set {missing}" if missing else "")
    if listing.error:
        return row("failed", listing.error)
    if listing.models is None:
        return row("unlisted", "the upstream publishes no model list")
    if upstream_model in listing.models:
        return row("offered")
    return row("missing", "not on the upstream's model list: retired or renamed?")


async def _listing(provider: Provider) -> _Listing:
    if not isinstance(provider, ModelListing):
        return _Listing()
    try:
        return _Listing(await provider.list_models())
    except errors.ImagegenError as exc:
        return _Listing(error=exc.message)


def exit_status(rows: list[Row]) -> int:
    """1 when a configured model is missing upstream; 2 when a list could not be had;
    else 0."""
    if any(r.status == "missing" for r in rows):
        return 1
    if any(r.status == "failed" for r in rows):
        return 2
    return 0
