"""The reconciler against the real stack: checkouts whose workflow run was terminated for real
(as an operator would in the Temporal UI) get their stock and PaymentIntent settled; running
checkouts are never touched; a second run changes nothing more."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from temporalio.client import ScheduleActionStartWorkflow, ScheduleOverlapPolicy, WorkflowHandle

from core.schedules import ensure_reconciler_schedule
from core.workflow_ids import (
    RECONCILER_SCHEDULE_ID,
    checkout_workflow_id,
)
from tests.e2e.stack import Stack
from workflows.reconciler import ReconcilerWorkflow
from workflows.reconciler_models import ReconcilerInput, ReconcileSummary

pytestmark = pytest.mark.e2e

ADMIN = {"Authorization": "Bearer test-admin-token"}


async def put_product(stack: Stack, sku: str, on_hand: int, price: int = 1200) -> None:
    response = await stack.api.put(
        f"/admin/products/{sku}",
        json={"name": sku.title(), "unit_price": price, "currency": "usd", "on_hand": on_hand},
        headers=ADMIN,
    )
    assert response.status_code == 200, response.text


async def inventory(stack: Stack, sku: str) -> tuple[int, int, int]:
    body = (await stack.api.get(f"/inventory/{sku}", headers=ADMIN)).json()
    return body["on_hand"], body["reserved"], body["available"]


async def checkout(stack: Stack, sku: str, quantity: int, *, window: int = 2) -> dict[str, Any]:
    stack.services.checkouts.payment_timeout_seconds = window
    response = await stack.api.post(
        "/checkout",
        json={
            "customer": {"email": f"{uuid.uuid4().hex[:8]}@example.com"},
            "items": [{"sku": sku, "quantity": quantity}],
        },
        headers={**ADMIN, "Idempotency-Key": str(uuid.uuid4())},
    )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def order(stack: Stack, order_id: str) -> dict[str, Any]:
    response = await stack.api.get(f"/orders/{order_id}", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def wait_for_order(
    stack: Stack, order_id: str, status: str, timeout: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (found := await order(stack, order_id))["status"] != status:
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.2)
    return found


def workflow(stack: Stack, created: dict[str, Any]) -> WorkflowHandle[Any, Any]:
    return stack.services.temporal.get_workflow_handle(checkout_workflow_id(created["checkout_id"]))


async def terminate(stack: Stack, created: dict[str, Any]) -> None:
    """What an operator's Terminate in the Temporal UI does: the run stops, nothing is undone."""
    await workflow(stack, created).terminate(reason="terminated by an operator in the UI")


async def window_ended(*created: dict[str, Any]) -> None:
    ends = max(datetime.fromisoformat(c["expires_at"]) for c in created)
    remaining = (ends - datetime.now(ends.tzinfo)).total_seconds()
    await asyncio.sleep(max(remaining, 0) + 0.3)


async def reconcile(stack: Stack) -> ReconcileSummary:
    """One run of the reconciler, as the schedule starts it, on the stack's worker."""
    return await stack.services.temporal.execute_workflow(
        ReconcilerWorkflow.run,
        ReconcilerInput(),
        id=f"checkout-reconciler-test-{uuid.uuid4()}",
        task_queue=stack.settings.temporal_task_queue,
    )


async def snapshot(stack: Stack, sku: str, *created: dict[str, Any]) -> Any:
    """Everything a second run could change: stock, orders with their timelines, intents."""
    orders = [await order(stack, c["order_id"]) for c in created]
    intents = [await stack.stripe.intent(c["payment"]["payment_intent_id"]) for c in created]
    return await inventory(stack, sku), orders, [i["status"] for i in intents]


async def test_terminated_checkouts_expire_and_release_their_stock_a_live_one_is_untouched(
    stack: Stack,
) -> None:
    await put_product(stack, "MUG", 10)
    first = await checkout(stack, "MUG", 3)
    second = await checkout(stack, "MUG", 2)
    running = await checkout(stack, "MUG", 1, window=900)
    await terminate(stack, first)
    await terminate(stack, second)
    assert await inventory(stack, "MUG") == (10, 6, 4)
    await window_ended(first, second)
    # Nobody settles them: their runs are gone.
    assert await inventory(stack, "MUG") == (10, 6, 4)

    summary = await reconcile(stack)

    assert summary == ReconcileSummary(found=2, expired=2)
    assert await inventory(stack, "MUG") == (10, 1, 9)
    for created in (first, second):
        expired = await order(stack, created["order_id"])
        assert expired["status"] == "expired"
        assert [e["type"] for e in expired["events"]][-3:] == [
            "stock_released",
            "expired",
            "reconciled",
        ]
        assert expired["events"][-1]["data"] == {
            "reason": "workflow terminated",
            "workflow_status": "TERMINATED",
            "outcome": "expired",
            "payment_intent_status": "canceled",
        }
        intent = await stack.stripe.intent(created["payment"]["payment_intent_id"])
        assert intent["status"] == "canceled"
    # The checkout whose saga still runs (its window has not ended) is untouched.
    live = await order(stack, running["order_id"])
    assert live["status"] == "pending_payment"
    assert "reconciled" not in [e["type"] for e in live["events"]]
    live_intent = await stack.stripe.intent(running["payment"]["payment_intent_id"])
    assert live_intent["status"] == "requires_payment_method"

    before = await snapshot(stack, "MUG", first, second, running)
    assert await reconcile(stack) == ReconcileSummary()
    assert await snapshot(stack, "MUG", first, second, running) == before

    # The live checkout still works end to end.
    cancel = await stack.api.post(f"/orders/{running['order_id']}/cancel", headers=ADMIN)
    assert cancel.json() == {"order_id": running["order_id"], "status": "cancelled"}
    assert await inventory(stack, "MUG") == (10, 0, 10)


async def test_a_payment_made_after_the_run_was_terminated_is_paid_at_once(stack: Stack) -> None:
    await put_product(stack, "MUG", 10)
    created = await checkout(stack, "MUG", 2)
    intent_id = created["payment"]["payment_intent_id"]
    await terminate(stack, created)

    # The customer pays after the run is gone: the webhook finds no workflow to signal, and
    # settles the payment as the saga would, at once (not at the end of the window).
    assert (await stack.stripe.pay(intent_id)).json()["status"] == "succeeded"
    paid = await wait_for_order(stack, created["order_id"], "paid")

    assert paid["payment"]["status"] == "succeeded"
    types = [e["type"] for e in paid["events"]]
    assert types.count("paid") == 1
    assert types[-2:] == ["paid", "reconciled"]
    assert paid["events"][-1]["data"]["outcome"] == "paid"
    assert await inventory(stack, "MUG") == (8, 0, 8)
    intent = await stack.stripe.intent(intent_id)
    assert intent["status"] == "succeeded"
    refunds = await stack.stripe.http.get("/v1/refunds", params={"payment_intent": intent_id})
    assert refunds.json()["data"] == []
    # Nothing is left for the reconciler, and nothing happens twice.
    await window_ended(created)
    before = await snapshot(stack, "MUG", created)
    assert await reconcile(stack) == ReconcileSummary()
    assert await snapshot(stack, "MUG", created) == before


async def test_reconcilers_running_at_once_settle_each_checkout_once(stack: Stack) -> None:
    """The schedule never overlaps runs, but an operator may start one by hand meanwhile."""
    await put_product(stack, "MUG", 10)
    paying, leaving = await checkout(stack, "MUG", 3), await checkout(stack, "MUG", 2)
    await terminate(stack, paying)
    await terminate(stack, leaving)
    await stack.stripe.pay(paying["payment"]["payment_intent_id"])
    # Its run is gone, so the payment's webhook settles it at once (pay-{order_id}).
    await wait_for_order(stack, paying["order_id"], "paid")
    await window_ended(paying, leaving)

    summaries = await asyncio.gather(*(reconcile(stack) for _ in range(3)))

    assert all(s.failed == 0 for s in summaries)
    assert sum(s.paid for s in summaries) == 0
    assert sum(s.expired for s in summaries) >= 1
    assert await inventory(stack, "MUG") == (7, 0, 7)
    paid, expired = await order(stack, paying["order_id"]), await order(stack, leaving["order_id"])
    assert (paid["status"], expired["status"]) == ("paid", "expired")
    for settled in (paid, expired):
        types = [e["type"] for e in settled["events"]]
        assert types.count(settled["status"]) == types.count("reconciled") == 1


async def test_a_payment_refunded_before_the_reconciler_runs_never_makes_the_order_paid(
    stack: Stack,
) -> None:
    await put_product(stack, "MUG", 10)
    created = await checkout(stack, "MUG", 1)
    intent_id = created["payment"]["payment_intent_id"]
    await terminate(stack, created)
    await stack.stripe.pay(intent_id)
    # Refunded in full from the Stripe dashboard while the order is still pending.
    refund = await stack.stripe.http.post("/v1/refunds", data={"payment_intent": intent_id})
    assert refund.status_code == 200, refund.text
    await window_ended(created)

    summary = await reconcile(stack)

    assert summary == ReconcileSummary(found=1, expired=1)
    expired = await order(stack, created["order_id"])
    assert expired["status"] == "expired"
    assert "paid" not in [e["type"] for e in expired["events"]]
    assert expired["events"][-1]["type"] == "reconciled"
    assert await inventory(stack, "MUG") == (10, 0, 10)


async def test_a_checkout_past_its_window_whose_workflow_runs_is_left_to_its_saga(
    stack: Stack,
) -> None:
    """As while the saga waits out Stripe's `processing` past the window: simulated by moving
    the reservation's window into the past under a workflow that is still running."""
    await put_product(stack, "MUG", 10)
    created = await checkout(stack, "MUG", 4, window=900)
    async with stack.services.sessions.begin() as session:
        await session.execute(
            text(
                "UPDATE reservations SET expires_at = now() - interval '1 minute'"
                " WHERE checkout_id = :c"
            ),
            {"c": created["checkout_id"]},
        )

    summary = await reconcile(stack)

    assert summary == ReconcileSummary(found=1, skipped=1)
    assert (await order(stack, created["order_id"]))["status"] == "pending_payment"
    assert await inventory(stack, "MUG") == (10, 4, 6)
    intent = await stack.stripe.intent(created["payment"]["payment_intent_id"])
    assert intent["status"] == "requires_payment_method"
    # Its saga is intact: the customer can still pay.
    await stack.stripe.pay(created["payment"]["payment_intent_id"])
    await wait_for_order(stack, created["order_id"], "paid")
    assert await inventory(stack, "MUG") == (6, 0, 6)


async def test_checkouts_whose_workflow_runs_never_hide_the_stale_ones_behind_them(
    stack: Stack,
) -> None:
    """More running checkouts past their window than a batch holds (stuck ones, say), older
    than a terminated one: the reconciler pages past them and settles the terminated one."""
    await put_product(stack, "MUG", 20)
    running = [await checkout(stack, "MUG", 1, window=900) for _ in range(3)]
    async with stack.services.sessions.begin() as session:
        await session.execute(
            text(
                "UPDATE reservations SET expires_at = now() - interval '1 hour'"
                " WHERE checkout_id = ANY(CAST(:c AS uuid[]))"
            ),
            {"c": [c["checkout_id"] for c in running]},
        )
    lost = await checkout(stack, "MUG", 2)
    await terminate(stack, lost)
    await window_ended(lost)

    summary = await stack.services.temporal.execute_workflow(
        ReconcilerWorkflow.run,
        ReconcilerInput(batch_size=2),
        id=f"checkout-reconciler-test-{uuid.uuid4()}",
        task_queue=stack.settings.temporal_task_queue,
    )

    assert (summary.expired, summary.skipped) == (1, 3)
    await wait_for_order(stack, lost["order_id"], "expired")
    assert await inventory(stack, "MUG") == (20, 3, 17)
    for created in running:
        assert (await order(stack, created["order_id"]))["status"] == "pending_payment"
        await stack.api.post(f"/orders/{created['order_id']}/cancel", headers=ADMIN)


async def test_the_schedule_exists_with_the_configured_interval_and_reconciles(
    stack: Stack,
) -> None:
    client = stack.services.temporal
    handle = client.get_schedule_handle(RECONCILER_SCHEDULE_ID)
    settings = stack.settings
    try:
        # Several workers starting at once: one creates it, the others find it.
        await asyncio.gather(*(ensure_reconciler_schedule(client, settings) for _ in range(3)))

        described = await handle.describe()
        schedule = described.schedule
        assert [i.every for i in schedule.spec.intervals] == [
            timedelta(seconds=settings.reconcile_interval)
        ]
        assert settings.reconcile_interval == 5  # what tests/e2e/stack.py configures
        assert schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
        action = schedule.action
        assert isinstance(action, ScheduleActionStartWorkflow)
        assert action.workflow == "ReconcilerWorkflow"
        assert action.task_queue == settings.temporal_task_queue

        # The schedule's own run settles a terminated checkout.
        await put_product(stack, "MUG", 5)
        created = await checkout(stack, "MUG", 5)
        await terminate(stack, created)
        await window_ended(created)
        await handle.trigger()
        await wait_for_order(stack, created["order_id"], "expired")
        assert await inventory(stack, "MUG") == (5, 0, 5)
        runs = [a.action for a in (await handle.describe()).info.recent_actions]
        assert runs
        assert all(
            getattr(r, "workflow_id", "").startswith("checkout-reconciler-run") for r in runs
        )

        # Another interval in the settings: the next worker to start updates the schedule,
        # keeping what an operator set (paused, with a note).
        await handle.pause(note="paused by an operator")
        await ensure_reconciler_schedule(
            client, settings.model_copy(update={"reconcile_interval": 5})
        )
        updated = (await handle.describe()).schedule
        assert [i.every for i in updated.spec.intervals] == [timedelta(seconds=5)]
        assert updated.policy.overlap == ScheduleOverlapPolicy.SKIP
        assert updated.state.paused
        assert updated.state.note == "paused by an operator"
    finally:
        await handle.delete()
