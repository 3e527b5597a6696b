"""`core.db.Sql`, the hot path's statements on the session's own psycopg connection: the same
transaction as the session's, rows with attribute access, and SQLAlchemy's errors without the
statement's parameters."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DataError, IntegrityError, MultipleResultsFound, NoResultFound

from core.catalog import Catalog
from core.db import SessionFactory, Sql

_STOCK = Sql("SELECT sku, on_hand, reserved FROM stock WHERE sku = ANY(:skus) ORDER BY sku")
_SET_RESERVED = Sql("UPDATE stock SET reserved = :reserved WHERE sku = :sku")
_PERCENT = Sql("SELECT '100%' AS label, CAST(:n AS int) * 2 AS doubled")


async def _two_products(db: SessionFactory) -> tuple[str, str]:
    catalog = Catalog(db)
    prefix = f"DB-{uuid.uuid4().hex[:8]}"
    first, second = f"{prefix}-1", f"{prefix}-2"
    for sku in (first, second):
        await catalog.put_product(sku, name=sku, unit_price=100, currency="usd", on_hand=5)
    return first, second


async def test_rows_one_and_one_or_none(db: SessionFactory) -> None:
    first, second = await _two_products(db)
    async with db() as session:
        rows = await _STOCK.rows(session, {"skus": [second, first, "NO-SUCH-SKU"]})
        assert [(r.sku, r.on_hand, r.reserved) for r in rows] == [(first, 5, 0), (second, 5, 0)]
        assert (await _STOCK.one(session, {"skus": [first]})).sku == first
        assert await _STOCK.one_or_none(session, {"skus": ["NO-SUCH-SKU"]}) is None
        with pytest.raises(NoResultFound):
            await _STOCK.one(session, {"skus": ["NO-SUCH-SKU"]})
        with pytest.raises(MultipleResultsFound):
            await _STOCK.one_or_none(session, {"skus": [first, second]})
        # A statement without a result set has no rows; a literal % is not a placeholder.
        assert await _SET_RESERVED.rows(session, {"sku": first, "reserved": 0}) == []
        row = await _PERCENT.one(session, {"n": 21})
        assert (row.label, row.doubled) == ("100%", 42)


async def test_statements_share_the_sessions_transaction(db: SessionFactory) -> None:
    first, _ = await _two_products(db)
    # Rolled back with the session's transaction...
    async with db() as session:
        transaction = await session.begin()
        await _SET_RESERVED.rows(session, {"sku": first, "reserved": 3})
        # ...which sees what the statement wrote, through the ORM session's own execute.
        seen = await session.scalar(
            text("SELECT reserved FROM stock WHERE sku = :sku"), {"sku": first}
        )
        assert seen == 3
        await transaction.rollback()
    async with db() as session:
        assert (await _STOCK.one(session, {"skus": [first]})).reserved == 0
    # ...and committed with it.
    async with db.begin() as session:
        await _SET_RESERVED.rows(session, {"sku": first, "reserved": 2})
    async with db() as session:
        assert (await _STOCK.one(session, {"skus": [first]})).reserved == 2


async def test_errors_are_sqlalchemys_without_the_parameters(db: SessionFactory) -> None:
    first, _ = await _two_products(db)
    secret = "customer-data-4242"
    leaky = Sql("UPDATE stock SET reserved = :reserved WHERE sku = :sku AND :note <> ''")
    with pytest.raises(IntegrityError) as violated:  # the CHECK reserved <= on_hand
        async with db.begin() as session:
            await leaky.rows(session, {"sku": first, "reserved": 99, "note": secret})
    assert "check constraint" in str(violated.value)
    assert secret not in str(violated.value)
    assert "UPDATE stock" in str(violated.value)  # the statement is named
    with pytest.raises(DataError):
        async with db.begin() as session:
            await Sql("SELECT CAST(:n AS int)").rows(session, {"n": "not a number"})
    # Nothing was kept, and the pool's connections still work.
    async with db() as session:
        assert (await _STOCK.one(session, {"skus": [first]})).reserved == 0


async def test_a_statement_cancelled_midway_drops_its_connection(db: SessionFactory) -> None:
    """As SQLAlchemy does with its own statements: a connection whose statement was cancelled
    (an activity attempt's timeout) is not handed out again."""
    marker = f"cancelled-{uuid.uuid4().hex}"
    slow = Sql(f"SELECT pg_sleep(30), '{marker}'")
    async with db() as session:
        connection = await session.connection()
        driver = (await connection.get_raw_connection()).driver_connection
        running = asyncio.create_task(slow.rows(session, {}))
        # Another connection sees the statement start. Each look is a transaction of its
        # own: within one, pg_stat_activity answers the same snapshot every time.
        active = Sql("SELECT count(*) AS n FROM pg_stat_activity WHERE query LIKE :q")
        for _ in range(1000):
            async with db() as watcher:
                seen = await active.one(watcher, {"q": f"%pg_sleep(30), '{marker}'%"})
            if seen.n >= 1:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the statement never started")
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert connection.invalidated
        assert driver is not None and driver.closed
    async with db() as session:  # the pool gives a working connection
        assert (await _PERCENT.one(session, {"n": 1})).doubled == 2
