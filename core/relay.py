"""The outbox relay: publishes order events to RabbitMQ, at least once and in order per order.

Runs inside the worker when RABBITMQ_URL is set, or on its own: `python -m core.relay`. Any
number may run against one database:

- A batch is claimed with `FOR UPDATE SKIP LOCKED`, and only the oldest unpublished event of
  each order is eligible: an order's event n+1 is not claimed until n is marked published, and
  n is marked only once the broker confirmed it. Two relays never hold events of one order at
  once, so a consumer never gets n+1 before n was confirmed, with any number of relays.
- The claim's transaction stays open while the batch is published, so the row locks are the
  lease: a relay that dies (SIGKILL included) loses its connection, PostgreSQL rolls back and
  another relay takes the rows. A message confirmed just before such a death goes out again
  (at least once; consumers drop duplicates by `event_id`).
- Publishing uses publisher confirms, `mandatory` and `on_return_raises`: a message the broker
  could not route (no queue bound for its type) or did not confirm counts as not sent. Such an
  event stays pending and is retried with a growing delay (`retry_at`); a broker with no queue
  bound keeps every event pending. A lost connection (broker restart, forced close, timeout)
  leaves the rows untouched and the relay reconnects with backoff.
- It waits on `LISTEN outbox` (a trigger notifies at every insert's commit) and polls every
  `poll_interval` seconds as well, in case a notification is missed while reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aio_pika
import psycopg
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aio_pika.exceptions import AMQPError, DeliveryError, PublishError
from sqlalchemy import Row, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from yarl import URL

from core.events import EventBody
from core.heap import settle_startup_heap
from core.logs import configure_logging
from core.settings import EventSettings, load_event_settings

log = logging.getLogger("relay")

NOTIFY_CHANNEL = "outbox"

# The oldest unpublished event of each order that is due, oldest first; rows another relay
# holds are skipped. An earlier unpublished event, whether due, failing or held elsewhere,
# keeps the later ones of its order back.
_CLAIM = text(
    """
    SELECT o.id, o.event_id, o.event_type, o.occurred_at, o.aggregate_id, o.sequence, o.payload
    FROM outbox o
    WHERE o.published_at IS NULL
      AND (o.retry_at IS NULL OR o.retry_at <= now())
      AND NOT EXISTS (
          SELECT 1 FROM outbox earlier
          WHERE earlier.aggregate_id = o.aggregate_id AND earlier.sequence < o.sequence
            AND earlier.published_at IS NULL)
    ORDER BY o.id
    LIMIT :limit
    FOR UPDATE OF o SKIP LOCKED
    """
)

# The broker's clock is not ours: published_at is PostgreSQL's, like occurred_at, so the lag
# between the two is measured on one clock.
_PUBLISHED = text(
    """
    UPDATE outbox SET published_at = clock_timestamp(), attempts = attempts + 1,
                      last_error = NULL, retry_at = NULL
    WHERE id = ANY(CAST(:ids AS bigint[]))
    RETURNING published_at - occurred_at AS lag
    """
)

_FAILED = text(
    """
    UPDATE outbox o
    SET attempts = o.attempts + 1, last_error = f.error,
        retry_at = now() + make_interval(secs => least(:max_delay, 0.5 * power(2, o.attempts)))
    FROM unnest(CAST(:ids AS bigint[]), CAST(:errors AS text[])) AS f(id, error)
    WHERE o.id = f.id
    """
)


class BrokerLost(Exception):
    """The connection or channel to RabbitMQ is gone or stalled: reconnect."""


class Unpublishable(Exception):
    """This event cannot go out as it is (its body does not fit the contract)."""


# What an event's publication came to, besides success: the broker refused this message (or
# it cannot be sent), so it waits and is tried again; or the broker itself is gone.
_REFUSED = (DeliveryError, Unpublishable)


@dataclass(frozen=True)
class RelayOptions:
    batch_size: int = 100
    # Seconds between polls when no notification arrives.
    poll_interval: float = 2.0
    # Seconds to let events gather after a batch that was not full, before claiming again: under
    # load a batch then carries the events of several checkouts instead of one claim (a
    # transaction of four round trips) per event or two. An idle relay woken by a notification
    # claims at once, so this adds no lag when events are few; under load it adds up to this
    # much (the contract allows 10 s). At 0.05 s the relay cost the worker about 3 ms of CPU per
    # checkout under `make bench` (py-spy); at 0.2 s, about a quarter of that.
    gather: float = 0.2
    # Seconds a publish may wait for the broker's confirm.
    publish_timeout: float = 5.0
    # The longest wait between two attempts to reach the broker or the database, and between
    # two attempts at an event the broker did not take.
    max_reconnect_delay: float = 5.0
    max_retry_delay: float = 30.0


def safe_url(url: str) -> str:
    """The broker's address without its credentials, for logs."""
    parsed = URL(url)
    return f"{parsed.scheme}://{parsed.host}:{parsed.port}{parsed.path or '/'}"


def libpq_url(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(False)


class Relay:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        listen_url: str,
        rabbitmq_url: str,
        exchange: str,
        options: RelayOptions | None = None,
        on_published: Callable[[timedelta], None] | None = None,
    ) -> None:
        """`on_published` hears of each confirmed event's lag from commit to confirm (the
        worker's `checkout_outbox_publish_lag_seconds`)."""
        self._engine = engine
        self._on_published = on_published
        self._listen_url = listen_url
        self._rabbitmq_url = rabbitmq_url
        self._exchange_name = exchange
        self._options = options or RelayOptions()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._published = 0
        self._reported_at = time.monotonic()

    @classmethod
    def from_settings(
        cls,
        settings: EventSettings,
        engine: AsyncEngine,
        *,
        on_published: Callable[[timedelta], None] | None = None,
    ) -> Relay:
        assert settings.rabbitmq_url is not None
        return cls(
            engine,
            listen_url=libpq_url(settings.database_url),
            rabbitmq_url=settings.rabbitmq_url.get_secret_value(),
            exchange=settings.events_exchange,
            on_published=on_published,
        )

    def stop(self) -> None:
        """Finish the batch in hand, then return from `run`."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        listener = asyncio.create_task(self._listen())
        try:
            await self._publish_forever()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _publish_forever(self) -> None:
        delay = 0.5
        where = f"{safe_url(self._rabbitmq_url)} exchange {self._exchange_name!r}"
        while not self._stopping.is_set():
            try:
                connection = await aio_pika.connect(
                    self._rabbitmq_url,
                    timeout=self._options.publish_timeout,
                    client_properties={
                        "connection_name": f"checkout-relay {socket.gethostname()}:{os.getpid()}"
                    },
                )
            except (OSError, AMQPError, TimeoutError) as exc:
                log.warning("relay: cannot reach RabbitMQ at %s (%s); retrying", where, _why(exc))
                await self._pause(delay)
                delay = min(delay * 2, self._options.max_reconnect_delay)
                continue
            try:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                exchange = await channel.declare_exchange(
                    self._exchange_name,
                    aio_pika.ExchangeType.TOPIC,
                    durable=True,
                    timeout=self._options.publish_timeout,
                )
                log.info("relay: publishing to %s", where)
                delay = 0.5
                await self._drain(connection, channel, exchange)
            except (BrokerLost, OSError, AMQPError, TimeoutError) as exc:
                log.warning("relay: lost RabbitMQ at %s (%s); reconnecting", where, _why(exc))
                await self._pause(delay)
                delay = min(delay * 2, self._options.max_reconnect_delay)
            finally:
                with contextlib.suppress(Exception):
                    await connection.close()

    async def _drain(
        self, connection: AbstractConnection, channel: AbstractChannel, exchange: AbstractExchange
    ) -> None:
        """Publish batches until stopped; between batches, wait for a notification or a poll."""
        delay = 0.5
        while not self._stopping.is_set():
            if connection.is_closed or channel.is_closed:
                raise BrokerLost("connection closed")
            self._wake.clear()
            try:
                claimed = await self._batch(exchange)
            except SQLAlchemyError as exc:  # a lost connection, a pool that had none to give
                cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig else exc
                log.warning("relay: database unavailable (%s); retrying", _why(cause))
                await self._pause(delay)
                delay = min(delay * 2, self._options.max_reconnect_delay)
                continue
            delay = 0.5
            self._report()
            if claimed == self._options.batch_size:
                continue  # more may be due: go round again at once
            if claimed == 0:
                # Nothing is due: wait for the next event's notification (or the poll), then
                # claim at once.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._options.poll_interval)
                continue
            # Events are coming: let the next ones gather (and the next events of the orders
            # just published, which were held back behind them, become due).
            await self._pause(self._options.gather)

    async def _batch(self, exchange: AbstractExchange) -> int:
        """Claim, publish and mark one batch, in one transaction; returns how many it claimed.
        Raises BrokerLost after recording what was confirmed, if the broker went away."""
        async with self._engine.connect() as conn, conn.begin():
            rows = (await conn.execute(_CLAIM, {"limit": self._options.batch_size})).all()
            if not rows:
                return 0
            outcomes = await asyncio.gather(
                *(self._publish(exchange, row) for row in rows), return_exceptions=True
            )
            sent: list[int] = []
            refused: list[tuple[Row[Any], Exception]] = []
            lost: list[BaseException] = []
            for row, outcome in zip(rows, outcomes, strict=True):
                if outcome is None:
                    sent.append(row.id)
                elif isinstance(outcome, _REFUSED):
                    refused.append((row, outcome))
                else:
                    lost.append(outcome)
            if sent:
                marked = await conn.execute(_PUBLISHED, {"ids": sent})
                self._published += len(sent)
                if self._on_published is not None:
                    for row in marked:
                        self._on_published(row.lag)
            if refused:
                await conn.execute(
                    _FAILED,
                    {
                        "ids": [row.id for row, _ in refused],
                        "errors": [_refusal(exc) for _, exc in refused],
                        "max_delay": self._options.max_retry_delay,
                    },
                )
                self._log_refused(refused)
        for exc in lost:
            if not isinstance(exc, Exception):
                raise exc  # KeyboardInterrupt, SystemExit: not ours to swallow
        if lost:
            raise BrokerLost(_why(lost[0])) from lost[0]
        return len(rows)

    async def _publish(self, exchange: AbstractExchange, row: Row[Any]) -> None:
        try:
            body = EventBody.of(row)
        except ValueError as exc:  # pydantic's ValidationError: a bug, kept for a fix
            raise Unpublishable(f"invalid body: {_why(exc)}") from exc
        message = aio_pika.Message(
            body.encode(),
            message_id=str(body.event_id),
            type=body.event_type,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=body.occurred_at,
        )
        await exchange.publish(
            message,
            routing_key=body.event_type,
            mandatory=True,
            timeout=self._options.publish_timeout,
        )

    def _log_refused(self, refused: Sequence[tuple[Row[Any], Exception]]) -> None:
        first, exc = refused[0]
        log.warning(
            "relay: %d event(s) not taken by the broker, kept pending and retried later (%s);"
            " first: %s %s of order %s, sequence %d",
            len(refused),
            _refusal(exc),
            first.event_type,
            first.event_id,
            first.aggregate_id,
            first.sequence,
        )

    def _report(self) -> None:
        now = time.monotonic()
        if self._published and now - self._reported_at >= 60:
            log.info(
                "relay: published %d event(s) in %.0fs", self._published, now - self._reported_at
            )
            self._published = 0
            self._reported_at = now

    async def _listen(self) -> None:
        """Set `_wake` at every notification; reconnects by itself."""
        delay = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._listen_url, autocommit=True, connect_timeout=5
                ) as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    # Whatever committed while nobody listened is claimable now.
                    self._wake.set()
                    delay = 0.5
                    while True:
                        async for _ in conn.notifies(timeout=30):
                            self._wake.set()
                        # A quiet half minute: make sure the connection is still there.
                        await conn.execute("SELECT 1")
            except Exception as exc:  # psycopg.Error, OSError: never let the listener die
                log.warning("relay: LISTEN connection lost (%s); polling meanwhile", _why(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._options.max_reconnect_delay)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)


def _refusal(exc: Exception) -> str:
    if isinstance(exc, PublishError):
        return "unroutable: no queue is bound for its routing key"
    if isinstance(exc, Unpublishable):
        return str(exc)
    return f"not confirmed by the broker: {_why(exc)}"


def _why(exc: BaseException) -> str:
    """An exception in a few words, for a log line (never a message body)."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {detail}"[:200] if detail else type(exc).__name__


async def _main(settings: EventSettings) -> None:
    engine = create_async_engine(
        settings.database_url,
        pool_size=2,
        max_overflow=0,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5, "application_name": "checkout-relay"},
        hide_parameters=True,
    )
    relay = Relay.from_settings(settings, engine)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, relay.stop)
    settle_startup_heap()
    try:
        await relay.run()
    finally:
        await engine.dispose()


def quiet_amqp_logs() -> None:
    """aiormq logs every lost connection as an error with a traceback, and every failed
    connect; the relay logs each once, in one line with the reason."""
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)


def main() -> None:
    settings = load_event_settings()
    configure_logging(settings, service="relay")
    quiet_amqp_logs()
    if settings.rabbitmq_url is None:
        print("RABBITMQ_URL is not set: there is nothing to publish to", file=sys.stderr)
        raise SystemExit(2)
    asyncio.run(_main(settings))


if __name__ == "__main__":
    main()
