"""Public stock levels."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from api.deps import CatalogDep
from api.schemas import SKU_PATTERN, ErrorBody, InventoryOut

router = APIRouter(tags=["inventory"])


@router.get("/inventory/{sku}", responses={404: {"model": ErrorBody}})
async def get_inventory(
    sku: Annotated[str, Path(pattern=SKU_PATTERN, description="the product's SKU")],
    catalog: CatalogDep,
) -> InventoryOut:
    """Stock of one SKU: on hand, reserved by open checkouts, and available to sell."""
    inventory = await catalog.inventory(sku)
    return InventoryOut(
        sku=inventory.sku,
        on_hand=inventory.on_hand,
        reserved=inventory.reserved,
        available=inventory.available,
    )
