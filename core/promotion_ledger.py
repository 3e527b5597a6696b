"""Promotion uses, reserved like stock: one use per checkout, reserved in the transaction that
reserves its stock, committed with the stock on payment, released with it on every other end.

Correctness does not rest on this code alone: CHECKs on `promotions` and
`promotion_customer_uses` refuse `used + reserved` above the limits (migration 0005). The code
never tries: it locks the promotion's row (after the stock rows, always: the fixed order that
keeps concurrent checkouts from deadlocking), checks both limits under that lock, then counts.
Each checkout's use is a `promotion_uses` row, so a retry or a duplicate never counts twice:
`active` -> `committed` | `released`, each move once.
"""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import NotFound, PromotionExhausted
from core.vocabulary import ReservationStatus

ACTIVE = ReservationStatus.ACTIVE
COMMITTED = ReservationStatus.COMMITTED
RELEASED = ReservationStatus.RELEASED

# The promotion's row, locked: the mutex of every change to its uses (reservations, moves, an
# operator's new limits). Alone in its statement: READ COMMITTED re-reads only the locked row
# once the lock is granted, so anything else read here could be from before the lock.
_LOCK_PROMOTION = text(
    "SELECT code, used, reserved, usage_limit, per_customer_limit FROM promotions"
    " WHERE code_key = :code_key FOR UPDATE"
)
# Then, in a statement whose snapshot follows the lock (so every change made under it is
# seen): whether this checkout holds a use already, and what this customer holds.
_HELD = text(
    """
    SELECT EXISTS (SELECT 1 FROM promotion_uses WHERE checkout_id = :checkout_id) AS held,
           coalesce((SELECT used + reserved FROM promotion_customer_uses
                     WHERE code_key = :code_key AND customer_scope = :scope), 0)
               AS customer_holds
    """
)
# The checkout's use, the promotion's count and the customer's (created at its first use,
# with a copy of the limit for its CHECK), in one statement under the promotion's lock.
_RESERVE = text(
    """
    WITH use AS (
        INSERT INTO promotion_uses (checkout_id, code_key, customer_scope, order_id, discount,
                                    status)
        VALUES (:checkout_id, :code_key, :scope, :order_id, :discount, 'active')
    ), total AS (
        UPDATE promotions SET reserved = reserved + 1, updated_at = now()
        WHERE code_key = :code_key
    )
    INSERT INTO promotion_customer_uses (code_key, customer_scope, used, reserved,
                                         customer_limit)
    VALUES (:code_key, :scope, 0, 1, :limit)
    ON CONFLICT (code_key, customer_scope)
    DO UPDATE SET reserved = promotion_customer_uses.reserved + 1
    """
)
# A move takes the checkout's use from `active` to `:target` and moves one count from
# `reserved` to `used` (`:used` = 1: committed) or off (`:used` = 0: released). First the
# promotion's row is locked through the checkout's active use: the order every transaction
# takes (stock, promotion, customer), which a single statement's CTEs would not keep (the
# data-modifying CTEs nobody reads run after the main statement, last one first). Moves of one
# checkout are serialised by its order's row lock, which the callers hold.
_LOCK_MOVING = text(
    """
    SELECT u.code_key, u.customer_scope
    FROM promotion_uses u JOIN promotions p ON p.code_key = u.code_key
    WHERE u.checkout_id = :checkout_id AND u.status = 'active'
    FOR UPDATE OF p
    """
)
_MOVE = text(
    """
    WITH moved AS (
        UPDATE promotion_uses SET status = :target, updated_at = now()
        WHERE checkout_id = :checkout_id AND status = 'active'
    ), total AS (
        UPDATE promotions SET reserved = reserved - 1, used = used + :used, updated_at = now()
        WHERE code_key = :code_key
    )
    UPDATE promotion_customer_uses SET reserved = reserved - 1, used = used + :used
    WHERE code_key = :code_key AND customer_scope = :scope
    """
)


def refuse_if_exhausted(
    code: str,
    *,
    usage_limit: int | None,
    held: int,
    per_customer_limit: int | None,
    customer_held: int,
) -> None:
    """`PromotionExhausted` unless a use is left: in total (`held`: used + reserved) and for the
    customer (`customer_held`). The checkout asks under the promotion's lock, the quote
    without one (advice)."""
    if usage_limit is not None and held >= usage_limit:
        raise PromotionExhausted(code, usage_limit, "total")
    if per_customer_limit is not None and customer_held >= per_customer_limit:
        raise PromotionExhausted(code, per_customer_limit, "customer")


class PromotionLedger:
    """Each method runs inside the caller's transaction (the one that moves the stock)."""

    @staticmethod
    async def reserve(
        session: AsyncSession,
        *,
        checkout_id: uuid.UUID,
        order_id: uuid.UUID,
        code_key: str,
        customer_scope: str,
        discount: int,
    ) -> bool:
        """Reserve one use of the promotion for this checkout; True if this call reserved it,
        False if the checkout already holds it. Raises `PromotionExhausted` (scope `total` or
        `customer`) with nothing reserved, or `NotFound` if the promotion is gone."""
        params = {"checkout_id": checkout_id, "code_key": code_key, "scope": customer_scope}
        promotion = (await session.execute(_LOCK_PROMOTION, params)).one_or_none()
        if promotion is None:
            raise NotFound(f"no promotion {code_key}", details={"code": code_key})
        held = (await session.execute(_HELD, params)).one()
        if held.held:
            return False
        refuse_if_exhausted(
            promotion.code,
            usage_limit=promotion.usage_limit,
            held=promotion.used + promotion.reserved,
            per_customer_limit=promotion.per_customer_limit,
            customer_held=held.customer_holds,
        )
        await session.execute(
            _RESERVE,
            {
                **params,
                "order_id": order_id,
                "discount": discount,
                "limit": promotion.per_customer_limit,
            },
        )
        return True

    @staticmethod
    async def commit(session: AsyncSession, checkout_id: uuid.UUID) -> bool:
        """The order is paid: its use counts as used. True if this call moved it."""
        return await PromotionLedger._move(session, checkout_id, COMMITTED, used=1)

    @staticmethod
    async def release(session: AsyncSession, checkout_id: uuid.UUID) -> bool:
        """The checkout ended unpaid: its use is free again. True if this call moved it."""
        return await PromotionLedger._move(session, checkout_id, RELEASED, used=0)

    @staticmethod
    async def _move(
        session: AsyncSession, checkout_id: uuid.UUID, target: str, *, used: int
    ) -> bool:
        use = (await session.execute(_LOCK_MOVING, {"checkout_id": checkout_id})).one_or_none()
        if use is None:
            return False  # no use, or moved already
        await session.execute(
            _MOVE,
            {
                "checkout_id": checkout_id,
                "target": target,
                "used": used,
                "code_key": use.code_key,
                "scope": use.customer_scope,
            },
        )
        return True
