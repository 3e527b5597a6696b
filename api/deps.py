"""What route handlers receive: the services `create_app` wired, as `Annotated` aliases."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from api.access import OrderAccess
from api.auth import Authenticator, Caller
from api.client_address import rate_limit_identity
from api.metrics import ApiMetrics
from api.ratelimit import CheckoutLimiter, Spent
from api.services.checkout import CheckoutService
from api.services.quote import QuoteService
from api.services.refund import RefundService
from api.services.webhook import WebhookInbox
from core.carts import CartStore
from core.catalog import Catalog
from core.db import SessionFactory
from core.errors import RateLimited, Unauthorized
from core.event_feed import EventFeed
from core.orders import OrderStore
from core.pricing_catalog import PricingCatalog
from core.settings import Settings
from core.stripe_gateway import StripeGateway

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    sessions: SessionFactory
    temporal: Client
    auth: Authenticator
    limiter: CheckoutLimiter
    # RATE_LIMIT_AUTH_FAILURES: refused admin tokens per client address (`guarded_guess`).
    auth_failures: CheckoutLimiter
    # RATE_LIMIT_AUTH_FAILURES again, a budget of its own: refused METRICS_TOKENs.
    metrics_token_failures: CheckoutLimiter
    # RATE_LIMIT_CARTS: POST /carts per client address.
    cart_limiter: CheckoutLimiter
    metrics: ApiMetrics
    catalog: Catalog
    orders: OrderStore
    access: OrderAccess
    stripe: StripeGateway
    checkouts: CheckoutService
    refunds: RefundService
    webhooks: WebhookInbox
    events: EventFeed
    pricing: PricingCatalog
    quotes: QuoteService
    carts: CartStore


# The providers are `async def`: FastAPI runs a plain `def` dependency in its thread pool, two
# thread hand-offs per request for what is an attribute read.
async def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(_services)]

# Declares the bearer scheme in the OpenAPI document; `_caller` does the checking.
bearer = HTTPBearer(
    auto_error=False,
    description="Authorization: Bearer <token>: the admin token, a customer JWT, or an "
    "order's access_token",
)


async def authenticate(request: Request, services: Services, authorization: str | None) -> Caller:
    """The caller behind `authorization` (the request's `Authorization` header, as the route
    read it). Every route's credential passes here; an admin-token candidate
    (`Authenticator.guessable`) through `guarded_guess`. Guests, order tokens and customer
    JWTs (which cannot be guessed) are never held back."""
    if authorization is None or not services.auth.guessable(authorization):
        return await services.auth.authenticate(authorization)
    return await guarded_guess(
        request,
        services,
        services.auth_failures,
        "admin",
        lambda: services.auth.authenticate(authorization),
    )


async def guarded_guess(
    request: Request,
    services: Services,
    failures: CheckoutLimiter,
    token: str,
    attempt: Callable[[], Awaitable[_T]],
) -> _T:
    """`attempt` (a check of a secret token that raises Unauthorized when it is wrong), with
    guessing throttled: a client address (an IPv6 /64) whose candidates for the token were
    refused as often as `failures` allows (RATE_LIMIT_AUTH_FAILURES) gets 429 `rate_limited`
    for any candidate, the right one too, until its window has room, so that an answer never
    tells a guess was right. Each secret token has a budget of its own (guessing one never
    locks an address out of the other). `token` names it in the log and labels
    `checkout_admin_tokens_refused_total`. A burst's concurrent guesses are all judged before
    any of them is counted: a window admits at most its budget plus the guesses then in
    flight."""
    identity = rate_limit_identity(client_address(request))
    refused = services.metrics.admin_tokens_refused

    async def refuse_if_locked_out() -> None:
        try:
            await failures.check(identity, too_many="refused tokens", limit="credentials")
        except RateLimited:
            refused.labels(token, "locked_out").inc()
            raise

    await refuse_if_locked_out()
    try:
        return await attempt()
    except Unauthorized:
        spent = await failures.spend(identity)
        if spent is Spent.OVER:  # used up meanwhile, by a concurrent guess
            await refuse_if_locked_out()
        refused.labels(token, "refused").inc()
        # At most the budget's worth of lines per address and window: past it, nothing is read.
        log.info("refused %s token from %s", token, identity)
        if spent is Spent.LAST:
            log.warning(
                "refused %s tokens from %s reached RATE_LIMIT_AUTH_FAILURES (%s): its %s tokens"
                " are answered 429 until its window has room",
                token,
                identity,
                services.settings.rate_limit_auth_failures,
                token,
            )
        raise


async def _caller(
    request: Request,
    services: ServicesDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    return await authenticate(request, services, request.headers.get("authorization"))


CallerDep = Annotated[Caller, Depends(_caller)]


async def _catalog(services: ServicesDep) -> Catalog:
    return services.catalog


CatalogDep = Annotated[Catalog, Depends(_catalog)]


async def _orders(services: ServicesDep) -> OrderStore:
    return services.orders


OrdersDep = Annotated[OrderStore, Depends(_orders)]


async def _access(services: ServicesDep) -> OrderAccess:
    return services.access


AccessDep = Annotated[OrderAccess, Depends(_access)]


async def _checkouts(services: ServicesDep) -> CheckoutService:
    return services.checkouts


CheckoutsDep = Annotated[CheckoutService, Depends(_checkouts)]


async def _refunds(services: ServicesDep) -> RefundService:
    return services.refunds


RefundsDep = Annotated[RefundService, Depends(_refunds)]


async def _events(services: ServicesDep) -> EventFeed:
    return services.events


EventsDep = Annotated[EventFeed, Depends(_events)]


async def _pricing(services: ServicesDep) -> PricingCatalog:
    return services.pricing


PricingDep = Annotated[PricingCatalog, Depends(_pricing)]


async def _quotes(services: ServicesDep) -> QuoteService:
    return services.quotes


QuotesDep = Annotated[QuoteService, Depends(_quotes)]


async def _carts(services: ServicesDep) -> CartStore:
    return services.carts


CartsDep = Annotated[CartStore, Depends(_carts)]


def client_address(request: Request) -> str:
    """The client's address as the proxy-headers middleware left it (see `api.app`)."""
    return request.client.host if request.client else "unknown"
