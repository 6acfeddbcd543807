"""The gateway's Prometheus metrics, on a registry of its own, served at ``GET /metrics``.

Requests are labelled by the route's canonical path (``/v1/files/images/{token}``), never the
raw path, and by a method from a closed list: a caller cannot mint new label values.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from imagegen_service.build_info import register_runtime_metrics

# From /healthz to a batch of large images behind a slow upstream.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The route label of a request that matched no route (404, or 405 on a known path).
UNMATCHED = "unmatched"


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        register_runtime_metrics(self.registry)
        self.requests = Counter(
            "http_requests",
            "HTTP requests answered, by route, method and status.",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "http_request_duration_seconds",
            "Time from receiving a request to its handler's answer.",
            ("route", "method"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.uploads_in_flight = Gauge(
            "http_uploads_in_flight",
            "Edits and variations being read or served (at most max_uploads_in_flight).",
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in _METHODS else "other"
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route, method).observe(seconds)


METRICS = web.AppKey("metrics", GatewayMetrics)


def route_of(request: web.Request) -> str:
    """The canonical path of the route that matched, e.g. ``/v1/files/images/{token}``."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


async def scrape(request: web.Request) -> web.Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    response = web.Response(body=encoder(request.app[METRICS].registry))
    # Set raw: it carries parameters (version, charset) that content_type= would reject.
    response.headers["Content-Type"] = content_type
    return response
