"""Checkouts whose payment window has ended while their stock is still reserved.

Normally the checkout's workflow settles them the moment the window ends, so rows found here
either belong to a workflow that is about to (or is waiting out Stripe's `processing`), or to
one that will never run again: terminated, reset, timed out or deleted by an operator. The
reconciler tells the two apart through Temporal; this store only reads the database.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import text

from core.db import SessionFactory

# Served by the partial index `ix_reservations_active_expires_at`. Only pending orders: an
# order in a final state never holds an active reservation (the invariant check reports one
# that does), and settling goes through the order's status anyway. The newest payment row is
# the checkout's PaymentIntent; none means its creation never answered.
_EXPIRED_PENDING = text(
    """
    SELECT r.checkout_id, o.id AS order_id, o.total AS amount, o.currency,
           p.payment_intent_id, min(r.expires_at) AS expires_at
    FROM reservations r
    JOIN orders o ON o.checkout_id = r.checkout_id AND o.status = 'pending_payment'
    LEFT JOIN LATERAL (
        SELECT payment_intent_id FROM payments
        WHERE payments.order_id = o.id ORDER BY payments.id DESC LIMIT 1
    ) p ON true
    WHERE r.status = 'active' AND r.expires_at <= now()
    GROUP BY r.checkout_id, o.id, o.total, o.currency, p.payment_intent_id
    -- Keyset paging: the caller pages past checkouts whose workflow still runs.
    HAVING (min(r.expires_at), r.checkout_id) > (:after_expires_at, :after_checkout_id)
    ORDER BY min(r.expires_at), r.checkout_id
    LIMIT :limit
    """
)


@dataclass(frozen=True)
class ExpiredCheckout:
    checkout_id: uuid.UUID
    order_id: uuid.UUID
    amount: int
    currency: str
    payment_intent_id: str | None
    expires_at: datetime


class ReconciliationStore:
    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions

    async def expired_pending(
        self, limit: int, *, after: ExpiredCheckout | None = None
    ) -> list[ExpiredCheckout]:
        """Pending orders whose reservation's window has ended, oldest window first, after
        `after` (the last of the previous page)."""
        params = {
            "limit": limit,
            "after_expires_at": after.expires_at if after else datetime.min.replace(tzinfo=UTC),
            "after_checkout_id": after.checkout_id if after else uuid.UUID(int=0),
        }
        async with self._sessions() as session:
            rows = (await session.execute(_EXPIRED_PENDING, params)).all()
        return [
            ExpiredCheckout(
                checkout_id=row.checkout_id,
                order_id=row.order_id,
                amount=int(row.amount),
                currency=row.currency,
                payment_intent_id=row.payment_intent_id,
                expires_at=row.expires_at,
            )
            for row in rows
        ]
