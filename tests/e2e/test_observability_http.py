"""Logs, traces and the worker's metrics of real checkouts, on a stack wired as the processes are:
the API and the worker traced (an in-memory exporter installed before anything is instrumented),
the worker's runtime serving its Prometheus endpoint."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from core.db import SessionFactory
from core.logs import ContextFilter, json_formatter
from core.settings import DEV_SECRET_KEY, Settings
from core.temporal import create_runtime
from core.tracing import Tracing
from tests.conftest import free_port
from tests.e2e.stack import ADMIN, DECLINED_CARD, Stack, running_stack, sign, stack_settings

pytestmark = pytest.mark.e2e


class Observed:
    def __init__(self, stack: Stack, spans: InMemorySpanExporter, metrics_url: str) -> None:
        self.stack = stack
        self.spans = spans
        self.metrics_url = metrics_url


@pytest.fixture(scope="module")
async def observed(settings: Settings, temporal_address: str) -> AsyncIterator[Observed]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    # Before anything opens a connection or an HTTP session: as python -m api and worker.py do.
    tracing.instrument_clients()
    port = free_port()
    runtime = create_runtime(metrics_address=f"127.0.0.1:{port}")
    try:
        async with running_stack(
            stack_settings(settings, "obs", temporal_address), tracing=tracing, runtime=runtime
        ) as stack:
            yield Observed(stack, exporter, f"http://127.0.0.1:{port}/metrics")
    finally:
        tracing.uninstrument_clients()
        provider.shutdown()


@pytest.fixture
def obs(observed: Observed, db: SessionFactory) -> Observed:
    """The observed stack over empty tables, with no span recorded yet."""
    observed.spans.clear()
    return observed


class Capture(logging.Handler):
    """Every record at INFO and above, and the JSON line the service would write for it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []
        self.addFilter(ContextFilter())
        self.setFormatter(json_formatter("test"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


@pytest.fixture
def captured() -> Iterator[Capture]:
    capture = Capture()
    root = logging.getLogger()
    uvicorn, access = logging.getLogger("uvicorn"), logging.getLogger("uvicorn.access")
    saved = root.level, access.level, access.propagate, uvicorn.propagate
    root.addHandler(capture)
    # The stack's uvicorn logs at WARNING, to handlers of its own: here every line reaches the
    # root logger, as under python -m api (core/logs.py).
    root.setLevel(logging.INFO)
    access.setLevel(logging.INFO)
    access.propagate = uvicorn.propagate = True
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(saved[0])
        access.setLevel(saved[1])
        access.propagate, uvicorn.propagate = saved[2], saved[3]


async def put_product(stack: Stack, sku: str, on_hand: int = 10) -> None:
    response = await stack.api.put(
        f"/admin/products/{sku}",
        json={"name": sku, "unit_price": 1200, "currency": "usd", "on_hand": on_hand},
        headers=ADMIN,
    )
    assert response.status_code == 200, response.text


async def start_checkout(stack: Stack, sku: str, key: str | None = None) -> dict[str, Any]:
    response = await stack.api.post(
        "/checkout",
        json={"customer": {"email": "ada@example.com"}, "items": [{"sku": sku, "quantity": 1}]},
        headers={"Idempotency-Key": key or str(uuid.uuid4())},
    )
    assert response.status_code in (200, 201), response.text
    return response.json()  # type: ignore[no-any-return]


async def test_no_secret_reaches_a_log_line_and_lines_carry_their_ids(
    obs: Observed, captured: Capture
) -> None:
    stack = obs.stack
    await put_product(stack, "LOG-1")
    key = str(uuid.uuid4())
    paid = await start_checkout(stack, "LOG-1", key)
    replayed = await start_checkout(stack, "LOG-1", key)
    assert replayed["payment"]["client_secret"] == paid["payment"]["client_secret"]
    owner = {"Authorization": f"Bearer {paid['access_token']}"}
    assert (await stack.api.get(f"/orders/{paid['order_id']}", headers=owner)).status_code == 200
    response = await stack.stripe.pay(paid["payment"]["payment_intent_id"])
    assert response.status_code == 200, response.text
    await stack.wait_for_order(paid["order_id"], "paid")

    declined = await start_checkout(stack, "LOG-1")
    await stack.stripe.pay(declined["payment"]["payment_intent_id"], card=DECLINED_CARD)
    declined_owner = {"Authorization": f"Bearer {declined['access_token']}"}
    cancel = await stack.api.post(f"/orders/{declined['order_id']}/cancel", headers=declined_owner)
    assert cancel.status_code == 200, cancel.text
    # A forged webhook and a wrong credential are logged as refusals, without what was sent.
    forged = await stack.post_webhook(
        {"id": "evt_forged", "type": "payment_intent.succeeded"},
        signature=sign(b"{}", "whsec_wrong"),
    )
    assert forged.status_code == 400
    wrong = await stack.api.get("/orders", headers={"Authorization": "Bearer ot_" + "x" * 64})
    assert wrong.status_code == 401
    await asyncio.sleep(0.5)  # the last activities' and workflow tasks' lines

    settings = stack.settings
    secrets = {
        "client_secret": paid["payment"]["client_secret"],
        "declined client_secret": declined["payment"]["client_secret"],
        "access_token": paid["access_token"],
        "declined access_token": declined["access_token"],
        "admin token": settings.admin_token.get_secret_value(),
        "webhook secret": settings.stripe_webhook_secret.get_secret_value(),
        "Stripe key": settings.stripe_secret_key.get_secret_value(),
        "SECRET_KEY": DEV_SECRET_KEY,
    }
    assert all(secrets.values())
    assert len(captured.lines) > 20
    for name, secret in secrets.items():
        # What a line would say, and everything its record holds before formatting (message,
        # arguments, extras, exception text): nothing logs a secret, masked or not.
        assert [line for line in captured.lines if secret in line] == [], name
        raw = [r.getMessage() + repr(r.__dict__) for r in captured.records]
        assert [text for text in raw if secret in text] == [], name

    by_logger: dict[str, list[logging.LogRecord]] = {}
    for record in captured.records:
        by_logger.setdefault(record.name, []).append(record)
    ids = {"checkout_id": paid["checkout_id"], "order_id": paid["order_id"]}
    # The API's lines: the access log and the service's own, with the request id and the
    # checkout's ids once the service knows them.
    api_lines = [r for r in by_logger["api.services.checkout"] if r.__dict__.get("request_id")]
    assert any(_has(r, ids, workflow_id=f"checkout-{paid['checkout_id']}") for r in api_lines)
    assert all(r.__dict__.get("request_id") for r in by_logger["uvicorn.access"])
    # The workflow's lines (workflow.logger): the ids in its extra, the workflow id the SDK's.
    assert any(
        _has(r, ids, workflow_id=f"checkout-{paid['checkout_id']}")
        for r in by_logger["temporalio.workflow"]
    )
    # And in the trace: API lines carry the request's trace id.
    assert any(r.__dict__.get("trace_id") for r in api_lines)


def _has(record: logging.LogRecord, ids: dict[str, str], **more: str) -> bool:
    return all(record.__dict__.get(name) == value for name, value in {**ids, **more}.items())


async def _spans_until(obs: Observed, done: Any, timeout: float = 10) -> list[ReadableSpan]:
    deadline = time.monotonic() + timeout
    while True:
        spans = list(obs.spans.get_finished_spans())
        if done(spans) or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.1)


def _named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def _ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    names = []
    parent = span.parent
    while parent is not None and parent.span_id in by_id:
        span = by_id[parent.span_id]
        names.append(span.name)
        parent = span.parent
    return names


async def test_one_trace_from_post_checkout_to_the_database_and_stripe(obs: Observed) -> None:
    stack = obs.stack
    await put_product(stack, "TRACE-1")
    created = await start_checkout(stack, "TRACE-1")
    await stack.stripe.pay(created["payment"]["payment_intent_id"])
    await stack.wait_for_order(created["order_id"], "paid")
    spans = await _spans_until(obs, lambda s: bool(_named(s, "RunActivity:settle_payment")))

    (post,) = _named(spans, "POST /checkout")
    trace = [span for span in spans if span.context.trace_id == post.context.trace_id]
    by_id = {span.context.span_id: span for span in trace}
    names = {span.name for span in trace}
    assert {
        "StartUpdateWithStartWorkflow:CheckoutWorkflow",
        "RunWorkflow:CheckoutWorkflow",
        "StartActivity:open_order",
        "RunActivity:open_order",
        "StartActivity:create_payment_intent",
        "RunActivity:create_payment_intent",
        "HandleSignal:payment_event",
        "RunActivity:settle_payment",
    } <= names, names
    (run,) = _named(trace, "RunWorkflow:CheckoutWorkflow")
    assert "POST /checkout" in _ancestors(run, by_id)

    # The activities' own calls: SQL statements and the Stripe requests, under their activity.
    statements = [s for s in trace if (s.attributes or {}).get("db.system") == "postgresql"]
    assert any("RunActivity:open_order" in _ancestors(s, by_id) for s in statements)
    stripe_calls = [s for s in trace if s.kind == SpanKind.CLIENT and s.name.startswith("POST")]
    assert any("RunActivity:create_payment_intent" in _ancestors(s, by_id) for s in stripe_calls)
    settled = _named(trace, "RunActivity:settle_payment")[0]
    assert any(
        settled.name in _ancestors(s, by_id)
        for s in trace
        if s.kind == SpanKind.CLIENT and s.name.startswith("GET")
    ), "settling reads the PaymentIntent back from Stripe"
    # Statements without their bound values: no customer data, no secret in a span.
    for value in ("ada@example.com", created["payment"]["client_secret"]):
        assert not any(value in str(s.attributes) for s in trace)

    # The webhook: its own request trace, whose signal the checkout's HandleSignal links to.
    webhooks = _named(spans, "POST /webhooks/stripe")
    signals = [
        s
        for s in spans
        if s.name == "SignalWorkflow:payment_event"
        and any(s.parent and s.parent.span_id == w.context.span_id for w in webhooks)
    ]
    assert signals
    linked = {
        link.context.span_id
        for h in _named(trace, "HandleSignal:payment_event")
        for link in h.links
    }
    assert linked & {s.context.span_id for s in signals}


def _samples(text: str, name: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            found[labels] = float(value)
    return found


async def test_the_worker_serves_the_sdk_metrics_and_its_own(obs: Observed) -> None:
    stack = obs.stack
    await put_product(stack, "METRIC-1")
    created = await start_checkout(stack, "METRIC-1")
    await stack.stripe.pay(created["payment"]["payment_intent_id"])
    await stack.wait_for_order(created["order_id"], "paid")
    refused = await stack.api.post(
        "/checkout",
        json={
            "customer": {"email": "ada@example.com"},
            "items": [{"sku": "METRIC-1", "quantity": 99}],
        },
    )
    assert refused.status_code == 409

    deadline = time.monotonic() + 10
    while True:
        async with httpx.AsyncClient(timeout=5) as http:
            text = (await http.get(obs.metrics_url)).text
        completed = _samples(text, "checkout_completed_total")
        if (
            any('outcome="paid"' in k for k in completed)
            and any('outcome="rejected"' in k for k in completed)
        ) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert any('outcome="paid"' in k and 'workflow_type="CheckoutWorkflow"' in k for k in completed)
    assert any('outcome="rejected"' in k for k in completed)
    runs = _samples(text, "checkout_activity_runs_total")
    assert any('activity_type="open_order"' in k and 'outcome="completed"' in k for k in runs)
    assert any(
        'activity_type="open_order"' in k
        and 'outcome="failed_final"' in k
        and 'error="insufficient_stock"' in k
        for k in runs
    )
    assert sum(_samples(text, "checkout_payment_to_paid_seconds_count").values()) >= 1
    assert _samples(text, "checkout_activity_duration_seconds_count")
    # The SDK's own, with the names the alert rules use.
    assert _samples(text, "temporal_workflow_completed_total")
    assert _samples(text, "temporal_workflow_task_execution_latency_count")

    api = (await stack.api.get("/metrics")).text
    assert _samples(api, "checkout_started_total")
    assert any('reason="insufficient_stock"' in k for k in _samples(api, "checkout_refused_total"))
    webhooks = _samples(api, "checkout_webhook_events_total")
    assert any('type="payment_intent.succeeded"' in k and 'outcome="acted"' in k for k in webhooks)
