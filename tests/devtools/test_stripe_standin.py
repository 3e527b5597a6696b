"""The Stripe stand-in's per-type index: localstripe's listings read it instead of the store.

The index is exercised in-process, through localstripe's own resource classes. The module
applies `_index_store()` (which is safe to apply again: it wraps nothing) and puts
localstripe back as it was afterwards; each test starts and ends with an empty store.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from localstripe import resources

from devtools.stripe_standin import _index_store, _Persistence

CARD = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}


@pytest.fixture(scope="module", autouse=True)
def _indexed_localstripe() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        # Recorded first, so that leaving the module restores localstripe's own methods.
        for name in ("__setitem__", "__delitem__", "clear"):
            mp.setattr(resources.Store, name, getattr(resources.Store, name))
        mp.setattr(
            resources.StripeObject,
            "_api_list_all",
            resources.StripeObject.__dict__["_api_list_all"],
        )
        # No pickle in /tmp after each write, and no webhook tasks without an event loop.
        mp.setattr(resources.store, "dump_to_disk", lambda: None, raising=False)
        mp.setattr(resources, "schedule_webhook", lambda event: None)
        _index_store()
        yield
        resources.store.clear()


@pytest.fixture(autouse=True)
def _empty_store() -> Iterator[None]:
    resources.store.clear()
    yield
    resources.store.clear()


def _listed(cls: Any, **filters: Any) -> list[Any]:
    return list(cls._api_list_all("/v1/test", **filters)._list)


def _ids(cls: Any, **filters: Any) -> list[str]:
    return [obj.id for obj in _listed(cls, **filters)]


def _charge(amount: int) -> Any:
    card = resources.PaymentMethod._api_create(type="card", card=dict(CARD))
    return resources.Charge._api_create(amount=amount, currency="usd", source=card.id)


def test_a_listing_holds_its_type_only_in_creation_order() -> None:
    first = resources.Customer._api_create(email="a@example.com")
    intent = resources.PaymentIntent._api_create(amount=500, currency="usd")
    second = resources.Customer._api_create(email="b@example.com")
    resources.Balance._api_retrieve()  # a singleton, stored without an id
    third = resources.Customer._api_create(email="c@example.com")
    other = resources.PaymentIntent._api_create(amount=700, currency="usd")

    assert _ids(resources.Customer) == [first.id, second.id, third.id]
    assert _listed(resources.Customer) == [first, second, third]
    assert _ids(resources.PaymentIntent) == [intent.id, other.id]
    assert _ids(resources.Customer, email="b@example.com") == [second.id]
    page = resources.PaymentIntent._api_list_all("/v1/payment_intents", limit=1)
    assert (page.total_count, page.has_more) == (2, True)
    assert [item["id"] for item in page.data] == [intent.id]


def test_a_deleted_object_leaves_the_listing() -> None:
    customers = [resources.Customer._api_create() for _ in range(3)]
    intents = [resources.PaymentIntent._api_create(amount=100, currency="usd") for _ in range(2)]

    resources.Customer._api_delete(customers[1].id)
    del resources.store["payment_intent:" + intents[0].id]

    assert _ids(resources.Customer) == [customers[0].id, customers[2].id]
    assert _ids(resources.PaymentIntent) == [intents[1].id]


def test_an_object_stored_again_is_listed_once_in_its_place() -> None:
    first = resources.Customer._api_create()
    second = resources.Customer._api_create()
    resources.store["customer:" + first.id] = first

    assert _listed(resources.Customer) == [first, second]


def test_clear_empties_every_listing() -> None:
    customer = resources.Customer._api_create()
    charge = _charge(1000)
    assert (_listed(resources.Customer), _listed(resources.Charge)) == ([customer], [charge])

    resources.store.clear()

    assert _listed(resources.Customer) == []
    assert _listed(resources.Charge) == []
    assert _listed(resources.BalanceTransaction) == []


def test_a_charge_counts_only_its_own_refunds() -> None:
    charge = _charge(1000)
    other = _charge(2000)
    refunds = [
        resources.Refund._api_create(charge=charge.id, amount=300),
        resources.Refund._api_create(charge=other.id, amount=50),
        resources.Refund._api_create(charge=charge.id, amount=200),
    ]

    assert (charge.amount_refunded, other.amount_refunded) == (500, 50)
    assert not charge.refunded
    assert {r.id for r in charge.refunds._list} == {refunds[0].id, refunds[2].id}
    assert set(_ids(resources.Refund, charge=other.id)) == {refunds[1].id}
    assert set(_ids(resources.Refund)) == {r.id for r in refunds}

    resources.Refund._api_create(charge=charge.id, amount=500)
    assert charge.amount_refunded == 1000
    assert charge.refunded
    assert other.amount_refunded == 50


def test_a_loaded_state_file_is_listed(tmp_path: Path) -> None:
    persistence = _Persistence(resources.store, tmp_path / "localstripe.pickle")
    ids = [resources.Customer._api_create(email=f"{i}@example.com").id for i in range(3)]
    charge = _charge(1000)
    resources.Refund._api_create(charge=charge.id, amount=400)
    persistence.dirty = True
    persistence.save()

    resources.store.clear()
    assert _listed(resources.Customer) == []
    persistence.load()

    # The listing holds the loaded objects, not the ones from before the clear.
    assert _listed(resources.Customer) == [resources.store["customer:" + i] for i in ids]
    assert resources.Charge._api_retrieve(charge.id).amount_refunded == 400


def test_indexing_again_keeps_each_object_once() -> None:
    first = resources.Customer._api_create()

    _index_store()
    second = resources.Customer._api_create()

    assert _listed(resources.Customer) == [first, second]
