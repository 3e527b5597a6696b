"""PostgreSQL is restarted under load: no stock is lost or counted twice."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from sqlalchemy import text

from core.dev.postgres import EmbeddedPostgres, create_database
from core.invariants import check
from core.settings import Settings
from tests.conftest import alembic_config, free_port
from tests.e2e.stack import Stack, running_stack, stack_settings
from tests.e2e.test_checkout_http import cart, inventory, put_product

pytestmark = pytest.mark.e2e


class RestartablePostgres:
    def __init__(self, data_dir: Path) -> None:
        self.pg = EmbeddedPostgres(data_dir, free_port(), durable=False)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = self.pg.start(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pg.wait_ready(proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: fast shutdown, clients are cut off
            self.proc.wait(30)


@pytest.fixture
def postgres() -> Iterator[RestartablePostgres]:
    with tempfile.TemporaryDirectory(prefix="checkout-pg-restart-") as tmp:
        server = RestartablePostgres(Path(tmp) / "data")
        server.pg.init()
        server.start()
        create_database(server.pg.url(driver="postgresql"), "checkout")
        command.upgrade(alembic_config(server.pg.url("checkout")), "head")
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
async def stack(
    postgres: RestartablePostgres, settings: Settings, temporal_address: str
) -> AsyncIterator[Stack]:
    own = stack_settings(
        settings, "pg_restart", temporal_address, database_url=postgres.pg.url("checkout")
    )
    async with running_stack(own) as running:
        yield running


async def buyer(stack: Stack, n: int, results: list[dict[str, Any]], refused: list[int]) -> None:
    """Checks out and pays, again and again, through the restart (retrying 503s)."""
    for i in range(4):
        for _ in range(60):
            try:
                response = await stack.api.post(
                    "/checkout",
                    json=cart(("MUG", 1 + (n + i) % 2)),
                    headers={"Idempotency-Key": f"buyer-{n}-{i}"},
                )
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code in (200, 201):
                break
            refused.append(response.status_code if response is not None else 0)
            await asyncio.sleep(0.5)
        else:
            raise AssertionError("checkout never went through")
        created = response.json()
        results.append(created)
        await stack.stripe.pay(created["payment"]["payment_intent_id"])


async def test_a_postgres_restart_under_load_loses_and_doubles_nothing(
    stack: Stack, postgres: RestartablePostgres
) -> None:
    await put_product(stack, "MUG", 1000)
    stack.services.checkouts.payment_timeout_seconds = 60
    results: list[dict[str, Any]] = []
    refused: list[int] = []

    buyers = [asyncio.create_task(buyer(stack, n, results, refused)) for n in range(8)]
    await asyncio.sleep(1.0)
    postgres.stop()
    await asyncio.sleep(1.5)
    postgres.start()
    await asyncio.gather(*buyers)

    for created in results:
        await stack.wait_for_order(created["order_id"], "paid", timeout=90)
    # The only refusals allowed are 503s, and the load spanned the restart: orders were
    # created both before and after the server's new start time.
    assert set(refused) <= {503}
    async with stack.services.sessions() as session:
        before, after = (
            await session.execute(
                text(
                    "SELECT count(*) FILTER (WHERE created_at < pg_postmaster_start_time()),"
                    " count(*) FILTER (WHERE created_at >= pg_postmaster_start_time())"
                    " FROM orders"
                )
            )
        ).one()
    assert before > 0
    assert after > 0
    sold = sum(c["items"][0]["quantity"] for c in results)
    assert len(results) == 32
    assert await inventory(stack, "MUG") == (1000 - sold, 0, 1000 - sold)
    async with stack.services.sessions() as session:
        orders = await session.scalar(text("SELECT count(*) FROM orders WHERE status = 'paid'"))
    assert orders == 32
    assert await check(stack.services.sessions, stack.services.stripe) == []
