"""A hostile client against the real stack: bursts, hoarding, oversized orders and text that
PostgreSQL cannot store are refused at once, in the contract's shape, and change nothing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text

from core.db import SessionFactory
from core.settings import Settings
from tests.e2e.stack import Stack, running_stack, stack_settings, swapped_limiter
from tests.e2e.test_checkout_http import ADMIN, cancel, cart, inventory, put_product

pytestmark = pytest.mark.e2e


@pytest.fixture
async def limited(stack: Stack) -> AsyncIterator[Stack]:
    """The shared stack with RATE_LIMIT_CHECKOUTS=3/hour for one test."""
    async with swapped_limiter(stack.services.checkouts, "limiter", "3/hour"):
        yield stack


async def orders_count(stack: Stack) -> int:
    async with stack.services.sessions() as session:
        return int(await session.scalar(text("SELECT count(*) FROM orders")) or 0)


def assert_refused(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["error"] == code
    assert set(body) <= {"error", "message", "details"}
    return body


async def test_a_burst_from_one_address_is_rate_limited_with_retry_after(limited: Stack) -> None:
    await put_product(limited, "MUG", 100)
    answers = [
        await limited.api.post("/checkout", json=cart(("MUG", 1), email=f"b{i}@example.com"))
        for i in range(5)
    ]

    assert [r.status_code for r in answers] == [201, 201, 201, 429, 429]
    for refused in answers[3:]:
        assert_refused(refused, 429, "rate_limited")
        assert 1 <= int(refused.headers["retry-after"]) <= 3600
    # Refused requests reserved and created nothing.
    assert await orders_count(limited) == 3
    assert await inventory(limited, "MUG") == (100, 3, 97)
    # X-Forwarded-For is not believed without TRUSTED_PROXIES: it changes nothing.
    spoofed = await limited.api.post(
        "/checkout",
        json=cart(("MUG", 1), email="spoof@example.com"),
        headers={"X-Forwarded-For": "198.51.100.77"},
    )
    assert_refused(spoofed, 429, "rate_limited")
    # Retries of a checkout already made are not new checkouts: never limited.
    key = "retry-me-" + str(time.monotonic_ns())
    admin_made = await limited.api.post(
        "/checkout",
        json=cart(("MUG", 1), email="retry@example.com"),
        headers={"Idempotency-Key": key, **ADMIN},
    )
    assert admin_made.status_code == 201
    for _ in range(10):
        retry = await limited.api.post(
            "/checkout",
            json=cart(("MUG", 1), email="retry@example.com"),
            headers={"Idempotency-Key": key},
        )
        assert retry.status_code == 200, retry.text
        assert retry.json()["order_id"] == admin_made.json()["order_id"]
    # The admin token is a trusted backend: not rate limited.
    admin = await limited.api.post(
        "/checkout", json=cart(("MUG", 1), email="ops@example.com"), headers=ADMIN
    )
    assert admin.status_code == 201
    assert await orders_count(limited) == 5


async def test_concurrent_duplicates_of_a_new_key_count_as_one_checkout(limited: Stack) -> None:
    """The contract: the same key and body again, even concurrently, any number of times, is
    200. They take turns on the key: one request claims it and is counted, once."""
    await put_product(limited, "MUG", 100)
    key = f"burst-{time.monotonic_ns()}"
    body = cart(("MUG", 1), email="burst@example.com")

    answers = await asyncio.gather(
        *(
            limited.api.post("/checkout", json=body, headers={"Idempotency-Key": key})
            for _ in range(20)
        )
    )

    assert sorted(r.status_code for r in answers) == [200] * 19 + [201]
    assert len({r.json()["checkout_id"] for r in answers}) == 1
    assert await orders_count(limited) == 1
    # One of the three a minute spent: two more checkouts from this address, then 429.
    more = [
        await limited.api.post("/checkout", json=cart(("MUG", 1), email=f"m{i}@example.com"))
        for i in range(3)
    ]
    assert [r.status_code for r in more] == [201, 201, 429]


@pytest.fixture
async def behind_a_proxy(
    settings: Settings, temporal_address: str, db: SessionFactory
) -> AsyncIterator[Stack]:
    """A stack behind a trusted reverse proxy (127.0.0.1), limited to 3 checkouts an hour."""
    own = stack_settings(
        settings,
        "proxy",
        temporal_address,
        trusted_proxies=["127.0.0.1"],
        # Per hour: in memory the windows are aligned to the clock.
        rate_limit_checkouts="3/hour",
    )
    async with running_stack(own) as running:
        yield running


async def test_behind_a_trusted_proxy_addresses_and_customers_are_limited_apart(
    behind_a_proxy: Stack,
) -> None:
    stack = behind_a_proxy
    await put_product(stack, "MUG", 100)

    async def post(email: str, address: str) -> int:
        response = await stack.api.post(
            "/checkout",
            json=cart(("MUG", 1), email=email),
            headers={"X-Forwarded-For": f"203.0.113.250, {address}"},
        )
        return response.status_code

    # One address, four customers: the address's budget runs out.
    assert [await post(f"a{i}@example.com", "198.51.100.1") for i in range(4)] == [
        201,
        201,
        201,
        429,
    ]
    # One customer, four addresses: the customer's budget runs out (email, case-insensitively).
    assert [
        await post(email, f"198.51.100.{10 + i}")
        for i, email in enumerate(
            ["c@example.com", "C@example.com", "c@EXAMPLE.com", "c@example.com"]
        )
    ] == [201, 201, 201, 429]
    # Another address and another customer still get through.
    assert await post("d@example.com", "198.51.100.99") == 201


@pytest.fixture
async def guarded(stack: Stack) -> AsyncIterator[Stack]:
    """The shared stack with RATE_LIMIT_AUTH_FAILURES=3/hour for one test."""
    async with swapped_limiter(stack.services, "auth_failures", "3/hour"):
        yield stack


async def test_guessing_the_admin_token_locks_the_address_out_and_changes_nothing(
    guarded: Stack,
) -> None:
    stack = guarded
    await put_product(stack, "MUG", 100)
    made = await stack.api.post("/checkout", json=cart(("MUG", 1), email="guess@example.com"))
    assert made.status_code == 201, made.text
    created = made.json()
    cancel_path = f"/orders/{created['order_id']}/cancel"

    refused = [
        await stack.api.post(cancel_path, headers={"Authorization": f"Bearer guess-{i}"})
        for i in range(3)
    ]
    assert [r.status_code for r in refused] == [401, 401, 401]
    # Then the right token too is answered 429 from this address: the guesser cannot tell a
    # right guess, and nothing is done.
    locked = await stack.api.post(cancel_path, headers=ADMIN)
    assert_refused(locked, 429, "rate_limited")
    assert 1 <= int(locked.headers["retry-after"]) <= 3600
    assert await inventory(stack, "MUG") == (100, 1, 99)
    async with stack.services.sessions() as session:
        status = await session.scalar(
            text("SELECT status FROM orders WHERE id = :id"), {"id": created["order_id"]}
        )
    assert status == "pending_payment"
    # The buyer's own token (which nobody can guess) and guests are not held back.
    assert (await cancel(stack, created)).status_code == 200
    assert await inventory(stack, "MUG") == (100, 0, 100)
    guest = await stack.api.post("/checkout", json=cart(("MUG", 1), email="guest@example.com"))
    assert guest.status_code == 201, guest.text


async def test_a_customer_cannot_hoard_more_than_max_pending_checkouts(stack: Stack) -> None:
    checkouts = stack.services.checkouts
    checkouts.max_pending_checkouts = 3
    try:
        await put_product(stack, "MUG", 100)
        hoarder = [
            stack.api.post("/checkout", json=cart(("MUG", 5), email="hoard@example.com"))
            for _ in range(10)
        ]
        answers = await asyncio.gather(*hoarder)

        assert sorted(r.status_code for r in answers) == [201] * 3 + [429] * 7
        for refused in (r for r in answers if r.status_code == 429):
            body = assert_refused(refused, 429, "too_many_pending_checkouts")
            assert body["details"] == {"limit": 3}
        assert await inventory(stack, "MUG") == (100, 15, 85)
        # Another customer is not held back by this one.
        other = await stack.api.post("/checkout", json=cart(("MUG", 1), email="o@example.com"))
        assert other.status_code == 201
        # Paying or cancelling one frees a place.
        created = next(r.json() for r in answers if r.status_code == 201)
        assert (await cancel(stack, created)).status_code == 200
        again = await stack.api.post("/checkout", json=cart(("MUG", 5), email="HOARD@example.com"))
        assert again.status_code == 201
    finally:
        checkouts.max_pending_checkouts = stack.settings.max_pending_checkouts


async def test_max_per_order_caps_the_units_of_a_sku_in_one_checkout(stack: Stack) -> None:
    response = await stack.api.put(
        "/admin/products/RARE",
        json={
            "name": "Rare",
            "unit_price": 900,
            "currency": "usd",
            "on_hand": 50,
            "max_per_order": 2,
        },
        headers=ADMIN,
    )
    assert response.json()["max_per_order"] == 2
    await put_product(stack, "MUG", 50)

    over = await stack.api.post("/checkout", json=cart(("RARE", 3), ("MUG", 5)))
    body = assert_refused(over, 422, "quantity_limit_exceeded")
    assert body["details"] == [{"sku": "RARE", "requested": 3, "max": 2}]
    # Lines of one SKU count together.
    split = await stack.api.post("/checkout", json=cart(("RARE", 2), ("RARE", 1)))
    assert_refused(split, 422, "quantity_limit_exceeded")
    assert await inventory(stack, "RARE") == (50, 0, 50)
    assert await orders_count(stack) == 0

    allowed = await stack.api.post("/checkout", json=cart(("RARE", 2)))
    assert allowed.status_code == 201
    assert await inventory(stack, "RARE") == (50, 2, 48)


def raw(body: str) -> dict[str, Any]:
    """A request body sent as written: JSON escapes like \\u0000 or a lone \\ud800 reach the
    service unchanged."""
    return {"content": body.encode(), "headers": {"Content-Type": "application/json", **ADMIN}}


ITEMS = '"items": [{"sku": "MUG", "quantity": 1}]'


@pytest.mark.parametrize(
    "body",
    [
        '{"customer": {"email": "a@example.com", "user_id": "u\\u0000x"}, ' + ITEMS + "}",
        '{"customer": {"email": "a@example.com", "user_id": "\\ud800"}, ' + ITEMS + "}",
        '{"customer": {"email": "a\\u0000@example.com"}, ' + ITEMS + "}",
        '{"customer": {"email": "a@example.com"}, ' + ITEMS + ', "metadata": {"k\\u0000": 1}}',
        '{"customer": {"email": "a@example.com"}, ' + ITEMS + ', "metadata": {"k": ["\\u0000"]}}',
        '{"customer": {"email": "a@example.com"}, ' + ITEMS + ', "metadata": {"k": NaN}}',
        '{"customer": {"email": "a@example.com"}, "items": [{"sku": "MUG\\u0000", "quantity": 1}]}',
    ],
    ids=[
        "nul-user-id",
        "surrogate-user-id",
        "nul-email",
        "nul-metadata-key",
        "nul-metadata-value",
        "nan-metadata",
        "nul-sku",
    ],
)
async def test_text_postgresql_cannot_store_is_refused_at_once_and_starts_nothing(
    stack: Stack, body: str
) -> None:
    await put_product(stack, "MUG", 10)

    started = time.monotonic()
    response = await stack.api.post("/checkout", **raw(body))

    assert_refused(response, 422, "validation_error")
    # Refused by the edge, not retried by the saga (it used to take 7 s and answer 503).
    assert time.monotonic() - started < 5
    assert await orders_count(stack) == 0
    assert await inventory(stack, "MUG") == (10, 0, 10)


async def test_product_names_and_path_and_query_parameters_never_produce_a_500(
    stack: Stack,
) -> None:
    name = '{"name": "M\\ud800g", "unit_price": 100, "currency": "usd", "on_hand": 1}'
    assert_refused(await stack.api.put("/admin/products/MUG", **raw(name)), 422, "validation_error")
    for path in ("/inventory/A%00", "/inventory/%ED%A0%80", "/orders/not-a-uuid", "/checkouts/x"):
        response = await stack.api.get(path, headers=ADMIN)
        assert_refused(response, 422, "validation_error")
    for params in ({"email": "a\x00b"}, {"user_id": "\x00"}, {"cursor": "!!"}, {"limit": "0"}):
        response = await stack.api.get("/orders", params=params, headers=ADMIN)
        assert_refused(response, 422, "validation_error")


async def test_a_forged_refund_event_refunds_nothing(stack: Stack) -> None:
    """A signed `charge.refunded` whose body says "refunded in full" while Stripe's own charge
    says nothing was refunded: the service reads the charge back and keeps the sale."""
    await put_product(stack, "MUG", 10)
    created = (await stack.api.post("/checkout", json=cart(("MUG", 2)))).json()
    intent_id = created["payment"]["payment_intent_id"]
    await stack.stripe.pay(intent_id)
    await stack.wait_for_order(created["order_id"], "paid")
    charge_id = (await stack.stripe.intent(intent_id))["latest_charge"]
    if isinstance(charge_id, dict):
        charge_id = charge_id["id"]

    forged = {
        "id": "evt_forged_refund",
        "type": "charge.refunded",
        "data": {
            "object": {
                "id": charge_id,
                "object": "charge",
                "payment_intent": intent_id,
                "amount": 2400,
                "amount_refunded": 2400,
                "refunded": True,
            }
        },
    }
    response = await stack.post_webhook(forged)

    assert response.status_code == 200
    assert response.json()["outcome"] == "ignored"
    order = await stack.wait_for_order(created["order_id"], "paid")
    assert "refunded" not in [e["type"] for e in order["events"]]
    assert await inventory(stack, "MUG") == (8, 0, 8)


async def test_a_payment_event_reaches_only_the_checkout_that_recorded_its_intent(
    stack: Stack,
) -> None:
    """An event whose metadata names another checkout is signalled to the one whose
    PaymentIntent it is, never to the one its body names."""
    await put_product(stack, "MUG", 10)
    paying = (
        await stack.api.post("/checkout", json=cart(("MUG", 1), email="p@example.com"))
    ).json()
    victim = (
        await stack.api.post("/checkout", json=cart(("MUG", 1), email="v@example.com"))
    ).json()
    event = {
        "id": "evt_misdirected",
        "type": "payment_intent.payment_failed",
        "data": {
            "object": {
                "id": paying["payment"]["payment_intent_id"],
                "object": "payment_intent",
                "status": "requires_payment_method",
                "amount": 1200,
                "currency": "usd",
                "metadata": {"checkout_id": victim["checkout_id"], "order_id": victim["order_id"]},
                "last_payment_error": {"message": "forged"},
            }
        },
    }
    assert (await stack.post_webhook(event)).json()["outcome"] == "acted"

    async def attempts(created: dict[str, Any]) -> list[str]:
        path = f"/checkouts/{created['checkout_id']}"
        state = (await stack.api.get(path, headers=ADMIN)).json()
        return [a["outcome"] for a in state["payment_attempts"]]

    deadline = time.monotonic() + 20
    while await attempts(paying) != ["failed"]:
        assert time.monotonic() < deadline, await attempts(paying)
        await asyncio.sleep(0.1)
    assert await attempts(victim) == []


def test_raw_helper_sends_escapes_unchanged() -> None:
    # The premise of the tests above: the body is not re-encoded on its way.
    body = raw('{"a": "\\u0000"}')["content"]
    assert b"\\u0000" in body
    assert json.loads(body)["a"] == "\x00"
