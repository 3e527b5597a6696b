"""The reconciler: settles checkouts whose own workflow will never settle them.

    find pending checkouts past their payment window whose workflow is not running
    for each (a few at a time): settle it as the saga would have (pay or expire)
    delete Idempotency-Keys whose time is up
    return how many were found, paid, expired, skipped and failed

Started by the `checkout-reconciler` schedule every RECONCILE_INTERVAL seconds (one run at a
time). Deterministic, orchestration only: every read and write is an activity.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.reconcile import (
        FindStaleCheckoutsInput,
        ReconcileActivities,
        SettledCheckout,
        SettleStaleCheckoutInput,
        StaleCheckout,
    )
    from core.vocabulary import ReconcileOutcome
    from workflows.reconciler_models import ReconcilerInput, ReconcileSummary

# Bounded retries: a run ends in bounded time, and whatever it could not do now is still
# there for the next run (the schedule skips a start while a run is going).
RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=4,
)
# Checkouts settled at once: each is a few Stripe calls and database transactions.
PARALLEL = 10


@workflow.defn
class ReconcilerWorkflow:
    @workflow.run
    async def run(self, input: ReconcilerInput) -> ReconcileSummary:
        workflow.set_current_details("Looking for checkouts whose workflow is gone")
        found = await workflow.execute_activity_method(
            ReconcileActivities.find_stale_checkouts,
            FindStaleCheckoutsInput(limit=input.batch_size),
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=RETRY,
            summary=f"find up to {input.batch_size} pending checkouts past their payment "
            "window whose workflow is not running",
        )
        summary = ReconcileSummary(
            found=len(found.checkouts) + found.running, skipped=found.running
        )
        for start in range(0, len(found.checkouts), PARALLEL):
            batch = found.checkouts[start : start + PARALLEL]
            workflow.set_current_details(
                f"Settling checkouts {start + 1}-{start + len(batch)} of {len(found.checkouts)}"
            )
            for outcome in await asyncio.gather(*(self._settle(c) for c in batch)):
                if outcome == ReconcileOutcome.PAID:
                    summary.paid += 1
                elif outcome == ReconcileOutcome.EXPIRED:
                    summary.expired += 1
                elif outcome == ReconcileOutcome.SKIPPED:
                    summary.skipped += 1
                else:
                    summary.failed += 1
        summary.keys_forgotten = await workflow.execute_activity_method(
            ReconcileActivities.forget_expired_keys,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RETRY,
            summary="delete Idempotency-Keys past IDEMPOTENCY_KEY_TTL",
        )
        _count(summary, running=found.running)
        workflow.set_current_details(
            f"Found {summary.found}: {summary.paid} paid, {summary.expired} expired, "
            f"{summary.skipped} skipped, {summary.failed} failed; "
            f"{summary.keys_forgotten} expired Idempotency-Keys deleted"
        )
        return summary

    async def _settle(self, checkout: StaleCheckout) -> ReconcileOutcome | None:
        """One checkout; None if it could not be settled now (it stays for the next run)."""
        try:
            settled = await workflow.execute_activity_method(
                ReconcileActivities.settle_stale_checkout,
                SettleStaleCheckoutInput(checkout=checkout),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RETRY,
                summary=f"settle checkout {checkout.checkout_id} (order {checkout.order_id}, "
                f"workflow {checkout.workflow_status}): pay it if Stripe says the payment "
                "succeeded, else cancel the PaymentIntent and expire the order",
            )
        except ActivityError as err:
            workflow.logger.warning(
                "could not settle checkout %s (order %s): %s",
                checkout.checkout_id,
                checkout.order_id,
                err.cause or err,
            )
            return None
        return settled.outcome


def _count(summary: ReconcileSummary, *, running: int) -> None:
    """On the worker's metrics endpoint (the workflow's meter records nothing on replay):
    `checkout_reconciled_total{outcome}` (paid, expired, skipped, failed) and
    `checkout_reconciler_running_past_window`, checkouts past their payment window whose
    workflow still runs (waiting out Stripe's `processing`, or stuck: an operator looks)."""
    meter = workflow.metric_meter()
    settled = meter.create_counter(
        "checkout_reconciled", "Checkouts past their payment window the reconciler settled"
    )
    for outcome, count in (
        ("paid", summary.paid),
        ("expired", summary.expired),
        ("skipped", summary.skipped - running),
        ("failed", summary.failed),
    ):
        if count:
            settled.add(count, {"outcome": outcome})
    meter.create_gauge(
        "checkout_reconciler_running_past_window",
        "Checkouts past their payment window whose workflow still runs (last reconciler run)",
    ).set(running)


@workflow.defn
class SettleLostCheckoutWorkflow:
    """A pending order whose checkout's run is gone (terminated, or its history deleted),
    settled at once as its saga would have, instead of at the end of its window:

    - `cancel-{order_id}`, its customer cancels it: the payment wins if Stripe says it
      succeeded; else the PaymentIntent is cancelled, the stock released, the order cancelled;
    - `pay-{order_id}`, Stripe says it was paid: the order is paid (nothing else is touched).

    Someone waits for the answer, so retries are bounded."""

    @workflow.run
    async def run(self, input: SettleStaleCheckoutInput) -> SettledCheckout:
        checkout = input.checkout
        return await workflow.execute_activity_method(
            ReconcileActivities.settle_stale_checkout,
            input,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RETRY,
            summary=(
                f"cancel order {checkout.order_id}: its checkout's run is gone; the payment "
                "wins if Stripe says it succeeded"
                if input.close_as is not None
                else f"pay order {checkout.order_id} if Stripe says it succeeded: its "
                "checkout's run is gone"
            ),
        )
