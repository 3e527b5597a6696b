"""Order events (`events.md`): their body, and how a change writes its event.

Every order status change (and a declined payment attempt, and a partial refund) writes exactly
one event, in the transaction of the change and under the order's row lock: the statement that
changes the order increments `orders.event_sequence` and inserts the event with the new value,
so an order's events count from 1 with no gaps, in the order the changes committed. The
payload is built inside that same statement (`jsonb_build_object` over the order's rows), so
announcing a change costs no round trip of its own. The envelope's other fields are the
outbox row's columns; `EventBody` puts the two together, for the relay and the admin feed
alike, so both serve the same bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol

from pydantic import AwareDatetime, BaseModel, ConfigDict, PlainSerializer, WithJsonSchema
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from core.vocabulary import EventType, OrderStatus

# ISO 8601 with an explicit offset, always UTC: "2026-12-02T10:00:00.123456+00:00".
Timestamp = Annotated[
    AwareDatetime,
    PlainSerializer(lambda value: value.astimezone(UTC).isoformat(), return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


class _Contract(BaseModel):
    # A payload that does not fit the contract fails loudly instead of being published.
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventCustomer(_Contract):
    email: str
    user_id: str | None


class EventTotals(_Contract):
    subtotal: int
    discount: int
    tax: int
    shipping: int
    total: int


class EventItem(_Contract):
    sku: str
    name: str
    unit_price: int
    quantity: int
    line_total: int


class EventPayload(_Contract):
    order_id: uuid.UUID
    checkout_id: uuid.UUID
    status: OrderStatus
    customer: EventCustomer
    currency: str
    totals: EventTotals
    items: list[EventItem]
    payment_intent_id: str | None
    reason: str | None


class EventBody(_Contract):
    """The message body of `events.md`, exactly."""

    event_id: uuid.UUID
    event_type: EventType
    occurred_at: Timestamp
    aggregate_id: uuid.UUID
    sequence: int
    payload: EventPayload

    @classmethod
    def of(cls, row: OutboxRow) -> EventBody:
        return cls(
            event_id=row.event_id,
            event_type=EventType(row.event_type),
            occurred_at=row.occurred_at,
            aggregate_id=row.aggregate_id,
            sequence=row.sequence,
            payload=EventPayload.model_validate(row.payload),
        )

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


class OutboxRow(Protocol):
    """The columns of an outbox row that make its body."""

    @property
    def event_id(self) -> uuid.UUID: ...
    @property
    def event_type(self) -> str: ...
    @property
    def occurred_at(self) -> datetime: ...
    @property
    def aggregate_id(self) -> uuid.UUID: ...
    @property
    def sequence(self) -> int: ...
    @property
    def payload(self) -> dict[str, Any]: ...


# What a statement that changes an order returns of it: everything its payload needs.
ORDER_COLUMNS = (
    "id, checkout_id, status, customer_email, customer_user_id, currency, subtotal, discount,"
    " tax, shipping, total, event_sequence"
)


def items_of(order: str) -> str:
    """SQL: the order's lines as the payload's `items`, by SKU."""
    return f"""(SELECT coalesce(jsonb_agg(jsonb_build_object(
                    'sku', i.sku, 'name', i.name, 'unit_price', i.unit_price,
                    'quantity', i.quantity, 'line_total', i.line_total) ORDER BY i.sku),
                    '[]'::jsonb)
                FROM order_items i WHERE i.order_id = {order}.id)"""  # noqa: S608 - an alias


def intent_of(order: str) -> str:
    """SQL: the order's PaymentIntent (its latest), or null."""
    return (
        f"(SELECT p.payment_intent_id FROM payments p WHERE p.order_id = {order}.id"  # noqa: S608
        " ORDER BY p.id DESC LIMIT 1)"
    )


def payload_sql(
    order: str,
    *,
    items: str | None = None,
    payment_intent_id: str | None = None,
    reason: str = "CAST(:reason AS text)",
) -> str:
    """SQL building the payload from `order`, a row with `ORDER_COLUMNS` (a CTE's RETURNING
    in the statement that changed it), in the contract's shape."""
    return f"""jsonb_build_object(
        'order_id', {order}.id, 'checkout_id', {order}.checkout_id, 'status', {order}.status,
        'customer', jsonb_build_object('email', {order}.customer_email,
                                       'user_id', {order}.customer_user_id),
        'currency', {order}.currency,
        'totals', jsonb_build_object('subtotal', {order}.subtotal, 'discount', {order}.discount,
                                     'tax', {order}.tax, 'shipping', {order}.shipping,
                                     'total', {order}.total),
        'items', {items or items_of(order)},
        'payment_intent_id', {payment_intent_id or intent_of(order)},
        'reason', {reason})"""


def dedupe_key(order_id: uuid.UUID, event_type: EventType, detail: str | None = None) -> str:
    """One event per (order, type), or per (order, type, detail) for those an order may have
    several of (declined attempts, partial refunds)."""
    key = f"{order_id}:{event_type}"
    return f"{key}:{detail}" if detail else key


# The status change (or, with `status` equal to the current one, the order's touch) and its
# event, in one statement; nothing at all unless the order is in one of `expected`.
_WRITE_EVENT = text(
    f"""
    WITH changed AS (
        UPDATE orders SET status = :status, event_sequence = event_sequence + 1,
                          updated_at = now()
        WHERE id = :order_id AND status = ANY(CAST(:expected AS text[]))
        RETURNING {ORDER_COLUMNS}
    )
    INSERT INTO outbox (event_type, aggregate_id, sequence, payload, dedupe_key)
    SELECT :event_type, changed.id, changed.event_sequence, {payload_sql("changed")},
           :dedupe_key
    FROM changed
    RETURNING sequence
    """  # noqa: S608 - constant SQL, assembled at import
)


async def write_event(
    session: AsyncSession,
    order_id: uuid.UUID,
    event_type: EventType,
    *,
    status: OrderStatus,
    expected: Iterable[OrderStatus],
    reason: str | None,
    dedupe_key: str,
) -> bool:
    """Move the order to `status` and write its event with the next sequence, if the order is
    in one of `expected`; True if it was. Call it under the order's row lock, taken before the
    transaction's first write (see core/event_feed.py for why)."""
    written = await session.execute(
        _WRITE_EVENT,
        {
            "order_id": order_id,
            "status": status,
            "expected": list(expected),
            "event_type": event_type,
            "reason": reason,
            "dedupe_key": dedupe_key,
        },
    )
    return written.scalar_one_or_none() is not None
