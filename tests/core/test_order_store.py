"""OrderStore on real PostgreSQL under concurrency: settling races, contended checkouts and
duplicate writes leave exactly the rows they should (stock, reservations, orders, items,
timeline, outbox, payments), and never deadlock."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Row, text
from sqlalchemy.ext.asyncio import create_async_engine

from core.catalog import Catalog, PricedCart, PricedLine
from core.db import SessionFactory, create_session_factory
from core.errors import InsufficientStock
from core.ledger import StockLedger, merge_lines
from core.orders import NewOrder, OrderStore
from tests.conftest import connection_budget

# Seconds any one burst of concurrent calls may take before the test calls it a hang.
BURST_LIMIT = 15


@pytest.fixture
async def store(db: SessionFactory, database_url: str) -> AsyncIterator[OrderStore]:
    """The production store over its own pool, wide enough for the concurrent calls to
    really meet in the database rather than queue for connections."""
    budget = await connection_budget(database_url, 60)
    name = f"order-store-test-{uuid.uuid4().hex[:8]}"
    engine = create_async_engine(
        database_url,
        pool_size=budget,
        max_overflow=0,
        pool_timeout=30,
        connect_args={"application_name": name},
    )
    sessions = create_session_factory(engine)
    yield OrderStore(sessions, StockLedger(sessions))
    await engine.dispose()
    # A test that failed on its time limit leaves calls cut off mid-transaction; end their
    # backends so their locks do not block the next test's TRUNCATE.
    async with db() as session:
        await session.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = :name"
            ),
            {"name": name},
        )


def new_order(items: Sequence[tuple[str, int]]) -> NewOrder:
    return NewOrder(
        checkout_id=uuid.uuid4(),
        order_id=uuid.uuid4(),
        customer_email="buyer@example.com",
        customer_user_id=None,
        items=list(items),
        metadata={"channel": "test"},
        expires_at=datetime.now(UTC) + timedelta(minutes=15),
    )


async def put(db: SessionFactory, products: dict[str, tuple[str, int, int]]) -> None:
    """Seed products: SKU -> (name, unit price, on hand)."""
    catalog = Catalog(db)
    for sku, (name, price, on_hand) in products.items():
        await catalog.put_product(sku, name=name, unit_price=price, currency="usd", on_hand=on_hand)


async def query(db: SessionFactory, sql: str, **params: Any) -> Sequence[Row[Any]]:
    async with db() as session:
        return (await session.execute(text(sql), params)).all()


async def stock_levels(db: SessionFactory) -> dict[str, tuple[int, int]]:
    rows = await query(db, "SELECT sku, on_hand, reserved FROM stock ORDER BY sku")
    return {row.sku: (row.on_hand, row.reserved) for row in rows}


async def events_by_order(db: SessionFactory) -> dict[uuid.UUID, list[tuple[str, str]]]:
    """Each order's timeline as (type, dedupe_key), in id order."""
    timeline: dict[uuid.UUID, list[tuple[str, str]]] = defaultdict(list)
    for row in await query(db, "SELECT order_id, type, dedupe_key FROM order_events ORDER BY id"):
        timeline[row.order_id].append((row.type, row.dedupe_key))
    return timeline


async def outbox_by_order(db: SessionFactory) -> dict[str, list[tuple[str, str]]]:
    """Each order's events as (type, dedupe_key), in sequence order (its ids' order too)."""
    messages: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in await query(
        db,
        "SELECT aggregate_id, event_type, dedupe_key FROM outbox ORDER BY aggregate_id, sequence",
    ):
        messages[str(row.aggregate_id)].append((row.event_type, row.dedupe_key))
    return messages


async def reservations_by_checkout(
    db: SessionFactory,
) -> dict[uuid.UUID, list[tuple[str, int, str]]]:
    lines: dict[uuid.UUID, list[tuple[str, int, str]]] = defaultdict(list)
    for row in await query(
        db, "SELECT checkout_id, sku, quantity, status FROM reservations ORDER BY checkout_id, sku"
    ):
        lines[row.checkout_id].append((row.sku, row.quantity, row.status))
    return lines


def failures(outcomes: Sequence[object]) -> list[BaseException]:
    return [outcome for outcome in outcomes if isinstance(outcome, BaseException)]


async def test_mark_paid_racing_close_settles_each_order_exactly_once(
    db: SessionFactory, store: OrderStore
) -> None:
    on_hand = {"alpha": 100, "beta": 100, "gamma": 100}
    await put(db, {sku: (sku.title(), 700, units) for sku, units in on_hand.items()})
    orders: list[NewOrder] = []
    for i in range(30):
        # Every order holds all three SKUs, listed in a different order each time.
        lines = [("alpha", 1 + i % 3), ("beta", 1 + i % 2), ("gamma", 2)]
        orders.append(new_order(lines[i % 3 :] + lines[: i % 3]))
    opened = await asyncio.gather(*(store.open(order) for order in orders))
    assert [created for _, created in opened] == [True] * 30
    for order, (cart, _) in zip(orders, opened, strict=True):
        await store.attach_payment(
            order.order_id,
            intent_id=f"pi_{order.order_id.hex}",
            status="requires_payment_method",
            amount=cart.subtotal,
            currency="usd",
        )
    assert await stock_levels(db) == {"alpha": (100, 60), "beta": (100, 45), "gamma": (100, 60)}

    async def race(i: int, order: NewOrder, amount: int) -> list[str | BaseException]:
        pay = store.mark_paid(
            order.checkout_id,
            order.order_id,
            intent_id=f"pi_{order.order_id.hex}",
            intent_status="succeeded",
            amount=amount,
            currency="usd",
        )
        cancel = store.close(
            order.checkout_id,
            order.order_id,
            status="cancelled",
            reason="payment_timeout",
            intent_status="canceled",
        )
        # Alternate which call is started first, so both outcomes come up; either way the
        # answer is [mark_paid's, close's].
        if i % 2:
            closed, paid = await asyncio.gather(cancel, pay, return_exceptions=True)
        else:
            paid, closed = await asyncio.gather(pay, cancel, return_exceptions=True)
        return [paid, closed]

    async with asyncio.timeout(BURST_LIMIT):
        outcomes = await asyncio.gather(
            *(
                race(i, order, cart.subtotal)
                for i, (order, (cart, _)) in enumerate(zip(orders, opened, strict=True))
            ),
        )
    assert failures([answer for answers in outcomes for answer in answers]) == []

    statuses = {row.id: row.status for row in await query(db, "SELECT id, status FROM orders")}
    payments = {
        row.order_id: row.status for row in await query(db, "SELECT order_id, status FROM payments")
    }
    timeline = await events_by_order(db)
    outbox = await outbox_by_order(db)
    reservations = await reservations_by_checkout(db)
    sold = dict.fromkeys(on_hand, 0)
    for order, outcome in zip(orders, outcomes, strict=True):
        oid = order.order_id
        final = statuses[oid]
        assert final in ("paid", "cancelled")
        # Both calls report the status the order really ended in.
        assert outcome == [final, final], (oid, outcome, final)
        merged = merge_lines(order.items)
        if final == "paid":
            for sku, quantity in merged.items():
                sold[sku] += quantity
        settled = "committed" if final == "paid" else "released"
        assert reservations[order.checkout_id] == [(sku, q, settled) for sku, q in merged.items()]
        assert payments[oid] == ("succeeded" if final == "paid" else "canceled")
        settlement = (
            [("paid", f"{oid}:paid")]
            if final == "paid"
            else [("stock_released", f"{oid}:released"), ("cancelled", f"{oid}:cancelled")]
        )
        assert timeline[oid] == [
            ("stock_reserved", f"{oid}:reserved"),
            ("order_created", f"{oid}:created"),
            ("payment_intent_created", f"{oid}:intent:pi_{oid.hex}"),
            *settlement,
        ]
        assert outbox[str(oid)] == [
            ("order.created", f"{oid}:order.created"),
            (f"order.{final}", f"{oid}:order.{final}"),
        ]
    assert len(statuses) == len(payments) == len(timeline) == len(outbox) == 30
    # Paid orders took their units off the shelf; cancelled ones gave them back; none is held.
    assert await stock_levels(db) == {sku: (on_hand[sku] - sold[sku], 0) for sku in on_hand}


PRODUCTS = {
    "anvil": ("Anvil", 1200, 1000),
    "bolt": ("Bolt", 150, 20),
    "cog": ("Cog", 475, 24),
    "drum": ("Drum", 3300, 5),
}


def contended_cart(i: int) -> list[tuple[str, int]]:
    """Overlapping multi-SKU carts, each in its own line order; every one wants a bolt."""
    lines = [("anvil", 1 + i % 4), ("bolt", 1), ("cog", 1 + i % 2)]
    if i % 3 == 0:
        lines.append(("drum", 1))
    if i % 5 == 0:
        lines.append(("cog", 1))  # a repeated SKU, which `open` merges
    k = i % len(lines)
    lines = lines[k:] + lines[:k]
    return lines[::-1] if i % 2 else lines


async def test_concurrent_opens_over_scarce_shared_stock_reserve_all_or_nothing(
    db: SessionFactory, store: OrderStore
) -> None:
    await put(db, PRODUCTS)
    requests = [new_order(contended_cart(i)) for i in range(60)]

    async def attempt(request: NewOrder) -> PricedCart | InsufficientStock:
        try:
            cart, created = await store.open(request)
        except InsufficientStock as refused:
            return refused
        assert created
        return cart

    async with asyncio.timeout(BURST_LIMIT):
        outcomes = await asyncio.gather(
            *(attempt(request) for request in requests), return_exceptions=True
        )
    assert failures([o for o in outcomes if not isinstance(o, InsufficientStock)]) == []

    created = [(r, o) for r, o in zip(requests, outcomes, strict=True) if isinstance(o, PricedCart)]
    refused = [
        (r, o) for r, o in zip(requests, outcomes, strict=True) if isinstance(o, InsufficientStock)
    ]
    assert len(created) + len(refused) == 60
    # Every cart wants a bolt and there are 20: at least 40 must be refused, one at least served.
    assert 1 <= len(created) <= 20

    levels = await stock_levels(db)
    reserved = dict.fromkeys(PRODUCTS, 0)
    for request, _ in created:
        for sku, quantity in merge_lines(request.items).items():
            reserved[sku] += quantity
    assert levels == {sku: (units, reserved[sku]) for sku, (_, _, units) in PRODUCTS.items()}
    assert all(held <= units for units, held in levels.values())

    orders = {row.id: row for row in await query(db, "SELECT * FROM orders")}
    items: dict[uuid.UUID, list[tuple[Any, ...]]] = defaultdict(list)
    for row in await query(
        db,
        "SELECT order_id, sku, name, unit_price, quantity, line_total, product_snapshot"
        " FROM order_items ORDER BY order_id, sku",
    ):
        items[row.order_id].append(tuple(row)[1:])
    timeline = await events_by_order(db)
    outbox = await outbox_by_order(db)
    reservations = await reservations_by_checkout(db)

    for request, cart in created:
        oid = request.order_id
        merged = merge_lines(request.items)
        expected = PricedCart(
            currency="usd",
            lines=tuple(
                PricedLine(sku, PRODUCTS[sku][0], PRODUCTS[sku][1], q) for sku, q in merged.items()
            ),
        )
        assert cart == expected
        order = orders[oid]
        assert (order.checkout_id, order.status, order.currency) == (
            request.checkout_id,
            "pending_payment",
            "usd",
        )
        assert (order.subtotal, order.total, order.metadata) == (
            expected.subtotal,
            expected.subtotal,
            {"channel": "test"},
        )
        assert items[oid] == [
            (
                line.sku,
                line.name,
                line.unit_price,
                line.quantity,
                line.line_total,
                {
                    "sku": line.sku,
                    "name": line.name,
                    "unit_price": line.unit_price,
                    "currency": "usd",
                },
            )
            for line in expected.lines
        ]
        assert timeline[oid] == [
            ("stock_reserved", f"{oid}:reserved"),
            ("order_created", f"{oid}:created"),
        ]
        assert outbox[str(oid)] == [("order.created", f"{oid}:order.created")]
        assert reservations[request.checkout_id] == [
            (sku, q, "active") for sku, q in merged.items()
        ]

    for request, error in refused:
        merged = merge_lines(request.items)
        assert error.shortages, request
        for shortage in error.shortages:
            assert shortage["requested"] == merged[shortage["sku"]]
            assert shortage["available"] < shortage["requested"]
        # A refusal is never spurious: stock only ran lower afterwards, so the cart still
        # does not fit in what is left.
        assert any(
            levels[sku][0] - levels[sku][1] < quantity for sku, quantity in merged.items()
        ), request
        oid = request.order_id
        assert oid not in orders and oid not in timeline and str(oid) not in outbox
        assert request.checkout_id not in reservations
    refused_keys = await query(
        db,
        "SELECT dedupe_key FROM order_events WHERE split_part(dedupe_key, ':', 1) = ANY(:ids)"
        " UNION ALL SELECT dedupe_key FROM outbox WHERE split_part(dedupe_key, ':', 1) = ANY(:ids)",
        ids=[str(request.order_id) for request, _ in refused],
    )
    assert refused_keys == []
    # Nothing else was written: the created orders account for every row.
    assert len(orders) == len(items) == len(timeline) == len(outbox) == len(created)
    assert len(reservations) == len(created)


async def test_duplicate_payment_attachments_and_events_are_written_once(
    db: SessionFactory, store: OrderStore
) -> None:
    await put(db, {"mug": ("Mug", 900, 10)})
    order = new_order([("mug", 2)])
    cart, _ = await store.open(order)
    oid = order.order_id

    async def attach(status: str) -> None:
        await store.attach_payment(
            oid, intent_id="pi_dup", status=status, amount=cart.subtotal, currency="usd"
        )

    async with asyncio.timeout(BURST_LIMIT):
        attached = await asyncio.gather(
            attach("requires_payment_method"),
            attach("requires_payment_method"),
            return_exceptions=True,
        )
        assert failures(attached) == []
        # A later retry, even one that saw another intent status, changes nothing.
        await attach("processing")
        recorded = await asyncio.gather(
            *(
                store.record_event(oid, "webhook_received", {"n": n}, f"{oid}:webhook:evt_1")
                for n in (1, 2)
            ),
            return_exceptions=True,
        )
        assert failures(recorded) == []
        again = await store.record_event(oid, "webhook_received", {"n": 3}, f"{oid}:webhook:evt_1")

    assert sorted(recorded, key=bool) == [False, True]
    assert again is False
    payments = await query(
        db,
        "SELECT order_id, provider, payment_intent_id, status, amount, amount_refunded, currency"
        " FROM payments",
    )
    assert [tuple(row) for row in payments] == [
        (oid, "stripe", "pi_dup", "requires_payment_method", 1800, 0, "usd")
    ]
    assert (await events_by_order(db))[oid] == [
        ("stock_reserved", f"{oid}:reserved"),
        ("order_created", f"{oid}:created"),
        ("payment_intent_created", f"{oid}:intent:pi_dup"),
        ("webhook_received", f"{oid}:webhook:evt_1"),
    ]
    intent_data = await query(
        db, "SELECT data FROM order_events WHERE type = 'payment_intent_created'"
    )
    assert [row.data for row in intent_data] == [
        {"payment_intent_id": "pi_dup", "amount": 1800, "currency": "usd"}
    ]
    webhook = await query(db, "SELECT data FROM order_events WHERE type = 'webhook_received'")
    assert len(webhook) == 1 and webhook[0].data in ({"n": 1}, {"n": 2})
    assert await stock_levels(db) == {"mug": (10, 2)}
    assert [tuple(row) for row in await query(db, "SELECT event_type FROM outbox")] == [
        ("order.created",)
    ]
