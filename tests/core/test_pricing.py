"""The totals rule at its edges (`carts-and-pricing.md`, "Totals, one rule everywhere"), and
each reason a promotion does not apply. Pure functions: no database."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from core.catalog import MAX_CHARGE, PricedCart, PricedLine
from core.errors import ErrorCode, InvalidPromotion, ServiceError, ShippingUnavailable
from core.pricing import (
    FIXED,
    PERCENT,
    PromotionTerms,
    ShippingTerms,
    TaxTerms,
    Terms,
    compute_totals,
    half_up,
)

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def promotion(kind: str = PERCENT, value: int = 10, **changes: object) -> PromotionTerms:
    terms = PromotionTerms(
        code_key="save10",
        code="SAVE10",
        kind=kind,
        value=value,
        currency="usd" if kind == FIXED else None,
        min_subtotal=None,
        starts_at=None,
        ends_at=None,
        usage_limit=None,
        per_customer_limit=None,
        active=True,
    )
    return replace(terms, **changes)  # type: ignore[arg-type]


def shipping(price: int = 500, free_over: int | None = None) -> ShippingTerms:
    return ShippingTerms("std", "Standard", price, "usd", (), free_over, True)


def tax(rate_bps: int, includes_shipping: bool = False) -> TaxTerms:
    return TaxTerms("DE", rate_bps, includes_shipping)


def cart(subtotal: int, currency: str = "usd") -> PricedCart:
    return PricedCart(currency, (PricedLine("MUG", "Mug", subtotal, 1),))


@pytest.mark.parametrize(
    ("numerator", "denominator", "expected"),
    [(0, 10, 0), (4, 10, 0), (5, 10, 1), (14, 10, 1), (15, 10, 2), (25, 10, 3), (1, 3, 0)],
)
def test_half_up_rounds_exactly_half_up(numerator: int, denominator: int, expected: int) -> None:
    assert half_up(numerator, denominator) == expected


@pytest.mark.parametrize(
    ("subtotal", "discount"),
    [(5, 1), (4, 0), (15, 2), (25, 3), (14, 1), (1000, 100)],
    ids=["0.5-up", "0.4-down", "1.5-up", "2.5-up", "1.4-down", "exact"],
)
def test_a_percent_discount_rounds_half_up_to_the_minor_unit(subtotal: int, discount: int) -> None:
    totals = compute_totals(subtotal, promotion=promotion(PERCENT, 10))
    assert totals.discount == discount
    assert totals.total == subtotal - discount


def test_a_hundred_percent_discount_is_the_whole_subtotal() -> None:
    assert compute_totals(999, promotion=promotion(PERCENT, 100)).total == 0


@pytest.mark.parametrize(
    ("taxable", "rate_bps", "expected"),
    [(5000, 1, 1), (4999, 1, 0), (15_000, 1, 2), (1, 5000, 1), (1, 4999, 0), (3, 5000, 2)],
    ids=["0.5-up", "0.4999-down", "1.5-up", "half-of-1", "under-half-of-1", "1.5-of-3"],
)
def test_tax_rounds_half_up_to_the_minor_unit(taxable: int, rate_bps: int, expected: int) -> None:
    assert compute_totals(taxable, tax=tax(rate_bps)).tax == expected


def test_a_fixed_discount_above_the_subtotal_is_capped_at_it() -> None:
    totals = compute_totals(
        700, promotion=promotion(FIXED, 1000), shipping=shipping(500), tax=tax(2000, True)
    )
    assert totals.discount == 700
    # Nothing left of the goods: the customer pays shipping and its tax.
    assert totals.shipping == 500
    assert totals.tax == 100
    assert totals.total == totals.shipping + totals.tax == 600


def test_shipping_is_free_exactly_at_the_threshold_after_the_discount() -> None:
    method = shipping(500, free_over=9000)
    # 10000 - 10% = 9000: free.
    at = compute_totals(10_000, promotion=promotion(PERCENT, 10), shipping=method)
    assert (at.discount, at.shipping, at.total) == (1000, 0, 9000)
    # 9999 - 10% (999.9 -> 1000) = 8999: one below, charged.
    below = compute_totals(9999, promotion=promotion(PERCENT, 10), shipping=method)
    assert (below.discount, below.shipping, below.total) == (1000, 500, 9499)
    # The threshold applies to the subtotal after the discount, not before.
    assert compute_totals(9000, shipping=method).shipping == 0
    assert compute_totals(8999, shipping=method).shipping == 500


def test_a_method_without_a_threshold_is_never_free() -> None:
    assert compute_totals(MAX_CHARGE - 500, shipping=shipping(500)).shipping == 500


def test_a_zero_rate_country_pays_no_tax() -> None:
    totals = compute_totals(12_345, shipping=shipping(500), tax=tax(0, includes_shipping=True))
    assert totals.tax == 0
    assert totals.total == 12_845


@pytest.mark.parametrize(("includes_shipping", "expected_tax"), [(True, 2100), (False, 2000)])
def test_tax_includes_shipping_only_when_the_rate_says_so(
    includes_shipping: bool, expected_tax: int
) -> None:
    totals = compute_totals(10_000, shipping=shipping(500), tax=tax(2000, includes_shipping))
    assert totals.tax == expected_tax
    assert totals.total == 10_000 + 500 + expected_tax


def test_tax_is_on_the_discounted_amount() -> None:
    totals = compute_totals(10_000, promotion=promotion(PERCENT, 25), tax=tax(2000))
    assert (totals.discount, totals.tax, totals.total) == (2500, 1500, 9000)
    fixed = compute_totals(10_000, promotion=promotion(FIXED, 1234), tax=tax(1900))
    # (10000 - 1234) x 19% = 1665.54 -> 1666
    assert (fixed.tax, fixed.total) == (1666, 10_000 - 1234 + 1666)


def test_the_totals_as_the_contract_names_them() -> None:
    totals = compute_totals(
        10_000, promotion=promotion(PERCENT, 10), shipping=shipping(500), tax=tax(1000, True)
    )
    assert totals.as_dict() == {
        "subtotal": 10_000,
        "discount": 1000,
        "tax": 950,
        "shipping": 500,
        "total": 10_450,
    }


# -- promotion checks ---------------------------------------------------------------------


def reason_of(terms: PromotionTerms, subtotal: int = 10_000, currency: str = "usd") -> str:
    with pytest.raises(InvalidPromotion) as caught:
        terms.check(currency=currency, subtotal=subtotal, now=NOW)
    assert caught.value.code == ErrorCode.INVALID_PROMOTION
    assert caught.value.details == {"code": terms.code, "reason": caught.value.reason}
    return caught.value.reason


def test_an_inactive_promotion_does_not_apply() -> None:
    assert reason_of(promotion(active=False)) == "inactive"


def test_a_promotion_applies_from_its_start_and_until_before_its_end() -> None:
    assert reason_of(promotion(starts_at=NOW + timedelta(seconds=1))) == "not_started"
    promotion(starts_at=NOW).check(currency="usd", subtotal=1, now=NOW)
    promotion(ends_at=NOW + timedelta(seconds=1)).check(currency="usd", subtotal=1, now=NOW)
    assert reason_of(promotion(ends_at=NOW)) == "ended"


def test_a_fixed_promotion_applies_in_its_currency_only() -> None:
    assert reason_of(promotion(FIXED, 500), currency="eur") == "currency"
    promotion(FIXED, 500).check(currency="usd", subtotal=1, now=NOW)
    # A percentage has no currency: it applies to any.
    promotion(PERCENT, 10).check(currency="eur", subtotal=1, now=NOW)


def test_a_minimum_subtotal_is_inclusive() -> None:
    assert reason_of(promotion(min_subtotal=5000), subtotal=4999) == "min_subtotal"
    promotion(min_subtotal=5000).check(currency="usd", subtotal=5000, now=NOW)


def test_terms_check_the_promotion_against_the_cart_before_pricing_it() -> None:
    terms = Terms(promotion=promotion(min_subtotal=20_000))
    with pytest.raises(InvalidPromotion):
        terms.price(cart(10_000), now=NOW)


def test_terms_refuse_a_shipping_method_in_another_currency() -> None:
    terms = Terms(country="US", shipping=shipping())
    with pytest.raises(ShippingUnavailable) as caught:
        terms.price(cart(1000, "eur"), now=NOW)
    assert caught.value.details == {"shipping_method": "std", "reason": "currency"}


def test_terms_refuse_a_total_above_what_stripe_can_charge() -> None:
    terms = Terms(country="DE", tax=tax(2000))
    with pytest.raises(ServiceError) as caught:
        terms.price(cart(MAX_CHARGE - 1), now=NOW)
    assert caught.value.code == ErrorCode.VALIDATION_ERROR
