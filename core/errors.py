"""The service's error vocabulary.

Codes are the contract's `error` values. They are constants shared by the code that raises an
error, the workflow that handles it and the tests that check it; the HTTP status for each code
lives at the edge, in `api.errors`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    VALIDATION_ERROR = "validation_error"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNKNOWN_SKU = "unknown_sku"
    INSUFFICIENT_STOCK = "insufficient_stock"
    QUANTITY_LIMIT_EXCEEDED = "quantity_limit_exceeded"
    TOO_MANY_PENDING_CHECKOUTS = "too_many_pending_checkouts"
    RATE_LIMITED = "rate_limited"
    INVALID_PROMOTION = "invalid_promotion"
    SHIPPING_UNAVAILABLE = "shipping_unavailable"
    PROMOTION_EXHAUSTED = "promotion_exhausted"
    VERSION_CONFLICT = "version_conflict"
    STOCK_BELOW_RESERVED = "stock_below_reserved"
    INVALID_STATE = "invalid_state"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    INVALID_SIGNATURE = "invalid_signature"
    INVALID_PAYLOAD = "invalid_payload"
    UNAVAILABLE = "unavailable"
    INTERNAL_ERROR = "internal_error"


# A checkout refused because of its request (not because a dependency failed): final, never
# retried, and answered to the client with its code. INTERNAL_ERROR is a data or constraint
# error no retry can fix (a bug): refused at once too, with nothing kept.
CART_REFUSALS = frozenset(
    {
        ErrorCode.INSUFFICIENT_STOCK,
        ErrorCode.UNKNOWN_SKU,
        ErrorCode.VALIDATION_ERROR,
        ErrorCode.QUANTITY_LIMIT_EXCEEDED,
        ErrorCode.TOO_MANY_PENDING_CHECKOUTS,
        ErrorCode.INVALID_STATE,
        ErrorCode.INVALID_PROMOTION,
        ErrorCode.SHIPPING_UNAVAILABLE,
        ErrorCode.PROMOTION_EXHAUSTED,
        ErrorCode.INTERNAL_ERROR,
    }
)


class ServiceError(Exception):
    """An error a caller can act on: a code from `ErrorCode`, a sentence and optional details."""

    code: str = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, details: Any = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code


class NotFound(ServiceError):
    code = ErrorCode.NOT_FOUND


class UnknownSku(ServiceError):
    code = ErrorCode.UNKNOWN_SKU

    def __init__(self, skus: list[str]) -> None:
        super().__init__(f"unknown SKU: {', '.join(skus)}", details=[{"sku": sku} for sku in skus])
        self.skus = skus


class InsufficientStock(ServiceError):
    """Raised by `reserve` when any line cannot be served; nothing was reserved."""

    code = ErrorCode.INSUFFICIENT_STOCK

    def __init__(self, shortages: list[dict[str, Any]]) -> None:
        skus = ", ".join(s["sku"] for s in shortages)
        super().__init__(f"not enough stock for: {skus}", details=shortages)
        self.shortages = shortages


class StockBelowReserved(ServiceError):
    code = ErrorCode.STOCK_BELOW_RESERVED


class InvalidState(ServiceError):
    code = ErrorCode.INVALID_STATE


class Unavailable(ServiceError):
    code = ErrorCode.UNAVAILABLE


class Unauthorized(ServiceError):
    code = ErrorCode.UNAUTHORIZED


class Forbidden(ServiceError):
    code = ErrorCode.FORBIDDEN


class QuantityLimitExceeded(ServiceError):
    """A line asks for more units of a SKU than its `max_per_order`."""

    code = ErrorCode.QUANTITY_LIMIT_EXCEEDED

    def __init__(self, over: list[dict[str, Any]]) -> None:
        skus = ", ".join(f"{o['sku']} (at most {o['max']})" for o in over)
        super().__init__(f"too many units in one checkout: {skus}", details=over)


class TooManyPendingCheckouts(ServiceError):
    code = ErrorCode.TOO_MANY_PENDING_CHECKOUTS

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this customer already has {limit} checkouts waiting for payment; pay or cancel one",
            details={"limit": limit},
        )


class RateLimited(ServiceError):
    """Too many requests; `retry_after` seconds until the next one is accepted. `limit` says
    whose budget ran out (`address`, `customer`), for the metrics."""

    code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, *, retry_after: int, limit: str = "rate") -> None:
        super().__init__(message, details={"retry_after": retry_after})
        self.retry_after = retry_after
        self.limit = limit


class InvalidPromotion(ServiceError):
    """A promotion code that does not apply; `reason` is one of the contract's."""

    code = ErrorCode.INVALID_PROMOTION

    def __init__(self, code: str, reason: str, message: str) -> None:
        super().__init__(message, details={"code": code, "reason": reason})
        self.reason = reason


class ShippingUnavailable(ServiceError):
    code = ErrorCode.SHIPPING_UNAVAILABLE


class PromotionExhausted(ServiceError):
    """No use of the promotion is left, in total or for this customer; nothing was reserved."""

    code = ErrorCode.PROMOTION_EXHAUSTED

    def __init__(self, code: str, limit: int, scope: str) -> None:
        whose = "for this customer" if scope == "customer" else "in total"
        super().__init__(
            f"promotion {code} has no use left {whose} (limit {limit})",
            details={"code": code, "limit": limit, "scope": scope},
        )


class VersionConflict(ServiceError):
    code = ErrorCode.VERSION_CONFLICT
