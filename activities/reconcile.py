"""Reconciler activities: settle checkouts whose workflow will never settle them.

A checkout whose run was terminated, reset away, timed out or lost keeps its stock reserved
and its PaymentIntent open. These find such checkouts once their payment window has ended and
settle each exactly as the saga would have at the end of its window, through the same code:
Stripe's PaymentIntent decides; a payment that won is paid, anything else is cancelled and the
order expires with its stock released. A checkout whose workflow runs is never touched.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

from pydantic import BaseModel
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from activities.payments import PaymentActivities, PaymentIntentInput, SettleInput
from core.carts import CartStore
from core.checkout_keys import CheckoutKeyStore
from core.orders import OrderStore
from core.reconciliation import ExpiredCheckout, ReconciliationStore
from core.stripe_gateway import StripeGateway
from core.vocabulary import (
    IntentStatus,
    OrderStatus,
    ReconcileOutcome,
    SettleOutcome,
    TimelineEvent,
)
from core.workflow_ids import checkout_workflow_id

# Only these mean the checkout's saga will never run again. Anything else (running, or a
# status this code does not know) is left alone: the saga settles its own checkout, e.g. while
# it waits out Stripe's `processing`.
CLOSED = frozenset(
    {
        WorkflowExecutionStatus.COMPLETED,
        WorkflowExecutionStatus.FAILED,
        WorkflowExecutionStatus.CANCELED,
        WorkflowExecutionStatus.TERMINATED,
        WorkflowExecutionStatus.TIMED_OUT,
        WorkflowExecutionStatus.CONTINUED_AS_NEW,
    }
)
NOT_FOUND = "NOT_FOUND"
# Pages of `limit` checkouts looked at per run, at most (the rest wait for the next run).
MAX_PAGES = 10
# Our copy of the payment's status when its money went back (as `record_late_refund` writes).
PAYMENT_REFUNDED = "refunded"


class FindStaleCheckoutsInput(BaseModel):
    limit: int = 100


class StaleCheckout(BaseModel):
    checkout_id: uuid.UUID
    order_id: uuid.UUID
    amount: int
    currency: str
    # None: the PaymentIntent's creation never answered (it is found by its creation key).
    payment_intent_id: str | None = None
    expires_at: datetime
    # The status of the checkout's latest run (`TERMINATED`, `TIMED_OUT` ...) or `NOT_FOUND`.
    workflow_status: str


class StaleCheckouts(BaseModel):
    checkouts: list[StaleCheckout]
    # Checkouts past their window whose workflow still runs: left to their saga.
    running: int = 0


class SettleStaleCheckoutInput(BaseModel):
    checkout: StaleCheckout
    # `cancelled` when its customer cancels it (POST /orders/{id}/cancel) with its run gone;
    # None: pay it if Stripe says it succeeded, and otherwise leave it as it is (a payment
    # webhook for a checkout whose run is gone).
    close_as: OrderStatus | None = OrderStatus.EXPIRED


class SettledCheckout(BaseModel):
    outcome: ReconcileOutcome
    detail: str
    payment_intent_status: str | None = None


def _why(workflow_status: str) -> str:
    """`TERMINATED` -> "workflow terminated", `NOT_FOUND` -> "workflow not found"."""
    return "workflow " + workflow_status.lower().replace("_", " ")


class ReconcileActivities:
    def __init__(
        self,
        store: ReconciliationStore,
        keys: CheckoutKeyStore,
        orders: OrderStore,
        payments: PaymentActivities,
        gateway: StripeGateway,
        temporal: Client,
        carts: CartStore | None = None,
    ) -> None:
        self._carts = carts
        self._store = store
        self._keys = keys
        self._orders = orders
        self._payments = payments
        self._stripe = gateway
        self._temporal = temporal

    @activity.defn(name="find_stale_checkouts")
    async def find_stale_checkouts(self, input: FindStaleCheckoutsInput) -> StaleCheckouts:
        """Pending checkouts past their payment window whose workflow no longer runs, up to
        `limit`. Pages past the ones whose workflow still runs (a stuck one, say), so that
        however many there are they never hide the stale ones behind them."""
        stale: list[StaleCheckout] = []
        running = 0
        after: ExpiredCheckout | None = None
        for _ in range(MAX_PAGES):
            expired = await self._store.expired_pending(input.limit, after=after)
            statuses = await asyncio.gather(*(self._closed_status(e.checkout_id) for e in expired))
            for checkout, status in zip(expired, statuses, strict=True):
                if status is None:
                    running += 1
                elif len(stale) < input.limit:
                    stale.append(_stale(checkout, status))
            if len(expired) < input.limit or len(stale) >= input.limit:
                break
            after = expired[-1]
            activity.heartbeat(len(stale))
        if running:
            # Past their window and still running: waiting out Stripe's `processing`, or stuck
            # (a workflow task failing on a bug). The saga owns them; an operator should look.
            activity.logger.warning(
                "reconciler: %d checkout(s) past their payment window still have a running "
                "workflow",
                running,
            )
        return StaleCheckouts(checkouts=stale, running=running)

    @activity.defn(name="forget_expired_keys")
    async def forget_expired_keys(self) -> int:
        """Delete Idempotency-Keys past their TTL (a batch; an expired key is also claimed anew
        by its next request, so this only keeps the table small); and close the guest carts
        past CART_TTL as `expired` (they are 404 from the moment they lapse; this makes it
        final)."""
        if self._carts is not None:
            expired = await self._carts.expire()
            if expired:
                activity.logger.info("reconciler: %d guest cart(s) expired", expired)
        return await self._keys.delete_expired()

    @activity.defn(name="settle_stale_checkout")
    async def settle_stale_checkout(self, input: SettleStaleCheckoutInput) -> SettledCheckout:
        """Settle one checkout as its saga would at the end of its window; idempotent."""
        checkout = input.checkout
        # Asked again: a reset since the checkout was found gives it a running saga again.
        workflow_status = await self._closed_status(checkout.checkout_id)
        if workflow_status is None:
            return self._done(checkout, ReconcileOutcome.SKIPPED, "its workflow is running")
        checkout = checkout.model_copy(update={"workflow_status": workflow_status})
        if await self._orders.status(checkout.order_id) != OrderStatus.PENDING_PAYMENT:
            return self._done(checkout, ReconcileOutcome.SKIPPED, "the order was settled meanwhile")

        if input.close_as is None:
            return await self._pay_only(checkout)
        # Reads the PaymentIntent first and never cancels one whose payment won; without an id,
        # finds the intent by replaying its creation key, so none is left payable.
        intent = await self._payments.cancel_payment_intent(
            PaymentIntentInput(
                checkout_id=checkout.checkout_id,
                order_id=checkout.order_id,
                amount=checkout.amount,
                currency=checkout.currency,
                payment_intent_id=checkout.payment_intent_id,
            )
        )
        status = intent.status
        if status in (IntentStatus.PROCESSING, IntentStatus.REQUIRES_CAPTURE):
            # The customer's money is on its way: neither pay nor expire yet.
            return self._done(
                checkout,
                ReconcileOutcome.SKIPPED,
                f"the payment is {status}; left for later",
                status,
            )
        payment_status: str | None = (
            IntentStatus.CANCELED if status == IntentStatus.CANCELED else None
        )
        if status == IntentStatus.SUCCEEDED:
            settled = await self._pay(checkout, intent.payment_intent_id)
            if settled == OrderStatus.PAID:
                return await self._reconciled(checkout, ReconcileOutcome.PAID, status)
            if settled not in (SettleOutcome.MISMATCH, SettleOutcome.UNPAID):
                return self._done(
                    checkout, ReconcileOutcome.SKIPPED, f"the order became {settled} meanwhile"
                )
            # The money went back (refunded as a mismatch, or refunded already): expire.
            payment_status = PAYMENT_REFUNDED

        close_as = input.close_as
        cancelling = close_as == OrderStatus.CANCELLED
        outcome = ReconcileOutcome.CANCELLED if cancelling else ReconcileOutcome.EXPIRED
        closed = await self._orders.close(
            checkout.checkout_id,
            checkout.order_id,
            status=close_as,
            reason=(
                f"cancel requested; {_why(checkout.workflow_status)}"
                if cancelling
                else f"payment window ended; {_why(checkout.workflow_status)}"
            ),
            intent_status=payment_status,
            # In the closing transaction, so a settled order always says who settled it.
            timeline=((TimelineEvent.RECONCILED, _entry(checkout, outcome, status)),),
        )
        if closed != close_as:
            return self._done(
                checkout, ReconcileOutcome.SKIPPED, f"the order became {closed} meanwhile"
            )
        # Its `reconciled` entry was written by the closing transaction.
        return self._done(checkout, outcome, _why(checkout.workflow_status), status)

    async def _pay_only(self, checkout: StaleCheckout) -> SettledCheckout:
        """Pay the order if its PaymentIntent succeeded (as the saga does on that news)."""
        if checkout.payment_intent_id is None:
            return self._done(checkout, ReconcileOutcome.SKIPPED, "no PaymentIntent recorded")
        settled = await self._pay(checkout, checkout.payment_intent_id)
        if settled == OrderStatus.PAID:
            return await self._reconciled(checkout, ReconcileOutcome.PAID, IntentStatus.SUCCEEDED)
        return self._done(checkout, ReconcileOutcome.SKIPPED, f"not paid: {settled}")

    async def _pay(self, checkout: StaleCheckout, intent_id: str) -> str:
        """The saga's own `settle_payment` (Stripe's amount and currency must be the order's),
        unless the money has already gone back: a refunded payment never makes an order paid."""
        current = await self._stripe.retrieve_intent(intent_id)
        if current.amount_refunded >= current.amount:
            return SettleOutcome.UNPAID
        settled = await self._payments.settle_payment(
            SettleInput(
                checkout_id=checkout.checkout_id,
                order_id=checkout.order_id,
                payment_intent_id=intent_id,
                amount=checkout.amount,
                currency=checkout.currency,
            )
        )
        return settled.outcome

    async def _reconciled(
        self, checkout: StaleCheckout, outcome: ReconcileOutcome, intent_status: str
    ) -> SettledCheckout:
        """Say on the order's timeline, once, that the reconciler paid it and why."""
        await self._orders.record_event(
            checkout.order_id,
            TimelineEvent.RECONCILED,
            _entry(checkout, outcome, intent_status),
            # The same key as the entry `close` writes: an expired order has it once.
            f"{checkout.order_id}:{TimelineEvent.RECONCILED}",
        )
        return self._done(checkout, outcome, _why(checkout.workflow_status), intent_status)

    @staticmethod
    def _done(
        checkout: StaleCheckout,
        outcome: ReconcileOutcome,
        detail: str,
        intent_status: str | None = None,
    ) -> SettledCheckout:
        activity.logger.info(
            "reconciler: checkout %s (order %s) %s: %s (payment intent %s)",
            checkout.checkout_id,
            checkout.order_id,
            outcome,
            detail,
            intent_status or "not read",
        )
        return SettledCheckout(outcome=outcome, detail=detail, payment_intent_status=intent_status)

    async def _closed_status(self, checkout_id: uuid.UUID) -> str | None:
        """How the checkout's latest run ended (`NOT_FOUND` if it is gone); None if it has not."""
        handle = self._temporal.get_workflow_handle(checkout_workflow_id(checkout_id))
        try:
            description = await handle.describe()
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            return NOT_FOUND
        status = description.status
        return status.name if status is not None and status in CLOSED else None


def _entry(
    checkout: StaleCheckout, outcome: ReconcileOutcome, intent_status: str
) -> dict[str, str]:
    return {
        "reason": _why(checkout.workflow_status),
        "workflow_status": checkout.workflow_status,
        "outcome": outcome,
        "payment_intent_status": intent_status,
    }


def _stale(checkout: ExpiredCheckout, workflow_status: str) -> StaleCheckout:
    return StaleCheckout(
        checkout_id=checkout.checkout_id,
        order_id=checkout.order_id,
        amount=checkout.amount,
        currency=checkout.currency,
        payment_intent_id=checkout.payment_intent_id,
        expires_at=checkout.expires_at,
        workflow_status=workflow_status,
    )
