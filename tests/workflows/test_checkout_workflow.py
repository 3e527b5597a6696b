"""The checkout saga on the real Temporal dev server with time skipping and fake activities."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from temporalio.client import (
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from core.errors import ErrorCode
from core.workflow_ids import checkout_workflow_id, start_update_id
from tests.workflows.conftest import save_history
from tests.workflows.fakes import FakeWorld
from workflows.checkout import CHECKOUT_STATUS, ORDER_ID, CheckoutWorkflow, start_search_attributes
from workflows.models import (
    CartItem,
    CheckoutInput,
    CheckoutState,
    Customer,
    PaymentEvent,
    StartResult,
)

SUCCEEDED = "payment_intent.succeeded"
FAILED = "payment_intent.payment_failed"
CANCELED = "payment_intent.canceled"


@dataclass
class Checkout:
    handle: WorkflowHandle[CheckoutWorkflow, CheckoutState]
    start: StartResult
    input: CheckoutInput

    @property
    def intent_id(self) -> str:
        assert self.start.created is not None
        return self.start.created.payment.payment_intent_id

    async def event(
        self, type: str, event_id: str | None = None, message: str | None = None
    ) -> None:
        await self.handle.signal(
            CheckoutWorkflow.payment_event,
            PaymentEvent(
                event_id=event_id or f"evt_{uuid.uuid4().hex[:10]}",
                type=type,
                payment_intent_id=self.intent_id,
                status="",
                amount=0,
                currency="usd",
                message=message,
            ),
        )


@pytest.fixture
def world() -> FakeWorld:
    return FakeWorld()


@pytest.fixture
async def worker(
    ts_env: WorkflowEnvironment, world: FakeWorld, task_queue: str
) -> AsyncIterator[Worker]:
    async with Worker(
        ts_env.client,
        task_queue=task_queue,
        workflows=[CheckoutWorkflow],
        activities=world.activities(),
    ) as running:
        yield running


def checkout_input(
    items: list[tuple[str, int]] | None = None, fingerprint: str = "body-1"
) -> CheckoutInput:
    checkout_id = uuid.uuid4()
    return CheckoutInput(
        checkout_id=checkout_id,
        order_id=uuid.uuid5(checkout_id, "order"),
        customer=Customer(email="ada@example.com"),
        items=[CartItem(sku=s, quantity=q) for s, q in (items or [("mug", 2), ("tee", 1)])],
        payment_timeout_seconds=900,
        request_fingerprint=fingerprint,
    )


async def open_checkout(
    env: WorkflowEnvironment,
    task_queue: str,
    input: CheckoutInput | None = None,
    *,
    skip_time: bool = False,
    fingerprint: str | None = None,
    update_id: str | None = None,
) -> Checkout:
    """Start the workflow as POST /checkout does: Update-with-Start, answered early."""
    input = input or checkout_input()
    operation = WithStartWorkflowOperation(
        CheckoutWorkflow.run,
        input,
        id=checkout_workflow_id(input.checkout_id),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        search_attributes=start_search_attributes(input),
    )
    client = env.client
    # One `start` update per checkout, as the API sends it.
    update_id = update_id or start_update_id(input.checkout_id)
    if skip_time:
        start = await client.execute_update_with_start_workflow(
            CheckoutWorkflow.start,
            fingerprint or input.request_fingerprint,
            start_workflow_operation=operation,
            id=update_id,
        )
    else:
        with env.with_time_skipping_disabled():
            start = await client.execute_update_with_start_workflow(
                CheckoutWorkflow.start,
                fingerprint or input.request_fingerprint,
                start_workflow_operation=operation,
                id=update_id,
            )
    # Typed by hand: mypy's inference of `get_workflow_handle_for(CheckoutWorkflow.run, ...)`
    # depends on the order in which it reads temporalio's modules (it failed once a benchmark
    # module importing the client and worker was added).
    handle: WorkflowHandle[CheckoutWorkflow, CheckoutState] = client.get_workflow_handle(
        checkout_workflow_id(input.checkout_id), result_type=CheckoutState
    )
    return Checkout(handle, start, input)


async def wait_for_timer_fired(handle: WorkflowHandle[Any, Any], timeout: float = 30) -> None:
    """Until the run's history records a TimerFired event."""
    async with asyncio.timeout(timeout):
        while True:
            history = await handle.fetch_history()
            if any(e.HasField("timer_fired_event_attributes") for e in history.events):
                return
            await asyncio.sleep(0.05)


async def test_paid_checkout_commits_stock_and_marks_the_order_paid(
    ts_env: WorkflowEnvironment, worker: Worker, world: FakeWorld, task_queue: str
) -> None:
    checkout = await open_checkout(ts_env, task_queue)
    created = checkout.start.created
    assert created is not None
    assert created.totals.total == 2 * 1200 + 2500
    # Sealed as the activity returned it: the answer is kept in the workflow's history.
    assert created.payment.client_secret_sealed == f"{checkout.intent_id}_sealed"
    assert created.payment.client_secret is None
    assert created.expires_at - created.expires_at.replace(microsecond=0) < timedelta(seconds=1)
    assert world.reserved == {"mug": 2, "tee": 1}

    world.pay(checkout.intent_id)
    await checkout.event(SUCCEEDED)
    state = await checkout.handle.result()

    assert state.status == "paid"
    assert world.orders[checkout.input.order_id] == "paid"
    assert world.on_hand == {"mug": 8, "tee": 9}
    assert +world.reserved == {}
    assert world.intents[checkout.intent_id]["status"] == "succeeded"
    assert world.calls["cancel_payment_intent"] == 0
    description = await checkout.handle.describe()
    assert description.typed_search_attributes.get(CHECKOUT_STATUS) == "paid"
    assert description.typed_search_attributes.get(ORDER_ID) == str(checkout.input.order_id)
    await save_history(checkout.handle, "paid")


async def test_payment_window_expiry_compensates(
    ts_env: WorkflowEnvironment, worker: Worker, world: FakeWorld, task_queue: str
) -> None:
    checkout = await open_checkout(ts_env, task_queue, skip_time=True)

    state = await checkout.handle.result()

    assert state.status == "expired"
    assert world.intents[checkout.intent_id]["status"] == "canceled"
    assert world.orders[checkout.input.order_id] == "expired"
    assert +world.reserved == {}
    assert world.on_hand == {"mug": 10, "tee": 10}
    # The re-read before compensating: a lost webhook must not throw a payment away.
    assert world.calls["settle_payment"] == 1
    await save_history(checkout.handle, "expired")


async def test_cancel_update_answers_after_compensation(
    ts_env: WorkflowEnvironment, worker: Worker, world: FakeWorld, task_queue: str
) -> None:
    checkout = await open_checkout(ts_env, task_queue)

    result = await checkout.handle.execute_update(CheckoutWorkflow.cancel)

    # By the time the update answers, everything is undone.
    assert result.status == "cancelled"
    assert world.intents[checkout.intent_id]["status"] == "canceled"
    assert world.orders[checkout.input.order_id] == "cancelled"
    assert +world.reserved == {}
    assert (await checkout.handle.result()).status == "cancelled"
    # Cancelling again after the end is the API's business (the order is final); a second
    # update while it runs would get the same answer.
    await save_history(checkout.handle, "cancelled")


async def test_a_declined_attempt_is_recorded_and_a_retry_can_still_pay(
    ts_env: WorkflowEnvironment, worker: Worker, world: FakeWorld, task_queue: str
) -> None:
    checkout = await open_checkout(ts_env, task_queue)

    await checkout.event(FAILED, "evt_declined", "Your card was declined.")
    state = await checkout.handle.query(CheckoutWorkflow.state)
    assert state.status == "pending_payment"
    world.pay(checkout.intent_id)
    await checkout.event(SUCCEEDED, "evt_paid")
    state = await checkout.handle.result()

    assert state.status == "paid"
    assert [(a.event_id, a.outcome) for a in state.payment_attempts] == [
        ("evt_declined", "failed"),
        ("evt_paid", "succeeded"),
    ]
    assert [t for t, _ in world.timeline] == ["payment_failed"]
    assert world.on_hand == {"mug": 8, "tee": 9}
    await save_history(checkout.handle, "declined_then_paid")


async def test_payment_intent_canceled_event_compensates(
    ts_env: WorkflowEnvironment, worker: Worker, world: FakeWorld, task_queue: str
) -> None:
    checkout = await open_checkout(ts_env, task_queue)
    world.intents[checkout.intent_id]["status"] = "canceled"

    await checkout.event(CANCELED)
    state = await checkout.handle.result()

    assert state.status == "cancelled"
    assert world.orders[checkout.input.order_id] == "cancelled"
    assert +world.reserved == {}


async def test_duplicated_signals_have_one_effect(
    ts_env: WorkflowEnvironment, worker: Worker, world: FakeWorld, task_queue: str
) -> None:
    checkout = await open_checkout(ts_env, task_queue)

    for _ in range(3):
        await checkout.event(FAILED, "evt_same_decline", "declined")
    world.pay(checkout.intent_id)
    for _ in range(3):
        await checkout.event(SUCCEEDED, "evt_same_success")
    state = await checkout.handle.result()

    assert state.status == "paid"
    assert len(state.payment_attempts) == 2
    # One timeline entry and one commit, however often the activities ran (at least once).
    assert [t for t, _ in world.timeline] == ["payment_failed"]
    assert world.reservations[checkout.input.checkout_id][0] == "committed"
    assert world.on_hand == {"mug": 8, "tee": 9}


async def test_success_arriving_as_the_timer_fires_wins(
    ts_env: WorkflowEnvironment, world: FakeWorld, task_queue: str
) -> None:
    async with Worker(
        ts_env.client,
        task_queue=task_queue,
        workflows=[CheckoutWorkflow],
        activities=world.activities(),
        # Nothing stays cached in a worker that stops while the checkout waits.
        max_cached_workflows=0,
    ):
        checkout = await open_checkout(ts_env, task_queue)
    # No worker now: the success and the end of the window reach the workflow together.
    # fast_forward fires the timer at once, then waits for a worker to see it; the success
    # lands in the same pending workflow task.
    skipping = asyncio.create_task(ts_env.fast_forward(checkout.handle, timedelta(minutes=16)))
    await wait_for_timer_fired(checkout.handle)
    world.pay(checkout.intent_id)
    await checkout.event(SUCCEEDED)
    async with Worker(
        ts_env.client,
        task_queue=task_queue,
        workflows=[CheckoutWorkflow],
        activities=world.activities(),
    ):
        state = await checkout.handle.result()
        await asyncio.wait_for(skipping, 30)
    history = await checkout.handle.fetch_history()
    fired = [e for e in history.events if e.HasField("timer_fired_event_attributes")]
    assert fired, "the payment window's timer should have fired"

    assert state.status == "paid"
    assert world.calls["cancel_payment_intent"] == 0
    assert world.on_hand == {"mug": 8, "tee": 9}


async def test_success_whose_webhook_was_lost_is_found_by_the_re_read(
    ts_env: WorkflowEnvironment, worker: Worker, world: FakeWorld, task_queue: str
) -> None:
    checkout = await open_checkout(ts_env, task_queue)
    world.pay(checkout.intent_id)  # paid at Stripe; the webhook never arrives

    await ts_env.fast_forward(checkout.handle, timedelta(minutes=16))
    state = await checkout.handle.result()

    assert state.status == "paid"
    assert world.calls["cancel_payment_intent"] == 0
    assert world.orders[checkout.input.order_id] == "paid"
    await save_history(checkout.handle, "lost_webhook_paid")


async def test_cancel_loses_to_a_payment_that_already_succeeded(
    ts_env: WorkflowEnvironment, worker: Worker, world: FakeWorld, task_queue: str
) -> None:
    checkout = await open_checkout(ts_env, task_queue)
    world.pay(checkout.intent_id)  # the customer confirmed; the webhook is still on its way

    result = await checkout.handle.execute_update(CheckoutWorkflow.cancel)

    assert result.status == "paid"
    assert world.orders[checkout.input.order_id] == "paid"
    assert world.intents[checkout.intent_id]["status"] == "succeeded"


async def test_insufficient_stock_refuses_without_side_effects(
    ts_env: WorkflowEnvironment, worker: Worker, world: FakeWorld, task_queue: str
) -> None:
    checkout = await open_checkout(ts_env, task_queue, checkout_input([("mug", 11)]))

    failure = checkout.start.failure
    assert checkout.start.created is None
    assert failure is not None
    assert failure.code == ErrorCode.INSUFFICIENT_STOCK
    assert failure.details == [{"sku": "mug", "requested": 11, "available": 10}]
    assert (await checkout.handle.result()).status == "rejected"
    assert world.orders == {}
    assert world.intents == {}
    assert +world.reserved == {}
    await save_history(checkout.handle, "rejected")


async def test_stripe_failure_refuses_and_leaves_nothing_reserved_or_pending(
    ts_env: WorkflowEnvironment, worker: Worker, world: FakeWorld, task_queue: str
) -> None:
    world.stripe_down = True
    checkout = await open_checkout(ts_env, task_queue)

    assert checkout.start.failure is not None
    assert checkout.start.failure.code == ErrorCode.UNAVAILABLE
    state = await checkout.handle.result()
    assert state.status == "rejected"
    assert +world.reserved == {}
    assert world.orders[checkout.input.order_id] == "cancelled"
    # The intent whose creation may have reached Stripe is found by its key and cancelled.
    assert all(i["status"] == "canceled" for i in world.intents.values())


async def test_the_same_request_rejoins_and_another_body_is_refused(
    ts_env: WorkflowEnvironment, worker: Worker, world: FakeWorld, task_queue: str
) -> None:
    first = await open_checkout(ts_env, task_queue)
    again = await open_checkout(ts_env, task_queue, first.input)

    assert again.start.created == first.start.created
    # The duplicate attached to the checkout's one `start` update: nothing new in its history.
    history = await first.handle.fetch_history()
    accepted = [
        e
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    ]
    assert len(accepted) == 1
    # Another body under another update id reaches the validator, which refuses it (the API
    # refuses it first, from the key's record).
    with pytest.raises(WorkflowUpdateFailedError) as raised:
        await open_checkout(
            ts_env, task_queue, first.input, fingerprint="another-body", update_id="another"
        )
    assert isinstance(raised.value.cause, ApplicationError)
    assert raised.value.cause.type == ErrorCode.IDEMPOTENCY_KEY_REUSED
    assert world.calls["open_order"] == 1
    assert world.calls["create_payment_intent"] == 1
    await first.handle.execute_update(CheckoutWorkflow.cancel)


async def test_cancelling_the_workflow_itself_still_compensates(
    ts_env: WorkflowEnvironment, worker: Worker, world: FakeWorld, task_queue: str
) -> None:
    checkout = await open_checkout(ts_env, task_queue)

    await checkout.handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await checkout.handle.result()

    assert (await checkout.handle.describe()).status == WorkflowExecutionStatus.CANCELED
    assert world.intents[checkout.intent_id]["status"] == "canceled"
    assert world.orders[checkout.input.order_id] == "cancelled"
    assert +world.reserved == {}


async def test_a_payment_of_the_wrong_amount_is_refunded_and_never_marked_paid(
    ts_env: WorkflowEnvironment, worker: Worker, world: FakeWorld, task_queue: str
) -> None:
    checkout = await open_checkout(ts_env, task_queue)
    world.intents[checkout.intent_id]["amount"] = 1  # Stripe says it took 1 cent
    world.pay(checkout.intent_id)

    await checkout.event(SUCCEEDED)
    state = await checkout.handle.result()

    assert state.status == "cancelled"
    assert world.orders[checkout.input.order_id] == "cancelled"
    assert world.intents[checkout.intent_id]["refunded"] == 1
    assert +world.reserved == {}
    assert world.on_hand == {"mug": 10, "tee": 10}


def promoted() -> CheckoutInput:
    return checkout_input().model_copy(update={"promotion_code": "SAVE10"})


async def _expire(checkout: Checkout, world: FakeWorld) -> None:
    await checkout.handle.result()


async def _cancel(checkout: Checkout, world: FakeWorld) -> None:
    await checkout.handle.execute_update(CheckoutWorkflow.cancel)


async def _intent_canceled(checkout: Checkout, world: FakeWorld) -> None:
    world.intents[checkout.intent_id]["status"] = "canceled"
    await checkout.event(CANCELED)


async def _workflow_cancelled(checkout: Checkout, world: FakeWorld) -> None:
    await checkout.handle.cancel()


async def _wrong_amount(checkout: Checkout, world: FakeWorld) -> None:
    world.intents[checkout.intent_id]["amount"] += 1
    world.pay(checkout.intent_id)
    await checkout.event(SUCCEEDED)


@pytest.mark.parametrize(
    "end",
    [_expire, _cancel, _intent_canceled, _workflow_cancelled, _wrong_amount],
    ids=["expired", "cancelled", "intent_canceled", "workflow_cancelled", "wrong_amount"],
)
async def test_every_unpaid_end_releases_the_promotion_use(
    ts_env: WorkflowEnvironment, worker: Worker, world: FakeWorld, task_queue: str, end: Any
) -> None:
    checkout = await open_checkout(ts_env, task_queue, promoted(), skip_time=end is _expire)
    created = checkout.start.created
    assert created is not None
    # 4900 - 10 %: the discounted total is what the PaymentIntent asks for.
    assert (created.totals.discount, created.totals.total) == (490, 4410)
    assert world.intents[checkout.intent_id]["amount"] == 4410
    assert world.promotion_uses == {checkout.input.checkout_id: "active"}

    await end(checkout, world)
    with contextlib.suppress(WorkflowFailureError):
        await checkout.handle.result()

    assert world.promotion_uses == {checkout.input.checkout_id: "released"}
    assert +world.reserved == {}
    assert world.orders[checkout.input.order_id] in ("cancelled", "expired")


async def test_a_refused_checkout_and_a_failed_step_keep_no_promotion_use(
    ts_env: WorkflowEnvironment, worker: Worker, world: FakeWorld, task_queue: str
) -> None:
    world.stripe_down = True
    checkout = await open_checkout(ts_env, task_queue, promoted())
    assert checkout.start.failure is not None
    assert (await checkout.handle.result()).status == "rejected"
    assert world.promotion_uses == {checkout.input.checkout_id: "released"}


async def test_payment_commits_the_promotion_use(
    ts_env: WorkflowEnvironment, worker: Worker, world: FakeWorld, task_queue: str
) -> None:
    checkout = await open_checkout(ts_env, task_queue, promoted())
    world.pay(checkout.intent_id)
    await checkout.event(SUCCEEDED)
    assert (await checkout.handle.result()).status == "paid"
    assert world.promotion_uses == {checkout.input.checkout_id: "committed"}
    await save_history(checkout.handle, "promoted_paid")
