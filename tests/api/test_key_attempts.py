"""The attempts of one Idempotency-Key: after an attempt ended `unavailable`, a retry of the key
opens the next attempt, whether the failed run has ended or is still compensating; the request
that drove the failed attempt answers 503 itself."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from api.schemas import CheckoutIn
from api.services import CheckoutService, checkout_id_for
from core.errors import ErrorCode, ServiceError
from core.settings import Settings
from workflows.models import CheckoutCreated, CheckoutFailure, PaymentOut, StartResult, Totals

KEY = "retry-me"
BODY = CheckoutIn.model_validate(
    {"customer": {"email": "a@example.com"}, "items": [{"sku": "MUG", "quantity": 1}]}
)
UNAVAILABLE = CheckoutFailure(code=ErrorCode.UNAVAILABLE, message="Stripe did not answer")


def created(checkout_id: uuid.UUID, *, first: bool) -> StartResult:
    return StartResult(
        created=CheckoutCreated(
            checkout_id=checkout_id,
            order_id=uuid.uuid4(),
            status="pending_payment",
            currency="usd",
            items=[],
            totals=Totals(subtotal=500, total=500),
            payment=PaymentOut(payment_intent_id="pi_1", client_secret="s", status="x"),
            expires_at=datetime.now(UTC),
        ),
        first=first,
    )


class Scripted(CheckoutService):
    """Each attempt's checkout id answers as scripted; records the ids it was asked for."""

    def __init__(self, answers: dict[uuid.UUID, StartResult]) -> None:
        # No Temporal client or order store: `_start_attempt`, their only user, is scripted.
        super().__init__(client=None, settings=Settings(environment="development"), orders=None)  # type: ignore[arg-type]
        self.answers = answers
        self.asked: list[uuid.UUID] = []

    async def _start_attempt(self, body: CheckoutIn, checkout_id: uuid.UUID) -> StartResult:
        self.asked.append(checkout_id)
        return self.answers[checkout_id]


class _AnyId(dict[uuid.UUID, StartResult]):
    """The same answer for any (random) checkout id."""

    def __init__(self, answer: StartResult) -> None:
        super().__init__()
        self.answer = answer

    def __missing__(self, key: uuid.UUID) -> StartResult:
        return self.answer


ATTEMPT_0, ATTEMPT_1 = checkout_id_for(KEY, 0), checkout_id_for(KEY, 1)


async def test_a_retry_that_finds_a_failed_attempt_still_compensating_opens_the_next() -> None:
    # The failed run answered its own request (first=True) and is still compensating: this
    # request joins it and gets first=False with the failure.
    service = Scripted(
        {
            ATTEMPT_0: StartResult(failure=UNAVAILABLE, first=False),
            ATTEMPT_1: created(ATTEMPT_1, first=True),
        }
    )

    checkout, first = await service.start(BODY, KEY)

    assert service.asked == [ATTEMPT_0, ATTEMPT_1]
    assert (checkout.checkout_id, first) == (ATTEMPT_1, True)


@pytest.mark.parametrize(
    "answer",
    [
        # The request that drove the attempt answers with its outcome.
        StartResult(failure=UNAVAILABLE, first=True),
        # Refusals other than `unavailable` are final for every request.
        StartResult(
            failure=CheckoutFailure(code=ErrorCode.INSUFFICIENT_STOCK, message="short"),
            first=False,
        ),
    ],
    ids=["drove-it", "insufficient-stock"],
)
async def test_a_final_answer_opens_no_next_attempt(answer: StartResult) -> None:
    service = Scripted({ATTEMPT_0: answer})

    with pytest.raises(ServiceError) as refused:
        await service.start(BODY, KEY)

    assert answer.failure is not None
    assert refused.value.code == answer.failure.code
    assert service.asked == [ATTEMPT_0]


async def test_without_a_key_there_is_no_next_attempt() -> None:
    service = Scripted(_AnyId(StartResult(failure=UNAVAILABLE, first=False)))

    with pytest.raises(ServiceError) as refused:
        await service.start(BODY, None)

    assert refused.value.code == ErrorCode.UNAVAILABLE
    assert len(service.asked) == 1
