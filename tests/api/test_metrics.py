"""GET /metrics and the per-request telemetry: request ids, route templates, refusals counted."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
from pydantic import SecretStr

from api.client_address import rate_limit_identity
from api.metrics import OutboxBacklog
from api.ratelimit import CheckoutLimiter
from core.settings import Settings
from tests.conftest import running_app
from tests.e2e.stack import sign


def samples(text: str, name: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            labels, _, value = line.rpartition(" ")
            found[labels.removeprefix(name)] = float(value)
    return found


async def scrape(api: httpx.AsyncClient) -> str:
    response = await api.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def test_latency_is_labelled_by_route_template_never_by_path(api: httpx.AsyncClient) -> None:
    for sku in ("MUG-1", "MUG-2", "MUG-3"):
        assert (await api.get(f"/inventory/{sku}")).status_code == 404
    assert (await api.get(f"/nowhere/{uuid.uuid4()}")).status_code == 404
    counts = samples(await scrape(api), "http_request_duration_seconds_count")
    assert counts['{method="GET",route="/inventory/{sku}",status="404"}'] == 3
    assert counts['{method="GET",route="unmatched",status="404"}'] == 1
    assert not [labels for labels in counts if "MUG" in labels or "nowhere" in labels]


async def test_a_request_id_is_kept_if_plausible_and_made_otherwise(
    api: httpx.AsyncClient,
) -> None:
    kept = await api.get("/inventory/MUG-1", headers={"X-Request-ID": "req-42.abc"})
    assert kept.headers["x-request-id"] == "req-42.abc"
    made = await api.get("/inventory/MUG-1", headers={"X-Request-ID": "a b\nforged=line"})
    assert made.headers["x-request-id"] != "a b\nforged=line"
    assert len(made.headers["x-request-id"]) == 32
    other = await api.get("/inventory/MUG-1")
    assert other.headers["x-request-id"] not in (made.headers["x-request-id"], "req-42.abc")
    # Errors of every kind carry one too (here the body-size limit, before any route).
    too_big = await api.post("/checkout", content=b"x" * 70_000)
    assert too_big.status_code == 413
    assert too_big.headers["x-request-id"]


async def test_refused_checkouts_are_counted_by_reason(api: httpx.AsyncClient) -> None:
    body = {"customer": {"email": "ada@example.com"}, "items": [{"sku": "MUG", "quantity": 1}]}
    assert (await api.post("/checkout", json={"items": []})).status_code == 422
    bad_token = await api.post("/checkout", json=body, headers={"Authorization": "Bearer nope"})
    assert bad_token.status_code == 401
    named = {**body, "customer": {"email": "ada@example.com", "user_id": "u1"}}
    assert (await api.post("/checkout", json=named)).status_code == 403
    # This client's address has spent its budget: refused before anything starts.
    services = api._transport.app.state.services  # type: ignore[attr-defined]
    services.checkouts.limiter = CheckoutLimiter("1/hour", None)  # not clock-edge prone
    await services.checkouts.limiter.hit(rate_limit_identity("127.0.0.1"))
    limited = await api.post("/checkout", json=body)
    assert limited.status_code == 429, limited.text
    text = await scrape(api)
    assert samples(text, "checkout_refused_total") == {
        '{reason="validation_error"}': 1,
        '{reason="unauthorized"}': 1,
        '{reason="forbidden"}': 1,
        '{reason="rate_limited"}': 1,
    }
    assert samples(text, "checkout_rate_limited_total") == {'{limit="address"}': 1}
    assert samples(text, "checkout_started_total") == {"": 0}


async def test_webhook_deliveries_are_counted_by_type_and_outcome(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    event = {"id": f"evt_{uuid.uuid4().hex}", "type": "customer.created", "data": {"object": {}}}
    payload = json.dumps(event).encode()
    secret = settings.stripe_webhook_secret.get_secret_value()
    for _ in range(2):
        response = await api.post(
            "/webhooks/stripe", content=payload, headers={"Stripe-Signature": sign(payload, secret)}
        )
        assert response.status_code == 200, response.text
    forged = await api.post(
        "/webhooks/stripe", content=payload, headers={"Stripe-Signature": sign(payload, "nope")}
    )
    assert forged.status_code == 400
    counted = samples(await scrape(api), "checkout_webhook_events_total")
    assert counted == {
        '{outcome="ignored",type="customer.created"}': 1,
        '{outcome="duplicate",type="customer.created"}': 1,
        '{outcome="invalid_signature",type="unverified"}': 1,
    }


async def test_the_outbox_backlog_is_read_at_each_scrape(api: httpx.AsyncClient) -> None:
    services = api._transport.app.state.services  # type: ignore[attr-defined]
    calls = []

    async def probe() -> OutboxBacklog:
        calls.append(time.monotonic())
        return OutboxBacklog(pending=7, oldest_age_seconds=12.5)

    services.metrics.watch_outbox(probe)
    text = await scrape(api)
    assert samples(text, "checkout_outbox_pending") == {"": 7}
    assert samples(text, "checkout_outbox_oldest_pending_age_seconds") == {"": 12.5}

    async def broken() -> OutboxBacklog:
        raise OSError("database down")

    services.metrics.watch_outbox(broken)
    text = await scrape(api)
    assert samples(text, "checkout_outbox_probe_failures_total") == {"": 1}
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("header", "status"),
    [(None, 401), ("Bearer wrong-token", 401), ("Bearer metrics-token-0123456789", 200)],
)
async def test_metrics_token_guards_the_endpoint_when_set(
    app_settings: Settings, header: str | None, status: int
) -> None:
    settings = app_settings.model_copy(
        update={"metrics_token": SecretStr("metrics-token-0123456789")}
    )
    async with running_app(settings) as api:
        response = await api.get("/metrics", headers={"Authorization": header} if header else {})
    assert response.status_code == status
    if status == 401:
        assert response.json()["error"] == "unauthorized"


async def test_metrics_stay_out_of_the_openapi_document(api: httpx.AsyncClient) -> None:
    paths = (await api.get("/openapi.json")).json()["paths"]
    assert "/metrics" not in paths
