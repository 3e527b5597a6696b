"""How a request presents itself to carts: its credentials as a `CartCaller`, and the version
its `If-Match` header names.

A guest cart's token comes in `X-Cart-Token: <token>`, or as `Authorization: Bearer ct_...`
(the contract names no header for it). Both at once must be the same token. Whatever else
`Authorization` carries is read as on every other route (admin, customer JWT, order token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials

from api.auth import Caller, CallerKind
from api.deps import ServicesDep, authenticate, bearer
from core.carts import CART_TOKEN, CART_TOKEN_PREFIX, CartCaller
from core.errors import Unauthorized

CART_TOKEN_HEADER = "X-Cart-Token"  # noqa: S105 (a header's name, not a secret)

# Declares the header in the OpenAPI document; `_cart_caller` does the checking.
cart_token_header = APIKeyHeader(
    name=CART_TOKEN_HEADER,
    scheme_name="CartToken",
    auto_error=False,
    description="a guest cart's cart_token (or send it as Authorization: Bearer ct_...)",
)


def cart_caller(caller: Caller, cart_token: str | None) -> CartCaller:
    """The cart view of a caller: what `CartStore` checks access with."""
    return CartCaller(
        admin=caller.is_admin,
        user_id=caller.user_id if caller.kind is CallerKind.CUSTOMER else None,
        cart_token=cart_token,
        authenticated=caller.kind is not CallerKind.GUEST,
    )


@dataclass(frozen=True)
class Credentials:
    """The caller as every route sees it, and a guest cart's token if one came."""

    caller: Caller
    cart_token: str | None

    @property
    def cart(self) -> CartCaller:
        return cart_caller(self.caller, self.cart_token)


async def _credentials(
    request: Request,
    services: ServicesDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    header_token: Annotated[str | None, Depends(cart_token_header)],
) -> Credentials:
    authorization = request.headers.get("authorization")
    bearer_token = None
    if authorization is not None:
        scheme, _sep, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip().startswith(CART_TOKEN_PREFIX):
            bearer_token, authorization = token.strip(), None
    if bearer_token and header_token and bearer_token != header_token:
        raise Unauthorized(f"two different cart tokens (Authorization and {CART_TOKEN_HEADER})")
    cart_token = header_token or bearer_token
    if cart_token is not None and not CART_TOKEN.fullmatch(cart_token):
        # On every route that reads it, a cart request or not (v2: a malformed credential).
        raise Unauthorized("malformed cart token")
    caller = await authenticate(request, services, authorization)
    return Credentials(caller, cart_token)


# For the routes that take a cart by id besides the rest (POST /checkout, the quote).
CredentialsDep = Annotated[Credentials, Depends(_credentials)]


async def _cart_caller(credentials: CredentialsDep) -> CartCaller:
    return credentials.cart


CartCallerDep = Annotated[CartCaller, Depends(_cart_caller)]

# A version as the ETag gives it ("3") or bare (3); `*` (any version) is no condition.
IF_MATCH_PATTERN = r'^\s*(\*|[0-9]{1,9}|"[0-9]{1,9}")\s*$'


async def _if_match(
    if_match: Annotated[
        str | None,
        Header(
            alias="If-Match",
            pattern=IF_MATCH_PATTERN,
            description="the cart version this change was made against (the ETag, e.g. "
            '"3", or 3); a stale one is refused with 412 version_conflict',
        ),
    ] = None,
) -> int | None:
    if if_match is None or if_match.strip() == "*":
        return None
    return int(if_match.strip().strip('"'))


IfMatchDep = Annotated[int | None, Depends(_if_match)]


def etag(version: int) -> str:
    """The ETag header of a cart at this version."""
    return f'"{version}"'
