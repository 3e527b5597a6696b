"""Checkout: start one (Update-with-Start) and read its live state (a workflow query)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Response

from api.deps import CheckoutsDep
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
        description="1 to 255 printable characters; the same key and body give the same checkout",
    ),
]


@router.post(
    "/checkout",
    status_code=201,
    responses={
        200: {"model": CheckoutOut, "description": "the same Idempotency-Key and body again"},
        409: {"model": ErrorBody, "description": "insufficient_stock"},
        422: {
            "model": ErrorBody,
            "description": "validation_error, unknown_sku, idempotency_key_reused",
        },
        503: {"model": ErrorBody, "description": "unavailable: nothing was kept"},
    },
)
async def post_checkout(
    body: CheckoutIn,
    checkouts: CheckoutsDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> CheckoutOut:
    """Reserve the cart's stock, create the order and its PaymentIntent, and answer at once."""
    created, first = await checkouts.start(body, idempotency_key)
    response.status_code = 201 if first else 200
    return CheckoutOut.model_validate(created.model_dump())


@router.get("/checkouts/{checkout_id}", responses={404: {"model": ErrorBody}})
async def get_checkout(checkout_id: uuid.UUID, checkouts: CheckoutsDep) -> CheckoutStateOut:
    """The live state of the checkout's saga, read from its workflow."""
    state = await checkouts.state(checkout_id)
    return CheckoutStateOut.model_validate(state.model_dump())
