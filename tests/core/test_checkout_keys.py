"""Idempotency-Keys claimed in PostgreSQL: one claim per key and scope however many race for
it, a duplicate reads the claim (and the checkout's answer once recorded), an expired key is
claimed anew, a refused checkout releases its key."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from core.catalog import Catalog
from core.checkout_keys import CheckoutKeyStore
from core.db import SessionFactory
from core.ledger import StockLedger
from core.orders import NewOrder, OrderStore
from core.sealing import Sealer

SCOPE = "email:ada@example.com"


async def test_concurrent_claims_of_one_key_make_one_claim(db: SessionFactory) -> None:
    keys = CheckoutKeyStore(db)

    claims = await asyncio.gather(
        *(keys.claim(SCOPE, "k-1", "fp", ttl_seconds=60) for _ in range(20))
    )

    assert sum(claim.claimed for claim, _ in claims) == 1
    assert len({claim.checkout_id for claim, _ in claims}) == 1
    assert all(recorded is None for _, recorded in claims)


async def test_the_same_key_in_another_scope_is_another_claim(db: SessionFactory) -> None:
    keys = CheckoutKeyStore(db)
    one, _ = await keys.claim(SCOPE, "k-1", "fp", ttl_seconds=60)
    two, _ = await keys.claim("user:u-1", "k-1", "fp", ttl_seconds=60)

    assert one.claimed and two.claimed
    assert one.checkout_id != two.checkout_id


async def test_a_duplicate_keeps_the_first_fingerprint(db: SessionFactory) -> None:
    keys = CheckoutKeyStore(db)
    await keys.claim(SCOPE, "k-1", "first", ttl_seconds=60)

    again, _ = await keys.claim(SCOPE, "k-1", "second", ttl_seconds=60)

    assert not again.claimed
    assert again.fingerprint == "first"


async def test_an_opened_checkout_answers_from_its_rows(db: SessionFactory) -> None:
    await Catalog(db).put_product("mug", name="Mug", unit_price=900, currency="usd", on_hand=5)
    orders = OrderStore(db, StockLedger(db))
    keys = CheckoutKeyStore(db)
    claim, _ = await keys.claim(SCOPE, "k-1", "fp", ttl_seconds=60)
    expires_at = datetime.now(UTC) + timedelta(minutes=15)
    await orders.open(
        NewOrder(
            claim.checkout_id, claim.order_id, "ada@example.com", None, {"mug": 2}, {}, expires_at
        )
    )
    # Opened, but no PaymentIntent yet: the duplicate must ask the workflow.
    assert (await keys.claim(SCOPE, "k-1", "fp", ttl_seconds=60))[1] is None
    sealer = Sealer("test-secret-key-for-sealing")
    await orders.attach_payment(
        claim.order_id,
        intent_id="pi_1",
        status="requires_payment_method",
        amount=1800,
        currency="usd",
        client_secret_sealed=sealer.seal("pi_1_secret_x"),
    )

    _, recorded = await keys.claim(SCOPE, "k-1", "fp", ttl_seconds=60)

    assert recorded is not None
    assert (recorded.checkout_id, recorded.order_id) == (claim.checkout_id, claim.order_id)
    assert (recorded.subtotal, recorded.total, recorded.currency) == (1800, 1800, "usd")
    assert [(line.sku, line.quantity, line.line_total) for line in recorded.lines] == [
        ("mug", 2, 1800)
    ]
    assert recorded.payment_intent_id == "pi_1"
    assert sealer.unseal(recorded.client_secret_sealed) == "pi_1_secret_x"
    # Sealed, not stored in clear; another SECRET_KEY cannot read it.
    assert recorded.client_secret_sealed != "pi_1_secret_x"
    assert Sealer("another-secret-key-entirely").unseal(recorded.client_secret_sealed) is None


async def test_an_expired_key_is_claimed_anew_and_swept(db: SessionFactory) -> None:
    keys = CheckoutKeyStore(db)
    old, _ = await keys.claim(SCOPE, "k-1", "fp", ttl_seconds=60)
    async with db.begin() as session:
        await session.execute(text("UPDATE checkout_keys SET expires_at = now() - interval '1 s'"))

    new, _ = await keys.claim(SCOPE, "k-1", "other body", ttl_seconds=60)

    assert new.claimed
    assert new.checkout_id != old.checkout_id
    assert new.fingerprint == "other body"
    await keys.claim(SCOPE, "k-2", "fp", ttl_seconds=60)
    async with db.begin() as session:
        await session.execute(
            text("UPDATE checkout_keys SET expires_at = now() - interval '1 s' WHERE key = 'k-2'")
        )
    assert await keys.delete_expired() == 1
    assert await keys.delete_expired() == 0


async def test_releasing_frees_only_that_checkouts_key(db: SessionFactory) -> None:
    keys = CheckoutKeyStore(db)
    one, _ = await keys.claim(SCOPE, "k-1", "fp", ttl_seconds=60)
    two, _ = await keys.claim(SCOPE, "k-2", "fp", ttl_seconds=60)

    async with db.begin() as session:
        await CheckoutKeyStore.release(session, one.checkout_id)
        await CheckoutKeyStore.release(session, uuid.uuid4())

    assert (await keys.claim(SCOPE, "k-1", "fp", ttl_seconds=60))[0].claimed
    assert not (await keys.claim(SCOPE, "k-2", "fp", ttl_seconds=60))[0].claimed
    assert two.claimed


async def test_concurrent_requests_of_one_key_are_counted_once(db: SessionFactory) -> None:
    """The rate limits run inside the key's lock, only for the request that claims it: any
    number of concurrent duplicates of a new key spend one request's budget."""
    keys = CheckoutKeyStore(db)
    counted = 0

    async def count() -> None:
        nonlocal counted
        counted += 1

    claims = await asyncio.gather(
        *(keys.claim(SCOPE, "k-1", "fp", ttl_seconds=60, before_claiming=count) for _ in range(20))
    )

    assert counted == 1
    assert sum(claim.claimed for claim, _ in claims) == 1


async def test_a_request_refused_before_claiming_leaves_no_claim(db: SessionFactory) -> None:
    keys = CheckoutKeyStore(db)

    async def refuse() -> None:
        raise RuntimeError("rate limited")

    with pytest.raises(RuntimeError):
        await keys.claim(SCOPE, "k-1", "fp", ttl_seconds=60, before_claiming=refuse)

    assert await keys.find(SCOPE, "k-1") is None
    assert (await keys.claim(SCOPE, "k-1", "fp", ttl_seconds=60))[0].claimed


async def test_an_expired_key_whose_checkout_still_waits_for_payment_still_stands_for_it(
    db: SessionFactory,
) -> None:
    """A payment window that outlives the key (a long `processing` grace, a worker outage)
    must not let the key open a second checkout while the first can still be paid."""
    await Catalog(db).put_product("mug", name="Mug", unit_price=900, currency="usd", on_hand=5)
    orders = OrderStore(db, StockLedger(db))
    keys = CheckoutKeyStore(db)
    claim, _ = await keys.claim(SCOPE, "k-1", "fp", ttl_seconds=60)
    expires_at = datetime.now(UTC) + timedelta(minutes=15)
    await orders.open(
        NewOrder(
            claim.checkout_id, claim.order_id, "ada@example.com", None, {"mug": 1}, {}, expires_at
        )
    )
    async with db.begin() as session:
        await session.execute(text("UPDATE checkout_keys SET expires_at = now() - interval '1 s'"))

    again, _ = await keys.claim(SCOPE, "k-1", "fp", ttl_seconds=60)

    assert not again.claimed
    assert again.checkout_id == claim.checkout_id
