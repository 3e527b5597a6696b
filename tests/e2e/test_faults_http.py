"""Faults injected for real while checkouts run: Stripe down or failing."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from sqlalchemy import text

from tests.e2e.stack import Stack
from tests.e2e.test_checkout_http import (
    ADMIN,
    cancel,
    cart,
    checkout,
    inventory,
    put_product,
)

pytestmark = pytest.mark.e2e


async def intents_of(stack: Stack, checkout_id: str) -> list[dict[str, object]]:
    return [
        i for i in await stack.stripe.intents() if i["metadata"].get("checkout_id") == checkout_id
    ]


@pytest.mark.parametrize("fault", ["503", "drop"])
async def test_stripe_outage_answers_503_in_bounded_time_and_leaves_nothing(
    stack: Stack, fault: str
) -> None:
    await put_product(stack, "MUG", 5)
    key = f"outage-{uuid.uuid4()}"
    body = cart(("MUG", 2), email=f"{key}@example.com")
    stack.stripe_proxy.mode = fault

    started = time.monotonic()
    response = await stack.api.post("/checkout", json=body, headers={"Idempotency-Key": key})
    elapsed = time.monotonic() - started

    assert response.status_code == 503, response.text
    assert response.json()["error"] == "unavailable"
    assert elapsed < 35
    # Retried with backoff before giving up, and nothing kept: stock back, order closed.
    assert stack.stripe_proxy.refused >= 3
    assert await inventory(stack, "MUG") == (5, 0, 5)
    # The 503 names no checkout: the operator finds the failed attempt by its customer.
    listed = await stack.api.get("/orders", params={"email": key + "@example.com"}, headers=ADMIN)
    (order,) = listed.json()["orders"]
    assert order["status"] == "cancelled"
    checkout_id = order["checkout_id"]

    # Stripe comes back: the intent that may have been created is found by its creation key
    # and cancelled, once; new checkouts work again.
    stack.stripe_proxy.mode = "pass"
    for _ in range(600):
        intents = await intents_of(stack, checkout_id)
        if intents and all(i["status"] == "canceled" for i in intents):
            break
        await asyncio.sleep(0.1)
    assert [i["status"] for i in intents] == ["canceled"]
    # The client retries with the same key: the failed attempt is over, a new one opens,
    # once, however many retries race for it.
    retries = await asyncio.gather(
        *(
            stack.api.post("/checkout", json=body, headers={"Idempotency-Key": key})
            for _ in range(5)
        )
    )
    assert sorted(r.status_code for r in retries) == [200, 200, 200, 200, 201]
    again = retries[0].json()
    assert all(r.json() == again for r in retries)
    assert again["checkout_id"] != checkout_id
    assert len(await intents_of(stack, again["checkout_id"])) == 1
    assert await inventory(stack, "MUG") == (5, 2, 3)
    await cancel(stack, again)
    async with stack.services.sessions() as session:
        active = await session.scalar(
            text("SELECT count(*) FROM reservations WHERE status = 'active'")
        )
    assert active == 0


async def test_a_short_stripe_blip_is_retried_and_the_checkout_succeeds(stack: Stack) -> None:
    await put_product(stack, "MUG", 5)
    stack.stripe_proxy.mode = "503"

    async def heal() -> None:
        # Back as soon as Stripe has refused the checkout once, well within its ~7 s of retries.
        for _ in range(1500):  # 30 s, the API's answer bound
            if stack.stripe_proxy.refused:
                break
            await asyncio.sleep(0.02)
        stack.stripe_proxy.mode = "pass"

    healing = asyncio.create_task(heal())
    created = await checkout(stack, cart(("MUG", 1)))
    await healing

    assert stack.stripe_proxy.refused >= 1
    assert len(await intents_of(stack, created["checkout_id"])) == 1
    await stack.stripe.pay(created["payment"]["payment_intent_id"])
    await stack.wait_for_order(created["order_id"], "paid")
    assert await inventory(stack, "MUG") == (4, 0, 4)
