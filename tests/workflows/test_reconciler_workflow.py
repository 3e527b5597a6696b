"""The reconciler workflow on the real Temporal dev server, with fake activities registered
under the real activity names: one checkout that cannot be settled never stops the others."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime

from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.converter import DataConverter
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.reconcile import (
    FindStaleCheckoutsInput,
    SettledCheckout,
    SettleStaleCheckoutInput,
    StaleCheckout,
    StaleCheckouts,
)
from core.vocabulary import ReconcileOutcome
from workflows.reconciler import ReconcilerWorkflow
from workflows.reconciler_models import ReconcilerInput, ReconcileSummary


def stale(workflow_status: str = "TERMINATED") -> StaleCheckout:
    checkout_id = uuid.uuid4()
    return StaleCheckout(
        checkout_id=checkout_id,
        order_id=uuid.uuid5(checkout_id, "order"),
        amount=1200,
        currency="usd",
        payment_intent_id=f"pi_{checkout_id.hex[:12]}",
        expires_at=datetime(2026, 12, 1, tzinfo=UTC),
        workflow_status=workflow_status,
    )


class FakeReconciler:
    """The two activities over a fixed list: each checkout settles to the outcome it is given,
    `flaky` ones fail their first attempt, `broken` ones fail every attempt."""

    def __init__(self, outcomes: list[ReconcileOutcome], running: int = 0) -> None:
        self.checkouts = [stale() for _ in outcomes]
        self.outcomes = {c.checkout_id: o for c, o in zip(self.checkouts, outcomes, strict=True)}
        self.running = running
        self.flaky: set[uuid.UUID] = set()
        self.broken: set[uuid.UUID] = set()
        self.attempts: Counter[uuid.UUID] = Counter()
        self.limit: int | None = None

    @activity.defn(name="find_stale_checkouts")
    async def find_stale_checkouts(self, input: FindStaleCheckoutsInput) -> StaleCheckouts:
        self.limit = input.limit
        return StaleCheckouts(checkouts=self.checkouts, running=self.running)

    @activity.defn(name="forget_expired_keys")
    async def forget_expired_keys(self) -> int:
        return 7

    @activity.defn(name="settle_stale_checkout")
    async def settle_stale_checkout(self, input: SettleStaleCheckoutInput) -> SettledCheckout:
        checkout_id = input.checkout.checkout_id
        self.attempts[checkout_id] += 1
        if checkout_id in self.broken:
            raise RuntimeError("Stripe is unreachable")
        if checkout_id in self.flaky and self.attempts[checkout_id] == 1:
            raise ApplicationError("database restarting")
        return SettledCheckout(outcome=self.outcomes[checkout_id], detail="fake")


async def run(
    env: WorkflowEnvironment, fake: FakeReconciler, task_queue: str
) -> tuple[ReconcileSummary, WorkflowHistory]:
    # The default, sandboxed runner: the workflow's determinism is checked here.
    async with Worker(
        env.client,
        task_queue=task_queue,
        workflows=[ReconcilerWorkflow],
        activities=[
            fake.find_stale_checkouts,
            fake.settle_stale_checkout,
            fake.forget_expired_keys,
        ],
    ):
        handle = await env.client.start_workflow(
            ReconcilerWorkflow.run,
            ReconcilerInput(batch_size=25),
            id=f"checkout-reconciler-test-{uuid.uuid4()}",
            task_queue=task_queue,
        )
        summary = await handle.result()
        return summary, await handle.fetch_history()


async def test_one_checkout_that_cannot_be_settled_does_not_stop_the_others(
    ts_env: WorkflowEnvironment, task_queue: str
) -> None:
    paid, expired, skipped = (
        ReconcileOutcome.PAID,
        ReconcileOutcome.EXPIRED,
        ReconcileOutcome.SKIPPED,
    )
    fake = FakeReconciler([expired, paid, expired, expired, skipped, paid], running=2)
    broken, flaky = fake.checkouts[0], fake.checkouts[1]
    fake.broken.add(broken.checkout_id)
    fake.flaky.add(flaky.checkout_id)

    summary, _ = await run(ts_env, fake, task_queue)

    assert summary == ReconcileSummary(
        found=8, paid=2, expired=2, skipped=3, failed=1, keys_forgotten=7
    )
    assert fake.limit == 25
    # Every checkout was tried; the broken one as often as the retry policy allows, the flaky
    # one until it went through.
    assert set(fake.attempts) == {c.checkout_id for c in fake.checkouts}
    assert fake.attempts[broken.checkout_id] == 4
    assert fake.attempts[flaky.checkout_id] == 2


async def test_more_checkouts_than_run_at_once_are_all_settled(
    ts_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = FakeReconciler([ReconcileOutcome.EXPIRED] * 23)

    summary, _ = await run(ts_env, fake, task_queue)

    assert summary == ReconcileSummary(found=23, expired=23, keys_forgotten=7)
    assert all(count == 1 for count in fake.attempts.values())


async def test_nothing_to_do(ts_env: WorkflowEnvironment, task_queue: str) -> None:
    fake = FakeReconciler([], running=3)

    summary, history = await run(ts_env, fake, task_queue)

    assert summary == ReconcileSummary(found=3, skipped=3, keys_forgotten=7)
    assert not fake.attempts
    # Finding and the key sweep, nothing settled.
    assert len(activity_summaries(history)) == 2


async def test_an_operator_reads_each_step_in_the_web_ui(
    ts_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = FakeReconciler([ReconcileOutcome.PAID])
    (checkout,) = fake.checkouts

    _, history = await run(ts_env, fake, task_queue)

    find, settle, sweep = activity_summaries(history)
    assert find.startswith("find up to 25 pending checkouts past their payment window")
    assert settle.startswith(f"settle checkout {checkout.checkout_id} (order {checkout.order_id}")
    assert "TERMINATED" in settle
    assert sweep == "delete Idempotency-Keys past IDEMPOTENCY_KEY_TTL"


def activity_summaries(history: WorkflowHistory) -> list[str]:
    converter = DataConverter.default.payload_converter
    return [
        str(converter.from_payload(event.user_metadata.summary, str))
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
