"""Payments that go wrong, over HTTP against the real stack: refunds from the operator and
from Stripe, partial refunds, late payments, disputes, out-of-order events."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from sqlalchemy import text

from tests.e2e.stack import Stack
from tests.e2e.test_checkout_http import (
    ADMIN,
    as_owner,
    cancel,
    cart,
    checkout,
    inventory,
    put_product,
)

pytestmark = pytest.mark.e2e


async def paid_order(stack: Stack, quantity: int = 2) -> dict[str, Any]:
    await put_product(stack, "MUG", 10, price=1500)
    created = await checkout(stack, cart(("MUG", quantity)))
    await stack.stripe.pay(created["payment"]["payment_intent_id"])
    await stack.wait_for_order(created["order_id"], "paid")
    return created


async def event_types(stack: Stack, order_id: str) -> list[str]:
    order = (await stack.api.get(f"/orders/{order_id}", headers=ADMIN)).json()
    return [e["type"] for e in order["events"]]


async def wait_for_event(stack: Stack, order_id: str, type: str, timeout: float = 20) -> list[str]:
    for _ in range(int(timeout * 10)):
        types = await event_types(stack, order_id)
        if type in types:
            return types
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {type} in {await event_types(stack, order_id)}")


async def wait_for_refund_webhook(stack: Stack, intent_id: str, timeout: float = 30) -> None:
    """Until the API has handled Stripe's `charge.refunded` for the intent: its row is written
    in the transaction that commits after the refund was applied to the order."""
    for _ in range(int(timeout * 10)):
        async with stack.services.sessions() as session:
            received = await session.scalar(
                text(
                    "SELECT count(*) FROM processed_webhook_events WHERE type = 'charge.refunded'"
                    " AND payload -> 'data' -> 'object' ->> 'payment_intent' = :intent"
                ),
                {"intent": intent_id},
            )
        if received:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no charge.refunded for {intent_id} received")


async def test_operator_refund_refunds_returns_stock_once_and_is_idempotent(stack: Stack) -> None:
    created = await paid_order(stack)
    order_id = created["order_id"]
    assert await inventory(stack, "MUG") == (8, 0, 8)

    responses = await asyncio.gather(
        *(stack.api.post(f"/admin/orders/{order_id}/refund", headers=ADMIN) for _ in range(3))
    )

    assert [r.status_code for r in responses] == [200, 200, 200]
    assert all(r.json() == {"order_id": order_id, "status": "refunded"} for r in responses)
    assert await inventory(stack, "MUG") == (10, 0, 10)
    # Stripe's charge.refunded for the same refund arrives too: no second effect.
    await wait_for_refund_webhook(stack, created["payment"]["payment_intent_id"])
    assert await inventory(stack, "MUG") == (10, 0, 10)
    types = await event_types(stack, order_id)
    assert types.count("refunded") == 1
    order = (await stack.api.get(f"/orders/{order_id}", headers=ADMIN)).json()
    assert order["status"] == "refunded"
    assert order["payment"]["status"] == "refunded"
    refunds = await stack.stripe.http.get(
        "/v1/refunds", params={"payment_intent": created["payment"]["payment_intent_id"]}
    )
    assert len(refunds.json()["data"]) == 1
    again = await stack.api.post(f"/admin/orders/{order_id}/refund", headers=ADMIN)
    assert again.status_code == 200
    assert (await stack.api.post(f"/orders/{order_id}/cancel", headers=ADMIN)).status_code == 409


async def test_only_paid_orders_can_be_refunded(stack: Stack) -> None:
    await put_product(stack, "MUG", 10)
    created = await checkout(stack, cart(("MUG", 1)))

    pending = await stack.api.post(f"/admin/orders/{created['order_id']}/refund", headers=ADMIN)
    unknown = await stack.api.post(f"/admin/orders/{uuid.uuid4()}/refund", headers=ADMIN)
    customer = await stack.api.post(f"/admin/orders/{created['order_id']}/refund")

    assert pending.status_code == 409
    assert pending.json()["error"] == "invalid_state"
    assert unknown.status_code == 404
    assert customer.status_code == 401
    assert await inventory(stack, "MUG") == (10, 1, 9)
    await cancel(stack, created)


async def test_a_refund_made_at_stripe_refunds_the_order_and_returns_stock(stack: Stack) -> None:
    created = await paid_order(stack, quantity=3)
    intent_id = created["payment"]["payment_intent_id"]

    # A refund from the Stripe dashboard: only the charge.refunded webhook tells us.
    refund = await stack.stripe.http.post("/v1/refunds", data={"payment_intent": intent_id})
    assert refund.status_code == 200
    await stack.wait_for_order(created["order_id"], "refunded")

    assert await inventory(stack, "MUG") == (10, 0, 10)
    assert (await event_types(stack, created["order_id"])).count("refunded") == 1


async def test_a_partial_refund_is_recorded_and_returns_no_stock(stack: Stack) -> None:
    created = await paid_order(stack, quantity=2)
    intent_id = created["payment"]["payment_intent_id"]

    await stack.stripe.http.post(
        "/v1/refunds", data={"payment_intent": intent_id, "amount": "1000"}
    )
    types = await wait_for_event(stack, created["order_id"], "partially_refunded")

    assert "refunded" not in types
    order = (
        await stack.api.get(f"/orders/{created['order_id']}", headers=as_owner(created))
    ).json()
    assert order["status"] == "paid"
    assert await inventory(stack, "MUG") == (8, 0, 8)

    # The rest refunded later makes it a full refund: the stock comes back then, once.
    await stack.stripe.http.post(
        "/v1/refunds", data={"payment_intent": intent_id, "amount": "2000"}
    )
    await stack.wait_for_order(created["order_id"], "refunded")
    assert await inventory(stack, "MUG") == (10, 0, 10)


async def test_a_success_after_the_checkout_closed_is_refunded(stack: Stack) -> None:
    """The customer's confirm lost the race with the cancel: Stripe took the money for an
    order whose stock is gone. Simulated with a second intent of the order that the customer
    paid after the cancel (the stand-in will not pay a cancelled intent)."""
    await put_product(stack, "MUG", 10)
    created = await checkout(stack, cart(("MUG", 1)))
    order_id, checkout_id = created["order_id"], created["checkout_id"]
    await stack.api.post(f"/orders/{order_id}/cancel", headers=ADMIN)
    late = await stack.stripe.http.post(
        "/v1/payment_intents",
        data={
            "amount": "1200",
            "currency": "usd",
            "metadata[checkout_id]": checkout_id,
            "metadata[order_id]": order_id,
        },
    )
    late_id = late.json()["id"]
    async with stack.services.sessions.begin() as session:
        await session.execute(
            text(
                "INSERT INTO payments (order_id, payment_intent_id, status, amount, currency)"
                " VALUES (:o, :p, 'requires_payment_method', 1200, 'usd')"
            ),
            {"o": order_id, "p": late_id},
        )

    await stack.stripe.pay(late_id)
    # Stripe's charge.refunded for that refund comes too: it must not change the order.
    await wait_for_refund_webhook(stack, late_id)
    types = await wait_for_event(stack, order_id, "late_payment_refunded")

    assert types[-1] == "late_payment_refunded"
    order = (await stack.api.get(f"/orders/{order_id}", headers=ADMIN)).json()
    assert order["status"] == "cancelled"
    refunds = await stack.stripe.http.get("/v1/refunds", params={"payment_intent": late_id})
    assert [r["amount"] for r in refunds.json()["data"]] == [1200]
    assert await inventory(stack, "MUG") == (10, 0, 10)


async def test_a_dispute_is_recorded_on_the_timeline(stack: Stack) -> None:
    created = await paid_order(stack, quantity=1)
    event = {
        "id": f"evt_{uuid.uuid4().hex[:12]}",
        "type": "charge.dispute.created",
        "data": {
            "object": {
                "id": "dp_1",
                "amount": 1500,
                "reason": "fraudulent",
                "payment_intent": created["payment"]["payment_intent_id"],
            }
        },
    }

    response = await stack.post_webhook(event)

    assert response.json()["outcome"] == "acted"
    assert (await event_types(stack, created["order_id"]))[-1] == "dispute_created"
    assert (
        await stack.api.get(f"/orders/{created['order_id']}", headers=as_owner(created))
    ).json()["status"] == "paid"


async def test_out_of_order_events_never_move_an_order_backwards(stack: Stack) -> None:
    created = await paid_order(stack, quantity=1)
    intent_id = created["payment"]["payment_intent_id"]
    await stack.api.post(f"/admin/orders/{created['order_id']}/refund", headers=ADMIN)

    # A failure and a success for the same intent, late and out of order.
    for type, status in (
        ("payment_intent.payment_failed", "requires_payment_method"),
        ("payment_intent.succeeded", "succeeded"),
    ):
        event = {
            "id": f"evt_{uuid.uuid4().hex[:12]}",
            "type": type,
            "data": {
                "object": {
                    "id": intent_id,
                    "status": status,
                    "amount": 1500,
                    "currency": "usd",
                    "metadata": {"checkout_id": created["checkout_id"]},
                }
            },
        }
        assert (await stack.post_webhook(event)).status_code == 200
    # And the refund's own charge.refunded, whenever Stripe delivers it.
    await wait_for_refund_webhook(stack, intent_id)

    order = (
        await stack.api.get(f"/orders/{created['order_id']}", headers=as_owner(created))
    ).json()
    assert order["status"] == "refunded"
    assert await inventory(stack, "MUG") == (10, 0, 10)


async def test_a_payment_that_does_not_match_the_order_is_refunded_not_accepted(
    stack: Stack,
) -> None:
    await put_product(stack, "MUG", 10)
    created = await checkout(stack, cart(("MUG", 2)))
    intent_id = created["payment"]["payment_intent_id"]
    # Someone changed the intent's amount at Stripe: the webhook says succeeded, but Stripe's
    # own record does not match the order.
    changed = await stack.stripe.http.post(f"/v1/payment_intents/{intent_id}", data={"amount": "1"})
    assert changed.status_code == 200
    assert (await stack.stripe.pay(intent_id)).json()["status"] == "succeeded"

    # The refund's charge.refunded comes too: it must not change the order.
    await wait_for_refund_webhook(stack, intent_id)
    order = await stack.wait_for_order(created["order_id"], "cancelled")

    types = [e["type"] for e in order["events"]]
    assert "payment_mismatch_refunded" in types
    assert "paid" not in types
    refunds = await stack.stripe.http.get("/v1/refunds", params={"payment_intent": intent_id})
    assert [r["amount"] for r in refunds.json()["data"]] == [1]
    assert await inventory(stack, "MUG") == (10, 0, 10)
