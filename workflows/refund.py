"""Refunds, each one durable workflow: an operator's refund of a paid order, and the automatic
refund of a payment that arrived after its checkout had closed."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.refunds import (
        LatePaymentInput,
        LatePaymentResult,
        RefundOrderInput,
        RefundOrderResult,
    )

# Money owed back is retried until Stripe takes it.
UNTIL_DONE = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=0,
)


@workflow.defn
class RefundWorkflow:
    """`refund-{order_id}`: refund the payment in full, return the stock, mark it refunded."""

    @workflow.run
    async def run(self, input: RefundOrderInput) -> RefundOrderResult:
        workflow.set_current_details(f"Refunding order {input.order_id} ({input.reason})")
        result: RefundOrderResult = await workflow.execute_activity(
            "refund_order",
            input,
            result_type=RefundOrderResult,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=UNTIL_DONE,
            summary=f"refund order {input.order_id} through Stripe and return its stock",
        )
        workflow.set_current_details(f"Order {input.order_id} is {result.status}")
        return result


@workflow.defn
class LatePaymentWorkflow:
    """`late-payment-{payment_intent_id}`: a success that lost the race with the checkout's
    end (cancel or expiry) is refunded, since its stock was released."""

    @workflow.run
    async def run(self, input: LatePaymentInput) -> LatePaymentResult:
        result: LatePaymentResult = await workflow.execute_activity(
            "refund_late_payment",
            input,
            result_type=LatePaymentResult,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=UNTIL_DONE,
            summary=f"refund {input.payment_intent_id}: it succeeded after the checkout closed",
        )
        workflow.set_current_details(f"Late payment {input.payment_intent_id}: {result.outcome}")
        return result
