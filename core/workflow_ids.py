"""Every Temporal id the service uses, built in one place: the API, the worker, the reconciler
and the tests call these instead of retyping the formats."""

from __future__ import annotations

import uuid

RECONCILER_SCHEDULE_ID = "checkout-reconciler"


def checkout_workflow_id(checkout_id: uuid.UUID | str) -> str:
    return f"checkout-{checkout_id}"


def start_update_id(checkout_id: uuid.UUID | str) -> str:
    """One `start` update per checkout: duplicates of a request attach to it instead of adding
    an update each to the checkout's history."""
    return f"start-{checkout_id}"


def refund_workflow_id(order_id: uuid.UUID | str) -> str:
    return f"refund-{order_id}"


def late_payment_workflow_id(payment_intent_id: str) -> str:
    return f"late-payment-{payment_intent_id}"


def lost_checkout_cancel_workflow_id(order_id: uuid.UUID | str) -> str:
    return f"cancel-{order_id}"


def lost_checkout_payment_workflow_id(order_id: uuid.UUID | str) -> str:
    return f"pay-{order_id}"


def reconciler_workflow_id() -> str:
    return f"{RECONCILER_SCHEDULE_ID}-run"
