"""`python -m api`: serve the API with uvicorn on API_HOST:API_PORT."""

from __future__ import annotations

import uvicorn
from temporalio.runtime import Runtime

from api.app import create_app
from core.logs import configure_logging
from core.settings import load_settings
from core.temporal import create_runtime
from core.tracing import Tracing


def main() -> None:
    settings = load_settings()
    configure_logging(settings, service="api")
    # The Temporal client's core logs through Python logging too (no metrics endpoint here:
    # the API's metrics are its own, at /metrics).
    Runtime.set_default(create_runtime())
    tracing = Tracing.from_environment("checkout-api")
    tracing.instrument_clients()
    uvicorn.run(
        create_app(settings, tracing=tracing, settle_heap=True),
        host=settings.api_host,
        port=settings.api_port,
        # Logging is configured above (core/logs.py): uvicorn's loggers write through it.
        log_config=None,
        log_level=settings.log_level.lower(),
        access_log=settings.api_access_log,
        # Stripe and the clients send small bodies; keep-alive helps the load generator.
        timeout_keep_alive=30,
        # uvicorn would believe X-Forwarded-For from 127.0.0.1; only TRUSTED_PROXIES counts
        # (api.client_address.ClientAddressMiddleware).
        proxy_headers=False,
    )
    tracing.shutdown()


if __name__ == "__main__":
    main()
