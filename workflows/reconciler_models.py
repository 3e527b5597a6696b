"""Payloads of the reconciler workflow: its input (what the schedule passes) and its summary.

Fields are only ever added (with defaults), so that the schedule's stored input and runs in
flight keep decoding.
"""

from __future__ import annotations

from pydantic import BaseModel


class ReconcilerInput(BaseModel):
    # Checkouts looked at per run; the rest wait for the next run.
    batch_size: int = 100


class ReconcileSummary(BaseModel):
    """What one run did. `found` is every pending checkout past its window, so it equals
    paid + expired + skipped + failed."""

    found: int = 0
    paid: int = 0
    expired: int = 0
    # Left for a later run: their workflow runs, or their payment is in flight.
    skipped: int = 0
    # Could not be settled now (the activity's retries ran out): the next run tries again.
    failed: int = 0
    # Idempotency-Keys past IDEMPOTENCY_KEY_TTL deleted by this run (housekeeping).
    keys_forgotten: int = 0
