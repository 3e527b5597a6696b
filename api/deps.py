"""What route handlers receive: the services `create_app` wired, as `Annotated` aliases."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from api.services import CheckoutService, RefundService, WebhookInbox
from core.catalog import Catalog
from core.db import SessionFactory
from core.errors import Unauthorized
from core.ledger import StockLedger
from core.orders import OrderStore
from core.settings import Settings
from core.stripe_gateway import StripeGateway


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    sessions: SessionFactory
    temporal: Client
    catalog: Catalog
    ledger: StockLedger
    orders: OrderStore
    stripe: StripeGateway
    checkouts: CheckoutService
    refunds: RefundService
    webhooks: WebhookInbox


# The providers are `async def`: FastAPI runs a plain `def` dependency in its thread pool, two
# thread hand-offs per request for what is an attribute read.
async def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(_services)]


async def _catalog(services: ServicesDep) -> Catalog:
    return services.catalog


CatalogDep = Annotated[Catalog, Depends(_catalog)]


async def _orders(services: ServicesDep) -> OrderStore:
    return services.orders


OrdersDep = Annotated[OrderStore, Depends(_orders)]


async def _checkouts(services: ServicesDep) -> CheckoutService:
    return services.checkouts


CheckoutsDep = Annotated[CheckoutService, Depends(_checkouts)]


async def _refunds(services: ServicesDep) -> RefundService:
    return services.refunds


RefundsDep = Annotated[RefundService, Depends(_refunds)]

# Declares the bearer scheme in the OpenAPI document; `AdminRoute` does the checking.
admin_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <ADMIN_TOKEN>")


def check_admin_token(settings: Settings, authorization: str | None) -> None:
    """Refuse anything but `Bearer <ADMIN_TOKEN>`; the comparison takes constant time."""
    scheme, _, token = (authorization or "").partition(" ")
    supplied = token.strip().encode() if scheme.lower() == "bearer" else b""
    expected = settings.admin_token.get_secret_value().encode()
    if not hmac.compare_digest(supplied, expected):
        raise Unauthorized("missing or wrong admin token")
