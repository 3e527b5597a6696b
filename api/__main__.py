"""`python -m api`: serve the API with uvicorn on API_HOST:API_PORT."""

from __future__ import annotations

import uvicorn

from api.app import create_app
from core.settings import load_settings


def main() -> None:
    settings = load_settings()
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level="info",
        access_log=settings.api_access_log,
        # Stripe and the clients send small bodies; keep-alive helps the load generator.
        timeout_keep_alive=30,
        # uvicorn would believe X-Forwarded-For from 127.0.0.1; only TRUSTED_PROXIES counts
        # (api.client_address.ClientAddressMiddleware).
        proxy_headers=False,
    )


if __name__ == "__main__":
    main()
