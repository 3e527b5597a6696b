"""Refund activities: give money back through Stripe (once per idempotency key) and record it."""

from __future__ import annotations

import uuid

from pydantic import BaseModel
from temporalio import activity

from core.orders import PAID, PENDING, REFUNDED, OrderStore
from core.stripe_gateway import StripeGateway
from core.vocabulary import IntentStatus, LatePaymentOutcome


class RefundOrderInput(BaseModel):
    order_id: uuid.UUID
    reason: str


class RefundOrderResult(BaseModel):
    status: str
    refund_id: str | None = None
    amount: int = 0


class LatePaymentInput(BaseModel):
    order_id: uuid.UUID
    payment_intent_id: str


class LatePaymentResult(BaseModel):
    # refunded: the money went back; kept: the order is paid after all, or still pending (the
    # reconciler pays it); none: nothing was paid
    outcome: str
    refund_id: str | None = None


class RefundActivities:
    def __init__(self, gateway: StripeGateway, orders: OrderStore) -> None:
        self._stripe = gateway
        self._orders = orders

    @activity.defn(name="refund_order")
    async def refund_order(self, input: RefundOrderInput) -> RefundOrderResult:
        """Refund a paid order in full, return its stock and mark it refunded; idempotent."""
        view = await self._orders.get(input.order_id)
        if view.order.status not in (PAID, REFUNDED) or view.payment is None:
            return RefundOrderResult(status=view.order.status)
        refund = await self._stripe.refund(
            view.payment.payment_intent_id,
            idempotency_key=f"{input.order_id}:refund",
            metadata={"order_id": str(input.order_id), "reason": input.reason},
        )
        status = await self._orders.mark_refunded(
            input.order_id, refunded_amount=refund.amount, source=input.reason, reference=refund.id
        )
        return RefundOrderResult(status=status, refund_id=refund.id, amount=refund.amount)

    @activity.defn(name="refund_late_payment")
    async def refund_late_payment(self, input: LatePaymentInput) -> LatePaymentResult:
        """A payment that succeeded after its checkout closed: the stock is gone, so the money
        goes back. Stripe's state decides; a paid order keeps its payment."""
        status = await self._orders.status(input.order_id)
        # A pending order's checkout never closed (its run was terminated or lost): the payment
        # is not late, and the reconciler pays the order once its window ends.
        if status in (PAID, REFUNDED, PENDING):
            return LatePaymentResult(outcome=LatePaymentOutcome.KEPT)
        intent = await self._stripe.retrieve_intent(input.payment_intent_id)
        if intent.status != IntentStatus.SUCCEEDED:
            return LatePaymentResult(outcome=LatePaymentOutcome.NONE)
        refund = await self._stripe.refund(
            intent.id,
            idempotency_key=f"{intent.id}:late-refund",
            metadata={"order_id": str(input.order_id), "reason": "late_payment"},
        )
        await self._orders.record_late_refund(
            input.order_id, intent_id=intent.id, amount=refund.amount, refund_id=refund.id
        )
        return LatePaymentResult(outcome=LatePaymentOutcome.REFUNDED, refund_id=refund.id)
