"""What a checkout or a quote prices: the body's lines or a server-side cart's."""

from __future__ import annotations

from api.schemas import LinesIn
from core.carts import CartCaller, CartStore
from core.errors import ErrorCode, ServiceError


async def requested_lines(
    body: LinesIn, carts: CartStore | None, caller: CartCaller | None
) -> list[tuple[str, int]]:
    """The lines a checkout or a quote prices: the body's `items`, or its server-side cart's as
    they are now (`CartStore.checkout_lines`: 401/404 for a caller it does not reach, 409 if it
    is not open, 422 if it is empty)."""
    if body.items is not None:
        return [(item.sku, item.quantity) for item in body.items]
    if carts is None or caller is None or body.cart_id is None:
        raise ServiceError(
            "this service takes no server-side carts", code=ErrorCode.VALIDATION_ERROR
        )
    return await carts.checkout_lines(body.cart_id, caller)
