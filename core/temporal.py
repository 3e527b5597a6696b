"""The Temporal client, built the same way for the API, the worker and the tools."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from core.settings import Settings


async def connect(settings: Settings, *, lazy: bool = False) -> Client:
    """Connect to Temporal. `lazy` defers the connection to the first call, so the API can
    start (and report Temporal as down on /healthz) while the server is still coming up."""
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
        lazy=lazy,
    )
