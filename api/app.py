"""`create_app()`: the one place the HTTP service is wired together."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from api.access import OrderAccess
from api.auth import Authenticator
from api.client_address import ClientAddressMiddleware
from api.deps import Services, bearer
from api.errors import install_error_handlers
from api.limits import BodySizeLimit
from api.metrics import ApiMetrics, OutboxBacklog, RequestTelemetry
from api.ratelimit import CheckoutLimiter
from api.routes import (
    admin,
    carts,
    checkout,
    health,
    inventory,
    orders,
    pricing,
    prometheus,
    quote,
    webhooks,
)
from api.services.checkout import CheckoutService
from api.services.quote import QuoteService
from api.services.refund import RefundService
from api.services.webhook import WebhookInbox
from core.carts import CartStore
from core.catalog import Catalog
from core.checkout_keys import CheckoutKeyStore
from core.db import create_engine, create_session_factory
from core.event_feed import EventFeed
from core.heap import settle_startup_heap
from core.ledger import StockLedger
from core.orders import OrderStore
from core.pricing_catalog import PricingCatalog
from core.sealing import Sealer
from core.settings import Settings, load_settings
from core.stripe_gateway import create_gateway
from core.temporal import connect
from core.tracing import Tracing
from core.webhook_events import WebhookEventStore

DESCRIPTION = """
Checkout as a durable Temporal saga: the cart is priced from the catalog, stock is reserved
(all lines or none), an order and a Stripe PaymentIntent are created, and the payment webhook
or a durable timer decides between committing and compensating.

Credentials (`Authorization: Bearer <token>`): the admin token, a customer JWT, or the
`access_token` that `POST /checkout` returns for its order. Every error has the body
`{"error": <code>, "message": <text>, "details": <optional>}`.
"""


def create_app(
    settings: Settings | None = None,
    *,
    tracing: Tracing | None = None,
    metrics: ApiMetrics | None = None,
    settle_heap: bool = False,
) -> FastAPI:
    """The app. `tracing` traces its requests and its Temporal calls (`python -m api` passes the
    process's; without it nothing is traced); `metrics` defaults to a registry of its own.
    `settle_heap`: once started, settle the process's heap (`core.heap`; `python -m api` asks
    for it, a test process does not)."""
    settings = settings or load_settings()
    metrics = metrics or ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        sessions = create_session_factory(engine)
        temporal = await connect(
            settings,
            lazy=True,
            interceptors=[tracing.temporal_interceptor()] if tracing else [],
        )
        gateway = create_gateway(settings)
        auth = Authenticator(settings)
        limiter = CheckoutLimiter(settings.rate_limit_checkouts, settings.redis_url)
        # Quotes count against a budget of their own: quoting never spends a checkout.
        quote_limiter = CheckoutLimiter(
            settings.rate_limit_quotes, settings.redis_url, key_prefix="quote"
        )
        auth_failures = CheckoutLimiter(
            settings.rate_limit_auth_failures, settings.redis_url, key_prefix="auth-failures"
        )
        metrics_token_failures = CheckoutLimiter(
            settings.rate_limit_auth_failures,
            settings.redis_url,
            key_prefix="metrics-token-failures",
        )
        cart_limiter = CheckoutLimiter(
            settings.rate_limit_carts, settings.redis_url, key_prefix="carts"
        )
        pricing_catalog = PricingCatalog(sessions)
        carts = CartStore(sessions, ttl_seconds=settings.cart_ttl)
        orders = OrderStore(sessions, StockLedger(sessions))
        access = OrderAccess(orders)
        feed = EventFeed(sessions)

        async def outbox_backlog() -> OutboxBacklog:
            return OutboxBacklog(*await feed.backlog())

        metrics.watch_outbox(outbox_backlog)
        app.state.services = Services(
            settings=settings,
            engine=engine,
            sessions=sessions,
            temporal=temporal,
            auth=auth,
            limiter=limiter,
            auth_failures=auth_failures,
            metrics_token_failures=metrics_token_failures,
            cart_limiter=cart_limiter,
            metrics=metrics,
            catalog=Catalog(sessions),
            orders=orders,
            access=access,
            stripe=gateway,
            checkouts=CheckoutService(
                temporal,
                settings,
                orders,
                CheckoutKeyStore(sessions),
                access,
                limiter,
                gateway,
                Sealer(settings.secret_key.get_secret_value()),
                metrics,
                carts,
            ),
            refunds=RefundService(temporal, settings, orders),
            webhooks=WebhookInbox(
                WebhookEventStore(sessions),
                temporal,
                orders,
                gateway,
                settings.temporal_task_queue,
                metrics,
            ),
            events=feed,
            pricing=pricing_catalog,
            quotes=QuoteService(pricing_catalog, quote_limiter, carts),
            carts=carts,
        )
        if settle_heap:
            settle_startup_heap()
        try:
            yield
        finally:
            await limiter.aclose()
            await quote_limiter.aclose()
            await auth_failures.aclose()
            await metrics_token_failures.aclose()
            await cart_limiter.aclose()
            await auth.aclose()
            await gateway.aclose()
            await engine.dispose()

    app = FastAPI(
        title="Checkout saga",
        version="2.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    # Request ids and latencies; inside the next one, which may copy the scope, so that it
    # sees the route the router records in it.
    app.add_middleware(RequestTelemetry, metrics=metrics)
    # The client's address for rate limits: X-Forwarded-For only from TRUSTED_PROXIES.
    app.add_middleware(ClientAddressMiddleware, trusted_proxies=settings.trusted_proxies)
    if tracing is not None:
        tracing.instrument_app(app)
    routers = [
        health.router,
        prometheus.router,
        inventory.router,
        # Before checkout's routes: no pattern of theirs may take /checkout/quote.
        quote.router,
        checkout.router,
        orders.router,
        webhooks.router,
        admin.router,
        pricing.admin_router,
        pricing.router,
        carts.router,
    ]
    for router in routers:
        _document_admin_token_lockouts(router)
        app.include_router(router)
    return app


def _reads_bearer(dependant: Dependant) -> bool:
    return dependant.call is bearer or any(_reads_bearer(d) for d in dependant.dependencies)


def _document_admin_token_lockouts(router: APIRouter) -> None:
    """Every route that reads the bearer credential may answer 429 `rate_limited` to an
    admin token from an address locked out by RATE_LIMIT_AUTH_FAILURES (`api.deps.
    authenticate`): said in the OpenAPI document where the route does not say it already."""
    for route in router.routes:
        if not isinstance(route, APIRoute):
            continue
        if not _reads_bearer(route.dependant):
            continue
        if 429 in route.responses or "429" in route.responses:
            continue
        route.responses[429] = {
            "description": "rate_limited: too many refused admin tokens from this address",
            "headers": {
                "Retry-After": {
                    "description": "seconds until the address's admin tokens are read again",
                    "schema": {"type": "integer"},
                }
            },
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        }
