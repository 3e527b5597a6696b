"""Hostile webhooks: anything not signed by Stripe with our secret, recently, is refused with
400 and changes nothing."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import httpx
import pytest
from sqlalchemy import func, select

from core.db import SessionFactory
from core.models import ProcessedWebhookEvent
from core.settings import Settings

EVENT = {
    "id": "evt_hostile",
    "type": "payment_intent.succeeded",
    "data": {"object": {"id": "pi_1", "status": "succeeded", "metadata": {}}},
}


def signature(payload: bytes, secret: str, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


async def recorded(db: SessionFactory) -> int:
    async with db() as session:
        return int(
            await session.scalar(select(func.count()).select_from(ProcessedWebhookEvent)) or 0
        )


@pytest.fixture
def secret(settings: Settings) -> str:
    return settings.stripe_webhook_secret.get_secret_value()


async def post(api: httpx.AsyncClient, payload: bytes, header: str | None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["Stripe-Signature"] = header
    return await api.post("/webhooks/stripe", content=payload, headers=headers)


async def test_hostile_signatures_are_refused(
    api: httpx.AsyncClient, db: SessionFactory, secret: str
) -> None:
    payload = json.dumps(EVENT).encode()
    now = int(time.time())
    old = now - 301
    other_body = json.dumps({**EVENT, "id": "evt_other"}).encode()
    cases = {
        "missing": None,
        "empty": "",
        "garbage": "not-a-signature",
        "wrong secret": signature(payload, "whsec_wrong", now),
        "older than the 300 s tolerance": signature(payload, secret, old),
        # A replay: the body with a fresh timestamp but the signature of the old one.
        "replayed with a new timestamp": f"t={now},{signature(payload, secret, old).split(',')[1]}",
        "signature of another body": signature(other_body, secret, now),
    }
    for name, header in cases.items():
        response = await post(api, payload, header)
        assert response.status_code == 400, name
        assert response.json()["error"] == "invalid_signature", name
    assert await recorded(db) == 0


async def test_a_signed_body_that_is_not_an_event_is_invalid_payload(
    api: httpx.AsyncClient, db: SessionFactory, secret: str
) -> None:
    for payload in (b"not json", b"[1, 2]", json.dumps({"type": "x"}).encode()):
        response = await post(api, payload, signature(payload, secret, int(time.time())))
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_payload"
    assert await recorded(db) == 0


async def test_a_valid_event_that_is_not_ours_is_acknowledged_and_recorded_once(
    api: httpx.AsyncClient, db: SessionFactory, secret: str
) -> None:
    payload = json.dumps(EVENT).encode()
    header = signature(payload, secret, int(time.time()))

    first = await post(api, payload, header)
    again = await post(api, payload, header)

    assert first.json() == {"received": True, "outcome": "ignored"}
    assert again.json() == {"received": True, "outcome": "duplicate"}
    assert await recorded(db) == 1
