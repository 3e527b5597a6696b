"""PostgreSQL is restarted under load: no stock is lost or counted twice."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from sqlalchemy import text

from core.invariants import check
from core.settings import Settings
from devtools.postgres import EmbeddedPostgres, create_database
from tests.conftest import alembic_config, free_port
from tests.e2e.stack import Stack, running_stack, stack_settings
from tests.e2e.test_checkout_http import ADMIN, cart, inventory, put_product

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


@dataclass
class Load:
    """What the buyers made, and when the restart happened, so that the test's premise (orders
    made before and after the restart) holds however fast or slow the machine is."""

    results: list[dict[str, Any]] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    restarted: asyncio.Event = field(default_factory=asyncio.Event)
    # Checkouts that were requested after the server's new start, per buyer.
    after_restart: dict[int, int] = field(default_factory=dict)


# Enough before the restart that it really happens under load; enough after that it matters.
BEFORE_RESTART = 8
AFTER_RESTART_PER_BUYER = 2
MAX_PER_BUYER = 200


async def buyer(stack: Stack, n: int, load: Load) -> None:
    """Checks out and pays, again and again, through the restart (retrying 503s), until it has
    made checkouts after the restart."""
    for i in range(MAX_PER_BUYER):
        if load.after_restart.get(n, 0) >= AFTER_RESTART_PER_BUYER:
            return
        requested_after_restart = load.restarted.is_set()
        for _ in range(120):
            try:
                response = await stack.api.post(
                    "/checkout",
                    json=cart(("MUG", 1 + (n + i) % 2)),
                    headers={"Idempotency-Key": f"buyer-{n}-{i}", **ADMIN},
                )
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code in (200, 201):
                break
            load.refused.append(response.status_code if response is not None else 0)
            await asyncio.sleep(0.25)
        else:
            raise AssertionError("checkout never went through")
        created = response.json()
        load.results.append(created)
        await stack.stripe.pay(created["payment"]["payment_intent_id"])
        if requested_after_restart:
            load.after_restart[n] = load.after_restart.get(n, 0) + 1
    raise AssertionError(f"buyer {n} made no checkout after the restart in {MAX_PER_BUYER}")


async def test_a_postgres_restart_under_load_loses_and_doubles_nothing(
    stack: Stack, postgres: RestartablePostgres
) -> None:
    await put_product(stack, "MUG", 100_000)
    stack.services.checkouts.payment_timeout_seconds = 60
    load = Load()

    buyers = [asyncio.create_task(buyer(stack, n, load)) for n in range(8)]
    # Restart once the load is really running, in a thread: the API and the worker go on
    # serving (and failing) while the server is down, as they would in production.
    while len(load.results) < BEFORE_RESTART:
        assert not any(b.done() for b in buyers), [b.exception() for b in buyers if b.done()]
        await asyncio.sleep(0.05)
    await asyncio.to_thread(postgres.stop)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(postgres.start)
    load.restarted.set()
    await asyncio.gather(*buyers)

    for created in load.results:
        await stack.wait_for_order(created["order_id"], "paid", timeout=90)
    # The only refusals allowed are 503s, and the load spanned the restart: orders were
    # created both before and after the server's new start time.
    assert set(load.refused) <= {503}
    async with stack.services.sessions() as session:
        before, after = (
            await session.execute(
                text(
                    "SELECT count(*) FILTER (WHERE created_at < pg_postmaster_start_time()),"
                    " count(*) FILTER (WHERE created_at >= pg_postmaster_start_time())"
                    " FROM orders WHERE status = 'paid'"
                )
            )
        ).one()
    assert before >= BEFORE_RESTART
    assert after >= 8 * AFTER_RESTART_PER_BUYER
    sold = sum(c["items"][0]["quantity"] for c in load.results)
    assert await inventory(stack, "MUG") == (100_000 - sold, 0, 100_000 - sold)
    async with stack.services.sessions() as session:
        orders = await session.scalar(text("SELECT count(*) FROM orders WHERE status = 'paid'"))
    assert orders == len(load.results) == before + after
    assert await check(stack.services.sessions, stack.services.stripe) == []
