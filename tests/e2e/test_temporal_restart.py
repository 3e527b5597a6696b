"""The Temporal dev server (file persistence) is stopped and restarted while checkouts wait
for payment: afterwards they are paid, cancelled or expired as they should be."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from temporalio.client import Client

from core.db import SessionFactory
from core.invariants import check
from core.settings import Settings
from core.workflow_ids import checkout_workflow_id
from devtools.temporal_server import start_dev_argv
from tests.conftest import free_port
from tests.e2e.stack import Stack, running_stack, stack_settings
from tests.e2e.test_checkout_http import as_owner, cart, checkout, inventory, put_product

pytestmark = pytest.mark.e2e


class TemporalServer:
    def __init__(self, db_file: Path) -> None:
        self.port = free_port()
        self.argv = start_dev_argv(
            db_file=db_file, ip="127.0.0.1", port=self.port, ui_port=None, namespace="default"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(300):
            try:
                client = await Client.connect(self.address)
                if await client.service_client.check_health():
                    return
            except Exception:  # noqa: S110 - not up yet
                pass
            await asyncio.sleep(0.1)
        raise AssertionError("temporal did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


async def window_end(stack: Stack, checkout_id: str) -> datetime:
    """When the checkout's payment-window timer is due, as its history records it."""
    handle = stack.services.temporal.get_workflow_handle(checkout_workflow_id(checkout_id))
    async with asyncio.timeout(30):
        while True:
            for event in (await handle.fetch_history()).events:
                if event.HasField("timer_started_event_attributes"):
                    timeout = event.timer_started_event_attributes.start_to_fire_timeout
                    return event.event_time.ToDatetime(UTC) + timeout.ToTimedelta()
            await asyncio.sleep(0.05)


@pytest.fixture
def temporal(tmp_path: Path) -> Iterator[TemporalServer]:
    server = TemporalServer(tmp_path / "temporal.db")
    yield server
    server.stop()


@pytest.fixture
async def stack(
    temporal: TemporalServer, settings: Settings, db: SessionFactory
) -> AsyncIterator[Stack]:
    await temporal.start()
    async with running_stack(stack_settings(settings, "restart", temporal.address)) as running:
        yield running
        assert await check(running.services.sessions, running.services.stripe) == []


async def test_checkouts_waiting_for_payment_survive_a_temporal_restart(
    stack: Stack, temporal: TemporalServer
) -> None:
    await put_product(stack, "MUG", 10)
    to_pay = await checkout(stack, cart(("MUG", 1)))
    to_cancel = await checkout(stack, cart(("MUG", 2)))
    stack.services.checkouts.payment_timeout_seconds = 8
    to_expire = await checkout(stack, cart(("MUG", 3)))
    assert await inventory(stack, "MUG") == (10, 6, 4)
    fires_at = await window_end(stack, to_expire["checkout_id"])

    temporal.stop()
    # That window ends while Temporal is down, however long the restart takes: its timer has
    # to fire from what the server stored.
    assert datetime.now(UTC) < fires_at, "the payment window ended before Temporal stopped"
    # Paid while Temporal is down: the webhook cannot be signalled and, once the client has
    # given up retrying (about 15 s here), is answered 503; the stand-in delivers it again
    # later, as Stripe does.
    intent_id = to_pay["payment"]["payment_intent_id"]
    paid = await stack.stripe.pay(intent_id)
    assert paid.json()["status"] == "succeeded"
    health = await stack.api.get("/healthz")
    assert health.status_code == 503
    assert health.json()["details"]["temporal"] == "down"
    (event,) = [
        e
        for e in await stack.stripe.events("payment_intent.succeeded")
        if e["data"]["object"]["id"] == intent_id
    ]
    # Delivered here too, after the stand-in's first attempt began: once this one is refused,
    # that one has failed as well (refused the same way, or cut by the stand-in's timeout).
    assert (await stack.post_webhook(event)).status_code == 503
    # Back only once the window is over (it is, here, after that wait for the 503).
    await asyncio.sleep((fires_at - datetime.now(UTC)).total_seconds() + 0.1)
    await temporal.start()

    await stack.wait_for_order(to_pay["order_id"], "paid", timeout=60)
    cancelled = await stack.api.post(
        f"/orders/{to_cancel['order_id']}/cancel", headers=as_owner(to_cancel)
    )
    assert cancelled.json()["status"] == "cancelled"
    await stack.wait_for_order(to_expire["order_id"], "expired", timeout=60)
    assert await inventory(stack, "MUG") == (9, 0, 9)
