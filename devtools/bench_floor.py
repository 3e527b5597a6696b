"""The floor under `make bench`: what Temporal and its Python SDK cost for the checkout's shape.

A skeleton with the checkout workflow's Temporal interactions and none of its work: started
with Update-with-Start (search attributes, a static summary), two local activities before the
update answers, a status search attribute upserted, a durable timer raced by a signal, one more
local activity, another upsert, done. The activities do nothing; no HTTP API, database or
Stripe is involved; the load generator speaks to Temporal directly.

`make bench` runs it on the same dev server after the checkouts: no checkout can be faster or
cheaper than its skeleton on the same machine. The skeleton's worker is its own process (this
module with `--worker`), so that its CPU is counted apart from the load generator's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import psutil
from temporalio import activity, workflow
from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import (
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
)
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from core.heap import settle_startup_heap

TASK_QUEUE = "bench-floor"
STATUS = SearchAttributeKey.for_keyword("CheckoutStatus")


@activity.defn(name="floor_noop")
async def noop(step: int) -> int:
    return step


@workflow.defn(name="FloorSkeleton")
class FloorSkeleton:
    def __init__(self) -> None:
        self._opened = False
        self._paid = False

    @workflow.run
    async def run(self) -> str:
        for step in (1, 2):  # open the order; create the PaymentIntent
            await workflow.execute_local_activity(
                noop, step, start_to_close_timeout=timedelta(seconds=5)
            )
        self._opened = True
        workflow.upsert_search_attributes([STATUS.value_set("pending_payment")])
        try:
            await workflow.wait_condition(lambda: self._paid, timeout=timedelta(minutes=15))
        except TimeoutError:
            return "expired"
        await workflow.execute_local_activity(noop, 3, start_to_close_timeout=timedelta(seconds=5))
        workflow.upsert_search_attributes([STATUS.value_set("paid")])
        return "paid"

    @workflow.update
    async def start(self) -> str:
        await workflow.wait_condition(lambda: self._opened)
        return "opened"

    @workflow.signal
    def paid(self) -> None:
        self._paid = True


@dataclass(frozen=True)
class FloorResult:
    concurrency: int
    per_second: float
    start_p50_ms: float
    cpu_ms: dict[str, float]  # per completed skeleton, by process
    load_ms: float  # per completed skeleton, of the process driving them (the load generator)


async def _one(client: Client, latencies: list[float]) -> None:
    workflow_id = f"floor-{uuid.uuid4()}"
    operation = WithStartWorkflowOperation(
        FloorSkeleton.run,
        id=workflow_id,
        task_queue=TASK_QUEUE,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        search_attributes=TypedSearchAttributes([SearchAttributePair(STATUS, "started")]),
        static_summary="bench floor",
    )
    started = time.perf_counter()
    await client.execute_update_with_start_workflow(
        FloorSkeleton.start, start_workflow_operation=operation
    )
    latencies.append((time.perf_counter() - started) * 1000)
    handle = client.get_workflow_handle(workflow_id)
    await handle.signal(FloorSkeleton.paid)
    await handle.result()


async def measure(
    address: str, concurrency: int, seconds: float, processes: dict[str, psutil.Process]
) -> FloorResult:
    client = await Client.connect(address)

    async def loop(until: float, latencies: list[float], done: list[int]) -> None:
        while time.monotonic() < until:
            await _one(client, latencies)
            done[0] += 1

    warm: list[float] = []
    await asyncio.gather(*(loop(time.monotonic() + 2, warm, [0]) for _ in range(concurrency)))
    latencies: list[float] = []
    counts = [[0] for _ in range(concurrency)]
    before = {name: sum(p.cpu_times()[:2]) for name, p in processes.items()}
    load = psutil.Process()
    load_before = sum(load.cpu_times()[:2])
    began = time.monotonic()
    await asyncio.gather(*(loop(began + seconds, latencies, counts[i]) for i in range(concurrency)))
    elapsed = time.monotonic() - began
    done = sum(c[0] for c in counts)
    cpu = {
        name: (sum(p.cpu_times()[:2]) - before[name]) / done * 1000 for name, p in processes.items()
    }
    load_ms = (sum(load.cpu_times()[:2]) - load_before) / done * 1000
    return FloorResult(concurrency, done / elapsed, statistics.median(latencies), cpu, load_ms)


async def serve(address: str) -> None:
    client = await Client.connect(address)
    worker = Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=[FloorSkeleton],
        activities=[noop],
        # As the service's worker runs by default.
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    # As the service's worker settles its heap once built (core/heap.py).
    settle_startup_heap()
    await worker.run()


def main() -> None:
    parser = argparse.ArgumentParser(description="the skeleton's worker")
    parser.add_argument("--worker", required=True, metavar="TEMPORAL_ADDRESS")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # it has no Windows build
        asyncio.run(serve(args.worker))
    else:
        uvloop.run(serve(args.worker))


if __name__ == "__main__":
    main()
