"""The stock ledger against real PostgreSQL: semantics, idempotency and concurrency."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from core.catalog import Catalog, Inventory
from core.db import SessionFactory
from core.errors import InsufficientStock, InvalidState, NotFound, UnknownSku
from core.ledger import StockLedger
from tests.conftest import connection_budget


@pytest.fixture
def catalog(db: SessionFactory) -> Catalog:
    return Catalog(db)


@pytest.fixture
def ledger(db: SessionFactory) -> StockLedger:
    return StockLedger(db)


async def stock(catalog: Catalog, sku: str, on_hand: int, price: int = 1000) -> None:
    await catalog.put_product(
        sku, name=sku.title(), unit_price=price, currency="usd", on_hand=on_hand
    )


async def levels(catalog: Catalog, *skus: str) -> dict[str, tuple[int, int]]:
    result = {}
    for sku in skus:
        inv: Inventory = await catalog.inventory(sku)
        result[sku] = (inv.on_hand, inv.reserved)
    return result


async def test_reserve_takes_all_lines_and_sums_repeated_skus(
    catalog: Catalog, ledger: StockLedger
) -> None:
    await stock(catalog, "mug", 10)
    await stock(catalog, "tee", 5)
    checkout = uuid.uuid4()

    result = await ledger.reserve(checkout, [("tee", 1), ("mug", 2), ("tee", 2)])

    assert result.status == "active"
    assert [(line.sku, line.quantity) for line in result.lines] == [("mug", 2), ("tee", 3)]
    assert await levels(catalog, "mug", "tee") == {"mug": (10, 2), "tee": (5, 3)}
    assert (await catalog.inventory("tee")).available == 2


async def test_reserve_is_all_or_nothing_and_says_what_is_short(
    catalog: Catalog, ledger: StockLedger
) -> None:
    await stock(catalog, "mug", 10)
    await stock(catalog, "tee", 2)
    await ledger.reserve(uuid.uuid4(), [("tee", 1)])

    with pytest.raises(InsufficientStock) as raised:
        await ledger.reserve(uuid.uuid4(), [("mug", 3), ("tee", 2)])

    assert raised.value.shortages == [{"sku": "tee", "requested": 2, "available": 1}]
    assert await levels(catalog, "mug", "tee") == {"mug": (10, 0), "tee": (2, 1)}


async def test_reserve_refuses_unknown_skus_without_side_effects(
    catalog: Catalog, ledger: StockLedger
) -> None:
    await stock(catalog, "mug", 10)
    checkout = uuid.uuid4()
    with pytest.raises(UnknownSku) as raised:
        await ledger.reserve(checkout, [("mug", 1), ("ghost", 1)])
    assert raised.value.skus == ["ghost"]
    assert await levels(catalog, "mug") == {"mug": (10, 0)}
    assert await ledger.get(checkout) is None


async def test_reserve_rejects_non_positive_quantities(ledger: StockLedger) -> None:
    with pytest.raises(ValueError, match="positive"):
        await ledger.reserve(uuid.uuid4(), [("mug", 0)])
    with pytest.raises(ValueError, match="at least one line"):
        await ledger.reserve(uuid.uuid4(), [])


async def test_reserve_retry_changes_nothing_and_returns_the_same_result(
    catalog: Catalog, ledger: StockLedger
) -> None:
    await stock(catalog, "mug", 10)
    checkout = uuid.uuid4()
    first = await ledger.reserve(checkout, [("mug", 3)])

    again = await ledger.reserve(checkout, [("mug", 3)])

    assert again == first
    assert await levels(catalog, "mug") == {"mug": (10, 3)}


async def test_concurrent_duplicates_of_one_checkout_reserve_once(
    catalog: Catalog, ledger: StockLedger
) -> None:
    await stock(catalog, "mug", 10)
    checkout = uuid.uuid4()

    results = await asyncio.gather(*(ledger.reserve(checkout, [("mug", 2)]) for _ in range(10)))

    assert len(set(results)) == 1
    assert await levels(catalog, "mug") == {"mug": (10, 2)}


async def test_duplicates_that_find_the_stock_taken_by_their_twin_get_its_reservation(
    catalog: Catalog, ledger: StockLedger
) -> None:
    """The last units, reserved by one of ten concurrent duplicates: the other nine see no
    stock left, and answer with their twin's reservation, not a shortage."""
    await stock(catalog, "mug", 2)
    checkout = uuid.uuid4()

    results = await asyncio.gather(*(ledger.reserve(checkout, [("mug", 2)]) for _ in range(10)))

    assert len(set(results)) == 1
    assert await levels(catalog, "mug") == {"mug": (2, 2)}
    # A retry that names a SKU gone from the catalog since gets the reservation too.
    assert await ledger.reserve(checkout, [("mug", 2), ("no-such-sku", 1)]) == results[0]
    # Another checkout is refused, and nothing changes.
    with pytest.raises(InsufficientStock):
        await ledger.reserve(uuid.uuid4(), [("mug", 1)])
    with pytest.raises(UnknownSku):
        await ledger.reserve(uuid.uuid4(), [("no-such-sku", 1)])
    assert await levels(catalog, "mug") == {"mug": (2, 2)}


async def test_commit_moves_reserved_stock_out_and_is_idempotent(
    catalog: Catalog, ledger: StockLedger
) -> None:
    await stock(catalog, "mug", 10)
    await stock(catalog, "tee", 4)
    checkout = uuid.uuid4()
    await ledger.reserve(checkout, [("mug", 2), ("tee", 4)])

    committed = await ledger.commit(checkout)
    again = await ledger.commit(checkout)

    assert committed.status == again.status == "committed"
    assert await levels(catalog, "mug", "tee") == {"mug": (8, 0), "tee": (0, 0)}


async def test_release_returns_stock_and_is_idempotent(
    catalog: Catalog, ledger: StockLedger
) -> None:
    await stock(catalog, "mug", 10)
    checkout = uuid.uuid4()
    await ledger.reserve(checkout, [("mug", 4)])

    assert (await ledger.release(checkout)).status == "released"
    assert (await ledger.release(checkout)).status == "released"
    assert await levels(catalog, "mug") == {"mug": (10, 0)}


async def test_a_committed_reservation_is_never_released(
    catalog: Catalog, ledger: StockLedger
) -> None:
    await stock(catalog, "mug", 10)
    checkout = uuid.uuid4()
    await ledger.reserve(checkout, [("mug", 4)])
    await ledger.commit(checkout)

    after = await ledger.release(checkout)

    assert after.status == "committed"
    assert await levels(catalog, "mug") == {"mug": (6, 0)}


async def test_a_released_reservation_cannot_be_committed(
    catalog: Catalog, ledger: StockLedger
) -> None:
    await stock(catalog, "mug", 10)
    checkout = uuid.uuid4()
    await ledger.reserve(checkout, [("mug", 4)])
    await ledger.release(checkout)

    with pytest.raises(InvalidState):
        await ledger.commit(checkout)
    assert await levels(catalog, "mug") == {"mug": (10, 0)}


async def test_commit_without_reservation_is_not_found_and_release_is_a_no_op(
    ledger: StockLedger,
) -> None:
    checkout = uuid.uuid4()
    with pytest.raises(NotFound):
        await ledger.commit(checkout)
    assert (await ledger.release(checkout)).lines == ()


async def test_concurrent_commit_and_release_settle_exactly_once(
    catalog: Catalog, ledger: StockLedger
) -> None:
    await stock(catalog, "mug", 100)
    checkouts = [uuid.uuid4() for _ in range(20)]
    for checkout in checkouts:
        await ledger.reserve(checkout, [("mug", 1)])

    async def race(checkout: uuid.UUID) -> str:
        outcomes = await asyncio.gather(
            ledger.commit(checkout), ledger.release(checkout), return_exceptions=True
        )
        final = await ledger.get(checkout)
        assert final is not None
        # Either the sale won (release reports it) or the release won (commit refuses).
        assert any(isinstance(o, InvalidState) for o in outcomes) or all(
            not isinstance(o, BaseException) and o.status == "committed" for o in outcomes
        )
        return final.status

    finals = await asyncio.gather(*(race(c) for c in checkouts))
    sold = finals.count("committed")
    assert await levels(catalog, "mug") == {"mug": (100 - sold, 0)}


async def test_200_concurrent_one_unit_reservations_sell_exactly_the_stock(
    catalog: Catalog, database_url: str
) -> None:
    await stock(catalog, "last-ten", 10)
    attempts = 200
    budget = await connection_budget(database_url, attempts)
    # Every attempt runs on its own connection (no pool sharing), as separate clients would.
    engine = create_async_engine(database_url, poolclass=NullPool)
    from core.db import create_session_factory

    ledger = StockLedger(create_session_factory(engine))
    gate = asyncio.Semaphore(budget)
    start = asyncio.Event()

    async def attempt() -> bool:
        async with gate:
            await start.wait()
            try:
                await ledger.reserve(uuid.uuid4(), [("last-ten", 1)])
            except InsufficientStock:
                return False
            return True

    tasks = [asyncio.create_task(attempt()) for _ in range(attempts)]
    await asyncio.sleep(0.1)
    start.set()
    outcomes = await asyncio.gather(*tasks)
    await engine.dispose()

    assert outcomes.count(True) == 10
    inventory = await catalog.inventory("last-ten")
    assert (inventory.on_hand, inventory.reserved, inventory.available) == (10, 10, 0)


async def test_multi_sku_reservations_in_opposite_orders_never_deadlock(
    catalog: Catalog, database_url: str
) -> None:
    await stock(catalog, "alpha", 1000)
    await stock(catalog, "beta", 1000)
    await stock(catalog, "gamma", 1000)
    engine = create_async_engine(database_url, pool_size=40, max_overflow=0)
    from core.db import create_session_factory

    ledger = StockLedger(create_session_factory(engine))
    orders = [
        [("alpha", 1), ("beta", 2), ("gamma", 3)],
        [("gamma", 3), ("beta", 2), ("alpha", 1)],
        [("beta", 2), ("gamma", 3), ("alpha", 1)],
    ]
    checkouts = [uuid.uuid4() for _ in range(150)]

    await asyncio.gather(*(ledger.reserve(c, orders[i % 3]) for i, c in enumerate(checkouts)))
    assert await levels(catalog, "alpha", "beta", "gamma") == {
        "alpha": (1000, 150),
        "beta": (1000, 300),
        "gamma": (1000, 450),
    }

    # Settle them concurrently, half sold and half released, again over the same rows.
    await asyncio.gather(
        *((ledger.commit(c) if i % 2 else ledger.release(c)) for i, c in enumerate(checkouts))
    )
    await engine.dispose()
    assert await levels(catalog, "alpha", "beta", "gamma") == {
        "alpha": (1000 - 75, 0),
        "beta": (1000 - 150, 0),
        "gamma": (1000 - 225, 0),
    }


async def test_the_database_refuses_an_oversell_even_from_a_direct_update(
    catalog: Catalog, db: SessionFactory
) -> None:
    await stock(catalog, "mug", 3)
    for statement in (
        "UPDATE stock SET reserved = on_hand + 1 WHERE sku = 'mug'",
        "UPDATE stock SET reserved = -1 WHERE sku = 'mug'",
        "UPDATE stock SET on_hand = -1, reserved = -2 WHERE sku = 'mug'",
    ):
        with pytest.raises(IntegrityError, match="violates check constraint"):
            async with db.begin() as session:
                await session.execute(text(statement))
    assert await levels(catalog, "mug") == {"mug": (3, 0)}


async def test_on_hand_cannot_be_set_below_what_is_reserved(
    catalog: Catalog, ledger: StockLedger
) -> None:
    from core.errors import StockBelowReserved

    await stock(catalog, "mug", 10)
    await ledger.reserve(uuid.uuid4(), [("mug", 6)])

    with pytest.raises(StockBelowReserved):
        await catalog.put_product("mug", name="Mug v2", unit_price=999, currency="usd", on_hand=5)
    assert await levels(catalog, "mug") == {"mug": (10, 6)}

    updated = await catalog.put_product(
        "mug", name="Mug v2", unit_price=999, currency="usd", on_hand=6
    )
    assert (updated.inventory.on_hand, updated.inventory.available) == (6, 0)
