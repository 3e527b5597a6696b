"""The log line format: JSON or text, the ids a line carries, and what is never written."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from temporalio import activity, workflow

from core import logs
from core.settings import Settings


@pytest.fixture
def out() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.ContextFilter())
    handler.setFormatter(logs.json_formatter("api"))
    logger = logging.getLogger(f"test.logs.{id(stream)}")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream, handler
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_a_json_line_carries_the_ids_bound_in_its_task(
    out: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, _ = out

    async def request(number: int) -> None:
        logs.start_request(f"req-{number}")
        logs.bind(checkout_id=f"c-{number}", order_id=None)
        await asyncio.sleep(0)
        logger.info("step %d", number)

    await asyncio.gather(request(1), request(2))
    first, second = sorted(lines(stream), key=lambda line: str(line["request_id"]))
    assert first["message"] == "step 1"
    assert (first["request_id"], first["checkout_id"]) == ("req-1", "c-1")
    assert (second["request_id"], second["checkout_id"]) == ("req-2", "c-2")
    assert "order_id" not in first
    assert first["level"] == "INFO"
    assert first["service"] == "api"
    assert "time" in first


def test_extras_win_and_the_sdk_workflow_id_is_lifted(
    out: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, _ = out
    logger.info(
        "from a workflow",
        extra={"checkout_id": "c-9", "temporal_workflow": {"workflow_id": "checkout-c-9"}},
    )
    logger.info("from an activity", extra={"temporal_activity": {"workflow_id": "refund-o-1"}})
    wf, act = lines(stream)
    assert (wf["checkout_id"], wf["workflow_id"]) == ("c-9", "checkout-c-9")
    assert act["workflow_id"] == "refund-o-1"


def test_a_line_written_in_a_span_names_its_trace(
    out: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, _ = out
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        logger.info("inside")
    (line,) = lines(stream)
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")


@pytest.mark.parametrize(
    "secret",
    [
        "sk_live_51HxYzAbCdEf",
        "sk_test_localstripe",
        "whsec_0123456789abcdef",
        "pi_3Nf0abc_secret_XyZ123",
        "ot_" + "A1b2-C3d4_" * 6 + "Zz99",
        "ct_" + "A1b2-C3d4_" * 4 + "Zz9",
        "Bearer some-admin-token",
    ],
)
def test_secrets_are_masked_whatever_logs_them(
    out: tuple[logging.Logger, io.StringIO, logging.Handler], secret: str
) -> None:
    logger, stream, handler = out
    logger.warning("oops %s", secret, extra={"detail": {"header": secret}})
    try:
        raise ValueError(secret)
    except ValueError:
        logger.exception("failed")
    text = stream.getvalue()
    assert secret not in text
    assert logs.REDACTED in text
    handler.setFormatter(logs.TextFormatter())
    logger.warning("again %s", secret)
    assert secret not in stream.getvalue()


def test_text_lines_show_the_ids_after_the_message() -> None:
    record = logging.LogRecord("api", logging.INFO, __file__, 1, "paid", None, None)
    record.request_id, record.checkout_id = "r1", "c1"
    line = logs.TextFormatter().format(record)
    assert line.endswith("INFO api paid [request_id=r1 checkout_id=c1]")


def test_json_is_the_default_outside_development(settings: Settings) -> None:
    assert settings.development and not settings.log_as_json
    assert settings.model_copy(update={"environment": "production"}).log_as_json
    assert not settings.model_copy(update={"environment": "prod", "log_format": "text"}).log_as_json
    assert settings.model_copy(update={"log_format": "json"}).log_as_json


def test_configure_logging_routes_uvicorn_and_sets_levels(settings: Settings) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    access = logging.getLogger("uvicorn.access")
    saved_access = access.handlers[:], access.propagate
    try:
        logs.configure_logging(
            settings.model_copy(update={"log_format": "json", "log_level": "WARNING"}),
            service="worker",
        )
        (handler,) = root.handlers
        assert isinstance(handler.formatter, logs.RedactingJsonFormatter)
        assert root.level == logging.WARNING
        assert access.propagate and not access.handlers
        assert logging.getLogger("stripe").level == logging.WARNING
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        access.handlers[:], access.propagate = saved_access
        workflow.logger.workflow_info_on_message = True
        activity.logger.activity_info_on_message = True
