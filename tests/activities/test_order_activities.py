"""`open_order` on real PostgreSQL: all or nothing, idempotent under Temporal's retries, and
refusals Temporal must not retry."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.orders import OpenOrderInput, OrderActivities
from core.catalog import Catalog
from core.db import SessionFactory
from core.errors import ErrorCode
from core.ledger import StockLedger
from core.orders import OrderStore
from workflows.models import CartItem, Customer


@pytest.fixture
async def activities(db: SessionFactory) -> OrderActivities:
    catalog = Catalog(db)
    await catalog.put_product("mug", name="Mug", unit_price=900, currency="usd", on_hand=5)
    await catalog.put_product("tee", name="Tee", unit_price=2500, currency="usd", on_hand=5)
    await catalog.put_product("hat", name="Hat", unit_price=1500, currency="eur", on_hand=5)
    return OrderActivities(OrderStore(db, StockLedger(db)))


def request(*items: tuple[str, int]) -> OpenOrderInput:
    return OpenOrderInput(
        checkout_id=uuid.uuid4(),
        order_id=uuid.uuid4(),
        customer=Customer(email="a@example.com"),
        items=[CartItem(sku=sku, quantity=quantity) for sku, quantity in items],
        metadata={},
        expires_at=datetime.now(UTC) + timedelta(minutes=15),
    )


async def counts(db: SessionFactory, checkout_id: uuid.UUID) -> tuple[int, int]:
    async with db() as session:
        reservations = await session.scalar(
            text("SELECT count(*) FROM reservations WHERE checkout_id = :c"), {"c": checkout_id}
        )
        orders = await session.scalar(
            text("SELECT count(*) FROM orders WHERE checkout_id = :c"), {"c": checkout_id}
        )
    return int(reservations or 0), int(orders or 0)


async def wait_for_lock_waiters(db: SessionFactory, count: int, timeout: float = 30) -> None:
    """Until `count` backends of this database wait for a lock (a row lock, here)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        # A new transaction each time: pg_stat_activity is a snapshot per transaction.
        async with db() as session:
            waiting = await session.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
        if waiting == count:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{waiting} waiting, not {count}"
        await asyncio.sleep(0.01)


async def test_prices_reserves_and_creates_the_order_at_once(
    activities: OrderActivities, db: SessionFactory
) -> None:
    cart = await ActivityEnvironment().run(
        activities.open_order, request(("tee", 1), ("mug", 2), ("mug", 1))
    )

    assert cart.currency == "usd"
    assert [(line.sku, line.quantity, line.line_total) for line in cart.lines] == [
        ("mug", 3, 2700),
        ("tee", 1, 2500),
    ]
    assert cart.subtotal == 5200
    assert (await Catalog(db).inventory("mug")).reserved == 3


async def test_a_retry_returns_the_recorded_cart_and_changes_nothing(
    activities: OrderActivities, db: SessionFactory
) -> None:
    env = ActivityEnvironment()
    open_mug = request(("mug", 2))
    first = await env.run(activities.open_order, open_mug)
    # The catalog changes between the attempt that worked and Temporal's retry of it.
    await Catalog(db).put_product("mug", name="Mug", unit_price=1000, currency="usd", on_hand=5)

    retries = await asyncio.gather(*(env.run(activities.open_order, open_mug) for _ in range(3)))

    assert all(retry == first for retry in retries)
    assert first.subtotal == 1800
    assert await counts(db, open_mug.checkout_id) == (1, 1)
    assert (await Catalog(db).inventory("mug")).reserved == 2


async def test_concurrent_first_attempts_open_one_order(
    activities: OrderActivities, db: SessionFactory
) -> None:
    env = ActivityEnvironment()
    open_mug = request(("mug", 2))

    carts = await asyncio.gather(*(env.run(activities.open_order, open_mug) for _ in range(5)))

    assert len({cart.model_dump_json() for cart in carts}) == 1
    assert await counts(db, open_mug.checkout_id) == (1, 1)
    assert (await Catalog(db).inventory("mug")).reserved == 2


@pytest.mark.parametrize(
    ("items", "code", "details"),
    [
        ((("mug", 2), ("tee", 6)), ErrorCode.INSUFFICIENT_STOCK,
         [{"sku": "tee", "requested": 6, "available": 5}]),
        ((("mug", 1), ("ghost", 1)), ErrorCode.UNKNOWN_SKU, [{"sku": "ghost"}]),
        ((("mug", 1), ("hat", 1)), ErrorCode.VALIDATION_ERROR,
         [{"sku": "hat", "currency": "eur"}, {"sku": "mug", "currency": "usd"}]),
    ],
)  # fmt: skip
async def test_refusals_keep_nothing_and_are_not_retried(
    activities: OrderActivities,
    db: SessionFactory,
    items: tuple[tuple[str, int], ...],
    code: str,
    details: list[dict[str, object]],
) -> None:
    refused = request(*items)
    with pytest.raises(ApplicationError) as raised:
        await ActivityEnvironment().run(activities.open_order, refused)

    assert raised.value.type == code
    assert raised.value.non_retryable
    assert list(raised.value.details) == [details]
    assert await counts(db, refused.checkout_id) == (0, 0)
    catalog = Catalog(db)
    assert [(await catalog.inventory(sku)).reserved for sku in ("mug", "tee")] == [0, 0]


async def test_an_attempt_that_loses_the_race_answers_with_the_winners_prices(
    activities: OrderActivities, db: SessionFactory
) -> None:
    """Two attempts of one checkout price the cart at different prices (the catalog changed
    in between) and queue on the stock row: the second must not answer with its own price."""
    env = ActivityEnvironment()
    open_mug = request(("mug", 2))
    async with db.begin() as blocker:
        await blocker.execute(text("SELECT 1 FROM stock WHERE sku = 'mug' FOR UPDATE"))
        first = asyncio.create_task(env.run(activities.open_order, open_mug))
        await wait_for_lock_waiters(db, 1)  # priced at 900, waiting for the stock row
        async with db.begin() as session:
            await session.execute(text("UPDATE products SET unit_price = 1000 WHERE sku = 'mug'"))
        second = asyncio.create_task(env.run(activities.open_order, open_mug))
        await wait_for_lock_waiters(db, 2)  # priced at 1000, waiting behind the first
    carts = await asyncio.gather(first, second)

    assert [cart.subtotal for cart in carts] == [1800, 1800]
    assert await counts(db, open_mug.checkout_id) == (1, 1)
    assert (await Catalog(db).inventory("mug")).reserved == 2


async def test_data_the_database_refuses_fails_at_once_not_retried(
    activities: OrderActivities, db: SessionFactory
) -> None:
    """The API refuses NUL first; should such data reach the activity all the same (a bug,
    another client of the workflow), the step fails for good at once instead of being retried
    until its deadline and answered 503. Nothing is kept."""
    poisoned = request(("mug", 1)).model_copy(update={"metadata": {"note": "a\x00b"}})

    with pytest.raises(ApplicationError) as raised:
        await ActivityEnvironment().run(activities.open_order, poisoned)

    assert raised.value.type == ErrorCode.VALIDATION_ERROR
    assert raised.value.non_retryable
    assert await counts(db, poisoned.checkout_id) == (0, 0)
    assert (await Catalog(db).inventory("mug")).reserved == 0


async def test_a_violated_constraint_is_a_bug_refused_at_once(
    activities: OrderActivities, db: SessionFactory
) -> None:
    """A constraint the code should never break (here one added for the test that no order
    can meet) fails the step for good at once, not in a retry loop."""
    async with db.begin() as session:
        await session.execute(text("ALTER TABLE orders ADD CONSTRAINT ck_test_never CHECK (false)"))
    try:
        refused = request(("mug", 1))
        with pytest.raises(ApplicationError) as raised:
            await ActivityEnvironment().run(activities.open_order, refused)
    finally:
        async with db.begin() as session:
            await session.execute(text("ALTER TABLE orders DROP CONSTRAINT ck_test_never"))

    assert raised.value.type == ErrorCode.INTERNAL_ERROR
    assert raised.value.non_retryable
    assert await counts(db, refused.checkout_id) == (0, 0)
    assert (await Catalog(db).inventory("mug")).reserved == 0
