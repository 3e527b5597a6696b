"""One vocabulary, typed: the statuses, Stripe event types and outcomes that the workflow, the
stores, the API and the tests share. `StrEnum`s serialise to their plain string values, so
recorded workflow histories and the database hold the same strings as before."""

from __future__ import annotations

from enum import StrEnum


class OrderStatus(StrEnum):
    """An order's status: `pending_payment` -> `paid` | `cancelled` | `expired`; `paid` ->
    `refunded`. The last three are final."""

    PENDING_PAYMENT = "pending_payment"
    PAID = "paid"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REFUNDED = "refunded"


ORDER_FINAL = frozenset({OrderStatus.CANCELLED, OrderStatus.EXPIRED, OrderStatus.REFUNDED})


class CheckoutStatus(StrEnum):
    """A checkout's status (its workflow's): the order's, the steps before and in between, and
    `rejected` (refused before it opened, or a step could not finish)."""

    STARTED = "started"
    OPENING_ORDER = "opening_order"
    CREATING_PAYMENT = "creating_payment"
    PENDING_PAYMENT = "pending_payment"
    COMMITTING = "committing"
    COMPENSATING = "compensating"
    PAID = "paid"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REJECTED = "rejected"


CHECKOUT_FINAL = frozenset(
    {CheckoutStatus.PAID, CheckoutStatus.CANCELLED, CheckoutStatus.EXPIRED, CheckoutStatus.REJECTED}
)


class ReservationStatus(StrEnum):
    ACTIVE = "active"
    COMMITTED = "committed"
    RELEASED = "released"
    RETURNED = "returned"


class StripeEvent(StrEnum):
    """The Stripe event types the service acts on; every other verified event is ignored."""

    PAYMENT_INTENT_SUCCEEDED = "payment_intent.succeeded"
    PAYMENT_INTENT_PAYMENT_FAILED = "payment_intent.payment_failed"
    PAYMENT_INTENT_CANCELED = "payment_intent.canceled"
    CHARGE_REFUNDED = "charge.refunded"
    CHARGE_DISPUTE_CREATED = "charge.dispute.created"


PAYMENT_INTENT_EVENTS = frozenset(
    {
        StripeEvent.PAYMENT_INTENT_SUCCEEDED,
        StripeEvent.PAYMENT_INTENT_PAYMENT_FAILED,
        StripeEvent.PAYMENT_INTENT_CANCELED,
    }
)


class IntentStatus(StrEnum):
    """Stripe's PaymentIntent statuses."""

    REQUIRES_PAYMENT_METHOD = "requires_payment_method"
    REQUIRES_CONFIRMATION = "requires_confirmation"
    REQUIRES_ACTION = "requires_action"
    PROCESSING = "processing"
    REQUIRES_CAPTURE = "requires_capture"
    SUCCEEDED = "succeeded"
    CANCELED = "canceled"


# The customer's money is taken or on its way: a cancel must not override it ("the payment wins").
PAYMENT_WINS = frozenset(
    {IntentStatus.SUCCEEDED, IntentStatus.PROCESSING, IntentStatus.REQUIRES_CAPTURE}
)


class PaymentOutcome(StrEnum):
    """One payment attempt as the checkout saw it (`GET /checkouts/{id}`)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class SettleOutcome(StrEnum):
    """What settling a payment came to (besides an order status it already had)."""

    PAID = "paid"
    UNPAID = "unpaid"
    MISMATCH = "mismatch"


class LatePaymentOutcome(StrEnum):
    REFUNDED = "refunded"
    KEPT = "kept"
    NONE = "none"


class WebhookOutcome(StrEnum):
    """What a verified Stripe event came to (`POST /webhooks/stripe` answers it)."""

    ACTED = "acted"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"
    WORKFLOW_GONE = "workflow_gone"
    LATE_PAYMENT_REFUND = "late_payment_refund"


class TimelineEvent(StrEnum):
    """Entries of an order's timeline (`GET /orders/{id}` `events`)."""

    STOCK_RESERVED = "stock_reserved"
    ORDER_CREATED = "order_created"
    PAYMENT_INTENT_CREATED = "payment_intent_created"
    PAYMENT_FAILED = "payment_failed"
    PAID = "paid"
    STOCK_RELEASED = "stock_released"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REFUNDED = "refunded"
    PARTIALLY_REFUNDED = "partially_refunded"
    LATE_PAYMENT_REFUNDED = "late_payment_refunded"
    PAYMENT_MISMATCH_REFUNDED = "payment_mismatch_refunded"
    DISPUTE_CREATED = "dispute_created"
    RECONCILED = "reconciled"


class EventType(StrEnum):
    """The order events of `events.md`; each is also the routing key it is published under."""

    ORDER_CREATED = "order.created"
    ORDER_PAYMENT_FAILED = "order.payment_failed"
    ORDER_PAID = "order.paid"
    ORDER_CANCELLED = "order.cancelled"
    ORDER_EXPIRED = "order.expired"
    ORDER_REFUNDED = "order.refunded"
    ORDER_PARTIALLY_REFUNDED = "order.partially_refunded"


class ReconcileOutcome(StrEnum):
    """What the reconciler did with a checkout whose workflow no longer runs."""

    PAID = "paid"
    EXPIRED = "expired"
    # Cancelled at the customer's request while its run was gone.
    CANCELLED = "cancelled"
    # Left for a later run: its workflow runs again, its payment is in flight, or it was
    # settled meanwhile.
    SKIPPED = "skipped"
