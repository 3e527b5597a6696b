"""Promotion uses reserved like stock, on real PostgreSQL under concurrency: a limited code is
never used more than its limit (in total or per customer), a refused checkout keeps nothing,
and every end of a checkout moves its use exactly once."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from core.db import SessionFactory
from core.errors import InvalidPromotion, PromotionExhausted, ServiceError, ShippingUnavailable
from core.invariants import check
from core.orders import NewOrder, OrderStore
from core.pricing_catalog import PricingCatalog
from tests.core.test_order_store import BURST_LIMIT, put, query, stock_levels, store

__all__ = ["store"]  # the fixture, shared with the order store's tests


async def seed_promotion(db: SessionFactory, code: str, **fields: Any) -> None:
    values = {
        "kind": "percent",
        "value": 10,
        "currency": None,
        "min_subtotal": None,
        "starts_at": None,
        "ends_at": None,
        "usage_limit": None,
        "per_customer_limit": None,
        "active": True,
        **fields,
    }
    async with db.begin() as session:
        await session.execute(
            text(
                "INSERT INTO promotions (code_key, code, kind, value, currency, min_subtotal,"
                " starts_at, ends_at, usage_limit, per_customer_limit, active) VALUES"
                " (lower(:code), :code, :kind, :value, :currency, :min_subtotal, :starts_at,"
                " :ends_at, :usage_limit, :per_customer_limit, :active)"
            ),
            {"code": code, **values},
        )


async def seed_shipping_and_tax(db: SessionFactory) -> None:
    async with db.begin() as session:
        await session.execute(
            text(
                "INSERT INTO shipping_methods (code, name, price, currency, countries, free_over)"
                " VALUES ('standard', 'Standard', 500, 'usd', '{US,CA}', 10000)"
            )
        )
        await session.execute(
            text(
                "INSERT INTO tax_rates (country, rate_bps, includes_shipping)"
                " VALUES ('US', 825, true)"
            )
        )


def order(
    items: Sequence[tuple[str, int]],
    *,
    email: str = "buyer@example.com",
    user_id: str | None = None,
    promotion_code: str | None = "SAVE10",
    **pricing: Any,
) -> NewOrder:
    return NewOrder(
        checkout_id=uuid.uuid4(),
        order_id=uuid.uuid4(),
        customer_email=email,
        customer_user_id=user_id,
        items=list(items),
        metadata={},
        expires_at=datetime.now(UTC) + timedelta(minutes=15),
        promotion_code=promotion_code,
        **pricing,
    )


async def counters(db: SessionFactory, code: str = "save10") -> tuple[int, int]:
    row = (await query(db, "SELECT used, reserved FROM promotions WHERE code_key = :c", c=code))[0]
    return row.used, row.reserved


async def use_statuses(db: SessionFactory) -> dict[uuid.UUID, str]:
    rows = await query(db, "SELECT checkout_id, status FROM promotion_uses")
    return {row.checkout_id: row.status for row in rows}


async def open_all(store: OrderStore, orders: Sequence[NewOrder]) -> list[object]:
    async with asyncio.timeout(BURST_LIMIT):
        return await asyncio.gather(*(store.open(o) for o in orders), return_exceptions=True)


async def test_fifty_concurrent_checkouts_of_a_five_use_code_give_five_and_nothing_else_kept(
    db: SessionFactory, store: OrderStore
) -> None:
    await put(db, {"mug": ("Mug", 1000, 1000)})
    await seed_promotion(db, "SAVE10", usage_limit=5)
    orders = [order([("mug", 2)], email=f"c{i}@example.com") for i in range(50)]

    outcomes = await open_all(store, orders)

    won = [o for o, out in zip(orders, outcomes, strict=True) if isinstance(out, tuple)]
    lost = [out for out in outcomes if not isinstance(out, tuple)]
    assert len(won) == 5
    assert len(lost) == 45
    assert all(isinstance(out, PromotionExhausted) for out in lost), lost[:3]
    assert {out.details["scope"] for out in lost if isinstance(out, PromotionExhausted)} == {
        "total"
    }
    assert await counters(db) == (0, 5)
    # Nothing of the 45 is kept: stock for the five only, five orders, five uses.
    assert await stock_levels(db) == {"mug": (1000, 10)}
    orders_rows = await query(db, "SELECT checkout_id, discount, total FROM orders")
    assert {row.checkout_id for row in orders_rows} == {o.checkout_id for o in won}
    assert {(row.discount, row.total) for row in orders_rows} == {(200, 1800)}
    assert set((await use_statuses(db)).keys()) == {o.checkout_id for o in won}

    # Two of the five expire: exactly two more of another fifty get the code.
    for expired in won[:2]:
        await store.close(expired.checkout_id, expired.order_id, status="expired", reason="test")
    assert await counters(db) == (0, 3)
    more = [order([("mug", 1)], email=f"d{i}@example.com") for i in range(50)]
    outcomes = await open_all(store, more)
    assert sum(isinstance(out, tuple) for out in outcomes) == 2
    assert await counters(db) == (0, 5)
    assert await stock_levels(db) == {"mug": (1000, 3 * 2 + 2 * 1)}
    assert await check(db) == []


async def test_per_customer_limit_holds_under_concurrency(
    db: SessionFactory, store: OrderStore
) -> None:
    await put(db, {"mug": ("Mug", 1000, 1000)})
    await seed_promotion(db, "SAVE10", per_customer_limit=2)
    same_customer = [
        order([("mug", 1)], user_id="user-1", email="one@example.com") for _ in range(10)
    ]
    # The scope is the user id when there is one: another email does not make another customer.
    outcomes = await open_all(store, same_customer)
    assert sum(isinstance(out, tuple) for out in outcomes) == 2
    refused = [out for out in outcomes if isinstance(out, PromotionExhausted)]
    assert len(refused) == 8
    assert refused[0].details == {"code": "SAVE10", "limit": 2, "scope": "customer"}
    # Guests are scoped by email, case-insensitively.
    guests = [
        order([("mug", 1)], email="Guest@Example.com".swapcase() if i % 2 else "guest@example.com")
        for i in range(6)
    ]
    outcomes = await open_all(store, guests)
    assert sum(isinstance(out, tuple) for out in outcomes) == 2
    # Another customer still has their own two.
    assert isinstance((await open_all(store, [order([("mug", 1)], user_id="user-2")]))[0], tuple)
    rows = await query(
        db, "SELECT customer_scope, used, reserved FROM promotion_customer_uses ORDER BY 1"
    )
    assert [(r.customer_scope, r.used, r.reserved) for r in rows] == [
        ("email:guest@example.com", 0, 2),
        ("user:user-1", 0, 2),
        ("user:user-2", 0, 1),
    ]
    assert await counters(db) == (0, 5)


async def test_payment_commits_the_use_once_and_a_refund_keeps_it(
    db: SessionFactory, store: OrderStore
) -> None:
    await put(db, {"mug": ("Mug", 1000, 10)})
    await seed_promotion(db, "SAVE10", usage_limit=1)
    new = order([("mug", 1)])
    cart, created = await store.open(new)
    assert created
    # A retry of the step changes nothing and answers the recorded totals.
    again, created_again = await store.open(new)
    assert not created_again
    assert (again.discount, again.total) == (cart.discount, cart.total) == (100, 900)
    assert await counters(db) == (0, 1)

    paid = functools.partial(
        store.mark_paid, intent_id="pi_1", intent_status="succeeded", amount=900, currency="usd"
    )
    await store.attach_payment(
        new.order_id, intent_id="pi_1", status="requires_payment_method", amount=900, currency="usd"
    )
    assert await paid(new.checkout_id, new.order_id) == "paid"
    assert await paid(new.checkout_id, new.order_id) == "paid"
    assert await counters(db) == (1, 0)
    # A close after the payment changes nothing; nor does a full refund (the use stays used).
    assert (
        await store.close(new.checkout_id, new.order_id, status="cancelled", reason="late")
        == "paid"
    )
    await store.mark_refunded(new.order_id, refunded_amount=900, source="test", reference="re_1")
    assert await counters(db) == (1, 0)
    assert await use_statuses(db) == {new.checkout_id: "committed"}
    # The one use is gone: the next checkout is refused, with nothing reserved.
    with pytest.raises(PromotionExhausted):
        await store.open(order([("mug", 1)], email="other@example.com"))
    assert await stock_levels(db) == {"mug": (10, 0)}
    assert await check(db) == []


async def test_release_is_idempotent_and_every_close_frees_the_use(
    db: SessionFactory, store: OrderStore
) -> None:
    await put(db, {"mug": ("Mug", 1000, 10)})
    await seed_promotion(db, "SAVE10", usage_limit=1)
    for status in ("cancelled", "expired", "cancelled"):
        new = order([("mug", 1)])
        await store.open(new)
        assert await counters(db) == (0, 1)
        await asyncio.gather(
            *(
                store.close(new.checkout_id, new.order_id, status=status, reason="t")
                for _ in range(3)
            )
        )
        assert await counters(db) == (0, 0)
        assert (await use_statuses(db))[new.checkout_id] == "released"


async def test_the_schema_refuses_an_over_use_whatever_the_code_does(db: SessionFactory) -> None:
    await seed_promotion(db, "SAVE10", usage_limit=2, per_customer_limit=1)
    with pytest.raises(IntegrityError):
        async with db.begin() as session:
            await session.execute(text("UPDATE promotions SET reserved = 2, used = 1"))
    async with db.begin() as session:
        await session.execute(
            text(
                "INSERT INTO promotion_customer_uses (code_key, customer_scope, used, reserved,"
                " customer_limit) VALUES ('save10', 'email:a@example.com', 1, 0, 1)"
            )
        )
    with pytest.raises(IntegrityError):
        async with db.begin() as session:
            await session.execute(text("UPDATE promotion_customer_uses SET reserved = 1"))


async def test_totals_with_promotion_shipping_and_tax_are_stored_on_the_order(
    db: SessionFactory, store: OrderStore
) -> None:
    await put(db, {"mug": ("Mug", 1250, 10), "cap": ("Cap", 999, 10)})
    await seed_promotion(db, "SAVE10")
    await seed_shipping_and_tax(db)
    new = order(
        [("mug", 2), ("cap", 1)],
        address={"country": "US", "postal_code": "10001", "name": "Ada"},
        shipping_method="standard",
    )
    cart, _ = await store.open(new)
    # subtotal 3499; 10% = 349.9 -> 350; 3149 < 10000: shipping 500; tax 8.25% of 3649
    # (shipping included) = 301.04 -> 301; total 3149 + 500 + 301 = 3950.
    assert (cart.subtotal, cart.discount, cart.shipping, cart.tax, cart.total) == (
        3499, 350, 500, 301, 3950,
    )  # fmt: skip
    row = (await query(db, "SELECT * FROM orders WHERE id = :id", id=new.order_id))[0]
    assert (row.subtotal, row.discount, row.shipping, row.tax, row.total) == (
        3499, 350, 500, 301, 3950,
    )  # fmt: skip
    assert row.address == {"country": "US", "postal_code": "10001", "name": "Ada"}
    assert (row.shipping_method, row.promotion_code) == ("standard", "SAVE10")
    assert row.pricing["tax"] == {
        "country": "US", "rate_bps": 825, "includes_shipping": True, "charged": 301,
    }  # fmt: skip
    assert row.pricing["promotion"] == {
        "code": "SAVE10",
        "kind": "percent",
        "value": 10,
        "discount": 350,
    }
    assert row.pricing["shipping"]["charged"] == 500
    created = await query(
        db, "SELECT payload FROM outbox WHERE aggregate_id = :id AND sequence = 1", id=new.order_id
    )
    assert created[0].payload["totals"] == {
        "subtotal": 3499, "discount": 350, "tax": 301, "shipping": 500, "total": 3950,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "pricing", "error", "reason"),
    [
        ({}, {"promotion_code": "NOPE"}, InvalidPromotion, "unknown"),
        ({"active": False}, {}, InvalidPromotion, "inactive"),
        ({"starts_at": datetime.now(UTC) + timedelta(days=1)}, {}, InvalidPromotion, "not_started"),
        ({"ends_at": datetime.now(UTC) - timedelta(seconds=1)}, {}, InvalidPromotion, "ended"),
        ({"kind": "fixed", "value": 100, "currency": "eur"}, {}, InvalidPromotion, "currency"),
        ({"min_subtotal": 1001}, {}, InvalidPromotion, "min_subtotal"),
        ({}, {"shipping_method": "standard"}, ShippingUnavailable, "no_address"),
        (
            {},
            {"shipping_method": "standard", "address": {"country": "FR"}},
            ShippingUnavailable,
            "country",
        ),
        (
            {},
            {"shipping_method": "express", "address": {"country": "US"}},
            ShippingUnavailable,
            "unknown",
        ),
    ],
)
async def test_a_refused_term_keeps_nothing(
    db: SessionFactory,
    store: OrderStore,
    fields: dict[str, Any],
    pricing: dict[str, Any],
    error: type[ServiceError],
    reason: str,
) -> None:
    await put(db, {"mug": ("Mug", 1000, 10)})
    await seed_promotion(db, "SAVE10", usage_limit=1, **fields)
    await seed_shipping_and_tax(db)
    with pytest.raises(error) as refused:
        await store.open(order([("mug", 1)], **{"promotion_code": "SAVE10", **pricing}))
    assert refused.value.details["reason"] == reason
    assert await stock_levels(db) == {"mug": (10, 0)}
    assert await query(db, "SELECT id FROM orders") == []
    assert await counters(db) == (0, 0)


async def test_paying_closing_opening_and_changing_limits_at_once_never_deadlock(
    db: SessionFactory, store: OrderStore
) -> None:
    """One customer's checkouts of one code settle while others open and an operator edits the
    limits: every transaction takes stock, promotion, then customer rows, so none waits on
    another in a cycle (PostgreSQL would abort one with DeadlockDetected)."""
    await put(db, {"mug": ("Mug", 1000, 1000)})
    await seed_promotion(db, "SAVE10", per_customer_limit=1000, usage_limit=10_000)
    catalog = PricingCatalog(db)
    first = [order([("mug", 1)], user_id="ada") for _ in range(20)]
    await open_all(store, first)

    async def pay(new: NewOrder) -> str:
        await store.attach_payment(
            new.order_id, intent_id=f"pi_{new.order_id.hex}", status="requires_payment_method",
            amount=900, currency="usd",
        )  # fmt: skip
        return await store.mark_paid(
            new.checkout_id, new.order_id, intent_id=f"pi_{new.order_id.hex}",
            intent_status="succeeded", amount=900, currency="usd",
        )  # fmt: skip

    async def edit(limit: int) -> object:
        return await catalog.put_promotion(
            "SAVE10", kind="percent", value=10, currency=None, min_subtotal=None,
            starts_at=None, ends_at=None, usage_limit=10_000, per_customer_limit=limit,
            active=True,
        )  # fmt: skip

    async def close(new: NewOrder) -> str:
        return await store.close(new.checkout_id, new.order_id, status="cancelled", reason="t")

    second = [order([("mug", 1)], user_id="ada") for _ in range(20)]
    async with asyncio.timeout(BURST_LIMIT * 2):
        outcomes = await asyncio.gather(
            *(pay(o) for o in first[:10]),
            *(
                store.close(o.checkout_id, o.order_id, status="cancelled", reason="t")
                for o in first[10:]
            ),
            *(store.open(o) for o in second),
            *(edit(1000 + i) for i in range(10)),
            return_exceptions=True,
        )
    assert [o for o in outcomes if isinstance(o, BaseException)] == []
    assert await counters(db) == (10, 20)
    assert await check(db) == []


async def test_a_total_below_the_smallest_charge_is_refused_and_keeps_nothing(
    db: SessionFactory, store: OrderStore
) -> None:
    await put(db, {"mug": ("Mug", 1000, 10)})
    await seed_promotion(db, "FREE", value=100)
    with pytest.raises(ServiceError) as refused:
        await store.open(order([("mug", 1)], promotion_code="free"))
    assert refused.value.code == "validation_error"
    assert refused.value.details == {"total": 0, "minimum": 50, "currency": "usd"}
    assert await stock_levels(db) == {"mug": (10, 0)}
    assert await counters(db, "free") == (0, 0)


async def test_the_per_customer_limit_holds_for_checkouts_of_different_skus(
    db: SessionFactory, store: OrderStore
) -> None:
    """Checkouts that share no stock row meet only at the promotion's row lock: what they read
    of the customer's uses must be read after that lock, not from before it (READ COMMITTED
    re-reads only the locked row)."""
    skus = {f"sku-{i}": (f"Item {i}", 1000, 10) for i in range(12)}
    await put(db, skus)
    await seed_promotion(db, "SAVE10", per_customer_limit=2)
    orders = [order([(sku, 1)], user_id="ada") for sku in skus]
    outcomes = await open_all(store, orders)
    assert sum(isinstance(out, tuple) for out in outcomes) == 2
    refused = [out for out in outcomes if not isinstance(out, tuple)]
    assert all(isinstance(out, PromotionExhausted) for out in refused), refused[:2]
    assert await counters(db) == (0, 2)
    assert await check(db) == []
