"""Idempotency-Keys that outlive Temporal: each key, in its scope, is claimed in PostgreSQL
before its checkout's workflow starts, with the request's fingerprint and the (random) checkout
and order ids it stands for, and kept until it expires.

Concurrent duplicates meet on the claim: they take turns on an advisory lock of the key, the
first claims it, the others read the claim and join the same workflow. A retry after the
workflow's history is gone (retention, `temporal workflow delete`) is answered from the order
and payment rows the checkout recorded, never by a second run. A key whose checkout was
refused (nothing kept) is released in the transaction that closes it, so the client may try
the key again.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, text
from sqlalchemy.ext.asyncio import AsyncSession

from core.catalog import PricedLine
from core.db import SessionFactory, autocommit
from core.errors import Unavailable
from core.models import CHECKOUT_KEYS


@dataclass(frozen=True)
class KeyClaim:
    checkout_id: uuid.UUID
    order_id: uuid.UUID
    fingerprint: str
    # True for the request that claimed the key: its checkout is new.
    claimed: bool


@dataclass(frozen=True)
class RecordedCheckout:
    """A checkout's answer as its rows recorded it, once its PaymentIntent exists."""

    checkout_id: uuid.UUID
    order_id: uuid.UUID
    order_status: str
    currency: str
    lines: tuple[PricedLine, ...]
    subtotal: int
    discount: int
    tax: int
    shipping: int
    total: int
    expires_at: datetime
    payment_intent_id: str
    payment_status: str
    client_secret_sealed: str | None


# Concurrent requests of one key take turns (transaction-scoped: released at commit).
_LOCK_KEY = text("SELECT pg_advisory_xact_lock(hashtextextended(:scope || chr(31) || :key, 0))")

# The claim: a new key, or one whose time is up, takes this request's ids; nothing comes back
# if the key is live, or expired while its checkout still waits for payment.
_CLAIM = text(
    """
    INSERT INTO checkout_keys (scope, key, fingerprint, checkout_id, order_id, expires_at)
    VALUES (:scope, :key, :fingerprint, :checkout_id, :order_id,
            now() + make_interval(secs => :ttl))
    ON CONFLICT (scope, key) DO UPDATE SET
        fingerprint = excluded.fingerprint, checkout_id = excluded.checkout_id,
        order_id = excluded.order_id, created_at = now(), expires_at = excluded.expires_at
    WHERE checkout_keys.expires_at <= now() AND NOT EXISTS (
        SELECT 1 FROM orders
        WHERE orders.checkout_id = checkout_keys.checkout_id AND status = 'pending_payment'
    )
    RETURNING checkout_id, order_id
    """
)

# The live claim of a key and, once its checkout has opened and has its PaymentIntent, what
# it recorded: one round trip for a duplicate.
_RECORDED = text(
    """
    SELECT k.checkout_id, k.order_id, k.fingerprint,
           o.status AS order_status, o.currency, o.subtotal, o.discount, o.tax, o.shipping,
           o.total, o.expires_at, p.payment_intent_id, p.status AS payment_status,
           p.client_secret_sealed,
           (SELECT json_agg(json_build_array(i.sku, i.name, i.unit_price, i.quantity)
                            ORDER BY i.sku)
            FROM order_items i WHERE i.order_id = o.id) AS lines
    FROM checkout_keys k
    LEFT JOIN orders o ON o.id = k.order_id AND o.checkout_id = k.checkout_id
    LEFT JOIN LATERAL (
        SELECT payment_intent_id, status, client_secret_sealed FROM payments
        WHERE payments.order_id = o.id ORDER BY id DESC LIMIT 1
    ) p ON true
    WHERE k.scope = :scope AND k.key = :key
      -- A key outlives its TTL while its checkout still waits for payment.
      AND (k.expires_at > now() OR o.status = 'pending_payment')
    """
)


def _recorded(row: Any) -> RecordedCheckout | None:
    if row.order_status is None or row.payment_intent_id is None:
        return None
    return RecordedCheckout(
        checkout_id=row.checkout_id,
        order_id=row.order_id,
        order_status=row.order_status,
        currency=row.currency,
        lines=tuple(PricedLine(*line) for line in row.lines or ()),
        subtotal=row.subtotal,
        discount=row.discount,
        tax=row.tax,
        shipping=row.shipping,
        total=row.total,
        expires_at=row.expires_at,
        payment_intent_id=row.payment_intent_id,
        payment_status=row.payment_status,
        client_secret_sealed=row.client_secret_sealed,
    )


class CheckoutKeyStore:
    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions

    async def find(self, scope: str, key: str) -> tuple[KeyClaim, RecordedCheckout | None] | None:
        """The live claim of `key` in `scope`, and what its checkout recorded once it has
        opened with its PaymentIntent; None if nobody holds the key."""
        async with self._sessions() as session:
            await autocommit(session)
            return await self._find(session, scope, key)

    @staticmethod
    async def _find(
        session: AsyncSession, scope: str, key: str
    ) -> tuple[KeyClaim, RecordedCheckout | None] | None:
        row = (await session.execute(_RECORDED, {"scope": scope, "key": key})).one_or_none()
        if row is None:
            return None
        return KeyClaim(row.checkout_id, row.order_id, row.fingerprint, claimed=False), _recorded(
            row
        )

    async def claim(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        *,
        ttl_seconds: int,
        before_claiming: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[KeyClaim, RecordedCheckout | None]:
        """Claim `key` in `scope` for a new checkout, or find the checkout that holds it.

        Runs under a transaction-scoped advisory lock on the key, so that concurrent requests
        of one key take turns: the first finds nothing, calls `before_claiming` (the rate
        limits: a refusal raises and leaves no claim behind) and claims the key; the others
        then find its claim. Returns the claim and, for a checkout that has opened and has its
        PaymentIntent, what it recorded. The caller compares fingerprints: a claim is never
        changed by a request with another body.
        """
        checkout_id, order_id = uuid.uuid4(), uuid.uuid4()
        async with self._sessions.begin() as session:
            await session.execute(_LOCK_KEY, {"scope": scope, "key": key})
            # A statement of its own, after the lock: its snapshot sees the last holder's claim.
            found = await self._find(session, scope, key)
            if found is not None:
                return found
            if before_claiming is not None:
                await before_claiming()
            claimed = (
                await session.execute(
                    _CLAIM,
                    {
                        "scope": scope,
                        "key": key,
                        "fingerprint": fingerprint,
                        "checkout_id": checkout_id,
                        "order_id": order_id,
                        "ttl": ttl_seconds,
                    },
                )
            ).one_or_none()
            if claimed is None:
                # Held by an expired claim whose checkout still waits for payment (a payment
                # window outlived the key): the key still stands for that checkout.
                raise Unavailable(
                    "this Idempotency-Key's checkout is still open; try again in a moment"
                )
        return KeyClaim(checkout_id, order_id, fingerprint, claimed=True), None

    async def release_checkout(self, checkout_id: uuid.UUID) -> None:
        """Free the key of a checkout that ended without answering (its run was terminated
        before its order or PaymentIntent existed): its next request opens a new checkout."""
        async with self._sessions.begin() as session:
            await self.release(session, checkout_id)

    @staticmethod
    async def release(session: AsyncSession, checkout_id: uuid.UUID) -> None:
        """Free the key of a checkout that was refused (inside the transaction closing it)."""
        await session.execute(
            delete(CHECKOUT_KEYS).where(CHECKOUT_KEYS.c.checkout_id == checkout_id)
        )

    async def delete_expired(self, *, limit: int = 1000) -> int:
        """Forget keys whose time is up; returns how many. (An expired key is also claimed
        anew by its next request, so this is housekeeping, not correctness.)"""
        async with self._sessions.begin() as session:
            result = await session.execute(
                text(
                    "DELETE FROM checkout_keys WHERE ctid IN (SELECT ctid FROM checkout_keys"
                    " WHERE expires_at <= now() LIMIT :limit)"
                ),
                {"limit": limit},
            )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
