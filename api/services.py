"""What the routes call: the checkout saga through the Temporal client, and the webhook inbox.

Route handlers stay a few lines; the mapping from Temporal's and Stripe's answers to the
contract's errors lives here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert
from temporalio.api.enums.v1 import ResourceExhaustedCause
from temporalio.api.errordetails.v1 import MultiOperationExecutionFailure, ResourceExhaustedFailure
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import (
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.refunds import LatePaymentInput, RefundOrderInput
from api.schemas import CheckoutIn
from core.db import SessionFactory
from core.errors import ErrorCode, InvalidState, NotFound, ServiceError, Unavailable
from core.models import PROCESSED_WEBHOOK_EVENTS
from core.orders import CANCELLED, PAID, PENDING, REFUNDED, OrderStore
from core.settings import Settings
from workflows.checkout import CheckoutWorkflow, start_search_attributes
from workflows.models import (
    CartItem,
    CheckoutCreated,
    CheckoutInput,
    CheckoutState,
    Customer,
    PaymentEvent,
    StartResult,
)
from workflows.refund import LatePaymentWorkflow, RefundWorkflow

log = logging.getLogger(__name__)

T = TypeVar("T")

# Checkout ids derive from the Idempotency-Key, order ids from the checkout id: the same key
# always reaches the same workflow, and every retry computes the same ids.
CHECKOUT_NAMESPACE = uuid.UUID("5f0c7f8e-7c1a-4a57-9d59-2f3f6c1b9e11")
ORDER_NAMESPACE = uuid.UUID("0b6a4c52-1d0e-4f7b-8f8e-8b0f3a7f4d2c")

# POST /checkout answers within this, whatever Temporal or Stripe do.
CHECKOUT_ANSWER_TIMEOUT = 30.0


def workflow_id(checkout_id: uuid.UUID) -> str:
    return f"checkout-{checkout_id}"


# How many times one key may be retried after its checkout ended `unavailable`.
MAX_ATTEMPTS_PER_KEY = 20


def checkout_id_for(idempotency_key: str | None, attempt: int = 0) -> uuid.UUID:
    if not idempotency_key:
        return uuid.uuid4()
    name = idempotency_key if attempt == 0 else f"{idempotency_key}\x00attempt-{attempt}"
    return uuid.uuid5(CHECKOUT_NAMESPACE, name)


def order_id_for(checkout_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(ORDER_NAMESPACE, str(checkout_id))


def fingerprint(body: CheckoutIn) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _unavailable(exc: BaseException) -> Unavailable:
    log.warning("temporal unavailable: %s", exc)
    return Unavailable("the checkout service cannot reach Temporal; try again")


# Temporal refuses an update or a signal that reaches a run in the instant it is completing
# ("workflow is closing": RESOURCE_EXHAUSTED with cause BUSY_WORKFLOW). Asked again a moment
# later, the run is closed and the caller gets a definite answer, so these are retried briefly
# instead of becoming a 503. Other RESOURCE_EXHAUSTED causes (rate limits, an overloaded
# server) are not: retrying would only add load.
_BUSY_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


def _workflow_busy(exc: RPCError) -> bool:
    if exc.status == RPCStatusCode.ABORTED:
        return True
    if exc.status != RPCStatusCode.RESOURCE_EXHAUSTED:
        return False
    details = list(exc.grpc_status.details)
    multi = MultiOperationExecutionFailure()
    # Update-with-Start reports each operation's status inside one multi-operation failure.
    for detail in list(details):
        if detail.Unpack(multi):
            details += [d for status in multi.statuses for d in status.details]
    failure = ResourceExhaustedFailure()
    return any(
        detail.Unpack(failure)
        and failure.cause == ResourceExhaustedCause.RESOURCE_EXHAUSTED_CAUSE_BUSY_WORKFLOW
        for detail in details
    )


async def _retry_while_busy(call: Callable[[], Awaitable[T]]) -> T:
    for delay in _BUSY_RETRY_DELAYS:
        try:
            return await call()
        except RPCError as exc:
            if not _workflow_busy(exc):
                raise
            log.info("workflow busy (%s); retrying in %.2fs", exc.message, delay)
            await asyncio.sleep(delay)
    return await call()


def _failure_error(result: StartResult) -> ServiceError:
    assert result.failure is not None
    failure = result.failure
    return ServiceError(failure.message, details=failure.details, code=failure.code)


class CheckoutService:
    def __init__(self, client: Client, settings: Settings, orders: OrderStore) -> None:
        self._client = client
        self._task_queue = settings.temporal_task_queue
        # Read at each checkout's start and fixed in its input from then on.
        self.payment_timeout_seconds = settings.checkout_payment_timeout
        self._orders = orders

    async def start(
        self, body: CheckoutIn, idempotency_key: str | None
    ) -> tuple[CheckoutCreated, bool]:
        """Start (or rejoin) the checkout; returns it and whether this request created it.

        A key whose earlier attempt ended `unavailable` (a dependency was down; nothing was
        kept) gets a new attempt: the attempts of a key form a fixed chain of checkout ids, so
        concurrent retries walk the same chain and meet in the same checkout. The request that
        drove an attempt answers with its outcome; a later one that finds it failed, whether
        the run has ended or is still compensating, moves on to the next attempt.
        """
        for attempt in range(MAX_ATTEMPTS_PER_KEY):
            result = await self._start_attempt(body, checkout_id_for(idempotency_key, attempt))
            retryable = result.failure is not None and result.failure.code == ErrorCode.UNAVAILABLE
            if not (retryable and idempotency_key and not result.first):
                break
        if result.failure is not None:
            raise _failure_error(result)
        assert result.created is not None
        return result.created, result.first

    async def _start_attempt(self, body: CheckoutIn, checkout_id: uuid.UUID) -> StartResult:
        """Update-with-Start one checkout id (or, if it has ended, read its answer)."""
        input = CheckoutInput(
            checkout_id=checkout_id,
            order_id=order_id_for(checkout_id),
            customer=Customer(email=body.customer.email, user_id=body.customer.user_id),
            items=[CartItem(sku=i.sku, quantity=i.quantity) for i in body.items],
            metadata=body.metadata or {},
            payment_timeout_seconds=self.payment_timeout_seconds,
            request_fingerprint=fingerprint(body),
        )

        def operation() -> WithStartWorkflowOperation[Any, Any]:
            # A new one per call: an operation carries the outcome of the call it was sent with.
            return WithStartWorkflowOperation(
                CheckoutWorkflow.run,
                input,
                id=workflow_id(checkout_id),
                task_queue=self._task_queue,
                # Concurrent duplicates join the running checkout; a finished one is never re-run.
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                search_attributes=start_search_attributes(input),
                static_summary=f"Checkout of {len(body.items)} line(s) for {body.customer.email}",
            )

        try:
            async with asyncio.timeout(CHECKOUT_ANSWER_TIMEOUT):
                result = await _retry_while_busy(
                    lambda: self._client.execute_update_with_start_workflow(
                        CheckoutWorkflow.start,
                        input.request_fingerprint,
                        start_workflow_operation=operation(),
                    )
                )
        except WorkflowUpdateFailedError as exc:
            raise self._update_error(exc) from exc
        except WorkflowAlreadyStartedError:
            # The checkout already ran to its end: answer from its final state.
            return await self._finished_start(checkout_id, input.request_fingerprint)
        except RPCError as exc:
            if exc.status != RPCStatusCode.ALREADY_EXISTS:
                raise _unavailable(exc) from exc
            return await self._finished_start(checkout_id, input.request_fingerprint)
        except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError) as exc:
            # The checkout may still open later; the same key then answers with it, and if
            # nobody comes back for it, it expires and gives its stock back.
            raise _unavailable(exc) from exc
        return result

    async def _finished_start(
        self, checkout_id: uuid.UUID, request_fingerprint: str
    ) -> StartResult:
        state = await self.state(checkout_id)
        if state.request_fingerprint != request_fingerprint:
            raise ServiceError(
                "this Idempotency-Key was used with a different request body",
                code=ErrorCode.IDEMPOTENCY_KEY_REUSED,
            )
        if state.start is None:
            raise Unavailable("the checkout ended before it could answer; use a new key")
        return state.start.model_copy(update={"first": False})

    @staticmethod
    def _update_error(exc: WorkflowUpdateFailedError) -> ServiceError:
        cause = exc.cause
        if isinstance(cause, ApplicationError) and cause.type:
            details = cause.details[0] if cause.details else None
            return ServiceError(cause.message, details=details, code=cause.type)
        return _unavailable(exc)

    async def state(self, checkout_id: uuid.UUID) -> CheckoutState:
        handle = self._client.get_workflow_handle(workflow_id(checkout_id))
        try:
            return await handle.query(CheckoutWorkflow.state, rpc_timeout=timedelta(seconds=10))
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise NotFound(f"no checkout {checkout_id}") from exc
            raise _unavailable(exc) from exc
        except WorkflowQueryFailedError as exc:
            raise _unavailable(exc) from exc

    async def cancel(self, order_id: uuid.UUID) -> str:
        """Cancel a pending order's checkout; answers once the compensation is done."""
        view = await self._orders.get(order_id)
        status = view.order.status
        if status == CANCELLED:
            return CANCELLED
        if status != PENDING:
            raise InvalidState(f"the order is {status}", details={"status": status})
        handle = self._client.get_workflow_handle(workflow_id(view.order.checkout_id))
        try:
            result = await _retry_while_busy(lambda: handle.execute_update(CheckoutWorkflow.cancel))
        except WorkflowUpdateFailedError as exc:
            raise self._update_error(exc) from exc
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise _unavailable(exc) from exc
            # The checkout finished meanwhile; the order says how.
            result_status = await self._orders.status(order_id)
            if result_status != CANCELLED:
                raise InvalidState(
                    f"the order is {result_status}", details={"status": result_status}
                ) from exc
            return CANCELLED
        if result.status != CANCELLED:
            raise InvalidState(f"the order is {result.status}", details={"status": result.status})
        return CANCELLED


class RefundService:
    def __init__(self, client: Client, settings: Settings, orders: OrderStore) -> None:
        self._client = client
        self._task_queue = settings.temporal_task_queue
        self._orders = orders

    async def refund(self, order_id: uuid.UUID) -> str:
        """Refund a paid order in full; answers once Stripe refunded and the stock is back."""
        status = await self._orders.status(order_id)
        if status == REFUNDED:
            return REFUNDED
        if status != PAID:
            raise InvalidState(f"the order is {status}, not paid", details={"status": status})
        try:
            result = await self._client.execute_workflow(
                RefundWorkflow.run,
                RefundOrderInput(order_id=order_id, reason="requested_by_operator"),
                id=f"refund-{order_id}",
                task_queue=self._task_queue,
                # Concurrent requests wait for the same refund.
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                static_summary=f"Refund of order {order_id}",
            )
        except WorkflowAlreadyStartedError:
            result = None
        except RPCError as exc:
            raise _unavailable(exc) from exc
        final = result.status if result else await self._orders.status(order_id)
        if final != REFUNDED:
            raise InvalidState(f"the order is {final}, not paid", details={"status": final})
        return REFUNDED


PAYMENT_INTENT_EVENTS = (
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "payment_intent.canceled",
)


class WebhookInbox:
    """Records every verified Stripe event once and acts on ours: PaymentIntent events go to
    their checkout's workflow; refunds and disputes go to the order."""

    def __init__(
        self, sessions: SessionFactory, client: Client, orders: OrderStore, task_queue: str
    ) -> None:
        self._sessions = sessions
        self._client = client
        self._orders = orders
        self._task_queue = task_queue

    async def receive(self, event: dict[str, Any]) -> str:
        event_id: str = event["id"]
        event_type: str = event["type"]
        obj = (event.get("data") or {}).get("object") or {}
        checkout_id = _checkout_id(obj)
        # What most events come to; written with the row, and corrected if it turns out else.
        expected = "acted" if event_type in PAYMENT_INTENT_EVENTS and checkout_id else "ignored"
        async with self._sessions.begin() as session:
            # The row is written in the same transaction that signals: if the signal cannot be
            # delivered, nothing is recorded and Stripe's retry is not mistaken for a duplicate.
            new = await session.execute(
                insert(PROCESSED_WEBHOOK_EVENTS)
                .values(
                    event_id=event_id,
                    type=event_type,
                    checkout_id=checkout_id,
                    outcome=expected,
                    payload=event,
                )
                .on_conflict_do_nothing(index_elements=["event_id"])
                .returning(PROCESSED_WEBHOOK_EVENTS.c.event_id)
            )
            if new.scalar_one_or_none() is None:
                return "duplicate"
            outcome = await self._dispatch(event_type, event_id, obj, checkout_id)
            if outcome != expected:
                await session.execute(
                    update(PROCESSED_WEBHOOK_EVENTS)
                    .where(PROCESSED_WEBHOOK_EVENTS.c.event_id == event_id)
                    .values(outcome=outcome)
                )
        return outcome

    async def _dispatch(
        self, event_type: str, event_id: str, obj: dict[str, Any], checkout_id: uuid.UUID | None
    ) -> str:
        if event_type == "charge.refunded":
            return await self._refunded(obj)
        if event_type == "charge.dispute.created":
            return await self._disputed(event_id, obj)
        if event_type not in PAYMENT_INTENT_EVENTS or checkout_id is None:
            return "ignored"
        error = obj.get("last_payment_error") or {}
        signal = PaymentEvent(
            event_id=event_id,
            type=event_type,
            payment_intent_id=str(obj.get("id")),
            status=str(obj.get("status")),
            amount=int(obj.get("amount") or 0),
            currency=str(obj.get("currency") or ""),
            message=error.get("message") or error.get("code"),
        )
        handle = self._client.get_workflow_handle(workflow_id(checkout_id))
        try:
            await _retry_while_busy(
                lambda: handle.signal(
                    CheckoutWorkflow.payment_event, signal, rpc_timeout=timedelta(seconds=10)
                )
            )
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise _unavailable(exc) from exc
            if event_type == "payment_intent.succeeded":
                return await self._late_success(signal.payment_intent_id)
            return "workflow_gone"
        return "acted"

    async def _late_success(self, intent_id: str) -> str:
        """The checkout has ended: unless its order is paid, the money goes back."""
        found = await self._orders.find_by_intent(intent_id)
        if found is None:
            return "workflow_gone"
        order_id, status = found
        if status in (PAID, REFUNDED):
            return "duplicate"
        try:
            await self._client.start_workflow(
                LatePaymentWorkflow.run,
                LatePaymentInput(order_id=order_id, payment_intent_id=intent_id),
                id=f"late-payment-{intent_id}",
                task_queue=self._task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                static_summary=f"Refund of late payment {intent_id} (order {order_id} {status})",
            )
        except WorkflowAlreadyStartedError:
            pass
        except RPCError as exc:
            raise _unavailable(exc) from exc
        return "late_payment_refund"

    async def _refunded(self, charge: dict[str, Any]) -> str:
        found = await self._orders.find_by_intent(str(charge.get("payment_intent")))
        if found is None:
            return "ignored"
        refunded = int(charge.get("amount_refunded") or 0)
        await self._orders.mark_refunded(
            found[0],
            refunded_amount=refunded,
            source="stripe",
            reference=f"{charge.get('id')}:{refunded}",
        )
        return "acted"

    async def _disputed(self, event_id: str, dispute: dict[str, Any]) -> str:
        found = await self._orders.find_by_intent(str(dispute.get("payment_intent")))
        if found is None:
            return "ignored"
        await self._orders.record_event(
            found[0],
            "dispute_created",
            {
                "dispute_id": dispute.get("id"),
                "amount": dispute.get("amount"),
                "reason": dispute.get("reason"),
            },
            f"{found[0]}:dispute:{dispute.get('id') or event_id}",
        )
        return "acted"


def _checkout_id(obj: dict[str, Any]) -> uuid.UUID | None:
    raw = (obj.get("metadata") or {}).get("checkout_id")
    try:
        return uuid.UUID(str(raw)) if raw else None
    except ValueError:
        return None
