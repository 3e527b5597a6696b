"""`create_app()`: the one place the HTTP service is wired together."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.deps import Services
from api.errors import install_error_handlers
from api.limits import BodySizeLimit
from api.routes import admin, checkout, health, inventory, orders, webhooks
from api.services import CheckoutService, RefundService, WebhookInbox
from core.catalog import Catalog
from core.db import create_engine, create_session_factory
from core.ledger import StockLedger
from core.orders import OrderStore
from core.settings import Settings
from core.stripe_gateway import create_gateway
from core.temporal import connect

DESCRIPTION = """
Checkout as a durable Temporal saga: the cart is priced from the catalog, stock is reserved
(all lines or none), an order and a Stripe PaymentIntent are created, and the payment webhook
or a durable timer decides between committing and compensating.

Every error has the body `{"error": <code>, "message": <text>, "details": <optional>}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        sessions = create_session_factory(engine)
        temporal = await connect(settings, lazy=True)
        gateway = create_gateway(settings)
        ledger = StockLedger(sessions)
        orders = OrderStore(sessions, ledger)
        app.state.services = Services(
            settings=settings,
            engine=engine,
            sessions=sessions,
            temporal=temporal,
            catalog=Catalog(sessions),
            ledger=ledger,
            orders=orders,
            stripe=gateway,
            checkouts=CheckoutService(temporal, settings, orders),
            refunds=RefundService(temporal, settings, orders),
            webhooks=WebhookInbox(sessions, temporal, orders, settings.temporal_task_queue),
        )
        try:
            yield
        finally:
            await gateway.aclose()
            await engine.dispose()

    app = FastAPI(
        title="Checkout saga",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.include_router(health.router)
    app.include_router(inventory.router)
    app.include_router(checkout.router)
    app.include_router(orders.router)
    app.include_router(webhooks.router)
    app.include_router(admin.router)
    return app
