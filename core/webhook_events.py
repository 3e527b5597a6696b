"""The webhook inbox: every verified Stripe event recorded once, by its event id.

The row is written in the transaction that acts on the event (signals its checkout, say): if
acting fails, nothing is recorded and Stripe's retry is not mistaken for a duplicate. Which
checkout a PaymentIntent event belongs to is read from our own payments table (the checkout
that recorded that PaymentIntent id), never from the event's metadata.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import update

from core.db import SessionFactory, Sql
from core.models import PROCESSED_WEBHOOK_EVENTS

# Insert the event (nothing comes back for a duplicate) with the checkout that recorded its
# PaymentIntent, in one round trip.
_RECORD = Sql(
    """
    WITH ours AS (
        SELECT o.checkout_id, o.id AS order_id, o.status FROM payments p
        JOIN orders o ON o.id = p.order_id
        WHERE p.payment_intent_id = :intent_id
    ), new AS (
        INSERT INTO processed_webhook_events (event_id, type, checkout_id, outcome, payload)
        VALUES (:event_id, :type, (SELECT checkout_id FROM ours), :outcome,
                CAST(:payload AS jsonb))
        ON CONFLICT (event_id) DO NOTHING
        RETURNING event_id
    )
    SELECT (SELECT checkout_id FROM ours) AS checkout_id, (SELECT order_id FROM ours) AS order_id,
           (SELECT status FROM ours) AS order_status
    FROM new
    """
)


@dataclass
class Receipt:
    """A new event, and the checkout whose PaymentIntent it is about (if it is ours)."""

    event_id: str
    checkout_id: uuid.UUID | None
    order_id: uuid.UUID | None
    order_status: str | None
    outcome: str


class WebhookEventStore:
    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions

    @asynccontextmanager
    async def receive(
        self, event: dict[str, Any], *, intent_id: str | None, expected_outcome: str
    ) -> AsyncIterator[Receipt | None]:
        """Record the event and yield its receipt, or None for a duplicate. The caller acts
        inside the block and sets `receipt.outcome`; the row commits when the block ends (a
        raise records nothing). `expected_outcome` is written with the row: the usual case
        costs no second statement."""
        async with self._sessions.begin() as session:
            row = await _RECORD.one_or_none(
                session,
                {
                    "event_id": event["id"],
                    "type": event["type"],
                    "intent_id": intent_id,
                    "outcome": expected_outcome,
                    "payload": json.dumps(event),
                },
            )
            if row is None:
                yield None
                return
            receipt = Receipt(
                event["id"], row.checkout_id, row.order_id, row.order_status, expected_outcome
            )
            yield receipt
            if receipt.outcome != expected_outcome:
                await session.execute(
                    update(PROCESSED_WEBHOOK_EVENTS)
                    .where(PROCESSED_WEBHOOK_EVENTS.c.event_id == receipt.event_id)
                    .values(outcome=receipt.outcome)
                )
