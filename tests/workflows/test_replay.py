"""Recorded histories of real checkout runs must replay on today's workflow code.

A change that would break checkouts already in flight (a reordered step, a new activity on an
old path) fails here; such changes go behind `workflow.patched()`. Re-record the histories with
`RECORD_HISTORIES=1 pytest tests/workflows` only for changes that are patched or that no running
checkout can meet.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from core.temporal import DATA_CONVERTER
from workflows.checkout import CheckoutWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_there_are_recorded_histories_for_each_ending() -> None:
    names = {path.stem for path in HISTORIES}
    assert {"paid", "expired", "cancelled", "declined_then_paid", "rejected"} <= names


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_recorded_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(f"checkout-{path.stem}", path.read_text())
    replayer = Replayer(workflows=[CheckoutWorkflow], data_converter=DATA_CONVERTER)
    result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None
