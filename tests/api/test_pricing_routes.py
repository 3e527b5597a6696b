"""The pricing catalog's admin routes, the public shipping methods and the quote, through the
ASGI app with real PostgreSQL (`carts-and-pricing.md`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from pydantic import SecretStr
from sqlalchemy import text

from core.db import SessionFactory
from core.settings import Settings
from tests.api import test_catalog_routes
from tests.conftest import running_app

JWT_SECRET = "customer-jwt-secret-for-the-tests-0123456789"

MUG = {"name": "Mug", "unit_price": 2500, "currency": "usd", "on_hand": 10}
TEE = {"name": "Tee", "unit_price": 1999, "currency": "usd", "on_hand": 5}
STANDARD = {
    "name": "Standard",
    "price": 500,
    "currency": "usd",
    "countries": ["us", "CA"],
    "free_over": 10_000,
    "active": True,
}
SAVE10 = {"kind": "percent", "value": 10, "active": True}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    return dict(test_catalog_routes.assert_error(response, status, code))


def customer_token(sub: str = "user-42") -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 300}, JWT_SECRET, algorithm="HS256")


@pytest.fixture
async def api(db: SessionFactory, app_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    settings = app_settings.model_copy(update={"customer_jwt_secret": SecretStr(JWT_SECRET)})
    async with running_app(settings) as client:
        yield client


@pytest.fixture
async def catalog(api: httpx.AsyncClient, admin_headers: dict[str, str]) -> httpx.AsyncClient:
    """Two products, a shipping method to the US and Canada, a 20% US tax on goods and
    shipping, and a 10% promotion."""
    for sku, product in (("MUG", MUG), ("TEE", TEE)):
        assert (
            await api.put(f"/admin/products/{sku}", json=product, headers=admin_headers)
        ).is_success
    puts = [
        ("/admin/shipping-methods/standard", STANDARD),
        ("/admin/tax-rates/US", {"rate_bps": 2000, "includes_shipping": True}),
        ("/admin/promotions/SAVE10", SAVE10),
    ]
    for path, body in puts:
        response = await api.put(path, json=body, headers=admin_headers)
        assert response.status_code == 200, response.text
    return api


# -- admin routes -----------------------------------------------------------------------------

ADMIN_PUTS = [
    ("/admin/shipping-methods/standard", STANDARD),
    ("/admin/tax-rates/US", {"rate_bps": 2000, "includes_shipping": False}),
    ("/admin/promotions/SAVE10", SAVE10),
]


@pytest.mark.parametrize(("path", "body"), ADMIN_PUTS)
async def test_admin_routes_need_the_admin_token(
    api: httpx.AsyncClient, admin_headers: dict[str, str], path: str, body: dict[str, Any]
) -> None:
    for garbage in (body, {"nonsense": True}):  # the token is checked before the body
        assert_error(await api.put(path, json=garbage), 401, "unauthorized")
        as_customer = {"Authorization": f"Bearer {customer_token()}"}
        assert_error(await api.put(path, json=garbage, headers=as_customer), 403, "forbidden")
    as_customer = {"Authorization": f"Bearer {customer_token()}"}
    assert_error(await api.get("/admin/promotions/SAVE10"), 401, "unauthorized")
    assert_error(await api.get("/admin/promotions/SAVE10", headers=as_customer), 403, "forbidden")
    # Nothing was written.
    assert (await api.get("/shipping-methods")).json() == {"methods": []}
    assert_error(await api.get("/admin/promotions/SAVE10", headers=admin_headers), 404, "not_found")


async def test_a_shipping_method_is_created_then_replaced(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    created = await api.put(
        "/admin/shipping-methods/standard", json=STANDARD, headers=admin_headers
    )
    assert created.status_code == 200
    assert created.json() == {
        "code": "standard",
        "name": "Standard",
        "price": 500,
        "currency": "usd",
        "countries": ["CA", "US"],
        "free_over": 10_000,
        "active": True,
    }
    replaced = await api.put(
        "/admin/shipping-methods/standard",
        json={
            "name": "Slow",
            "price": 0,
            "currency": "EUR",
            "countries": [],
            "free_over": None,
            "active": False,
        },
        headers=admin_headers,
    )
    assert replaced.json() == {
        "code": "standard",
        "name": "Slow",
        "price": 0,
        "currency": "eur",
        "countries": [],
        "free_over": None,
        "active": False,
    }


async def test_a_tax_rate_is_created_then_replaced(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    first = await api.put(
        "/admin/tax-rates/de",
        json={"rate_bps": 1900, "includes_shipping": True},
        headers=admin_headers,
    )
    assert first.json() == {"country": "DE", "rate_bps": 1900, "includes_shipping": True}
    second = await api.put(
        "/admin/tax-rates/DE",
        json={"rate_bps": 0, "includes_shipping": False},
        headers=admin_headers,
    )
    assert second.json() == {"country": "DE", "rate_bps": 0, "includes_shipping": False}


async def test_a_promotion_is_upserted_by_its_code_in_any_case(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    body = {
        "kind": "fixed",
        "value": 500,
        "currency": "USD",
        "min_subtotal": 2000,
        "starts_at": "2026-01-01T00:00:00Z",
        "ends_at": "2027-01-01T00:00:00+01:00",
        "usage_limit": 100,
        "per_customer_limit": 1,
        "active": True,
    }
    created = await api.put("/admin/promotions/Winter-5", json=body, headers=admin_headers)
    assert created.status_code == 200, created.text
    assert created.json() == {
        "code": "Winter-5",
        "kind": "fixed",
        "value": 500,
        "currency": "usd",
        "min_subtotal": 2000,
        "starts_at": "2026-01-01T00:00:00Z",
        "ends_at": "2026-12-31T23:00:00Z",
        "usage_limit": 100,
        "per_customer_limit": 1,
        "active": True,
        "used": 0,
        "reserved": 0,
    }
    updated = await api.put("/admin/promotions/WINTER-5", json=SAVE10, headers=admin_headers)
    assert updated.json()["code"] == "WINTER-5"
    assert updated.json()["kind"] == "percent"
    assert updated.json()["currency"] is None
    read = await api.get("/admin/promotions/winter-5", headers=admin_headers)
    assert read.json() == updated.json()


BAD_BODIES = [
    ("/admin/shipping-methods/std", {**STANDARD, "price": -1}, "price"),
    ("/admin/shipping-methods/std", {**STANDARD, "price": 100_000_000}, "price"),
    ("/admin/shipping-methods/std", {**STANDARD, "price": 5.5}, "price"),
    ("/admin/shipping-methods/std", {**STANDARD, "currency": "dollars"}, "currency"),
    ("/admin/shipping-methods/std", {**STANDARD, "countries": ["USA"]}, "countries"),
    ("/admin/shipping-methods/std", {**STANDARD, "countries": ["U1"]}, "countries"),
    ("/admin/shipping-methods/std", {**STANDARD, "free_over": -1}, "free_over"),
    ("/admin/shipping-methods/std", {**STANDARD, "name": "a\u0000b"}, "name"),
    ("/admin/shipping-methods/std", {**STANDARD, "name": " "}, "name"),
    ("/admin/shipping-methods/std", {**STANDARD, "colour": "red"}, "colour"),
    ("/admin/tax-rates/US", {"rate_bps": 10_001, "includes_shipping": False}, "rate_bps"),
    ("/admin/tax-rates/US", {"rate_bps": -1, "includes_shipping": False}, "rate_bps"),
    ("/admin/tax-rates/US", {"rate_bps": "20", "includes_shipping": False}, "rate_bps"),
    ("/admin/promotions/P", {"kind": "percent", "value": 0}, "value"),
    ("/admin/promotions/P", {"kind": "percent", "value": 101}, "body"),
    ("/admin/promotions/P", {"kind": "percent", "value": 10, "currency": "usd"}, "body"),
    ("/admin/promotions/P", {"kind": "fixed", "value": 500}, "body"),
    ("/admin/promotions/P", {"kind": "fixed", "value": 0, "currency": "usd"}, "value"),
    ("/admin/promotions/P", {"kind": "bogo", "value": 1}, "kind"),
    ("/admin/promotions/P", {**SAVE10, "min_subtotal": -1}, "min_subtotal"),
    ("/admin/promotions/P", {**SAVE10, "usage_limit": -1}, "usage_limit"),
    ("/admin/promotions/P", {**SAVE10, "per_customer_limit": 0}, "per_customer_limit"),
    ("/admin/promotions/P", {**SAVE10, "starts_at": "2026-01-01T00:00:00"}, "starts_at"),
    ("/admin/promotions/P", {**SAVE10, "ends_at": "9999-12-31T23:00:00-05:00"}, "ends_at"),
    ("/admin/promotions/P", {**SAVE10, "starts_at": "0001-01-01T00:00:00+05:00"}, "starts_at"),
    (
        "/admin/promotions/P",
        {**SAVE10, "starts_at": "2026-02-01T00:00:00Z", "ends_at": "2026-02-01T00:00:00Z"},
        "body",
    ),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD_BODIES)
async def test_bad_pricing_bodies_get_422_and_change_nothing(
    api: httpx.AsyncClient,
    admin_headers: dict[str, str],
    path: str,
    body: dict[str, Any],
    field: str,
) -> None:
    error = assert_error(
        await api.put(path, json=body, headers=admin_headers), 422, "validation_error"
    )
    assert any(field in d["loc"] for d in error["details"])
    assert (await api.get("/shipping-methods")).json() == {"methods": []}
    assert_error(await api.get("/admin/promotions/P", headers=admin_headers), 404, "not_found")


@pytest.mark.parametrize(
    "path",
    [
        "/admin/shipping-methods/bad%20code",
        "/admin/shipping-methods/-std",
        "/admin/shipping-methods/a%00b",
        "/admin/shipping-methods/" + "x" * 65,
        "/admin/tax-rates/USA",
        "/admin/tax-rates/1A",
        "/admin/tax-rates/%00%00",
        "/admin/promotions/%F0%9F%8E%81",
        "/admin/promotions/%ED%A0%80",
    ],
)
async def test_bad_path_parameters_get_422(
    api: httpx.AsyncClient, admin_headers: dict[str, str], path: str
) -> None:
    assert_error(await api.put(path, json={}, headers=admin_headers), 422, "validation_error")
    if path.startswith("/admin/promotions/"):
        assert_error(await api.get(path, headers=admin_headers), 422, "validation_error")


# -- promotion limits under reservations --------------------------------------------------------


async def hold_uses(
    db: SessionFactory,
    code_key: str,
    used: int,
    reserved: int,
    customers: dict[str, int] | None = None,
) -> None:
    """Set a promotion's counters as checkouts would have left them."""
    async with db.begin() as session:
        await session.execute(
            text("UPDATE promotions SET used = :used, reserved = :reserved WHERE code_key = :key"),
            {"used": used, "reserved": reserved, "key": code_key},
        )
        for scope, held in (customers or {}).items():
            await session.execute(
                text(
                    "INSERT INTO promotion_customer_uses (code_key, customer_scope, used, reserved,"
                    " customer_limit) SELECT code_key, :scope, :held, 0, per_customer_limit"
                    " FROM promotions WHERE code_key = :key"
                ),
                {"key": code_key, "scope": scope, "held": held},
            )


async def test_lowering_the_usage_limit_below_the_uses_held_is_refused(
    api: httpx.AsyncClient, admin_headers: dict[str, str], db: SessionFactory
) -> None:
    await api.put(
        "/admin/promotions/SAVE10", json={**SAVE10, "usage_limit": 10}, headers=admin_headers
    )
    await hold_uses(db, "save10", used=3, reserved=2)

    refused = await api.put(
        "/admin/promotions/save10",
        json={**SAVE10, "usage_limit": 4, "value": 50},
        headers=admin_headers,
    )

    error = assert_error(refused, 409, "invalid_state")
    assert error["details"] == {"code": "save10", "usage_limit": 4, "used": 3, "reserved": 2}
    assert "4" in str(error["message"]) and "5" in str(error["message"])
    unchanged = (await api.get("/admin/promotions/SAVE10", headers=admin_headers)).json()
    assert (unchanged["code"], unchanged["value"], unchanged["usage_limit"]) == ("SAVE10", 10, 10)
    assert (unchanged["used"], unchanged["reserved"]) == (3, 2)

    exactly = await api.put(
        "/admin/promotions/SAVE10", json={**SAVE10, "usage_limit": 5}, headers=admin_headers
    )
    assert exactly.status_code == 200
    assert (exactly.json()["usage_limit"], exactly.json()["used"], exactly.json()["reserved"]) == (
        5,
        3,
        2,
    )


async def test_a_limit_change_waits_for_a_reservation_in_flight_and_then_counts_it(
    api: httpx.AsyncClient, admin_headers: dict[str, str], db: SessionFactory
) -> None:
    await api.put(
        "/admin/promotions/SAVE10", json={**SAVE10, "usage_limit": 10}, headers=admin_headers
    )
    await hold_uses(db, "save10", used=2, reserved=1)
    lower = {**SAVE10, "usage_limit": 3}
    async with db.begin() as checkout:
        # A checkout reserving a use, not committed yet: it holds the promotion's row.
        await checkout.execute(
            text("UPDATE promotions SET reserved = reserved + 1 WHERE code_key = 'save10'")
        )
        change = asyncio.create_task(
            api.put("/admin/promotions/SAVE10", json=lower, headers=admin_headers)
        )
        await asyncio.sleep(0.3)
        assert not change.done()
    # The check ran after the reservation committed, and saw it: 2 + 2 > 3, refused, not a
    # CHECK violation.
    error = assert_error(await change, 409, "invalid_state")
    assert error["details"] == {"code": "SAVE10", "usage_limit": 3, "used": 2, "reserved": 2}


async def test_lowering_the_per_customer_limit_below_a_customers_uses_is_refused(
    api: httpx.AsyncClient, admin_headers: dict[str, str], db: SessionFactory
) -> None:
    await api.put(
        "/admin/promotions/SAVE10", json={**SAVE10, "per_customer_limit": 5}, headers=admin_headers
    )
    await hold_uses(
        db, "save10", used=4, reserved=0, customers={"user:a": 3, "email:b@example.com": 1}
    )

    refused = await api.put(
        "/admin/promotions/SAVE10", json={**SAVE10, "per_customer_limit": 2}, headers=admin_headers
    )

    error = assert_error(refused, 409, "invalid_state")
    assert error["details"] == {
        "code": "SAVE10",
        "per_customer_limit": 2,
        "customer_held": 3,
        "customers_above": 1,
    }
    assert (await api.get("/admin/promotions/SAVE10", headers=admin_headers)).json()[
        "per_customer_limit"
    ] == 5

    # To exactly what the busiest customer holds: allowed, and the copies follow.
    for limit in (3, None, 4):
        ok = await api.put(
            "/admin/promotions/SAVE10",
            json={**SAVE10, "per_customer_limit": limit},
            headers=admin_headers,
        )
        assert ok.status_code == 200, ok.text
        async with db() as session:
            copies = (
                (
                    await session.execute(
                        text("SELECT DISTINCT customer_limit FROM promotion_customer_uses")
                    )
                )
                .scalars()
                .all()
            )
        assert copies == [limit]


# -- public shipping methods ------------------------------------------------------------------


async def test_shipping_methods_are_filtered_by_country_and_currency_and_hide_inactive_ones(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    methods = {
        "standard": STANDARD,
        "world": {**STANDARD, "name": "World", "price": 2000, "countries": [], "free_over": None},
        "express-eu": {
            **STANDARD,
            "name": "Express",
            "price": 900,
            "currency": "eur",
            "countries": ["DE", "FR"],
        },
        "retired": {**STANDARD, "name": "Retired", "price": 100, "active": False},
    }
    for code, body in methods.items():
        assert (
            await api.put(f"/admin/shipping-methods/{code}", json=body, headers=admin_headers)
        ).is_success

    async def codes(**params: str) -> list[str]:
        response = await api.get("/shipping-methods", params=params)
        assert response.status_code == 200, response.text
        return [m["code"] for m in response.json()["methods"]]

    assert await codes(country="US", currency="usd") == ["standard", "world"]
    assert await codes(country="us", currency="USD") == ["standard", "world"]
    assert await codes(country="DE", currency="usd") == ["world"]
    assert await codes(country="DE", currency="eur") == ["express-eu"]
    assert await codes(country="JP") == ["world"]
    assert await codes(currency="eur") == ["express-eu"]
    assert await codes() == ["standard", "express-eu", "world"]
    response = await api.get("/shipping-methods", params={"country": "US", "currency": "usd"})
    assert response.json()["methods"][0] == {
        "code": "standard",
        "name": "Standard",
        "price": 500,
        "currency": "usd",
        "free_over": 10_000,
    }


@pytest.mark.parametrize(
    "params", [{"country": "USA"}, {"country": "\x00U"}, {"currency": "us"}, {"currency": "u$d"}]
)
async def test_bad_shipping_method_filters_get_422(
    api: httpx.AsyncClient, params: dict[str, str]
) -> None:
    assert_error(await api.get("/shipping-methods", params=params), 422, "validation_error")


# -- the quote ---------------------------------------------------------------------------------


def quote_body(**extra: Any) -> dict[str, Any]:
    return {"items": [{"sku": "MUG", "quantity": 2}, {"sku": "TEE", "quantity": 1}], **extra}


US = {"country": "us", "postal_code": "94107", "city": "San Francisco", "line1": "1 Main St"}


async def test_a_quote_prices_promotion_shipping_and_tax_and_reserves_nothing(
    catalog: httpx.AsyncClient, admin_headers: dict[str, str], db: SessionFactory
) -> None:
    api = catalog
    response = await api.post(
        "/checkout/quote",
        json=quote_body(address=US, shipping_method="standard", promotion_code="save10"),
    )

    assert response.status_code == 200, response.text
    # subtotal 2 x 2500 + 1999 = 6999; 10% = 699.9 -> 700; 6299 < 10000: shipping 500;
    # tax 20% of (6299 + 500) = 1359.8 -> 1360; total 6299 + 500 + 1360 = 8159.
    assert response.json() == {
        "currency": "usd",
        "items": [
            {"sku": "MUG", "name": "Mug", "unit_price": 2500, "quantity": 2, "line_total": 5000},
            {"sku": "TEE", "name": "Tee", "unit_price": 1999, "quantity": 1, "line_total": 1999},
        ],
        "totals": {"subtotal": 6999, "discount": 700, "tax": 1360, "shipping": 500, "total": 8159},
        "promotion": {"code": "SAVE10", "discount": 700},
        "shipping_methods": [
            {
                "code": "standard",
                "name": "Standard",
                "price": 500,
                "currency": "usd",
                "free_over": 10_000,
            }
        ],
    }
    for sku in ("MUG", "TEE"):
        assert (await api.get(f"/inventory/{sku}")).json()["reserved"] == 0
    promotion = (await api.get("/admin/promotions/SAVE10", headers=admin_headers)).json()
    assert (promotion["used"], promotion["reserved"]) == (0, 0)
    async with db() as session:
        for table in ("orders", "reservations", "promotion_uses", "promotion_customer_uses"):
            assert (await session.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one() == 0  # noqa: S608


async def test_a_quote_takes_the_checkout_body_merges_lines_and_reaches_free_shipping(
    catalog: httpx.AsyncClient,
) -> None:
    body = {
        "customer": {"email": "ada@example.com"},
        "items": [{"sku": "MUG", "quantity": 2}, {"sku": "MUG", "quantity": 2}],
        "metadata": {"campaign": "winter"},
        "address": {"country": "US"},
        "shipping_method": "standard",
    }
    response = await catalog.post("/checkout/quote", json=body)
    assert response.status_code == 200, response.text
    quote = response.json()
    assert quote["items"] == [
        {"sku": "MUG", "name": "Mug", "unit_price": 2500, "quantity": 4, "line_total": 10_000}
    ]
    # 10000 >= free_over: free; tax 20% of 10000.
    assert quote["totals"] == {
        "subtotal": 10_000,
        "discount": 0,
        "tax": 2000,
        "shipping": 0,
        "total": 12_000,
    }
    assert quote["promotion"] is None


async def test_a_quote_without_an_address_has_no_tax_and_lists_the_currencys_methods(
    catalog: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await catalog.put(
        "/admin/shipping-methods/eu",
        json={**STANDARD, "currency": "eur", "countries": ["DE"]},
        headers=admin_headers,
    )
    response = await catalog.post("/checkout/quote", json=quote_body())
    assert response.status_code == 200, response.text
    assert response.json()["totals"] == {
        "subtotal": 6999,
        "discount": 0,
        "tax": 0,
        "shipping": 0,
        "total": 6999,
    }
    assert [m["code"] for m in response.json()["shipping_methods"]] == ["standard"]
    # A country without a rate: no tax, and no method of ours ships there.
    elsewhere = await catalog.post("/checkout/quote", json=quote_body(address={"country": "JP"}))
    assert elsewhere.json()["totals"]["tax"] == 0
    assert elsewhere.json()["shipping_methods"] == []


@pytest.mark.parametrize(
    ("promotion", "reason"),
    [
        ({**SAVE10, "active": False}, "inactive"),
        ({**SAVE10, "starts_at": "2999-01-01T00:00:00Z"}, "not_started"),
        ({**SAVE10, "ends_at": "2020-01-01T00:00:00Z"}, "ended"),
        ({"kind": "fixed", "value": 500, "currency": "eur"}, "currency"),
        ({**SAVE10, "min_subtotal": 7000}, "min_subtotal"),
        (None, "unknown"),
    ],
)
async def test_a_promotion_that_does_not_apply_is_invalid_promotion_with_its_reason(
    catalog: httpx.AsyncClient,
    admin_headers: dict[str, str],
    promotion: dict[str, Any] | None,
    reason: str,
) -> None:
    code = "Oops"
    if promotion is not None:
        assert (
            await catalog.put(f"/admin/promotions/{code}", json=promotion, headers=admin_headers)
        ).is_success
    response = await catalog.post("/checkout/quote", json=quote_body(promotion_code="OOPS"))
    error = assert_error(response, 422, "invalid_promotion")
    assert error["details"] == {"code": code if promotion else "OOPS", "reason": reason}


async def test_an_exhausted_promotion_is_promotion_exhausted_in_the_quote(
    catalog: httpx.AsyncClient, admin_headers: dict[str, str], db: SessionFactory
) -> None:
    await catalog.put(
        "/admin/promotions/SAVE10",
        json={**SAVE10, "usage_limit": 5, "per_customer_limit": 2},
        headers=admin_headers,
    )
    await hold_uses(db, "save10", used=2, reserved=2, customers={"user:user-42": 2})
    customer = {"Authorization": f"Bearer {customer_token('user-42')}"}
    someone_else = {"Authorization": f"Bearer {customer_token('user-7')}"}

    mine = await catalog.post(
        "/checkout/quote", json=quote_body(promotion_code="SAVE10"), headers=customer
    )
    error = assert_error(mine, 409, "promotion_exhausted")
    assert error["details"] == {"code": "SAVE10", "limit": 2, "scope": "customer"}
    assert (
        await catalog.post(
            "/checkout/quote", json=quote_body(promotion_code="SAVE10"), headers=someone_else
        )
    ).status_code == 200
    # A guest naming no customer has no per-customer limit to check.
    assert (
        await catalog.post("/checkout/quote", json=quote_body(promotion_code="SAVE10"))
    ).status_code == 200
    # Nor does a guest naming one: an anonymous quote must not tell whether that email used
    # the code (the checkout checks it).
    await hold_uses(db, "save10", used=2, reserved=2, customers={"email:ada@example.com": 2})
    named = quote_body(promotion_code="SAVE10") | {"customer": {"email": "Ada@example.com"}}
    assert (await catalog.post("/checkout/quote", json=named)).status_code == 200
    as_admin = await catalog.post("/checkout/quote", json=named, headers=admin_headers)
    assert assert_error(as_admin, 409, "promotion_exhausted")["details"]["scope"] == "customer"

    await hold_uses(db, "save10", used=3, reserved=2)
    total = await catalog.post("/checkout/quote", json=quote_body(promotion_code="save10"))
    error = assert_error(total, 409, "promotion_exhausted")
    assert error["details"] == {"code": "SAVE10", "limit": 5, "scope": "total"}


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"address": US, "shipping_method": "nope"}, "unknown"),
        ({"address": {"country": "DE"}, "shipping_method": "standard"}, "country"),
        ({"shipping_method": "standard"}, "no_address"),
        ({"address": US, "shipping_method": "retired"}, "unknown"),
        ({"address": US, "shipping_method": "in-euros"}, "currency"),
    ],
)
async def test_a_shipping_method_that_cannot_serve_is_shipping_unavailable(
    catalog: httpx.AsyncClient, admin_headers: dict[str, str], extra: dict[str, Any], reason: str
) -> None:
    await catalog.put(
        "/admin/shipping-methods/retired", json={**STANDARD, "active": False}, headers=admin_headers
    )
    await catalog.put(
        "/admin/shipping-methods/in-euros",
        json={**STANDARD, "currency": "eur"},
        headers=admin_headers,
    )
    error = assert_error(
        await catalog.post("/checkout/quote", json=quote_body(**extra)), 422, "shipping_unavailable"
    )
    assert error["details"]["reason"] == reason


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"items": [{"sku": "NOPE", "quantity": 1}]}, "unknown_sku"),
        ({"items": []}, "validation_error"),
        ({"items": [{"sku": "MUG", "quantity": 0}]}, "validation_error"),
        ({"items": [{"sku": "MUG", "quantity": 1001}]}, "validation_error"),
        (quote_body(address={"country": "USA"}), "validation_error"),
        (quote_body(address={"postal_code": "1"}), "validation_error"),
        (quote_body(address={"country": "US", "city": "a\u0000"}), "validation_error"),
        (quote_body(promotion_code="a\u0000"), "validation_error"),
        (quote_body(promotion_code=""), "validation_error"),
        (quote_body(shipping_method="x" * 256), "validation_error"),
        (quote_body(cart_id="5b1c2d3e-4f50-4a6b-9c8d-7e6f5a4b3c2d"), "validation_error"),
    ],
)
async def test_bad_quote_bodies_are_refused(
    catalog: httpx.AsyncClient, body: dict[str, Any], code: str
) -> None:
    assert_error(await catalog.post("/checkout/quote", json=body), 422, code)


async def test_an_unknown_long_promotion_code_is_unknown_not_a_server_error(
    catalog: httpx.AsyncClient,
) -> None:
    response = await catalog.post("/checkout/quote", json=quote_body(promotion_code="ü" * 255))
    assert_error(response, 422, "invalid_promotion")


async def test_quotes_are_rate_limited_per_client_address_except_for_admin(
    db: SessionFactory, app_settings: Settings, admin_headers: dict[str, str]
) -> None:
    settings = app_settings.model_copy(update={"rate_limit_quotes": "3/hour"})
    async with running_app(settings) as api:
        await api.put("/admin/products/MUG", json=MUG, headers=admin_headers)
        body = {"items": [{"sku": "MUG", "quantity": 1}]}
        for _ in range(3):
            assert (await api.post("/checkout/quote", json=body)).status_code == 200
        refused = await api.post("/checkout/quote", json=body)
        error = assert_error(refused, 429, "rate_limited")
        assert "quotes" in error["message"]
        assert int(refused.headers["retry-after"]) >= 1
        assert (
            await api.post("/checkout/quote", json=body, headers=admin_headers)
        ).status_code == 200
