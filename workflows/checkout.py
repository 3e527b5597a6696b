"""The checkout saga: one durable workflow per checkout, id `checkout-{checkout_id}`.

    open the order: price the cart, reserve
      its stock and create the order, in one
      transaction (all or nothing) ............ undo: close the order (releases its stock)
    create the PaymentIntent .................. undo: cancel it (unless the payment won)
    -- answer POST /checkout (the `start` update) --
    wait: payment event | cancel | payment window
    paid: commit stock + order paid.  otherwise: undo, newest first.

Deterministic: time from `workflow.now()`, no I/O; every side effect is an activity.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import (
    RetryPolicy,
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
)
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from activities.orders import (
        CloseOrderInput,
        OpenOrderInput,
        OrderActivities,
        OrderEventInput,
        PricedCartOut,
    )
    from activities.payments import (
        IntentOut,
        PaymentActivities,
        PaymentIntentInput,
        SettleInput,
        SettleResult,
    )
    from activities.refunds import LatePaymentInput, RefundActivities
    from core.errors import CART_REFUSALS, ErrorCode
    from core.vocabulary import (
        CHECKOUT_FINAL,
        CheckoutStatus,
        IntentStatus,
        PaymentOutcome,
        SettleOutcome,
        StripeEvent,
        TimelineEvent,
    )
    from workflows.models import (
        CancelResult,
        CheckoutCreated,
        CheckoutFailure,
        CheckoutInput,
        CheckoutState,
        PaymentAttempt,
        PaymentEvent,
        PaymentOut,
        StartResult,
    )

_T = TypeVar("_T")
_A = TypeVar("_A")

CHECKOUT_STATUS = SearchAttributeKey.for_keyword("CheckoutStatus")
# On the worker's metrics endpoint as `checkout_completed_total{outcome}` (core/metrics.py).
CHECKOUTS_COMPLETED = "checkout_completed"
ORDER_ID = SearchAttributeKey.for_keyword("OrderId")
CUSTOMER_EMAIL = SearchAttributeKey.for_keyword("CustomerEmail")


def start_search_attributes(input: CheckoutInput) -> TypedSearchAttributes:
    """Set when the checkout starts, so operators find it by order id and email at once."""
    return TypedSearchAttributes(
        [
            SearchAttributePair(CHECKOUT_STATUS, CheckoutStatus.STARTED),
            SearchAttributePair(ORDER_ID, str(input.order_id)),
            SearchAttributePair(CUSTOMER_EMAIL, input.customer.email),
        ]
    )


PENDING = CheckoutStatus.PENDING_PAYMENT
PAID = CheckoutStatus.PAID
CANCELLED = CheckoutStatus.CANCELLED
EXPIRED = CheckoutStatus.EXPIRED
REJECTED = CheckoutStatus.REJECTED

CLOSE_ORDER = "close the order"
CANCEL_INTENT = "cancel the PaymentIntent"


class Compensations:
    """The saga's undo steps by name, run newest first. A step can be taken out (to run it
    later, or never: a PaymentIntent already cancelled by `_close`)."""

    def __init__(self) -> None:
        self._steps: dict[str, Callable[[], Awaitable[Any]]] = {}

    def add(self, name: str, undo: Callable[[], Awaitable[Any]]) -> None:
        self._steps[name] = undo

    def take(self, name: str) -> Compensations:
        """Remove the step `name` (if registered) and return it as a set of its own."""
        taken = Compensations()
        undo = self._steps.pop(name, None)
        if undo is not None:
            taken.add(name, undo)
        return taken

    def clear(self) -> None:
        self._steps.clear()

    async def run(self, before_each: Callable[[str], None]) -> None:
        """Run every step, newest first; each is retried until it succeeds (its activity's
        retry policy), so this returns once all are done."""
        while self._steps:
            name = next(reversed(self._steps))
            undo = self._steps.pop(name)
            before_each(name)
            await undo()


# What each PaymentIntent event says of the customer's attempt to pay.
_ATTEMPT_OUTCOMES: dict[str, PaymentOutcome] = {
    StripeEvent.PAYMENT_INTENT_SUCCEEDED: PaymentOutcome.SUCCEEDED,
    StripeEvent.PAYMENT_INTENT_PAYMENT_FAILED: PaymentOutcome.FAILED,
    StripeEvent.PAYMENT_INTENT_CANCELED: PaymentOutcome.CANCELED,
}

# While Stripe says `processing`, the payment may still succeed: wait this much longer.
PROCESSING_GRACE = timedelta(minutes=5)

# The synchronous part runs as local activities: no task-queue round trip per step, which
# roughly halves the latency of POST /checkout. Their retries are bounded so that the HTTP
# answer is too; the compensations after them are regular activities retried forever.
QUICK = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=2),
    # A dependency that refuses at once is retried for about 7 s; one that hangs (3-second
    # attempts for Stripe) is given up on after about 28 s, within the API's 30-s answer.
    maximum_attempts=7,
)
FOREVER = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=0,
)
STEP_DEADLINE = timedelta(seconds=25)


def _failure(err: FailureError) -> CheckoutFailure:
    """What to tell the client about a failed step. (A local activity's failure arrives as an
    ActivityError or, once its retries are over, as the activity's own error.)"""
    cause = err.cause if isinstance(err, ActivityError) else err
    if isinstance(cause, ApplicationError) and cause.type in CART_REFUSALS:
        details = cause.details[0] if cause.details else None
        return CheckoutFailure(code=cause.type, message=cause.message, details=details)
    return CheckoutFailure(
        code=ErrorCode.UNAVAILABLE,
        message=(
            "a service the checkout depends on did not answer in time; nothing was kept. Try again"
        ),
    )


@workflow.defn
class CheckoutWorkflow:
    @workflow.init
    def __init__(self, input: CheckoutInput) -> None:
        self._input = input
        self._status: str = CheckoutStatus.STARTED
        self._expires_at = workflow.now() + timedelta(seconds=input.payment_timeout_seconds)
        self._start: StartResult | None = None
        self._inbox: list[PaymentEvent] = []
        self._seen_events: set[str] = set()
        self._attempts: list[PaymentAttempt] = []
        self._cancel_requested = False
        self._cart: PricedCartOut | None = None
        self._intent: IntentOut | None = None
        self._undo = Compensations()
        self._closing_as: tuple[str, str] = (CANCELLED, "")
        self._late_success = False
        self._refunded = False
        self._ended = False

    # -- the saga ---------------------------------------------------------------------------

    @workflow.run
    async def run(self, input: CheckoutInput) -> CheckoutState:
        try:
            if await self._open():
                await self._settle()
        except (asyncio.CancelledError, FailureError):
            # Cancellation of the workflow, or a Temporal failure nothing else handled: undo
            # whatever was done. A plain bug in this code is not caught: it fails the workflow
            # task, which Temporal retries until a fixed worker runs it, instead of undoing a
            # sale. (Nor is GeneratorExit: a run the worker drops from its cache is being
            # garbage-collected, not ending, and no workflow call works then.)
            await self._compensate(CANCELLED, "checkout workflow failed or was cancelled")
            raise
        # Let the `start` and `cancel` updates deliver their answers before the run ends.
        await workflow.wait_condition(workflow.all_handlers_finished)
        # A success that arrived after the checkout closed (the customer's confirm lost the
        # race with the cancel or the timer): its stock is gone, so its money goes back.
        # Checked last, with no wait before returning: a signal that lands later finds the
        # workflow closed and is refunded by the webhook route instead.
        while self._status in (CANCELLED, EXPIRED) and self._late_success and not self._refunded:
            await self._refund_late_payment()
        return self.state()

    async def _open(self) -> bool:
        """Steps 1-4. True when the checkout is open for payment; False when refused."""
        input = self._input
        try:
            units = sum(item.quantity for item in input.items)
            self._set_status(
                CheckoutStatus.OPENING_ORDER,
                f"Pricing {len(input.items)} cart lines, reserving {units} units and creating "
                f"order {input.order_id}",
            )
            # Registered first: closing an order that was never opened releases nothing.
            self._undo.add(CLOSE_ORDER, self._close_order)
            cart = self._cart = await self._step(
                OrderActivities.open_order,
                OpenOrderInput(
                    checkout_id=input.checkout_id,
                    order_id=input.order_id,
                    customer=input.customer,
                    items=input.items,
                    metadata=input.metadata,
                    expires_at=self._expires_at,
                    max_pending=input.max_pending_checkouts,
                    address=input.address,
                    shipping_method=input.shipping_method,
                    promotion_code=input.promotion_code,
                    cart_id=input.cart_id,
                ),
                f"price the cart, reserve {units} units (all or none) and create order "
                f"{input.order_id}: one transaction",
            )

            self._set_status(
                CheckoutStatus.CREATING_PAYMENT, f"Creating a PaymentIntent for {self._money()}"
            )
            self._undo.add(CANCEL_INTENT, self._cancel_intent)
            self._intent = await self._step(
                PaymentActivities.create_payment_intent,
                self._intent_input(),
                f"create the Stripe PaymentIntent for {self._money()}",
                # Stripe answers in well under a second; a hanging attempt is cut short.
                attempt_timeout=timedelta(seconds=3),
            )
        except FailureError as err:
            return await self._refuse(_failure(err))

        self._start = StartResult(
            created=CheckoutCreated(
                checkout_id=input.checkout_id,
                order_id=input.order_id,
                status=PENDING,
                currency=cart.currency,
                items=cart.lines,
                totals=cart.totals(),
                payment=PaymentOut(
                    payment_intent_id=self._intent.payment_intent_id,
                    client_secret_sealed=self._intent.client_secret_sealed,
                    # Set only by a creation recorded before sealing (histories of earlier
                    # runs replay as they ran).
                    client_secret=self._intent.client_secret,
                    status=self._intent.status,
                ),
                expires_at=self._expires_at,
            )
        )
        self._set_status(PENDING, self._waiting_details())
        workflow.logger.info(
            "checkout open for payment of %s until %s",
            self._money(),
            self._expires_at.isoformat(),
            extra=self._log_ids(),
        )
        return True

    async def _step(
        self,
        activity: Callable[[Any, _A], Awaitable[_T]],
        arg: _A,
        summary: str,
        *,
        attempt_timeout: timedelta = timedelta(seconds=5),
    ) -> _T:
        """One synchronous step: a local activity with bounded retries (see QUICK)."""
        result: _T = await workflow.execute_local_activity_method(
            activity,
            arg,
            start_to_close_timeout=attempt_timeout,
            schedule_to_close_timeout=STEP_DEADLINE,
            retry_policy=QUICK,
            summary=summary,
        )
        return result

    async def _settle(self) -> None:
        """Steps 6-7: wait for the payment, a cancel or the end of the window; then finish."""
        while True:
            timed_out = False
            remaining = self._expires_at - workflow.now()
            try:
                await workflow.wait_condition(
                    lambda: bool(self._inbox) or self._cancel_requested,
                    timeout=max(remaining, timedelta(0)),
                    timeout_summary="payment window",
                )
            except TimeoutError:
                timed_out = True

            # Payment events first: a success that lands together with the timer still wins.
            while self._inbox:
                event = self._inbox.pop(0)
                if event.type == StripeEvent.PAYMENT_INTENT_SUCCEEDED:
                    outcome = await self._pay(event.received_at)
                    if outcome == PAID:
                        return
                    if outcome == SettleOutcome.MISMATCH and await self._close(
                        CANCELLED, "payment_mismatch"
                    ):
                        return
                if event.type == StripeEvent.PAYMENT_INTENT_PAYMENT_FAILED:
                    await self._record_failed_attempt(event)
                if event.type == StripeEvent.PAYMENT_INTENT_CANCELED and await self._close(
                    CANCELLED, "payment_intent_canceled"
                ):
                    return

            if self._cancel_requested and await self._close(CANCELLED, "cancel requested"):
                return
            if timed_out:
                # The webhook may have been lost: ask Stripe before throwing a payment away.
                if await self._pay() == PAID:
                    return
                if await self._close(EXPIRED, "payment window ended"):
                    return

    async def _pay(self, payment_received_at: datetime | None = None) -> str:
        """Commit the stock and mark the order paid if Stripe confirms the payment (status,
        amount and currency), in one step: the activity reads the PaymentIntent back.

        Returns `paid`; `unpaid` if Stripe does not say succeeded; `mismatch` if it took
        another amount or currency (the activity has refunded it: never marked paid)."""
        cart, intent = self._cart, self._intent
        assert cart is not None
        assert intent is not None
        self._set_status(
            CheckoutStatus.COMMITTING, "Checking the payment with Stripe; committing the stock"
        )
        result: SettleResult = await workflow.execute_local_activity_method(
            PaymentActivities.settle_payment,
            SettleInput(
                checkout_id=self._input.checkout_id,
                order_id=self._input.order_id,
                payment_intent_id=intent.payment_intent_id,
                amount=cart.amount,
                currency=cart.currency,
                payment_received_at=payment_received_at,
            ),
            start_to_close_timeout=timedelta(seconds=15),
            retry_policy=FOREVER,
            summary="verify the payment with Stripe, then commit the stock and mark the order paid",
        )
        if result.outcome != PAID:
            self._set_status(PENDING, self._waiting_details())
            return result.outcome
        self._undo.clear()  # the sale stands: nothing to undo any more
        self._set_status(PAID, f"Order {self._input.order_id} is paid")
        return PAID

    async def _close(self, status: str, reason: str) -> bool:
        """Compensate. False if Stripe says the payment won; then the checkout goes on."""
        self._set_status(
            CheckoutStatus.COMPENSATING, f"Compensating ({reason}): cancelling the PaymentIntent"
        )
        intent = await self._cancel_intent()
        # A payment that went through wins, unless it was for the wrong amount (then it has
        # been refunded and the checkout closes).
        if intent.status == IntentStatus.SUCCEEDED and await self._pay() == PAID:
            return True
        if intent.status in (IntentStatus.PROCESSING, IntentStatus.REQUIRES_CAPTURE):
            # The customer's money is on its way: the payment wins. Wait for its outcome.
            self._expires_at = max(self._expires_at, workflow.now() + PROCESSING_GRACE)
            self._cancel_requested = False
            self._set_status(PENDING, f"Payment is {intent.status}; waiting for Stripe")
            return False
        self._undo.take(CANCEL_INTENT)  # done just above
        await self._compensate(status, reason)
        return True

    async def _compensate(self, status: str, reason: str) -> None:
        """Run the registered compensations, newest first; each retried until it succeeds."""
        self._closing_as = (status, reason)
        await self._undo.run(
            lambda name: self._set_status(
                CheckoutStatus.COMPENSATING, f"Compensating ({reason}): {name}"
            )
        )
        if self._status not in CHECKOUT_FINAL:
            self._set_status(status, f"Checkout {status}: {reason}")

    async def _refuse(self, failure: CheckoutFailure) -> bool:
        """Undo and answer the client. The stock and the order are settled before the answer;
        a PaymentIntent that may exist is cancelled after it: its client_secret never left the
        service, so nobody can pay it, and Stripe being down must not hold the answer back."""
        cancel_intent = self._undo.take(CANCEL_INTENT)
        await self._compensate(REJECTED, failure.message)
        self._start = StartResult(failure=failure)
        self._set_status(REJECTED, f"Refused: {failure.code}: {failure.message}")
        self._undo = cancel_intent
        await self._compensate(REJECTED, failure.message)
        return False

    # -- compensations (regular activities, retried forever) --------------------------------

    async def _close_order(self) -> None:
        status, reason = self._closing_as
        await workflow.execute_activity_method(
            OrderActivities.close_order,
            CloseOrderInput(
                checkout_id=self._input.checkout_id,
                order_id=self._input.order_id,
                status=EXPIRED if status == EXPIRED else CANCELLED,
                reason=reason,
                payment_intent_status=IntentStatus.CANCELED if self._intent else None,
                # A refused checkout kept nothing: its Idempotency-Key is free again.
                release_key=status == REJECTED,
            ),
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=FOREVER,
            summary=f"release the stock and close order {self._input.order_id} as {status}",
        )

    async def _cancel_intent(self) -> IntentOut:
        intent: IntentOut = await workflow.execute_activity_method(
            PaymentActivities.cancel_payment_intent,
            self._intent_input(),
            start_to_close_timeout=timedelta(seconds=15),
            retry_policy=FOREVER,
            summary="cancel the PaymentIntent (unless the payment already succeeded)",
        )
        return intent

    # -- helpers ------------------------------------------------------------------------------

    async def _refund_late_payment(self) -> None:
        assert self._intent is not None
        self._set_status(self._status, "Refunding a payment that arrived after the checkout closed")
        await workflow.execute_activity_method(
            RefundActivities.refund_late_payment,
            LatePaymentInput(
                order_id=self._input.order_id, payment_intent_id=self._intent.payment_intent_id
            ),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=FOREVER,
            summary="refund the payment that succeeded after the checkout closed",
        )
        self._refunded = True

    async def _record_failed_attempt(self, event: PaymentEvent) -> None:
        await self._record(
            TimelineEvent.PAYMENT_FAILED,
            {"payment_intent_id": event.payment_intent_id, "message": event.message},
            f"{self._input.order_id}:event:{event.event_id}",
        )
        self._set_status(PENDING, self._waiting_details())

    async def _record(self, type: str, data: dict[str, Any], key: str) -> None:
        await workflow.execute_local_activity_method(
            OrderActivities.record_order_event,
            OrderEventInput(order_id=self._input.order_id, type=type, data=data, dedupe_key=key),
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=FOREVER,
            summary=f"add {type} to the order's timeline",
        )

    def _intent_input(self) -> PaymentIntentInput:
        assert self._cart is not None
        return PaymentIntentInput(
            checkout_id=self._input.checkout_id,
            order_id=self._input.order_id,
            amount=self._cart.amount,
            currency=self._cart.currency,
            payment_intent_id=self._intent.payment_intent_id if self._intent else None,
        )

    def _money(self) -> str:
        assert self._cart is not None
        return f"{self._cart.amount} {self._cart.currency.upper()} (minor units)"

    def _waiting_details(self) -> str:
        failed = sum(1 for a in self._attempts if a.outcome == PaymentOutcome.FAILED)
        retries = f"; {failed} declined attempt(s) so far" if failed else ""
        intent = self._intent.payment_intent_id if self._intent else "?"
        return (
            f"Waiting for payment of {self._money()} on {intent} until "
            f"{self._expires_at.isoformat()}{retries}"
        )

    def _set_status(self, status: str, details: str) -> None:
        """The query and the UI's current details follow every step; the CheckoutStatus search
        attribute (a visibility write each time) only the states operators filter on."""
        if status != self._status and (status == PENDING or status in CHECKOUT_FINAL):
            workflow.upsert_search_attributes([CHECKOUT_STATUS.value_set(status)])
            if status in CHECKOUT_FINAL and not self._ended:
                self._ended = True
                # Counted where the ending happens, once per checkout: the workflow's meter
                # records nothing while a worker replays the history.
                workflow.metric_meter().create_counter(
                    CHECKOUTS_COMPLETED, "Checkouts ended, by outcome"
                ).add(1, {"outcome": status})
                workflow.logger.info("checkout %s: %s", status, details, extra=self._log_ids())
        self._status = status
        workflow.set_current_details(details)

    def _log_ids(self) -> dict[str, str]:
        """For `workflow.logger`'s extra (its workflow id the SDK adds itself)."""
        return {"checkout_id": str(self._input.checkout_id), "order_id": str(self._input.order_id)}

    # -- the outside world: updates, signals, query -------------------------------------------

    @workflow.update
    async def start(self, request_fingerprint: str) -> StartResult:
        """Answers POST /checkout once the order and its PaymentIntent exist (or it failed)."""
        await workflow.wait_condition(lambda: self._start is not None)
        assert self._start is not None
        return self._start

    @start.validator
    def _same_request(self, request_fingerprint: str) -> None:
        if request_fingerprint != self._input.request_fingerprint:
            raise ApplicationError(
                "this Idempotency-Key was used with a different request body",
                type=ErrorCode.IDEMPOTENCY_KEY_REUSED,
            )

    @workflow.update
    async def cancel(self) -> CancelResult:
        """Answers POST /orders/{id}/cancel once the compensation is done."""
        self._cancel_requested = True
        await workflow.wait_condition(lambda: self._status in CHECKOUT_FINAL)
        return CancelResult(order_id=self._input.order_id, status=self._status)

    @cancel.validator
    def _cancellable(self) -> None:
        if self._status in (PAID, EXPIRED, REJECTED):
            raise ApplicationError(
                f"the order is {self._status}",
                {"status": self._status},
                type=ErrorCode.INVALID_STATE,
            )

    @workflow.signal
    def payment_event(self, event: PaymentEvent) -> None:
        """A Stripe event for this checkout's PaymentIntent (duplicates are ignored)."""
        if event.event_id in self._seen_events:
            return
        self._seen_events.add(event.event_id)
        if self._intent is not None and event.payment_intent_id != self._intent.payment_intent_id:
            workflow.logger.warning(
                "ignoring event %s for another intent", event.event_id, extra=self._log_ids()
            )
            return
        outcome = _ATTEMPT_OUTCOMES.get(event.type)
        if outcome is None:
            return
        if outcome == PaymentOutcome.SUCCEEDED and self._status in (CANCELLED, EXPIRED):
            self._late_success = True
        self._attempts.append(
            PaymentAttempt(
                event_id=event.event_id, at=workflow.now(), outcome=outcome, message=event.message
            )
        )
        self._inbox.append(event)

    @workflow.query
    def state(self) -> CheckoutState:
        return CheckoutState(
            checkout_id=self._input.checkout_id,
            order_id=self._input.order_id,
            status=self._status,
            expires_at=self._expires_at if self._start and self._start.created else None,
            payment_attempts=self._attempts,
            request_fingerprint=self._input.request_fingerprint,
            start=self._start,
        )
