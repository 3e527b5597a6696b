"""The real stack for end-to-end tests, in this process where it can be: the API served by
uvicorn on a real port, the worker with the real activities, the Stripe stand-in as its own
process sending signed webhooks to the API; PostgreSQL and Temporal from the session."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import uvicorn
from aiohttp import web
from fastapi import FastAPI
from pydantic import SecretStr
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest
from temporalio.client import WorkflowHandle, WorkflowHistory
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode

from api.app import create_app
from api.deps import Services
from api.ratelimit import CheckoutLimiter
from core.db import create_engine, create_session_factory
from core.settings import Settings
from core.stripe_gateway import create_gateway
from core.temporal import connect
from core.tracing import Tracing
from core.workflow_ids import checkout_workflow_id
from tests.conftest import PROJECT_ROOT, free_port
from worker import build_worker

GOOD_CARD = "4242424242424242"
# The operator's view: the session's settings carry this admin token (tests/conftest.py).
ADMIN = {"Authorization": "Bearer test-admin-token"}
DECLINED_CARD = "4000000000000341"


class StripeStandIn:
    """The stand-in as a customer's browser and a test would use it."""

    def __init__(self, port: int, secret_key: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.http = httpx.AsyncClient(base_url=self.base, auth=(secret_key, ""), timeout=10)

    async def pay(self, intent_id: str, card: str = GOOD_CARD) -> httpx.Response:
        """Confirm the PaymentIntent with a card, as Stripe.js would for the customer."""
        method = await self.http.post(
            "/v1/payment_methods",
            data={
                "type": "card",
                "card[number]": card,
                "card[exp_month]": "12",
                "card[exp_year]": "2034",
                "card[cvc]": "123",
            },
        )
        method.raise_for_status()
        return await self.http.post(
            f"/v1/payment_intents/{intent_id}/confirm", data={"payment_method": method.json()["id"]}
        )

    async def intent(self, intent_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/v1/payment_intents/{intent_id}")
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    async def intents(self) -> list[dict[str, Any]]:
        """Every PaymentIntent the stand-in holds (all tests' of this stack, oldest first)."""
        return await self._all("/v1/payment_intents", {})

    async def events(self, type: str) -> list[dict[str, Any]]:
        return await self._all("/v1/events", {"type": type})

    async def _all(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        # The stand-in lists oldest first, at most 100 a page: a stack that has served more
        # than 100 of them would otherwise hide the newest, those of the running test.
        found: list[dict[str, Any]] = []
        while True:
            after = {"starting_after": found[-1]["id"]} if found else {}
            response = await self.http.get(path, params={**params, "limit": 100, **after})
            response.raise_for_status()
            page = response.json()
            found += page["data"]
            if not page["has_more"] or not page["data"]:
                return found


class FaultyStripe:
    """A proxy in front of the stand-in that the service talks to: passes requests through,
    or answers them all 503, or drops their connections, as a test says."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode = "pass"  # pass | 503 | drop
        self.refused = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.mode != "pass":
            self.refused += 1
            if self.mode == "drop" and request.transport is not None:
                request.transport.close()
            return web.json_response(
                {"error": {"type": "api_error", "message": "injected outage"}}, status=503
            )
        assert self._http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with self._http.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=await request.read(),
        ) as upstream:
            body = await upstream.read()
            return web.Response(status=upstream.status, body=body, content_type="application/json")

    async def start(self) -> None:
        self._http = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """A Stripe-Signature header for `payload`, as Stripe computes it."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


@dataclass
class Stack:
    settings: Settings
    app: FastAPI
    api: httpx.AsyncClient
    stripe: StripeStandIn
    stripe_proxy: FaultyStripe

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    async def post_webhook(
        self, event: dict[str, Any], *, signature: str | None = None
    ) -> httpx.Response:
        payload = json.dumps(event).encode()
        secret = self.settings.stripe_webhook_secret.get_secret_value()
        headers = {
            "Content-Type": "application/json",
            "Stripe-Signature": signature or sign(payload, secret),
        }
        return await self.api.post("/webhooks/stripe", content=payload, headers=headers)

    def run_of(self, checkout_id: str) -> WorkflowHandle[Any, Any]:
        """The checkout's workflow, as an operator reaches it in Temporal."""
        return self.services.temporal.get_workflow_handle(checkout_workflow_id(checkout_id))

    async def history(self, checkout_id: str) -> WorkflowHistory:
        return await self.run_of(checkout_id).fetch_history()

    async def delete_run(self, checkout_id: str, timeout: float = 30) -> None:
        """What `temporal workflow delete` does: the run (terminated first if it still runs)
        and its history are gone. Returns once Temporal no longer knows the workflow."""
        client = self.services.temporal
        await client.workflow_service.delete_workflow_execution(
            DeleteWorkflowExecutionRequest(
                namespace=client.namespace,
                workflow_execution=WorkflowExecution(workflow_id=checkout_workflow_id(checkout_id)),
            )
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.run_of(checkout_id).describe()
            except RPCError as exc:
                if exc.status == RPCStatusCode.NOT_FOUND:
                    return
                raise
            assert time.monotonic() < deadline, f"checkout {checkout_id}'s run was not deleted"
            await asyncio.sleep(0.1)

    async def wait_for_order(
        self, order_id: str, status: str, timeout: float = 20
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            order = (await self.api.get(f"/orders/{order_id}", headers=ADMIN)).json()
            if order.get("status") == status or time.monotonic() > deadline:
                assert order.get("status") == status, order
                return order  # type: ignore[no-any-return]
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def swapped_limiter(owner: Any, name: str, rate: str) -> AsyncIterator[CheckoutLimiter]:
    """`owner.<name>` (a running stack's limiter) replaced for the block by one of `rate` in
    this process. Rates per hour where a test does not wait: in memory the windows are aligned
    to the clock, and hits either side of an edge count as fewer."""
    loose = getattr(owner, name)
    tight = CheckoutLimiter(rate, None)
    setattr(owner, name, tight)
    try:
        yield tight
    finally:
        setattr(owner, name, loose)
        await tight.aclose()


def stack_settings(settings: Settings, name: str, temporal_address: str, **more: Any) -> Settings:
    """Settings for one stack of the tests: its own task queue and Stripe credentials."""
    return settings.model_copy(
        update={
            "temporal_address": temporal_address,
            "temporal_task_queue": f"{name}-{uuid.uuid4()}",
            "stripe_secret_key": SecretStr(f"sk_test_{name}"),
            "stripe_webhook_secret": SecretStr(f"whsec_{name}_secret"),
            # The tests drive load from one address and a few customers: limits that fit them
            # (the tests of the limits themselves set their own).
            "rate_limit_checkouts": "1000000/minute",
            "rate_limit_auth_failures": "1000000/minute",
            "rate_limit_carts": "1000000/minute",
            "max_pending_checkouts": 1_000_000,
            # The contract's reconciler (checkouts whose run was lost) at a pace tests can wait
            # for.
            "reconcile_interval": 5,
            **more,
        }
    )


@contextlib.asynccontextmanager
async def running_stack(
    settings: Settings,
    *,
    in_process_worker: bool = True,
    tracing: Tracing | None = None,
    runtime: Runtime | None = None,
) -> AsyncIterator[Stack]:
    """`tracing` traces the API and the worker as `python -m api` and worker.py do (instrument
    its clients before calling this); `runtime` is the worker's (its metrics endpoint)."""
    api_port, stripe_port = free_port(), free_port()
    secret = settings.stripe_webhook_secret.get_secret_value()
    standin = subprocess.Popen(
        [
            sys.executable, "-m", "devtools.stripe_standin",
            "--port", str(stripe_port),
            "--webhook-url", f"http://127.0.0.1:{api_port}/webhooks/stripe",
            "--webhook-secret", secret,
        ],
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    # The service reaches the stand-in through a proxy that tests can break.
    proxy = FaultyStripe(f"http://127.0.0.1:{stripe_port}")
    await proxy.start()
    settings = settings.model_copy(update={"stripe_api_base": proxy.url, "api_port": api_port})
    engine = create_engine(settings)
    client = await connect(
        settings,
        interceptors=[tracing.temporal_interceptor()] if tracing else [],
        runtime=runtime,
    )
    gateway = create_gateway(settings)
    worker = build_worker(settings, client, create_session_factory(engine), gateway)
    app = create_app(settings, tracing=tracing)
    server = uvicorn.Server(
        # As `python -m api` serves it: only TRUSTED_PROXIES decides about X-Forwarded-For.
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=api_port,
            log_level="warning",
            lifespan="on",
            proxy_headers=False,
        )
    )
    serving = asyncio.create_task(server.serve())
    stripe = StripeStandIn(stripe_port, settings.stripe_secret_key.get_secret_value())
    try:
        async with (
            worker if in_process_worker else contextlib.AsyncExitStack(),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=60) as api,
        ):
            deadline = time.monotonic() + 30
            while not server.started or standin.poll() is not None:
                assert time.monotonic() < deadline and standin.poll() is None, "stack did not start"
                await asyncio.sleep(0.05)
            while True:
                try:
                    await stripe.http.get("/v1/balance")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "stand-in did not start"
                    await asyncio.sleep(0.1)
            yield Stack(settings, app, api, stripe, proxy)
    finally:
        server.should_exit = True
        await serving
        await stripe.http.aclose()
        await proxy.stop()
        await gateway.aclose()
        await engine.dispose()
        standin.terminate()
        standin.wait(10)
