"""Checking out a server-side cart over HTTP against the real stack: the cart's lines as they
are at checkout, the cart checked out once its order is paid and open again if not, its
credential required, one order for concurrent duplicates of one key."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text

from tests.e2e.stack import Stack, swapped_limiter
from tests.e2e.test_checkout_http import ADMIN, cancel, inventory, put_product
from tests.e2e.test_reconciler_http import reconcile

pytestmark = pytest.mark.e2e


def token(cart: dict[str, Any]) -> dict[str, str]:
    return {"X-Cart-Token": cart["cart_token"]}


async def guest_cart(stack: Stack, **lines: int) -> dict[str, Any]:
    response = await stack.api.post(
        "/carts", json={"items": [{"sku": sku, "quantity": q} for sku, q in lines.items()]}
    )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def from_cart(cart: dict[str, Any], email: str = "ada@example.com") -> dict[str, Any]:
    return {"customer": {"email": email}, "cart_id": cart["cart_id"]}


async def read(stack: Stack, cart: dict[str, Any]) -> dict[str, Any]:
    response = await stack.api.get(f"/carts/{cart['cart_id']}", headers=token(cart))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_a_guest_cart_is_checked_out_once_its_order_is_paid(stack: Stack) -> None:
    await put_product(stack, "MUG", 10, price=1200)
    await put_product(stack, "TEE", 10, price=2500)
    cart = await guest_cart(stack, MUG=1)
    changed = await stack.api.put(
        f"/carts/{cart['cart_id']}/items/TEE", json={"quantity": 2}, headers=token(cart)
    )
    assert changed.status_code == 200, changed.text

    quote = await stack.api.post("/checkout/quote", json=from_cart(cart), headers=token(cart))
    assert quote.status_code == 200, quote.text
    assert quote.json()["totals"]["total"] == 1200 + 2 * 2500

    key = {"Idempotency-Key": str(uuid.uuid4()), **token(cart)}
    response = await stack.api.post("/checkout", json=from_cart(cart), headers=key)
    assert response.status_code == 201, response.text
    created = response.json()
    assert [(i["sku"], i["quantity"]) for i in created["items"]] == [("MUG", 1), ("TEE", 2)]
    assert created["totals"]["total"] == 6200
    assert await inventory(stack, "TEE") == (10, 2, 8)
    # Waiting for payment, the cart stays open (a refused or abandoned checkout leaves it).
    before = await read(stack, cart)
    assert before["status"] == "open"

    await stack.stripe.pay(created["payment"]["payment_intent_id"])
    order = await stack.wait_for_order(created["order_id"], "paid")
    assert order["cart_id"] == cart["cart_id"]
    after = await read(stack, cart)
    assert after["status"] == "checked_out"
    assert after["version"] == before["version"] + 1  # a change of the cart like any other
    # A replay of the key answers the same checkout though the cart is closed now.
    replay = await stack.api.post("/checkout", json=from_cart(cart), headers=key)
    assert replay.status_code == 200, replay.text
    assert replay.json()["order_id"] == created["order_id"]
    # A new key cannot check the cart out again.
    again = await stack.api.post("/checkout", json=from_cart(cart), headers=token(cart))
    assert again.status_code == 409
    assert again.json()["error"] == "invalid_state"
    assert await inventory(stack, "TEE") == (8, 0, 8)


async def test_a_cancelled_checkout_leaves_the_cart_open_to_check_out_again(
    stack: Stack,
) -> None:
    await put_product(stack, "MUG", 10)
    cart = await guest_cart(stack, MUG=2)
    first = await stack.api.post("/checkout", json=from_cart(cart), headers=token(cart))
    assert first.status_code == 201, first.text
    assert (await cancel(stack, first.json())).status_code == 200
    assert (await read(stack, cart))["status"] == "open"
    second = await stack.api.post("/checkout", json=from_cart(cart), headers=token(cart))
    assert second.status_code == 201, second.text
    assert second.json()["order_id"] != first.json()["order_id"]
    assert await inventory(stack, "MUG") == (10, 2, 8)


async def test_a_cart_needs_its_credential_to_be_checked_out(stack: Stack) -> None:
    await put_product(stack, "MUG", 10)
    cart = await guest_cart(stack, MUG=1)
    other = await guest_cart(stack, MUG=1)

    anonymous = await stack.api.post("/checkout", json=from_cart(cart))
    assert anonymous.status_code == 401
    stranger = await stack.api.post("/checkout", json=from_cart(cart), headers=token(other))
    assert stranger.status_code == 404
    unknown = await stack.api.post(
        "/checkout", json=from_cart({"cart_id": str(uuid.uuid4())}), headers=token(cart)
    )
    assert unknown.status_code == 404
    as_admin = await stack.api.post("/checkout", json=from_cart(cart), headers=ADMIN)
    assert as_admin.status_code == 201, as_admin.text
    assert await inventory(stack, "MUG") == (10, 1, 9)
    both = await stack.api.post(
        "/checkout",
        json={**from_cart(cart), "items": [{"sku": "MUG", "quantity": 1}]},
        headers=token(cart),
    )
    assert both.status_code == 422
    # A malformed cart token is a malformed credential wherever it is sent (v2: 401).
    items = {"customer": {"email": "ada@example.com"}, "items": [{"sku": "MUG", "quantity": 1}]}
    for bad in ({"X-Cart-Token": "ct_short"}, {"Authorization": "Bearer ct_short"}):
        refused = await stack.api.post("/checkout", json=items, headers=bad)
        assert refused.status_code == 401, refused.text
    assert await inventory(stack, "MUG") == (10, 1, 9)


async def test_an_empty_cart_is_refused(stack: Stack) -> None:
    cart = await guest_cart(stack)
    response = await stack.api.post("/checkout", json=from_cart(cart), headers=token(cart))
    assert response.status_code == 422
    assert response.json()["error"] == "validation_error"


async def test_a_cart_checked_out_twice_concurrently_with_one_key_gives_one_order(
    stack: Stack,
) -> None:
    await put_product(stack, "MUG", 10)
    cart = await guest_cart(stack, MUG=3)
    headers = {"Idempotency-Key": str(uuid.uuid4()), **token(cart)}
    responses = await asyncio.gather(
        *(stack.api.post("/checkout", json=from_cart(cart), headers=headers) for _ in range(10))
    )
    assert sorted(r.status_code for r in responses) == [200] * 9 + [201]
    assert len({r.json()["order_id"] for r in responses}) == 1
    assert await inventory(stack, "MUG") == (10, 3, 7)
    orders = (await stack.api.get("/orders", headers=ADMIN)).json()["orders"]
    assert len(orders) == 1


async def test_the_reconciler_closes_lapsed_guest_carts_for_good(stack: Stack) -> None:
    lapsed = await guest_cart(stack)
    fresh = await guest_cart(stack)
    async with stack.services.sessions.begin() as session:
        await session.execute(
            text("UPDATE carts SET expires_at = now() - interval '1 second' WHERE id = :id"),
            {"id": lapsed["cart_id"]},
        )
    # Lapsed: 404 at once, before any job ran.
    gone = await stack.api.get(f"/carts/{lapsed['cart_id']}", headers=token(lapsed))
    assert gone.status_code == 404

    await reconcile(stack)

    async with stack.services.sessions() as session:
        rows = (await session.execute(text("SELECT id, status FROM carts"))).all()
    assert {str(r.id): r.status for r in rows} == {
        lapsed["cart_id"]: "expired",
        fresh["cart_id"]: "open",
    }


@pytest.fixture
async def few_carts(stack: Stack) -> AsyncIterator[Stack]:
    """The shared stack with RATE_LIMIT_CARTS=2/hour for one test."""
    async with swapped_limiter(stack.services, "cart_limiter", "2/hour"):
        yield stack


async def test_an_address_opens_only_so_many_carts_and_checks_them_out(few_carts: Stack) -> None:
    stack = few_carts
    await put_product(stack, "MUG", 10, price=1200)
    carts = [await guest_cart(stack, MUG=1) for _ in range(2)]
    async with stack.services.sessions() as session:
        before = await session.scalar(text("SELECT count(*) FROM carts"))

    refused = await stack.api.post("/carts", json={"items": [{"sku": "MUG", "quantity": 1}]})
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 3600
    async with stack.services.sessions() as session:
        assert await session.scalar(text("SELECT count(*) FROM carts")) == before
    # The carts it has keep working: changed, checked out and paid.
    changed = await stack.api.put(
        f"/carts/{carts[0]['cart_id']}/items/MUG", json={"quantity": 2}, headers=token(carts[0])
    )
    assert changed.status_code == 200, changed.text
    response = await stack.api.post("/checkout", json=from_cart(carts[0]), headers=token(carts[0]))
    assert response.status_code == 201, response.text
    await stack.stripe.pay(response.json()["payment"]["payment_intent_id"])
    await stack.wait_for_order(response.json()["order_id"], "paid")
    assert (await read(stack, carts[0]))["status"] == "checked_out"
    # Admin is not limited.
    assert (await stack.api.post("/carts", headers=ADMIN)).status_code == 201
