"""A run that is completing refuses updates and signals for an instant ("workflow is closing");
the API asks again instead of answering 503. Other refusals are not retried."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from google.protobuf.any_pb2 import Any as AnyDetail
from temporalio.api.common.v1 import GrpcStatus
from temporalio.api.enums.v1 import ResourceExhaustedCause
from temporalio.api.errordetails.v1 import MultiOperationExecutionFailure, ResourceExhaustedFailure
from temporalio.service import RPCError, RPCStatusCode

from core import temporal
from core.temporal import retry_while_busy

BUSY = ResourceExhaustedCause.RESOURCE_EXHAUSTED_CAUSE_BUSY_WORKFLOW
RPS_LIMIT = ResourceExhaustedCause.RESOURCE_EXHAUSTED_CAUSE_RPS_LIMIT
CLOSING = "workflow operation can not be applied because workflow is closing"


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(temporal, "BUSY_RETRY_DELAYS", (0.0, 0.0, 0.0))


def refusal(
    status: RPCStatusCode, cause: ResourceExhaustedCause.ValueType | None, *, multi: bool = False
) -> RPCError:
    """The error as the SDK raises it; for Update-with-Start the cause sits in the status of
    one operation inside a multi-operation failure."""
    grpc = GrpcStatus(code=status.value, message=CLOSING)
    if cause is not None:
        detail = AnyDetail()
        detail.Pack(ResourceExhaustedFailure(cause=cause))
        if multi:
            operation = MultiOperationExecutionFailure.OperationStatus(
                code=status.value, message=CLOSING, details=[detail]
            )
            detail = AnyDetail()
            detail.Pack(MultiOperationExecutionFailure(statuses=[operation]))
        grpc.details.append(detail)
    return RPCError(CLOSING, status, grpc.SerializeToString())


def refused_then_answered(
    refusals: int, error: RPCError
) -> tuple[list[int], Callable[[], Awaitable[str]]]:
    calls: list[int] = []

    async def call() -> str:
        calls.append(1)
        if len(calls) <= refusals:
            raise error
        return "answer"

    return calls, call


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(refusal(RPCStatusCode.RESOURCE_EXHAUSTED, BUSY), id="update-or-signal"),
        pytest.param(
            refusal(RPCStatusCode.RESOURCE_EXHAUSTED, BUSY, multi=True), id="update-with-start"
        ),
        pytest.param(refusal(RPCStatusCode.ABORTED, None), id="aborted"),
    ],
)
async def test_a_closing_workflow_is_asked_again(error: RPCError) -> None:
    calls, call = refused_then_answered(2, error)
    assert await retry_while_busy(call) == "answer"
    assert len(calls) == 3


async def test_it_gives_up_after_its_last_delay() -> None:
    calls, call = refused_then_answered(10, refusal(RPCStatusCode.RESOURCE_EXHAUSTED, BUSY))
    with pytest.raises(RPCError) as raised:
        await retry_while_busy(call)
    assert raised.value.status == RPCStatusCode.RESOURCE_EXHAUSTED
    assert len(calls) == 4  # one per delay, and a last one


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(refusal(RPCStatusCode.RESOURCE_EXHAUSTED, RPS_LIMIT), id="rate-limited"),
        pytest.param(
            refusal(RPCStatusCode.RESOURCE_EXHAUSTED, RPS_LIMIT, multi=True),
            id="rate-limited-update-with-start",
        ),
        pytest.param(refusal(RPCStatusCode.RESOURCE_EXHAUSTED, None), id="no-cause"),
        pytest.param(refusal(RPCStatusCode.UNAVAILABLE, None), id="unavailable"),
    ],
)
async def test_other_refusals_are_not_retried(error: RPCError) -> None:
    calls, call = refused_then_answered(1, error)
    with pytest.raises(RPCError):
        await retry_while_busy(call)
    assert len(calls) == 1
