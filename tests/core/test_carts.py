"""What checkout takes from a cart (`checkout_lines`) and how it closes one
(`mark_checked_out`), against real PostgreSQL."""

from __future__ import annotations

import uuid

import pytest

from core.carts import CartCaller, CartStatus, CartStore
from core.catalog import Catalog
from core.db import SessionFactory
from core.errors import ErrorCode, NotFound, ServiceError, Unauthorized
from core.models import Cart

ADA = CartCaller(user_id="ada", authenticated=True)
BOB = CartCaller(user_id="bob", authenticated=True)
ADMIN = CartCaller(admin=True, authenticated=True)


@pytest.fixture
async def carts(db: SessionFactory) -> CartStore:
    catalog = Catalog(db)
    for sku in ("MUG", "TEA"):
        await catalog.put_product(sku, name=sku, unit_price=500, currency="usd", on_hand=5)
    return CartStore(db, ttl_seconds=3600)


async def test_checkout_lines_are_the_cart_s_by_sku_for_whoever_reaches_it(
    carts: CartStore,
) -> None:
    cart, _ = await carts.create(ADA, {"TEA": 2, "MUG": 1})
    guest, _ = await carts.create(CartCaller(), {"MUG": 3})
    assert guest.token is not None

    assert await carts.checkout_lines(cart.id, ADA) == [("MUG", 1), ("TEA", 2)]
    assert await carts.checkout_lines(cart.id, ADMIN) == [("MUG", 1), ("TEA", 2)]
    assert await carts.checkout_lines(guest.id, CartCaller(cart_token=guest.token)) == [("MUG", 3)]
    with pytest.raises(NotFound):
        await carts.checkout_lines(cart.id, BOB)
    with pytest.raises(NotFound):
        await carts.checkout_lines(cart.id, CartCaller(cart_token=guest.token))
    with pytest.raises(Unauthorized):
        await carts.checkout_lines(cart.id, CartCaller())


async def test_an_empty_or_closed_cart_cannot_be_checked_out(carts: CartStore) -> None:
    empty, _ = await carts.create(ADA, {})
    with pytest.raises(ServiceError) as refused:
        await carts.checkout_lines(empty.id, ADA)
    assert refused.value.code == ErrorCode.VALIDATION_ERROR

    full, _ = await carts.create(BOB, {"MUG": 1})
    await carts.delete(full.id, BOB)
    with pytest.raises(ServiceError) as closed:
        await carts.checkout_lines(full.id, BOB)
    assert closed.value.code == ErrorCode.INVALID_STATE


async def test_mark_checked_out_closes_an_open_cart_once(
    carts: CartStore, db: SessionFactory
) -> None:
    cart, _ = await carts.create(ADA, {"MUG": 1})
    order_id, other_order = uuid.uuid4(), uuid.uuid4()

    async with db.begin() as session:
        await CartStore.mark_checked_out(session, cart.id, order_id)
    async with db.begin() as session:
        await CartStore.mark_checked_out(session, cart.id, other_order)

    view = await carts.get(cart.id, ADA)
    assert (view.status, view.version) == (CartStatus.CHECKED_OUT, 2)
    async with db() as session:
        stored = await session.get(Cart, cart.id)
    assert stored is not None
    assert stored.order_id == order_id
    # The customer's next POST /carts starts a new cart.
    fresh, created = await carts.create(ADA, {})
    assert created
    assert fresh.id != cart.id


async def test_mark_checked_out_rolls_back_with_its_transaction(
    carts: CartStore, db: SessionFactory
) -> None:
    cart, _ = await carts.create(ADA, {"MUG": 1})

    async with db() as session, session.begin():
        await CartStore.mark_checked_out(session, cart.id, uuid.uuid4())
        # The order's transaction fails after it.
        await session.rollback()

    assert (await carts.get(cart.id, ADA)).status == CartStatus.OPEN


async def test_a_merged_cart_is_not_checked_out(carts: CartStore, db: SessionFactory) -> None:
    mine, _ = await carts.create(ADA, {})
    guest, _ = await carts.create(CartCaller(), {"MUG": 1})
    assert guest.token is not None
    await carts.merge(mine.id, guest.token, ADA)

    async with db.begin() as session:
        await CartStore.mark_checked_out(session, guest.id, uuid.uuid4())

    assert (await carts.get(guest.id, ADMIN)).status == CartStatus.MERGED
