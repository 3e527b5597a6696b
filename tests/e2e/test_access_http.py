"""Who reaches what, over HTTP against the real stack: a checkout's access token reaches its
order and nothing else, a customer JWT its `sub`'s orders, the admin token everything; no
credential or a bad one is 401, the wrong kind 403, someone else's order 404 exactly like a
missing one. Ids that no client can compute, keys scoped by customer, and an access token that
is kept nowhere in clear: not in the database, not in the checkout's Temporal history."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
from google.protobuf.message import Message
from pydantic import SecretStr
from sqlalchemy import text
from temporalio.api.common.v1 import Payload

from core.db import SessionFactory
from core.invariants import check
from core.models import Base
from core.settings import Settings
from tests.e2e.stack import ADMIN, Stack, running_stack, stack_settings
from tests.e2e.test_checkout_http import (
    as_owner,
    cart,
    checkout,
    inventory,
    order_of,
    put_product,
    state_of,
)

pytestmark = pytest.mark.e2e

JWT_SECRET = "e2e-customer-jwt-secret-for-tests-only-0123456789"
ISSUER = "https://id.shop.example/"
AUDIENCE = "checkout-api"


@pytest.fixture(scope="module")
async def customer_stack(settings: Settings, temporal_address: str) -> AsyncIterator[Stack]:
    """The stack with customer JWTs turned on (HS256, issuer and audience checked)."""
    own = stack_settings(
        settings,
        "access",
        temporal_address,
        customer_jwt_secret=SecretStr(JWT_SECRET),
        customer_jwt_issuer=ISSUER,
        customer_jwt_audience=AUDIENCE,
    )
    async with running_stack(own) as stack:
        yield stack


@pytest.fixture
async def stack(customer_stack: Stack, db: SessionFactory) -> AsyncIterator[Stack]:
    checkouts = customer_stack.services.checkouts
    ttl = checkouts.key_ttl_seconds
    yield customer_stack
    checkouts.key_ttl_seconds = ttl
    services = customer_stack.services
    assert await check(services.sessions, services.stripe) == []


# -- credentials ----------------------------------------------------------------------------


def claims(sub: str, **more: Any) -> dict[str, Any]:
    """What the shop's identity provider puts in a customer's token."""
    now = int(time.time())
    return {"sub": sub, "iat": now, "exp": now + 600, "iss": ISSUER, "aud": AUDIENCE, **more}


def mint(payload: dict[str, Any], secret: str = JWT_SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def customer(sub: str, **more: Any) -> dict[str, str]:
    return bearer(mint(claims(sub, **more)))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unsigned(payload: dict[str, Any]) -> str:
    """A token that says `alg: none`, built by hand (PyJWT will not sign one like it)."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(payload).encode())}."


def with_claims_of(token: str, payload: dict[str, Any]) -> str:
    """A valid token's header and signature around other claims."""
    header, _, signature = token.split(".")
    return f"{header}.{_b64(json.dumps(payload).encode())}.{signature}"


def other_char(c: str) -> str:
    return "A" if c != "A" else "B"


def tampered(token: str, position: int) -> str:
    """The access token with one character of its body changed (still well formed)."""
    chars = list(token)
    chars[position] = other_char(chars[position])
    return "".join(chars)


def forged(token: str, order_id: str) -> str:
    """Another order's id under this token's MAC."""
    raw = base64.urlsafe_b64decode(token[3:] + "=" * (-len(token[3:]) % 4))
    return "ot_" + _b64(uuid.UUID(order_id).bytes + raw[16:])


# -- requests -------------------------------------------------------------------------------


async def post_checkout(
    stack: Stack,
    body: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    key: str | None = None,
) -> httpx.Response:
    headers = {**(headers or {}), **({"Idempotency-Key": key} if key else {})}
    return await stack.api.post("/checkout", json=body, headers=headers)


async def opened(
    stack: Stack,
    body: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    key: str | None = None,
    status: int = 201,
) -> dict[str, Any]:
    response = await post_checkout(stack, body, headers=headers, key=key)
    assert response.status_code == status, response.text
    return response.json()  # type: ignore[no-any-return]


def as_user(body: dict[str, Any], user_id: str) -> dict[str, Any]:
    return {**body, "customer": {**body["customer"], "user_id": user_id}}


def buyer_routes(created: dict[str, Any]) -> list[tuple[str, str]]:
    """The routes an order's buyer uses, for this checkout."""
    return [
        ("GET", f"/orders/{created['order_id']}"),
        ("GET", f"/checkouts/{created['checkout_id']}"),
        ("POST", f"/orders/{created['order_id']}/cancel"),
    ]


def missing_routes() -> tuple[list[tuple[str, str]], list[str]]:
    """The same routes for an order and a checkout that do not exist, and their ids."""
    order_id, checkout_id = str(uuid.uuid4()), str(uuid.uuid4())
    routes = buyer_routes({"order_id": order_id, "checkout_id": checkout_id})
    return routes, [order_id, checkout_id]


def without_ids(response: httpx.Response, *ids: str) -> tuple[int, str]:
    """Status and body with the ids it names blanked, to compare two refusals."""
    body = response.text
    for id in ids:
        body = body.replace(id, "<id>")
    return response.status_code, body


async def assert_not_found_as_if_missing(
    stack: Stack, created: dict[str, Any], headers: dict[str, str]
) -> None:
    """Every buyer route of `created`, with `headers`, answers as for ids nobody has."""
    missing, missing_ids = missing_routes()
    for (method, path), (_, absent) in zip(buyer_routes(created), missing, strict=True):
        refused = await stack.api.request(method, path, headers=headers)
        as_missing = await stack.api.request(method, absent, headers=headers)
        assert refused.status_code == 404, (path, refused.text)
        assert refused.json()["error"] == "not_found"
        assert without_ids(refused, created["order_id"], created["checkout_id"]) == without_ids(
            as_missing, *missing_ids
        )


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def count(stack: Stack, table: str) -> int:
    async with stack.services.sessions() as session:
        return int(await session.scalar(text(f"SELECT count(*) FROM {table}")) or 0)  # noqa: S608 - fixed names


async def orders_page(
    stack: Stack, headers: dict[str, str], **params: Any
) -> tuple[list[dict[str, Any]], str | None]:
    response = await stack.api.get("/orders", params=params, headers=headers)
    assert response.status_code == 200, response.text
    page = response.json()
    return page["orders"], page["next_cursor"]


async def all_orders(
    stack: Stack, headers: dict[str, str], limit: int, **params: Any
) -> list[list[str]]:
    """GET /orders page by page, following next_cursor: the order ids of each page."""
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        extra = {"cursor": cursor} if cursor else {}
        orders, cursor = await orders_page(stack, headers, limit=limit, **params, **extra)
        assert len(orders) <= limit
        pages.append([o["order_id"] for o in orders])
        if cursor is None:
            return pages
        assert len(pages) < 100, "next_cursor never ran out"


# -- the order's access token ---------------------------------------------------------------


async def test_an_order_token_reaches_its_order_and_checkout_only(stack: Stack) -> None:
    await put_product(stack, "ACC-OWN", 10)
    mine = await checkout(stack, cart(("ACC-OWN", 2), email="owner@example.com"))
    theirs = await checkout(stack, cart(("ACC-OWN", 1), email="neighbour@example.com"))
    assert mine["access_token"].startswith("ot_")
    assert mine["access_token"] != theirs["access_token"]

    order = await order_of(stack, mine)
    state = await state_of(stack, mine)

    assert (order["order_id"], order["status"]) == (mine["order_id"], "pending_payment")
    assert order["customer"] == {"email": "owner@example.com", "user_id": None}
    assert (state["checkout_id"], state["status"]) == (mine["checkout_id"], "pending_payment")
    # The neighbour's token reaches neither my order, nor my checkout, nor cancels it: to it,
    # they do not exist.
    await assert_not_found_as_if_missing(stack, mine, as_owner(theirs))
    assert (await order_of(stack, mine))["status"] == "pending_payment"
    assert await inventory(stack, "ACC-OWN") == (10, 3, 7)

    cancelled = await stack.api.post(f"/orders/{mine['order_id']}/cancel", headers=as_owner(mine))

    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json() == {"order_id": mine["order_id"], "status": "cancelled"}
    assert await inventory(stack, "ACC-OWN") == (10, 1, 9)
    assert (await order_of(stack, theirs))["status"] == "pending_payment"


def _bad_credentials(created: dict[str, Any], other: dict[str, Any]) -> Iterator[dict[str, str]]:
    token = created["access_token"]
    yield {}
    yield {"Authorization": f"Basic {token}"}
    yield {"Authorization": "Bearer"}
    yield bearer("ot_")
    yield bearer("ot_not-a-token")
    yield bearer(token[:-1])
    yield bearer(token + "A")
    yield bearer(tampered(token, 3))  # in the order id
    yield bearer(tampered(token, len(token) - 1))  # in the MAC
    yield bearer(forged(other["access_token"], created["order_id"]))
    yield bearer("ot_" + token[3:].upper())
    yield bearer(str(uuid.uuid4()))
    yield bearer("a.b.c")


async def test_no_credential_or_a_malformed_token_is_401(stack: Stack) -> None:
    await put_product(stack, "ACC-401", 10)
    created = await checkout(stack, cart(("ACC-401", 2), email="locked@example.com"))
    other = await checkout(stack, cart(("ACC-401", 1), email="other-lock@example.com"))

    for headers in _bad_credentials(created, other):
        for method, path in buyer_routes(created):
            response = await stack.api.request(method, path, headers=headers)
            assert_unauthorized(response)

    assert (await order_of(stack, created))["status"] == "pending_payment"
    assert await inventory(stack, "ACC-401") == (10, 3, 7)


async def test_an_order_token_is_forbidden_on_admin_routes_and_cannot_list_orders(
    stack: Stack,
) -> None:
    await put_product(stack, "ACC-ADM", 10)
    created = await checkout(stack, cart(("ACC-ADM", 1), email="not-admin@example.com"))
    product = {"name": "Stolen", "unit_price": 1, "currency": "usd", "on_hand": 1000}

    put = await stack.api.put("/admin/products/ACC-ADM", json=product, headers=as_owner(created))
    refund = await stack.api.post(
        f"/admin/orders/{created['order_id']}/refund", headers=as_owner(created)
    )
    listed = await stack.api.get("/orders", headers=as_owner(created))

    for forbidden in (put, refund):
        assert forbidden.status_code == 403, forbidden.text
        assert forbidden.json()["error"] == "forbidden"
    assert_unauthorized(listed)
    # Without any credential, the admin routes and the list are 401.
    assert_unauthorized(await stack.api.put("/admin/products/ACC-ADM", json=product))
    assert_unauthorized(await stack.api.post(f"/admin/orders/{created['order_id']}/refund"))
    assert_unauthorized(await stack.api.get("/orders"))
    # Nothing changed: not the stock, not the order.
    assert await inventory(stack, "ACC-ADM") == (10, 1, 9)
    assert (await order_of(stack, created))["status"] == "pending_payment"


# -- customers ------------------------------------------------------------------------------


async def test_a_customers_checkout_belongs_to_its_sub_whatever_the_email(stack: Stack) -> None:
    await put_product(stack, "CUS-SUB", 10)
    sub = f"user-{uuid.uuid4()}"
    alice = customer(sub, email="alice@id.example")

    created = await opened(
        stack, cart(("CUS-SUB", 1), email="alice.work@example.com"), headers=alice
    )
    named = await opened(
        stack, as_user(cart(("CUS-SUB", 2), email="alice@example.com"), sub), headers=alice
    )

    for c, email in ((created, "alice.work@example.com"), (named, "alice@example.com")):
        as_customer = await stack.api.get(f"/orders/{c['order_id']}", headers=alice)
        assert as_customer.status_code == 200, as_customer.text
        assert as_customer.json()["customer"] == {"email": email, "user_id": sub}
        admin_view = (await stack.api.get(f"/orders/{c['order_id']}", headers=ADMIN)).json()
        assert admin_view["customer"] == {"email": email, "user_id": sub}
        state = await stack.api.get(f"/checkouts/{c['checkout_id']}", headers=alice)
        assert state.status_code == 200, state.text
        assert state.json()["status"] == "pending_payment"
        # Its order token works as well as the customer's own.
        assert (await order_of(stack, c))["order_id"] == c["order_id"]
    cancelled = await stack.api.post(f"/orders/{created['order_id']}/cancel", headers=alice)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert await inventory(stack, "CUS-SUB") == (10, 2, 8)


async def test_a_customer_lists_its_own_orders_newest_first_page_by_page(stack: Stack) -> None:
    await put_product(stack, "CUS-LIST", 100)
    alice_sub, bob_sub = f"alice-{uuid.uuid4()}", f"bob-{uuid.uuid4()}"
    alice, bob = customer(alice_sub), customer(bob_sub)
    mine: list[str] = []
    for i in range(7):
        created = await opened(
            stack, cart(("CUS-LIST", 1 + i % 3), email="alice@example.com"), headers=alice
        )
        mine.append(created["order_id"])
        # Other people's orders in between: bob's, and a guest's with alice's own email.
        if i % 3 == 0:
            await opened(stack, cart(("CUS-LIST", 1), email="bob@example.com"), headers=bob)
            await checkout(stack, cart(("CUS-LIST", 1), email="alice@example.com"))
    newest_first = mine[::-1]

    pages = await all_orders(stack, alice, limit=3)
    one_page, cursor = await orders_page(stack, alice, limit=7)
    everything, _ = await orders_page(stack, alice)
    # Filters name nobody else for a customer: it still sees its own orders only.
    filtered, _ = await orders_page(stack, alice, user_id=bob_sub, email="bob@example.com")

    assert [len(p) for p in pages] == [3, 3, 1]
    assert [o for p in pages for o in p] == newest_first
    assert ([o["order_id"] for o in one_page], cursor) == (newest_first, None)
    assert [o["order_id"] for o in everything] == newest_first
    assert [o["order_id"] for o in filtered] == newest_first
    assert all(o["customer"]["user_id"] == alice_sub for o in everything)
    assert [o["created_at"] for o in everything] == sorted(
        (o["created_at"] for o in everything), reverse=True
    )
    assert "events" not in everything[0]
    assert len([o for p in await all_orders(stack, bob, limit=2) for o in p]) == 3


async def test_a_customer_does_not_reach_another_customers_order(stack: Stack) -> None:
    await put_product(stack, "CUS-OTHER", 10)
    bob = await opened(
        stack, cart(("CUS-OTHER", 2), email="bob@example.com"), headers=customer("bob-1")
    )

    await assert_not_found_as_if_missing(stack, bob, customer("alice-1", email="bob@example.com"))

    assert (await order_of(stack, bob))["status"] == "pending_payment"
    assert await inventory(stack, "CUS-OTHER") == (10, 2, 8)
    listed, _ = await orders_page(stack, customer("alice-1"))
    assert listed == []


async def test_naming_someone_elses_user_id_is_forbidden_and_creates_nothing(
    stack: Stack,
) -> None:
    await put_product(stack, "CUS-403", 10)
    body = as_user(cart(("CUS-403", 1), email="mallory@example.com"), "alice-2")

    as_customer = await post_checkout(
        stack, body, headers=customer("mallory-2"), key=str(uuid.uuid4())
    )
    as_guest = await post_checkout(stack, body, key=str(uuid.uuid4()))
    as_guest_naming_nobody_else = await post_checkout(
        stack, as_user(cart(("CUS-403", 1), email="guest@example.com"), "guest@example.com")
    )

    for refused in (as_customer, as_guest, as_guest_naming_nobody_else):
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"] == "forbidden"
    assert await inventory(stack, "CUS-403") == (10, 0, 10)
    assert await count(stack, "orders") == 0
    assert await count(stack, "checkout_keys") == 0


async def test_a_customer_token_is_forbidden_on_admin_routes(stack: Stack) -> None:
    await put_product(stack, "CUS-ADM", 10)
    alice = customer("alice-3", email="alice@example.com")
    created = await opened(stack, cart(("CUS-ADM", 1), email="alice@example.com"), headers=alice)
    product = {"name": "Mine now", "unit_price": 1, "currency": "usd", "on_hand": 1000}

    put = await stack.api.put("/admin/products/CUS-ADM", json=product, headers=alice)
    refund = await stack.api.post(f"/admin/orders/{created['order_id']}/refund", headers=alice)

    for forbidden in (put, refund):
        assert forbidden.status_code == 403, forbidden.text
        assert forbidden.json()["error"] == "forbidden"
    assert await inventory(stack, "CUS-ADM") == (10, 1, 9)
    assert (await order_of(stack, created))["status"] == "pending_payment"


def _expired(sub: str) -> str:
    return mint(claims(sub, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600))


def _badly_signed(sub: str) -> str:
    return mint(claims(sub), secret="another-identity-providers-secret-0123456789")


def _wrong_audience(sub: str) -> str:
    return mint(claims(sub, aud="another-api"))


def _wrong_issuer(sub: str) -> str:
    return mint(claims(sub, iss="https://id.evil.example/"))


def _alg_none(sub: str) -> str:
    return unsigned(claims(sub))


def _without_sub(sub: str) -> str:
    return mint({k: v for k, v in claims(sub).items() if k != "sub"})


def _blank_sub(sub: str) -> str:
    return mint(claims(" "))


def _without_exp(sub: str) -> str:
    return mint({k: v for k, v in claims(sub).items() if k != "exp"})


def _claims_swapped(sub: str) -> str:
    return with_claims_of(mint(claims("someone-else")), claims(sub))


BAD_JWTS: dict[str, Callable[[str], str]] = {
    "expired": _expired,
    "badly-signed": _badly_signed,
    "wrong-audience": _wrong_audience,
    "wrong-issuer": _wrong_issuer,
    "alg-none": _alg_none,
    "without-sub": _without_sub,
    "blank-sub": _blank_sub,
    "without-exp": _without_exp,
    "claims-swapped": _claims_swapped,
}


@pytest.mark.parametrize("kind", list(BAD_JWTS))
async def test_a_customer_token_that_does_not_verify_is_401_and_creates_nothing(
    stack: Stack, kind: str
) -> None:
    await put_product(stack, "CUS-401", 10)
    sub = f"user-{uuid.uuid4()}"
    headers = bearer(BAD_JWTS[kind](sub))
    body = cart(("CUS-401", 2), email="nobody@example.com")

    posted = await post_checkout(stack, body, headers=headers, key=str(uuid.uuid4()))
    posted_without_key = await post_checkout(stack, body, headers=headers)
    listed = await stack.api.get("/orders", headers=headers)

    for response in (posted, posted_without_key, listed):
        assert_unauthorized(response)
    assert await inventory(stack, "CUS-401") == (10, 0, 10)
    assert await count(stack, "orders") == 0
    assert await count(stack, "checkout_keys") == 0
    # The same customer with a good token is served.
    assert (await opened(stack, body, headers=customer(sub)))["status"] == "pending_payment"


# -- admin ----------------------------------------------------------------------------------


async def test_admin_finds_orders_by_email_or_user_id_and_reaches_every_order(
    stack: Stack,
) -> None:
    await put_product(stack, "ADM-FIND", 100)
    grace_sub = f"grace-{uuid.uuid4()}"
    as_guest = await checkout(stack, cart(("ADM-FIND", 1), email="Grace.Hopper@Example.com"))
    as_customer = await opened(
        stack,
        cart(("ADM-FIND", 2), email="grace.hopper@example.com"),
        headers=customer(grace_sub, email="grace.hopper@example.com"),
    )
    on_her_behalf = await opened(
        stack,
        as_user(cart(("ADM-FIND", 3), email="g.hopper@example.com"), grace_sub),
        headers=ADMIN,
    )
    someone_else = await checkout(stack, cart(("ADM-FIND", 1), email="ada@example.com"))

    by_email, _ = await orders_page(stack, ADMIN, email="GRACE.HOPPER@example.COM")
    by_user, _ = await orders_page(stack, ADMIN, user_id=grace_sub)
    by_both, _ = await orders_page(
        stack, ADMIN, email="grace.hopper@EXAMPLE.com", user_id=grace_sub
    )
    everyone = [o for p in await all_orders(stack, ADMIN, limit=3) for o in p]

    assert [o["order_id"] for o in by_email] == [as_customer["order_id"], as_guest["order_id"]]
    assert [o["order_id"] for o in by_user] == [on_her_behalf["order_id"], as_customer["order_id"]]
    assert [o["order_id"] for o in by_both] == [as_customer["order_id"]]
    all_four = [someone_else, on_her_behalf, as_customer, as_guest]
    assert everyone == [c["order_id"] for c in all_four]
    for created in all_four:
        order = await stack.api.get(f"/orders/{created['order_id']}", headers=ADMIN)
        state = await stack.api.get(f"/checkouts/{created['checkout_id']}", headers=ADMIN)
        assert order.status_code == state.status_code == 200
        assert order.json()["checkout_id"] == created["checkout_id"]
        assert state.json()["order_id"] == created["order_id"]
    cancelled = await stack.api.post(f"/orders/{as_guest['order_id']}/cancel", headers=ADMIN)
    assert cancelled.json() == {"order_id": as_guest["order_id"], "status": "cancelled"}
    # What she sees herself: her own two, not the guest's nor the others'.
    hers, _ = await orders_page(stack, customer(grace_sub))
    assert [o["order_id"] for o in hers] == [on_her_behalf["order_id"], as_customer["order_id"]]


# -- ids and keys ---------------------------------------------------------------------------

NAMESPACES = (
    uuid.NAMESPACE_DNS,
    uuid.NAMESPACE_URL,
    uuid.NAMESPACE_OID,
    uuid.NAMESPACE_X500,
    uuid.UUID(int=0),
)


def derivations(*names: str) -> set[uuid.UUID]:
    """Every id a client could compute from these names under a namespace it could know."""
    return {
        derive(namespace, name)
        for namespace in NAMESPACES
        for name in names
        for derive in (uuid.uuid3, uuid.uuid5)
    }


def assert_random_ids(created: dict[str, Any], key: str, email: str) -> None:
    checkout_id, order_id = uuid.UUID(created["checkout_id"]), uuid.UUID(created["order_id"])
    for id in (checkout_id, order_id):
        assert (id.version, id.variant) == (4, uuid.RFC_4122), id
    known = derivations(key, f"{email}:{key}", f"email:{email}:{key}", f"email:{email}{key}")
    assert checkout_id not in known
    assert order_id not in known | derivations(str(checkout_id))
    assert order_id not in {uuid.uuid5(checkout_id, name) for name in ("", "order", key)}


async def test_ids_are_random_whatever_the_key(stack: Stack) -> None:
    await put_product(stack, "IDS", 20)
    key = "cart-42"  # the README's own example: a key a client could well pick
    body_a = cart(("IDS", 1), email="ids-a@example.com")
    body_b = cart(("IDS", 1), email="ids-b@example.com")

    a = await opened(stack, body_a, key=key)
    b = await opened(stack, body_b, key=key)

    assert_random_ids(a, key, "ids-a@example.com")
    assert_random_ids(b, key, "ids-b@example.com")
    ids = {a["checkout_id"], a["order_id"], b["checkout_id"], b["order_id"]}
    assert len(ids) == 4
    # The same key and scope after the key's TTL: a new random checkout, unrelated to the first.
    stack.services.checkouts.key_ttl_seconds = 1
    c = await opened(stack, cart(("IDS", 1), email="ids-c@example.com"), key=key)
    deadline = time.monotonic() + 30
    while True:
        async with stack.services.sessions() as session:
            expired = await session.scalar(
                text("SELECT expires_at <= now() FROM checkout_keys WHERE key = :k AND scope = :s"),
                {"k": key, "s": "email:ids-c@example.com"},
            )
        if expired:
            break
        assert time.monotonic() < deadline, "the key never expired"
        await asyncio.sleep(0.1)
    # (While its checkout can still be paid the key stands for it; once closed, it is free.)
    cancelled = await stack.api.post(f"/orders/{c['order_id']}/cancel", headers=as_owner(c))
    assert cancelled.status_code == 200
    c_again = await opened(stack, cart(("IDS", 1), email="ids-c@example.com"), key=key)
    assert_random_ids(c_again, key, "ids-c@example.com")
    assert {c_again["checkout_id"], c_again["order_id"]}.isdisjoint(
        ids | {c["checkout_id"], c["order_id"]}
    )
    assert await inventory(stack, "IDS") == (20, 3, 17)


async def test_the_same_key_in_two_scopes_gives_two_independent_checkouts(stack: Stack) -> None:
    await put_product(stack, "SCOPE", 50)
    key = str(uuid.uuid4())
    body = cart(("SCOPE", 2), email="shared@example.com")
    alice, bob = customer(f"alice-{uuid.uuid4()}"), customer(f"bob-{uuid.uuid4()}")

    as_alice = await opened(stack, body, headers=alice, key=key)
    as_bob = await opened(stack, body, headers=bob, key=key)
    as_guest = await opened(stack, body, key=key)
    other_guest = await opened(stack, cart(("SCOPE", 2), email="other@example.com"), key=key)

    answers = [as_alice, as_bob, as_guest, other_guest]
    for field in ("checkout_id", "order_id", "access_token"):
        assert len({c[field] for c in answers}) == 4, field
    assert len({c["payment"]["payment_intent_id"] for c in answers}) == 4
    assert await inventory(stack, "SCOPE") == (50, 8, 42)
    # Each scope's duplicate gets its own answer back, never another's.
    for created, headers, again in (
        (as_alice, alice, body),
        (as_bob, bob, body),
        (as_guest, {}, body),
        (other_guest, {}, cart(("SCOPE", 2), email="other@example.com")),
    ):
        replay = await opened(stack, again, headers=headers, key=key, status=200)
        assert replay == created
    for created, sub in ((as_alice, alice), (as_bob, bob)):
        owner = (await stack.api.get(f"/orders/{created['order_id']}", headers=sub)).json()
        assert owner["order_id"] == created["order_id"]
    # A guest's scope is its email whatever its case: another spelling is another body.
    respelled = await post_checkout(stack, cart(("SCOPE", 2), email="Shared@example.com"), key=key)
    assert respelled.status_code == 422, respelled.text
    assert respelled.json()["error"] == "idempotency_key_reused"
    assert await inventory(stack, "SCOPE") == (50, 8, 42)


# -- the access token is kept nowhere in clear ----------------------------------------------


def payload_texts(message: Message) -> Iterator[str]:
    """The decoded data of every Payload inside a history event (the JSON shows base64)."""
    if isinstance(message, Payload):
        yield message.data.decode("utf-8", errors="replace")
        yield from (value.decode("utf-8", errors="replace") for value in message.metadata.values())
        return
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            values = list(value.values())
        elif field.is_repeated:
            values = list(value)
        else:
            values = [value]
        for item in values:
            if isinstance(item, Message):
                yield from payload_texts(item)


async def test_the_access_token_is_stored_nowhere_in_clear(stack: Stack) -> None:
    await put_product(stack, "SECRET", 10)
    key = str(uuid.uuid4())
    body = cart(("SECRET", 1), email="private@example.com")
    created = await opened(stack, body, key=key)
    token = created["access_token"]
    # Used the way a buyer would: read, replayed, paid.
    await order_of(stack, created)
    await state_of(stack, created)
    assert (await opened(stack, body, key=key, status=200))["access_token"] == token
    assert (await stack.stripe.pay(created["payment"]["payment_intent_id"])).status_code == 200
    await stack.wait_for_order(created["order_id"], "paid")
    mac = base64.urlsafe_b64decode(token[3:] + "=" * (-len(token[3:]) % 4))[16:]
    secrets = {token, token[3:], token[-32:], mac.hex(), base64.b64encode(mac).decode()}

    dumps: dict[str, str] = {}
    async with stack.services.sessions() as session:
        for table in Base.metadata.sorted_tables:
            rows = await session.scalars(text(f"SELECT t::text FROM {table.name} t"))  # noqa: S608 - fixed names
            dumps[table.name] = "\n".join(rows)
    history = await stack.history(created["checkout_id"])
    history_text = "\n".join(
        [history.to_json(), *(t for event in history.events for t in payload_texts(event))]
    )

    # The search would find the order if it were there: the dumps are not empty.
    assert created["order_id"] in dumps["orders"]
    assert created["order_id"] in dumps["checkout_keys"]
    assert created["order_id"] in history_text
    assert created["payment"]["payment_intent_id"] in history_text
    leaks = [
        where
        for where, dump in [*dumps.items(), ("temporal history", history_text)]
        if any(secret in dump for secret in secrets)
    ]
    assert leaks == []


async def test_a_customer_merges_a_guest_cart_on_login_and_checks_it_out_as_itself(
    stack: Stack,
) -> None:
    for sku in ("MUG", "TEE"):
        response = await stack.api.put(
            f"/admin/products/{sku}",
            json={"name": sku.title(), "unit_price": 1000, "currency": "usd", "on_hand": 10},
            headers=ADMIN,
        )
        assert response.status_code == 200, response.text
    guest = (await stack.api.post("/carts", json={"items": [{"sku": "MUG", "quantity": 2}]})).json()
    alice = customer("alice")
    mine = await stack.api.post(
        "/carts", json={"items": [{"sku": "TEE", "quantity": 1}]}, headers=alice
    )
    assert mine.status_code == 201, mine.text
    cart_id = mine.json()["cart_id"]
    merged = await stack.api.post(
        f"/carts/{cart_id}/merge", json={"guest_cart_token": guest["cart_token"]}, headers=alice
    )
    assert merged.status_code == 200, merged.text
    body = {"customer": {"email": "alice@example.com"}, "cart_id": cart_id}

    # Another customer does not reach Alice's cart; neither does the merged guest cart's token.
    assert (await post_checkout(stack, body, headers=customer("bob"))).status_code == 404
    closed_guest = await post_checkout(
        stack, {**body, "cart_id": guest["cart_id"]}, headers={"X-Cart-Token": guest["cart_token"]}
    )
    assert closed_guest.status_code == 409
    created = await opened(stack, body, headers=alice)
    assert [(i["sku"], i["quantity"]) for i in created["items"]] == [("MUG", 2), ("TEE", 1)]
    order = (await stack.api.get(f"/orders/{created['order_id']}", headers=alice)).json()
    assert order["customer"] == {"email": "alice@example.com", "user_id": "alice"}
    assert order["cart_id"] == cart_id
