"""Orders, their payments and their timeline. Status changes only ever move forward.

`pending_payment` -> `paid` | `cancelled` | `expired`; `paid` -> `refunded`. Each change, its
stock movement, its timeline entry and its event (core/events.py) are one transaction, under
the order's row lock, so an order in a final state never has an active reservation, and no
event is announced that did not happen.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from core.carts import CartStore
from core.catalog import PricedCart, PricedLine, load_products, price
from core.checkout_keys import CheckoutKeyStore
from core.customers import customer_scope
from core.db import SessionFactory, Sql, autocommit
from core.errors import InvalidState, NotFound, TooManyPendingCheckouts
from core.events import ORDER_COLUMNS, dedupe_key, payload_sql, write_event
from core.ledger import StockLedger, merge_lines
from core.models import ORDER_EVENTS, ORDERS, Order, OrderEvent, OrderItem, Payment
from core.pricing import TermsRequest, load_terms
from core.promotion_ledger import PromotionLedger
from core.vocabulary import EventType, OrderStatus, TimelineEvent

PENDING = OrderStatus.PENDING_PAYMENT
PAID = OrderStatus.PAID
CANCELLED = OrderStatus.CANCELLED
EXPIRED = OrderStatus.EXPIRED
REFUNDED = OrderStatus.REFUNDED


@dataclass(frozen=True)
class NewOrder:
    checkout_id: uuid.UUID
    order_id: uuid.UUID
    customer_email: str
    customer_user_id: str | None
    # (SKU, quantity) lines as the client asked (a SKU may repeat) or SKU -> quantity;
    # `open` merges and prices them.
    items: Iterable[tuple[str, int]] | Mapping[str, int]
    metadata: dict[str, Any]
    expires_at: datetime
    # Refuse the checkout if its customer already has this many waiting for payment.
    max_pending: int | None = None
    # Where it ships (`{"country", ...}`), how, and the promotion code (carts-and-pricing.md).
    address: dict[str, Any] | None = None
    shipping_method: str | None = None
    promotion_code: str | None = None
    # The server-side cart it was made from: checked out when the order is paid.
    cart_id: uuid.UUID | None = None
    # The time promotions are checked against (their start and end); default: now.
    priced_at: datetime | None = None

    @property
    def customer_scope(self) -> str:
        return customer_scope(self.customer_user_id, self.customer_email)

    @property
    def terms_request(self) -> TermsRequest:
        country = self.address.get("country") if self.address else None
        return TermsRequest(
            country=country if isinstance(country, str) else None,
            shipping_method=self.shipping_method,
            promotion_code=self.promotion_code,
        )


def _cart(row: Any) -> PricedCart:
    """The cart as the order recorded it (its lines and totals)."""
    return PricedCart(
        currency=row.currency,
        lines=tuple(PricedLine(*line) for line in row.lines),
        discount=row.discount,
        shipping=row.shipping,
        tax=row.tax,
    )


@dataclass(frozen=True)
class OrderView:
    order: Order
    items: list[OrderItem]
    payment: Payment | None
    events: list[OrderEvent]


async def add_event(
    session: AsyncSession, order_id: uuid.UUID, type: str, data: dict[str, Any], dedupe_key: str
) -> bool:
    """Append to the order's timeline once per `dedupe_key`; True if it was new."""
    result = await session.execute(
        insert(ORDER_EVENTS)
        .values(order_id=order_id, type=type, data=data, dedupe_key=dedupe_key)
        .on_conflict_do_nothing(index_elements=["dedupe_key"])
        .returning(ORDER_EVENTS.c.id)
    )
    return result.scalar_one_or_none() is not None


# The payload's `items` from the `cart` CTE of _CREATE_ORDER.
_CART_ITEMS = """(SELECT jsonb_agg(jsonb_build_object(
                    'sku', c.sku, 'name', c.name, 'unit_price', c.unit_price,
                    'quantity', c.quantity, 'line_total', c.line_total) ORDER BY c.sku)
                  FROM cart c)"""
# Built from the statements' own rows and parameters: nothing the payload needs costs a query.
_CREATED_PAYLOAD = payload_sql(
    "new_order", items=_CART_ITEMS, payment_intent_id="NULL::text", reason="NULL::text"
)
_PAID_PAYLOAD = payload_sql(
    "paid", payment_intent_id="CAST(:intent_id AS text)", reason="NULL::text"
)

# The hot writes are one statement each (data-modifying CTEs): one round trip instead of one
# per table, and for the order, the row locks on its stock are held for less time. JSON values
# arrive as text and are cast.

# The order, its lines with their product snapshots, its first timeline entries and its
# `order.created` event (sequence 1, its payload built from the cart's parameters: the lines
# inserted by this statement are not visible to it); nothing but the order's id comes back, and
# nothing at all if a concurrent duplicate created the order first (then the other inserts,
# which select from `new_order`, add nothing).
_CREATE_ORDER = Sql(
    f"""
    WITH new_order AS (
        INSERT INTO orders (id, checkout_id, status, customer_email, customer_user_id,
                            customer_scope, currency, subtotal, discount, tax, shipping, total,
                            metadata, expires_at, event_sequence, address, shipping_method,
                            promotion_code, pricing, cart_id)
        VALUES (:order_id, :checkout_id, 'pending_payment', :email, :user_id, :scope,
                :currency, :subtotal, :discount, :tax, :shipping, :total,
                CAST(:metadata AS jsonb), :expires_at, 1, CAST(:address AS jsonb),
                :shipping_method, :promotion_code, CAST(:pricing AS jsonb), :cart_id)
        ON CONFLICT (checkout_id) DO NOTHING
        RETURNING {ORDER_COLUMNS}
    ), cart AS (
        SELECT * FROM unnest(CAST(:skus AS text[]), CAST(:names AS text[]),
                             CAST(:prices AS bigint[]), CAST(:quantities AS int[]),
                             CAST(:line_totals AS bigint[]))
             AS l(sku, name, unit_price, quantity, line_total)
    ), lines AS (
        INSERT INTO order_items (order_id, sku, name, unit_price, quantity, line_total,
                                 product_snapshot)
        SELECT new_order.id, l.sku, l.name, l.unit_price, l.quantity, l.line_total,
               -- The product as sold; the catalog may change afterwards.
               jsonb_build_object('sku', l.sku, 'name', l.name, 'unit_price', l.unit_price,
                                  'currency', CAST(:currency AS text))
        FROM new_order, cart AS l
    ), timeline AS (
        INSERT INTO order_events (order_id, type, data, dedupe_key)
        SELECT new_order.id, e.type, CAST(e.data AS jsonb), e.dedupe_key
        FROM new_order, (VALUES (1, 'stock_reserved', CAST(:reserved AS text), :reserved_key),
                                (2, 'order_created', CAST(:created AS text), :created_key))
             AS e(position, type, data, dedupe_key)
        -- Both have the same `at`; ids in this order keep the timeline in this order.
        ORDER BY e.position
    ), announced AS (
        -- No ON CONFLICT: the order's insert gates this one, and a conflict here would leave
        -- the order without its sequence 1; the constraint fails it instead.
        INSERT INTO outbox (event_type, aggregate_id, sequence, payload, dedupe_key)
        SELECT 'order.created', new_order.id, new_order.event_sequence, {_CREATED_PAYLOAD},
               :announcement_key
        FROM new_order
    )
    SELECT id FROM new_order
    """  # noqa: S608 - constant SQL, assembled at import
)

# The checkout's own order (if it has one yet) and, under the customer's lock, how many of
# the customer's checkouts wait for payment: one row, always.
_RECORDED_AND_PENDING = Sql(
    """
    SELECT (SELECT count(*) FROM orders
            WHERE customer_scope = :scope AND status = 'pending_payment') AS pending,
           o.status, o.currency, o.discount, o.shipping, o.tax,
           (SELECT json_agg(json_build_array(i.sku, i.name, i.unit_price, i.quantity)
                            ORDER BY i.sku)
            FROM order_items i WHERE i.order_id = o.id) AS lines
    FROM (SELECT 1) AS one LEFT JOIN orders o ON o.checkout_id = :checkout_id
    """
)

_ATTACH_PAYMENT = Sql(
    """
    WITH payment AS (
        INSERT INTO payments (order_id, provider, payment_intent_id, status, amount, currency,
                              client_secret_sealed)
        VALUES (:order_id, 'stripe', :intent_id, :status, :amount, :currency, :sealed)
        ON CONFLICT (payment_intent_id) DO NOTHING
    )
    INSERT INTO order_events (order_id, type, data, dedupe_key)
    VALUES (:order_id, 'payment_intent_created', CAST(:data AS jsonb), :key)
    ON CONFLICT (dedupe_key) DO NOTHING
    """
)

# Run under the order's row lock, after the stock is committed: the order, its payment, its
# timeline entry and its `order.paid` event with the next sequence.
_MARK_PAID = Sql(
    f"""
    WITH paid AS (
        UPDATE orders SET status = 'paid', event_sequence = event_sequence + 1,
                          updated_at = now()
        WHERE id = :order_id
        RETURNING {ORDER_COLUMNS}
    ), payment AS (
        UPDATE payments SET status = :intent_status, updated_at = now()
        WHERE payment_intent_id = :intent_id
    ), timeline AS (
        INSERT INTO order_events (order_id, type, data, dedupe_key)
        VALUES (:order_id, 'paid', CAST(:data AS jsonb), :key)
        ON CONFLICT (dedupe_key) DO NOTHING
    )
    INSERT INTO outbox (event_type, aggregate_id, sequence, payload, dedupe_key)
    SELECT 'order.paid', paid.id, paid.event_sequence, {_PAID_PAYLOAD},
           :announcement_key
    FROM paid
    """  # noqa: S608 - constant SQL, assembled at import
)


_LOCK_FOR_PAYMENT = Sql(
    "SELECT status, promotion_code, cart_id FROM orders WHERE id = :order_id FOR UPDATE"
)


class OrderStore:
    def __init__(self, sessions: SessionFactory, ledger: StockLedger) -> None:
        self._sessions = sessions
        self._ledger = ledger

    async def open(self, new: NewOrder) -> tuple[PricedCart, bool]:
        """Price the cart, reserve its stock (all lines or none) and create the pending order
        with its price and product snapshots: one transaction, so there is never a reservation
        without its order, nor an order without its stock. Returns the priced cart and whether
        this call created the order.

        A retry changes nothing and returns the cart as the order recorded it (the catalog may
        have changed since). Raises `UnknownSku`, `QuantityLimitExceeded`, `InsufficientStock`
        (requested/available per SKU), `TooManyPendingCheckouts`, `InvalidState` (this
        checkout's order has already ended) or `ServiceError(validation_error)`; then nothing
        is kept.
        """
        items = merge_lines(new.items)
        scope = new.customer_scope
        async with self._sessions.begin() as session:
            products = await load_products(
                session, list(items), lock_customer=scope if new.max_pending else None
            )
            row = await _RECORDED_AND_PENDING.one(
                session, {"scope": scope, "checkout_id": new.checkout_id}
            )
            if row.status is not None:
                if row.status != PENDING:
                    raise InvalidState(
                        f"checkout {new.checkout_id} has ended: its order is {row.status}",
                        details={"status": row.status},
                    )
                return _cart(row), False
            if new.max_pending and row.pending >= new.max_pending:
                raise TooManyPendingCheckouts(new.max_pending)
            cart = price(products, items)
            terms = await load_terms(session, new.terms_request)
            totals = terms.price(cart, now=new.priced_at or datetime.now(UTC))
            cart = replace(cart, discount=totals.discount, shipping=totals.shipping, tax=totals.tax)
            # The stock rows first, then the promotion's: the fixed order of every transaction
            # that moves both (core/promotion_ledger.py).
            await self._ledger.reserve(
                new.checkout_id,
                [(line.sku, line.quantity) for line in cart.lines],
                expires_at=new.expires_at,
                session=session,
            )
            created = await self._insert(session, new, cart, terms.snapshot(totals))
            if created and terms.promotion is not None:
                # Last, so that the promotion's row (which every checkout of the code needs)
                # is locked for as short a time as can be: a refusal rolls it all back.
                await PromotionLedger.reserve(
                    session,
                    checkout_id=new.checkout_id,
                    order_id=new.order_id,
                    code_key=terms.promotion.code_key,
                    customer_scope=scope,
                    discount=totals.discount,
                )
            if not created:
                # A concurrent attempt created the order first (the ledger waited for it and
                # returned its reservation): answer with what it recorded, not this pricing.
                recorded = await self._recorded_cart(session, new.checkout_id)
                assert recorded is not None
                return recorded, False
        return cart, True

    @staticmethod
    async def _recorded_cart(session: AsyncSession, checkout_id: uuid.UUID) -> PricedCart | None:
        rows = (
            await session.execute(
                select(
                    Order.currency,
                    Order.discount,
                    Order.shipping,
                    Order.tax,
                    OrderItem.sku,
                    OrderItem.name,
                    OrderItem.unit_price,
                    OrderItem.quantity,
                )
                .join(OrderItem, OrderItem.order_id == Order.id)
                .where(Order.checkout_id == checkout_id)
                .order_by(OrderItem.sku)
            )
        ).all()
        if not rows:
            return None
        return PricedCart(
            currency=rows[0].currency,
            lines=tuple(PricedLine(r.sku, r.name, r.unit_price, r.quantity) for r in rows),
            discount=rows[0].discount,
            shipping=rows[0].shipping,
            tax=rows[0].tax,
        )

    @staticmethod
    async def _insert(
        session: AsyncSession, new: NewOrder, cart: PricedCart, pricing: dict[str, Any]
    ) -> bool:
        lines = [{"sku": line.sku, "quantity": line.quantity} for line in cart.lines]
        totals = {
            "subtotal": cart.subtotal,
            "discount": cart.discount,
            "shipping": cart.shipping,
            "tax": cart.tax,
            "total": cart.total,
            "currency": cart.currency,
        }
        created = await _CREATE_ORDER.one_or_none(
            session,
            {
                "order_id": new.order_id,
                "checkout_id": new.checkout_id,
                "email": new.customer_email,
                "user_id": new.customer_user_id,
                "scope": new.customer_scope,
                "currency": cart.currency,
                "subtotal": cart.subtotal,
                "discount": cart.discount,
                "shipping": cart.shipping,
                "tax": cart.tax,
                "total": cart.total,
                "address": json.dumps(new.address) if new.address is not None else None,
                "shipping_method": new.shipping_method,
                "promotion_code": pricing["promotion"]["code"] if pricing["promotion"] else None,
                "pricing": json.dumps(pricing),
                "cart_id": new.cart_id,
                "metadata": json.dumps(new.metadata),
                "expires_at": new.expires_at,
                "skus": [line.sku for line in cart.lines],
                "names": [line.name for line in cart.lines],
                "prices": [line.unit_price for line in cart.lines],
                "quantities": [line.quantity for line in cart.lines],
                "line_totals": [line.line_total for line in cart.lines],
                "reserved": json.dumps({"lines": lines}),
                "reserved_key": f"{new.order_id}:reserved",
                "created": json.dumps(totals),
                "created_key": f"{new.order_id}:created",
                "announcement_key": dedupe_key(new.order_id, EventType.ORDER_CREATED),
            },
        )
        # Nothing came back: a concurrent duplicate created the order first.
        return created is not None

    async def attach_payment(
        self,
        order_id: uuid.UUID,
        *,
        intent_id: str,
        status: str,
        amount: int,
        currency: str,
        client_secret_sealed: str | None = None,
    ) -> None:
        async with self._sessions() as session:
            await autocommit(session)
            await _ATTACH_PAYMENT.rows(
                session,
                {
                    "order_id": order_id,
                    "intent_id": intent_id,
                    "status": status,
                    "amount": amount,
                    "currency": currency,
                    "sealed": client_secret_sealed,
                    "data": json.dumps(
                        {"payment_intent_id": intent_id, "amount": amount, "currency": currency}
                    ),
                    "key": f"{order_id}:intent:{intent_id}",
                },
            )

    async def record_event(
        self, order_id: uuid.UUID, type: str, data: dict[str, Any], dedupe_key: str
    ) -> bool:
        """Append to the order's timeline once per `dedupe_key`; True if it was new. A declined
        payment attempt also writes its `order.payment_failed` event, once per attempt."""
        if type == TimelineEvent.PAYMENT_FAILED:
            return await self._record_failed_attempt(order_id, data, dedupe_key)
        async with self._sessions() as session:
            await autocommit(session)
            return await add_event(session, order_id, type, data, dedupe_key)

    async def _record_failed_attempt(
        self, order_id: uuid.UUID, data: dict[str, Any], key: str
    ) -> bool:
        async with self._sessions.begin() as session:
            # The row lock before any write, as for every event (see core/event_feed.py).
            status = await self._lock_status(session, order_id)
            new = await add_event(session, order_id, TimelineEvent.PAYMENT_FAILED, data, key)
            if new and status == PENDING:
                message = data.get("message")
                await write_event(
                    session,
                    order_id,
                    EventType.ORDER_PAYMENT_FAILED,
                    status=PENDING,
                    expected=(PENDING,),
                    reason=message if isinstance(message, str) else None,
                    dedupe_key=dedupe_key(order_id, EventType.ORDER_PAYMENT_FAILED, key),
                )
        return new

    async def mark_paid(
        self,
        checkout_id: uuid.UUID,
        order_id: uuid.UUID,
        *,
        intent_id: str,
        intent_status: str,
        amount: int,
        currency: str,
    ) -> str:
        """Commit the stock and mark the order paid, in one transaction; idempotent.

        Returns the order's status afterwards: `paid`, or the final status it already had (a
        payment that arrived after the order closed is not applied here).
        """
        async with self._sessions.begin() as session:
            row = await _LOCK_FOR_PAYMENT.one_or_none(session, {"order_id": order_id})
            if row is None:
                raise NotFound(f"no order {order_id}", details={"order_id": str(order_id)})
            if row.status != PENDING:
                return str(row.status)
            await self._ledger.commit(checkout_id, session=session)
            if row.promotion_code is not None:  # its use was reserved with the order
                await PromotionLedger.commit(session, checkout_id)
            if row.cart_id is not None:  # made from a server-side cart: it is checked out
                await CartStore.mark_checked_out(session, row.cart_id, order_id)
            await _MARK_PAID.rows(
                session,
                {
                    "order_id": order_id,
                    "intent_id": intent_id,
                    "intent_status": intent_status,
                    "data": json.dumps(
                        {"payment_intent_id": intent_id, "amount": amount, "currency": currency}
                    ),
                    "key": f"{order_id}:paid",
                    "announcement_key": dedupe_key(order_id, EventType.ORDER_PAID),
                },
            )
        return PAID

    async def close(
        self,
        checkout_id: uuid.UUID,
        order_id: uuid.UUID,
        *,
        status: str,
        reason: str,
        intent_status: str | None = None,
        release_key: bool = False,
        timeline: tuple[tuple[str, dict[str, Any]], ...] = (),
    ) -> str:
        """Release the stock and close a pending order as `cancelled` or `expired`, in one
        transaction; idempotent. Without an order (it was never created), only releases.
        `release_key` (a refused checkout: nothing was kept) frees its Idempotency-Key;
        `timeline` adds entries of its own after the closing ones (dedupe key per type).

        Returns the order's status afterwards (a paid order stays paid).
        """
        assert status in (CANCELLED, EXPIRED)
        async with self._sessions.begin() as session:
            order = await session.get(Order, order_id, with_for_update=True)
            if order is not None and order.status != PENDING:
                return order.status
            await self._ledger.release(checkout_id, session=session)
            if order is not None and order.promotion_code is not None:
                # Reserved in the order's transaction: no order, no use.
                await PromotionLedger.release(session, checkout_id)
            if release_key:
                await CheckoutKeyStore.release(session, checkout_id)
            if order is None:
                return CANCELLED
            event_type = (
                EventType.ORDER_CANCELLED if status == CANCELLED else EventType.ORDER_EXPIRED
            )
            changed = await write_event(
                session,
                order_id,
                event_type,
                status=OrderStatus(status),
                expected=(PENDING,),
                reason=reason,
                dedupe_key=dedupe_key(order_id, event_type),
            )
            assert changed, "the order is locked and pending"
            if intent_status is not None:
                await session.execute(
                    update(Payment).where(Payment.order_id == order_id).values(status=intent_status)
                )
            await add_event(
                session, order_id, TimelineEvent.STOCK_RELEASED, {}, f"{order_id}:released"
            )
            await add_event(session, order_id, status, {"reason": reason}, f"{order_id}:{status}")
            for type, data in timeline:
                await add_event(session, order_id, type, data, f"{order_id}:{type}")
        return status

    async def mark_refunded(
        self, order_id: uuid.UUID, *, refunded_amount: int, source: str, reference: str
    ) -> str:
        """Record a refund of the order's payment, in one transaction; idempotent.

        A full refund makes a paid order `refunded` and puts its units back on hand, once. A
        partial one is recorded on the timeline and returns no stock. Out-of-order news never
        moves an order backwards: anything but a paid order only gets the timeline entry.
        Returns the order's status afterwards.
        """
        async with self._sessions.begin() as session:
            order = await self._lock(session, order_id)
            payment = await session.scalar(
                select(Payment).where(Payment.order_id == order_id).with_for_update()
            )
            if payment is not None and refunded_amount > payment.amount_refunded:
                payment.amount_refunded = min(refunded_amount, payment.amount)
            full = payment is not None and refunded_amount >= payment.amount
            data = {"amount_refunded": refunded_amount, "source": source, "reference": reference}
            status = order.status
            if not full:
                new = await add_event(
                    session,
                    order_id,
                    TimelineEvent.PARTIALLY_REFUNDED,
                    data,
                    f"{order_id}:refund:{reference}",
                )
                if new and status == PAID:
                    # Announced once per refund; the order stays paid.
                    await write_event(
                        session,
                        order_id,
                        EventType.ORDER_PARTIALLY_REFUNDED,
                        status=PAID,
                        expected=(PAID,),
                        reason=source,
                        dedupe_key=dedupe_key(
                            order_id, EventType.ORDER_PARTIALLY_REFUNDED, reference
                        ),
                    )
                return status
            if status == PAID:
                await self._ledger.restock(order.checkout_id, session=session)
                await write_event(
                    session,
                    order_id,
                    EventType.ORDER_REFUNDED,
                    status=REFUNDED,
                    expected=(PAID,),
                    reason=source,
                    dedupe_key=dedupe_key(order_id, EventType.ORDER_REFUNDED),
                )
                status = REFUNDED
                assert payment is not None
                payment.status = REFUNDED
            if status == REFUNDED:
                await add_event(
                    session, order_id, TimelineEvent.REFUNDED, data, f"{order_id}:refunded"
                )
            return status

    async def record_late_refund(
        self, order_id: uuid.UUID, *, intent_id: str, amount: int, refund_id: str
    ) -> None:
        """A payment that arrived after the order closed was refunded: say so, once."""
        async with self._sessions.begin() as session:
            await session.execute(
                update(Payment)
                .where(Payment.payment_intent_id == intent_id)
                .values(status=REFUNDED, amount_refunded=amount)
            )
            await add_event(
                session,
                order_id,
                TimelineEvent.LATE_PAYMENT_REFUNDED,
                {"payment_intent_id": intent_id, "amount": amount, "refund_id": refund_id},
                f"{order_id}:late-refund:{intent_id}",
            )

    async def find_by_intent(self, intent_id: str) -> tuple[uuid.UUID, str] | None:
        """The order (id, status) a PaymentIntent belongs to, if it is ours."""
        async with self._sessions() as session:
            row = (
                await session.execute(
                    select(Order.id, Order.status)
                    .join(Payment, Payment.order_id == Order.id)
                    .where(Payment.payment_intent_id == intent_id)
                )
            ).one_or_none()
        return (row.id, row.status) if row else None

    async def get(
        self, order_id: uuid.UUID, *, visible: Callable[[Order], bool] | None = None
    ) -> OrderView:
        """The order with its items, payment and timeline. `NotFound` if there is none, or if
        `visible` says the caller may not see it (checked before anything else is read)."""
        async with self._sessions() as session:
            order = await session.get(Order, order_id)
            if order is None or (visible is not None and not visible(order)):
                raise NotFound(f"no order {order_id}", details={"order_id": str(order_id)})
            items = list(
                await session.scalars(
                    select(OrderItem).where(OrderItem.order_id == order_id).order_by(OrderItem.sku)
                )
            )
            payment = await session.scalar(
                select(Payment).where(Payment.order_id == order_id).order_by(Payment.id.desc())
            )
            events = list(
                await session.scalars(
                    select(OrderEvent)
                    .where(OrderEvent.order_id == order_id)
                    .order_by(OrderEvent.at, OrderEvent.id)
                )
            )
        return OrderView(order, items, payment, events)

    async def find_by_checkout(self, checkout_id: uuid.UUID) -> Order | None:
        """The order a checkout opened, if it opened one."""
        async with self._sessions() as session:
            order: Order | None = await session.scalar(
                select(Order).where(Order.checkout_id == checkout_id)
            )
        return order

    async def list(
        self,
        *,
        limit: int,
        user_id: str | None = None,
        email: str | None = None,
        before: tuple[datetime, uuid.UUID] | None = None,
    ) -> list[OrderView]:
        """Orders newest first (without their timelines), filtered by the customer's user id
        and/or email (case-insensitive), after the `before` (created_at, id) cursor."""
        query = select(Order).order_by(Order.created_at.desc(), Order.id.desc()).limit(limit)
        if user_id is not None:
            query = query.where(Order.customer_user_id == user_id)
        if email is not None:
            query = query.where(func.lower(Order.customer_email) == email.lower())
        if before is not None:
            query = query.where(tuple_(Order.created_at, Order.id) < tuple_(*before))
        async with self._sessions() as session:
            orders = list(await session.scalars(query))
            ids = [order.id for order in orders]
            items: dict[uuid.UUID, list[OrderItem]] = {order_id: [] for order_id in ids}
            for item in await session.scalars(
                select(OrderItem).where(OrderItem.order_id.in_(ids)).order_by(OrderItem.sku)
            ):
                items[item.order_id].append(item)
            payments: dict[uuid.UUID, Payment] = {}
            for payment in await session.scalars(
                select(Payment).where(Payment.order_id.in_(ids)).order_by(Payment.id)
            ):
                payments[payment.order_id] = payment  # the latest one wins
        return [OrderView(o, items[o.id], payments.get(o.id), []) for o in orders]

    async def status(self, order_id: uuid.UUID) -> str:
        async with self._sessions() as session:
            status = await session.scalar(select(Order.status).where(Order.id == order_id))
        if status is None:
            raise NotFound(f"no order {order_id}", details={"order_id": str(order_id)})
        return status

    @staticmethod
    async def _lock_status(session: AsyncSession, order_id: uuid.UUID) -> str:
        status = await session.scalar(
            select(ORDERS.c.status).where(ORDERS.c.id == order_id).with_for_update()
        )
        if status is None:
            raise NotFound(f"no order {order_id}", details={"order_id": str(order_id)})
        return str(status)

    @staticmethod
    async def _lock(session: AsyncSession, order_id: uuid.UUID) -> Order:
        order = await session.get(Order, order_id, with_for_update=True)
        if order is None:
            raise NotFound(f"no order {order_id}", details={"order_id": str(order_id)})
        return order
