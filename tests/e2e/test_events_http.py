"""Order events from real checkouts over HTTP (Temporal, the worker, the Stripe stand-in and
its webhooks), published by the relay to the machine's real RabbitMQ: every type once, with
the contract's body and properties, and the admin feed serving the same bodies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from core.relay import Relay, libpq_url
from tests.core.test_relay import all_published, check_stream
from tests.e2e.stack import ADMIN, DECLINED_CARD, Stack
from tests.e2e.test_checkout_http import cancel, cart, checkout, put_product
from tests.e2e.test_refunds_http import wait_for_event, wait_for_refund_webhook
from tests.rabbitmq import Consumer, require_rabbitmq, unique

pytestmark = pytest.mark.e2e


@pytest.fixture
async def consumer(stack: Stack) -> AsyncIterator[Consumer]:
    """A consumer of the test's own exchange, and a relay publishing the stack's outbox to it
    (in this process, as the worker runs it)."""
    broker = await require_rabbitmq()
    consumer = Consumer(broker, unique("test.checkout.events"), unique("test.checkout.queue"))
    await consumer.bind()
    await consumer.consume()
    relay = Relay(
        stack.services.engine,
        listen_url=libpq_url(stack.settings.database_url),
        rabbitmq_url=broker,
        exchange=consumer.exchange_name,
    )
    publishing = asyncio.create_task(relay.run())
    yield consumer
    relay.stop()
    await publishing
    await consumer.delete()


async def paid(stack: Stack, body: dict[str, Any]) -> dict[str, Any]:
    created = await checkout(stack, body)
    await stack.stripe.pay(created["payment"]["payment_intent_id"])
    await stack.wait_for_order(created["order_id"], "paid")
    return created


async def test_every_event_type_is_published_once_with_the_contract_body_and_the_feed_agrees(
    stack: Stack, consumer: Consumer
) -> None:
    await put_product(stack, "MUG", 10, price=1500)
    await put_product(stack, "TEA", 10, price=400)
    # A declined card, another that pays, then the operator's refund.
    refunded = await checkout(stack, cart(("TEA", 1), ("MUG", 2)))
    intent = refunded["payment"]["payment_intent_id"]
    await stack.stripe.pay(intent, DECLINED_CARD)
    await wait_for_event(stack, refunded["order_id"], "payment_failed")
    await stack.stripe.pay(intent)
    await stack.wait_for_order(refunded["order_id"], "paid")
    refund = await stack.api.post(f"/admin/orders/{refunded['order_id']}/refund", headers=ADMIN)
    assert refund.status_code == 200
    # Stripe's charge.refunded for that refund: no second event.
    await wait_for_refund_webhook(stack, intent)
    # Paid, then refunded in part at Stripe (its charge.refunded webhook).
    partial = await paid(stack, cart(("MUG", 1)))
    await stack.stripe.http.post(
        "/v1/refunds",
        data={"payment_intent": partial["payment"]["payment_intent_id"], "amount": "500"},
    )
    await wait_for_event(stack, partial["order_id"], "partially_refunded")
    # Cancelled by its buyer; expired after a short payment window.
    cancelled = await checkout(stack, cart(("TEA", 1)))
    assert (await cancel(stack, cancelled)).status_code == 200
    stack.services.checkouts.payment_timeout_seconds = 3
    expired = await checkout(stack, cart(("TEA", 2)))
    await stack.wait_for_order(expired["order_id"], "expired", timeout=30)

    rows = await all_published(stack.services.sessions)
    await consumer.wait_for(len(rows))

    check_stream(consumer.received, rows, duplicates=False)
    got: dict[str, list[dict[str, Any]]] = {}
    for message in consumer.received:
        got.setdefault(message.body["aggregate_id"], []).append(message.body)
    kinds = {order: [e["event_type"] for e in events] for order, events in got.items()}
    assert kinds == {
        refunded["order_id"]: ["order.created", "order.payment_failed", "order.paid",
                               "order.refunded"],
        partial["order_id"]: ["order.created", "order.paid", "order.partially_refunded"],
        cancelled["order_id"]: ["order.created", "order.cancelled"],
        expired["order_id"]: ["order.created", "order.expired"],
    }  # fmt: skip

    events = got[refunded["order_id"]]
    for event, status, intent_id in zip(
        events,
        ["pending_payment", "pending_payment", "paid", "refunded"],
        [None, intent, intent, intent],
        strict=True,
    ):
        payload = event["payload"]
        assert payload == {
            "order_id": refunded["order_id"],
            "checkout_id": refunded["checkout_id"],
            "status": status,
            "customer": {"email": "ada@example.com", "user_id": None},
            "currency": "usd",
            "totals": refunded["totals"],
            "items": sorted(refunded["items"], key=lambda item: item["sku"]),
            "payment_intent_id": intent_id,
            "reason": payload["reason"],
        }
    reasons = [event["payload"]["reason"] for event in events]
    assert reasons[0] is None and reasons[2] is None
    assert isinstance(reasons[1], str) and reasons[1]  # the decline's message
    assert reasons[3] == "requested_by_operator"
    assert [e["payload"]["reason"] for e in got[cancelled["order_id"]]] == [
        None,
        "cancel requested",
    ]
    assert [e["payload"]["reason"] for e in got[expired["order_id"]]] == [
        None,
        "payment window ended",
    ]
    assert [e["payload"]["status"] for e in got[partial["order_id"]]] == ["pending_payment"] + [
        "paid"
    ] * 2

    # The feed serves the same bodies, with when the broker confirmed each. An event shows
    # once every transaction older than its own has ended, anywhere in the cluster (another
    # stack's relay, say): a reader keeps polling from its cursor, as this one does, until
    # the last one shows, or 10 s.
    broker_bodies = {m.body["event_id"]: m.body for m in consumer.received}
    assert len(broker_bodies) == 11
    feed: list[dict[str, Any]] = []
    after: str | None = None
    async with asyncio.timeout(10):
        while len(feed) < len(broker_bodies):
            params: dict[str, str | int] = {"limit": 3, **({"after": after} if after else {})}
            page = (await stack.api.get("/admin/events", params=params, headers=ADMIN)).json()
            feed += page["events"]
            after = page["next_cursor"]
            if not page["events"]:
                await asyncio.sleep(0.05)
    assert len(feed) == len(broker_bodies)
    for event in feed:
        published_at = event.pop("published_at")
        assert published_at is not None
        assert event == broker_bodies[event["event_id"]]
    for order_id, events in got.items():
        in_feed = [e["sequence"] for e in feed if e["aggregate_id"] == order_id]
        assert in_feed == list(range(1, len(events) + 1))
