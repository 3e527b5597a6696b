"""The outbox relay against the machine's real RabbitMQ and PostgreSQL: relay processes
(`python -m core.relay`) publish every event at least once, with the contract's body and
properties, each order's in sequence with several of them running; through forced connection
closes, a SIGKILLed relay, a broker that is not there yet, lost database connections and a
broker that cannot route, nothing is lost and no order's events are reordered."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Row, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db import SessionFactory
from core.events import EventBody
from core.orders import NewOrder, OrderStore
from core.relay import Relay, RelayOptions, libpq_url
from tests.conftest import free_port
from tests.core.test_events import declined, new_order, opened, pay, seed
from tests.rabbitmq import (
    Consumer,
    Received,
    RelayProcess,
    TcpProxy,
    poll,
    rabbitmqctl,
    require_rabbitmq,
    scratch_vhost,
    unique,
)


@pytest.fixture
async def broker() -> str:
    return await require_rabbitmq()


@pytest.fixture
async def consumer(broker: str) -> AsyncIterator[Consumer]:
    """A queue bound to the test's own exchange, consuming as messages arrive."""
    consumer = Consumer(broker, unique("test.checkout.events"), unique("test.checkout.queue"))
    await consumer.bind()
    yield consumer
    await consumer.delete()


@contextlib.contextmanager
def relays(tmp_path: Path, count: int, database_url: str, rabbitmq_url: str, exchange: str) -> Any:
    started = [
        RelayProcess(tmp_path / f"relay-{i}.log", database_url, rabbitmq_url, exchange)
        for i in range(count)
    ]
    try:
        yield started
    finally:
        for relay in started:
            relay.stop()


async def lifecycle(store: OrderStore, i: int, pace: float) -> None:
    """One order's life, a step every `pace` seconds: created, perhaps a declined attempt,
    then paid, cancelled or expired, and perhaps refunded in part and then in full."""
    order = new_order([("mug", 1 + i % 3), ("tea", 1)], email=f"buyer{i}@example.com")
    total = await opened(store, order, f"pi_{order.order_id.hex}")
    await asyncio.sleep(pace)
    if i % 3 == 0:
        await declined(store, order.order_id, "evt_1")
        await asyncio.sleep(pace)
    if i % 4 == 1:
        await store.close(order.checkout_id, order.order_id, status="cancelled", reason="cancel")
        return
    if i % 4 == 2:
        await store.close(order.checkout_id, order.order_id, status="expired", reason="late")
        return
    await pay(store, order, total)
    if i % 5 == 0:
        await asyncio.sleep(pace)
        await store.mark_refunded(
            order.order_id, refunded_amount=100, source="stripe", reference="r1"
        )
    if i % 7 == 0:
        await asyncio.sleep(pace)
        await store.mark_refunded(
            order.order_id, refunded_amount=total, source="requested_by_operator", reference="r2"
        )


async def burst(store: OrderStore, orders: int, *, pace: float, at_once: int = 4) -> None:
    """`orders` lifecycles, `at_once` of them at a time."""
    gate = asyncio.Semaphore(at_once)

    async def one(i: int) -> None:
        async with gate:
            await lifecycle(store, i, pace)

    await asyncio.gather(*(one(i) for i in range(orders)))


async def outbox(db: SessionFactory) -> list[Row[Any]]:
    async with db() as session:
        return list((await session.execute(text("SELECT * FROM outbox ORDER BY id"))).all())


async def published(db: SessionFactory) -> int:
    async with db() as session:
        count = await session.scalar(
            text("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
        )
    return int(count or 0)


async def all_published(db: SessionFactory, timeout: float = 60) -> list[Row[Any]]:
    async def done() -> list[Row[Any]] | None:
        rows = await outbox(db)
        return rows if rows and all(r.published_at is not None for r in rows) else None

    rows: list[Row[Any]] = await poll(done, timeout, "every event published")
    return rows


def check_stream(
    received: Sequence[Received], rows: Sequence[Row[Any]], *, duplicates: bool
) -> None:
    """Every event arrived with its body and properties; each order's, counting only the
    first copy of each (consumers drop duplicates by event_id), in sequence from 1."""
    expected = {str(row.event_id): (row, EventBody.of(row).model_dump(mode="json")) for row in rows}
    first: dict[str, Received] = {}
    for message in received:
        first.setdefault(message.body["event_id"], message)
    assert set(first) == set(expected)
    if not duplicates:
        assert len(received) == len(expected)
    for event_id, message in first.items():
        row, body = expected[event_id]
        assert message.body == body
        assert (message.message_id, message.type, message.routing_key) == (
            event_id,
            row.event_type,
            row.event_type,
        )
        assert (message.content_type, message.delivery_mode) == ("application/json", 2)
        assert message.timestamp is not None
        assert int(message.timestamp.timestamp()) == int(row.occurred_at.timestamp())
    sequences: dict[str, list[int]] = defaultdict(list)
    seen: set[str] = set()
    for message in received:
        if message.body["event_id"] not in seen:
            seen.add(message.body["event_id"])
            sequences[message.body["aggregate_id"]].append(message.body["sequence"])
    last = {str(row.aggregate_id): 0 for row in rows}
    for row in rows:
        last[str(row.aggregate_id)] = max(last[str(row.aggregate_id)], row.sequence)
    assert {order: got for order, got in sequences.items()} == {
        order: list(range(1, n + 1)) for order, n in last.items()
    }


async def test_three_relays_publish_every_event_once_each_orders_in_sequence(
    db: SessionFactory, database_url: str, consumer: Consumer, broker: str, tmp_path: Path
) -> None:
    await consumer.consume()
    with relays(tmp_path, 3, database_url, broker, consumer.exchange_name) as running:
        for relay in running:
            await relay.wait_log("relay: publishing to")
        store = await seed(db)

        await burst(store, 40, pace=0.005, at_once=8)
        rows = await all_published(db)
        await consumer.wait_for(len(rows))

        check_stream(consumer.received, rows, duplicates=False)
        assert len({r.aggregate_id for r in rows}) == 40
        assert {r.event_type for r in rows} == {
            "order.created",
            "order.payment_failed",
            "order.paid",
            "order.cancelled",
            "order.expired",
            "order.partially_refunded",
            "order.refunded",
        }
        # A relay told to stop finishes its batch and exits cleanly.
        assert [relay.stop() for relay in running] == [0, 0, 0]


async def test_forced_closes_and_a_killed_relay_during_a_burst_lose_and_reorder_nothing(
    db: SessionFactory, database_url: str, broker: str, tmp_path: Path
) -> None:
    async with scratch_vhost(broker) as (vhost, url):
        # Messages wait in a durable queue while connections are closed; read at the end.
        consumer = Consumer(url, unique("test.checkout.events"), unique("test.checkout.queue"))
        await consumer.bind()
        await consumer.close_connection()
        with relays(tmp_path, 3, database_url, url, consumer.exchange_name) as running:
            for relay in running:
                await relay.wait_log("relay: publishing to")
            store = await seed(db)
            writing = asyncio.create_task(burst(store, 80, pace=0.05))

            await poll(lambda: _at_least(db, 30), 30, "a first part published")
            running[0].kill()
            assert not writing.done(), "the burst ended before the relay was killed"
            before = await published(db)
            await poll(lambda: _at_least(db, before + 30), 30, "more published after the kill")
            logged = [len(relay.log()) for relay in running[1:]]
            await rabbitmqctl("close_all_connections", "-p", vhost, "checkout test: forced close")
            assert not writing.done(), "the burst ended before the connections were closed"
            await writing
            rows = await all_published(db, timeout=90)
            for relay, offset in zip(running[1:], logged, strict=True):
                # Each surviving relay lost its connection and came back by itself.
                await relay.wait_log("relay: publishing to", after=offset)

        await consumer.drain()
        check_stream(consumer.received, rows, duplicates=True)
        await consumer.delete()


async def _at_least(db: SessionFactory, count: int) -> bool:
    return await published(db) >= count


async def test_events_written_while_no_broker_answers_go_out_oldest_first_when_one_does(
    db: SessionFactory, database_url: str, consumer: Consumer, broker: str, tmp_path: Path
) -> None:
    target = make_url(broker.replace("amqp://", "postgresql://"))
    proxy = TcpProxy(free_port(), target.host or "127.0.0.1", target.port or 5672)
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
    with relays(tmp_path, 1, database_url, url, consumer.exchange_name) as (relay,):
        await relay.wait_log("cannot reach RabbitMQ")
        store = await seed(db)
        orders: list[NewOrder] = []
        for i in range(12):
            order = new_order([("mug", 1)])
            orders.append(order)
            total = await opened(store, order, f"pi_{order.order_id.hex}")
            await declined(store, order.order_id, "evt_1")
            if i % 2:
                await pay(store, order, total)
            else:
                await store.close(order.checkout_id, order.order_id, status="cancelled", reason="x")
        written = len(relay.log())
        # Still trying, and nothing went anywhere.
        await relay.wait_log("cannot reach RabbitMQ", after=written)
        assert await published(db) == 0

        await proxy.start()
        try:
            rows = await all_published(db)
            await consumer.drain()
        finally:
            await proxy.stop()

    check_stream(consumer.received, rows, duplicates=False)
    by_id = {str(row.event_id): row for row in rows}
    order_of_arrival = [by_id[m.body["event_id"]] for m in consumer.received]
    # Oldest first: each round the oldest pending event of every order, in the order written.
    assert order_of_arrival == sorted(rows, key=lambda row: (row.sequence, row.id))
    assert order_of_arrival[0].id == min(row.id for row in rows)


async def test_a_relay_rides_out_losing_its_database_connections(
    db: SessionFactory, database_url: str, consumer: Consumer, broker: str, tmp_path: Path
) -> None:
    await consumer.consume()
    target = make_url(database_url)
    proxy = TcpProxy(free_port(), target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    through_proxy = target.set(host="127.0.0.1", port=proxy.port).render_as_string(False)
    try:
        with relays(tmp_path, 1, through_proxy, broker, consumer.exchange_name) as (relay,):
            await relay.wait_log("relay: publishing to")
            store = await seed(db)
            await burst(store, 10, pace=0.01)
            first = await all_published(db)

            assert proxy.cut() >= 2  # its pool's connection and its LISTEN connection
            await burst(store, 10, pace=0.01)
            rows = await all_published(db)
            await relay.wait_log("LISTEN connection lost")
            await consumer.wait_for(len(rows))
    finally:
        await proxy.stop()

    assert len(rows) > len(first)
    check_stream(consumer.received, rows, duplicates=True)


async def test_an_unroutable_event_stays_pending_and_holds_back_its_orders_next_one(
    db: SessionFactory, engine: AsyncEngine, database_url: str, broker: str
) -> None:
    exchange = unique("test.checkout.events")
    relay = Relay(
        engine, listen_url=libpq_url(database_url), rabbitmq_url=broker, exchange=exchange
    )
    publishing = asyncio.create_task(relay.run())
    consumer = Consumer(broker, exchange, unique("test.checkout.queue"))
    try:
        store = await seed(db)
        order = new_order([("tea", 2)])
        total = await opened(store, order, f"pi_{order.order_id.hex}")

        async def refused() -> Row[Any] | None:
            (row,) = await outbox(db)
            return row if row.attempts >= 1 else None

        # No queue is bound: the broker returns the message, which counts as not sent.
        row = await poll(refused, 30, "the first attempt")
        assert row.published_at is None
        assert "unroutable" in row.last_error
        assert row.retry_at is not None
        await pay(store, order, total)

        await consumer.bind()
        await consumer.consume()
        await consumer.wait_for(2, timeout=60)
        rows = await all_published(db)
    finally:
        relay.stop()
        await publishing
        await consumer.delete()

    check_stream(consumer.received, rows, duplicates=False)
    assert [m.body["sequence"] for m in consumer.received] == [1, 2]
    assert rows[0].attempts >= 2 and rows[0].last_error is None
    assert uuid.UUID(consumer.received[0].body["aggregate_id"]) == order.order_id


async def test_a_waiting_relay_wakes_at_the_commit_not_at_its_next_poll(
    db: SessionFactory, engine: AsyncEngine, database_url: str, consumer: Consumer, broker: str
) -> None:
    await consumer.consume()
    relay = Relay(
        engine,
        listen_url=libpq_url(database_url),
        rabbitmq_url=broker,
        exchange=consumer.exchange_name,
        # A poll a minute away: only the notification can wake it in time.
        options=RelayOptions(poll_interval=60),
    )
    publishing = asyncio.create_task(relay.run())
    try:
        store = await seed(db)
        await opened(store, new_order([("mug", 1)]))
        await consumer.wait_for(1, timeout=30)
        # Idle now, waiting; the next commit wakes it.
        order = new_order([("tea", 1)])
        await opened(store, order)
        await consumer.wait_for(2, timeout=20)
    finally:
        relay.stop()
        await publishing
    assert consumer.received[1].body["aggregate_id"] == str(order.order_id)
