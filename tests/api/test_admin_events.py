"""GET /admin/events: admin only, the contract's bodies with published_at, pages by an opaque
cursor, and a cursor or limit that is not one of ours is 422 `validation_error`, never 500."""

from __future__ import annotations

import asyncio
import base64
import uuid

import httpx
import pytest
from sqlalchemy import text

from api.deps import Services
from core.db import SessionFactory
from tests.core.test_events import declined, new_order, opened, pay, seed


async def events_page(
    api: httpx.AsyncClient, admin: dict[str, str], **params: str | int
) -> httpx.Response:
    return await api.get("/admin/events", params=params, headers=admin)


async def test_the_feed_pages_every_event_with_its_published_at(
    api: httpx.AsyncClient, db: SessionFactory, admin_headers: dict[str, str]
) -> None:
    store = await seed(db)
    orders = [new_order([("mug", 1)]) for _ in range(3)]
    for order in orders:
        total = await opened(store, order, f"pi_{order.order_id.hex}")
        await declined(store, order.order_id, "evt_1")
        await pay(store, order, total)
    async with db.begin() as session:
        await session.execute(
            text("UPDATE outbox SET published_at = now() WHERE aggregate_id = :id"),
            {"id": orders[0].order_id},
        )

    # An event shows once every older transaction in the cluster has ended (normally at
    # once; another test's relay may hold one for milliseconds): wait until all nine show.
    async with asyncio.timeout(10):
        while True:
            shown = (await events_page(api, admin_headers, limit=500)).json()["events"]
            if len(shown) == 9:
                break
            await asyncio.sleep(0.05)
    pages, after = [], None
    while True:
        response = await events_page(
            api, admin_headers, limit=4, **({"after": after} if after else {})
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"events", "next_cursor"}
        if not body["events"]:
            # Nothing new: the same position again, to poll with.
            assert body["next_cursor"] == after
            break
        pages.append(body["events"])
        after = body["next_cursor"]

    assert [len(page) for page in pages] == [4, 4, 1]
    events = [event for page in pages for event in page]
    everything = (await events_page(api, admin_headers, limit=500)).json()["events"]
    assert everything == events
    assert [(e["aggregate_id"], e["sequence"], e["event_type"]) for e in events] == [
        (str(order.order_id), n, kind)
        for order in orders
        for n, kind in enumerate(["order.created", "order.payment_failed", "order.paid"], 1)
    ]
    assert set(events[0]) == {
        "event_id", "event_type", "occurred_at", "aggregate_id", "sequence", "payload",
        "published_at",
    }  # fmt: skip
    assert [e["published_at"] is not None for e in events] == [True] * 3 + [False] * 6
    assert events[2]["payload"]["status"] == "paid"
    assert events[2]["payload"]["payment_intent_id"] == f"pi_{orders[0].order_id.hex}"


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor",
        "%%%",
        base64.urlsafe_b64encode(b"[1]").decode(),
        base64.urlsafe_b64encode(b'{"xid": 1, "id": 2}').decode(),
        base64.urlsafe_b64encode(b"[-1, 2]").decode(),
        base64.urlsafe_b64encode(b'["1", 2]').decode(),
        base64.urlsafe_b64encode(b"[1.5, 2]").decode(),
        base64.urlsafe_b64encode(b"[18446744073709551616, 1]").decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        "é",
        "x" * 201,
        "a\x00b",
    ],
)
async def test_a_cursor_that_is_not_ours_is_a_validation_error(
    api: httpx.AsyncClient, db: SessionFactory, admin_headers: dict[str, str], cursor: str
) -> None:
    response = await events_page(api, admin_headers, after=cursor)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "validation_error"


@pytest.mark.parametrize("limit", ["0", "501", "-1", "ten", "1.5"])
async def test_a_limit_outside_1_to_500_is_a_validation_error(
    api: httpx.AsyncClient, db: SessionFactory, admin_headers: dict[str, str], limit: str
) -> None:
    response = await events_page(api, admin_headers, limit=limit)
    assert response.status_code == 422
    assert response.json()["error"] == "validation_error"


async def test_the_feed_is_for_admin_only(api: httpx.AsyncClient, db: SessionFactory) -> None:
    services: Services = api._transport.app.state.services  # type: ignore[attr-defined]
    order_token = services.auth.order_token(uuid.uuid4())

    anonymous = await api.get("/admin/events", params={"after": "garbage"})
    as_order = await api.get(
        "/admin/events",
        params={"after": "garbage"},
        headers={"Authorization": f"Bearer {order_token}"},
    )

    # The credential is checked first: whatever the query, a caller learns nothing else.
    assert (anonymous.status_code, anonymous.json()["error"]) == (401, "unauthorized")
    assert (as_order.status_code, as_order.json()["error"]) == (403, "forbidden")
