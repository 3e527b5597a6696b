"""Order events on real PostgreSQL: every change writes exactly one event with the contract's
body and the order's next sequence, in the change's own transaction, under any concurrency; the
admin feed serves them in commit order and a reader paging it misses nothing."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Row, select, text

from core.catalog import Catalog
from core.db import SessionFactory
from core.event_feed import EventFeed, FeedEvent, FeedPosition
from core.events import EventBody, write_event
from core.ledger import StockLedger
from core.models import ORDERS
from core.orders import NewOrder, OrderStore
from core.vocabulary import EventType, OrderStatus

LIMIT = 15  # seconds a burst may take before the test calls it a hang


def new_order(items: Sequence[tuple[str, int]], email: str = "buyer@example.com") -> NewOrder:
    return NewOrder(
        checkout_id=uuid.uuid4(),
        order_id=uuid.uuid4(),
        customer_email=email,
        customer_user_id=None,
        items=list(items),
        metadata={},
        expires_at=datetime.now(UTC) + timedelta(minutes=15),
    )


async def seed(db: SessionFactory) -> OrderStore:
    catalog = Catalog(db)
    await catalog.put_product("mug", name="Mug", unit_price=900, currency="usd", on_hand=1000)
    await catalog.put_product("tea", name="Tea", unit_price=450, currency="usd", on_hand=1000)
    return OrderStore(db, StockLedger(db))


async def opened(store: OrderStore, order: NewOrder, intent: str | None = None) -> int:
    """Open the order (and attach a PaymentIntent); returns its total."""
    cart, created = await store.open(order)
    assert created
    if intent:
        await store.attach_payment(
            order.order_id,
            intent_id=intent,
            status="requires_payment_method",
            amount=cart.subtotal,
            currency="usd",
        )
    return cart.subtotal


async def declined(store: OrderStore, order_id: uuid.UUID, stripe_event: str) -> bool:
    """What the checkout's workflow records for a `payment_intent.payment_failed`."""
    return await store.record_event(
        order_id,
        "payment_failed",
        {"payment_intent_id": f"pi_{order_id.hex}", "message": "Your card was declined."},
        f"{order_id}:event:{stripe_event}",
    )


async def pay(store: OrderStore, order: NewOrder, amount: int) -> str:
    return await store.mark_paid(
        order.checkout_id,
        order.order_id,
        intent_id=f"pi_{order.order_id.hex}",
        intent_status="succeeded",
        amount=amount,
        currency="usd",
    )


async def outbox(db: SessionFactory) -> list[Row[Any]]:
    async with db() as session:
        return list(
            (
                await session.execute(text("SELECT * FROM outbox ORDER BY aggregate_id, sequence"))
            ).all()
        )


def by_order(rows: Sequence[Row[Any]]) -> dict[uuid.UUID, list[Row[Any]]]:
    grouped: dict[uuid.UUID, list[Row[Any]]] = defaultdict(list)
    for row in rows:
        grouped[row.aggregate_id].append(row)
    return grouped


async def test_every_change_writes_one_event_with_the_contract_body(db: SessionFactory) -> None:
    store = await seed(db)
    a, b, c = new_order([("tea", 1), ("mug", 2)]), new_order([("mug", 1)]), new_order([("tea", 3)])
    intent = f"pi_{a.order_id.hex}"
    total = await opened(store, a, intent)
    # The same declined attempt recorded twice (an activity retried) is one event; a second
    # attempt is another.
    assert await declined(store, a.order_id, "evt_1") is True
    assert await declined(store, a.order_id, "evt_1") is False
    assert await declined(store, a.order_id, "evt_2") is True
    assert await pay(store, a, total) == "paid"
    assert await pay(store, a, total) == "paid"
    for _ in range(2):
        status = await store.mark_refunded(
            a.order_id, refunded_amount=500, source="stripe", reference="ch_1:500"
        )
        assert status == "paid"
    for _ in range(2):
        status = await store.mark_refunded(
            a.order_id, refunded_amount=total, source="requested_by_operator", reference="re_1"
        )
        assert status == "refunded"
    await opened(store, b)
    await opened(store, c)
    for _ in range(2):
        await store.close(b.checkout_id, b.order_id, status="cancelled", reason="cancel requested")
        await store.close(c.checkout_id, c.order_id, status="expired", reason="window ended")

    events = by_order(await outbox(db))
    assert {
        order_id: [(r.sequence, r.event_type) for r in rows] for order_id, rows in events.items()
    } == {
        a.order_id: [
            (1, "order.created"),
            (2, "order.payment_failed"),
            (3, "order.payment_failed"),
            (4, "order.paid"),
            (5, "order.partially_refunded"),
            (6, "order.refunded"),
        ],
        b.order_id: [(1, "order.created"), (2, "order.cancelled")],
        c.order_id: [(1, "order.created"), (2, "order.expired")],
    }
    bodies = {
        oid: [EventBody.of(r).model_dump(mode="json") for r in rows] for oid, rows in events.items()
    }
    items = [
        {"sku": "mug", "name": "Mug", "unit_price": 900, "quantity": 2, "line_total": 1800},
        {"sku": "tea", "name": "Tea", "unit_price": 450, "quantity": 1, "line_total": 450},
    ]
    for body, status, intent_id, reason in zip(
        bodies[a.order_id],
        ["pending_payment", "pending_payment", "pending_payment", "paid", "paid", "refunded"],
        [None, intent, intent, intent, intent, intent],
        [None, "Your card was declined.", "Your card was declined.", None, "stripe",
         "requested_by_operator"],
        strict=True,
    ):  # fmt: skip
        assert set(body) == {
            "event_id", "event_type", "occurred_at", "aggregate_id", "sequence", "payload",
        }  # fmt: skip
        assert body["aggregate_id"] == str(a.order_id)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00", body["occurred_at"])
        assert body["payload"] == {
            "order_id": str(a.order_id),
            "checkout_id": str(a.checkout_id),
            "status": status,
            "customer": {"email": "buyer@example.com", "user_id": None},
            "currency": "usd",
            "totals": {"subtotal": 2250, "discount": 0, "tax": 0, "shipping": 0, "total": 2250},
            "items": items,
            "payment_intent_id": intent_id,
            "reason": reason,
        }
    assert [body["payload"]["reason"] for body in bodies[b.order_id]] == [None, "cancel requested"]
    assert [body["payload"]["status"] for body in bodies[c.order_id]] == [
        "pending_payment",
        "expired",
    ]
    every = [body for order_bodies in bodies.values() for body in order_bodies]
    assert len({body["event_id"] for body in every}) == len(every) == 10
    # The wire form is the same JSON.
    row = events[a.order_id][3]
    assert json.loads(EventBody.of(row).encode()) == bodies[a.order_id][3]
    async with db() as session:
        sequences = dict(
            (await session.execute(select(ORDERS.c.id, ORDERS.c.event_sequence))).all()
        )
    assert sequences == {a.order_id: 6, b.order_id: 2, c.order_id: 2}


async def test_concurrent_changes_number_each_orders_events_without_gaps(
    db: SessionFactory,
) -> None:
    store = await seed(db)
    orders = [new_order([("mug", 1 + i % 2), ("tea", 1)]) for i in range(20)]
    totals = [await opened(store, order, f"pi_{order.order_id.hex}") for order in orders]

    async def race(i: int, order: NewOrder, total: int) -> None:
        # A payment, a cancel and declined attempts (one of them twice) at the same moment.
        calls = [
            pay(store, order, total),
            store.close(order.checkout_id, order.order_id, status="cancelled", reason="cancel"),
            declined(store, order.order_id, "evt_a"),
            declined(store, order.order_id, "evt_a"),
            declined(store, order.order_id, "evt_b"),
        ]
        k = i % len(calls)
        outcomes = await asyncio.gather(*(calls[k:] + calls[:k]), return_exceptions=True)
        assert [o for o in outcomes if isinstance(o, BaseException)] == []

    async with asyncio.timeout(LIMIT):
        await asyncio.gather(
            *(race(i, o, t) for i, (o, t) in enumerate(zip(orders, totals, strict=True)))
        )

    events = by_order(await outbox(db))
    async with db() as session:
        statuses = dict((await session.execute(select(ORDERS.c.id, ORDERS.c.status))).all())
    for order in orders:
        rows = events[order.order_id]
        types = [row.event_type for row in rows]
        assert [row.sequence for row in rows] == list(range(1, len(rows) + 1))
        final = statuses[order.order_id]
        # Created first; declined attempts only while pending, each once; one ending, last.
        assert types[0] == "order.created"
        assert types[-1] == f"order.{final}"
        assert set(types[1:-1]) <= {"order.payment_failed"} and len(types) <= 4
        assert [row.payload["status"] for row in rows][-1] == final


async def feed_all(feed: EventFeed, after: FeedPosition, limit: int) -> list[FeedEvent]:
    """Every event the feed serves after `after`, page by page."""
    got: list[FeedEvent] = []
    while page := await feed.page(after, limit):
        got += page
        after = page[-1].position
    return got


async def test_the_feed_waits_for_a_transaction_that_started_writing_first(
    db: SessionFactory,
) -> None:
    """Ids are given at insert: the event a running transaction has inserted has a smaller id
    than one that commits before it. A feed paging by id would hand out the later one and
    never the earlier one; this feed holds both back until the earlier transaction ends."""
    store = await seed(db)
    y, z = new_order([("mug", 1)]), new_order([("tea", 1)])
    await opened(store, y, f"pi_{y.order_id.hex}")
    await opened(store, z)
    feed = EventFeed(db)
    start = await feed_all(feed, FeedPosition(), 100)
    assert [e.body.payload.order_id for e in start] == [y.order_id, z.order_id]
    cursor = start[-1].position

    async with db.begin() as running:
        await running.execute(
            select(ORDERS.c.id).where(ORDERS.c.id == y.order_id).with_for_update()
        )
        assert await write_event(
            running,
            y.order_id,
            EventType.ORDER_PAYMENT_FAILED,
            status=OrderStatus.PENDING_PAYMENT,
            expected=(OrderStatus.PENDING_PAYMENT,),
            reason="declined",
            dedupe_key=f"{y.order_id}:test",
        )
        # Committed while the first still runs, with a larger id.
        await store.close(z.checkout_id, z.order_id, status="cancelled", reason="cancel")
        assert await feed.page(cursor, 100) == []
    later = await feed_all(feed, cursor, 1)

    assert [(e.body.aggregate_id, e.body.event_type) for e in later] == [
        (y.order_id, "order.payment_failed"),
        (z.order_id, "order.cancelled"),
    ]
    assert all(e.published_at is None for e in later)
    # Page by page or at once: the same events in the same order.
    assert [e.body for e in await feed_all(feed, FeedPosition(), 1)] == [
        e.body for e in start + later
    ]


async def test_a_reader_paging_during_concurrent_writes_misses_nothing(
    db: SessionFactory,
) -> None:
    store = await seed(db)
    feed = EventFeed(db)
    orders = [new_order([("mug", 1)]) for _ in range(30)]
    writing = True
    seen: list[FeedEvent] = []

    async def write(i: int, order: NewOrder) -> None:
        total = await opened(store, order, f"pi_{order.order_id.hex}")
        await declined(store, order.order_id, "evt_1")
        if i % 2:
            await pay(store, order, total)
        else:
            await store.close(order.checkout_id, order.order_id, status="expired", reason="late")

    async def read() -> None:
        after = FeedPosition()
        while True:
            done = not writing  # read once more after the writers finished
            page = await feed.page(after, 7)
            seen.extend(page)
            after = page[-1].position if page else after
            if done and not page:
                return
            await asyncio.sleep(0)

    async with asyncio.timeout(LIMIT):
        reader = asyncio.create_task(read())
        await asyncio.gather(*(write(i, order) for i, order in enumerate(orders)))
        writing = False
        await reader

    rows = await outbox(db)
    assert len(rows) == 90
    assert sorted(str(e.body.event_id) for e in seen) == sorted(str(r.event_id) for r in rows)
    sequences: dict[uuid.UUID, list[int]] = defaultdict(list)
    for event in seen:
        sequences[event.body.aggregate_id].append(event.body.sequence)
    assert all(got == [1, 2, 3] for got in sequences.values())
    assert [e.position for e in seen] == sorted(e.position for e in seen)
