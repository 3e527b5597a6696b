"""Stripe activities. Every call that creates or changes something carries an idempotency key
derived from the checkout id and the step, so Temporal's retries never double anything."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import stripe
from pydantic import BaseModel
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.refusals import refused_at_once
from core.metrics import WorkerMetrics
from core.orders import OrderStore
from core.sealing import Sealer
from core.stripe_gateway import Intent, StripeGateway
from core.vocabulary import IntentStatus, SettleOutcome, TimelineEvent


class PaymentIntentInput(BaseModel):
    checkout_id: uuid.UUID
    order_id: uuid.UUID
    amount: int
    currency: str
    # Known once created; without it, cancel finds the intent through its creation key.
    payment_intent_id: str | None = None


class IntentOut(BaseModel):
    payment_intent_id: str
    status: str
    amount: int
    currency: str
    # The client_secret only ever leaves an activity sealed (core.sealing): an activity's
    # result is kept in the workflow's history, which the Temporal UI shows to operators.
    # Only the creation returns it; the API unseals it for the client.
    client_secret_sealed: str | None = None
    # In clear: only in results recorded before sealing (histories of earlier runs).
    client_secret: str | None = None
    last_error: str | None = None

    @classmethod
    def of(cls, intent: Intent, *, client_secret_sealed: str | None = None) -> IntentOut:
        return cls(
            payment_intent_id=intent.id,
            status=intent.status,
            amount=intent.amount,
            currency=intent.currency,
            client_secret_sealed=client_secret_sealed,
            last_error=intent.last_error,
        )


class SettleInput(BaseModel):
    checkout_id: uuid.UUID
    order_id: uuid.UUID
    payment_intent_id: str
    amount: int
    currency: str
    # When the payment_intent.succeeded webhook reached the API (payment-to-paid latency).
    payment_received_at: datetime | None = None


class SettleResult(BaseModel):
    # paid: the order is paid now (or was already); unpaid: Stripe does not say succeeded;
    # mismatch: Stripe's amount or currency is not the order's; otherwise the order's status.
    outcome: str
    intent: IntentOut


def create_key(checkout_id: uuid.UUID) -> str:
    return f"{checkout_id}:create-intent"


def cancel_key(checkout_id: uuid.UUID) -> str:
    return f"{checkout_id}:cancel-intent"


def _non_retryable(exc: stripe.StripeError) -> ApplicationError | None:
    """Stripe's 4xx answers other than rate limits will not change on retry."""
    status = exc.http_status or 0
    if 400 <= status < 500 and status not in (409, 429):
        return ApplicationError(str(exc), type=f"stripe_{status}", non_retryable=True)
    return None


class PaymentActivities:
    def __init__(
        self,
        gateway: StripeGateway,
        orders: OrderStore,
        sealer: Sealer,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._stripe = gateway
        self._orders = orders
        self._sealer = sealer
        self._metrics = metrics

    async def _create(self, input: PaymentIntentInput) -> Intent:
        return await self._stripe.create_intent(
            amount=input.amount,
            currency=input.currency,
            metadata={"checkout_id": str(input.checkout_id), "order_id": str(input.order_id)},
            idempotency_key=create_key(input.checkout_id),
        )

    @activity.defn(name="create_payment_intent")
    async def create_payment_intent(self, input: PaymentIntentInput) -> IntentOut:
        """Create the order's PaymentIntent (once: the key derives from the checkout id)."""
        try:
            intent = await self._create(input)
        except stripe.StripeError as exc:
            final = _non_retryable(exc)
            if final is not None:
                raise final from exc
            raise
        sealed = self._sealer.seal(intent.client_secret) if intent.client_secret else None
        with refused_at_once(input.checkout_id):
            await self._orders.attach_payment(
                input.order_id,
                intent_id=intent.id,
                status=intent.status,
                amount=intent.amount,
                currency=intent.currency,
                # Kept so a replay of the Idempotency-Key can answer without Stripe.
                client_secret_sealed=sealed,
            )
        return IntentOut.of(intent, client_secret_sealed=sealed)

    @activity.defn(name="cancel_payment_intent")
    async def cancel_payment_intent(self, input: PaymentIntentInput) -> IntentOut:
        """Cancel the checkout's PaymentIntent, unless the payment already went through.

        Finds the intent by replaying its creation under the same idempotency key: if the
        creation reached Stripe before a failure, this returns that intent, so nothing is left
        pending; if it never did, the new intent is cancelled at once.
        """
        intent_id = input.payment_intent_id or (await self._create(input)).id
        result = await self._stripe.cancel_intent(
            intent_id, idempotency_key=cancel_key(input.checkout_id)
        )
        return IntentOut.of(result)

    @activity.defn(name="settle_payment")
    async def settle_payment(self, input: SettleInput) -> SettleResult:
        """Mark the order paid if, and only if, Stripe says its PaymentIntent succeeded for the
        order's amount and currency. Stripe's state decides, not a webhook's body."""
        intent = IntentOut.of(await self._stripe.retrieve_intent(input.payment_intent_id))
        if intent.status != IntentStatus.SUCCEEDED:
            return SettleResult(outcome=SettleOutcome.UNPAID, intent=intent)
        if (intent.amount, intent.currency) != (input.amount, input.currency):
            # Money taken that is not the order's price: give it back, never mark paid.
            refund = await self._stripe.refund(
                intent.payment_intent_id,
                idempotency_key=f"{intent.payment_intent_id}:mismatch-refund",
                metadata={"order_id": str(input.order_id), "reason": "payment_mismatch"},
            )
            await self._orders.record_event(
                input.order_id,
                TimelineEvent.PAYMENT_MISMATCH_REFUNDED,
                {
                    "payment_intent_id": intent.payment_intent_id,
                    "amount": intent.amount,
                    "currency": intent.currency,
                    "expected_amount": input.amount,
                    "expected_currency": input.currency,
                    "refund_id": refund.id,
                },
                f"{input.order_id}:mismatch:{intent.payment_intent_id}",
            )
            return SettleResult(outcome=SettleOutcome.MISMATCH, intent=intent)
        status = await self._orders.mark_paid(
            input.checkout_id,
            input.order_id,
            intent_id=intent.payment_intent_id,
            intent_status=intent.status,
            amount=intent.amount,
            currency=intent.currency,
        )
        if status == SettleOutcome.PAID and input.payment_received_at and self._metrics:
            self._metrics.payment_to_paid(datetime.now(UTC) - input.payment_received_at)
        return SettleResult(outcome=status, intent=intent)
