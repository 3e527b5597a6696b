"""Admin catalog and public inventory routes, through the ASGI app with real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from core.db import SessionFactory
from core.ledger import StockLedger

MUG = {"name": "Mug", "unit_price": 1200, "currency": "usd", "on_hand": 10}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code
    assert isinstance(body["message"], str)
    assert body["message"]
    assert set(body) <= {"error", "message", "details"}
    return body  # type: ignore[no-any-return]


async def test_put_product_creates_then_updates_and_inventory_reads_it(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    created = await api.put("/admin/products/MUG-1", json=MUG, headers=admin_headers)
    assert created.status_code == 200
    assert created.json() == {
        "sku": "MUG-1",
        "name": "Mug",
        "unit_price": 1200,
        "currency": "usd",
        "on_hand": 10,
        "reserved": 0,
        "available": 10,
        "max_per_order": None,
    }

    updated = await api.put(
        "/admin/products/MUG-1",
        json={"name": "Big mug", "unit_price": 1500, "currency": "EUR", "on_hand": 4},
        headers=admin_headers,
    )
    assert updated.status_code == 200
    assert updated.json()["currency"] == "eur"
    assert updated.json()["on_hand"] == 4

    inventory = await api.get("/inventory/MUG-1")
    assert inventory.json() == {"sku": "MUG-1", "on_hand": 4, "reserved": 0, "available": 4}


async def test_inventory_of_an_unknown_sku_is_not_found(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/inventory/NOPE"), 404, "not_found")


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong-token",
        "Bearer test-admin-toke",
        "Bearer test-admin-token-",
        "Basic dGVzdC1hZG1pbi10b2tlbg==",
        "test-admin-token",
        "Bearer ",
    ],
)
async def test_admin_routes_refuse_missing_or_wrong_tokens_and_change_nothing(
    api: httpx.AsyncClient, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    for body in (MUG, {"name": ""}):  # the token is checked before the body
        response = await api.put("/admin/products/MUG-1", json=body, headers=headers)
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
    assert_error(await api.get("/inventory/MUG-1"), 404, "not_found")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**MUG, "unit_price": 0}, "unit_price"),
        ({**MUG, "unit_price": -5}, "unit_price"),
        ({**MUG, "unit_price": 12.5}, "unit_price"),
        ({**MUG, "unit_price": "1200"}, "unit_price"),
        ({**MUG, "unit_price": 100_000_000}, "unit_price"),
        ({**MUG, "on_hand": -1}, "on_hand"),
        ({**MUG, "on_hand": True}, "on_hand"),
        ({**MUG, "currency": "dollars"}, "currency"),
        ({**MUG, "currency": "u$d"}, "currency"),
        ({**MUG, "name": "   "}, "name"),
        ({k: v for k, v in MUG.items() if k != "on_hand"}, "on_hand"),
        ({**MUG, "colour": "blue"}, "colour"),
    ],
)
async def test_bad_product_bodies_get_422_and_change_nothing(
    api: httpx.AsyncClient, admin_headers: dict[str, str], body: dict[str, object], field: str
) -> None:
    await api.put("/admin/products/MUG-1", json=MUG, headers=admin_headers)

    response = await api.put("/admin/products/MUG-1", json=body, headers=admin_headers)

    error = assert_error(response, 422, "validation_error")
    assert isinstance(error["details"], list)
    assert any(field in d["loc"] for d in error["details"])
    assert (await api.get("/inventory/MUG-1")).json()["on_hand"] == 10
    product = await api.put("/admin/products/MUG-1", json=MUG, headers=admin_headers)
    assert product.json()["name"] == "Mug"


async def test_malformed_json_gets_422_in_the_error_shape(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await api.put(
        "/admin/products/MUG-1",
        content=b'{"name": "Mug", ',
        headers={**admin_headers, "Content-Type": "application/json"},
    )
    assert_error(response, 422, "validation_error")
    not_utf8 = await api.put(
        "/admin/products/MUG-1",
        content=b"\x10\xff\xfeKv",
        headers={**admin_headers, "Content-Type": "application/json"},
    )
    assert_error(not_utf8, 422, "validation_error")
    assert_error(await api.get("/inventory/MUG-1"), 404, "not_found")


async def test_a_bad_sku_in_the_path_is_refused(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await api.put("/admin/products/bad%20sku!", json=MUG, headers=admin_headers)
    assert_error(response, 422, "validation_error")


async def test_on_hand_below_reserved_is_a_conflict_and_changes_nothing(
    api: httpx.AsyncClient, admin_headers: dict[str, str], db: SessionFactory
) -> None:
    await api.put("/admin/products/MUG-1", json=MUG, headers=admin_headers)
    await StockLedger(db).reserve(uuid.uuid4(), [("MUG-1", 7)])

    response = await api.put(
        "/admin/products/MUG-1",
        json={**MUG, "name": "Renamed", "on_hand": 6},
        headers=admin_headers,
    )

    error = assert_error(response, 409, "stock_below_reserved")
    assert error["details"] == {"sku": "MUG-1", "on_hand": 6, "reserved": 7}
    assert (await api.get("/inventory/MUG-1")).json() == {
        "sku": "MUG-1",
        "on_hand": 10,
        "reserved": 7,
        "available": 3,
    }


async def test_oversized_bodies_are_refused_before_parsing(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    huge = {**MUG, "name": "x" * 200_000}
    assert_error(
        await api.put("/admin/products/MUG-1", json=huge, headers=admin_headers),
        413,
        "payload_too_large",
    )

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 4096

    chunked = await api.put(
        "/admin/products/MUG-1",
        content=chunks(),
        headers={**admin_headers, "Content-Type": "application/json"},
    )
    assert_error(chunked, 413, "payload_too_large")


async def test_unknown_routes_and_methods_use_the_error_shape(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/nowhere"), 404, "not_found")
    assert_error(await api.delete("/inventory/MUG-1"), 405, "method_not_allowed")


async def test_openapi_document_and_docs_are_served(api: httpx.AsyncClient) -> None:
    spec = (await api.get("/openapi.json")).json()
    assert {"/admin/products/{sku}", "/inventory/{sku}", "/healthz"} <= set(spec["paths"])
    put = spec["paths"]["/admin/products/{sku}"]["put"]
    assert put["summary"]
    assert put["description"]
    assert "401" in put["responses"]
    assert "409" in put["responses"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    docs = await api.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
