"""Checkout: start one (Update-with-Start) and read its live state (a workflow query)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response

from api.cart_access import CredentialsDep
from api.deps import CallerDep, CheckoutsDep, ServicesDep, client_address
from api.schemas import (
    IDEMPOTENCY_KEY_PATTERN,
    CheckoutIn,
    CheckoutOut,
    CheckoutStateOut,
    ErrorBody,
)

router = APIRouter(tags=["checkout"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="1 to 255 printable characters; the same key and body (in the same "
        "customer's scope) give the same checkout. Use random keys (UUIDv4).",
    ),
]


@router.post(
    "/checkout",
    status_code=201,
    responses={
        200: {"model": CheckoutOut, "description": "the same Idempotency-Key and body again"},
        401: {"model": ErrorBody, "description": "a credential that does not verify"},
        403: {"model": ErrorBody, "description": "user_id not the caller's, or an order token"},
        404: {"model": ErrorBody, "description": "a cart_id the caller does not reach"},
        409: {
            "model": ErrorBody,
            "description": "insufficient_stock, promotion_exhausted, invalid_state (a closed cart)",
        },
        422: {
            "model": ErrorBody,
            "description": "validation_error, unknown_sku, quantity_limit_exceeded, "
            "idempotency_key_reused, invalid_promotion, shipping_unavailable",
        },
        429: {"model": ErrorBody, "description": "rate_limited, too_many_pending_checkouts"},
        503: {"model": ErrorBody, "description": "unavailable: nothing was kept"},
    },
)
async def post_checkout(
    body: CheckoutIn,
    request: Request,
    credentials: CredentialsDep,
    services: ServicesDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> CheckoutOut:
    """Reserve the cart's stock, create the order and its PaymentIntent, and answer at once.
    With `cart_id`, the lines are that server-side cart's (its token in X-Cart-Token, or its
    customer's token, or admin)."""
    created, first = await services.checkouts.start(
        body, idempotency_key, credentials.caller, client_address(request), credentials.cart
    )
    response.status_code = 201 if first else 200
    return CheckoutOut.model_validate(
        {**created.model_dump(), "access_token": services.auth.order_token(created.order_id)}
    )


@router.get(
    "/checkouts/{checkout_id}",
    responses={401: {"model": ErrorBody}, 404: {"model": ErrorBody}},
)
async def get_checkout(
    checkout_id: uuid.UUID, caller: CallerDep, checkouts: CheckoutsDep
) -> CheckoutStateOut:
    """The live state of the checkout's saga (its order token, its customer, or admin)."""
    state = await checkouts.state(checkout_id, caller)
    return CheckoutStateOut.model_validate(state.model_dump())
