"""Idempotency-Keys over HTTP against the real stack: duplicates by the thousand, a retry after
the checkout's history was deleted, a key past its TTL, another body under a key, a refusal
that frees its key. What counts is what a client and an operator see: the answer, the stock,
the PaymentIntents at the stand-in, the checkout's history in Temporal."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text

from core.schedules import ensure_reconciler_schedule
from core.workflow_ids import RECONCILER_SCHEDULE_ID
from tests.e2e.stack import Stack
from tests.e2e.test_checkout_http import (
    ADMIN,
    as_owner,
    cancel,
    cart,
    inventory,
    order_of,
    put_product,
    state_of,
)

pytestmark = pytest.mark.e2e


def answer(body: dict[str, Any]) -> dict[str, Any]:
    """What a replay must give back unchanged: the contract's list, and the client_secret the
    customer's browser needs to pay."""
    return {
        "checkout_id": body["checkout_id"],
        "order_id": body["order_id"],
        "access_token": body["access_token"],
        "payment_intent_id": body["payment"]["payment_intent_id"],
        "client_secret": body["payment"]["client_secret"],
    }


async def post(stack: Stack, body: dict[str, Any], key: str) -> tuple[int, dict[str, Any]]:
    response = await stack.api.post("/checkout", json=body, headers={"Idempotency-Key": key})
    return response.status_code, response.json()


async def opened(stack: Stack, body: dict[str, Any], key: str) -> dict[str, Any]:
    status, created = await post(stack, body, key)
    assert status == 201, created
    return created


async def intents_of(stack: Stack, checkout_id: str) -> list[dict[str, Any]]:
    return [
        i for i in await stack.stripe.intents() if i["metadata"].get("checkout_id") == checkout_id
    ]


async def rows(stack: Stack, sql: str, **params: Any) -> int:
    async with stack.services.sessions() as session:
        return int(await session.scalar(text(sql), params) or 0)


async def reservations_of(stack: Stack, checkout_id: str) -> list[tuple[str, int, str]]:
    async with stack.services.sessions() as session:
        found = await session.execute(
            text(
                "SELECT sku, quantity, status FROM reservations WHERE checkout_id = :c ORDER BY sku"
            ),
            {"c": checkout_id},
        )
        return [(r.sku, r.quantity, r.status) for r in found]


async def checkouts_of(stack: Stack, email: str) -> list[dict[str, Any]]:
    """Every order of a customer, as customer support finds them."""
    response = await stack.api.get("/orders", params={"email": email, "limit": 100}, headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()["orders"]  # type: ignore[no-any-return]


async def waiting_for_payment(stack: Stack, checkout_id: str, timeout: float = 20) -> int:
    """The history's length once the run sits in its payment window (the timer started):
    from then on, only a payment, a cancel or the timer add to it."""
    deadline = time.monotonic() + timeout
    while True:
        events = (await stack.history(checkout_id)).events
        if any(e.HasField("timer_started_event_attributes") for e in events):
            return len(events)
        assert time.monotonic() < deadline, "the checkout never started its payment window"
        await asyncio.sleep(0.05)


@pytest.fixture
async def short_keys(stack: Stack) -> AsyncIterator[Stack]:
    """Keys that live one second (IDEMPOTENCY_KEY_TTL, which the settings never let fall
    below the payment window): the service's own attribute, put back afterwards."""
    checkouts = stack.services.checkouts
    ttl = checkouts.key_ttl_seconds
    checkouts.key_ttl_seconds = 1
    try:
        yield stack
    finally:
        checkouts.key_ttl_seconds = ttl


async def test_10000_sequential_duplicates_answer_alike_and_leave_the_history_alone(
    stack: Stack,
) -> None:
    await put_product(stack, "DUP-10K", 10)
    key = str(uuid.uuid4())
    body = cart(("DUP-10K", 2), email="ten-thousand@example.com")
    created = await opened(stack, body, key)
    first = answer(created)
    before = await waiting_for_payment(stack, created["checkout_id"])

    payload = json.dumps(body).encode()
    headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
    statuses: dict[int, int] = {}
    answers: set[str] = set()

    async def duplicates(http: aiohttp.ClientSession, n: int) -> None:
        for _ in range(n):
            async with http.post("/checkout", data=payload, headers=headers) as response:
                statuses[response.status] = statuses.get(response.status, 0) + 1
                replayed = answer(await response.json())
                answers.add(json.dumps(replayed, sort_keys=True))

    # One keep-alive connection: 10,000 requests one after the other.
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(str(stack.api.base_url), connector=connector) as http:
        await duplicates(http, 10)
        after_10 = len((await stack.history(created["checkout_id"])).events)
        await duplicates(http, 9_990)
    after_10_000 = len((await stack.history(created["checkout_id"])).events)

    assert statuses == {200: 10_000}
    assert answers == {json.dumps(first, sort_keys=True)}
    assert before == after_10 == after_10_000
    assert await inventory(stack, "DUP-10K") == (10, 2, 8)
    assert len(await intents_of(stack, created["checkout_id"])) == 1
    assert len(await checkouts_of(stack, "ten-thousand@example.com")) == 1


async def test_a_retry_after_the_run_was_deleted_answers_the_same_checkout(stack: Stack) -> None:
    await put_product(stack, "DEL-OPEN", 10)
    key = str(uuid.uuid4())
    body = cart(("DEL-OPEN", 2), email="deleted-open@example.com")
    created = await opened(stack, body, key)
    checkout_id = created["checkout_id"]

    await stack.delete_run(checkout_id)
    status, retried = await post(stack, body, key)

    assert status == 200, retried
    assert answer(retried) == answer(created)
    assert retried["status"] == "pending_payment"
    assert (retried["items"], retried["totals"]) == (created["items"], created["totals"])
    assert len(await intents_of(stack, checkout_id)) == 1
    assert await reservations_of(stack, checkout_id) == [("DEL-OPEN", 2, "active")]
    assert await inventory(stack, "DEL-OPEN") == (10, 2, 8)
    assert len(await checkouts_of(stack, "deleted-open@example.com")) == 1
    # Temporal knows nothing of it any more: the buyer still sees the checkout and its order.
    assert (await order_of(stack, retried))["status"] == "pending_payment"
    assert (await state_of(stack, retried))["status"] == "pending_payment"
    again_status, again = await post(stack, body, key)
    assert (again_status, answer(again)) == (200, answer(created))


async def test_a_retry_after_a_cancelled_run_was_deleted_answers_it_cancelled(
    stack: Stack,
) -> None:
    await put_product(stack, "DEL-DONE", 10)
    key = str(uuid.uuid4())
    body = cart(("DEL-DONE", 3), email="deleted-cancelled@example.com")
    created = await opened(stack, body, key)
    checkout_id = created["checkout_id"]
    cancelled = await cancel(stack, created)
    assert cancelled.status_code == 200, cancelled.text
    assert await inventory(stack, "DEL-DONE") == (10, 0, 10)

    await stack.delete_run(checkout_id)
    status, retried = await post(stack, body, key)

    assert status == 200, retried
    assert answer(retried) == answer(created)
    assert retried["status"] == "cancelled"
    assert (await order_of(stack, created))["status"] == "cancelled"
    # Never reopened: nothing reserved again, no second PaymentIntent, the first stays cancelled.
    assert await inventory(stack, "DEL-DONE") == (10, 0, 10)
    assert await reservations_of(stack, checkout_id) == [("DEL-DONE", 3, "released")]
    (intent,) = await intents_of(stack, checkout_id)
    assert intent["status"] == "canceled"
    assert len(await checkouts_of(stack, "deleted-cancelled@example.com")) == 1


async def test_a_checkout_whose_run_was_deleted_can_still_be_cancelled(stack: Stack) -> None:
    """The contract: a pending order is cancelled with 200 once its PaymentIntent is canceled
    and its stock released; 409 only for paid, refunded or expired orders."""
    await put_product(stack, "DEL-CANCEL", 10)
    created = await opened(
        stack,
        cart(("DEL-CANCEL", 2), email="deleted-then-cancelled@example.com"),
        str(uuid.uuid4()),
    )
    await stack.delete_run(created["checkout_id"])

    response = await cancel(stack, created)

    assert response.status_code == 200, response.text
    assert response.json() == {"order_id": created["order_id"], "status": "cancelled"}
    assert await inventory(stack, "DEL-CANCEL") == (10, 0, 10)
    intent = await stack.stripe.intent(created["payment"]["payment_intent_id"])
    assert intent["status"] == "canceled"


async def test_a_checkout_whose_run_was_deleted_gives_its_stock_back_after_its_window(
    stack: Stack,
) -> None:
    """The contract: nothing is held forever. A checkout whose run was lost has its stock
    released and its PaymentIntent settled within RECONCILE_INTERVAL after its window ends."""
    window = 2
    stack.services.checkouts.payment_timeout_seconds = window
    await put_product(stack, "DEL-HELD", 10)
    created = await opened(
        stack, cart(("DEL-HELD", 4), email="deleted-held@example.com"), str(uuid.uuid4())
    )
    await stack.delete_run(created["checkout_id"])

    # The schedule a worker's start-up creates (`worker.main`), for this stack's task queue.
    await ensure_reconciler_schedule(stack.services.temporal, stack.settings)
    try:
        deadline = time.monotonic() + window + stack.settings.reconcile_interval + 15
        while True:
            if await inventory(stack, "DEL-HELD") == (10, 0, 10) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
    finally:
        await stack.services.temporal.get_schedule_handle(RECONCILER_SCHEDULE_ID).delete()

    assert await inventory(stack, "DEL-HELD") == (10, 0, 10)
    intent = await stack.stripe.intent(created["payment"]["payment_intent_id"])
    assert intent["status"] == "canceled"
    assert (await order_of(stack, created))["status"] != "pending_payment"


async def test_a_key_past_its_ttl_opens_a_new_checkout_once_its_own_has_closed(
    short_keys: Stack,
) -> None:
    stack = short_keys
    await put_product(stack, "TTL", 10)
    key = str(uuid.uuid4())
    body = cart(("TTL", 2), email="ttl@example.com")
    first = await opened(stack, body, key)
    deadline = time.monotonic() + 30
    while not await rows(
        stack,
        "SELECT count(*) FROM checkout_keys WHERE key = :k AND expires_at <= now()",
        k=key,
    ):
        assert time.monotonic() < deadline, "the key never expired"
        await asyncio.sleep(0.1)

    # Past its TTL, but its checkout can still be paid: the key still stands for it (a
    # second checkout now would be a second PaymentIntent for the same request).
    status, still = await post(stack, body, key)
    assert status == 200, still
    assert answer(still) == answer(first)
    assert (await cancel(stack, first)).status_code == 200

    second = await opened(stack, body, key)

    for field in ("checkout_id", "order_id", "access_token", "payment_intent_id"):
        assert answer(second)[field] != answer(first)[field], field
    assert uuid.UUID(second["checkout_id"]).version == 4
    assert uuid.UUID(second["order_id"]).version == 4
    assert await inventory(stack, "TTL") == (10, 2, 8)
    assert len(await intents_of(stack, second["checkout_id"])) == 1
    assert len(await checkouts_of(stack, "ttl@example.com")) == 2
    # The first checkout is still its own: its token reaches it, as it ended.
    assert (await order_of(stack, first))["status"] == "cancelled"


@pytest.mark.parametrize(
    "other",
    [
        cart(("REUSED", 3), email="reused@example.com"),
        cart(("REUSED", 2), ("REUSED-B", 1), email="reused@example.com"),
        {**cart(("REUSED", 2), email="reused@example.com"), "metadata": {"channel": "app"}},
        {"customer": {"email": "reused@example.com"}, "items": [{"sku": "REUSED", "quantity": 2}]},
    ],
    ids=["quantity", "another-line", "metadata", "no-metadata"],
)
async def test_the_same_key_with_another_body_is_refused_and_creates_nothing(
    stack: Stack, other: dict[str, Any]
) -> None:
    await put_product(stack, "REUSED", 10)
    await put_product(stack, "REUSED-B", 10)
    key = str(uuid.uuid4())
    body = cart(("REUSED", 2), email="reused@example.com")
    created = await opened(stack, body, key)

    status, refused = await post(stack, other, key)

    assert status == 422, refused
    assert refused["error"] == "idempotency_key_reused"
    assert await inventory(stack, "REUSED") == (10, 2, 8)
    assert await inventory(stack, "REUSED-B") == (10, 0, 10)
    assert len(await checkouts_of(stack, "reused@example.com")) == 1
    assert len(await intents_of(stack, created["checkout_id"])) == 1
    # The key still stands for its first body, also once its checkout has ended.
    status, replayed = await post(stack, body, key)
    assert (status, answer(replayed)) == (200, answer(created))
    assert (await cancel(stack, created)).status_code == 200
    status, refused = await post(stack, other, key)
    assert (status, refused["error"]) == (422, "idempotency_key_reused")
    assert await inventory(stack, "REUSED") == (10, 0, 10)
    assert await inventory(stack, "REUSED-B") == (10, 0, 10)
    assert len(await checkouts_of(stack, "reused@example.com")) == 1


async def test_a_checkout_refused_for_stock_frees_its_key(stack: Stack) -> None:
    await put_product(stack, "SCARCE", 1)
    key = str(uuid.uuid4())
    body = cart(("SCARCE", 2), email="scarce@example.com")

    status, refused = await post(stack, body, key)

    assert status == 409, refused
    assert refused["error"] == "insufficient_stock"
    assert refused["details"] == [{"sku": "SCARCE", "requested": 2, "available": 1}]
    assert await inventory(stack, "SCARCE") == (1, 0, 1)
    assert await checkouts_of(stack, "scarce@example.com") == []

    await put_product(stack, "SCARCE", 5)
    created = await opened(stack, body, key)

    assert created["status"] == "pending_payment"
    assert await inventory(stack, "SCARCE") == (5, 2, 3)
    assert len(await intents_of(stack, created["checkout_id"])) == 1
    status, replayed = await post(stack, body, key)
    assert (status, answer(replayed)) == (200, answer(created))
    state = await stack.api.get(f"/checkouts/{created['checkout_id']}", headers=as_owner(created))
    assert state.json()["status"] == "pending_payment"
