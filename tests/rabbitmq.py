"""The machine's real RabbitMQ for the tests: a consumer of a test's own exchange, relay
processes (`python -m core.relay`), a TCP proxy to cut connections, and `rabbitmqctl`.

Every test uses its own exchange, queue (and, to close connections by force, vhost) names, so
parallel sessions on one broker never meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


def unique(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:10]}"


async def require_rabbitmq(url: str = RABBITMQ_URL) -> str:
    """The broker's URL; CI fails without one, a developer's run skips."""
    try:
        connection = await aio_pika.connect(url, timeout=5)
    except Exception as exc:
        why = f"RabbitMQ is not reachable at {url} ({type(exc).__name__}: {exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    await connection.close()
    return url


async def rabbitmqctl(*args: str) -> str:
    """Run `rabbitmqctl` (root, on this machine): CI fails without it, a developer skips."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "rabbitmqctl", *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    except FileNotFoundError:
        if os.environ.get("CI") == "true":
            pytest.fail("rabbitmqctl is not installed")
        pytest.skip("rabbitmqctl is not installed")
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    return out.decode()


@contextlib.asynccontextmanager
async def scratch_vhost(base_url: str) -> AsyncIterator[tuple[str, str]]:
    """A vhost of the test's own, so that closing every connection of it by force closes only
    the test's; yields its name and URL."""
    name = unique("checkout-test")
    await rabbitmqctl("add_vhost", name)
    try:
        await rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name, base_url.rstrip("/") + "/" + name
    finally:
        await rabbitmqctl("delete_vhost", name)


@dataclass(frozen=True)
class Received:
    routing_key: str
    message_id: str | None
    type: str | None
    content_type: str | None
    delivery_mode: int
    timestamp: datetime | None
    body: dict[str, Any]

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> Received:
        return cls(
            routing_key=message.routing_key or "",
            message_id=message.message_id,
            type=message.type,
            content_type=message.content_type,
            delivery_mode=int(message.delivery_mode or 0),
            timestamp=message.timestamp,
            body=json.loads(message.body),
        )


class Consumer:
    """A durable queue bound to `order.*` of the exchange, as a downstream service binds it."""

    def __init__(self, url: str, exchange: str, queue: str) -> None:
        self.url = url
        self.exchange_name = exchange
        self.queue_name = queue
        self.received: list[Received] = []
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None

    async def bind(self) -> None:
        self._connection = await aio_pika.connect(self.url, timeout=10)
        channel = await self._connection.channel()
        # The same declaration as the relay's, or the broker refuses the second one.
        exchange = await channel.declare_exchange(
            self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        self._queue = await channel.declare_queue(self.queue_name, durable=True)
        await self._queue.bind(exchange, routing_key="order.*")

    async def consume(self) -> None:
        """Collect messages as they arrive, acknowledging each."""
        assert self._queue is not None

        async def on_message(message: AbstractIncomingMessage) -> None:
            self.received.append(Received.of(message))
            await message.ack()

        await self._queue.consume(on_message)

    async def drain(self) -> None:
        """Read everything the queue holds now (after a test's faults), oldest first."""
        await self.close_connection()
        await self.bind()
        assert self._queue is not None
        while (message := await self._queue.get(fail=False, timeout=10)) is not None:
            self.received.append(Received.of(message))
            await message.ack()

    async def wait_for(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            assert time.monotonic() < deadline, f"{len(self.received)} of {count} received"
            await asyncio.sleep(0.05)

    async def close_connection(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        self._connection = self._queue = None

    async def delete(self) -> None:
        """Remove the test's queue and exchange from the broker."""
        await self.close_connection()
        with contextlib.suppress(Exception):
            connection = await aio_pika.connect(self.url, timeout=10)
            async with connection:
                channel = await connection.channel()
                await channel.queue_delete(self.queue_name)
                await channel.exchange_delete(self.exchange_name)


class RelayProcess:
    """`python -m core.relay`, as an operator runs it, its output in a file."""

    def __init__(self, log_path: Path, database_url: str, rabbitmq_url: str, exchange: str):
        self.log_path = log_path
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "RABBITMQ_URL": rabbitmq_url,
            "EVENTS_EXCHANGE": exchange,
            "PYTHONUNBUFFERED": "1",
        }
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "core.relay"],
                cwd=PROJECT_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_log(self, text: str, timeout: float = 30, after: int = 0) -> None:
        """Until the relay has logged `text` (past the first `after` characters)."""
        deadline = time.monotonic() + timeout
        while text not in self.log()[after:]:
            assert self.proc.poll() is None, f"relay exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"relay never logged {text!r}:\n{self.log()}"
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


class TcpProxy:
    """Forwards a local port to a server; `cut()` drops every connection through it, as a
    restart of the server would, and it can be started late (nothing listens before)."""

    def __init__(self, port: int, upstream_host: str, upstream_port: int) -> None:
        self.port = port
        self.upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._tasks.update(pipes)
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for end in (writer, up_writer):
            end.close()
            self._writers.discard(end)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    def cut(self) -> int:
        """Close every connection now; new ones are still accepted. Returns how many."""
        cut = len(self._writers)
        for writer in list(self._writers):
            transport = writer.transport
            transport.abort()
        self._writers.clear()
        return cut // 2

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


async def poll(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Await `check()` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(interval)
