"""The real worker, as its own process, that SIGKILLs itself right after a chosen activity
has done its work (and before Temporal hears of it): the worst moment to die.

    KILL_AFTER=open_order python -m tests.e2e.crashing_worker
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from temporalio import activity
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

from core.db import create_engine, create_session_factory
from core.settings import Settings
from core.stripe_gateway import create_gateway
from core.temporal import connect
from worker import build_worker


class _KillAfter(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        result = await super().execute_activity(input)
        if activity.info().activity_type == os.environ.get("KILL_AFTER"):
            os.kill(os.getpid(), signal.SIGKILL)
        return result


class KillAfter(Interceptor):
    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _KillAfter(next)


async def main() -> None:
    settings = Settings(environment="development")
    engine = create_engine(settings)
    client = await connect(settings)
    gateway = create_gateway(settings)
    worker = build_worker(settings, client, create_session_factory(engine), gateway, [KillAfter()])
    print("worker ready", flush=True)
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main())
