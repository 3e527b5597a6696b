"""The stock ledger: reserve, commit and release stock for a checkout, each one transaction.

Correctness does not rest on this code alone: the `stock` table's CHECK constraints refuse any
row with `reserved > on_hand` or `reserved < 0`. The code's job is to never try, and to never
deadlock: every operation locks the `stock` rows it touches in ascending SKU order, so two
transactions over the same SKUs always queue on the first one instead of waiting on each other.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from core.db import SessionFactory, Sql
from core.errors import InsufficientStock, InvalidState, NotFound, UnknownSku
from core.vocabulary import ReservationStatus

ACTIVE = ReservationStatus.ACTIVE
COMMITTED = ReservationStatus.COMMITTED
RELEASED = ReservationStatus.RELEASED
RETURNED = ReservationStatus.RETURNED


@dataclass(frozen=True)
class ReservedLine:
    sku: str
    quantity: int


@dataclass(frozen=True)
class ReservationResult:
    checkout_id: uuid.UUID
    status: str
    lines: tuple[ReservedLine, ...]
    expires_at: datetime | None


def merge_lines(lines: Iterable[tuple[str, int]] | Mapping[str, int]) -> dict[str, int]:
    """Sum the quantities of lines with the same SKU; the result is sorted by SKU."""
    pairs = lines.items() if isinstance(lines, Mapping) else lines
    merged: dict[str, int] = {}
    for sku, quantity in pairs:
        if quantity <= 0:
            raise ValueError(f"quantity for {sku} must be positive, got {quantity}")
        merged[sku] = merged.get(sku, 0) + quantity
    if not merged:
        raise ValueError("a reservation needs at least one line")
    return dict(sorted(merged.items()))


# Locks the stock rows in SKU order: the ORDER BY runs below the row-locking step, so rows are
# locked in sorted order and concurrent multi-SKU transactions cannot deadlock.
_LOCK_STOCK = Sql(
    "SELECT sku, on_hand, reserved FROM stock WHERE sku = ANY(:skus) ORDER BY sku FOR UPDATE"
)
_SELECT_RESERVATIONS = Sql(
    "SELECT sku, quantity, status, expires_at FROM reservations"
    " WHERE checkout_id = :checkout_id ORDER BY sku"
)
# The checkout's reservation rows, then (if it is in `:source`, to be moved) the stock rows of
# their SKUs (in SKU order, as above), locked in this order by one statement. A reservation
# row that had to be waited for is read as it is after the wait (its status included); its SKU
# and quantity never change, so the stock locked is the right one. (`locked` is there to be
# read: a CTE no part of the query reads is never run.)
_LOCK_RESERVATION_AND_STOCK = Sql(
    """
    WITH held AS (
        SELECT sku, quantity, status, expires_at FROM reservations
        WHERE checkout_id = :checkout_id ORDER BY sku FOR UPDATE
    ), stock_held AS (
        SELECT s.sku FROM stock s WHERE s.sku IN (SELECT sku FROM held WHERE status = :source)
        ORDER BY s.sku FOR UPDATE
    )
    SELECT h.sku, h.quantity, h.status, h.expires_at, (SELECT count(*) FROM stock_held) AS locked
    FROM held h ORDER BY h.sku
    """
)
# Each stock movement is one statement: the stock rows (locked just before, in SKU order) and
# the checkout's reservation rows change together, in one round trip while the locks are held.
# A reservation is made unless the checkout has one already (a concurrent duplicate that held
# the stock locks before this one and has committed since): then its rows come back and
# nothing changes. The check is this statement's, whose snapshot is taken after the locks.
_RESERVE = Sql(
    """
    WITH existing AS (
        SELECT sku, quantity, status, expires_at FROM reservations
        WHERE checkout_id = :checkout_id
    ), added AS (
        UPDATE stock SET reserved = stock.reserved + v.quantity, updated_at = now()
        FROM unnest(CAST(:skus AS text[]), CAST(:quantities AS int[])) AS v(sku, quantity)
        WHERE stock.sku = v.sku AND NOT EXISTS (SELECT 1 FROM existing)
    ), reserved AS (
        INSERT INTO reservations (checkout_id, sku, quantity, status, expires_at)
        SELECT :checkout_id, v.sku, v.quantity, 'active', :expires_at
        FROM unnest(CAST(:skus AS text[]), CAST(:quantities AS int[])) AS v(sku, quantity)
        WHERE NOT EXISTS (SELECT 1 FROM existing)
    )
    SELECT sku, quantity, status, expires_at FROM existing ORDER BY sku
    """
)
# A move takes the checkout's reservation from `:source` to `:target` and changes each line's
# stock by its quantity times `:on_hand` and `:reserved` (each -1, 0 or 1).
_MOVE = Sql(
    """
    WITH moved AS (
        UPDATE stock SET on_hand = stock.on_hand + :on_hand * v.quantity,
                         reserved = stock.reserved + :reserved * v.quantity, updated_at = now()
        FROM unnest(CAST(:skus AS text[]), CAST(:quantities AS int[])) AS v(sku, quantity)
        WHERE stock.sku = v.sku
    )
    UPDATE reservations SET status = :target, updated_at = now()
    WHERE checkout_id = :checkout_id AND status = :source
    """
)


@dataclass(frozen=True)
class _Move:
    source: str
    target: str
    on_hand: int
    reserved: int


# Sold: the units leave on hand and reserved together. Released: they are free again.
# Returned (a refunded sale): they are back on hand.
_COMMIT = _Move(ACTIVE, COMMITTED, on_hand=-1, reserved=-1)
_RELEASE = _Move(ACTIVE, RELEASED, on_hand=0, reserved=-1)
_RETURN = _Move(COMMITTED, RETURNED, on_hand=1, reserved=0)


def _not_in(result: ReservationResult, expected: str) -> InvalidState:
    return InvalidState(
        f"reservation for checkout {result.checkout_id} is {result.status}, not {expected}",
        details={"checkout_id": str(result.checkout_id), "status": result.status},
    )


class StockLedger:
    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions

    async def reserve(
        self,
        checkout_id: uuid.UUID,
        lines: Iterable[tuple[str, int]] | Mapping[str, int],
        *,
        expires_at: datetime | None = None,
        session: AsyncSession | None = None,
    ) -> ReservationResult:
        """Reserve every line or none.

        A retry with the same checkout id changes nothing and returns what the first call
        reserved, whatever became of it since (committed or released).
        Raises `UnknownSku` or `InsufficientStock` (with requested/available per SKU). With
        `session`, runs inside the caller's transaction (the order is created in the same one).
        """
        wanted = merge_lines(lines)
        if session is not None:
            return await self._reserve(session, checkout_id, wanted, expires_at)
        async with self._sessions.begin() as own:
            return await self._reserve(own, checkout_id, wanted, expires_at)

    async def _reserve(
        self,
        session: AsyncSession,
        checkout_id: uuid.UUID,
        wanted: dict[str, int],
        expires_at: datetime | None,
    ) -> ReservationResult:
        skus = list(wanted)
        stock = {row.sku: row for row in await _LOCK_STOCK.rows(session, {"skus": skus})}
        missing = [sku for sku in skus if sku not in stock]
        shortages = [
            {
                "sku": sku,
                "requested": quantity,
                "available": max(stock[sku].on_hand - stock[sku].reserved, 0),
            }
            for sku, quantity in wanted.items()
            if sku in stock and stock[sku].on_hand - stock[sku].reserved < quantity
        ]
        if missing or shortages:
            # Checked under the stock locks: a concurrent duplicate call has either committed
            # (its reservation is the answer, whatever stock is left) or has not started.
            existing = await self._lines(session, checkout_id)
            if existing is not None:
                return existing
            if missing:
                raise UnknownSku(missing)
            raise InsufficientStock(shortages)

        rows = await _RESERVE.rows(
            session,
            {
                "checkout_id": checkout_id,
                "skus": skus,
                "quantities": list(wanted.values()),
                "expires_at": expires_at,
            },
        )
        if rows:  # the duplicate's, as above
            return _result(checkout_id, rows)
        return ReservationResult(
            checkout_id=checkout_id,
            status=ACTIVE,
            lines=tuple(ReservedLine(sku, q) for sku, q in wanted.items()),
            expires_at=expires_at,
        )

    async def commit(
        self, checkout_id: uuid.UUID, *, session: AsyncSession | None = None
    ) -> ReservationResult:
        """Turn the checkout's reservation into a sale: on_hand and reserved drop together.

        Idempotent. Raises `InvalidState` if the reservation was released (the stock may have
        been sold to someone else since) and `NotFound` if there is none. With `session`, runs
        inside the caller's transaction (the order moves to `paid` in the same one).
        """
        if session is not None:
            return await self._commit(session, checkout_id)
        async with self._sessions.begin() as own:
            return await self._commit(own, checkout_id)

    async def _commit(self, session: AsyncSession, checkout_id: uuid.UUID) -> ReservationResult:
        result = await self._move(session, checkout_id, _COMMIT)
        if result.status != COMMITTED:
            raise _not_in(result, ACTIVE)
        return result

    async def release(
        self, checkout_id: uuid.UUID, *, session: AsyncSession | None = None
    ) -> ReservationResult:
        """Give the reserved stock back. Idempotent; a committed reservation is never released.

        Returns the reservation as it now is: `released`, or `committed` if it was sold. A
        checkout that never reserved anything has nothing to release (status `released`).
        """
        if session is not None:
            return await self._release(session, checkout_id)
        async with self._sessions.begin() as own:
            return await self._release(own, checkout_id)

    async def _release(self, session: AsyncSession, checkout_id: uuid.UUID) -> ReservationResult:
        try:
            # A committed reservation comes back as it is: the sale stands.
            return await self._move(session, checkout_id, _RELEASE)
        except NotFound:
            return ReservationResult(checkout_id, RELEASED, (), None)

    async def restock(self, checkout_id: uuid.UUID, *, session: AsyncSession) -> ReservationResult:
        """Put a refunded sale's units back on hand, once: committed -> returned.

        Runs inside the caller's transaction (the order becomes `refunded` in the same one).
        Raises `InvalidState` unless the reservation was committed (or already returned).
        """
        result = await self._move(session, checkout_id, _RETURN)
        if result.status != RETURNED:
            raise _not_in(result, "sold")
        return result

    async def get(self, checkout_id: uuid.UUID) -> ReservationResult | None:
        async with self._sessions() as session:
            return await self._lines(session, checkout_id)

    async def _move(
        self, session: AsyncSession, checkout_id: uuid.UUID, move: _Move
    ) -> ReservationResult:
        """Move the checkout's reservation from `move.source` to `move.target` with its stock.

        Returns it unchanged if it is in any other status (already the target included): the
        caller decides what that means.
        """
        rows = await _LOCK_RESERVATION_AND_STOCK.rows(
            session, {"checkout_id": checkout_id, "source": move.source}
        )
        if not rows:
            raise NotFound(f"no reservation for checkout {checkout_id}")
        current = _result(checkout_id, rows)
        if current.status != move.source:
            return current
        await _MOVE.rows(
            session,
            {
                "skus": [line.sku for line in current.lines],
                "quantities": [line.quantity for line in current.lines],
                "on_hand": move.on_hand,
                "reserved": move.reserved,
                "checkout_id": checkout_id,
                "source": move.source,
                "target": move.target,
            },
        )
        return ReservationResult(checkout_id, move.target, current.lines, current.expires_at)

    @staticmethod
    async def _lines(session: AsyncSession, checkout_id: uuid.UUID) -> ReservationResult | None:
        rows = await _SELECT_RESERVATIONS.rows(session, {"checkout_id": checkout_id})
        return _result(checkout_id, rows) if rows else None


def _result(checkout_id: uuid.UUID, rows: Sequence[Any]) -> ReservationResult:
    """A checkout's reservation from its rows (sku, quantity, status, expires_at), in SKU order.
    All lines of one checkout move together, so they share one status."""
    return ReservationResult(
        checkout_id=checkout_id,
        status=rows[0].status,
        lines=tuple(ReservedLine(row.sku, row.quantity) for row in rows),
        expires_at=rows[0].expires_at,
    )
