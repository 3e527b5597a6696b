"""`POST /checkout/quote`: the totals a checkout would charge, reserving nothing."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.cart_access import CredentialsDep
from api.deps import QuotesDep, client_address
from api.routes.pricing import shipping_option
from api.schemas import ErrorBody, LineOutSchema, QuoteIn, QuoteOut, QuotePromotionOut, TotalsOut

router = APIRouter(tags=["checkout"])


@router.post(
    "/checkout/quote",
    responses={
        401: {"model": ErrorBody, "description": "a credential that does not verify"},
        404: {"model": ErrorBody, "description": "a cart_id the caller does not reach"},
        409: {
            "model": ErrorBody,
            "description": "promotion_exhausted, invalid_state (a closed cart)",
        },
        422: {
            "model": ErrorBody,
            "description": "validation_error, unknown_sku, quantity_limit_exceeded, "
            "invalid_promotion, shipping_unavailable",
        },
        429: {"model": ErrorBody, "description": "rate_limited"},
        503: {"model": ErrorBody, "description": "unavailable"},
    },
)
async def post_quote(
    body: QuoteIn, request: Request, credentials: CredentialsDep, quotes: QuotesDep
) -> QuoteOut:
    """Price a cart as POST /checkout would (same body), without reserving anything."""
    quote = await quotes.quote(body, credentials.caller, client_address(request), credentials.cart)
    return QuoteOut(
        currency=quote.cart.currency,
        items=[
            LineOutSchema.model_validate(line, from_attributes=True) for line in quote.cart.lines
        ],
        totals=TotalsOut(**quote.totals.as_dict()),
        promotion=None
        if quote.promotion is None
        else QuotePromotionOut(code=quote.promotion.code, discount=quote.totals.discount),
        shipping_methods=[shipping_option(m) for m in quote.shipping_methods],
    )
