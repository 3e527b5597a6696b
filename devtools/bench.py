"""`make bench`: complete checkouts against the real local stack, at several concurrencies.

Starts a fresh stack exactly as `make run` does (embedded PostgreSQL, the tuned Temporal dev
server, the Stripe stand-in, the worker and the API, each its own process) in a temporary
directory, then for each concurrency runs complete checkouts: POST /checkout, the customer's
payment through the stand-in (payment method + confirm), the stand-in's signed webhook, the
workflow committing the stock and marking the order paid. It prints:

- completed checkouts per second (first request to last order paid);
- p50/p95/p99 of POST /checkout, and of payment-to-paid (confirm answered -> order paid,
  from the order's `paid` timeline entry; one clock, one machine);
- CPU seconds per completed checkout, summed over the stack's processes (API, worker,
  Temporal, PostgreSQL and its backends, stand-in), and how they split;
- with a broker (RABBITMQ_URL, or one on 127.0.0.1:5672, as `make run` finds it), the publish
  lag of the level's order events, p50/p99 from commit (`occurred_at`) to the broker's confirm
  (`published_at`), both PostgreSQL's clock. The bench binds a queue of its own to an exchange
  of its own (so the events are routable) and drains it.

The load generator (this process) is not counted. Then, on the same dev server, the floor: the
checkout workflow's Temporal skeleton with no-op activities (devtools/bench_floor.py), which no
checkout can beat on this machine. Usage:
    python -m devtools.bench [--levels 1,10,50] [--checkouts-per-client 30] [--floor-levels 1,10]
                             [--priced-levels 10] [--ratio-rounds 3]

`--ratio-rounds` ends with the ratio at concurrency 10 measured that many times, each round's
checkouts against the mean of the floors run just before and just after them, and their median:
the figure to quote, since the speed of a shared machine drifts between the first levels and the
floor, and within minutes.
`--priced-levels` runs those concurrencies again with an address, a shipping method, a tax
rate and a promotion on every checkout, and prints their ratio to the plain run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aio_pika
import aiohttp
import psutil
import psycopg

from core.settings import DEV_ADMIN_TOKEN, DEV_STRIPE_SECRET_KEY
from devtools import bench_floor
from devtools.stack import PROJECT_ROOT, Ports, Stack

SKUS = [f"BENCH-{i:03d}" for i in range(200)]
# The priced variant: every checkout ships, is taxed and has a promotion (carts-and-pricing.md),
# seeded by `_seed` through the admin routes. The promotion has no usage limit (each of its
# uses is still reserved and committed, under its row lock).
PRICING: dict[str, object] = {
    "address": {"country": "US", "postal_code": "94107", "line1": "1 Bench St", "name": "Bench"},
    "shipping_method": "bench-standard",
    "promotion_code": "BENCH10",
}
EXTERNAL = ("DATABASE_URL", "TEMPORAL_ADDRESS", "STRIPE_SECRET_KEY", "STRIPE_API_BASE")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Level:
    concurrency: int
    checkout_ms: list[float] = field(default_factory=list)
    confirmed_at: dict[str, float] = field(default_factory=dict)  # order id -> wall clock
    started: float = 0.0
    errors: int = 0
    # CPU seconds of this process (the load generator, and the event drain it runs) while the
    # level's clients ran
    load_cpu: float = 0.0


_SELF = psutil.Process()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Cpu:
    """CPU seconds used by the stack's processes, including exited PostgreSQL backends."""

    def __init__(self, stack: Stack) -> None:
        self.roots = {c.name: psutil.Process(c.proc.pid) for c in stack.supervisor.children}

    def sample(self) -> dict[str, float]:
        used: dict[str, float] = {}
        for name, root in self.roots.items():
            total = 0.0
            for proc in [root, *root.children(recursive=True)]:
                try:
                    t = proc.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
                except psutil.NoSuchProcess:
                    pass
            used[name] = total
        return used


async def _client(
    http: aiohttp.ClientSession,
    api: str,
    stripe: str,
    level: Level,
    count: int,
    rng: random.Random,
    pricing: dict[str, object] | None = None,
) -> None:
    auth = {
        "Authorization": "Basic " + base64.b64encode(f"{DEV_STRIPE_SECRET_KEY}:".encode()).decode()
    }
    for _ in range(count):
        items = [
            {"sku": sku, "quantity": rng.randint(1, 3)}
            for sku in rng.sample(SKUS, rng.randint(1, 3))
        ]
        body = {
            "customer": {"email": f"bench{rng.randint(1, 10**9)}@example.com"},
            "items": items,
            **(pricing or {}),
        }
        t0 = time.perf_counter()
        async with http.post(f"{api}/checkout", json=body) as response:
            created = await response.json()
        level.checkout_ms.append((time.perf_counter() - t0) * 1000)
        if response.status != 201:
            level.errors += 1
            continue
        card = {
            "type": "card",
            "card[number]": "4242424242424242",
            "card[exp_month]": "12",
            "card[exp_year]": "2034",
            "card[cvc]": "123",
        }
        async with http.post(f"{stripe}/v1/payment_methods", data=card, headers=auth) as response:
            method = await response.json()
        intent = created["payment"]["payment_intent_id"]
        async with http.post(
            f"{stripe}/v1/payment_intents/{intent}/confirm",
            data={"payment_method": method["id"]},
            headers=auth,
        ) as response:
            confirmed = await response.json()
        if confirmed.get("status") != "succeeded":
            level.errors += 1
            continue
        level.confirmed_at[created["order_id"]] = time.time()


async def _wait_paid(db_url: str, order_ids: list[str], timeout: float) -> dict[str, datetime]:
    deadline = time.monotonic() + timeout
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        while True:
            rows = await (
                await conn.execute(
                    "SELECT o.id::text, e.at FROM orders o JOIN order_events e"
                    " ON e.order_id = o.id AND e.type = 'paid'"
                    " WHERE o.id = ANY(%s::uuid[]) AND o.status = 'paid'",
                    (order_ids,),
                )
            ).fetchall()
            if len(rows) == len(order_ids) or time.monotonic() > deadline:
                return {row[0]: row[1] for row in rows}
            await asyncio.sleep(0.05)


class EventDrain:
    """A queue of the bench's own, bound to every event type of its exchange, emptied as the
    relay fills it: without a queue bound the broker could route nothing."""

    def __init__(self, url: str, exchange: str) -> None:
        self.url, self.exchange = url, exchange
        self.queue = f"{exchange}.drain"
        self.received = 0

    async def declare(self) -> None:
        async with await aio_pika.connect(self.url, timeout=10) as connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(self.queue, durable=True)
            await queue.bind(exchange, routing_key="#")

    async def drain(self, until: asyncio.Event) -> None:
        async with await aio_pika.connect(self.url, timeout=10) as connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=500)
            queue = await channel.get_queue(self.queue)

            async def count(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                self.received += 1

            tag = await queue.consume(count, no_ack=True)
            await until.wait()
            await queue.cancel(tag)

    async def delete(self) -> None:
        async with await aio_pika.connect(self.url, timeout=10) as connection:
            channel = await connection.channel()
            await channel.queue_delete(self.queue)
            await channel.exchange_delete(self.exchange)


async def _publish_lag(db_url: str, order_ids: list[str], timeout: float) -> list[float]:
    """Milliseconds from commit to the broker's confirm of every event of these orders, once
    all are published (or the timeout passed: then of those that are)."""
    deadline = time.monotonic() + timeout
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        while True:
            rows = await (
                await conn.execute(
                    "SELECT extract(epoch FROM published_at - occurred_at) * 1000"
                    " FROM outbox WHERE aggregate_id = ANY(%s::uuid[])",
                    (order_ids,),
                )
            ).fetchall()
            lags = [float(row[0]) for row in rows if row[0] is not None]
            if (rows and len(lags) == len(rows)) or time.monotonic() > deadline:
                return lags
            await asyncio.sleep(0.05)


async def _run_level(
    stack: Stack,
    db_url: str,
    concurrency: int,
    per_client: int,
    cpu: Cpu,
    events: EventDrain | None,
    pricing: dict[str, object] | None = None,
) -> tuple[Level, dict[str, float], int, float, list[float]]:
    api = f"http://127.0.0.1:{stack.ports.api}"
    stripe = f"http://127.0.0.1:{stack.ports.stripe}"
    connector = aiohttp.TCPConnector(limit=concurrency * 3)
    done_draining = asyncio.Event()
    draining = asyncio.create_task(events.drain(done_draining)) if events else None
    async with aiohttp.ClientSession(connector=connector) as http:
        warm = Level(concurrency)
        await asyncio.gather(
            *(
                _client(http, api, stripe, warm, 2, random.Random(i), pricing)
                for i in range(concurrency)
            )
        )
        await _wait_paid(db_url, list(warm.confirmed_at), 60)

        level = Level(concurrency)
        before = cpu.sample()
        level.load_cpu = sum(_SELF.cpu_times()[:2])
        level.started = time.time()
        await asyncio.gather(
            *(
                _client(http, api, stripe, level, per_client, random.Random(1000 + i), pricing)
                for i in range(concurrency)
            )
        )
        # The clients' work only: the wait below polls PostgreSQL, which no checkout needs.
        level.load_cpu = sum(_SELF.cpu_times()[:2]) - level.load_cpu
        paid = await _wait_paid(db_url, list(level.confirmed_at), 120)
        after = cpu.sample()
    lags = await _publish_lag(db_url, list(paid), 60) if events else []
    done_draining.set()
    if draining is not None:
        await draining
    used = {name: after[name] - before[name] for name in after}
    finished = max((at.timestamp() for at in paid.values()), default=time.time())
    level_paid = {oid: at.timestamp() - level.confirmed_at[oid] for oid, at in paid.items()}
    level.confirmed_at = level_paid  # now: order id -> seconds from confirm to paid
    return level, used, len(paid), finished - level.started, lags


async def _seed(api: str) -> None:
    admin = {"Authorization": f"Bearer {os.environ.get('ADMIN_TOKEN', DEV_ADMIN_TOKEN)}"}
    async with aiohttp.ClientSession(headers=admin) as http:
        pricing = [
            (
                "/admin/shipping-methods/bench-standard",
                {
                    "name": "Standard",
                    "price": 700,
                    "currency": "usd",
                    "countries": ["US"],
                    "free_over": None,
                    "active": True,
                },
            ),
            ("/admin/tax-rates/US", {"rate_bps": 825, "includes_shipping": True}),
            (
                "/admin/promotions/BENCH10",
                {
                    "kind": "percent",
                    "value": 10,
                    "min_subtotal": None,
                    "starts_at": None,
                    "ends_at": None,
                    "usage_limit": None,
                    "per_customer_limit": None,
                    "active": True,
                },
            ),
        ]
        for path, body in pricing:
            async with http.put(f"{api}{path}", json=body) as response:
                response.raise_for_status()
        for sku in SKUS:
            async with http.put(
                f"{api}/admin/products/{sku}",
                json={
                    "name": sku,
                    "unit_price": 500 + hash(sku) % 5000,
                    "currency": "usd",
                    "on_hand": 10_000_000,
                },
            ) as response:
                response.raise_for_status()


@contextlib.contextmanager
def _floor_worker(stack: Stack) -> Iterator[Callable[[int], bench_floor.FloorResult]]:
    """The skeleton's worker on the stack's dev server, and a function measuring the skeleton
    at a concurrency (15 s) while it runs."""
    address = stack.env["TEMPORAL_ADDRESS"]
    worker = subprocess.Popen(
        [sys.executable, "-m", "devtools.bench_floor", "--worker", address],
        cwd=PROJECT_ROOT,
    )
    try:
        temporal = next(c for c in stack.supervisor.children if c.name == "temporal")
        processes = {
            "temporal": psutil.Process(temporal.proc.pid),
            "worker": psutil.Process(worker.pid),
        }
        yield lambda concurrency: asyncio.run(
            bench_floor.measure(address, concurrency, 15, processes)
        )
    finally:
        worker.terminate()
        worker.wait(10)


def _floor_line(result: bench_floor.FloorResult) -> str:
    split = " ".join(f"{k}={v:.1f}ms" for k, v in result.cpu_ms.items())
    return (
        f"{result.concurrency:>4} {result.per_second:>7.1f} | {result.start_p50_ms:23.1f} | "
        f"{sum(result.cpu_ms.values()) / 1000:.4f}  ({split})"
        f"  load generator={result.load_ms:.1f}ms"
    )


FLOOR_HEADER = f"{'conc':>4} {'wf/s':>7} | Update-with-Start p50 ms | CPU s/workflow  (split)"


def _floor(stack: Stack, levels: list[int]) -> dict[int, float]:
    """The same dev server running the checkout's Temporal skeleton with no-op activities."""
    print(
        "\nfloor: the same Temporal interactions with no-op activities, no API, database or"
        f" Stripe\n{FLOOR_HEADER}"
    )
    rates: dict[int, float] = {}
    with _floor_worker(stack) as measure:
        for concurrency in levels:
            result = measure(concurrency)
            rates[concurrency] = result.per_second
            print(_floor_line(result), flush=True)
    return rates


def _ratio_rounds(
    stack: Stack,
    db_url: str,
    concurrency: int,
    rounds: int,
    args: argparse.Namespace,
    cpu: Cpu,
    events: EventDrain | None,
) -> None:
    """The ratio measured `rounds` times, each round's checkouts between two floors: the speed
    of a shared machine drifts by tens of percent within minutes, and a ratio of two figures
    taken minutes apart measures that drift as much as the checkout. Each round's checkouts
    are compared with the mean of the floor measured just before and just after them (floor,
    checkouts, floor, checkouts, ..., floor), so that a drift steady over the round cancels
    out. Prints each round's ratio and their median."""
    print(
        f"\nratio at concurrency {concurrency}, {rounds} rounds of checkouts, each between two"
        " floors (each its own figures)"
    )

    def floor() -> float:
        with _floor_worker(stack) as measure:
            result = measure(concurrency)
        print(f"{'':>4} floor {_floor_line(result).strip()}", flush=True)
        return result.per_second

    ratios: list[float] = []
    before = floor()
    for number in range(1, rounds + 1):
        rate = _level(stack, db_url, concurrency, args, cpu, events, per_client=30)
        after = floor()
        ratios.append(rate / statistics.mean((before, after)))
        print(
            f"{'':>4} round {number}: {rate:.1f} / mean({before:.1f}, {after:.1f}) ="
            f" {ratios[-1]:.2f}",
            flush=True,
        )
        before = after
    print(
        f"median ratio at concurrency {concurrency}: {statistics.median(ratios):.2f}"
        f" (rounds: {', '.join(f'{r:.2f}' for r in ratios)})",
        flush=True,
    )


def _level(
    stack: Stack,
    db_url: str,
    concurrency: int,
    args: argparse.Namespace,
    cpu: Cpu,
    events: EventDrain | None,
    pricing: dict[str, object] | None = None,
    per_client: int | None = None,
) -> float:
    """Run one level and print its line; returns its checkouts per second."""
    per_client = args.checkouts_per_client or per_client or max(3, min(60, 600 // concurrency))
    level, used, done, elapsed, lags = asyncio.run(
        _run_level(stack, db_url, concurrency, per_client, cpu, events, pricing)
    )
    ms = level.checkout_ms
    paid_ms = [s * 1000 for s in level.confirmed_at.values()]
    total_cpu = sum(used.values())
    split = " ".join(f"{k}={v / max(done, 1) * 1000:.1f}ms" for k, v in used.items())
    print(
        f"{concurrency:>4} {done:>5} {done / elapsed:>7.1f} | "
        f"{_pct(ms, 50):6.1f} {_pct(ms, 95):6.1f} {_pct(ms, 99):6.1f} | "
        f"{_pct(paid_ms, 50):6.1f} {_pct(paid_ms, 95):6.1f} {_pct(paid_ms, 99):6.1f} | "
        f"{total_cpu / max(done, 1):.4f}  ({split})"
        + f"  load generator={level.load_cpu / max(done, 1) * 1000:.1f}ms"
        + (f"  errors={level.errors}" if level.errors else ""),
        flush=True,
    )
    if events is not None:
        print(
            f"{'':>4} events: {len(lags)} published, lag commit->confirm ms"
            f" p50 {_pct(lags, 50):.1f} p99 {_pct(lags, 99):.1f}"
            f" max {max(lags, default=float('nan')):.1f}"
            f" (drained {events.received} so far)",
            flush=True,
        )
    return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description="complete checkouts against the local stack")
    parser.add_argument("--levels", default="1,10,50")
    parser.add_argument("--checkouts-per-client", type=int, default=0, help="default: by level")
    parser.add_argument(
        "--floor-levels",
        default="1,10",
        help="concurrencies for the Temporal skeleton (devtools/bench_floor.py); '' to skip",
    )
    parser.add_argument(
        "--priced-levels",
        default="10",
        help="concurrencies to run again with shipping, tax and a promotion on every checkout,"
        " compared with the plain run; '' to skip",
    )
    parser.add_argument(
        "--ratio-rounds",
        type=int,
        default=3,
        help="rounds of checkouts between floors at concurrency 10 (median ratio); 0 to skip",
    )
    args = parser.parse_args()
    for name in EXTERNAL:
        os.environ.pop(name, None)
    os.environ["API_ACCESS_LOG"] = "false"
    # All the load comes from this one address: a rate limit that fits it (each simulated
    # customer has one checkout at a time, so MAX_PENDING_CHECKOUTS keeps its default).
    os.environ["RATE_LIMIT_CHECKOUTS"] = "100000000/minute"
    # An exchange of the bench's own on whatever broker `make run` would use: other stacks on
    # the same broker neither see its events nor send it theirs.
    os.environ["EVENTS_EXCHANGE"] = f"checkout.events.bench-{uuid.uuid4().hex[:8]}"
    # The worker's metrics endpoint on a port of its own: a `make run` may hold the default.
    os.environ.setdefault("WORKER_METRICS_PORT", str(_free_port()))

    with tempfile.TemporaryDirectory(prefix="checkout-bench-") as tmp:
        ports = Ports(
            api=_free_port(), postgres=_free_port(), temporal=_free_port(),
            temporal_ui=_free_port(), stripe=_free_port(),
            rabbitmq=int(os.environ.get("DEV_RABBITMQ_PORT", "5672")),
        )  # fmt: skip
        stack = Stack(Path(tmp) / "data", ports, keep_stripe_state=False, quiet=True)
        try:
            print("starting the stack...", flush=True)
            stack.up()
            db_url = stack.env["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
            events = None
            if stack.env.get("RABBITMQ_URL"):
                events = EventDrain(stack.env["RABBITMQ_URL"], stack.env["EVENTS_EXCHANGE"])
                asyncio.run(events.declare())
            else:
                print("no RabbitMQ: order events are kept, publish lag not measured")
            asyncio.run(_seed(f"http://127.0.0.1:{ports.api}"))
            cpu = Cpu(stack)
            rates: dict[int, float] = {}
            print(
                f"\n{'conc':>4} {'done':>5} {'co/s':>7} | POST /checkout ms p50/p95/p99 "
                f"| payment->paid ms p50/p95/p99 | CPU s/checkout  (split)"
            )
            for concurrency in [int(x) for x in args.levels.split(",") if x]:
                rates[concurrency] = _level(stack, db_url, concurrency, args, cpu, events)
            priced: dict[int, float] = {}
            for concurrency in [int(x) for x in args.priced_levels.split(",") if x]:
                print(f"{'':>4} priced: shipping, tax and promotion {PRICING['promotion_code']}")
                priced[concurrency] = _level(
                    stack, db_url, concurrency, args, cpu, events, pricing=PRICING
                )
            for concurrency in sorted(priced.keys() & rates.keys()):
                print(
                    f"priced/plain at concurrency {concurrency}: {priced[concurrency]:.1f} /"
                    f" {rates[concurrency]:.1f} checkouts/s ="
                    f" {priced[concurrency] / rates[concurrency]:.2f}",
                    flush=True,
                )
            if args.floor_levels:
                floor = _floor(stack, [int(x) for x in args.floor_levels.split(",")])
                print()
                for concurrency in sorted(rates.keys() & floor.keys()):
                    print(
                        f"ratio at concurrency {concurrency}: {rates[concurrency]:.1f} checkouts/s"
                        f" / {floor[concurrency]:.1f} floor workflows/s ="
                        f" {rates[concurrency] / floor[concurrency]:.2f}",
                        flush=True,
                    )
            if args.ratio_rounds:
                _ratio_rounds(stack, db_url, 10, args.ratio_rounds, args, cpu, events)
            print(f"\nmachine: {os.cpu_count()} cores, shared by the stack and this load generator")
        finally:
            stack.supervisor.stop_all()
            if stack.env.get("RABBITMQ_URL"):
                with contextlib.suppress(Exception):
                    asyncio.run(
                        EventDrain(stack.env["RABBITMQ_URL"], stack.env["EVENTS_EXCHANGE"]).delete()
                    )


if __name__ == "__main__":
    main()
