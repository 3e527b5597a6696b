"""OpenTelemetry traces: one tracer provider per process, and what instruments itself with it.

Tracing is always on; spans leave the process only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, over OTLP (`OTEL_EXPORTER_OTLP_PROTOCOL`:
`http/protobuf`, the default, or `grpc`). Everything else is the SDK's own configuration, read by
the SDK itself: `OTEL_SERVICE_NAME` (default `checkout-api` / `checkout-worker`),
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` (+ `_ARG`), `OTEL_EXPORTER_OTLP_HEADERS`,
`OTEL_BSP_*`, `OTEL_SDK_DISABLED`.

How a checkout's trace connects: the API's request span (FastAPI) is the parent of the Temporal
client's `StartUpdateWithStartWorkflow` span; Temporal's `TracingInterceptor` carries its context
in the workflow's headers to `RunWorkflow`, `StartActivity` and `RunActivity`; inside an activity
the psycopg and aiohttp (Stripe) spans are children of `RunActivity`. A webhook's
`SignalWorkflow` span is linked from the workflow's `HandleSignal` span, which belongs to the
checkout's trace, as does the settling that follows it.
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from temporalio.contrib.opentelemetry import TracingInterceptor

# The API's probes: one span per scrape or health check would be noise.
UNTRACED_URLS = "/healthz,/metrics"


def _exporter() -> SpanExporter | None:
    env = os.environ
    if not any(env.get(f"OTEL_EXPORTER_OTLP_{kind}ENDPOINT") for kind in ("TRACES_", "")):
        return None
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter()


class Tracing:
    """The process's tracer provider. Built once in a process's `main()` (tests build theirs
    with an in-memory exporter) before anything is instrumented."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider

    @classmethod
    def from_environment(cls, service: str) -> Tracing:
        """Spans for `service`, exported over OTLP if an endpoint is configured, else nowhere:
        without a span processor a span costs its creation and nothing more."""
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service}
        provider = TracerProvider(resource=Resource.create(attributes))
        exporter = _exporter()
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    def temporal_interceptor(self) -> TracingInterceptor:
        """For the Temporal client (API and worker): a worker built on the client gets it too."""
        return TracingInterceptor(self.provider.get_tracer("temporalio"))

    def instrument_clients(self) -> None:
        """PostgreSQL (psycopg: every connection opened from now on) and Stripe (aiohttp: every
        session created from now on), for this whole process. Statements' parameters are not
        captured: spans carry the SQL text, never customer data."""
        PsycopgInstrumentor().instrument(tracer_provider=self.provider, skip_dep_check=True)
        AioHttpClientInstrumentor().instrument(tracer_provider=self.provider)

    def uninstrument_clients(self) -> None:
        PsycopgInstrumentor().uninstrument()
        AioHttpClientInstrumentor().uninstrument()

    def instrument_app(self, app: FastAPI) -> None:
        # Without the ASGI receive/send spans: two more spans per request, saying little.
        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=self.provider,
            excluded_urls=UNTRACED_URLS,
            exclude_spans=["receive", "send"],
        )

    def shutdown(self) -> None:
        """Flush what is still buffered (a process's last spans) and stop exporting."""
        self.provider.shutdown()
