"""Server-side carts (`carts-and-pricing.md`, "Carts"): a guest's, reached by the token it was
given at creation (only the token's sha256 is stored), or a customer's, one open cart per
`sub`; admin reaches every cart.

A cart is a wish list: it holds SKUs and quantities, never prices. Every read prices its lines
from today's catalog and tells whether the stock is there now; checkout decides. Every change
bumps `version` in the transaction that makes it, under the cart row's lock, so concurrent
changes serialize on that row and none is lost.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import delete, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from core.catalog import Inventory, PricedLine, check_quantity_limits, load_products
from core.customers import customer_scope
from core.db import SessionFactory
from core.errors import (
    ErrorCode,
    Forbidden,
    InvalidState,
    NotFound,
    ServiceError,
    Unauthorized,
    UnknownSku,
    VersionConflict,
)
from core.models import Cart, CartItem, Product, Stock
from core.pricing import Totals, compute_totals

CART_TOKEN_PREFIX = "ct_"  # noqa: S105 (a prefix, not a secret)
# `ct_` + secrets.token_urlsafe(32): 256 random bits, 43 base64url characters.
CART_TOKEN_PATTERN = r"^ct_[A-Za-z0-9_-]{43}$"  # noqa: S105 (a shape, not a secret)
CART_TOKEN = re.compile(CART_TOKEN_PATTERN)
# The cart_items CHECK: one line holds 1..1000 units.
MAX_LINE_QUANTITY = 1000


class CartStatus(StrEnum):
    """`open` takes changes; the others are final: `checked_out` (its order was paid),
    `merged` (into a customer's cart), `deleted`, `expired` (a guest cart past CART_TTL)."""

    OPEN = "open"
    CHECKED_OUT = "checked_out"
    MERGED = "merged"
    DELETED = "deleted"
    EXPIRED = "expired"


class CartNotOpen(InvalidState):
    """A checkout of a cart that is checked out, merged, deleted or expired (409)."""


@dataclass(frozen=True)
class CartCaller:
    """What a request presents to carts, built at the edge from its credentials.

    `authenticated`: a valid `Authorization` credential came with it (an order token counts,
    though it reaches no cart); with none and no cart token the caller is anonymous (401)."""

    admin: bool = False
    user_id: str | None = None  # a customer's `sub`
    cart_token: str | None = None  # a guest cart's token
    authenticated: bool = False

    @property
    def scope(self) -> str | None:
        """The `customer_scope` of this customer's carts (`user:<sub>`)."""
        return customer_scope(self.user_id, "") if self.user_id else None

    def require_credential(self) -> None:
        if not (self.authenticated or self.cart_token):
            raise Unauthorized(
                "this route needs a credential: the cart's token (X-Cart-Token), a customer"
                " token or the admin token"
            )


@dataclass(frozen=True)
class CartLine(PricedLine):
    currency: str
    # Whether the stock there now (on_hand - reserved) covers the line's quantity.
    available: bool


@dataclass(frozen=True)
class CartView:
    id: uuid.UUID
    status: str
    version: int
    lines: tuple[CartLine, ...]
    updated_at: datetime
    # Only on the answer that created a guest cart: the one time the token is seen in clear.
    token: str | None = None

    @property
    def currency(self) -> str | None:
        """The lines' currency; None when empty (or when a product's currency changed since
        it was added, which checkout refuses)."""
        currencies = {line.currency for line in self.lines}
        return currencies.pop() if len(currencies) == 1 else None

    @property
    def totals(self) -> Totals:
        """A cart has no address and no promotion: only its subtotal counts."""
        return compute_totals(sum(line.line_total for line in self.lines))


def new_token() -> tuple[str, str]:
    """A guest cart's token and the hash that is stored in its place."""
    token = CART_TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _not_found(cart_id: uuid.UUID) -> NotFound:
    return NotFound(f"no cart {cart_id}", details={"cart_id": str(cart_id)})


def _mixed_currencies(currencies: set[str]) -> ServiceError:
    return ServiceError(
        f"the cart would mix currencies ({', '.join(sorted(currencies))}); a cart has one",
        code=ErrorCode.VALIDATION_ERROR,
        details={"currencies": sorted(currencies)},
    )


def _admit(products: Mapping[str, Any], items: Mapping[str, int], currencies: set[str]) -> None:
    """Refuse lines the cart cannot hold: `UnknownSku`, `QuantityLimitExceeded` (above a
    product's max_per_order), or validation_error for a currency besides `currencies` (those
    of the cart's other lines)."""
    too_many = sorted(sku for sku, quantity in items.items() if quantity > MAX_LINE_QUANTITY)
    if too_many:
        raise ServiceError(
            f"a cart line holds at most {MAX_LINE_QUANTITY} units: {', '.join(too_many)}",
            code=ErrorCode.VALIDATION_ERROR,
            details=[{"sku": sku, "requested": items[sku]} for sku in too_many],
        )
    missing = sorted(sku for sku in items if sku not in products)
    if missing:
        raise UnknownSku(missing)
    check_quantity_limits(products, items)
    wanted = currencies | {products[sku].currency for sku in items}
    if len(wanted) > 1:
        raise _mixed_currencies(wanted)


def _cap(product: Any) -> int:
    limit: int | None = product.max_per_order
    return MAX_LINE_QUANTITY if limit is None else min(limit, MAX_LINE_QUANTITY)


_LAPSED = (Cart.expires_at <= func.now()).label("lapsed")


class CartStore:
    def __init__(self, sessions: SessionFactory, *, ttl_seconds: int) -> None:
        self._sessions = sessions
        # Guest carts expire this long after their last change (CART_TTL).
        self.ttl_seconds = ttl_seconds

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, cart_id: uuid.UUID, caller: CartCaller) -> CartView:
        """The cart, priced today, if the caller reaches it and it has not expired."""
        async with self._sessions() as session:
            cart = await self._reached(session, cart_id, caller)
            return await self._view(session, cart)

    async def checkout_lines(self, cart_id: uuid.UUID, caller: CartCaller) -> list[tuple[str, int]]:
        """The (sku, quantity) lines a checkout takes from this cart, by SKU. Raises
        `Unauthorized`/`NotFound` as the cart routes do, `CartNotOpen` (409) when the cart is
        not open and validation_error when it is empty."""
        async with self._sessions() as session:
            cart = await self._reached(session, cart_id, caller)
            if cart.status != CartStatus.OPEN:
                raise CartNotOpen(
                    f"cart {cart_id} is {cart.status}; only an open cart can be checked out",
                    details={"cart_id": str(cart_id), "status": cart.status},
                )
            lines = await self._items(session, cart_id)
        if not lines:
            raise ServiceError(
                f"cart {cart_id} is empty", code=ErrorCode.VALIDATION_ERROR, details=[]
            )
        return lines

    # -- changes -------------------------------------------------------------------------------

    async def create(self, caller: CartCaller, items: Mapping[str, int]) -> tuple[CartView, bool]:
        """A new cart, and True; for a customer who has an open cart already, that cart (its
        lines as they are: `items` is not applied) and False. A guest's or admin's new cart is
        a guest cart, answered with its token."""
        if caller.scope is None and not caller.admin and caller.authenticated:
            raise Forbidden("an order token cannot create a cart")
        async with self._sessions.begin() as session:
            products = await load_products(session, sorted(items))
            _admit(products, items, set())
            if caller.scope is not None:
                cart_id = await self._open_customer_cart(session, caller.scope)
                if cart_id is None:
                    existing = await self._customer_cart(session, caller.scope)
                    return await self._view(session, existing), False
                token = None
            else:
                cart_id = uuid.uuid4()
                token, hashed = new_token()
                await session.execute(
                    insert(Cart).values(
                        id=cart_id,
                        token_hash=hashed,
                        expires_at=self._guest_expiry(),
                    )
                )
            if items:
                await session.execute(
                    insert(CartItem),
                    [
                        {"cart_id": cart_id, "sku": sku, "quantity": quantity}
                        for sku, quantity in sorted(items.items())
                    ],
                )
            cart = (await session.execute(select(Cart).where(Cart.id == cart_id))).scalar_one()
            view = await self._view(session, cart)
        return replace(view, token=token), True

    async def put_item(
        self,
        cart_id: uuid.UUID,
        sku: str,
        quantity: int,
        caller: CartCaller,
        *,
        if_match: int | None = None,
    ) -> CartView:
        """Set a line's quantity (0 removes it). Setting what is there already changes
        nothing, and does not bump the version."""
        async with self._sessions.begin() as session:
            cart = await self._locked(session, cart_id, caller, if_match)
            products = await load_products(session, [sku])
            if sku not in products:
                raise UnknownSku([sku])
            if quantity == 0:
                changed = await session.scalar(
                    delete(CartItem)
                    .where(CartItem.cart_id == cart_id, CartItem.sku == sku)
                    .returning(CartItem.sku)
                )
            else:
                _admit(products, {sku: quantity}, await self._currencies(session, cart_id, sku))
                stmt = insert(CartItem).values(cart_id=cart_id, sku=sku, quantity=quantity)
                # No row back when the line holds that quantity already: nothing changed.
                changed = await session.scalar(
                    stmt.on_conflict_do_update(
                        index_elements=[CartItem.cart_id, CartItem.sku],
                        set_={"quantity": stmt.excluded.quantity, "updated_at": func.now()},
                        where=CartItem.quantity != stmt.excluded.quantity,
                    ).returning(CartItem.sku)
                )
            if changed is not None:
                cart = await self._bump(session, cart)
            return await self._view(session, cart)

    async def delete(
        self, cart_id: uuid.UUID, caller: CartCaller, *, if_match: int | None = None
    ) -> int:
        """Close the cart as `deleted` (again: nothing changes); returns its version."""
        async with self._sessions.begin() as session:
            cart = await self._locked(
                session, cart_id, caller, if_match, allow=(CartStatus.DELETED,)
            )
            if cart.status == CartStatus.DELETED:
                return cart.version
            return (await self._bump(session, cart, status=CartStatus.DELETED)).version

    async def merge(
        self,
        cart_id: uuid.UUID,
        guest_token: str,
        caller: CartCaller,
        *,
        if_match: int | None = None,
    ) -> CartView:
        """Join a guest cart's lines to this customer's cart: quantities of one SKU summed,
        capped at 1000 and at max_per_order; the guest cart becomes `merged`. A guest cart that
        is merged already adds nothing, so repeating a merge (even concurrently) changes
        nothing more."""
        caller.require_credential()
        if caller.scope is None and not caller.admin:
            raise Forbidden("merging a guest cart into a cart needs a customer token")
        guest_hash = token_hash(guest_token)
        async with self._sessions.begin() as session:
            # Both rows locked in one statement, in id order: two merges touching the same
            # carts wait for each other instead of deadlocking, and the second one sees the
            # guest cart as the first left it.
            rows = await session.execute(
                select(Cart, _LAPSED)
                .where(or_(Cart.id == cart_id, Cart.token_hash == guest_hash))
                .order_by(Cart.id)
                .with_for_update()
            )
            locked = {cart.id: (cart, lapsed) for cart, lapsed in rows}
            target = self._changeable(
                await self._reach(session, cart_id, locked.get(cart_id), caller), if_match
            )
            if target.customer_scope is None:
                raise InvalidState(
                    f"cart {cart_id} is a guest cart; only a customer's cart takes a merge",
                    details={"cart_id": str(cart_id)},
                )
            found = next(
                ((c, lapsed) for c, lapsed in locked.values() if c.token_hash == guest_hash),
                None,
            )
            if found is None or found[1] or found[0].status == CartStatus.EXPIRED:
                raise NotFound("no open guest cart has that token")
            guest = found[0]
            if guest.status == CartStatus.MERGED:
                return await self._view(session, target)
            if guest.status != CartStatus.OPEN:
                raise InvalidState(
                    f"the guest cart is {guest.status}; only an open cart can be merged",
                    details={"guest_cart_status": guest.status},
                )
            if await self._join(session, target.id, guest.id):
                target = await self._bump(session, target)
            await self._bump(session, guest, status=CartStatus.MERGED)
            return await self._view(session, target)

    async def expire(self) -> int:
        """Close the guest carts whose CART_TTL has run out as `expired`; how many. They are
        404 from the moment they lapse whether or not this ran; this makes it final."""
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(Cart)
                .where(
                    Cart.status == CartStatus.OPEN,
                    Cart.token_hash.is_not(None),
                    Cart.expires_at <= func.now(),
                )
                .values(status=CartStatus.EXPIRED, version=Cart.version + 1, updated_at=func.now())
                .execution_options(synchronize_session=False)
            )
        return int(result.rowcount)  # type: ignore[attr-defined]

    @staticmethod
    async def mark_checked_out(
        session: AsyncSession, cart_id: uuid.UUID, order_id: uuid.UUID
    ) -> None:
        """In the caller's transaction (the one that records the order as paid): the cart
        becomes `checked_out` with its order, if it is still open. Idempotent: a cart closed
        already (this order's, merged, deleted) is left as it is."""
        await session.execute(
            update(Cart)
            .where(Cart.id == cart_id, Cart.status == CartStatus.OPEN)
            .values(
                status=CartStatus.CHECKED_OUT,
                order_id=order_id,
                version=Cart.version + 1,
                updated_at=func.now(),
            )
            .execution_options(synchronize_session=False)
        )

    # -- helpers -------------------------------------------------------------------------------

    def _guest_expiry(self) -> Any:
        return func.now() + func.make_interval(0, 0, 0, 0, 0, 0, self.ttl_seconds)

    async def _reached(self, session: AsyncSession, cart_id: uuid.UUID, caller: CartCaller) -> Cart:
        """The cart, if the caller reaches it and it has not expired (any status)."""
        caller.require_credential()
        row = (await session.execute(select(Cart, _LAPSED).where(Cart.id == cart_id))).one_or_none()
        return await self._reach(
            session, cart_id, None if row is None else (row[0], row[1]), caller
        )

    async def _locked(
        self,
        session: AsyncSession,
        cart_id: uuid.UUID,
        caller: CartCaller,
        if_match: int | None,
        *,
        allow: tuple[str, ...] = (),
    ) -> Cart:
        """The cart locked for a change: reached (else 401/404), If-Match current (else 412)
        and open (else 409; `allow` names other statuses the change accepts)."""
        caller.require_credential()
        row = (
            await session.execute(select(Cart, _LAPSED).where(Cart.id == cart_id).with_for_update())
        ).one_or_none()
        cart = await self._reach(
            session, cart_id, None if row is None else (row[0], row[1]), caller
        )
        return self._changeable(cart, if_match, allow)

    @staticmethod
    async def _reach(
        session: AsyncSession,
        cart_id: uuid.UUID,
        row: tuple[Cart, bool | None] | None,
        caller: CartCaller,
    ) -> Cart:
        """The cart if the caller reaches it and it has not expired. Else 404, exactly as for
        a cart that does not exist; or 401 for a cart token that is malformed or that no cart
        was ever given (v2: an unknown credential is 401, one that does not reach 404)."""
        presented = None
        if caller.cart_token is not None:
            if not CART_TOKEN.fullmatch(caller.cart_token):
                raise Unauthorized("malformed cart token")
            presented = token_hash(caller.cart_token)
        if row is not None:
            cart, lapsed = row
            reached = (
                caller.admin
                or (cart.customer_scope is not None and cart.customer_scope == caller.scope)
                or (
                    cart.token_hash is not None
                    and presented is not None
                    and hmac.compare_digest(cart.token_hash, presented)
                )
            )
            if reached and not lapsed and cart.status != CartStatus.EXPIRED:
                return cart
        if presented is not None and not await session.scalar(
            select(Cart.id).where(Cart.token_hash == presented)
        ):
            raise Unauthorized("unknown cart token")
        raise _not_found(cart_id)

    @staticmethod
    def _changeable(cart: Cart, if_match: int | None, allow: tuple[str, ...] = ()) -> Cart:
        """The cart, if If-Match is current (else 412) and it is open (else 409; `allow` names
        other statuses a change accepts)."""
        if if_match is not None and if_match != cart.version:
            raise VersionConflict(
                f"cart {cart.id} is at version {cart.version}, not {if_match}; read it again",
                details={"current_version": cart.version},
            )
        if cart.status != CartStatus.OPEN and cart.status not in allow:
            raise InvalidState(
                f"cart {cart.id} is {cart.status}; only an open cart can be changed",
                details={"cart_id": str(cart.id), "status": cart.status},
            )
        return cart

    async def _bump(self, session: AsyncSession, cart: Cart, *, status: str | None = None) -> Cart:
        """Count a change: version + 1, and a guest cart's CART_TTL starts again."""
        values: dict[str, Any] = {"version": Cart.version + 1, "updated_at": func.now()}
        if cart.token_hash is not None:
            values["expires_at"] = self._guest_expiry()
        if status is not None:
            values["status"] = status
        bumped = await session.execute(
            update(Cart)
            .where(Cart.id == cart.id)
            .values(**values)
            .returning(Cart)
            .execution_options(populate_existing=True)
        )
        return bumped.scalar_one()

    @staticmethod
    async def _open_customer_cart(session: AsyncSession, scope: str) -> uuid.UUID | None:
        """A new open cart for the customer, or None if they have one: the partial unique
        index decides, so two concurrent first POSTs make one cart."""
        cart_id = uuid.uuid4()
        created = await session.scalar(
            insert(Cart)
            .values(id=cart_id, customer_scope=scope)
            .on_conflict_do_nothing(
                index_elements=[Cart.customer_scope],
                # The partial index's own predicate, as literals: PostgreSQL infers the arbiter
                # index from it at plan time, when a bound parameter has no value yet.
                index_where=text("status = 'open' AND customer_scope IS NOT NULL"),
            )
            .returning(Cart.id)
        )
        return created

    @staticmethod
    async def _customer_cart(session: AsyncSession, scope: str) -> Cart:
        cart = await session.scalar(
            select(Cart).where(Cart.customer_scope == scope, Cart.status == CartStatus.OPEN)
        )
        if cart is None:
            # Closed between our insert's conflict and this read (its checkout was paid).
            raise InvalidState("the customer's cart was just closed; try again")
        return cart

    @staticmethod
    async def _items(session: AsyncSession, cart_id: uuid.UUID) -> list[tuple[str, int]]:
        rows = await session.execute(
            select(CartItem.sku, CartItem.quantity)
            .where(CartItem.cart_id == cart_id)
            .order_by(CartItem.sku)
        )
        return [(sku, quantity) for sku, quantity in rows]

    @staticmethod
    async def _currencies(session: AsyncSession, cart_id: uuid.UUID, besides: str) -> set[str]:
        """The currencies of the cart's lines other than `besides`."""
        rows = await session.scalars(
            select(Product.currency)
            .distinct()
            .join(CartItem, CartItem.sku == Product.sku)
            .where(CartItem.cart_id == cart_id, CartItem.sku != besides)
        )
        return set(rows)

    async def _join(self, session: AsyncSession, target_id: uuid.UUID, guest_id: uuid.UUID) -> bool:
        """Add the guest cart's lines to the target's; whether any line changed."""
        guest = dict(await self._items(session, guest_id))
        if not guest:
            return False
        ours = dict(await self._items(session, target_id))
        products = await load_products(session, sorted(guest.keys() | ours.keys()))
        currencies = {products[sku].currency for sku in guest.keys() | ours.keys()}
        if len(currencies) > 1:
            raise _mixed_currencies(currencies)
        joined = {}
        for sku, quantity in sorted(guest.items()):
            have = ours.get(sku, 0)
            # Never below what the line holds now (a cap lowered since stays the operator's
            # business at checkout), never above the caps.
            want = max(have, min(have + quantity, _cap(products[sku])))
            if want != have:
                joined[sku] = want
        if not joined:
            return False
        stmt = insert(CartItem)
        await session.execute(
            stmt.on_conflict_do_update(
                index_elements=[CartItem.cart_id, CartItem.sku],
                set_={"quantity": stmt.excluded.quantity, "updated_at": func.now()},
            ),
            [{"cart_id": target_id, "sku": sku, "quantity": q} for sku, q in joined.items()],
        )
        return True

    @staticmethod
    async def _view(session: AsyncSession, cart: Cart) -> CartView:
        rows = await session.execute(
            select(
                CartItem.sku,
                CartItem.quantity,
                Product.name,
                Product.unit_price,
                Product.currency,
                Stock.on_hand,
                Stock.reserved,
            )
            .join(Product, Product.sku == CartItem.sku)
            .outerjoin(Stock, Stock.sku == CartItem.sku)
            .where(CartItem.cart_id == cart.id)
            .order_by(CartItem.sku)
        )
        lines = tuple(
            CartLine(
                sku=row.sku,
                name=row.name,
                unit_price=row.unit_price,
                quantity=row.quantity,
                currency=row.currency,
                available=Inventory(row.sku, row.on_hand or 0, row.reserved or 0).available
                >= row.quantity,
            )
            for row in rows
        )
        return CartView(
            id=cart.id,
            status=cart.status,
            version=cart.version,
            lines=lines,
            updated_at=cart.updated_at,
        )
