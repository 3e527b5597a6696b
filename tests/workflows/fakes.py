"""Fake activities, registered under the real activity names, over an in-memory world.

They let the workflow tests force any path (a decline, a lost webhook, Stripe failing) and
check what the saga did to stock, orders and PaymentIntents, without a database or Stripe.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.orders import CloseOrderInput, OpenOrderInput, OrderEventInput, PricedCartOut
from activities.payments import IntentOut, PaymentIntentInput, SettleInput, SettleResult
from core.errors import ErrorCode
from workflows.models import LineOut


class StockLine(NamedTuple):
    sku: str
    quantity: int


PRICES = {"mug": ("Mug", 1200), "tee": ("Tee", 2500)}


@dataclass
class FakeWorld:
    on_hand: dict[str, int] = field(default_factory=lambda: {"mug": 10, "tee": 10})
    reserved: Counter[str] = field(default_factory=Counter)
    reservations: dict[uuid.UUID, tuple[str, list[StockLine]]] = field(default_factory=dict)
    orders: dict[uuid.UUID, str] = field(default_factory=dict)
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    timeline: list[tuple[str, str]] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    stripe_down: bool = False
    # Promotion uses by checkout: `active`, then `committed` or `released` (moved with the
    # stock, as core/promotion_ledger.py does in the real store); 10 % off.
    promotion_uses: dict[uuid.UUID, str] = field(default_factory=dict)

    def pay(self, intent_id: str, status: str = "succeeded") -> None:
        """What the customer's confirm does at Stripe."""
        self.intents[intent_id]["status"] = status

    def only_intent(self) -> str:
        (intent_id,) = self.intents
        return intent_id

    # -- activities --------------------------------------------------------------------------

    @activity.defn(name="open_order")
    async def open_order(self, input: OpenOrderInput) -> PricedCartOut:
        self.calls["open_order"] += 1
        lines = []
        for item in input.items:
            if item.sku not in PRICES:
                raise ApplicationError(
                    f"unknown SKU: {item.sku}",
                    [{"sku": item.sku}],
                    type=ErrorCode.UNKNOWN_SKU,
                    non_retryable=True,
                )
            name, price = PRICES[item.sku]
            lines.append(
                LineOut(
                    sku=item.sku,
                    name=name,
                    unit_price=price,
                    quantity=item.quantity,
                    line_total=price * item.quantity,
                )
            )
        if input.checkout_id not in self.reservations:
            short = [
                {
                    "sku": line.sku,
                    "requested": line.quantity,
                    "available": self.on_hand[line.sku] - self.reserved[line.sku],
                }
                for line in lines
                if self.on_hand[line.sku] - self.reserved[line.sku] < line.quantity
            ]
            if short:
                raise ApplicationError(
                    "not enough stock", short, type=ErrorCode.INSUFFICIENT_STOCK, non_retryable=True
                )
            for line in lines:
                self.reserved[line.sku] += line.quantity
            self.reservations[input.checkout_id] = (
                "active",
                [StockLine(line.sku, line.quantity) for line in lines],
            )
            self.orders[input.order_id] = "pending_payment"
            if input.promotion_code is not None:
                self.promotion_uses[input.checkout_id] = "active"
        subtotal = sum(line.line_total for line in lines)
        discount = (subtotal + 5) // 10 if input.promotion_code is not None else 0
        return PricedCartOut(
            currency="usd",
            lines=lines,
            subtotal=subtotal,
            discount=discount,
            total=subtotal - discount,
        )

    def _settle(self, checkout_id: uuid.UUID, target: str) -> None:
        if checkout_id not in self.reservations:
            return
        status, lines = self.reservations[checkout_id]
        if status != "active":
            return
        for line in lines:
            self.reserved[line.sku] -= line.quantity
            if target == "committed":
                self.on_hand[line.sku] -= line.quantity
        self.reservations[checkout_id] = (target, lines)
        if self.promotion_uses.get(checkout_id) == "active":
            self.promotion_uses[checkout_id] = target

    @activity.defn(name="create_payment_intent")
    async def create_payment_intent(self, input: PaymentIntentInput) -> IntentOut:
        self.calls["create_payment_intent"] += 1
        if self.stripe_down:
            raise ApplicationError("Stripe is unreachable", type="stripe_503", non_retryable=True)
        intent_id = f"pi_{input.checkout_id.hex[:12]}"
        self.intents.setdefault(
            intent_id,
            {
                "status": "requires_payment_method",
                "amount": input.amount,
                "currency": input.currency,
            },
        )
        return self._intent(intent_id)

    @activity.defn(name="cancel_payment_intent")
    async def cancel_payment_intent(self, input: PaymentIntentInput) -> IntentOut:
        self.calls["cancel_payment_intent"] += 1
        intent_id = input.payment_intent_id or f"pi_{input.checkout_id.hex[:12]}"
        intent = self.intents.setdefault(
            intent_id,
            {"status": "requires_payment_method", "amount": input.amount, "currency": "usd"},
        )
        if intent["status"] not in ("succeeded", "processing"):
            intent["status"] = "canceled"
        return self._intent(intent_id)

    @activity.defn(name="settle_payment")
    async def settle_payment(self, input: SettleInput) -> SettleResult:
        self.calls["settle_payment"] += 1
        intent = self._intent(input.payment_intent_id)
        if intent.status != "succeeded":
            return SettleResult(outcome="unpaid", intent=intent)
        if (intent.amount, intent.currency) != (input.amount, input.currency):
            self.intents[input.payment_intent_id]["refunded"] = intent.amount
            return SettleResult(outcome="mismatch", intent=intent)
        if self.orders[input.order_id] == "pending_payment":
            self._settle(input.checkout_id, "committed")
            self.orders[input.order_id] = "paid"
        return SettleResult(outcome=self.orders[input.order_id], intent=intent)

    @activity.defn(name="close_order")
    async def close_order(self, input: CloseOrderInput) -> str:
        self.calls["close_order"] += 1
        self._settle(input.checkout_id, "released")
        if self.orders.get(input.order_id) == "pending_payment":
            self.orders[input.order_id] = input.status
        return self.orders.get(input.order_id, "cancelled")

    @activity.defn(name="record_order_event")
    async def record_order_event(self, input: OrderEventInput) -> bool:
        self.calls["record_order_event"] += 1
        entry = (input.type, input.dedupe_key)
        if entry in self.timeline:
            return False
        self.timeline.append(entry)
        return True

    def _intent(self, intent_id: str) -> IntentOut:
        intent = self.intents[intent_id]
        return IntentOut(
            payment_intent_id=intent_id,
            status=intent["status"],
            amount=intent["amount"],
            currency=intent["currency"],
            client_secret_sealed=f"{intent_id}_sealed",
        )

    def activities(self) -> list[Any]:
        return [
            self.open_order,
            self.create_payment_intent,
            self.cancel_payment_intent,
            self.settle_payment,
            self.close_order,
            self.record_order_event,
        ]
