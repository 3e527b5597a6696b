"""Totals and promotion uses over HTTP against the real stack: the PaymentIntent charges exactly
the totals, the order keeps every figure, and a promotion's use is reserved, committed and
released like stock on every way a checkout can end."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text

from tests.e2e.stack import Stack
from tests.e2e.test_checkout_http import (
    ADMIN,
    as_owner,
    cancel,
    inventory,
    order_of,
    put_product,
)
from tests.e2e.test_reconciler_http import reconcile, terminate, window_ended

pytestmark = pytest.mark.e2e

US = {"country": "us", "postal_code": "10001", "city": "New York", "name": "Ada Lovelace"}


async def put(stack: Stack, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await stack.api.put(path, json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def seed(stack: Stack, *, usage_limit: int | None = None, **promotion: Any) -> None:
    await put_product(stack, "MUG", 100, price=1250)
    await put_product(stack, "CAP", 100, price=999)
    await put(
        stack,
        "/admin/shipping-methods/standard",
        {
            "name": "Standard",
            "price": 500,
            "currency": "usd",
            "countries": ["US", "CA"],
            "free_over": 10_000,
            "active": True,
        },
    )
    await put(stack, "/admin/tax-rates/US", {"rate_bps": 825, "includes_shipping": True})
    await put(
        stack,
        "/admin/promotions/SAVE10",
        {
            "kind": "percent",
            "value": 10,
            "min_subtotal": None,
            "starts_at": None,
            "ends_at": None,
            "usage_limit": usage_limit,
            "per_customer_limit": None,
            "active": True,
            **promotion,
        },
    )


def priced(*lines: tuple[str, int], email: str = "ada@example.com", **more: Any) -> dict[str, Any]:
    return {
        "customer": {"email": email},
        "items": [{"sku": sku, "quantity": q} for sku, q in lines],
        "address": US,
        "shipping_method": "standard",
        "promotion_code": "save10",  # codes match case-insensitively
        **more,
    }


async def promotion(stack: Stack) -> tuple[int, int]:
    async with stack.services.sessions() as session:
        row = (
            await session.execute(
                text("SELECT used, reserved FROM promotions WHERE code = 'SAVE10'")
            )
        ).one()
    return row.used, row.reserved


async def start(stack: Stack, body: dict[str, Any]) -> dict[str, Any]:
    response = await stack.api.post("/checkout", json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_the_intent_charges_the_totals_and_the_order_keeps_every_figure(
    stack: Stack,
) -> None:
    await seed(stack)
    created = await start(stack, priced(("MUG", 2), ("CAP", 1)))

    # 3499 - 350 (10 %, 349.9 half up) + 500 shipping + 8.25 % of 3649 (301.04) = 3950
    totals = {"subtotal": 3499, "discount": 350, "tax": 301, "shipping": 500, "total": 3950}
    assert created["totals"] == totals
    intent = await stack.stripe.intent(created["payment"]["payment_intent_id"])
    assert (intent["amount"], intent["currency"]) == (3950, "usd")
    assert await promotion(stack) == (0, 1)

    order = await order_of(stack, created)
    assert order["totals"] == totals
    assert order["address"] == {**US, "country": "US"}
    assert (order["shipping_method"], order["promotion_code"]) == ("standard", "SAVE10")
    assert order["pricing"]["promotion"] == {
        "code": "SAVE10",
        "kind": "percent",
        "value": 10,
        "discount": 350,
    }

    await stack.stripe.pay(created["payment"]["payment_intent_id"])
    paid = await stack.wait_for_order(created["order_id"], "paid")
    assert paid["payment"]["amount"] == 3950
    assert await promotion(stack) == (1, 0)
    # The quote says the same as the checkout charged, and reserves nothing.
    quote = await stack.api.post("/checkout/quote", json=priced(("MUG", 2), ("CAP", 1)))
    assert quote.status_code == 200, quote.text
    assert quote.json()["totals"] == totals
    assert await promotion(stack) == (1, 0)


async def test_fifty_concurrent_checkouts_of_a_five_use_code(stack: Stack) -> None:
    await seed(stack, usage_limit=5)
    responses = await asyncio.gather(
        *(
            stack.api.post("/checkout", json=priced(("MUG", 1), email=f"b{i}@example.com"))
            for i in range(50)
        )
    )
    codes = [r.status_code for r in responses]
    assert codes.count(201) == 5, [r.text for r in responses if r.status_code != 409][:3]
    refused = [r.json() for r in responses if r.status_code == 409]
    assert len(refused) == 45
    assert {(b["error"], b["details"]["scope"], b["details"]["limit"]) for b in refused} == {
        ("promotion_exhausted", "total", 5)
    }
    assert await inventory(stack, "MUG") == (100, 5, 95)
    assert await promotion(stack) == (0, 5)

    # Two of the five are cancelled: exactly two of the next ten get the code.
    created = [r.json() for r in responses if r.status_code == 201]
    for c in created[:2]:
        assert (await cancel(stack, c)).status_code == 200
    assert await promotion(stack) == (0, 3)
    more = await asyncio.gather(
        *(
            stack.api.post("/checkout", json=priced(("MUG", 1), email=f"c{i}@example.com"))
            for i in range(10)
        )
    )
    assert [r.status_code for r in more].count(201) == 2
    assert await promotion(stack) == (0, 5)


async def test_every_unpaid_end_releases_the_use(stack: Stack) -> None:
    await seed(stack, usage_limit=1)
    one = priced(("MUG", 1))

    # Cancelled by the buyer.
    created = await start(stack, one)
    assert await promotion(stack) == (0, 1)
    assert (await cancel(stack, created)).status_code == 200
    assert await promotion(stack) == (0, 0)

    # Its PaymentIntent cancelled at Stripe (the webhook closes the checkout).
    created = await start(stack, one)
    intent_id = created["payment"]["payment_intent_id"]
    (await stack.stripe.http.post(f"/v1/payment_intents/{intent_id}/cancel")).raise_for_status()
    await stack.wait_for_order(created["order_id"], "cancelled")
    assert await promotion(stack) == (0, 0)

    # Expired: the payment window ends.
    stack.services.checkouts.payment_timeout_seconds = 2
    created = await start(stack, one)
    await stack.wait_for_order(created["order_id"], "expired", timeout=30)
    assert await promotion(stack) == (0, 0)

    # Terminated by an operator, then settled by the reconciler.
    created = await start(stack, one)
    await terminate(stack, created)
    await window_ended(created)
    await reconcile(stack)
    order = await order_of(stack, created)
    assert order["status"] == "expired"
    assert await promotion(stack) == (0, 0)

    # Refused (not enough stock): nothing reserved, not the use either.
    refused = await stack.api.post("/checkout", json=priced(("MUG", 1000)))
    assert refused.status_code == 409
    assert refused.json()["error"] == "insufficient_stock"
    assert await promotion(stack) == (0, 0)
    assert await inventory(stack, "MUG") == (100, 0, 100)


@pytest.mark.parametrize(
    ("body", "status", "error", "reason"),
    [
        ({"promotion_code": "NOPE"}, 422, "invalid_promotion", "unknown"),
        ({"shipping_method": "teleport"}, 422, "shipping_unavailable", None),
        ({"address": {"country": "FR"}}, 422, "shipping_unavailable", None),
        ({"address": None}, 422, "shipping_unavailable", None),
    ],
)
async def test_terms_that_do_not_apply_are_refused_and_keep_nothing(
    stack: Stack, body: dict[str, Any], status: int, error: str, reason: str | None
) -> None:
    await seed(stack)
    response = await stack.api.post("/checkout", json={**priced(("MUG", 1)), **body})
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    if reason is not None:
        assert response.json()["details"] == {"code": "NOPE", "reason": reason}
    assert await inventory(stack, "MUG") == (100, 0, 100)
    assert await promotion(stack) == (0, 0)


async def test_an_ended_promotion_is_refused_with_its_reason(stack: Stack) -> None:
    await seed(stack, ends_at="2020-01-01T00:00:00Z")
    response = await stack.api.post("/checkout", json=priced(("MUG", 1)))
    assert response.status_code == 422
    assert response.json()["details"] == {"code": "SAVE10", "reason": "ended"}
    assert (await stack.api.get("/orders", headers=ADMIN)).json()["orders"] == []


async def test_the_order_token_reads_the_priced_order_and_nobody_else_does(stack: Stack) -> None:
    await seed(stack)
    created = await start(stack, priced(("MUG", 1)))
    stranger = await stack.api.get(f"/orders/{created['order_id']}")
    assert stranger.status_code == 401
    mine = await stack.api.get(f"/orders/{created['order_id']}", headers=as_owner(created))
    assert mine.json()["totals"]["total"] == created["totals"]["total"]


async def test_a_per_customer_limit_holds_under_concurrent_checkouts(stack: Stack) -> None:
    await seed(stack, per_customer_limit=2)
    same_guest = [
        priced(("MUG", 1), email=email)
        for email in ["ada@example.com", "ADA@example.com", "Ada@Example.com"] * 3
    ]
    responses = await asyncio.gather(*(stack.api.post("/checkout", json=b) for b in same_guest))
    codes = sorted(r.status_code for r in responses)
    assert codes == [201] * 2 + [409] * 7, [r.text for r in responses if r.status_code != 201]
    assert {
        (r.json()["error"], r.json()["details"]["scope"]) for r in responses if r.status_code == 409
    } == {("promotion_exhausted", "customer")}
    # Another customer has uses of their own.
    await start(stack, priced(("MUG", 1), email="grace@example.com"))
    assert await promotion(stack) == (0, 3)
    assert await inventory(stack, "MUG") == (100, 3, 97)
