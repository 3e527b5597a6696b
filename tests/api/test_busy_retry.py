"""A run that is completing refuses updates for an instant; the API asks again instead of 503."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from temporalio.service import RPCError, RPCStatusCode

from api import services
from api.services import _retry_while_busy


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "_BUSY_RETRY_DELAYS", (0.0, 0.0, 0.0))


def busy_then(
    result: str, refusals: int, status: RPCStatusCode
) -> tuple[list[int], Callable[[], Awaitable[str]]]:
    calls: list[int] = []

    async def call() -> str:
        calls.append(1)
        if len(calls) <= refusals:
            raise RPCError(
                "workflow operation can not be applied because workflow is closing", status, b""
            )
        return result

    return calls, call


@pytest.mark.parametrize("status", [RPCStatusCode.RESOURCE_EXHAUSTED, RPCStatusCode.ABORTED])
async def test_a_closing_workflow_is_asked_again(status: RPCStatusCode) -> None:
    calls, call = busy_then("answer", refusals=2, status=status)
    assert await _retry_while_busy(call) == "answer"
    assert len(calls) == 3


async def test_it_gives_up_after_its_last_delay() -> None:
    calls, call = busy_then("answer", refusals=10, status=RPCStatusCode.RESOURCE_EXHAUSTED)
    with pytest.raises(RPCError) as raised:
        await _retry_while_busy(call)
    assert raised.value.status == RPCStatusCode.RESOURCE_EXHAUSTED
    assert len(calls) == 4  # one per delay, and a last one


async def test_other_errors_are_not_retried() -> None:
    calls, call = busy_then("answer", refusals=1, status=RPCStatusCode.UNAVAILABLE)
    with pytest.raises(RPCError):
        await _retry_while_busy(call)
    assert len(calls) == 1
