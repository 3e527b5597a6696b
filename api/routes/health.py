"""Liveness of the service and the two parts it cannot work without."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import ServicesDep
from api.schemas import ErrorBody, HealthOut
from core.errors import Unavailable

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)

PROBE_TIMEOUT = 2.0


@router.get("/healthz", responses={503: {"model": ErrorBody, "description": "a part is down"}})
async def healthz(services: ServicesDep) -> HealthOut:
    """200 when the database and Temporal both answer; 503 naming the part that does not."""
    database, temporal = await asyncio.gather(_database(services), _temporal(services))
    parts = {"database": database, "temporal": temporal}
    down = [name for name, state in parts.items() if state != "ok"]
    if down:
        raise Unavailable(
            f"{' and '.join(down)} unavailable", details={"status": "unavailable", **parts}
        )
    return HealthOut(status="ok", **parts)


async def _database(services: ServicesDep) -> str:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT), services.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except Exception as exc:
        log.warning("database health probe failed: %s", exc)
        return "down"
    return "ok"


async def _temporal(services: ServicesDep) -> str:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            ok = await services.temporal.service_client.check_health(
                timeout=timedelta(seconds=PROBE_TIMEOUT)
            )
    except Exception as exc:
        log.warning("temporal health probe failed: %s", exc)
        return "down"
    return "ok" if ok else "down"
