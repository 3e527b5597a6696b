"""Stripe webhooks: verified, recorded once, and signalled to the checkout's workflow."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.deps import ServicesDep
from api.schemas import ErrorBody, WebhookAck

router = APIRouter(tags=["webhooks"])


@router.post(
    "/webhooks/stripe",
    responses={400: {"model": ErrorBody, "description": "invalid_signature or invalid_payload"}},
)
async def stripe_webhook(request: Request, services: ServicesDep) -> WebhookAck:
    """Receive a Stripe event (raw body, Stripe-Signature header)."""
    payload = await request.body()
    event = services.webhooks.verify(payload, request.headers.get("stripe-signature"))
    return WebhookAck(outcome=await services.webhooks.receive(event))
