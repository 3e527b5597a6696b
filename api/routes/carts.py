"""Server-side carts: create, read (priced today), set a line, delete, merge a guest's in."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request, Response

from api.cart_access import CartCallerDep, IfMatchDep, etag
from api.cart_schemas import CartCreatedOut, CartIn, CartItemIn, CartMergeIn, CartOut
from api.client_address import rate_limit_identity
from api.deps import CartsDep, ServicesDep, client_address
from api.routes.admin import SkuPath
from api.schemas import ErrorBody
from core.carts import CartView

router = APIRouter(prefix="/carts", tags=["carts"])

_ETAG = {"ETag": {"description": "the cart's version, quoted", "schema": {"type": "string"}}}
ACCESS_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "no credential, or one that does not verify"},
    404: {"model": ErrorBody, "description": "no such cart, expired, or not the caller's"},
}
CHANGE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ACCESS_ERRORS,
    409: {"model": ErrorBody, "description": "invalid_state: the cart is not open"},
    412: {"model": ErrorBody, "description": "version_conflict: If-Match is stale"},
}


def _answer(response: Response, view: CartView) -> CartOut:
    response.headers["ETag"] = etag(view.version)
    return CartOut.of(view)


@router.post(
    "",
    status_code=201,
    responses={
        201: {"description": "a new cart", "headers": _ETAG},
        200: {"model": CartOut, "description": "the customer's open cart, which existed"},
        401: {"model": ErrorBody, "description": "a credential that does not verify"},
        403: {"model": ErrorBody, "description": "an order token"},
        422: {
            "model": ErrorBody,
            "description": "validation_error, unknown_sku, quantity_limit_exceeded",
        },
        429: {
            "model": ErrorBody,
            "description": "rate_limited: RATE_LIMIT_CARTS from this address (or too many "
            "refused admin tokens)",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        },
    },
)
async def create_cart(
    request: Request,
    services: ServicesDep,
    caller: CartCallerDep,
    carts: CartsDep,
    response: Response,
    body: CartIn | None = None,
) -> CartCreatedOut | CartOut:
    """A new cart (a guest's comes with its cart_token), or the customer's open one (200)."""
    if not caller.admin:
        # Every guest cart is a row until CART_TTL: an address may open so many a minute.
        identity = rate_limit_identity(client_address(request))
        await services.cart_limiter.hit(identity, too_many="carts")
    view, created = await carts.create(caller, body.lines() if body else {})
    response.headers["ETag"] = etag(view.version)
    if not created:
        response.status_code = 200
    return CartCreatedOut.of(view) if view.token else CartOut.of(view)


@router.get("/{cart_id}", responses={200: {"headers": _ETAG}, **ACCESS_ERRORS})
async def get_cart(
    cart_id: uuid.UUID, caller: CartCallerDep, carts: CartsDep, response: Response
) -> CartOut:
    """The cart with today's prices and whether the stock is there for each line."""
    return _answer(response, await carts.get(cart_id, caller))


@router.put(
    "/{cart_id}/items/{sku}",
    responses={
        200: {"headers": _ETAG},
        **CHANGE_ERRORS,
        422: {
            "model": ErrorBody,
            "description": "validation_error (also: another currency), unknown_sku, "
            "quantity_limit_exceeded",
        },
    },
)
async def put_cart_item(
    cart_id: uuid.UUID,
    sku: SkuPath,
    body: CartItemIn,
    caller: CartCallerDep,
    carts: CartsDep,
    if_match: IfMatchDep,
    response: Response,
) -> CartOut:
    """Set the quantity of one SKU in the cart; 0 removes the line."""
    view = await carts.put_item(cart_id, sku, body.quantity, caller, if_match=if_match)
    return _answer(response, view)


@router.delete(
    "/{cart_id}",
    status_code=204,
    response_class=Response,
    responses={204: {"headers": _ETAG}, **CHANGE_ERRORS},
)
async def delete_cart(
    cart_id: uuid.UUID, caller: CartCallerDep, carts: CartsDep, if_match: IfMatchDep
) -> Response:
    """Delete the cart (it stays readable, as `deleted`); deleting it again is 204 again."""
    version = await carts.delete(cart_id, caller, if_match=if_match)
    return Response(status_code=204, headers={"ETag": etag(version)})


@router.post(
    "/{cart_id}/merge",
    responses={
        200: {"headers": _ETAG},
        **CHANGE_ERRORS,
        403: {"model": ErrorBody, "description": "not a customer token (or admin)"},
        422: {"model": ErrorBody, "description": "validation_error (also: another currency)"},
    },
)
async def merge_cart(
    cart_id: uuid.UUID,
    body: CartMergeIn,
    caller: CartCallerDep,
    carts: CartsDep,
    if_match: IfMatchDep,
    response: Response,
) -> CartOut:
    """Join a guest cart's lines to the customer's cart and close the guest cart; repeating
    it changes nothing more."""
    view = await carts.merge(cart_id, body.guest_cart_token, caller, if_match=if_match)
    return _answer(response, view)
