"""Errors no retry can fix: an activity turns them into non-retryable failures, so a checkout is
refused at once (nothing is kept: the transaction rolled back, the saga compensates) instead of
being retried until its deadline and answered 503."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DataError, IntegrityError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.errors import CART_REFUSALS, ErrorCode, ServiceError


@contextmanager
def refused_at_once(checkout_id: uuid.UUID) -> Iterator[None]:
    """Around a forward step of the saga (never a compensation: those retry until a fix)."""
    try:
        yield
    except ServiceError as exc:
        if exc.code not in CART_REFUSALS:
            raise
        # Retrying will not create stock or products: fail the step, the workflow decides.
        raise ApplicationError(exc.message, exc.details, type=exc.code, non_retryable=True) from exc
    except (DataError, UnicodeError) as exc:
        # Data PostgreSQL cannot store (the API refuses it first; this is the second line).
        activity.logger.error("checkout %s: data the database refuses: %s", checkout_id, exc)
        raise ApplicationError(
            "the request holds data the service cannot store",
            type=ErrorCode.VALIDATION_ERROR,
            non_retryable=True,
        ) from exc
    except IntegrityError as exc:
        # Every write is guarded (locks, ON CONFLICT): a violated constraint is a bug.
        activity.logger.error("checkout %s: constraint violated: %s", checkout_id, exc)
        raise ApplicationError(
            "the checkout could not be recorded; it has been logged",
            type=ErrorCode.INTERNAL_ERROR,
            non_retryable=True,
        ) from exc
