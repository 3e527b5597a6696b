"""The invariant check finds each kind of broken ledger (and finds nothing in a sound one)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import text

from core.catalog import Catalog
from core.db import SessionFactory
from core.invariants import check
from core.ledger import StockLedger
from core.orders import NewOrder, OrderStore


async def _order(db: SessionFactory, quantity: int = 2) -> tuple[uuid.UUID, uuid.UUID]:
    await Catalog(db).put_product("mug", name="Mug", unit_price=500, currency="usd", on_hand=10)
    checkout_id, order_id = uuid.uuid4(), uuid.uuid4()
    await OrderStore(db, StockLedger(db)).open(
        NewOrder(
            checkout_id=checkout_id,
            order_id=order_id,
            customer_email="a@example.com",
            customer_user_id=None,
            items={"mug": quantity},
            metadata={},
            expires_at=datetime.now(UTC),
        )
    )
    return checkout_id, order_id


async def _sql(db: SessionFactory, statement: str, **params: object) -> None:
    async with db.begin() as session:
        await session.execute(text(statement), params)


async def test_a_sound_ledger_has_no_violations(db: SessionFactory) -> None:
    checkout_id, order_id = await _order(db)
    orders = OrderStore(db, StockLedger(db))
    await orders.attach_payment(
        order_id, intent_id="pi_1", status="succeeded", amount=1000, currency="usd"
    )
    await orders.mark_paid(
        checkout_id,
        order_id,
        intent_id="pi_1",
        intent_status="succeeded",
        amount=1000,
        currency="usd",
    )
    await _order(db)  # and one still pending
    assert await check(db) == []


async def test_each_broken_rule_is_reported(db: SessionFactory) -> None:
    _, order_id = await _order(db)
    await OrderStore(db, StockLedger(db)).attach_payment(
        order_id, intent_id="pi_2", status="succeeded", amount=1000, currency="usd"
    )
    # An order closed behind the ledger's back: final, still holding its reservation, with a
    # succeeded payment and no event for the change; and stock whose reserved count drifted
    # from its reservations.
    await _sql(db, "UPDATE orders SET status = 'expired' WHERE id = :id", id=order_id)
    await _sql(db, "UPDATE stock SET reserved = reserved + 1 WHERE sku = 'mug'")
    other, _ = await _order(db, quantity=1)
    await _sql(db, "UPDATE reservations SET status = 'committed' WHERE checkout_id = :c", c=other)

    rules = {v.rule for v in await check(db)}

    assert rules == {
        "reserved_matches_active",
        "committed_matches_sold",
        "succeeded_intent_on_unpaid_order",
        "final_order_with_active_reservation",
        "events_match_order",
    }


async def test_an_order_whose_events_have_a_gap_is_reported(db: SessionFactory) -> None:
    checkout_id, order_id = await _order(db)
    await _order(db)
    await OrderStore(db, StockLedger(db)).close(
        checkout_id, order_id, status="cancelled", reason="test"
    )
    assert await check(db) == []
    await _sql(db, "DELETE FROM outbox WHERE aggregate_id = :id AND sequence = 1", id=order_id)

    violations = await check(db)

    assert [v.rule for v in violations] == ["events_match_order"]
    assert str(order_id) in violations[0].detail
