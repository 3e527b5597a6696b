"""The API's metrics (prometheus-client, served at `GET /metrics`) and its per-request telemetry:
the request id every log line of the request carries, and the latency histogram.

Each is counted where it happens exactly once, so that summing over API replicas is right:
a request in the replica that served it; a new checkout by the request that claimed its
Idempotency-Key (PostgreSQL decides between replicas); a webhook event by the replica that
received that delivery (duplicates as `duplicate`: the event store decides). How checkouts end
is counted by the worker (`checkout_completed_total`), where the ending happens.

    checkout_started_total                          new checkouts (replays, duplicates: no)
    checkout_refused_total{reason}                  POST /checkout answered with an error code
    checkout_rate_limited_total{limit}              address, customer (RATE_LIMIT_CHECKOUTS),
                                                    pending (MAX_PENDING_CHECKOUTS), credentials
                                                    (an admin token locked out by
                                                    RATE_LIMIT_AUTH_FAILURES)
    checkout_admin_tokens_refused_total{token, outcome}   token: admin, metrics (METRICS_TOKEN);
                                                    refused (401), locked_out (429: the address
                                                    is past RATE_LIMIT_AUTH_FAILURES)
    checkout_webhook_events_total{type, outcome}    outcome: acted, duplicate, ignored, ...,
                                                    or the error code (invalid_signature, ...)
    http_request_duration_seconds{method, route, status}   route: the template, never the path
    checkout_outbox_pending, checkout_outbox_oldest_pending_age_seconds   from `watch_outbox`
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import logs

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# A client's X-Request-ID is kept if it is a plausible id; anything else (log injection, a
# megabyte) is replaced by one of ours.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/=+-]{1,128}")
# For paths no route matched (404): one label value, whatever was asked.
UNMATCHED = "unmatched"
# An outbox probe that takes longer than this is abandoned for this scrape.
OUTBOX_PROBE_TIMEOUT = 2.0


@dataclass(frozen=True)
class OutboxBacklog:
    """What `watch_outbox`'s probe reports: the rows not yet published, and the age in seconds
    of the oldest of them (0 when there is none)."""

    pending: int
    oldest_age_seconds: float


OutboxProbe = Callable[[], Awaitable[OutboxBacklog]]


class ApiMetrics:
    """The API's metrics, in a registry of its own (one per app, so tests can build many)."""

    def __init__(self) -> None:
        # No `_created` series beside every counter and histogram: twice the series for a
        # timestamp Prometheus does not use. (A setting of the library, for the process.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        registry = self.registry
        self.checkouts_started = Counter(
            "checkout_started", "Checkouts started (a new workflow)", registry=registry
        )
        self.checkouts_refused = Counter(
            "checkout_refused",
            "POST /checkout answered with an error, by its code",
            ["reason"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "checkout_rate_limited",
            "Checkouts refused by a rate limit (address, customer) or the pending limit",
            ["limit"],
            registry=registry,
        )
        self.admin_tokens_refused = Counter(
            "checkout_admin_tokens_refused",
            "Candidates for a secret token (token: admin, metrics) refused (401: refused) or not"
            " read (429: locked_out) from an address past RATE_LIMIT_AUTH_FAILURES",
            ["token", "outcome"],
            registry=registry,
        )
        self.webhook_events = Counter(
            "checkout_webhook_events",
            "Stripe webhook deliveries, by event type and what they came to",
            ["type", "outcome"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "http_request_duration_seconds",
            "HTTP requests by route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.outbox_pending = Gauge(
            "checkout_outbox_pending", "Order events not yet published", registry=registry
        )
        self.outbox_oldest_age = Gauge(
            "checkout_outbox_oldest_pending_age_seconds",
            "Age of the oldest order event not yet published (0: none)",
            registry=registry,
        )
        self.outbox_probe_failures = Counter(
            "checkout_outbox_probe_failures",
            "Scrapes whose outbox probe failed or took too long",
            registry=registry,
        )
        self._outbox_probe: OutboxProbe | None = None

    def watch_outbox(self, probe: OutboxProbe) -> None:
        """Report the outbox backlog at each scrape from `probe` (an async callable returning
        an `OutboxBacklog`, e.g. one SQL statement:
        `SELECT count(*), coalesce(extract(epoch FROM now() - min(occurred_at)), 0)
        FROM outbox WHERE published_at IS NULL`). Every replica reports the same backlog:
        alert on its `max`, not its sum."""
        self._outbox_probe = probe

    async def _refresh(self) -> None:
        if self._outbox_probe is None:
            return
        try:
            async with asyncio.timeout(OUTBOX_PROBE_TIMEOUT):
                backlog = await self._outbox_probe()
        except Exception as exc:
            self.outbox_probe_failures.inc()
            log.warning("outbox probe failed: %r", exc)
            return
        self.outbox_pending.set(backlog.pending)
        self.outbox_oldest_age.set(backlog.oldest_age_seconds)

    async def exposition(self) -> bytes:
        await self._refresh()
        return generate_latest(self.registry)


def route_of(scope: Scope) -> str:
    """The template of the route that served the request (`/orders/{order_id}`)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class RequestTelemetry:
    """Per request: its id (the client's `X-Request-ID` if plausible, else a new one) bound for
    every log line and returned in the response's `X-Request-ID`; its latency observed by
    route template and status. Sits outside the routes (and the body-size limit) so that every
    answer gets both; reads the route the router put in the same scope."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        logs.start_request(request_id)
        status = 500
        header = (REQUEST_ID_HEADER.encode(), request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.request_duration.labels(
                scope["method"], route_of(scope), str(status)
            ).observe(time.perf_counter() - started)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            given: str = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex
