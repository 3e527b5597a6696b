"""`settle_payment` on real PostgreSQL: Stripe's PaymentIntent decides, read back each time;
a payment for another amount is refunded (once, by its key) and never marks the order paid."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from temporalio.testing import ActivityEnvironment

from activities.payments import PaymentActivities, SettleInput
from core.catalog import Catalog
from core.db import SessionFactory
from core.ledger import StockLedger
from core.orders import NewOrder, OrderStore
from core.sealing import Sealer
from core.stripe_gateway import Intent, Refund, StripeGateway


class StripeSays(StripeGateway):
    """The gateway with Stripe's side answered here: the intent as Stripe holds it."""

    def __init__(self, status: str, amount: int = 1800) -> None:
        super().__init__("sk_test_unused", api_base="http://127.0.0.1:9", webhook_secret="x")
        self.status, self.amount = status, amount
        self.asked = 0
        self.refund_keys: list[str] = []

    async def retrieve_intent(self, intent_id: str) -> Intent:
        self.asked += 1
        return Intent(intent_id, self.status, self.amount, "usd", None, {})

    async def refund(
        self, intent_id: str, *, idempotency_key: str, metadata: dict[str, str]
    ) -> Refund:
        self.refund_keys.append(idempotency_key)
        return Refund(id="re_1", status="succeeded", amount=self.amount)


@pytest.fixture
async def orders(db: SessionFactory) -> OrderStore:
    await Catalog(db).put_product("mug", name="Mug", unit_price=900, currency="usd", on_hand=5)
    return OrderStore(db, StockLedger(db))


async def pending_order(orders: OrderStore) -> SettleInput:
    checkout_id, order_id = uuid.uuid4(), uuid.uuid4()
    expires_at = datetime.now(UTC) + timedelta(minutes=15)
    await orders.open(
        NewOrder(checkout_id, order_id, "a@example.com", None, {"mug": 2}, {}, expires_at)
    )
    await orders.attach_payment(
        order_id, intent_id="pi_1", status="requires_payment_method", amount=1800, currency="usd"
    )
    return SettleInput(
        checkout_id=checkout_id, order_id=order_id, payment_intent_id="pi_1", amount=1800,
        currency="usd",
    )  # fmt: skip


async def test_paid_only_once_stripe_says_succeeded(orders: OrderStore, db: SessionFactory) -> None:
    settle = await pending_order(orders)
    stripe = StripeSays("requires_payment_method")
    activities = PaymentActivities(stripe, orders, Sealer("test-secret-key-for-sealing"))
    env = ActivityEnvironment()

    assert (await env.run(activities.settle_payment, settle)).outcome == "unpaid"
    assert await orders.status(settle.order_id) == "pending_payment"

    stripe.status = "succeeded"
    for _ in range(2):  # a retry of the activity changes nothing more
        assert (await env.run(activities.settle_payment, settle)).outcome == "paid"

    assert stripe.asked == 3
    assert await orders.status(settle.order_id) == "paid"
    inventory = await Catalog(db).inventory("mug")
    assert (inventory.on_hand, inventory.reserved) == (3, 0)


async def test_another_amount_is_refunded_once_and_never_paid(
    orders: OrderStore, db: SessionFactory
) -> None:
    settle = await pending_order(orders)
    stripe = StripeSays("succeeded", amount=1)
    activities = PaymentActivities(stripe, orders, Sealer("test-secret-key-for-sealing"))

    for _ in range(2):
        result = await ActivityEnvironment().run(activities.settle_payment, settle)
        assert result.outcome == "mismatch"

    assert stripe.refund_keys == ["pi_1:mismatch-refund"] * 2  # one refund at Stripe
    view = await orders.get(settle.order_id)
    assert view.order.status == "pending_payment"  # the workflow closes it next
    assert [e.type for e in view.events].count("payment_mismatch_refunded") == 1
    assert (await Catalog(db).inventory("mug")).reserved == 2
