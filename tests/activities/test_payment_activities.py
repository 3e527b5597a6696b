"""`settle_payment` pays an order on a webhook only if Stripe's signature on it holds; anything
else (no event, a forged or foreign one) is checked with Stripe itself."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from temporalio.testing import ActivityEnvironment

from activities.payments import PaymentActivities, SettleInput
from core.catalog import Catalog
from core.db import SessionFactory
from core.ledger import StockLedger
from core.orders import NewOrder, OrderStore
from core.stripe_gateway import Intent, StripeGateway
from tests.api.test_webhook_signatures import signature
from workflows.models import SignedWebhook

SECRET = "whsec_settle_test"


class StripeAsked(StripeGateway):
    """The real gateway (signature checks included), with `retrieve_intent` answered here."""

    def __init__(self, status: str) -> None:
        super().__init__("sk_test_unused", api_base="http://127.0.0.1:9", webhook_secret=SECRET)
        self.status = status
        self.asked: list[str] = []

    async def retrieve_intent(self, intent_id: str) -> Intent:
        self.asked.append(intent_id)
        return Intent(intent_id, self.status, 1800, "usd", None, {})


@pytest.fixture
async def orders(db: SessionFactory) -> OrderStore:
    await Catalog(db).put_product("mug", name="Mug", unit_price=900, currency="usd", on_hand=5)
    return OrderStore(db, StockLedger(db))


async def open_order(orders: OrderStore) -> SettleInput:
    checkout_id, order_id = uuid.uuid4(), uuid.uuid4()
    await orders.open(
        NewOrder(checkout_id, order_id, "a@example.com", None, {"mug": 2}, {},
                 datetime.now(UTC) + timedelta(minutes=15))
    )  # fmt: skip
    await orders.attach_payment(
        order_id, intent_id="pi_ours", status="requires_payment_method", amount=1800, currency="usd"
    )
    return SettleInput(
        checkout_id=checkout_id,
        order_id=order_id,
        payment_intent_id="pi_ours",
        amount=1800,
        currency="usd",
    )


def succeeded(intent_id: str, *, secret: str = SECRET, age: int = 0) -> SignedWebhook:
    body = json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex}",
            "type": "payment_intent.succeeded",
            "data": {
                "object": {
                    "id": intent_id,
                    "object": "payment_intent",
                    "status": "succeeded",
                    "amount": 1800,
                    "currency": "usd",
                    "metadata": {},
                }
            },
        }
    )
    return SignedWebhook(
        body=body, signature=signature(body.encode(), secret, int(time.time()) - age)
    )


async def test_a_signed_success_pays_without_asking_stripe(
    orders: OrderStore, db: SessionFactory
) -> None:
    settle = await open_order(orders)
    stripe = StripeAsked(status="requires_payment_method")
    # An hour old: the API checked freshness on arrival; a late retry must still settle.
    settle.signed_event = succeeded("pi_ours", age=3600)

    result = await ActivityEnvironment().run(
        PaymentActivities(stripe, orders).settle_payment, settle
    )

    assert result.outcome == "paid"
    assert stripe.asked == []
    assert (await orders.status(settle.order_id)) == "paid"
    inventory = await Catalog(db).inventory("mug")
    assert (inventory.on_hand, inventory.reserved) == (3, 0)


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(succeeded("pi_ours", secret="whsec_forged"), id="forged-signature"),
        pytest.param(succeeded("pi_someone_elses"), id="another-intent"),
        pytest.param(None, id="no-event"),
    ],
)
async def test_without_a_valid_signed_success_stripe_decides(
    orders: OrderStore, db: SessionFactory, event: SignedWebhook | None
) -> None:
    settle = await open_order(orders)
    settle.signed_event = event
    stripe = StripeAsked(status="requires_payment_method")
    activities = PaymentActivities(stripe, orders)

    result = await ActivityEnvironment().run(activities.settle_payment, settle)

    assert result.outcome == "unpaid"
    assert stripe.asked == ["pi_ours"]
    assert (await orders.status(settle.order_id)) == "pending_payment"
    assert (await Catalog(db).inventory("mug")).reserved == 2

    stripe.status = "succeeded"  # paid at Stripe after all: Stripe's word pays the order
    assert (await ActivityEnvironment().run(activities.settle_payment, settle)).outcome == "paid"
