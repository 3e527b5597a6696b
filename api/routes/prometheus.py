"""GET /metrics: the API's Prometheus metrics (`api.metrics`), outside the OpenAPI document."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from api.auth import bearer_token
from api.deps import ServicesDep, guarded_guess
from core.errors import Unauthorized

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, services: ServicesDep) -> Response:
    """Public, like `/healthz`, unless METRICS_TOKEN is set: then for `Authorization: Bearer
    <it>` only. A wrong bearer token counts as a guess (`guarded_guess`, with a budget of its
    own per client address); a request without a bearer token is refused and spends nothing."""
    secret = services.settings.metrics_token
    if secret is not None and secret.get_secret_value():
        header = request.headers.get("authorization")
        token = bearer_token(header) if header is not None else None
        expected = secret.get_secret_value().encode()

        async def check() -> None:
            if token is None or not hmac.compare_digest(token.encode(), expected):
                raise Unauthorized("metrics need the METRICS_TOKEN")

        if token is None:  # a scraper without credentials: nothing was guessed
            await check()
        else:
            await guarded_guess(
                request, services, services.metrics_token_failures, "metrics", check
            )
    body = await services.metrics.exposition()
    return Response(body, media_type=CONTENT_TYPE_LATEST)
