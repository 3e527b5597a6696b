"""GET /metrics: the API's Prometheus metrics (`api.metrics`), outside the OpenAPI document."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from api.deps import ServicesDep, guarded_guess
from core.errors import Unauthorized

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, services: ServicesDep) -> Response:
    """Public, like `/healthz`, unless METRICS_TOKEN is set: then for `Authorization: Bearer
    <it>` only, and a wrong token counts as a guess (`guarded_guess`: one budget with the
    admin token's, per client address)."""
    token = services.settings.metrics_token
    if token is not None and token.get_secret_value():
        given = request.headers.get("authorization")
        expected = f"Bearer {token.get_secret_value()}"

        async def check() -> None:
            if not hmac.compare_digest((given or "").encode(), expected.encode()):
                raise Unauthorized("metrics need the METRICS_TOKEN")

        if given is None:  # a scraper without credentials, not a guess
            await check()
        else:
            await guarded_guess(request, services, "metrics", check)
    body = await services.metrics.exposition()
    return Response(body, media_type=CONTENT_TYPE_LATEST)
