"""How one Idempotency-Key finds its checkout, on real PostgreSQL with the workflow's answers
scripted: the key is claimed in its scope before any workflow starts, a duplicate reads the
claim, another body is refused, and a checkout that was refused releases its key so that a
retry (or a request that joined the failed attempt) opens a new one."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from api.access import OrderAccess
from api.auth import Caller, CallerKind
from api.ratelimit import CheckoutLimiter
from api.schemas import CheckoutIn
from api.services.checkout import CheckoutService, fingerprint
from core.checkout_keys import CheckoutKeyStore, KeyClaim
from core.db import SessionFactory
from core.errors import ErrorCode, Forbidden, ServiceError
from core.ledger import StockLedger
from core.orders import OrderStore
from core.sealing import Sealer
from core.settings import Settings
from workflows.models import (
    CheckoutCreated,
    CheckoutFailure,
    Customer,
    PaymentOut,
    StartResult,
    Totals,
)

KEY = "retry-me"
GUEST = Caller(CallerKind.GUEST)
BODY = CheckoutIn.model_validate(
    {"customer": {"email": "a@example.com"}, "items": [{"sku": "MUG", "quantity": 1}]}
)
UNAVAILABLE = CheckoutFailure(code=ErrorCode.UNAVAILABLE, message="Stripe did not answer")


def created(claim: KeyClaim) -> StartResult:
    return StartResult(
        created=CheckoutCreated(
            checkout_id=claim.checkout_id,
            order_id=claim.order_id,
            status="pending_payment",
            currency="usd",
            items=[],
            totals=Totals(subtotal=500, total=500),
            payment=PaymentOut(payment_intent_id="pi_1", client_secret="s", status="x"),
            expires_at=datetime.now(UTC),
        )
    )


class Scripted(CheckoutService):
    """The workflow's answers are scripted per attempt; what is asked of it is recorded. A
    refused attempt releases its key, as the workflow's compensation does."""

    def __init__(self, db: SessionFactory, answers: list[StartResult | None]) -> None:
        orders = OrderStore(db, StockLedger(db))
        self.keys = CheckoutKeyStore(db)
        super().__init__(
            client=None,  # type: ignore[arg-type]
            settings=Settings(environment="development"),
            orders=orders,
            keys=self.keys,
            access=OrderAccess(orders),
            limiter=CheckoutLimiter("1000/minute", None),
            stripe=None,  # type: ignore[arg-type]
            sealer=Sealer("test-secret-key-for-sealing"),
        )
        self.db = db
        self.answers = answers
        self.asked: list[KeyClaim] = []

    async def _start_attempt(
        self, body: CheckoutIn, items: list[tuple[str, int]], customer: Customer, claim: KeyClaim
    ) -> StartResult:
        self.asked.append(claim)
        answer = self.answers.pop(0) or created(claim)
        if answer.failure is not None:
            async with self.db.begin() as session:
                await CheckoutKeyStore.release(session, claim.checkout_id)
        return answer


async def test_the_first_request_claims_the_key_and_a_random_checkout_id(
    db: SessionFactory,
) -> None:
    service = Scripted(db, [None])

    checkout, first = await service.start(BODY, KEY, GUEST, "203.0.113.7")

    assert first
    (claim,) = service.asked
    assert (checkout.checkout_id, checkout.order_id) == (claim.checkout_id, claim.order_id)
    assert claim.checkout_id.version == 4
    assert claim.order_id.version == 4


async def test_a_duplicate_joins_the_claimed_checkout(db: SessionFactory) -> None:
    service = Scripted(db, [None, None])
    checkout, _ = await service.start(BODY, KEY, GUEST, "203.0.113.7")

    again, first = await service.start(BODY, KEY, GUEST, "203.0.113.7")

    # No payment row yet, so the duplicate asks the workflow (one update id per checkout).
    assert not first
    assert again.checkout_id == checkout.checkout_id
    assert service.asked[0].checkout_id == service.asked[1].checkout_id


async def test_another_body_under_the_key_is_refused_and_starts_nothing(
    db: SessionFactory,
) -> None:
    service = Scripted(db, [None])
    await service.start(BODY, KEY, GUEST, "203.0.113.7")
    other = BODY.model_copy(update={"metadata": {"other": True}})

    with pytest.raises(ServiceError) as refused:
        await service.start(other, KEY, GUEST, "203.0.113.7")

    assert refused.value.code == ErrorCode.IDEMPOTENCY_KEY_REUSED
    assert len(service.asked) == 1


async def test_the_same_key_in_two_scopes_gives_two_checkouts(db: SessionFactory) -> None:
    service = Scripted(db, [None, None, None])
    guest, _ = await service.start(BODY, KEY, GUEST, "203.0.113.7")
    other_email = BODY.model_copy(
        update={"customer": BODY.customer.model_copy(update={"email": "b@example.com"})}
    )
    other, first = await service.start(other_email, KEY, GUEST, "203.0.113.7")
    customer = Caller(CallerKind.CUSTOMER, user_id="u-1")
    signed_in, first_too = await service.start(BODY, KEY, customer, "203.0.113.7")

    assert first and first_too
    assert len({guest.checkout_id, other.checkout_id, signed_in.checkout_id}) == 3


async def test_a_request_that_joined_a_failed_attempt_opens_the_next(db: SessionFactory) -> None:
    service = Scripted(db, [None])
    # Claimed by another request whose attempt then fails `unavailable`: this request joins it.
    first_claim, _ = await service.keys.claim(
        "email:a@example.com", KEY, fingerprint(BODY, None), ttl_seconds=60
    )
    service.answers = [StartResult(failure=UNAVAILABLE), None]

    checkout, first = await service.start(BODY, KEY, GUEST, "203.0.113.7")

    assert service.asked[0].checkout_id == first_claim.checkout_id
    assert checkout.checkout_id != first_claim.checkout_id
    assert first


@pytest.mark.parametrize(
    "failure",
    [UNAVAILABLE, CheckoutFailure(code=ErrorCode.INSUFFICIENT_STOCK, message="short")],
    ids=["unavailable", "insufficient-stock"],
)
async def test_the_request_that_drove_a_refused_attempt_answers_its_refusal_and_frees_the_key(
    db: SessionFactory, failure: CheckoutFailure
) -> None:
    service = Scripted(db, [StartResult(failure=failure), None])

    with pytest.raises(ServiceError) as refused:
        await service.start(BODY, KEY, GUEST, "203.0.113.7")
    assert refused.value.code == failure.code
    assert len(service.asked) == 1

    # Nothing was kept: the key opens a new checkout.
    retried, first = await service.start(BODY, KEY, GUEST, "203.0.113.7")
    assert first
    assert retried.checkout_id != service.asked[0].checkout_id


async def test_without_a_key_every_request_is_a_new_checkout(db: SessionFactory) -> None:
    service = Scripted(db, [None, None])

    one, _ = await service.start(BODY, None, GUEST, "203.0.113.7")
    two, _ = await service.start(BODY, None, GUEST, "203.0.113.7")

    assert one.checkout_id != two.checkout_id


@pytest.mark.parametrize(
    ("caller", "user_id"),
    [
        (GUEST, "u-1"),
        (Caller(CallerKind.CUSTOMER, user_id="u-1"), "u-2"),
        (Caller(CallerKind.ORDER, order_id=uuid.uuid4()), None),
    ],
    ids=["guest-names-a-user", "customer-names-another", "order-token"],
)
async def test_who_may_check_out_as_whom(
    db: SessionFactory, caller: Caller, user_id: str | None
) -> None:
    service = Scripted(db, [None])
    body = BODY.model_copy(
        update={"customer": BODY.customer.model_copy(update={"user_id": user_id})}
    )

    with pytest.raises(Forbidden):
        await service.start(body, KEY, caller, "203.0.113.7")
    assert service.asked == []


class _StripeKnowsTheSecret:
    """For a secret sealed under another SECRET_KEY: the service asks Stripe instead."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def retrieve_intent(self, intent_id: str) -> object:
        self.asked.append(intent_id)

        class Intent:
            client_secret = f"{intent_id}_secret_from_stripe"

        return Intent()


def _sealed_answer(claim: KeyClaim, sealed: str | None, clear: str | None) -> StartResult:
    answer = created(claim)
    assert answer.created is not None
    payment = PaymentOut(
        payment_intent_id="pi_1", client_secret=clear, client_secret_sealed=sealed, status="x"
    )
    return StartResult(created=answer.created.model_copy(update={"payment": payment}))


async def test_the_workflows_sealed_client_secret_reaches_the_client_in_clear(
    db: SessionFactory,
) -> None:
    """The workflow's answer carries the secret sealed (its history is shown to operators);
    the client gets it in clear. An answer recorded before sealing passes as it is, and one
    sealed under another SECRET_KEY is read back from Stripe."""
    service = Scripted(db, [])
    sealer = Sealer("test-secret-key-for-sealing")
    stripe = _StripeKnowsTheSecret()
    service._stripe = stripe  # type: ignore[assignment]
    cases = [
        (sealer.seal("pi_1_secret_abc"), None, "pi_1_secret_abc"),
        (None, "pi_1_secret_old_run", "pi_1_secret_old_run"),
        (Sealer("a-rotated-secret-key").seal("pi_1_secret_abc"), None, "pi_1_secret_from_stripe"),
    ]
    for sealed, clear, expected in cases:
        claim = KeyClaim(uuid.uuid4(), uuid.uuid4(), "fp", claimed=True)
        service.answers.append(_sealed_answer(claim, sealed, clear))
        checkout, _ = await service.start(BODY, None, GUEST, "203.0.113.7")
        assert checkout.payment.client_secret == expected
        assert checkout.payment.client_secret_sealed is None
    assert stripe.asked == ["pi_1"]
