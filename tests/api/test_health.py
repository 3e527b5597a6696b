"""/healthz against a real database and a real Temporal dev server, and with each one gone."""

from __future__ import annotations

import httpx

from core.settings import Settings
from tests.conftest import free_port, running_app


async def test_healthz_is_ok_when_database_and_temporal_answer(api: httpx.AsyncClient) -> None:
    response = await api.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "temporal": "ok"}


async def test_healthz_names_temporal_when_it_is_down(app_settings: Settings) -> None:
    settings = app_settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"})
    async with running_app(settings) as api:
        response = await api.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["error"] == "unavailable"
    assert body["details"] == {"status": "unavailable", "database": "ok", "temporal": "down"}


async def test_healthz_names_the_database_when_it_is_down(app_settings: Settings) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"
    settings = app_settings.model_copy(update={"database_url": url})
    async with running_app(settings) as api:
        response = await api.get("/healthz")
        inventory = await api.get("/inventory/ANY")
    assert response.status_code == 503
    assert response.json()["details"] == {
        "status": "unavailable",
        "database": "down",
        "temporal": "ok",
    }
    # Any route that needs the database answers 503 in the contract's shape, not a 500.
    assert inventory.status_code == 503
    assert inventory.json()["error"] == "unavailable"
