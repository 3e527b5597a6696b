"""Inventory activities: idempotent under retry, and failures Temporal must not retry."""

from __future__ import annotations

import uuid

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.inventory import (
    CheckoutStockInput,
    InventoryActivities,
    ReserveStockInput,
    StockLine,
)
from core.catalog import Catalog
from core.db import SessionFactory
from core.errors import ErrorCode
from core.ledger import StockLedger


@pytest.fixture
async def activities(db: SessionFactory) -> InventoryActivities:
    await Catalog(db).put_product("mug", name="Mug", unit_price=900, currency="usd", on_hand=5)
    return InventoryActivities(StockLedger(db))


async def test_reserve_retried_by_temporal_reserves_once(
    activities: InventoryActivities, db: SessionFactory
) -> None:
    env = ActivityEnvironment()
    request = ReserveStockInput(checkout_id=uuid.uuid4(), lines=[StockLine(sku="mug", quantity=2)])

    first = await env.run(activities.reserve_stock, request)
    retry = await env.run(activities.reserve_stock, request)

    assert first == retry
    assert (await Catalog(db).inventory("mug")).reserved == 2


@pytest.mark.parametrize(
    ("sku", "quantity", "code"),
    [("mug", 6, ErrorCode.INSUFFICIENT_STOCK), ("ghost", 1, ErrorCode.UNKNOWN_SKU)],
)
async def test_reserve_failures_are_typed_and_not_retryable(
    activities: InventoryActivities, sku: str, quantity: int, code: str
) -> None:
    request = ReserveStockInput(
        checkout_id=uuid.uuid4(), lines=[StockLine(sku=sku, quantity=quantity)]
    )
    with pytest.raises(ApplicationError) as raised:
        await ActivityEnvironment().run(activities.reserve_stock, request)
    assert raised.value.type == code
    assert raised.value.non_retryable


async def test_release_retried_by_temporal_gives_the_stock_back_once(
    activities: InventoryActivities, db: SessionFactory
) -> None:
    env = ActivityEnvironment()
    checkout = uuid.uuid4()
    await env.run(
        activities.reserve_stock,
        ReserveStockInput(checkout_id=checkout, lines=[StockLine(sku="mug", quantity=1)]),
    )
    for _ in range(2):
        released = await env.run(activities.release_stock, CheckoutStockInput(checkout_id=checkout))
        assert released.status == "released"
    inventory = await Catalog(db).inventory("mug")
    assert (inventory.on_hand, inventory.reserved) == (5, 0)
