"""The Stripe stand-in: localstripe (PyPI), served by this launcher.

localstripe is a real, stateful imitation of Stripe's API that sends Stripe-signed webhooks.
Where it departs from Stripe's documented behaviour in ways the service relies on, this
module patches it, and nothing else:

- `Idempotency-Key` is honoured: a POST repeated with the same key (and the same body)
  returns the first response instead of acting twice; another body under the key is a 400
  `idempotency_error`, as on Stripe.
- `confirm` accepts `payment_method`, and a PaymentIntent whose card was declined can be
  confirmed again with another card (its status is `requires_payment_method`, as on Stripe).
- Cancelling a PaymentIntent sends `payment_intent.canceled`; a refund sends
  `charge.refunded` (with the charge's `amount_refunded`).
- Webhooks go out at once instead of after a fixed second, and a delivery that fails
  (connection refused, non-2xx) is retried with backoff for a while, as Stripe does.
- State is written to `--state-file` at most once a second and on shutdown (or kept in
  memory only), instead of re-pickling the whole store to /tmp after every write.
- Listing objects of one type reads an index instead of scanning the whole store. localstripe
  lists a charge's refunds that way each time it returns the charge (and so each PaymentIntent
  read with its charge), so every request grew slower with each object ever created.

    python -m devtools.stripe_standin --port 8420 --state-file .data/localstripe.pickle \
        --webhook-url http://127.0.0.1:8000/webhooks/stripe --webhook-secret whsec_...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import pickle
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

log = logging.getLogger("stripe_standin")

WEBHOOK_ID = "checkout-service"


class _Persistence:
    def __init__(self, store: Any, path: Path | None) -> None:
        self.store = store
        self.path = path
        self.dirty = False

    def load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        with self.path.open("rb") as f:
            saved = pickle.load(f)  # noqa: S301 - our own file, written below
        dict.clear(self.store)
        dict.update(self.store, saved)
        _BY_TYPE.rebuild(self.store)

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        self.dirty = False
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            pickle.dump(dict(self.store), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, self.path)

    async def flusher(self, app: web.Application) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(1)
                self.save()

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self.save()


def _patch_payment_intents() -> None:
    from localstripe import resources
    from localstripe.webhooks import schedule_webhook

    intent_cls: Any = resources.PaymentIntent
    original_confirm = intent_cls._api_confirm.__func__
    original_cancel = intent_cls._api_cancel.__func__

    def confirm(cls: Any, /, id: str, payment_method: str | None = None, **kwargs: Any) -> Any:
        obj = cls._api_retrieve(id) if isinstance(id, str) and id.startswith("pi_") else None
        if obj is not None and obj.status == "requires_payment_method":
            if payment_method is not None:
                resources.PaymentMethod._api_retrieve(payment_method)  # 404 if unknown
                obj.payment_method = payment_method
            if obj.payment_method is not None:
                # A declined attempt leaves a failed charge behind; Stripe lets the customer
                # try again, so the next confirm starts a new charge.
                obj.latest_charge = None
        return original_confirm(cls, id, **kwargs)

    def cancel(cls: Any, /, id: str, **kwargs: Any) -> Any:
        # Stripe accepts a reason; localstripe does not know the parameter.
        kwargs.pop("cancellation_reason", None)
        obj = original_cancel(cls, id, **kwargs)
        schedule_webhook(resources.Event("payment_intent.canceled", obj))
        return obj

    refund_cls: Any = resources.Refund
    original_refund = refund_cls._api_create.__func__

    def create_refund(cls: Any, /, **data: Any) -> Any:
        refund = original_refund(cls, **data)
        charge = resources.Charge._api_retrieve(refund.charge)
        schedule_webhook(resources.Event("charge.refunded", charge))
        return refund

    refund_cls._api_create = classmethod(create_refund)
    intent_cls._api_confirm = classmethod(confirm)
    intent_cls._api_cancel = classmethod(cancel)
    # The routes were bound to the original methods when `resources` was imported.
    replaced = {
        "/v1/payment_intents/{id}/confirm": intent_cls._api_confirm,
        "/v1/payment_intents/{id}/cancel": intent_cls._api_cancel,
    }
    resources.extra_apis[:] = [
        (method, url, replaced.get(url, func)) for method, url, func in resources.extra_apis
    ]


class _ByType:
    """The store's objects by type (`charge`, `refund`...), each type's in store order."""

    def __init__(self) -> None:
        self._types: dict[str, dict[str, Any]] = {}

    def add(self, key: str, obj: Any) -> None:
        kind, sep, _ = key.partition(":")
        if sep:  # singletons such as the balance have no id
            self._types.setdefault(kind, {})[key] = obj

    def remove(self, key: str) -> None:
        kind, _, _ = key.partition(":")
        self._types.get(kind, {}).pop(key, None)

    def rebuild(self, store: dict[str, Any]) -> None:
        self._types.clear()
        for key, obj in dict.items(store):
            self.add(key, obj)

    def of(self, kind: str) -> list[Any]:
        return list(self._types.get(kind, {}).values())


_BY_TYPE = _ByType()


def _index_store() -> None:
    from localstripe import resources

    store_cls: Any = resources.Store

    def setitem(self: Any, key: str, value: Any) -> None:
        dict.__setitem__(self, key, value)
        _BY_TYPE.add(key, value)
        self.dump_to_disk()

    def delitem(self: Any, key: str) -> None:
        dict.__delitem__(self, key)
        _BY_TYPE.remove(key)
        self.dump_to_disk()

    def clear(self: Any) -> None:
        dict.clear(self)
        _BY_TYPE.rebuild(self)

    def list_all(
        cls: Any, /, url: str, limit: Any = None, starting_after: Any = None, **kwargs: Any
    ) -> Any:
        # localstripe's own base listing, with the index in place of the scan.
        if kwargs:
            raise resources.UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
        listed = resources.List(url, limit=limit, starting_after=starting_after)
        listed._list = _BY_TYPE.of(cls.object)
        return listed

    store_cls.__setitem__ = setitem
    store_cls.__delitem__ = delitem
    store_cls.clear = clear
    object_cls: Any = resources.StripeObject
    object_cls._api_list_all = classmethod(list_all)
    _BY_TYPE.rebuild(resources.store)


def _patch_webhook_delivery(attempts: int = 8, first_delay: float = 0.2) -> None:
    import hashlib
    import hmac
    import json

    import aiohttp
    from localstripe import webhooks

    async def send(event: Any) -> None:
        payload = json.dumps(event._export(), indent=2, sort_keys=True).encode()
        for hook in list(webhooks._webhooks.values()):
            if hook.events is not None and event.type not in hook.events:
                continue
            task = asyncio.ensure_future(_deliver(hook, event, payload))
            _DELIVERIES.add(task)
            task.add_done_callback(_DELIVERIES.discard)

    async def _deliver(hook: Any, event: Any, payload: bytes) -> None:
        delay = first_delay
        for attempt in range(1, attempts + 1):
            # Each delivery is signed anew, with the time of that delivery, as Stripe does.
            timestamp = int(time.time())
            signed = b"%d.%s" % (timestamp, payload)
            signature = hmac.new(hook.secret.encode(), signed, hashlib.sha256).hexdigest()
            headers = {
                "Content-Type": "application/json; charset=utf-8",
                "Stripe-Signature": f"t={timestamp},v1={signature}",
            }
            try:
                async with _session().post(
                    hook.url, data=payload, headers=headers, timeout=aiohttp.ClientTimeout(10)
                ) as response:
                    if 200 <= response.status < 300:
                        log.info("webhook %s %s delivered", event.type, event.id)
                        return
                    log.info("webhook %s %s got %d", event.type, event.id, response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.info("webhook %s %s failed: %s", event.type, event.id, exc)
            if attempt < attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        log.warning("webhook %s %s given up after %d attempts", event.type, event.id, attempts)

    sessions: list[aiohttp.ClientSession] = []

    def _session() -> aiohttp.ClientSession:
        # One connection pool for every delivery, created inside the running loop.
        if not sessions:
            sessions.append(aiohttp.ClientSession())
        return sessions[0]

    webhooks._send_webhook = send


@web.middleware
async def _idempotency(request: web.Request, handler: Any) -> web.StreamResponse:
    key = request.headers.get("Idempotency-Key")
    if request.method != "POST" or not key:
        passed: web.StreamResponse = await handler(request)
        return passed
    scope = (request.headers.get("Authorization", ""), key)
    fingerprint = (request.path, await request.read())
    async with _IDEMPOTENCY_LOCKS.setdefault(scope, asyncio.Lock()):
        cached = _IDEMPOTENCY_CACHE.get(scope)
        if cached is not None:
            if cached[0] != fingerprint:
                return web.json_response(
                    {
                        "error": {
                            "type": "idempotency_error",
                            "message": "Keys for idempotent requests can only be used with "
                            "the same parameters they were first used with.",
                        }
                    },
                    status=400,
                )
            return web.Response(
                status=cached[1],
                body=cached[2],
                content_type="application/json",
                headers={"Idempotent-Replayed": "true"},
            )
        response: web.StreamResponse = await handler(request)
        # Successes are replayed; errors are not cached, so a retry can succeed.
        if 200 <= response.status < 300 and isinstance(response, web.Response):
            body = response.body if isinstance(response.body, bytes) else b""
            _IDEMPOTENCY_CACHE[scope] = (fingerprint, response.status, body)
        return response


_DELIVERIES: set[asyncio.Future[None]] = set()
_IDEMPOTENCY_CACHE: dict[tuple[str, str], tuple[tuple[str, bytes], int, bytes]] = {}
_IDEMPOTENCY_LOCKS: dict[tuple[str, str], asyncio.Lock] = {}


def build_app(state_file: Path | None) -> web.Application:
    from localstripe import resources

    # Before `server` is imported: it registers the routes from `extra_apis` at import.
    _index_store()
    _patch_payment_intents()
    _patch_webhook_delivery()
    from localstripe import server

    persistence = _Persistence(resources.store, state_file)

    def mark_dirty(*_: Any, **__: Any) -> None:
        persistence.dirty = True

    # Instance attributes shadow the class's per-write pickling.
    resources.store.dump_to_disk = mark_dirty
    resources.store.try_load_from_disk = persistence.load
    persistence.load()
    app: web.Application = server.app
    app.middlewares.append(_idempotency)
    app.cleanup_ctx.append(persistence.flusher)
    return app


def register_webhook(url: str, secret: str, webhook_id: str = WEBHOOK_ID) -> None:
    from localstripe.webhooks import register_webhook as register

    register(webhook_id, url, secret, None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8420)
    parser.add_argument("--state-file", type=Path, default=None)
    parser.add_argument("--webhook-url")
    parser.add_argument("--webhook-secret")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app = build_app(args.state_file)
    if args.webhook_url and args.webhook_secret:
        register_webhook(args.webhook_url, args.webhook_secret)
    try:
        import uvloop
    except ImportError:  # it has no Windows build
        loop = None
    else:
        loop = uvloop.new_event_loop()
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=log.info, loop=loop)


if __name__ == "__main__":
    main()
