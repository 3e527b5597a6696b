"""Server-side carts over HTTP (the ASGI app, real PostgreSQL): who reaches a cart, live prices
and availability, versions under concurrency, If-Match, merging a guest's cart, expiry."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from pydantic import SecretStr
from sqlalchemy import text

from api.auth import Authenticator
from core.carts import CartStore
from core.db import SessionFactory
from core.settings import Settings
from tests.api.test_catalog_routes import assert_error
from tests.conftest import running_app

JWT_SECRET = "carts-customer-jwt-secret-for-tests-0123456789"
CART_TTL = 3600


@pytest.fixture
async def api(db: SessionFactory, app_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with customer JWTs turned on and a CART_TTL of an hour."""
    own = app_settings.model_copy(
        update={"customer_jwt_secret": SecretStr(JWT_SECRET), "cart_ttl": CART_TTL}
    )
    async with running_app(own) as client:
        yield client


def customer(sub: str) -> dict[str, str]:
    now = int(time.time())
    token = jwt.encode({"sub": sub, "iat": now, "exp": now + 600}, JWT_SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


def guest(token: str) -> dict[str, str]:
    return {"X-Cart-Token": token}


async def product(
    api: httpx.AsyncClient,
    admin: dict[str, str],
    sku: str,
    *,
    unit_price: int = 1000,
    on_hand: int = 10,
    currency: str = "usd",
    max_per_order: int | None = None,
) -> None:
    body = {
        "name": f"Product {sku}",
        "unit_price": unit_price,
        "currency": currency,
        "on_hand": on_hand,
        "max_per_order": max_per_order,
    }
    response = await api.put(f"/admin/products/{sku}", json=body, headers=admin)
    assert response.status_code == 200, response.text


async def new_guest_cart(api: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await api.post("/carts", json=body)
    assert response.status_code == 201, response.text
    cart: dict[str, Any] = response.json()
    return cart


async def put_item(
    api: httpx.AsyncClient,
    cart_id: str,
    sku: str,
    quantity: int,
    headers: dict[str, str],
) -> httpx.Response:
    return await api.put(
        f"/carts/{cart_id}/items/{sku}", json={"quantity": quantity}, headers=headers
    )


# -- creating and reading -------------------------------------------------------------------


async def test_a_guest_cart_is_created_with_its_token_and_priced_today(
    api: httpx.AsyncClient, admin_headers: dict[str, str], db: SessionFactory
) -> None:
    await product(api, admin_headers, "MUG", unit_price=1200, on_hand=3)
    await product(api, admin_headers, "TEA", unit_price=450, on_hand=0)

    response = await api.post(
        "/carts", json={"items": [{"sku": "TEA", "quantity": 2}, {"sku": "MUG", "quantity": 2}]}
    )

    assert response.status_code == 201, response.text
    cart = response.json()
    assert set(cart) == {
        "cart_id",
        "cart_token",
        "version",
        "status",
        "currency",
        "items",
        "totals",
        "updated_at",
    }
    assert cart["cart_token"].startswith("ct_")
    assert uuid.UUID(cart["cart_id"]).version == 4
    assert (cart["version"], cart["status"], cart["currency"]) == (1, "open", "usd")
    assert response.headers["etag"] == '"1"'
    assert cart["items"] == [
        {
            "sku": "MUG",
            "name": "Product MUG",
            "unit_price": 1200,
            "quantity": 2,
            "line_total": 2400,
            "available": True,
        },
        {
            "sku": "TEA",
            "name": "Product TEA",
            "unit_price": 450,
            "quantity": 2,
            "line_total": 900,
            "available": False,
        },
    ]
    assert cart["totals"] == {
        "subtotal": 3300,
        "discount": 0,
        "tax": 0,
        "shipping": 0,
        "total": 3300,
    }
    # Only the token's hash is kept.
    async with db() as session:
        stored = (
            await session.execute(
                text("SELECT token_hash, customer_scope FROM carts WHERE id = :id"),
                {"id": cart["cart_id"]},
            )
        ).one()
    assert stored.customer_scope is None
    assert cart["cart_token"] not in stored.token_hash
    assert len(stored.token_hash) == 64

    read = await api.get(f"/carts/{cart['cart_id']}", headers=guest(cart["cart_token"]))
    assert read.status_code == 200
    assert read.headers["etag"] == '"1"'
    assert {k: v for k, v in cart.items() if k != "cart_token"} == read.json()


async def test_an_empty_cart_has_no_currency_and_zero_totals(api: httpx.AsyncClient) -> None:
    response = await api.post("/carts")
    assert response.status_code == 201, response.text
    cart = response.json()
    assert cart["currency"] is None
    assert cart["items"] == []
    assert cart["totals"]["total"] == 0


async def test_the_price_read_is_today_s(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await product(api, admin_headers, "MUG", unit_price=1200, on_hand=1)
    cart = await new_guest_cart(api, items=[{"sku": "MUG", "quantity": 2}])
    assert cart["items"][0]["available"] is False

    await product(api, admin_headers, "MUG", unit_price=990, on_hand=5)

    read = (await api.get(f"/carts/{cart['cart_id']}", headers=guest(cart["cart_token"]))).json()
    assert read["items"][0]["unit_price"] == 990
    assert read["items"][0]["line_total"] == 1980
    assert read["items"][0]["available"] is True
    assert read["totals"]["subtotal"] == read["totals"]["total"] == 1980
    assert read["version"] == 1  # a price change is not a change of the cart


async def test_a_customer_has_one_open_cart(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await product(api, admin_headers, "MUG")
    first = await api.post(
        "/carts", json={"items": [{"sku": "MUG", "quantity": 1}]}, headers=customer("ada")
    )
    again = await api.post("/carts", headers=customer("ada"))
    other = await api.post("/carts", headers=customer("bob"))

    assert first.status_code == 201, first.text
    assert again.status_code == 200, again.text
    assert "cart_token" not in first.json()
    assert again.json() == first.json()
    assert again.headers["etag"] == '"1"'
    assert other.status_code == 201
    assert other.json()["cart_id"] != first.json()["cart_id"]


async def test_concurrent_first_posts_of_a_customer_make_one_cart(api: httpx.AsyncClient) -> None:
    responses = await asyncio.gather(
        *(api.post("/carts", headers=customer("ada")) for _ in range(8))
    )

    assert sorted(r.status_code for r in responses) == [200] * 7 + [201]
    assert len({r.json()["cart_id"] for r in responses}) == 1


async def test_a_deleted_customer_cart_makes_way_for_a_new_one(api: httpx.AsyncClient) -> None:
    ada = customer("ada")
    cart = (await api.post("/carts", headers=ada)).json()

    deleted = await api.delete(f"/carts/{cart['cart_id']}", headers=ada)
    assert deleted.status_code == 204
    assert deleted.headers["etag"] == '"2"'
    assert (await api.delete(f"/carts/{cart['cart_id']}", headers=ada)).status_code == 204

    read = await api.get(f"/carts/{cart['cart_id']}", headers=ada)
    assert (read.json()["status"], read.json()["version"]) == ("deleted", 2)
    refused = await put_item(api, cart["cart_id"], "MUG", 1, ada)
    assert_error(refused, 409, "invalid_state")
    fresh = await api.post("/carts", headers=ada)
    assert fresh.status_code == 201
    assert fresh.json()["cart_id"] != cart["cart_id"]


# -- who reaches a cart ---------------------------------------------------------------------


async def test_the_cart_token_reaches_its_cart_and_nothing_else(api: httpx.AsyncClient) -> None:
    mine = await new_guest_cart(api)
    theirs = await new_guest_cart(api)
    path = f"/carts/{mine['cart_id']}"

    assert (await api.get(path, headers=guest(mine["cart_token"]))).status_code == 200
    bearer = {"Authorization": f"Bearer {mine['cart_token']}"}
    assert (await api.get(path, headers=bearer)).status_code == 200

    assert_error(await api.get(path, headers=guest(theirs["cart_token"])), 404, "not_found")
    assert_error(
        await api.get(f"/carts/{uuid.uuid4()}", headers=guest(mine["cart_token"])), 404, "not_found"
    )
    assert_error(await api.delete(path, headers=guest(theirs["cart_token"])), 404, "not_found")
    # Another guest's 404 says exactly what a missing cart's does, but for the id.
    missing = await api.get(f"/carts/{uuid.uuid4()}", headers=guest(theirs["cart_token"]))
    other = await api.get(path, headers=guest(theirs["cart_token"]))
    assert missing.json()["message"].split()[:2] == other.json()["message"].split()[:2]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="none"),
        pytest.param({"X-Cart-Token": "ct_" + "A" * 43}, id="unknown-token"),
        pytest.param({"X-Cart-Token": "ct_short"}, id="malformed-token"),
        pytest.param({"Authorization": "Bearer ct_" + "A" * 43}, id="unknown-bearer"),
        pytest.param({"Authorization": "Bearer not-a-token"}, id="unknown-credential"),
    ],
)
async def test_no_credential_or_an_unknown_one_is_401(
    api: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    cart = await new_guest_cart(api)
    for response in (
        await api.get(f"/carts/{cart['cart_id']}", headers=headers),
        await put_item(api, cart["cart_id"], "MUG", 1, headers),
        await api.delete(f"/carts/{cart['cart_id']}", headers=headers),
    ):
        assert_error(response, 401, "unauthorized")
    read = await api.get(f"/carts/{cart['cart_id']}", headers=guest(cart["cart_token"]))
    assert read.json()["status"] == "open"


async def test_two_different_cart_tokens_are_refused(api: httpx.AsyncClient) -> None:
    one, two = await new_guest_cart(api), await new_guest_cart(api)
    headers = {"X-Cart-Token": one["cart_token"], "Authorization": f"Bearer {two['cart_token']}"}
    assert_error(await api.get(f"/carts/{one['cart_id']}", headers=headers), 401, "unauthorized")


async def test_a_customer_reaches_its_own_cart_and_admin_every_cart(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    ada = (await api.post("/carts", headers=customer("ada"))).json()
    guest_cart = await new_guest_cart(api)

    assert (await api.get(f"/carts/{ada['cart_id']}", headers=customer("ada"))).status_code == 200
    assert_error(
        await api.get(f"/carts/{ada['cart_id']}", headers=customer("bob")), 404, "not_found"
    )
    assert_error(await put_item(api, ada["cart_id"], "MUG", 1, customer("bob")), 404, "not_found")
    assert_error(
        await api.get(f"/carts/{guest_cart['cart_id']}", headers=customer("ada")), 404, "not_found"
    )
    for cart in (ada, guest_cart):
        read = await api.get(f"/carts/{cart['cart_id']}", headers=admin_headers)
        assert read.status_code == 200
        assert read.json()["cart_id"] == cart["cart_id"]


async def test_an_admin_creates_a_guest_cart(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await api.post("/carts", headers=admin_headers)
    assert response.status_code == 201
    cart = response.json()
    read = await api.get(f"/carts/{cart['cart_id']}", headers=guest(cart["cart_token"]))
    assert read.status_code == 200


# -- changing a cart ------------------------------------------------------------------------


async def test_put_sets_a_line_and_zero_removes_it(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await product(api, admin_headers, "MUG", unit_price=1200)
    cart = await new_guest_cart(api)
    headers = guest(cart["cart_token"])

    added = await put_item(api, cart["cart_id"], "MUG", 3, headers)
    assert added.status_code == 200, added.text
    assert (added.json()["version"], added.headers["etag"]) == (2, '"2"')
    assert [(i["sku"], i["quantity"]) for i in added.json()["items"]] == [("MUG", 3)]
    assert added.json()["totals"]["total"] == 3600

    same = await put_item(api, cart["cart_id"], "MUG", 3, headers)
    assert same.json()["version"] == 2  # nothing changed, nothing counted

    removed = await put_item(api, cart["cart_id"], "MUG", 0, headers)
    assert removed.status_code == 200
    assert (removed.json()["version"], removed.json()["items"]) == (3, [])
    assert removed.json()["currency"] is None


async def test_put_refuses_what_a_cart_cannot_hold(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await product(api, admin_headers, "MUG", max_per_order=2)
    await product(api, admin_headers, "EURO", currency="eur")
    cart = await new_guest_cart(api, items=[{"sku": "MUG", "quantity": 1}])
    headers = guest(cart["cart_token"])

    assert_error(await put_item(api, cart["cart_id"], "NOPE", 1, headers), 422, "unknown_sku")
    over = assert_error(
        await put_item(api, cart["cart_id"], "MUG", 3, headers), 422, "quantity_limit_exceeded"
    )
    assert over["details"] == [{"sku": "MUG", "requested": 3, "max": 2}]
    assert_error(await put_item(api, cart["cart_id"], "EURO", 1, headers), 422, "validation_error")

    read = (await api.get(f"/carts/{cart['cart_id']}", headers=headers)).json()
    assert (read["version"], [(i["sku"], i["quantity"]) for i in read["items"]]) == (
        1,
        [("MUG", 1)],
    )


async def test_adding_stock_that_is_not_there_is_allowed(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await product(api, admin_headers, "MUG", on_hand=2)
    cart = await new_guest_cart(api)
    response = await put_item(api, cart["cart_id"], "MUG", 5, guest(cart["cart_token"]))
    assert response.status_code == 200
    assert response.json()["items"][0]["available"] is False


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/carts/not-a-uuid/items/MUG", {"quantity": 1}, id="bad-uuid"),
        pytest.param("/carts/{id}/items/-MUG", {"quantity": 1}, id="bad-sku"),
        pytest.param("/carts/{id}/items/MU%00G", {"quantity": 1}, id="nul-in-sku"),
        pytest.param("/carts/{id}/items/MUG", {"quantity": 1001}, id="too-many"),
        pytest.param("/carts/{id}/items/MUG", {"quantity": -1}, id="negative"),
        pytest.param("/carts/{id}/items/MUG", {"quantity": "1"}, id="string"),
        pytest.param("/carts/{id}/items/MUG", {"quantity": 1.5}, id="float"),
        pytest.param("/carts/{id}/items/MUG", {}, id="missing"),
        pytest.param("/carts/{id}/items/MUG", {"quantity": 1, "price": 1}, id="extra"),
    ],
)
async def test_bad_input_to_put_is_422(
    api: httpx.AsyncClient, admin_headers: dict[str, str], path: str, body: dict[str, Any]
) -> None:
    await product(api, admin_headers, "MUG")
    cart = await new_guest_cart(api)
    response = await api.put(
        path.replace("{id}", cart["cart_id"]), json=body, headers=guest(cart["cart_token"])
    )
    assert_error(response, 422, "validation_error")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"items": [{"sku": "MU\x00G", "quantity": 1}]}, id="nul-in-sku"),
        pytest.param({"items": [{"sku": "MUG", "quantity": 0}]}, id="zero"),
        pytest.param(
            {"items": [{"sku": "MUG", "quantity": 600}, {"sku": "MUG", "quantity": 600}]},
            id="lines-above-1000",
        ),
        pytest.param({"items": "MUG"}, id="not-a-list"),
    ],
)
async def test_bad_input_to_post_is_422(
    api: httpx.AsyncClient, admin_headers: dict[str, str], body: dict[str, Any]
) -> None:
    await product(api, admin_headers, "MUG")
    assert_error(await api.post("/carts", json=body), 422, "validation_error")


async def test_a_nul_in_the_guest_token_of_a_merge_is_422(api: httpx.AsyncClient) -> None:
    cart = (await api.post("/carts", headers=customer("ada"))).json()
    response = await api.post(
        f"/carts/{cart['cart_id']}/merge",
        json={"guest_cart_token": "ct_" + "A" * 42 + "\x00"},
        headers=customer("ada"),
    )
    assert_error(response, 422, "validation_error")


async def test_twenty_concurrent_puts_of_different_skus_all_stick(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    skus = [f"SKU-{n:02}" for n in range(20)]
    for sku in skus:
        await product(api, admin_headers, sku)
    cart = await new_guest_cart(api)
    headers = guest(cart["cart_token"])

    responses = await asyncio.gather(
        *(put_item(api, cart["cart_id"], sku, n + 1, headers) for n, sku in enumerate(skus))
    )

    assert [r.status_code for r in responses] == [200] * 20
    # Each answer saw its own change and got a version of its own.
    assert sorted(r.json()["version"] for r in responses) == list(range(2, 22))
    final = (await api.get(f"/carts/{cart['cart_id']}", headers=headers)).json()
    assert final["version"] == 21
    assert [(i["sku"], i["quantity"]) for i in final["items"]] == [
        (sku, n + 1) for n, sku in enumerate(skus)
    ]


async def test_if_match_refuses_a_stale_version(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await product(api, admin_headers, "MUG")
    await product(api, admin_headers, "TEA")
    cart = await new_guest_cart(api)
    headers = guest(cart["cart_token"])
    url = f"/carts/{cart['cart_id']}/items/MUG"

    first = await api.put(url, json={"quantity": 1}, headers={**headers, "If-Match": '"1"'})
    assert first.status_code == 200, first.text
    stale = await api.put(url, json={"quantity": 5}, headers={**headers, "If-Match": "1"})
    body = assert_error(stale, 412, "version_conflict")
    assert body["details"] == {"current_version": 2}
    stale_delete = await api.delete(
        f"/carts/{cart['cart_id']}", headers={**headers, "If-Match": "1"}
    )
    assert_error(stale_delete, 412, "version_conflict")

    current = await api.put(
        url, json={"quantity": 5}, headers={**headers, "If-Match": first.headers["etag"]}
    )
    assert current.status_code == 200
    assert current.json()["version"] == 3
    assert current.json()["items"][0]["quantity"] == 5
    anything = await api.put(url, json={"quantity": 6}, headers={**headers, "If-Match": "*"})
    assert anything.status_code == 200

    bad = await api.put(url, json={"quantity": 6}, headers={**headers, "If-Match": "v3"})
    assert_error(bad, 422, "validation_error")


async def test_concurrent_changes_against_one_version_let_one_through(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    skus = [f"SKU-{n}" for n in range(8)]
    for sku in skus:
        await product(api, admin_headers, sku)
    cart = await new_guest_cart(api)
    headers = {**guest(cart["cart_token"]), "If-Match": '"1"'}

    responses = await asyncio.gather(
        *(put_item(api, cart["cart_id"], sku, 1, headers) for sku in skus)
    )

    assert sorted(r.status_code for r in responses) == [200] + [412] * 7
    final = (await api.get(f"/carts/{cart['cart_id']}", headers=guest(cart["cart_token"]))).json()
    assert (final["version"], len(final["items"])) == (2, 1)


# -- merging a guest's cart -----------------------------------------------------------------


async def test_merge_sums_lines_under_the_caps_and_closes_the_guest_cart(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await product(api, admin_headers, "MUG", max_per_order=5)
    await product(api, admin_headers, "TEA")
    await product(api, admin_headers, "PEN")
    ada = customer("ada")
    mine = (
        await api.post(
            "/carts",
            json={"items": [{"sku": "MUG", "quantity": 4}, {"sku": "TEA", "quantity": 900}]},
            headers=ada,
        )
    ).json()
    theirs = await new_guest_cart(
        api,
        items=[
            {"sku": "MUG", "quantity": 3},
            {"sku": "TEA", "quantity": 300},
            {"sku": "PEN", "quantity": 2},
        ],
    )

    merged = await api.post(
        f"/carts/{mine['cart_id']}/merge",
        json={"guest_cart_token": theirs["cart_token"]},
        headers=ada,
    )

    assert merged.status_code == 200, merged.text
    assert merged.json()["version"] == 2
    assert merged.headers["etag"] == '"2"'
    assert [(i["sku"], i["quantity"]) for i in merged.json()["items"]] == [
        ("MUG", 5),
        ("PEN", 2),
        ("TEA", 1000),
    ]
    guest_read = await api.get(f"/carts/{theirs['cart_id']}", headers=guest(theirs["cart_token"]))
    assert guest_read.json()["status"] == "merged"
    assert_error(
        await put_item(api, theirs["cart_id"], "PEN", 1, guest(theirs["cart_token"])),
        409,
        "invalid_state",
    )

    again = await api.post(
        f"/carts/{mine['cart_id']}/merge",
        json={"guest_cart_token": theirs["cart_token"]},
        headers=ada,
    )
    assert again.status_code == 200
    assert again.json() == merged.json()


async def test_two_concurrent_merges_of_one_guest_cart_count_its_lines_once(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await product(api, admin_headers, "MUG")
    ada = customer("ada")
    mine = (
        await api.post("/carts", json={"items": [{"sku": "MUG", "quantity": 1}]}, headers=ada)
    ).json()
    theirs = await new_guest_cart(api, items=[{"sku": "MUG", "quantity": 2}])
    body = {"guest_cart_token": theirs["cart_token"]}

    responses = await asyncio.gather(
        *(api.post(f"/carts/{mine['cart_id']}/merge", json=body, headers=ada) for _ in range(2))
    )

    assert [r.status_code for r in responses] == [200, 200]
    final = (await api.get(f"/carts/{mine['cart_id']}", headers=ada)).json()
    assert [(i["sku"], i["quantity"]) for i in final["items"]] == [("MUG", 3)]
    assert final["version"] == 2


async def test_merge_refusals(api: httpx.AsyncClient, admin_headers: dict[str, str]) -> None:
    await product(api, admin_headers, "MUG")
    await product(api, admin_headers, "EURO", currency="eur")
    ada, bob = customer("ada"), customer("bob")
    mine = (
        await api.post("/carts", json={"items": [{"sku": "MUG", "quantity": 1}]}, headers=ada)
    ).json()
    euros = await new_guest_cart(api, items=[{"sku": "EURO", "quantity": 1}])
    url = f"/carts/{mine['cart_id']}/merge"
    body = {"guest_cart_token": euros["cart_token"]}

    assert_error(await api.post(url, json=body), 401, "unauthorized")
    assert_error(
        await api.post(url, json=body, headers=guest(euros["cart_token"])), 403, "forbidden"
    )
    assert_error(await api.post(url, json=body, headers=bob), 404, "not_found")
    assert_error(await api.post(url, json=body, headers=ada), 422, "validation_error")
    unknown = {"guest_cart_token": "ct_" + "B" * 43}
    assert_error(await api.post(url, json=unknown, headers=ada), 404, "not_found")
    assert_error(
        await api.post(url, json=body, headers={**ada, "If-Match": "7"}), 412, "version_conflict"
    )

    # Nothing changed on either side.
    assert (await api.get(url.removesuffix("/merge"), headers=ada)).json()["version"] == 1
    guest_read = await api.get(f"/carts/{euros['cart_id']}", headers=guest(euros["cart_token"]))
    assert (guest_read.json()["status"], guest_read.json()["version"]) == ("open", 1)


# -- expiry ---------------------------------------------------------------------------------


async def test_a_guest_cart_expires_cart_ttl_after_its_last_change(
    api: httpx.AsyncClient, admin_headers: dict[str, str], db: SessionFactory
) -> None:
    await product(api, admin_headers, "MUG")
    cart = await new_guest_cart(api)
    headers = guest(cart["cart_token"])
    customer_cart = (await api.post("/carts", headers=customer("ada"))).json()

    async def ttl_left() -> float:
        async with db() as session:
            seconds = await session.scalar(
                text(
                    "SELECT extract(epoch FROM expires_at - updated_at) FROM carts WHERE id = :id"
                ),
                {"id": cart["cart_id"]},
            )
        return float(seconds)

    assert await ttl_left() == CART_TTL
    async with db.begin() as session:
        await session.execute(
            text("UPDATE carts SET expires_at = now() + interval '1 minute' WHERE id = :id"),
            {"id": cart["cart_id"]},
        )
    assert (await put_item(api, cart["cart_id"], "MUG", 1, headers)).status_code == 200
    assert await ttl_left() == CART_TTL  # the change started the clock again

    async with db.begin() as session:
        await session.execute(
            text(
                "UPDATE carts SET expires_at = now() - interval '1 second'"
                " WHERE token_hash IS NOT NULL"
            )
        )
    assert_error(await api.get(f"/carts/{cart['cart_id']}", headers=headers), 404, "not_found")
    assert_error(await put_item(api, cart["cart_id"], "MUG", 2, headers), 404, "not_found")
    # A customer's cart does not expire.
    assert (
        await api.get(f"/carts/{customer_cart['cart_id']}", headers=customer("ada"))
    ).status_code == 200

    assert await CartStore(db, ttl_seconds=CART_TTL).expire() == 1
    async with db() as session:
        status = await session.scalar(
            text("SELECT status FROM carts WHERE id = :id"), {"id": cart["cart_id"]}
        )
    assert status == "expired"
    assert_error(await api.get(f"/carts/{cart['cart_id']}", headers=headers), 404, "not_found")
    assert_error(
        await api.get(f"/carts/{cart['cart_id']}", headers=admin_headers), 404, "not_found"
    )


async def test_an_order_token_reaches_no_cart_and_creates_none(
    api: httpx.AsyncClient, app_settings: Settings
) -> None:
    cart = await new_guest_cart(api)
    order_token = Authenticator(app_settings).order_token(uuid.uuid4())
    headers = {"Authorization": f"Bearer {order_token}"}

    assert_error(await api.get(f"/carts/{cart['cart_id']}", headers=headers), 404, "not_found")
    assert_error(await api.post("/carts", headers=headers), 403, "forbidden")


async def test_nothing_merges_into_a_closed_cart(
    api: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await product(api, admin_headers, "MUG")
    ada = customer("ada")
    mine = (await api.post("/carts", headers=ada)).json()
    theirs = await new_guest_cart(api, items=[{"sku": "MUG", "quantity": 1}])
    assert (await api.delete(f"/carts/{mine['cart_id']}", headers=ada)).status_code == 204

    response = await api.post(
        f"/carts/{mine['cart_id']}/merge",
        json={"guest_cart_token": theirs["cart_token"]},
        headers=ada,
    )

    assert_error(response, 409, "invalid_state")
    guest_read = await api.get(f"/carts/{theirs['cart_id']}", headers=guest(theirs["cart_token"]))
    assert guest_read.json()["status"] == "open"


async def test_an_address_opens_only_so_many_carts(
    db: SessionFactory, app_settings: Settings, admin_headers: dict[str, str]
) -> None:
    """RATE_LIMIT_CARTS per client address (3/hour here: in memory the windows are aligned to
    the clock), behind a trusted proxy so that a request says where it comes from."""
    own = app_settings.model_copy(
        update={
            "customer_jwt_secret": SecretStr(JWT_SECRET),
            "rate_limit_carts": "3/hour",
            "trusted_proxies": ["127.0.0.1"],
        }
    )
    carts_before = await _count_carts(db)
    async with running_app(own) as api:
        here = {"X-Forwarded-For": "198.51.100.20"}
        made = [await api.post("/carts", headers=here) for _ in range(3)]
        assert [r.status_code for r in made] == [201, 201, 201]
        refused = await api.post("/carts", headers=here)
        body = assert_error(refused, 429, "rate_limited")
        assert 1 <= int(refused.headers["retry-after"]) <= 3600
        assert body["details"] == {"retry_after": int(refused.headers["retry-after"])}
        # A customer of that address is counted too (its address spent the budget).
        as_customer = await api.post("/carts", headers={**here, **customer("carts-limit")})
        assert as_customer.status_code == 429
        # Nothing was made by the refused ones; another address, and admin, go on.
        assert await _count_carts(db) == carts_before + 3
        other = await api.post("/carts", headers={"X-Forwarded-For": "198.51.100.21"})
        assert other.status_code == 201
        admin = await api.post("/carts", headers={**here, **admin_headers})
        assert admin.status_code == 201
        # The carts made go on working: reading and changing them is not limited.
        token = made[0].json()["cart_token"]
        cart_id = made[0].json()["cart_id"]
        for _ in range(5):
            read = await api.get(f"/carts/{cart_id}", headers={**here, **guest(token)})
            assert read.status_code == 200


async def _count_carts(db: SessionFactory) -> int:
    async with db() as session:
        return int(await session.scalar(text("SELECT count(*) FROM carts")) or 0)
