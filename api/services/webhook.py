"""Stripe's webhooks: verified by the route, recorded once here, and acted on.

An event's body is a hint. A PaymentIntent event is signalled only to the checkout that
recorded that PaymentIntent id (the workflow then reads the intent back before paying); a
refund acts only on what Stripe's own charge says.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.reconcile import SettleStaleCheckoutInput, StaleCheckout
from activities.refunds import LatePaymentInput
from api.metrics import ApiMetrics
from api.services.checkout import temporal_unavailable
from core import logs
from core.errors import ServiceError
from core.orders import OrderStore
from core.stripe_gateway import InvalidWebhook, StripeGateway
from core.temporal import retry_while_busy
from core.vocabulary import (
    PAYMENT_INTENT_EVENTS,
    OrderStatus,
    StripeEvent,
    TimelineEvent,
    WebhookOutcome,
)
from core.webhook_events import Receipt, WebhookEventStore
from core.workflow_ids import (
    checkout_workflow_id,
    late_payment_workflow_id,
    lost_checkout_payment_workflow_id,
)
from workflows.checkout import CheckoutWorkflow
from workflows.models import PaymentEvent
from workflows.reconciler import SettleLostCheckoutWorkflow
from workflows.refund import LatePaymentWorkflow

log = logging.getLogger(__name__)

# The type label of a delivery whose signature or body did not verify: its claimed type is
# the sender's word, and a label value per forged type would be unbounded.
UNVERIFIED = "unverified"


def _intent_id(event_type: str, obj: dict[str, Any]) -> str | None:
    """The PaymentIntent an event is about: the object itself, or a charge's or dispute's."""
    raw = obj.get("id") if event_type in PAYMENT_INTENT_EVENTS else obj.get("payment_intent")
    if isinstance(raw, dict):
        raw = raw.get("id")
    return raw if isinstance(raw, str) and raw else None


class WebhookInbox:
    def __init__(
        self,
        events: WebhookEventStore,
        client: Client,
        orders: OrderStore,
        stripe: StripeGateway,
        task_queue: str,
        metrics: ApiMetrics | None = None,
    ) -> None:
        self._events = events
        self._client = client
        self._orders = orders
        self._stripe = stripe
        self._task_queue = task_queue
        self._metrics = metrics or ApiMetrics()

    def verify(self, payload: bytes, signature: str | None) -> dict[str, Any]:
        """The event, if Stripe-Signature verifies (InvalidWebhook, counted, if not)."""
        try:
            return self._stripe.verify_webhook(payload, signature)
        except InvalidWebhook as exc:
            self._metrics.webhook_events.labels(UNVERIFIED, exc.code).inc()
            log.warning("webhook refused: %s", exc.message)
            raise

    async def receive(self, event: dict[str, Any]) -> str:
        """Record the verified event once and act on it; returns (and counts) its outcome."""
        event_type: str = event["type"]
        try:
            outcome = await self._receive(event_type, event)
        except ServiceError as exc:
            self._metrics.webhook_events.labels(event_type, exc.code).inc()
            raise
        self._metrics.webhook_events.labels(event_type, outcome).inc()
        return outcome

    async def _receive(self, event_type: str, event: dict[str, Any]) -> str:
        obj = (event.get("data") or {}).get("object") or {}
        if not isinstance(obj, dict):
            obj = {}
        intent_id = _intent_id(event_type, obj)
        # What most events come to; corrected in the same transaction if it turns out else.
        expected = (
            WebhookOutcome.ACTED
            if event_type in PAYMENT_INTENT_EVENTS and intent_id
            else WebhookOutcome.IGNORED
        )
        async with self._events.receive(
            event, intent_id=intent_id, expected_outcome=expected
        ) as receipt:
            if receipt is None:
                return WebhookOutcome.DUPLICATE
            logs.bind(
                checkout_id=receipt.checkout_id,
                order_id=receipt.order_id,
                workflow_id=checkout_workflow_id(receipt.checkout_id)
                if receipt.checkout_id
                else None,
            )
            receipt.outcome = await self._dispatch(event_type, receipt, obj, intent_id)
            return receipt.outcome

    async def _dispatch(
        self, event_type: str, receipt: Receipt, obj: dict[str, Any], intent_id: str | None
    ) -> str:
        if intent_id is None or receipt.checkout_id is None:
            # Not a PaymentIntent any checkout of ours recorded: whatever its metadata says.
            return WebhookOutcome.IGNORED
        if event_type == StripeEvent.CHARGE_REFUNDED:
            return await self._refunded(receipt, obj)
        if event_type == StripeEvent.CHARGE_DISPUTE_CREATED:
            return await self._disputed(receipt, obj)
        if event_type not in PAYMENT_INTENT_EVENTS:
            return WebhookOutcome.IGNORED
        error = obj.get("last_payment_error") or {}
        signal = PaymentEvent(
            event_id=receipt.event_id,
            type=event_type,
            payment_intent_id=intent_id,
            status=str(obj.get("status")),
            amount=int(obj.get("amount") or 0),
            currency=str(obj.get("currency") or ""),
            message=(error.get("message") or error.get("code"))
            if isinstance(error, dict)
            else None,
            received_at=datetime.now(UTC),
        )
        handle = self._client.get_workflow_handle(checkout_workflow_id(receipt.checkout_id))
        try:
            await retry_while_busy(
                lambda: handle.signal(
                    CheckoutWorkflow.payment_event, signal, rpc_timeout=timedelta(seconds=10)
                )
            )
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise temporal_unavailable(exc) from exc
            if event_type == StripeEvent.PAYMENT_INTENT_SUCCEEDED:
                return await self._late_success(receipt, intent_id)
            return WebhookOutcome.WORKFLOW_GONE
        return WebhookOutcome.ACTED

    async def _late_success(self, receipt: Receipt, intent_id: str) -> str:
        """The checkout's run has ended. Its order still pending: the run was terminated or
        lost, and the payment is settled now as the saga would (the order paid, if Stripe
        says so). Closed (cancelled, expired): its stock is gone, so the money goes back."""
        assert receipt.order_id is not None
        if receipt.order_status in (OrderStatus.PAID, OrderStatus.REFUNDED):
            return WebhookOutcome.DUPLICATE
        if receipt.order_status == OrderStatus.PENDING_PAYMENT:
            return await self._pay_lost(receipt, intent_id)
        try:
            await self._client.start_workflow(
                LatePaymentWorkflow.run,
                LatePaymentInput(order_id=receipt.order_id, payment_intent_id=intent_id),
                id=late_payment_workflow_id(intent_id),
                task_queue=self._task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                static_summary=(
                    f"Refund of late payment {intent_id} "
                    f"(order {receipt.order_id} {receipt.order_status})"
                ),
            )
        except WorkflowAlreadyStartedError:
            pass
        except RPCError as exc:
            raise temporal_unavailable(exc) from exc
        return WebhookOutcome.LATE_PAYMENT_REFUND

    async def _pay_lost(self, receipt: Receipt, intent_id: str) -> str:
        assert receipt.order_id is not None
        assert receipt.checkout_id is not None
        order = (await self._orders.get(receipt.order_id)).order
        checkout = StaleCheckout(
            checkout_id=receipt.checkout_id,
            order_id=receipt.order_id,
            amount=order.total,
            currency=order.currency,
            payment_intent_id=intent_id,
            expires_at=order.expires_at or order.created_at,
            workflow_status="NOT_FOUND",
        )
        try:
            await self._client.start_workflow(
                SettleLostCheckoutWorkflow.run,
                SettleStaleCheckoutInput(checkout=checkout, close_as=None),
                id=lost_checkout_payment_workflow_id(receipt.order_id),
                task_queue=self._task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                static_summary=f"Payment of order {receipt.order_id}, whose checkout's run is gone",
            )
        except WorkflowAlreadyStartedError:
            pass
        except RPCError as exc:
            raise temporal_unavailable(exc) from exc
        return WebhookOutcome.ACTED

    async def _refunded(self, receipt: Receipt, obj: dict[str, Any]) -> str:
        """Acts on Stripe's own charge, read back: a forged or stale event refunds nothing."""
        assert receipt.order_id is not None
        charge_id = obj.get("id")
        if not isinstance(charge_id, str):
            return WebhookOutcome.IGNORED
        charge = await self._stripe.retrieve_charge(charge_id)
        if charge.payment_intent != _intent_id(StripeEvent.CHARGE_REFUNDED, obj):
            log.warning("charge %s does not belong to the event's PaymentIntent", charge.id)
            return WebhookOutcome.IGNORED
        if charge.amount_refunded <= 0:
            return WebhookOutcome.IGNORED
        await self._orders.mark_refunded(
            receipt.order_id,
            refunded_amount=charge.amount_refunded,
            source="stripe",
            reference=f"{charge.id}:{charge.amount_refunded}",
        )
        return WebhookOutcome.ACTED

    async def _disputed(self, receipt: Receipt, dispute: dict[str, Any]) -> str:
        assert receipt.order_id is not None
        await self._orders.record_event(
            receipt.order_id,
            TimelineEvent.DISPUTE_CREATED,
            {
                "dispute_id": dispute.get("id"),
                "amount": dispute.get("amount"),
                "reason": dispute.get("reason"),
            },
            f"{receipt.order_id}:dispute:{dispute.get('id') or receipt.event_id}",
        )
        return WebhookOutcome.ACTED
