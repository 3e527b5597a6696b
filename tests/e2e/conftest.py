from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from core.db import SessionFactory
from core.invariants import check
from core.settings import Settings
from tests.e2e.stack import Stack, running_stack, stack_settings


@pytest.fixture(scope="session")
async def e2e_stack(settings: Settings, temporal_address: str) -> AsyncIterator[Stack]:
    async with running_stack(stack_settings(settings, "e2e", temporal_address)) as stack:
        yield stack


@pytest.fixture
async def stack(e2e_stack: Stack, db: SessionFactory) -> AsyncIterator[Stack]:
    """The running stack over empty tables, with the default payment window."""
    checkouts = e2e_stack.services.checkouts
    # What tests may change on the running service, put back after each.
    knobs = (
        checkouts.payment_timeout_seconds,
        checkouts.key_ttl_seconds,
        checkouts.max_pending_checkouts,
        checkouts.limiter,
    )
    e2e_stack.stripe_proxy.mode = "pass"
    e2e_stack.stripe_proxy.refused = 0
    yield e2e_stack
    (
        checkouts.payment_timeout_seconds,
        checkouts.key_ttl_seconds,
        checkouts.max_pending_checkouts,
        checkouts.limiter,
    ) = knobs
    e2e_stack.stripe_proxy.mode = "pass"
    # After every end-to-end test: nothing lost or double-counted, by the database and Stripe.
    services = e2e_stack.services
    assert await check(services.sessions, services.stripe) == []
