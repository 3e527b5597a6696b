"""Stock activities: thin, idempotent wrappers over the stock ledger, keyed by checkout id."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.errors import InsufficientStock, UnknownSku
from core.ledger import ReservationResult, StockLedger


class StockLine(BaseModel):
    sku: str
    quantity: int = Field(gt=0)


class ReserveStockInput(BaseModel):
    checkout_id: uuid.UUID
    lines: list[StockLine]
    expires_at: datetime | None = None


class CheckoutStockInput(BaseModel):
    checkout_id: uuid.UUID


class StockReservation(BaseModel):
    checkout_id: uuid.UUID
    status: str
    lines: list[StockLine]

    @classmethod
    def of(cls, result: ReservationResult) -> StockReservation:
        return cls(
            checkout_id=result.checkout_id,
            status=result.status,
            lines=[StockLine(sku=line.sku, quantity=line.quantity) for line in result.lines],
        )


class InventoryActivities:
    def __init__(self, ledger: StockLedger) -> None:
        self._ledger = ledger

    @activity.defn(name="reserve_stock")
    async def reserve_stock(self, input: ReserveStockInput) -> StockReservation:
        """Reserve all lines or none; a retry returns the first call's reservation."""
        try:
            result = await self._ledger.reserve(
                input.checkout_id,
                [(line.sku, line.quantity) for line in input.lines],
                expires_at=input.expires_at,
            )
        except (InsufficientStock, UnknownSku) as exc:
            # Retrying will not create stock: fail the step, the workflow decides.
            raise ApplicationError(
                exc.message, exc.details, type=exc.code, non_retryable=True
            ) from exc
        return StockReservation.of(result)

    @activity.defn(name="release_stock")
    async def release_stock(self, input: CheckoutStockInput) -> StockReservation:
        """Give the reserved stock back; idempotent, never releases a sale."""
        return StockReservation.of(await self._ledger.release(input.checkout_id))
