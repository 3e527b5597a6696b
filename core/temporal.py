"""The Temporal client, built the same way for the API, the worker and the tools, and the one
retry Temporal's answers call for."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar, Self, TypeVar

from temporalio.api.enums.v1 import ResourceExhaustedCause
from temporalio.api.errordetails.v1 import MultiOperationExecutionFailure, ResourceExhaustedFailure
from temporalio.client import Client, Interceptor
from temporalio.contrib.pydantic import PydanticPayloadConverter
from temporalio.converter import DataConverter, SerializationContext, WithSerializationContext
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    PrometheusConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)
from temporalio.service import RPCError, RPCStatusCode, TLSConfig

from core.metrics import HISTOGRAMS, LATENCY_BUCKETS
from core.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


class SharedPydanticPayloadConverter(PydanticPayloadConverter):
    """The SDK's pydantic payload converter, built once per process.

    A worker builds a data converter for every workflow activation (it carries the
    activation's serialization context), and each builds its payload converter anew: a new
    SchemaSerializer and an empty cache of type adapters every time, 1.6% of the worker's CPU
    under `make bench` (py-spy). Nothing in it depends on the context, and its only state is
    that cache (an `lru_cache`, safe across threads), so one instance serves every activation.
    """

    _shared: ClassVar[SharedPydanticPayloadConverter | None] = None

    def __new__(cls) -> SharedPydanticPayloadConverter:
        if cls._shared is None:
            shared = super().__new__(cls)
            PydanticPayloadConverter.__init__(shared)
            cls._shared = shared
        return cls._shared

    def __init__(self) -> None:
        """Built once, in `__new__`."""

    def with_context(self, context: SerializationContext) -> Self:
        """The SDK's version builds a new instance and replaces its converters, which here
        would replace the shared instance's: refused, should one of them ever take a
        serialization context (none does)."""
        if any(isinstance(c, WithSerializationContext) for c in self.converters.values()):
            raise TypeError("the shared payload converter cannot take a serialization context")
        return self


# Pydantic models and everything else pydantic can convert, as JSON.
DATA_CONVERTER = DataConverter(payload_converter_class=SharedPydanticPayloadConverter)


async def connect(
    settings: Settings,
    *,
    lazy: bool = False,
    interceptors: Sequence[Interceptor] = (),
    runtime: Runtime | None = None,
) -> Client:
    """Connect to Temporal. `lazy` defers the connection to the first call, so the API can
    start (and report Temporal as down on /healthz) while the server is still coming up.
    Credentials (an API key, a client certificate) come from the settings, the same for the
    API, the worker and the tools. `interceptors` (tracing) also apply to a worker built on
    this client."""
    api_key = settings.temporal_api_key
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        api_key=api_key.get_secret_value() if api_key else None,
        tls=tls_config(settings),
        data_converter=DATA_CONVERTER,
        lazy=lazy,
        interceptors=interceptors,
        runtime=runtime,
    )


def create_runtime(*, metrics_address: str | None = None) -> Runtime:
    """The SDK's runtime for a process: its core's log lines forwarded into Python logging (so
    they come out formatted like every other line, see core/logs.py) and, given an address
    (`host:port`), its metrics served there for Prometheus: the SDK's own (`temporal_*`) and
    the worker's (`checkout_*`, core/metrics.py), with conventional names (`_total` on
    counters, durations in seconds)."""
    return Runtime(
        telemetry=TelemetryConfig(
            logging=LoggingConfig(
                filter=TelemetryFilter(core_level="WARN", other_level="ERROR"),
                forwarding=LogForwardingConfig(logger=logging.getLogger("temporalio.core")),
            ),
            metrics=PrometheusConfig(
                bind_address=metrics_address,
                counters_total_suffix=True,
                durations_as_seconds=True,
                histogram_bucket_overrides={name: LATENCY_BUCKETS for name in HISTOGRAMS},
            )
            if metrics_address
            else None,
        )
    )


def tls_config(settings: Settings) -> TLSConfig | bool:
    """TLS for the Temporal connection: a client certificate (mTLS), a CA of our own, a server
    name, or an API key each turn it on; an API key alone checks the server against the
    system's roots (Temporal Cloud's certificates chain to a public CA). None of them: False,
    plaintext. The PEM files are read here, at start-up: Settings has checked they exist."""
    server_ca = settings.temporal_tls_ca.read_bytes() if settings.temporal_tls_ca else None
    cert = settings.temporal_tls_cert.read_bytes() if settings.temporal_tls_cert else None
    key = settings.temporal_tls_key.read_bytes() if settings.temporal_tls_key else None
    if cert is None and server_ca is None and settings.temporal_tls_server_name is None:
        # Never an API key in clear text: with one, TLS against the system's roots.
        return settings.temporal_api_key is not None
    return TLSConfig(
        server_root_ca_cert=server_ca,
        domain=settings.temporal_tls_server_name,
        client_cert=cert,
        client_private_key=key,
    )


# Temporal refuses an update or a signal that reaches a run in the instant it is completing
# ("workflow is closing": RESOURCE_EXHAUSTED with cause BUSY_WORKFLOW). Asked again a moment
# later, the run is closed and the caller gets a definite answer, so these are retried briefly
# instead of becoming a 503. Other RESOURCE_EXHAUSTED causes (rate limits, an overloaded
# server) are not: retrying would only add load.
BUSY_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


def workflow_busy(exc: RPCError) -> bool:
    if exc.status == RPCStatusCode.ABORTED:
        return True
    if exc.status != RPCStatusCode.RESOURCE_EXHAUSTED:
        return False
    details = list(exc.grpc_status.details)
    multi = MultiOperationExecutionFailure()
    # Update-with-Start reports each operation's status inside one multi-operation failure.
    for detail in list(details):
        if detail.Unpack(multi):
            details += [d for status in multi.statuses for d in status.details]
    failure = ResourceExhaustedFailure()
    return any(
        detail.Unpack(failure)
        and failure.cause == ResourceExhaustedCause.RESOURCE_EXHAUSTED_CAUSE_BUSY_WORKFLOW
        for detail in details
    )


async def retry_while_busy(call: Callable[[], Awaitable[T]]) -> T:
    for delay in BUSY_RETRY_DELAYS:
        try:
            return await call()
        except RPCError as exc:
            if not workflow_busy(exc):
                raise
            log.info("workflow busy (%s); retrying in %.2fs", exc.message, delay)
            await asyncio.sleep(delay)
    return await call()
