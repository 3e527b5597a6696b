"""The worker is killed (SIGKILL) at each stage of the saga and restarted: every checkout still
ends correctly, with one reservation, one order and one PaymentIntent, and exact stock."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import text

from core.db import SessionFactory
from core.invariants import check
from core.settings import Settings
from core.workflow_ids import checkout_workflow_id
from tests.conftest import PROJECT_ROOT
from tests.e2e.stack import Stack, running_stack, stack_settings
from tests.e2e.test_checkout_http import ADMIN, cancel, cart, checkout, inventory, put_product

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def bare_stack(settings: Settings, temporal_address: str) -> AsyncIterator[Stack]:
    """API and stand-in; the workers are processes that the tests start and kill."""
    own = stack_settings(settings, "crash", temporal_address)
    async with running_stack(own, in_process_worker=False) as stack:
        yield stack


@pytest.fixture
async def stack(bare_stack: Stack, db: SessionFactory) -> AsyncIterator[Stack]:
    yield bare_stack
    assert await check(bare_stack.services.sessions, bare_stack.services.stripe) == []


@contextmanager
def worker_process(
    stack: Stack, kill_after: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    settings = stack.settings
    env = {
        **os.environ,
        "ENVIRONMENT": "development",
        "DATABASE_URL": settings.database_url,
        "TEMPORAL_ADDRESS": settings.temporal_address,
        "TEMPORAL_TASK_QUEUE": settings.temporal_task_queue,
        "STRIPE_SECRET_KEY": settings.stripe_secret_key.get_secret_value(),
        "STRIPE_WEBHOOK_SECRET": settings.stripe_webhook_secret.get_secret_value(),
        "STRIPE_API_BASE": settings.stripe_api_base or "",
        "KILL_AFTER": kill_after or "",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.crashing_worker"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    for _ in range(int(timeout * 10)):
        if proc.poll() is not None:
            return proc.returncode
        await asyncio.sleep(0.1)
    raise AssertionError("the worker was not killed")


async def counts(stack: Stack, checkout_id: str) -> tuple[int, int, int]:
    async with stack.services.sessions() as session:
        reservations = await session.scalar(
            text("SELECT count(DISTINCT checkout_id) FROM reservations WHERE checkout_id = :c"),
            {"c": checkout_id},
        )
        orders = await session.scalar(
            text("SELECT count(*) FROM orders WHERE checkout_id = :c"), {"c": checkout_id}
        )
    intents = [
        i for i in await stack.stripe.intents() if i["metadata"].get("checkout_id") == checkout_id
    ]
    return int(reservations or 0), int(orders or 0), len(intents)


@pytest.mark.parametrize("stage", ["open_order", "create_payment_intent"])
async def test_killed_while_opening_the_checkout(stack: Stack, stage: str) -> None:
    await put_product(stack, "MUG", 10)
    key = f"crash-{uuid.uuid4()}"
    with worker_process(stack, kill_after=stage) as doomed:
        answer = asyncio.create_task(
            stack.api.post("/checkout", json=cart(("MUG", 2)), headers={"Idempotency-Key": key})
        )
        assert await wait_exit(doomed) == -9
    with worker_process(stack):
        response = await answer
        assert response.status_code == 201, response.text
        created = response.json()
        assert await counts(stack, created["checkout_id"]) == (1, 1, 1)
        assert await inventory(stack, "MUG") == (10, 2, 8)
        await stack.stripe.pay(created["payment"]["payment_intent_id"])
        await stack.wait_for_order(created["order_id"], "paid", timeout=40)
    assert await inventory(stack, "MUG") == (8, 0, 8)
    assert await counts(stack, created["checkout_id"]) == (1, 1, 1)


async def test_killed_while_waiting_for_payment(stack: Stack) -> None:
    await put_product(stack, "MUG", 10)
    with worker_process(stack) as first:
        created = await checkout(stack, cart(("MUG", 3)))
        first.kill()
        first.wait(10)
    # Paid while no worker runs: the webhook's signal waits in Temporal.
    await stack.stripe.pay(created["payment"]["payment_intent_id"])
    with worker_process(stack):
        await stack.wait_for_order(created["order_id"], "paid", timeout=40)
    assert await inventory(stack, "MUG") == (7, 0, 7)
    assert await counts(stack, created["checkout_id"]) == (1, 1, 1)


@pytest.mark.parametrize("stage", ["cancel_payment_intent", "close_order", "settle_payment"])
async def test_killed_while_finishing(stack: Stack, stage: str) -> None:
    await put_product(stack, "MUG", 10)
    with worker_process(stack, kill_after=stage) as doomed:
        created = await checkout(stack, cart(("MUG", 1)))
        if stage == "settle_payment":
            await stack.stripe.pay(created["payment"]["payment_intent_id"])
        else:
            finishing = asyncio.create_task(cancel(stack, created))
        assert await wait_exit(doomed) == -9
    with worker_process(stack):
        if stage == "settle_payment":
            await stack.wait_for_order(created["order_id"], "paid", timeout=40)
            expected = (9, 0, 9)
        else:
            response = await finishing
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "cancelled"
            expected = (10, 0, 10)
            intent = await stack.stripe.intent(created["payment"]["payment_intent_id"])
            assert intent["status"] == "canceled"
    assert await inventory(stack, "MUG") == expected
    assert await counts(stack, created["checkout_id"]) == (1, 1, 1)


async def test_a_run_terminated_before_it_answered_frees_its_key(stack: Stack) -> None:
    """The worker dies right after opening the order and an operator terminates the run before
    any PaymentIntent exists: nobody ever got an answer, so a retry of the key opens a new
    checkout instead of answering 503 until the key's TTL (and the reconciler settles the
    first order once its window ends)."""
    await put_product(stack, "MUG", 10)
    key = f"terminated-{uuid.uuid4()}"
    body = cart(("MUG", 2), email=f"{key}@example.com")
    with worker_process(stack, kill_after="open_order") as doomed:
        first = asyncio.create_task(
            stack.api.post("/checkout", json=body, headers={"Idempotency-Key": key})
        )
        assert await wait_exit(doomed) == -9
    async with stack.services.sessions() as session:
        order_id, checkout_id = (
            await session.execute(
                text("SELECT id, checkout_id FROM orders WHERE customer_email = :e"),
                {"e": f"{key}@example.com"},
            )
        ).one()
    await stack.services.temporal.get_workflow_handle(checkout_workflow_id(checkout_id)).terminate(
        reason="operator: stuck checkout"
    )
    assert (await first).status_code == 503

    with worker_process(stack):
        retried = await stack.api.post("/checkout", json=body, headers={"Idempotency-Key": key})

        assert retried.status_code == 201, retried.text
        again = retried.json()
        assert again["checkout_id"] != str(checkout_id)
        assert await counts(stack, again["checkout_id"]) == (1, 1, 1)
        # The retry's answer is now the key's: replays return it.
        replay = await stack.api.post("/checkout", json=body, headers={"Idempotency-Key": key})
        assert replay.status_code == 200
        assert replay.json()["checkout_id"] == again["checkout_id"]
        assert (await cancel(stack, again)).status_code == 200
        # The first order holds its 2 units until the reconciler settles it after its window,
        # or until it is cancelled: its run is gone, so the reconciler's own step cancels it.
        assert await inventory(stack, "MUG") == (10, 2, 8)
        cancelled = await stack.api.post(f"/orders/{order_id}/cancel", headers=ADMIN)
        assert cancelled.json() == {"order_id": str(order_id), "status": "cancelled"}
    assert await inventory(stack, "MUG") == (10, 0, 10)
