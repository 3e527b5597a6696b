"""Every error leaves the service in one shape: {"error", "message", "details"?}."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.metrics import route_of
from core.errors import ErrorCode, RateLimited, ServiceError

log = logging.getLogger(__name__)

CHECKOUT_ROUTE = "/checkout"

HTTP_STATUS: dict[str, int] = {
    ErrorCode.VALIDATION_ERROR: 422,
    ErrorCode.UNKNOWN_SKU: 422,
    ErrorCode.IDEMPOTENCY_KEY_REUSED: 422,
    ErrorCode.QUANTITY_LIMIT_EXCEEDED: 422,
    ErrorCode.INVALID_PROMOTION: 422,
    ErrorCode.SHIPPING_UNAVAILABLE: 422,
    ErrorCode.PROMOTION_EXHAUSTED: 409,
    ErrorCode.VERSION_CONFLICT: 412,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.INSUFFICIENT_STOCK: 409,
    ErrorCode.STOCK_BELOW_RESERVED: 409,
    ErrorCode.INVALID_STATE: 409,
    ErrorCode.INVALID_SIGNATURE: 400,
    ErrorCode.INVALID_PAYLOAD: 400,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.TOO_MANY_PENDING_CHECKOUTS: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL_ERROR: 500,
}

_STARLETTE_CODES = {
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
}


def error_response(
    code: str,
    message: str,
    details: Any = None,
    *,
    status: int | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"error": code, "message": message}
    if details is not None:
        body["details"] = jsonable_encoder(details)
    return JSONResponse(body, status_code=status or HTTP_STATUS.get(code, 500), headers=headers)


def _count(request: Request, code: str, exc: Exception | None = None) -> None:
    """A refused POST /checkout, by its error code (and which limit, if it was one)."""
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is None or request.method != "POST" or route_of(request.scope) != CHECKOUT_ROUTE:
        return
    metrics.checkouts_refused.labels(code).inc()
    if isinstance(exc, RateLimited):
        metrics.rate_limited.labels(exc.limit).inc()
    elif code == ErrorCode.TOO_MANY_PENDING_CHECKOUTS:
        metrics.rate_limited.labels("pending").inc()


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    _count(request, exc.code, exc)
    headers = None
    if exc.code == ErrorCode.UNAUTHORIZED:
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, RateLimited):
        headers = {"Retry-After": str(exc.retry_after)}
    return error_response(exc.code, exc.message, exc.details, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    _count(request, ErrorCode.VALIDATION_ERROR)
    details = [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in exc.errors()
    ]
    first = details[0] if details else None
    where = ".".join(str(part) for part in first["loc"]) if first else "request"
    message = f"invalid request: {where}: {first['msg']}" if first else "invalid request"
    return error_response(ErrorCode.VALIDATION_ERROR, message, details)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    _count(request, _STARLETTE_CODES.get(exc.status_code, ErrorCode.VALIDATION_ERROR))
    if exc.status_code == 400:
        # FastAPI's body reader says 400 for a body it cannot decode (bytes that are not
        # UTF-8, say); to a client that is malformed JSON, which the contract answers with 422.
        return error_response(ErrorCode.VALIDATION_ERROR, "the request body is not valid JSON")
    code = _STARLETTE_CODES.get(exc.status_code, ErrorCode.VALIDATION_ERROR)
    if exc.status_code >= 500:
        code = ErrorCode.INTERNAL_ERROR
    return error_response(
        code, str(exc.detail), status=exc.status_code, headers=getattr(exc, "headers", None)
    )


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # Only connection-level failures are "unavailable"; a constraint violation is a bug and
    # must surface as one.
    if isinstance(exc, DBAPIError) and not (
        exc.connection_invalidated or _is_connection_error(exc)
    ):
        return await _unexpected(request, exc)
    _count(request, ErrorCode.UNAVAILABLE)
    log.warning("database unavailable: %s", exc)
    return error_response(ErrorCode.UNAVAILABLE, "the database cannot be reached; try again")


def _is_connection_error(exc: DBAPIError) -> bool:
    return isinstance(exc.orig, psycopg.OperationalError)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    _count(request, ErrorCode.INTERNAL_ERROR)
    log.exception("unhandled error", exc_info=exc)
    return error_response(ErrorCode.INTERNAL_ERROR, "internal error; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DBAPIError, _database_unavailable)
    app.add_exception_handler(PoolTimeout, _database_unavailable)
    app.add_exception_handler(Exception, _unexpected)
