"""Checkout over HTTP against the real stack: PostgreSQL, the Temporal dev server, the worker
with its real activities, and the Stripe stand-in sending signed webhooks."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from core.workflow_ids import checkout_workflow_id
from tests.e2e.stack import DECLINED_CARD, Stack

pytestmark = pytest.mark.e2e

ADMIN = {"Authorization": "Bearer test-admin-token"}


def as_owner(created: dict[str, Any]) -> dict[str, str]:
    """The credential POST /checkout handed the buyer: it reaches that order only."""
    return {"Authorization": f"Bearer {created['access_token']}"}


async def order_of(stack: Stack, created: dict[str, Any]) -> dict[str, Any]:
    """GET /orders/{id} as the buyer, with the checkout's access token."""
    response = await stack.api.get(f"/orders/{created['order_id']}", headers=as_owner(created))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def state_of(stack: Stack, created: dict[str, Any]) -> dict[str, Any]:
    """GET /checkouts/{id} as the buyer."""
    path = f"/checkouts/{created['checkout_id']}"
    response = await stack.api.get(path, headers=as_owner(created))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def cancel(stack: Stack, created: dict[str, Any]) -> httpx.Response:
    """POST /orders/{id}/cancel as the buyer."""
    return await stack.api.post(f"/orders/{created['order_id']}/cancel", headers=as_owner(created))


async def put_product(
    stack: Stack, sku: str, on_hand: int, price: int = 1200, currency: str = "usd"
) -> None:
    response = await stack.api.put(
        f"/admin/products/{sku}",
        json={"name": sku.title(), "unit_price": price, "currency": currency, "on_hand": on_hand},
        headers=ADMIN,
    )
    assert response.status_code == 200, response.text


async def inventory(stack: Stack, sku: str) -> tuple[int, int, int]:
    body = (await stack.api.get(f"/inventory/{sku}")).json()
    return body["on_hand"], body["reserved"], body["available"]


def cart(*lines: tuple[str, int], email: str = "ada@example.com") -> dict[str, Any]:
    """A guest's cart (a guest names no user_id)."""
    return {
        "customer": {"email": email},
        "items": [{"sku": sku, "quantity": q} for sku, q in lines],
        "metadata": {"channel": "web"},
    }


async def checkout(stack: Stack, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    headers = {"Idempotency-Key": key} if key else {}
    response = await stack.api.post("/checkout", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_checkout_then_card_payment_marks_the_order_paid_and_commits_stock(
    stack: Stack,
) -> None:
    await put_product(stack, "MUG", 10, price=1200)
    await put_product(stack, "TEE", 5, price=2500)

    created = await checkout(stack, cart(("MUG", 2), ("TEE", 1), ("MUG", 1)))

    assert created["status"] == "pending_payment"
    assert created["currency"] == "usd"
    assert created["items"] == [
        {"sku": "MUG", "name": "Mug", "unit_price": 1200, "quantity": 3, "line_total": 3600},
        {"sku": "TEE", "name": "Tee", "unit_price": 2500, "quantity": 1, "line_total": 2500},
    ]
    assert created["totals"] == {
        "subtotal": 6100,
        "discount": 0,
        "tax": 0,
        "shipping": 0,
        "total": 6100,
    }
    intent_id = created["payment"]["payment_intent_id"]
    assert created["payment"]["client_secret"].startswith(intent_id)
    assert await inventory(stack, "MUG") == (10, 3, 7)
    intent = await stack.stripe.intent(intent_id)
    assert (intent["amount"], intent["currency"]) == (6100, "usd")
    assert intent["metadata"] == {
        "checkout_id": created["checkout_id"],
        "order_id": created["order_id"],
    }

    paid = await stack.stripe.pay(intent_id)
    assert paid.json()["status"] == "succeeded"
    order = await stack.wait_for_order(created["order_id"], "paid")

    assert order["payment"] == {
        "provider": "stripe",
        "payment_intent_id": intent_id,
        "status": "succeeded",
        "amount": 6100,
    }
    assert [e["type"] for e in order["events"]] == [
        "stock_reserved",
        "order_created",
        "payment_intent_created",
        "paid",
    ]
    assert order["customer"] == {"email": "ada@example.com", "user_id": None}
    assert await inventory(stack, "MUG") == (7, 0, 7)
    assert await inventory(stack, "TEE") == (4, 0, 4)
    state = await state_of(stack, created)
    assert state["status"] == "paid"
    assert [a["outcome"] for a in state["payment_attempts"]] == ["succeeded"]
    # Operators find the run by its search attributes (visibility is eventually consistent).
    query = f'CheckoutStatus="paid" AND OrderId="{created["order_id"]}"'
    for _ in range(200):  # 20 s at least, as long as waiting for an order
        found = [w.id async for w in stack.services.temporal.list_workflows(query)]
        if found:
            break
        await asyncio.sleep(0.1)
    assert found == [checkout_workflow_id(created["checkout_id"])]
    # The run's history (what the Temporal UI shows operators) never holds the client_secret:
    # the activity's result, the update's answer and the workflow's result carry it sealed.
    history = await stack.history(created["checkout_id"])
    recorded = b"".join(event.SerializeToString() for event in history.events)  # payloads raw
    assert created["payment"]["client_secret"].encode() not in recorded
    assert b'"client_secret_sealed":"' in recorded


async def test_a_declined_card_is_recorded_and_another_card_pays(stack: Stack) -> None:
    await put_product(stack, "MUG", 10)
    created = await checkout(stack, cart(("MUG", 1)))
    intent_id = created["payment"]["payment_intent_id"]

    declined = await stack.stripe.pay(intent_id, DECLINED_CARD)
    assert declined.status_code == 402
    # Once the decline's webhook has reached the checkout, it is still waiting for payment.
    deadline = time.monotonic() + 20
    state = await state_of(stack, created)
    while not state["payment_attempts"]:
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.1)
        state = await state_of(stack, created)
    assert [a["outcome"] for a in state["payment_attempts"]] == ["failed"]
    assert state["status"] == "pending_payment"

    assert (await stack.stripe.pay(intent_id)).json()["status"] == "succeeded"
    order = await stack.wait_for_order(created["order_id"], "paid")

    assert [e["type"] for e in order["events"]][-2:] == ["payment_failed", "paid"]
    state = await state_of(stack, created)
    assert [a["outcome"] for a in state["payment_attempts"]] == ["failed", "succeeded"]
    assert await inventory(stack, "MUG") == (9, 0, 9)


async def test_cancel_releases_stock_and_cancels_the_payment_intent(stack: Stack) -> None:
    await put_product(stack, "MUG", 10)
    created = await checkout(stack, cart(("MUG", 4)))
    order_id = created["order_id"]

    response = await stack.api.post(f"/orders/{order_id}/cancel", headers=ADMIN)

    assert response.status_code == 200
    assert response.json() == {"order_id": order_id, "status": "cancelled"}
    assert await inventory(stack, "MUG") == (10, 0, 10)
    intent = await stack.stripe.intent(created["payment"]["payment_intent_id"])
    assert intent["status"] == "canceled"
    again = await stack.api.post(f"/orders/{order_id}/cancel", headers=ADMIN)
    assert again.status_code == 200
    assert again.json()["status"] == "cancelled"
    order = (await stack.api.get(f"/orders/{order_id}", headers=ADMIN)).json()
    assert order["status"] == "cancelled"
    assert [e["type"] for e in order["events"]][-2:] == ["stock_released", "cancelled"]
    # A customer who still tries to pay the cancelled intent is refused by Stripe.
    late = await stack.stripe.pay(created["payment"]["payment_intent_id"])
    assert late.status_code >= 400


async def test_a_paid_order_cannot_be_cancelled(stack: Stack) -> None:
    await put_product(stack, "MUG", 10)
    created = await checkout(stack, cart(("MUG", 1)))
    await stack.stripe.pay(created["payment"]["payment_intent_id"])
    await stack.wait_for_order(created["order_id"], "paid")

    response = await stack.api.post(
        f"/orders/{created['order_id']}/cancel", headers=as_owner(created)
    )

    assert response.status_code == 409
    assert response.json()["error"] == "invalid_state"
    assert await inventory(stack, "MUG") == (9, 0, 9)


async def test_an_unpaid_checkout_expires_and_its_stock_comes_back(stack: Stack) -> None:
    # The window must outlast the two checks below (70 ms here), on a loaded machine too.
    stack.services.checkouts.payment_timeout_seconds = 5
    await put_product(stack, "MUG", 3)
    created = await checkout(stack, cart(("MUG", 3)))
    assert await inventory(stack, "MUG") == (3, 3, 0)
    sold_out = await stack.api.post("/checkout", json=cart(("MUG", 1)))
    assert sold_out.status_code == 409

    order = await stack.wait_for_order(created["order_id"], "expired", timeout=30)

    assert await inventory(stack, "MUG") == (3, 0, 3)
    intent = await stack.stripe.intent(created["payment"]["payment_intent_id"])
    assert intent["status"] == "canceled"
    assert order["events"][-1]["type"] == "expired"
    cancel = await stack.api.post(
        f"/orders/{created['order_id']}/cancel", headers=as_owner(created)
    )
    assert cancel.status_code == 409


async def test_50_concurrent_checkouts_for_the_last_5_units(stack: Stack) -> None:
    await put_product(stack, "LAST", 5)

    responses = await asyncio.gather(
        *(
            stack.api.post("/checkout", json=cart(("LAST", 1), email=f"buyer{i}@example.com"))
            for i in range(50)
        )
    )

    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(201) == 5
    assert statuses.count(409) == 45
    for refused in (r for r in responses if r.status_code == 409):
        body = refused.json()
        assert body["error"] == "insufficient_stock"
        assert body["details"] == [{"sku": "LAST", "requested": 1, "available": 0}]
    assert await inventory(stack, "LAST") == (5, 5, 0)

    created = [r.json() for r in responses if r.status_code == 201]
    await asyncio.gather(*(stack.stripe.pay(c["payment"]["payment_intent_id"]) for c in created))
    for c in created:
        await stack.wait_for_order(c["order_id"], "paid")
    assert await inventory(stack, "LAST") == (0, 0, 0)
    # No refused checkout left an intent behind that anyone could pay.
    ours = {c["payment"]["payment_intent_id"] for c in created}
    pending = [
        i
        for i in await stack.stripe.intents()
        if i["status"] == "requires_payment_method" and i["id"] in ours
    ]
    assert pending == []


async def test_the_same_webhook_delivered_twice_pays_once(stack: Stack) -> None:
    await put_product(stack, "MUG", 10)
    created = await checkout(stack, cart(("MUG", 2)))
    intent_id = created["payment"]["payment_intent_id"]
    await stack.stripe.pay(intent_id)
    await stack.wait_for_order(created["order_id"], "paid")
    (event,) = [
        e
        for e in await stack.stripe.events("payment_intent.succeeded")
        if e["data"]["object"]["id"] == intent_id
    ]

    first = await stack.post_webhook(event)
    second = await stack.post_webhook(event)

    assert first.status_code == second.status_code == 200
    assert first.json()["outcome"] == second.json()["outcome"] == "duplicate"
    order = (
        await stack.api.get(f"/orders/{created['order_id']}", headers=as_owner(created))
    ).json()
    assert [e["type"] for e in order["events"]].count("paid") == 1
    assert await inventory(stack, "MUG") == (8, 0, 8)


async def test_idempotency_key_replays_the_same_checkout_even_concurrently(stack: Stack) -> None:
    await put_product(stack, "MUG", 10)
    key = f"order-{uuid.uuid4()}"
    body = cart(("MUG", 2))

    responses = await asyncio.gather(
        *(
            stack.api.post("/checkout", json=body, headers={"Idempotency-Key": key})
            for _ in range(100)
        )
    )

    assert sorted(r.status_code for r in responses) == [200] * 99 + [201]
    bodies = [r.json() for r in responses]
    assert all(b == bodies[0] for b in bodies)
    assert await inventory(stack, "MUG") == (10, 2, 8)
    checkout_id = bodies[0]["checkout_id"]
    intents = [
        i for i in await stack.stripe.intents() if i["metadata"].get("checkout_id") == checkout_id
    ]
    assert len(intents) == 1
    async with stack.services.sessions() as session:
        counts = [
            await session.scalar(
                text(f"SELECT count(*) FROM {table} WHERE checkout_id = :c"),  # noqa: S608 - fixed names
                {"c": checkout_id},
            )
            for table in ("orders", "reservations")
        ]
    assert counts == [1, 1]
    # In Temporal too: the duplicates attached to the one `start` update instead of adding theirs.
    events = (await stack.history(checkout_id)).events
    assert (
        sum(e.HasField("workflow_execution_update_accepted_event_attributes") for e in events) == 1
    )
    reused = await stack.api.post(
        "/checkout", json=cart(("MUG", 3)), headers={"Idempotency-Key": key}
    )
    assert reused.status_code == 422
    assert reused.json()["error"] == "idempotency_key_reused"

    # After the checkout has ended, the key still answers the same.
    await cancel(stack, bodies[0])
    later = await stack.api.post("/checkout", json=body, headers={"Idempotency-Key": key})
    assert later.status_code == 200
    assert later.json()["order_id"] == bodies[0]["order_id"]
    # The secret, unsealed from the order's payment row; the intent's status is its own now.
    assert later.json()["payment"] == {**bodies[0]["payment"], "status": "canceled"}
    assert await inventory(stack, "MUG") == (10, 0, 10)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (cart(("GHOST", 1)), 422, "unknown_sku"),
        (cart(("MUG", 1), ("EURO", 1)), 422, "validation_error"),
        (cart(("MUG", 11)), 409, "insufficient_stock"),
        (cart(("MUG", 0)), 422, "validation_error"),
        (cart(("MUG", 1001)), 422, "validation_error"),
        (
            {"customer": {"email": "not-an-email"}, "items": [{"sku": "MUG", "quantity": 1}]},
            422,
            "validation_error",
        ),
        ({"customer": {"email": "a@example.com"}, "items": []}, 422, "validation_error"),
        ({"items": [{"sku": "MUG", "quantity": 1}]}, 422, "validation_error"),
    ],
)
async def test_bad_checkouts_are_refused_and_change_nothing(
    stack: Stack, body: dict[str, Any], status: int, code: str
) -> None:
    await put_product(stack, "MUG", 10)
    await put_product(stack, "EURO", 10, currency="eur")

    response = await stack.api.post("/checkout", json=body)

    assert response.status_code == status, response.text
    assert response.json()["error"] == code
    assert await inventory(stack, "MUG") == (10, 0, 10)
    assert await inventory(stack, "EURO") == (10, 0, 10)


async def test_malformed_json_and_bad_idempotency_keys_are_refused(stack: Stack) -> None:
    malformed = await stack.api.post(
        "/checkout", content=b'{"customer": ', headers={"Content-Type": "application/json"}
    )
    assert malformed.status_code == 422
    assert malformed.json()["error"] == "validation_error"
    too_long = await stack.api.post(
        "/checkout", json=cart(("MUG", 1)), headers={"Idempotency-Key": "k" * 256}
    )
    assert too_long.status_code == 422
    assert too_long.json()["error"] == "validation_error"


async def test_webhooks_with_bad_signatures_are_refused_and_foreign_events_acknowledged(
    stack: Stack,
) -> None:
    event = {"id": "evt_foreign", "type": "customer.created", "data": {"object": {"id": "cus_1"}}}
    assert (await stack.post_webhook(event, signature="t=1,v1=bad")).json()[
        "error"
    ] == "invalid_signature"
    missing = await stack.api.post("/webhooks/stripe", content=b"{}")
    assert missing.status_code == 400
    assert missing.json()["error"] == "invalid_signature"

    foreign = await stack.post_webhook(event)
    assert foreign.status_code == 200
    assert foreign.json()["outcome"] == "ignored"
    gone = {
        "id": "evt_gone",
        "type": "payment_intent.succeeded",
        "data": {
            "object": {
                "id": "pi_x",
                "status": "succeeded",
                "metadata": {"checkout_id": str(uuid.uuid4())},
            }
        },
    }
    # Its metadata names a checkout, but no checkout of ours recorded that PaymentIntent: the
    # body is a hint, and this one is not acted on.
    response = await stack.post_webhook(gone)
    assert response.status_code == 200
    assert response.json()["outcome"] == "ignored"


async def test_unknown_checkouts_and_orders_are_not_found(stack: Stack) -> None:
    for path in (f"/checkouts/{uuid.uuid4()}", f"/orders/{uuid.uuid4()}"):
        response = await stack.api.get(path, headers=ADMIN)
        assert response.status_code == 404
        assert response.json()["error"] == "not_found"
        # Without a credential, nothing is said about whether it exists.
        assert (await stack.api.get(path)).status_code == 401
    cancel = await stack.api.post(f"/orders/{uuid.uuid4()}/cancel", headers=ADMIN)
    assert cancel.status_code == 404
