"""Schemathesis hooks for the API fuzz run: every error answer has the contract's shape."""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.check
def error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code < 400:
        return None
    body = response.json()
    assert isinstance(body, dict), f"error body is not an object: {body!r}"
    assert isinstance(body.get("error"), str), f"no error code: {body!r}"
    assert isinstance(body.get("message"), str), f"no message: {body!r}"
    assert set(body) <= {"error", "message", "details"}, f"unexpected keys: {body!r}"
    return True
