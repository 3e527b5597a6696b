"""The pricing catalog: shipping methods, tax rates and promotions (admin), and the shipping
methods a shop may offer (public)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Path, Query

from api.deps import PricingDep
from api.routes.admin import admin_router as operator_router
from api.schemas import (
    COUNTRY_PATTERN,
    PRICING_CODE_PATTERN,
    ErrorBody,
    PromotionIn,
    PromotionOut,
    ShippingMethodIn,
    ShippingMethodOut,
    ShippingMethodsOut,
    ShippingOptionOut,
    TaxRateIn,
    TaxRateOut,
)
from core.pricing import ShippingTerms
from core.pricing_catalog import PromotionView

admin_router = operator_router({422: {"model": ErrorBody, "description": "validation_error"}})
router = APIRouter(tags=["pricing"])

CodePath = Annotated[
    str, Path(pattern=PRICING_CODE_PATTERN, description="letters, digits, '_' and '-'")
]
CountryPath = Annotated[
    str, Path(pattern=COUNTRY_PATTERN, description="ISO 3166-1 alpha-2, any case")
]


@admin_router.put("/shipping-methods/{code}")
async def put_shipping_method(
    code: CodePath, body: ShippingMethodIn, pricing: PricingDep
) -> ShippingMethodOut:
    """Create or replace a shipping method."""
    method = await pricing.put_shipping_method(
        code,
        name=body.name,
        price=body.price,
        currency=body.currency,
        countries=body.countries,
        free_over=body.free_over,
        active=body.active,
    )
    return ShippingMethodOut.model_validate(method, from_attributes=True)


@admin_router.put("/tax-rates/{country}")
async def put_tax_rate(country: CountryPath, body: TaxRateIn, pricing: PricingDep) -> TaxRateOut:
    """Create or replace a destination country's tax rate (prices are tax-exclusive)."""
    rate = await pricing.put_tax_rate(
        country, rate_bps=body.rate_bps, includes_shipping=body.includes_shipping
    )
    return TaxRateOut.model_validate(rate, from_attributes=True)


@admin_router.put(
    "/promotions/{code}",
    responses={
        409: {"model": ErrorBody, "description": "invalid_state: a limit below the uses held"}
    },
)
async def put_promotion(code: CodePath, body: PromotionIn, pricing: PricingDep) -> PromotionOut:
    """Create or replace a promotion (codes match in any case), with the uses it holds."""
    promotion = await pricing.put_promotion(
        code,
        kind=body.kind,
        value=body.value,
        currency=body.currency,
        min_subtotal=body.min_subtotal,
        starts_at=body.starts_at,
        ends_at=body.ends_at,
        usage_limit=body.usage_limit,
        per_customer_limit=body.per_customer_limit,
        active=body.active,
    )
    return promotion_out(promotion)


@admin_router.get("/promotions/{code}", responses={404: {"model": ErrorBody}})
async def get_promotion(code: CodePath, pricing: PricingDep) -> PromotionOut:
    """A promotion and the uses it holds: used (paid orders) and reserved (pending ones)."""
    return promotion_out(await pricing.get_promotion(code))


def promotion_out(promotion: PromotionView) -> PromotionOut:
    return PromotionOut.model_validate(
        {**asdict(promotion.terms), "used": promotion.used, "reserved": promotion.reserved}
    )


@router.get("/shipping-methods", responses={422: {"model": ErrorBody}})
async def list_shipping_methods(
    pricing: PricingDep,
    country: Annotated[
        str | None, Query(pattern=COUNTRY_PATTERN, description="ISO 3166-1 alpha-2, any case")
    ] = None,
    currency: Annotated[
        str | None, Query(pattern=r"^[A-Za-z]{3}$", description="ISO 4217, any case")
    ] = None,
) -> ShippingMethodsOut:
    """Active shipping methods, cheapest first: those that ship to `country` in `currency`."""
    methods = await pricing.list_shipping_methods(country, currency)
    return ShippingMethodsOut(methods=[shipping_option(m) for m in methods])


def shipping_option(method: ShippingTerms) -> ShippingOptionOut:
    return ShippingOptionOut.model_validate(method, from_attributes=True)
