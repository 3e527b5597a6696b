"""The Temporal worker: `python worker.py`. Wires settings -> engine, Stripe -> worker."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from datetime import timedelta

from temporalio.client import Client
from temporalio.runtime import Runtime
from temporalio.worker import Interceptor, UnsandboxedWorkflowRunner, Worker, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.orders import OrderActivities
from activities.payments import PaymentActivities
from activities.reconcile import ReconcileActivities
from activities.refunds import RefundActivities
from core.carts import CartStore
from core.checkout_keys import CheckoutKeyStore
from core.db import SessionFactory, create_engine, create_session_factory
from core.heap import settle_startup_heap
from core.ledger import StockLedger
from core.logs import configure_logging
from core.metrics import ActivityTelemetry, WorkerMetrics
from core.orders import OrderStore
from core.reconciliation import ReconciliationStore
from core.relay import Relay, quiet_amqp_logs
from core.schedules import ensure_reconciler_schedule
from core.sealing import Sealer
from core.settings import Settings, load_settings
from core.stripe_gateway import StripeGateway, create_gateway
from core.temporal import connect, create_runtime
from core.tracing import Tracing
from workflows.checkout import CheckoutWorkflow
from workflows.reconciler import ReconcilerWorkflow, SettleLostCheckoutWorkflow
from workflows.refund import LatePaymentWorkflow, RefundWorkflow

log = logging.getLogger("worker")


def build_worker(
    settings: Settings,
    client: Client,
    sessions: SessionFactory,
    gateway: StripeGateway,
    interceptors: Sequence[Interceptor] = (),
    metrics: WorkerMetrics | None = None,
) -> Worker:
    """`metrics` defaults to the client's runtime's (a no-op meter when it has no metrics
    configured); pass one to share it (the outbox relay's publish lag)."""
    if metrics is None:
        runtime = client.service_client.config.runtime or Runtime.default()
        metrics = WorkerMetrics(runtime.metric_meter)
    orders = OrderStore(sessions, StockLedger(sessions))
    order_activities = OrderActivities(orders)
    payments = PaymentActivities(
        gateway, orders, Sealer(settings.secret_key.get_secret_value()), metrics
    )
    refunds = RefundActivities(gateway, orders)
    reconcile = ReconcileActivities(
        ReconciliationStore(sessions),
        CheckoutKeyStore(sessions),
        orders,
        payments,
        gateway,
        client,
        CartStore(sessions, ttl_seconds=settings.cart_ttl),
    )
    return Worker(
        client,
        task_queue=settings.temporal_task_queue,
        workflows=[
            CheckoutWorkflow,
            RefundWorkflow,
            LatePaymentWorkflow,
            ReconcilerWorkflow,
            SettleLostCheckoutWorkflow,
        ],
        activities=[
            order_activities.open_order,
            order_activities.close_order,
            order_activities.record_order_event,
            payments.create_payment_intent,
            payments.cancel_payment_intent,
            payments.settle_payment,
            refunds.refund_order,
            refunds.refund_late_payment,
            reconcile.find_stale_checkouts,
            reconcile.settle_stale_checkout,
            reconcile.forget_expired_keys,
        ],
        graceful_shutdown_timeout=timedelta(seconds=10),
        # Besides these, the client's (tracing) apply, outermost.
        interceptors=[ActivityTelemetry(metrics), *interceptors],
        workflow_runner=workflow_runner(settings),
    )


def workflow_runner(settings: Settings) -> WorkflowRunner:
    if not settings.temporal_workflow_sandbox:
        return UnsandboxedWorkflowRunner()
    # Libraries are stateless here: passing them through saves re-importing each of them for
    # every new checkout, while the workflow module itself stays isolated and checked.
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_all_modules()
    )


async def main() -> None:
    settings = load_settings()
    configure_logging(settings, service="worker")
    quiet_amqp_logs()
    tracing = Tracing.from_environment("checkout-worker")
    tracing.instrument_clients()
    metrics_address = (
        f"{settings.worker_metrics_host}:{settings.worker_metrics_port}"
        if settings.worker_metrics_port
        else None
    )
    try:
        runtime = create_runtime(metrics_address=metrics_address)
    except ValueError as exc:  # the SDK says why (the port is taken, say)
        log.error("cannot serve metrics on %s (WORKER_METRICS_PORT): %s", metrics_address, exc)
        raise SystemExit(2) from None
    engine = create_engine(settings)
    client = await connect(settings, interceptors=[tracing.temporal_interceptor()], runtime=runtime)
    await ensure_reconciler_schedule(client, settings)
    gateway = create_gateway(settings)
    metrics = WorkerMetrics(runtime.metric_meter)
    worker = build_worker(
        settings, client, create_session_factory(engine), gateway, metrics=metrics
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    # The outbox relay shares the worker's process and engine (see the README's design
    # decisions); `python -m core.relay` runs the same code on its own.
    relay = (
        Relay.from_settings(settings, engine, on_published=metrics.outbox_published)
        if settings.rabbitmq_url
        else None
    )
    if relay is None:
        log.info("RABBITMQ_URL is not set: order events are kept, served by GET /admin/events")

    settle_startup_heap()
    async with worker:
        log.info(
            "worker polling task queue %r; metrics on %s",
            settings.temporal_task_queue,
            f"http://{metrics_address}/metrics" if metrics_address else "no port",
        )
        publishing = asyncio.create_task(relay.run()) if relay else None
        if publishing is not None:
            # A relay that fails on a bug stops the worker (exit 1) rather than silently
            # leaving events unpublished.
            publishing.add_done_callback(lambda _: stop.set())
        await stop.wait()
        log.info("shutting down: finishing running activities")
        if relay is not None and publishing is not None:
            relay.stop()
            await publishing
    await gateway.aclose()
    await engine.dispose()
    tracing.shutdown()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:  # it has no Windows build
        asyncio.run(main())
    else:
        # A faster event loop: the SDK hands every task between its core and Python through
        # the loop, and uvloop cut the worker's CPU per checkout by about a tenth here.
        uvloop.run(main())
