"""The quote: what `POST /checkout` would charge for the same body, with nothing reserved."""

from __future__ import annotations

from datetime import UTC, datetime

from api.auth import Caller, CallerKind
from api.client_address import rate_limit_identity
from api.ratelimit import CheckoutLimiter
from api.schemas import CustomerIn, QuoteIn
from api.services.lines import requested_lines
from core.carts import CartCaller, CartStore
from core.customers import customer_scope
from core.ledger import merge_lines
from core.pricing import TermsRequest
from core.pricing_catalog import PricingCatalog, Quote


def quote_scope(customer: CustomerIn | None, caller: Caller) -> str | None:
    """Whose per-customer promotion limit the quote checks: the customer token's `sub`; with
    admin, the body's user_id, else its email. None: no per-customer check. A guest's quote
    checks none: with no credential and nothing reserved, it would tell anyone whether some
    email has used a code (the checkout checks it, under its rate limits)."""
    if caller.kind == CallerKind.CUSTOMER and caller.user_id:
        return customer_scope(caller.user_id, "")
    if customer is None or caller.kind != CallerKind.ADMIN:
        return None
    return customer_scope(customer.user_id, customer.email)


class QuoteService:
    def __init__(
        self, pricing: PricingCatalog, limiter: CheckoutLimiter, carts: CartStore | None = None
    ) -> None:
        """`limiter`: the quotes' own budget per client address (RATE_LIMIT_QUOTES, counted
        apart from the checkouts' so that quoting never spends a client's checkouts)."""
        self._pricing = pricing
        self._limiter = limiter
        self._carts = carts

    async def quote(
        self, body: QuoteIn, caller: Caller, address: str, cart_caller: CartCaller | None = None
    ) -> Quote:
        """Price the body's lines and terms as a checkout opened now would."""
        if caller.kind != CallerKind.ADMIN:
            await self._limiter.hit(rate_limit_identity(address), too_many="quotes")
        request = TermsRequest(
            country=body.address.country if body.address else None,
            shipping_method=body.shipping_method,
            promotion_code=body.promotion_code,
        )
        return await self._pricing.quote(
            merge_lines(await requested_lines(body, self._carts, cart_caller)),
            request,
            now=datetime.now(UTC),
            customer_scope=quote_scope(body.customer, caller),
        )
