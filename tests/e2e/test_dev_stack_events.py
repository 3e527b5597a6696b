"""`make run` and order events: with a broker on this machine the worker's relay publishes them
(the banner says where); without one, the banner says they are kept and served by
GET /admin/events."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from core.settings import DEV_ADMIN_TOKEN
from devtools.stack import Ports, Stack
from tests.conftest import free_port
from tests.e2e.test_dev_stack import RunningStack
from tests.rabbitmq import RABBITMQ_URL, Consumer, require_rabbitmq, unique

pytestmark = pytest.mark.e2e


def test_without_a_broker_make_run_says_events_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RABBITMQ_URL", raising=False)
    ports = Ports(api=0, postgres=0, temporal=0, temporal_ui=0, stripe=0, rabbitmq=free_port())
    stack = Stack(tmp_path, ports, quiet=True)

    stack._events()

    assert "RABBITMQ_URL" not in stack.env
    assert "kept in the outbox and served by GET /admin/events" in stack.banner()


async def test_make_run_publishes_order_events_to_the_broker_it_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = await require_rabbitmq()
    exchange = unique("test.checkout.events")
    monkeypatch.setenv("EVENTS_EXCHANGE", exchange)
    if broker == RABBITMQ_URL:
        monkeypatch.delenv("RABBITMQ_URL", raising=False)  # found on 127.0.0.1:5672
    else:
        monkeypatch.setenv("RABBITMQ_URL", broker)
    consumer = Consumer(broker, exchange, unique("test.checkout.queue"))
    await consumer.bind()
    await consumer.consume()
    running = RunningStack(tmp_path / "data")
    try:
        banner = await asyncio.to_thread(running.wait_up)
        assert f"topic exchange {exchange!r}" in banner

        async with httpx.AsyncClient(base_url=running.api, timeout=30) as api:
            put = await api.put(
                "/admin/products/EVT-1",
                json={"name": "Mug", "unit_price": 900, "currency": "usd", "on_hand": 3},
                headers={"Authorization": f"Bearer {DEV_ADMIN_TOKEN}"},
            )
            assert put.status_code == 200
            created = await api.post(
                "/checkout",
                json={
                    "customer": {"email": "ada@example.com"},
                    "items": [{"sku": "EVT-1", "quantity": 1}],
                },
            )
            assert created.status_code == 201, created.text
        await consumer.wait_for(1, timeout=30)

        (message,) = consumer.received
        assert message.routing_key == "order.created"
        assert message.body["aggregate_id"] == created.json()["order_id"]
        assert message.body["sequence"] == 1
        assert await asyncio.to_thread(running.stop) == 0
    finally:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait(30)
        await consumer.delete()
